"""Block-diffusion and self-speculative decoding for a megablock export, with transformers alone.

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)
    out = model.block_generate(input_ids, attention_mask, max_new_tokens=64)   # out.sequences

Each class is the family's own transformers model (forward, loss, `generate()` as AR, PEFT,
quantization are unchanged) plus `block_generate`. The decoding rules and both loops are
`block_rules.py` beside this file, a verbatim copy of megablock's module: this file only tells
them how to run the HF network over their KV cache. It imports torch and transformers only.

Attention: the draft block attends bidirectionally to itself and to the cached context, which
takes an explicit 4D mask. The "sdpa" and "eager" implementations take one (boolean for sdpa,
additive for eager); others ("flash_attention_2", "flex_attention", paged, kernels) are refused:
reload with `attn_implementation="sdpa"`.

A gated drafter (drafter/ of a lora.scope=noised export) loads through PEFT, but PEFT applies an
adapter at every position; the drafter was trained on the draft block only, with a delta on the
mask token's embedding row that PEFT has no place for. `use_drafter(folder)` after
`PeftModel.from_pretrained` adds both: inside `block_generate` the LoRA outputs are gated to the
draft slots (the verify / append slots, whose K/V stay in the cache, are the base model's) and
the mask row gets its delta there. Outside `block_generate` the adapters apply as PEFT applies them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from transformers.modeling_utils import load_state_dict
from transformers.utils import ModelOutput

from .block_rules import (DECODE_MODES, GenerateConfig, SamplingParams, SpeculativeConfig, SpeculativeDecoder,
                          ThresholdDecoder)
from .configuration_megablock import (MegablockLlamaConfig, MegablockMistralConfig, MegablockQwen2Config,
                                      MegablockQwen3Config)

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class BlockGenerateOutput(ModelOutput):
    """`sequences` [batch, n]: each prompt's new tokens (an EOS that ended a row included), padded
    after it with the pad id. `forwards`: model calls for the whole batch; `tokens_per_forward`:
    new tokens / forwards; `drafts_kept`: speculative mode, the drafts kept in each verified
    block (every row's, in order); None in threshold mode."""

    sequences: Optional[torch.LongTensor] = None
    forwards: Optional[int] = None
    tokens_per_forward: Optional[float] = None
    drafts_kept: Optional[list] = None


class _CacheView:
    """The `past_key_values` the HF attention layers see: `update` writes the new K/V into the
    block_rules cache and returns what the new queries attend to (the mask goes in separately)."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.cache.store(layer_idx, key_states, value_states)


class _HFRunner:
    """The network calls of the decoding loops, over an HF causal LM (see block_rules.Decoder)."""

    def __init__(self, lm, mask_token_id: Optional[int], eos: Sequence[int], pad_token_id: int):
        self.lm = lm
        self.drafter = getattr(lm, "_megablock_drafter", None)
        self.mask_token_id = mask_token_id
        self.eos = torch.tensor(sorted(set(eos)), dtype=torch.long)
        self.pad_token_id = pad_token_id
        self.device = lm.device
        self.vocab_size = lm.config.vocab_size
        self.eager = lm.config._attn_implementation == "eager"

    def _mask(self, cache, n: int, dtype) -> torch.Tensor:
        """This forward's [b, 1, n, keys] mask, materialised: HF builds its own causal mask when
        given none, which is wrong for a draft block."""
        mask = cache.mask(self.device)
        if mask is None:  # plain causal from an empty cache, or every key visible
            mask = torch.ones(n, self._keys(cache, n), dtype=torch.bool, device=self.device)
            if getattr(cache, "causal", False):
                mask = mask.tril()
            mask = mask[None, None]
        if self.eager:  # eager adds the mask to the scores
            return torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask

    @staticmethod
    def _keys(cache, n: int) -> int:
        lengths = getattr(cache, "lengths", None)
        return n + (int(lengths.max()) if lengths is not None else cache.length)

    def _encode(self, ids, pos, cache) -> torch.Tensor:
        mask = self._mask(cache, ids.shape[1], self.lm.dtype)
        inputs = {"input_ids": ids}
        if self.drafter is not None:
            gate = self.drafter.gate = cache.adapter_gate()
            if self.drafter.mask_row_delta is not None:
                inputs = {"inputs_embeds": self.drafter.embed(self.lm.model.embed_tokens, ids, gate, self.mask_token_id)}
        try:
            out = self.lm.model(**inputs, position_ids=pos, attention_mask=mask, past_key_values=_CacheView(cache),
                                use_cache=True)
        finally:
            if self.drafter is not None:
                self.drafter.gate = None  # outside block_generate, PEFT's own behaviour
        return out.last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # One [rows, H] x [H, V] product: a 3D strided input (the slots the loop picked) can
        # send the head through a batched matmul that broadcasts the whole [H, V] weight per row.
        flat = self.lm.lm_head(hidden.reshape(-1, hidden.shape[-1]))
        logits = flat.view(*hidden.shape[:-1], -1)[..., : self.vocab_size].float()
        if self.mask_token_id is not None and self.mask_token_id < self.vocab_size:
            logits[..., self.mask_token_id] = float("-inf")
        return logits

    def _agree(self, t: torch.Tensor) -> torch.Tensor:
        return t


class _Drafter:
    """The gate of a PEFT-loaded drafter: forward hooks on every LoRA B projection multiply its
    output by the current forward's gate (True: every slot, False: none, [1, n] bool: per slot),
    and the mask-row delta added to the embeddings of masked, gated slots."""

    def __init__(self, lm, folder: Path):
        if not (folder / "megablock_drafter.json").is_file():
            raise ValueError(f"{folder} has no megablock_drafter.json: pass the drafter/ folder of a lora.scope=noised "
                             "export (tools/export_hf.py writes it)")
        info = json.loads((folder / "megablock_drafter.json").read_text())
        if info.get("scope") != "noised":
            raise ValueError(f"{folder} holds scope={info.get('scope')!r} adapters: only a gated drafter "
                             "(lora.scope=noised) needs use_drafter; plain LoRA applies everywhere as PEFT loads it")
        if info.get("mask_token_id") != lm.config.mask_token_id:
            raise ValueError(f"{folder} was trained with mask token {info.get('mask_token_id')}, this model has "
                             f"{lm.config.mask_token_id}: use the base folder it was exported with")
        self.gate = None
        self.mask_row_delta = None
        if info.get("mask_row_delta"):
            delta = next(iter(load_state_dict(str(folder / "megablock_drafter.safetensors")).values()))
            self.mask_row_delta = delta.to(device=lm.device, dtype=lm.dtype)
        lora_b = [m for name, m in lm.named_modules() if ".lora_B." in f"{name}." and isinstance(m, torch.nn.Linear)]
        if not lora_b:
            raise ValueError(f"no LoRA layers found: load {folder} with peft.PeftModel.from_pretrained(model, "
                             f"{str(folder)!r}) first, then call use_drafter")
        self.hooks = [m.register_forward_hook(self._gated) for m in lora_b]

    def _gated(self, module, args, output):
        g = self.gate
        if g is None or g is True:
            return output
        if g is False:
            return torch.zeros_like(output)
        return output * g[..., None].to(output.dtype)

    def embed(self, embed_tokens, ids, gate, mask_token_id) -> torch.Tensor:
        emb = embed_tokens(ids)
        hit = ids == mask_token_id
        if gate is False:
            return emb
        if gate is not True:
            hit = hit & gate
        return torch.where(hit[..., None], emb + self.mask_row_delta, emb)


class _ThresholdRunner(_HFRunner, ThresholdDecoder):
    pass


class _SpeculativeRunner(_HFRunner, SpeculativeDecoder):
    pass


def _ids(*values) -> list:
    out = set()
    for v in values:
        if v is not None:
            out.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    return sorted(out)


class BlockGenerationMixin:
    """`block_generate` for a family's causal LM."""

    def use_drafter(self, folder) -> None:
        """Gate the PEFT adapters loaded from drafter folder `folder` to the draft slots inside
        `block_generate`, and add its mask-row delta (see the module doc). Call it after
        `PeftModel.from_pretrained(model, folder)`."""
        if getattr(self, "_megablock_drafter", None) is not None:
            for h in self._megablock_drafter.hooks:
                h.remove()
        self._megablock_drafter = _Drafter(self, Path(folder))

    def block_generate(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                       block_size: Optional[int] = None, mode: str = "threshold", threshold: float = 0.9,
                       max_new_tokens: int = 64, temperature: float = 0.0, top_p: Optional[float] = None,
                       top_k: Optional[int] = None, eos_token_id: Union[int, Sequence[int], None] = None,
                       pad_token_id: Optional[int] = None, seed: int = 0, tokens_per_step: Optional[int] = None,
                       two_pass: bool = False, next_draft: str = "masked", branches: int = 1,
                       reuse_drafts: bool = False, candidates: int = 0,
                       candidate_split: str = "even") -> BlockGenerateOutput:
        """Decode `input_ids` [batch, L] (padded on either side; `attention_mask` marks the real
        tokens) block by block.

        mode "threshold": each block of `block_size` (default: the trained one) slots is refined
        in parallel, committing every slot whose confidence is above `threshold` (at least one per
        step; `tokens_per_step` instead commits that many). mode "speculative": the noised half
        drafts a block, the clean half verifies it; the output is exactly the model's AR decoding
        (token for token when greedy, in distribution when sampling). One forward per block
        by default (the verify pass drafts the next block, laid out by `next_draft`: "masked" /
        "overlap"; `branches` next blocks, one per number of kept drafts it bets on, and
        `reuse_drafts` verifies the drafts after a rejected one in the next pass; with branches >= 2,
        `candidates` more next blocks per cut bet reveal the drafter's next likeliest tokens for the
        cut slot, `candidate_split` "even" per bet or "likeliest" to the drafter's likeliest (cut,
        token) pairs); `two_pass` drafts in a forward of its own.
        temperature 0 is greedy; otherwise top_k / top_p sampling with a generator seeded by `seed`.
        EOS ids default to the config's and the generation config's.
        """
        if mode not in DECODE_MODES:
            raise ValueError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
        impl = self.config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"block_generate needs an attention that takes a 4D mask ({' or '.join(SUPPORTED_ATTENTION)}); this "
                f"model was loaded with attn_implementation={impl!r}: reload it with attn_implementation=\"sdpa\""
            )
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or []):
            raise ValueError("block_generate does not decode sliding-window layers; megablock trains full attention")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        prompts = [row[m].tolist() for row, m in zip(input_ids.cpu(), keep.cpu())]
        gen = getattr(self, "generation_config", None)
        eos = _ids(eos_token_id) if eos_token_id is not None else _ids(
            self.config.eos_token_id, getattr(gen, "eos_token_id", None))
        pad = pad_token_id if pad_token_id is not None else next(
            (p for p in (self.config.pad_token_id, getattr(gen, "pad_token_id", None)) if p is not None),
            eos[0] if eos else 0)
        B = block_size or self.config.block_size
        sampling = SamplingParams(temperature, top_k, top_p)
        shift = bool(self.config.diffusion_shift)
        if mode == "threshold":
            runner = _ThresholdRunner(self, self.config.mask_token_id, eos, pad)
            cfg = GenerateConfig(block_size=B, max_new_tokens=max_new_tokens, threshold=threshold,
                                 tokens_per_step=tokens_per_step, shift=shift, sampling=sampling, seed=seed)
        else:
            runner = _SpeculativeRunner(self, self.config.mask_token_id, eos, pad)
            cfg = SpeculativeConfig(block_size=B, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                    two_pass=two_pass, next_draft=next_draft, branches=branches,
                                    reuse_drafts=reuse_drafts, candidates=candidates,
                                    candidate_split=candidate_split, shift=shift)
        out = runner.generate(prompts, cfg)
        return BlockGenerateOutput(sequences=out.padded().to(input_ids.device), forwards=out.forwards,
                                   tokens_per_forward=out.tokens_per_forward,
                                   drafts_kept=getattr(out, "accepted", None))


class MegablockLlamaForCausalLM(BlockGenerationMixin, LlamaForCausalLM):
    config_class = MegablockLlamaConfig


class MegablockQwen2ForCausalLM(BlockGenerationMixin, Qwen2ForCausalLM):
    config_class = MegablockQwen2Config


class MegablockQwen3ForCausalLM(BlockGenerationMixin, Qwen3ForCausalLM):
    config_class = MegablockQwen3Config


class MegablockMistralForCausalLM(BlockGenerationMixin, MistralForCausalLM):
    config_class = MegablockMistralConfig

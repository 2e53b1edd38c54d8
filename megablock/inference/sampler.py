"""Batched block-diffusion sampling with a KV cache and parallel decoding.

The loop (DESIGN.md, "Sampling"), for a batch of prompts:

1. Prefill: the prompt's whole blocks run causally into the KV cache (one forward).
2. Each block of B slots: with token shift its first token is the AR prediction of the last clean
   logit; the other slots start as the mask token and are refined by "peek" forwards (the block
   attends to the whole cache and bidirectionally to itself; nothing is cached). Each step commits
   the masked slots whose confidence passes `threshold` (at least the most confident one), or the
   `tokens_per_step` most confident. Without shift every slot starts masked and the output at slot
   j predicts slot j.
3. A finished block runs once more causally ("append": clean-half semantics) to put its K/V in the
   cache; the last logit of that pass is the next block's first token.

Choices worth knowing:

- Left padding with a per-row key mask. Every row's position ids are its own 0, 1, ...; a row's
  slot s holds position s - offset[row].
- Block alignment: blocks cover absolute positions bB..bB+B-1 as in training, so a prompt whose
  length is not a multiple of B ends inside a block. Each row's offset is a multiple of B chosen so
  that all rows' first generated block falls in the same slot window; the prompt tokens inside it
  are placed in the block as already-revealed tokens (never masked), exactly as an xt block with
  those tokens unmasked looks in training, and only the whole blocks before it are prefilled. The
  first generated block of such a row therefore yields fewer than B tokens.
- Rows finish independently (EOS, included in the output, `max_new_tokens`, or the caller's
  `stop(row, tokens)` after a block, e.g. a stop string in the decoded text) and then leave the
  batch (cache rows dropped), so they cost nothing further. Slots after a committed EOS or past
  the token budget stay masked and are never decoded; the final block needs no append forward.
- `forwards` counts model calls (prefill, refinement steps, appends). With shift and B = 1 there
  are no refinement steps: plain AR decoding with one forward per token.
- Tensor parallelism: logits are vocab-sharded; they are all-gathered over the TP group, and the
  tokens and commit decisions of TP rank 0 are broadcast so every rank follows the same path.
- The mask token is never sampled. Positions continue past the training length (RoPE scaling as
  configured in the model handles the rest).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state


from .kv_cache import KVCache
from .sampling import SamplingParams, choose_tokens, select_commits


@dataclass
class GenerateConfig:
    block_size: int = 1
    max_new_tokens: int = 64
    threshold: float = 0.9
    """Commit every masked slot whose confidence is strictly above this (and at least one)."""
    tokens_per_step: Optional[int] = None
    """If set, commit exactly this many slots per step instead (threshold unused)."""
    shift: bool = True
    """Token shift (output i predicts token i+1), the default recipe; False for BD3-LM-style models."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0

    def validate(self, mask_token_id: Optional[int]) -> None:
        """Everything, the model's mask token included (None: the model has none)."""
        self.check_ranges()
        if mask_token_id is None and (self.block_size > 1 or not self.shift):
            raise ValueError(
                "this model has no mask token, so it can only decode autoregressively: use block size 1 "
                "(--block-size 1), or convert it with tools/convert_hf.py (which adds a mask token) and "
                "train it for block diffusion"
            )

    def check_ranges(self) -> None:
        """The settings on their own, before a model is loaded."""
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.tokens_per_step is not None and self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {self.tokens_per_step}")
        if self.tokens_per_step is None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        self.sampling.validate()


def check_positions(prompt_lengths: Sequence[int], max_new_tokens: int, model_cfg) -> None:
    """Refuse a generation whose last token would sit past the model's max_position_embeddings
    when its RoPE is plain: positions it was never trained at give garbage, not a shorter answer.
    A scaled RoPE (model_cfg.rope_scaling: dynamic NTK, linear, llama3, ...) is made to reach past
    the trained length, and is not limited here."""
    longest, max_positions = max(prompt_lengths, default=0), model_cfg.max_position_embeddings
    if model_cfg.rope_scaling is None and longest + max_new_tokens > max_positions:
        room = max_positions - longest
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} reaches position "
            f"{longest + max_new_tokens}, past the model's {max_positions} positions (max_position_embeddings): "
            + (f"lower max_new_tokens to {room} or less, or shorten the prompt" if room > 0 else
               f"shorten the prompt to fewer than {max_positions} tokens")
        )


@dataclass
class GenerationOutput:
    tokens: list
    """New tokens of each prompt, in prompt order (an EOS that ended a row is included)."""
    forwards: int
    """Model calls made for the whole batch."""
    seconds: float
    pad_token_id: int = 0
    row_forwards: list = field(default_factory=list)
    """Forwards each prompt's row took part in with work of its own (prefill included): a row's
    tokens per forward is what it would be decoded alone, whatever the batch."""

    def padded(self) -> torch.Tensor:
        """[n, longest] tensor of the new tokens; rows that finished early are padded."""
        width = max(len(t) for t in self.tokens)
        return torch.tensor([t + [self.pad_token_id] * (width - len(t)) for t in self.tokens], dtype=torch.long)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.forwards, 1)

    @property
    def row_tokens_per_forward(self) -> float:
        """Mean over rows of new tokens / the row's forwards (tokens per forward at batch 1)."""
        return sum(len(t) / max(f, 1) for t, f in zip(self.tokens, self.row_forwards)) / max(len(self.tokens), 1)


class BlockDiffusionSampler:
    """Sampler over a `BlockDiffusionLM` (pp = 1, any TP).

    `vocab_size`: real vocabulary (padding rows never sampled); defaults to the model config's.
    """

    def __init__(self, model, mask_token_id: Optional[int], eos_token_ids: Sequence[int] = (),
                 pad_token_id: int = 0, vocab_size: Optional[int] = None):
        if not (model.pre_process and model.post_process):
            raise ValueError("sampling needs the whole model in one stage (pipeline parallel size 1)")
        self.model = model
        self.mask_token_id = mask_token_id
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size or model.cfg.vocab_size
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.device = next(model.parameters()).device

    # --- model calls ------------------------------------------------------------------------------
    def _hidden(self, cache: KVCache, ids, pos, append: bool, valid=None) -> torch.Tensor:
        cache.begin(ids.shape[1], append, valid)
        hidden = self.model.encode(ids, pos, kv_cache=cache)
        cache.end()
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float logits for hidden states [..., H] (gathered over TP)."""
        logits = self.model.head(hidden)
        if self.tp > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp)]
            dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)
        logits = logits[..., : self.vocab_size].float()
        if self.mask_token_id is not None and self.mask_token_id < self.vocab_size:
            logits[..., self.mask_token_id] = float("-inf")
        return logits

    def _agree(self, t: torch.Tensor) -> torch.Tensor:
        """TP rank 0's decisions win, so all ranks take the same path through the loop."""
        if self.tp > 1:
            dist.broadcast(t, parallel_state.get_tensor_model_parallel_src_rank(),
                           group=parallel_state.get_tensor_model_parallel_group())
        return t

    # --- the loop -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerateConfig,
                 stop: Optional[Callable[[int, list], bool]] = None) -> GenerationOutput:
        """`stop(row, tokens)`: called with a prompt's index and its new tokens so far after each
        block that did not end it; True ends the row there (the block's tokens are kept whole, so
        a caller cutting at a stop string cuts the text itself). It must decide from the tokens
        alone: under TP every rank calls it and must agree."""
        cfg.validate(self.mask_token_id)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        check_positions([len(p) for p in prompts], cfg.max_new_tokens, self.model.cfg)
        start = time.perf_counter()
        dev, B, n = self.device, cfg.block_size, len(prompts)
        generator = torch.Generator(device=dev).manual_seed(cfg.seed)
        lens = torch.tensor([len(p) for p in prompts])
        first_block = lens // B  # the block holding each row's first new token
        K = int(first_block.max())
        offset = (K - first_block) * B  # left padding, a multiple of B: blocks stay aligned
        prompt_end = offset + lens  # first slot after the prompt
        windows = -(-(B - 1 + cfg.max_new_tokens) // B)
        cache = KVCache(n, K * B + windows * B)

        rows = list(range(n))  # original prompt index of each active row
        out: list[list[int]] = [[] for _ in range(n)]
        forwards, last = 0, None
        row_forwards = [int(f > 0) for f in first_block]  # alone, a row prefills iff it has whole blocks
        if K > 0:  # prefill the whole blocks of every prompt
            heads = [list(p[: int(f) * B]) for p, f in zip(prompts, first_block)]
            last = self._prefill(cache, heads, offset, K * B)
            forwards += 1

        s0, first = K * B, True
        while True:
            b = len(rows)
            slots = s0 + torch.arange(B)
            pos = (slots[None] - offset[:, None]).to(dev)
            x = torch.full((b, B), self.mask_token_id if self.mask_token_id is not None else self.pad_token_id,
                           dtype=torch.long, device=dev)
            committed = torch.zeros(b, B, dtype=torch.bool, device=dev)
            if first:  # prompt tokens inside the first block: revealed, never masked
                for i, r in enumerate(rows):
                    tail = list(prompts[r][int(first_block[r]) * B:])
                    if tail:
                        x[i, : len(tail)] = torch.tensor(tail, dtype=torch.long, device=dev)
                        committed[i, : len(tail)] = True
            new_index = (slots[None] - prompt_end[:, None]).to(dev)
            needed = (new_index >= 0) & (new_index < cfg.max_new_tokens)
            if cfg.shift:  # slot 0 is the AR prediction of the last clean logit
                take = needed[:, 0]
                if bool(take.any()):
                    tokens, _ = choose_tokens(last[take], cfg.sampling, generator)
                    x[take, 0] = self._agree(tokens)
                    committed[take, 0] = True
            steps, row_steps = self._refine(cache, x, pos, committed, needed, cfg, generator)
            forwards += steps
            for i, r in enumerate(rows):
                row_forwards[r] += int(row_steps[i])

            keep = self._collect(x, committed & needed, rows, out, cfg.max_new_tokens, stop)
            if not keep:
                break
            if len(keep) < b:  # finished rows leave the batch
                idx = torch.tensor(keep, dtype=torch.long)
                cache.select(idx.to(dev))
                x, pos = x[idx.to(dev)], pos[idx.to(dev)]
                offset, prompt_end = offset[idx], prompt_end[idx]
                rows = [rows[i] for i in keep]
            hidden = self._hidden(cache, x, pos, append=True)  # the finished block joins the clean context
            last = self._logits(hidden[:, -1])
            forwards += 1
            for r in rows:
                row_forwards[r] += 1
            s0, first = s0 + B, False

        return GenerationOutput(out, forwards, time.perf_counter() - start, self.pad_token_id, row_forwards)

    def _prefill(self, cache: KVCache, heads: list, offset: torch.Tensor, width: int) -> torch.Tensor:
        """Run each row's whole prompt blocks causally into the cache, right-aligned to `width`
        slots; returns the last clean logit of every row."""
        n = len(heads)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros(n, width, dtype=torch.bool)
        for r, head in enumerate(heads):
            ids[r, int(offset[r]):] = torch.tensor(head, dtype=torch.long)
            valid[r, int(offset[r]):] = True
        pos = (torch.arange(width)[None] - offset[:, None]).clamp(min=0)
        dev = self.device
        hidden = self._hidden(cache, ids.to(dev), pos.to(dev), append=True, valid=valid.to(dev))
        return self._logits(hidden[:, -1])

    def _refine(self, cache, x, pos, committed, needed, cfg: GenerateConfig, generator) -> tuple:
        """Denoise one block in place (x, committed) until every needed slot is committed;
        returns (forwards, [b] forwards in which each row still had slots to decide)."""
        b, B = x.shape
        eos, forwards = self.eos.to(x.device), 0
        row_steps = torch.zeros(b, dtype=torch.long)
        while True:
            todo = needed & ~committed & self._before_eos(x, committed & needed, eos)
            if not bool(todo.any()):
                return forwards, row_steps
            hidden = self._hidden(cache, x, pos, append=False)
            forwards += 1
            row_steps += todo.any(-1).cpu()
            bi, ji = todo.nonzero(as_tuple=True)
            src = ji - 1 if cfg.shift else ji  # with shift, output j-1 predicts slot j
            tokens, conf = choose_tokens(self._logits(hidden[bi, src]), cfg.sampling, generator)
            tok_full = torch.zeros(b, B, dtype=torch.long, device=x.device)
            conf_full = torch.zeros(b, B, device=x.device)
            tok_full[bi, ji], conf_full[bi, ji] = tokens, conf
            commit = select_commits(conf_full, todo, cfg.threshold, cfg.tokens_per_step)
            decided = self._agree(torch.stack([tok_full, commit.long()]))
            commit = decided[1].bool()
            x[commit] = decided[0][commit]
            committed |= commit

    def _collect(self, x, decided, rows: list, out: list, max_new: int, stop=None) -> list:
        """Append each row's decided new tokens (up to and including an EOS) to its output;
        returns the batch indices of the rows that go on (not ended by EOS, the budget or `stop`)."""
        eos_ids, keep = set(self.eos.tolist()), []
        for i, r in enumerate(rows):
            done = False
            for j in decided[i].nonzero().flatten().tolist():
                out[r].append(int(x[i, j]))
                if out[r][-1] in eos_ids:
                    done = True
                    break
            if not done and len(out[r]) < max_new and not (stop is not None and stop(r, out[r])):
                keep.append(i)
        return keep

    @staticmethod
    def _before_eos(x: torch.Tensor, decided: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """[b, B] bool: slots at or before each row's first decided EOS (slots after it are moot)."""
        B = x.shape[1]
        if eos.numel() == 0:
            return torch.ones_like(decided)
        hit = decided & torch.isin(x, eos)
        first = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(hit[:, 0], B, dtype=torch.long))
        return torch.arange(B, device=x.device)[None] <= first[:, None]

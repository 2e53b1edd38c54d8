"""Batched block-diffusion sampling with a KV cache and parallel decoding.

The loop and its rules are `block_rules.ThresholdDecoder` (shared, verbatim, with the exported
folder's remote code); this module runs it over megablock's model, with tensor parallelism.

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

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megablock.diffusion.block_rules import GenerateConfig, GenerationOutput, ThresholdDecoder

__all__ = ["BlockDiffusionSampler", "GenerateConfig", "GenerationOutput", "check_positions"]


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


class BlockDiffusionSampler(ThresholdDecoder):
    """Sampler over a `BlockDiffusionLM` (pp = 1, any TP): the loop of `block_rules.ThresholdDecoder`
    over megablock's model.

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

    def check_request(self, prompts, max_new_tokens: int) -> None:
        super().check_request(prompts, max_new_tokens)
        check_positions([len(p) for p in prompts], max_new_tokens, self.model.cfg)

    # --- model calls ------------------------------------------------------------------------------
    def _encode(self, ids, pos, cache) -> torch.Tensor:
        return self.model.encode(ids, pos, kv_cache=cache)

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

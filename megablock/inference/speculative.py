"""Lossless self-speculative block decoding: the noised half drafts, the clean half verifies.

The loop, the acceptance rule and the per-row cache are in `block_rules` (SpeculativeDecoder,
verify_drafts, RowKVCache), shared verbatim with the exported folder's remote code.

A model trained with context-causal attention and token shift is two models in one network
(DESIGN.md, "Self-speculative block decoding"): the noised (xt) half fills a block of masked
slots in parallel, and the clean (x0) half is an exact causal LM. This sampler lets the noised
half guess and the clean half decide, so its output is exactly the clean half's AR decoding:
token for token when greedy, in distribution when sampling.

Per row the state is a KV cache of the tokens decided so far except the last one, the *pending*
token (decided, not yet in the cache, at position s), and possibly drafts for positions s+1, ...

- Verify: [pending, drafts] runs as an append (clean, causal) pass. Its output at slot j is the AR
  distribution p_j of the token after slot j. Greedy: keep draft d_{j+1} while it equals argmax
  p_j; the first mismatch is replaced by argmax p_j and the rest dropped. Sampling: keep d_{j+1}
  with probability min(1, p_j(d) / q_j(d)), on rejection draw from norm(max(0, p_j - q_j)), and
  when every draft is kept draw the next token from the last p. Either way the kept drafts plus
  that one token are distributed exactly as AR decoding of the clean half (the drafts are drawn
  in parallel, so each is independent of the earlier ones given the context: the standard
  speculative-sampling argument applies slot by slot). The K/V of the pending token and the
  kept drafts stay in the cache; the rejected slots are dropped (each row keeps its own length,
  `RowKVCache`), and the token drawn from p becomes the new pending token.
- Draft, two forwards per block (`two_pass=True`): a "peek" pass over the block [pending, mask,
  ..., mask] at positions s..s+B-1, attending to the cache and bidirectionally to itself, fills
  the masked slots (one refinement step by default; `draft_steps` or `draft_threshold` refine
  further, greedy only). Then the verify pass.
- Draft, one forward per block (`two_pass=False`, the default; TiDAR-style steady state): the verify pass also
  carries the next block as a noised block that attends to the clean prefix *including the
  drafts being verified* and to itself. Its drafts are valid when every draft of the verified
  block is kept (they were conditioned on them), and are then verified by the next pass, which
  again carries the block after. After a rejection the next pass verifies no drafts: it appends
  the pending token alone and drafts the block after it. With token shift the next block's first
  slot (position s+a, the token this same pass draws from the last p) is not known when the pass
  runs; two ways to lay the noised block out (`next_draft`):
    * "masked": the block covers s+a..s+a+B-1 with its first slot masked; B-1 drafts per block
      (at most B tokens per forward), but a layout training never showed (with shift the first
      slot of a noised block is always revealed);
    * "overlap": the block covers s+a-1..s+a+B-2 with its first slot the last draft of the
      verified block, revealed; exactly the training layout, B-2 usable drafts (its first output
      duplicates the AR token). At most B-1 tokens per forward.
  Neither choice affects correctness (the clean half checks every draft), only acceptance; the
  benchmark measures both.
- Using more of the drafts in one forward per block. A pass that keeps k of its n drafts wastes
  its next block unless k = n, so with a drafter that is often wrong most passes verify nothing.
    * `branches` = m: the pass carries m next blocks, one per kept-draft count it bets on (n
      first, then 0, 1, ...): block k starts after the pending token and drafts[:k], sees exactly
      those append slots and nothing of the other blocks (RowKVCache's per-block `noised_sees`).
      Whatever count the pass keeps, if it bet on it, the next pass has drafts conditioned on the
      right prefix. m = n + 1 covers every count, at B slots per block: (n + 1) + m B slots per
      forward, which a memory-bound GPU forward at small batch absorbs and a CPU does not.
    * `reuse_drafts`: when no block matches (k < n), the next pass verifies the drafts after the
      rejected one, drafts[k+1:], at their own positions after the new pending token. They were
      drafted from a shorter prefix, so they are kept less often, but they cost no extra pass;
      with sampling each was drawn from its own q independently of the rejected slot, so the
      acceptance rule still applies to it unchanged.
    * `candidates` = c (with branches >= 2): a block betting on k < n kept drafts starts at the
      slot where the verifier cuts the verified block and puts its own token, which this pass
      cannot know, so its first slot is masked and its first draft is two ahead of a known
      token. The drafter's distribution at that slot, though, ranks the verifier's token high
      when its first choice (the rejected draft) is wrong. So the pass also carries, per such
      bet, c blocks that reveal the drafter's next c likeliest tokens there. When the verifier's
      token is one of them, the next pass verifies that block's drafts, made one ahead of a known
      token as in the two-forward layout (kept far more often), at no extra forward; otherwise
      the masked block stands in. Each candidate costs B more slots per forward.
      `candidate_split="likeliest"` shares the same number of candidate blocks out by the
      drafter's own odds instead of c per bet: each (cut k, token t) pair is scored by the
      drafter's probability of its first k drafts times that of t at slot k, and the best pairs
      over all bets get the blocks. Cuts after few drafts are the common ones, so they get deeper
      candidate lists, and a row whose drafts look safe spends its blocks on later cuts (the
      dynamic draft trees of EAGLE-2, over the cut slots).
  All are lossless for the same reason as the rest: every kept token passed the verifier.

Blocks start wherever the previous verification stopped, not at multiples of B. The model still
sees in inference what it saw in training for that block: in training a noised block of B slots
attends bidirectionally to itself and to the whole clean prefix before its first slot, with
position ids continuing that prefix; here the same holds with the block translated to start at
s. Attention scores with RoPE depend on the query and key positions only through their
difference, and nothing else in the network sees absolute positions, so a block starting at s is
an ordinary block of a sequence whose blocks happen to be aligned at s mod B (the model saw every
such alignment of its content in training, only the slot grid was fixed). Prompts need no left
padding or block alignment: rows are right-padded, every row's positions are its own 0, 1, ...

Reports: `SpeculativeOutput` carries, per verified block (of every row), the drafts checked and
the drafts kept, next to forwards and seconds.
"""
from __future__ import annotations

from megablock.diffusion.block_rules import (NEXT_DRAFTS, AcceptanceStats, RowKVCache, SpeculativeConfig,
                                             SpeculativeDecoder, SpeculativeOutput, verify_drafts)
from .sampler import BlockDiffusionSampler

__all__ = ["LAYOUTS", "NEXT_DRAFTS", "AcceptanceStats", "RowKVCache", "SpeculativeConfig", "SpeculativeOutput",
           "SpeculativeSampler", "layout_config", "speculative_sampler", "verify_drafts"]

LAYOUTS = {
    "one pass, masked": dict(next_draft="masked"),
    "one pass, overlap": dict(next_draft="overlap"),
    "two passes": dict(two_pass=True),
    "one pass, masked, 2 branches": dict(next_draft="masked", branches=2),
    "one pass, masked, 2 branches + reuse": dict(next_draft="masked", branches=2, reuse_drafts=True),
    "one pass, masked, all branches": dict(next_draft="masked", branches="all"),
    "one pass, masked, 2 branches + 3 candidates": dict(next_draft="masked", branches=2, candidates=3),
    "one pass, masked, all branches + 3 candidates": dict(next_draft="masked", branches="all", candidates=3),
    "one pass, masked, all branches + 7 candidates": dict(next_draft="masked", branches="all", candidates=7),
    "one pass, masked, all branches + 7 candidates, likeliest": dict(next_draft="masked", branches="all",
                                                                     candidates=7, candidate_split="likeliest"),
}
"""The draft layouts the benchmarks and studies compare, by name. branches="all": a next block
for every possible number of kept drafts at the block size."""


def layout_config(layout: dict, block_size: int, **settings) -> SpeculativeConfig:
    """The SpeculativeConfig of a `LAYOUTS` entry (or any such dict) at `block_size`, with
    `settings` (max_new_tokens, sampling, seed, ...)."""
    every = layout.get("branches") == "all"
    cfg = SpeculativeConfig(block_size=block_size, **{**layout, "branches": 1}, **settings)
    cfg.branches = cfg.drafts_per_block + 1 if every else layout.get("branches", 1)
    return cfg


class SpeculativeSampler(SpeculativeDecoder, BlockDiffusionSampler):
    """Self-speculative decoding over a `BlockDiffusionLM` (pp = 1, any TP): the loop of
    `block_rules.SpeculativeDecoder` with megablock's model calls; see the module doc."""


def speculative_sampler(im) -> SpeculativeSampler:
    """The speculative sampler of a `megablock.inference.InferenceModel`."""
    return SpeculativeSampler(im.model, im.mask_token_id, im.eos_token_ids, im.pad_token_id)

"""Lossless self-speculative block decoding: the noised half drafts, the clean half verifies.

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

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from megablock.config import NextDraft, options

from .sampler import BlockDiffusionSampler, GenerationOutput, check_positions
from .sampling import SamplingParams, filter_logits, select_commits

NEXT_DRAFT = options(NextDraft)


@dataclass
class SpeculativeConfig:
    block_size: int = 4
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    two_pass: bool = False
    """Draft in a forward of its own (two forwards per block); False: one forward per block, the
    verify pass also drafts the next block (see the module doc)."""
    next_draft: NextDraft = "masked"
    """Layout of the one-pass next block: "masked" (first slot masked) or "overlap" (first slot the
    last verified draft)."""
    draft_steps: int = 1
    """Refinement forwards per draft (two-forward mode only; greedy only)."""
    draft_threshold: Optional[float] = None
    """Instead of a fixed number of steps, commit slots whose confidence is above this per step."""
    shift: bool = True

    @property
    def drafts_per_block(self) -> int:
        """Drafts a block offers for verification when the previous block was kept whole."""
        if self.block_size == 1:
            return 0
        return self.block_size - (2 if not self.two_pass and self.next_draft == "overlap" else 1)

    def validate(self, mask_token_id: Optional[int]) -> None:
        """Everything, the model's mask token included (None: the model has none)."""
        self.check_ranges()
        if mask_token_id is None and self.block_size > 1:
            raise ValueError("this model has no mask token, so it cannot draft: use block size 1, or convert it "
                             "with tools/convert_hf.py (which adds a mask token)")

    def check_ranges(self) -> None:
        """The settings on their own, before a model is loaded."""
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.shift:
            raise ValueError("speculative decoding needs a token-shift model: without shift the clean half "
                             "is not an AR model, so it cannot verify drafts")
        if self.next_draft not in NEXT_DRAFT:
            raise ValueError(f"next_draft must be one of {NEXT_DRAFT}, got {self.next_draft!r}")
        if not self.two_pass and self.next_draft == "overlap" and self.block_size == 2:
            raise ValueError("next_draft='overlap' leaves no draft at block size 2; use 'masked' or B >= 3")
        if self.draft_steps < 1:
            raise ValueError(f"draft_steps must be >= 1, got {self.draft_steps}")
        if self.draft_threshold is not None and not 0 < self.draft_threshold <= 1:
            raise ValueError(f"draft_threshold must be in (0, 1], got {self.draft_threshold}")
        refined = self.draft_steps > 1 or self.draft_threshold is not None
        if refined and not self.two_pass:
            raise ValueError("the one-pass (one forward per block) mode drafts in the verify pass, one step; "
                             "draft_steps / draft_threshold need two_pass=True")
        if refined and self.sampling.temperature > 0:
            # A slot committed in a later step depends on slots committed earlier, in any order; the
            # acceptance test needs each draft's distribution given the drafts before it only.
            raise ValueError("sampling (temperature > 0) needs one-step (parallel) drafts")
        self.sampling.validate()


class AcceptanceStats:
    """What the `drafted` / `accepted` lists (one entry per verified block) of a speculative run
    say (SpeculativeOutput, measure.DecodeRecord)."""

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / max(len(self.accepted), 1)

    @property
    def drafts_per_block(self) -> float:
        return sum(self.drafted) / max(len(self.drafted), 1)

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted) / max(sum(self.drafted), 1)

    def histogram(self) -> Dict[int, int]:
        """{drafts kept: number of blocks}."""
        return dict(sorted(Counter(self.accepted).items()))


@dataclass
class SpeculativeOutput(GenerationOutput, AcceptanceStats):
    drafted: list = field(default_factory=list)
    """Drafts checked in each verified block (every row's blocks, in order)."""
    accepted: list = field(default_factory=list)
    """Drafts kept in each of those blocks."""
    # row_forwards (GenerationOutput): every active row takes part in every forward here.

    def report(self) -> dict:
        return {"verified_blocks": len(self.accepted), "mean_accepted": round(self.mean_accepted, 4),
                "acceptance_rate": round(self.acceptance_rate, 4),
                "row_tokens_per_forward": round(self.row_tokens_per_forward, 4),
                "accepted_histogram": {str(k): v for k, v in self.histogram().items()}}


# --- KV cache with a length per row ---------------------------------------------------------------
class RowKVCache:
    """A causal KV cache where each row has its own length, so rows can roll back different
    numbers of rejected slots.

    A forward brings `n_append + n_noised` new slots per row, written right after that row's
    length (a scatter, so rows need not line up):
    - the append part, `append_valid[r]` real tokens then padding: causal among themselves, over
      the row's cache;
    - the noised part (a draft block): bidirectional among itself, over the row's cache and the
      first `noised_sees[r]` append slots. Append slots never see it.
    `commit(counts)` then keeps the first counts[r] append slots of each row; everything else
    written this forward lies past the row's length and is never attended to again (the next
    forward overwrites it). Slots past a row's length are invisible, so padding and rolled-back
    K/V need no clearing.
    """

    def __init__(self, batch: int, capacity: int, device):
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.k: Dict[int, torch.Tensor] = {}
        self.v: Dict[int, torch.Tensor] = {}
        self._n = self._n_append = 0

    @property
    def batch(self) -> int:
        return int(self.lengths.numel())

    def begin(self, n_append: int, append_valid: torch.Tensor, n_noised: int = 0,
              noised_sees: Optional[torch.Tensor] = None) -> None:
        n, dev = n_append + n_noised, self.lengths.device
        self._n_append = n_append
        top = int(self.lengths.max())
        if top + n > self.capacity:
            raise RuntimeError(f"KV cache full: {top} + {n} slots > capacity {self.capacity}")
        self._n, self._width = n, top + n
        self._index = self.lengths[:, None] + torch.arange(n, device=dev)
        # From an empty cache with no draft block, plain causal attention is right for every row
        # (a short row's padding comes after its tokens and is never committed).
        self._causal = top == 0 and n_noised == 0
        self._mask = None if self._causal else self._build_mask(n_append, append_valid, n_noised, noised_sees)

    def _build_mask(self, n_app, valid, n_noise, sees) -> torch.Tensor:
        """[b, 1, n, width] bool: which key slots each new query sees."""
        dev = self.lengths.device
        rel = torch.arange(self._width, device=dev)[None] - self.lengths[:, None]  # key slot - row length
        query = torch.arange(self._n, device=dev)[None, :, None]
        cached = (rel < 0)[:, None]
        app_key = ((rel >= 0) & (rel < valid.to(dev)[:, None]))[:, None]
        mask = cached | (app_key & (rel[:, None] <= query))
        if n_noise:
            noise_key = ((rel >= n_app) & (rel < self._n))[:, None]
            seen = app_key & (rel[:, None] < sees.to(dev)[:, None, None])
            mask = torch.where(query < n_app, mask, cached | seen | noise_key)
        return mask[:, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, hq, n, d]; k, v [b, hkv, n, d] (RoPE applied). Returns [b, hq, n, d]."""
        b, hkv, n, d = k.shape
        if n != self._n:
            raise RuntimeError(f"attend got {n} new slots, begin() announced {self._n}")
        if layer not in self.k:
            self.k[layer] = k.new_zeros(b, hkv, self.capacity, d)
            self.v[layer] = v.new_zeros(b, hkv, self.capacity, d)
        index = self._index[:, None, :, None].expand(b, hkv, n, d)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        keys, values = self.k[layer][:, :, : self._width], self.v[layer][:, :, : self._width]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask, is_causal=self._causal,
                                              enable_gqa=q.shape[1] != hkv)

    def adapter_gate(self):
        """Gated adapters (lora.scope=noised) run on the draft block's slots only: the verify /
        append slots, whose K/V stay in the cache, are the base model's."""
        if self._n_append == 0 or self._n_append == self._n:
            return self._n_append == 0
        return (torch.arange(self._n, device=self.lengths.device) >= self._n_append)[None]

    def end(self) -> None:
        self._n = 0

    def commit(self, counts: torch.Tensor) -> None:
        """Keep the first counts[r] append slots of each row (the rest is rolled back)."""
        self.lengths += counts.to(self.lengths.device)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch."""
        rows = rows.to(self.lengths.device)
        for layer in self.k:
            self.k[layer] = self.k[layer].index_select(0, rows)
            self.v[layer] = self.v[layer].index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows)


# --- the acceptance rule ----------------------------------------------------------------------------
def verify_drafts(ar_logits: torch.Tensor, drafts: Sequence[int], q: Optional[torch.Tensor],
                  params: SamplingParams, generator: Optional[torch.Generator] = None) -> tuple[int, int]:
    """Check one row's drafts against the clean half; returns (drafts kept, next token).

    ar_logits [len(drafts) + 1, V]: row j is the AR logit after the pending token and drafts[:j].
    q [len(drafts), V]: the probabilities each draft was drawn from (unused when greedy).
    """
    if params.temperature == 0:
        target = ar_logits.argmax(-1).tolist()
        kept = next((j for j, d in enumerate(drafts) if d != target[j]), len(drafts))
        return kept, target[kept]
    p = filter_logits(ar_logits.float(), params).softmax(-1)
    for j, d in enumerate(drafts):
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[j, d] < p[j, d]:  # u < p/q, without dividing by a q that may be tiny
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: the residual is p itself
            residual = p[j]
        return j, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))


# --- the sampler ------------------------------------------------------------------------------------
class SpeculativeSampler(BlockDiffusionSampler):
    """Self-speculative decoding over a `BlockDiffusionLM` (pp = 1, any TP); see the module doc."""

    def propose(self, rows: list, positions: list, drafts: list) -> list:
        """The drafts to verify for each row (row = original prompt index; positions[i] are the
        new-token indices the drafts stand for). The noised half's drafts as they are; tests
        override this to force a perfect or a corrupted drafter."""
        return drafts

    def _forward(self, cache: RowKVCache, append: list, noised: Optional[tuple] = None):
        """One model call. append: per row the tokens to append (at least one each, or none at all
        for a pure draft pass). noised: (tokens [b, B], first position [b], append slots seen [b])
        or None. Returns the hidden states (append [b, n_append, H], noised [b, B, H] or None):
        the caller takes logits of the few slots it needs (a prefill has many)."""
        dev, b = self.device, cache.batch
        a = torch.tensor([len(t) for t in append], dtype=torch.long)
        n_app = int(a.max()) if len(append) else 0
        ids = torch.full((b, n_app), self.pad_token_id, dtype=torch.long)
        for i, toks in enumerate(append):
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        pos = cache.lengths.cpu()[:, None] + torch.arange(n_app)
        n_noise = 0
        if noised is not None:
            tokens, start, sees = noised
            n_noise = tokens.shape[1]
            ids = torch.cat([ids, tokens.cpu()], dim=1)
            pos = torch.cat([pos, start[:, None] + torch.arange(n_noise)], dim=1)
        cache.begin(n_app, a, n_noise, None if noised is None else sees)
        hidden = self.model.encode(ids.to(dev), pos.to(dev), kv_cache=cache)
        cache.end()
        return hidden[:, :n_app], (hidden[:, n_app:] if n_noise else None)

    def _draw(self, logits: torch.Tensor, params: SamplingParams, generator):
        """Draft tokens from noised logits [..., V]: (tokens, q probabilities or None when greedy)."""
        if params.temperature == 0:
            return logits.argmax(-1), None
        q = filter_logits(logits.reshape(-1, logits.shape[-1]), params).softmax(-1)
        tokens = torch.multinomial(q, 1, generator=generator).view(logits.shape[:-1])
        return tokens, q.view(logits.shape)

    def _peek_draft(self, cache, pending: list, cfg: SpeculativeConfig, generator):
        """Two-forward mode: fill the block [pending, mask, ...] by refinement passes; returns
        (drafts [b, B-1], q or None, forwards)."""
        b, B, dev = cache.batch, cfg.block_size, self.device
        x = torch.full((b, B), self.mask_token_id, dtype=torch.long)
        x[:, 0] = torch.tensor(pending)
        todo = torch.ones(b, B, dtype=torch.bool)
        todo[:, 0] = False
        per_step = None if cfg.draft_threshold is not None else math.ceil((B - 1) / cfg.draft_steps)
        start, sees, forwards, q = cache.lengths.cpu(), torch.zeros(b, dtype=torch.long), 0, None
        while bool(todo.any()):
            _, hidden = self._forward(cache, [[] for _ in range(b)], (x, start, sees))
            forwards += 1
            logits = self._logits(hidden[:, :-1])  # output j predicts slot j+1; the last, past the block
            tokens, q = self._draw(logits, cfg.sampling, generator)
            tokens = tokens.cpu()
            conf = logits.softmax(-1).amax(-1).cpu()
            commit = select_commits(conf, todo[:, 1:], cfg.draft_threshold, per_step)
            decided = self._agree(torch.stack([tokens, commit.long()]).to(dev)).cpu()
            tokens, commit = decided[0], decided[1].bool()
            x[:, 1:][commit] = tokens[commit]
            todo[:, 1:] &= ~commit
        return x[:, 1:], q, forwards

    def _next_block(self, cache, tokens: list, B: int, overlap: bool) -> tuple:
        """The one pass's draft block for the block after `tokens` (pending + drafts): right
        after them with its first slot masked, or overlapping their last slot, which it reveals
        and which it (like a training block's first slot) does not see the clean copy of."""
        a = torch.tensor([len(t) for t in tokens])
        back = 1 if overlap else 0
        x = torch.full((len(tokens), B), self.mask_token_id, dtype=torch.long)
        if overlap:
            x[:, 0] = torch.tensor([t[-1] for t in tokens])
        return x, cache.lengths.cpu() + a - back, a - back

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: SpeculativeConfig,
                 stop: Optional[Callable[[int, list], bool]] = None) -> SpeculativeOutput:
        """`stop(row, tokens)`: as in BlockDiffusionSampler.generate, called after each verified
        block that did not end the row."""
        cfg.validate(self.mask_token_id)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        check_positions([len(p) for p in prompts], cfg.max_new_tokens, self.model.cfg)
        t0 = time.perf_counter()
        B, dev, n = cfg.block_size, self.device, len(prompts)
        generator = torch.Generator(device=dev).manual_seed(cfg.seed)
        eos = set(self.eos.tolist())
        one_pass = not cfg.two_pass and cfg.drafts_per_block > 0
        overlap = cfg.next_draft == "overlap"
        cache = RowKVCache(n, max(len(p) for p in prompts) + cfg.max_new_tokens + 2 * B + 2, dev)

        rows = list(range(n))
        out: list[list[int]] = [[] for _ in range(n)]
        drafted, accepted = [], []
        drafts: list[list[int]] = [[] for _ in range(n)]
        qs: list = [None] * n
        append = [list(p) for p in prompts]  # the prefill: prompts are "pending" tokens with no drafts
        forwards, row_forwards = 0, [0] * n
        while rows:
            b = len(rows)
            # Never draft past the token budget: kept drafts + the next token must fit.
            room = [cfg.max_new_tokens - len(out[r]) - 1 for r in rows]
            if not one_pass and cfg.drafts_per_block > 0 and forwards > 0 and max(room) > 0:
                d, q, f = self._peek_draft(cache, [a[0] for a in append], cfg, generator)
                forwards += f
                for r in rows:
                    row_forwards[r] += f
                drafts = [d[i].tolist() for i in range(b)]
                qs = [None if q is None else q[i] for i in range(b)]
            drafts = [d[: max(k, 0)] for d, k in zip(drafts, room)]
            positions = [[len(out[r]) + j for j in range(len(d))] for r, d in zip(rows, drafts)]
            drafts = self.propose(rows, positions, drafts)
            known = [len(a) for a in append]
            tokens = [a + d for a, d in zip(append, drafts)]
            noised = self._next_block(cache, tokens, B, overlap) if one_pass else None
            app_hidden, noise_hidden = self._forward(cache, tokens, noised)
            forwards += 1
            for r in rows:
                row_forwards[r] += 1
            # AR logits of each row's last known token and its drafts: [b, max drafts + 1, V].
            width = max(len(d) for d in drafts) + 1
            at = (torch.tensor(known)[:, None] - 1 + torch.arange(width)).clamp(max=app_hidden.shape[1] - 1)
            app_logits = self._logits(app_hidden.gather(1, at.to(dev)[..., None].expand(-1, -1, app_hidden.shape[-1])))

            # Decide every row (TP rank 0's decisions are broadcast so all ranks agree).
            decision = torch.zeros(b, 2 + B, dtype=torch.long)
            for i in range(b):
                kept, nxt = verify_drafts(app_logits[i, : len(drafts[i]) + 1], drafts[i], qs[i],
                                          cfg.sampling, generator)
                decision[i, 0], decision[i, 1] = kept, nxt
            next_q = None
            if one_pass:
                skip = 1 if overlap else 0  # overlap: the first output duplicates the AR token
                nd, next_q = self._draw(self._logits(noise_hidden[:, skip: B - 1]), cfg.sampling, generator)
                decision[:, 2: 2 + nd.shape[1]] = nd.cpu()
            decision = self._agree(decision.to(dev)).cpu()

            keep_rows, commit = [], torch.zeros(b, dtype=torch.long)
            next_append, next_drafts, next_qs = [], [], []
            for i, r in enumerate(rows):
                kept, nxt = int(decision[i, 0]), int(decision[i, 1])
                if drafts[i]:
                    drafted.append(len(drafts[i]))
                    accepted.append(kept)
                new = drafts[i][:kept] + [nxt]
                done = False
                for t in new:
                    out[r].append(t)
                    if t in eos or len(out[r]) >= cfg.max_new_tokens:
                        done = True
                        break
                if not done and stop is not None and stop(r, out[r]):
                    done = True
                commit[i] = known[i] + kept
                if done:
                    continue
                keep_rows.append(i)
                next_append.append([nxt])
                whole = kept == len(drafts[i])
                if one_pass and whole:
                    next_drafts.append(decision[i, 2: 2 + cfg.drafts_per_block].tolist())
                    next_qs.append(None if next_q is None else next_q[i])
                else:
                    next_drafts.append([])
                    next_qs.append(None)
            cache.commit(commit)
            if len(keep_rows) < b:
                cache.select(torch.tensor(keep_rows, dtype=torch.long))
            rows = [rows[i] for i in keep_rows]
            append, drafts, qs = next_append, next_drafts, next_qs

        return SpeculativeOutput(out, forwards, time.perf_counter() - t0, self.pad_token_id,
                                 drafted=drafted, accepted=accepted, row_forwards=row_forwards)


def speculative_sampler(im) -> SpeculativeSampler:
    """The speculative sampler of a `megablock.inference.InferenceModel`."""
    return SpeculativeSampler(im.model, im.mask_token_id, im.eos_token_ids, im.pad_token_id)

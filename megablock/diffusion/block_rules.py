"""The decoding rules of block diffusion, written once, in torch alone.

megablock's samplers (`megablock.inference.sampler.BlockDiffusionSampler`,
`megablock.inference.speculative.SpeculativeSampler`) and the remote code of an exported folder (`megablock/checkpoint/remote/modeling_megablock.py`, which
imports this file from beside it) run the same loops below; each side only says how to run the
network (`_encode`), read the logits (`_logits`) and agree across ranks (`_agree`). So this file
imports torch and the standard library only, never megablock or transformers: the export copies
it verbatim into the folder (DESIGN.md, "Sampling" and "Self-speculative block decoding").

What lives here:
- token choice and the commit rule of parallel decoding (`choose_tokens`, `select_commits`);
- the draft block's attention over a KV cache and the cache bookkeeping: `KVCache` (one length
  for the batch, left padding, peek vs append) and `RowKVCache` (a length per row, rollback);
- the speculative acceptance rule (`verify_drafts`);
- the two loops: `ThresholdDecoder` (threshold / fixed-K parallel decoding) and
  `SpeculativeDecoder` (lossless draft-and-verify), with their configs and outputs.

The module docs of `sampler` and `speculative` explain the loops' choices (alignment, padding,
layouts of the one-pass mode); the code is here.
"""
from __future__ import annotations

import math
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

DecodeMode = Literal["threshold", "speculative"]
"""threshold: confidence-thresholded parallel decoding; speculative: lossless draft-and-verify."""
NextDraft = Literal["masked", "overlap"]
"""Speculative one-pass mode: layout of the next block's draft (see `speculative`'s module doc)."""
CandidateSplit = Literal["even", "likeliest"]
"""Speculative one-pass mode: how the candidate blocks are shared out among the cut bets."""
DECODE_MODES, NEXT_DRAFTS = typing.get_args(DecodeMode), typing.get_args(NextDraft)
CANDIDATE_SPLITS = typing.get_args(CandidateSplit)


# --- token choice and the commit rule ------------------------------------------------------------
@dataclass
class SamplingParams:
    """How a token is drawn from a logit row.

    temperature 0 is greedy (argmax). Otherwise softmax(logits / temperature), restricted to the
    `top_k` most likely tokens and then to the smallest set whose probability reaches `top_p`,
    renormalised, and sampled with the sampler's seeded generator.
    """

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to [n, V] float logits (removed entries -inf)."""
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of [n, V] logits; returns (tokens [n], confidence [n]).

    The confidence is the probability of the chosen token under the distribution it was drawn
    from: the max probability when greedy; when sampling, a token drawn from the tail has low
    confidence and is not committed early just because another token was likely.
    """
    logits = logits.float()
    if params.temperature == 0:
        conf, tokens = logits.softmax(-1).max(-1)
        return tokens, conf
    probs = filter_logits(logits, params).softmax(-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def select_commits(confidence: torch.Tensor, todo: torch.Tensor, threshold: Optional[float] = None,
                   tokens_per_step: Optional[int] = None) -> torch.Tensor:
    """Which still-masked positions of each row's block to commit this step.

    confidence [b, B] float, todo [b, B] bool (masked positions that still need a token).
    With `tokens_per_step` K: the K most confident todo positions (all if fewer remain).
    Otherwise every todo position whose confidence is strictly above `threshold`, and always the
    most confident one, so a step never commits nothing (threshold 1.0 therefore means exactly one
    token per step, even when a probability rounds to 1.0). Ties go to the leftmost position.
    """
    conf = confidence.masked_fill(~todo, float("-inf"))
    if tokens_per_step is not None:
        order = conf.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
        return (rank < tokens_per_step) & todo
    best = torch.zeros_like(todo).scatter_(-1, conf.argmax(-1, keepdim=True), True)
    return ((conf > threshold) | best) & todo


def before_eos(x: torch.Tensor, decided: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """[b, B] bool: slots at or before each row's first decided EOS (slots after it are moot)."""
    B = x.shape[1]
    if eos.numel() == 0:
        return torch.ones_like(decided)
    hit = decided & torch.isin(x, eos)
    first = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(hit[:, 0], B, dtype=torch.long))
    return torch.arange(B, device=x.device)[None] <= first[:, None]


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


def draw(logits: torch.Tensor, params: SamplingParams, generator):
    """Draft tokens from noised logits [..., V]: (tokens, q probabilities or None when greedy)."""
    if params.temperature == 0:
        return logits.argmax(-1), None
    q = filter_logits(logits.reshape(-1, logits.shape[-1]), params).softmax(-1)
    tokens = torch.multinomial(q, 1, generator=generator).view(logits.shape[:-1])
    return tokens, q.view(logits.shape)


# --- configs and outputs ------------------------------------------------------------------------------
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
        _check_counts(self.block_size, self.max_new_tokens)
        if self.tokens_per_step is not None and self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {self.tokens_per_step}")
        if self.tokens_per_step is None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        self.sampling.validate()


@dataclass
class SpeculativeConfig:
    block_size: int = 4
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    two_pass: bool = False
    """Draft in a forward of its own (two forwards per block); False: one forward per block, the
    verify pass also drafts the next block (see `SpeculativeDecoder`)."""
    next_draft: NextDraft = "masked"
    """Layout of the one-pass next block: "masked" (first slot masked) or "overlap" (first slot the
    last verified draft)."""
    branches: int = 1
    """One-pass mode: next blocks a verify pass drafts, one per number of kept drafts it bets on:
    1 bets on every draft being kept (the only case where one next block is right), 2 also on
    none, and so on up to one per possible count (`drafts_per_block` + 1), so that a pass always
    has the next block's drafts whatever it keeps. Each branch costs B more slots per forward."""
    reuse_drafts: bool = False
    """One-pass mode: when no branch matches what a pass kept, verify the drafts after the rejected
    one in the next pass (the drafter's guesses for those positions) instead of none."""
    candidates: int = 0
    """One-pass mode, masked layout, branches >= 2: for each bet on k kept drafts with k short of
    all, also draft `candidates` next blocks whose first slot reveals one of the drafter's next
    likeliest tokens (after the draft) for the slot where the verifier cut the block. The verifier
    puts its own token there; when that is a candidate, the next pass verifies drafts made one
    ahead of a known token (the two-forward layout's drafts) instead of two ahead. B slots each."""
    candidate_split: CandidateSplit = "even"
    """How the candidate blocks (`candidates` times the cut bets, so the same number and the same
    forward either way) are shared out: "even", `candidates` per cut bet; "likeliest", to the
    (cut, token) pairs the drafter finds likeliest over all the cut bets, each scored by the
    drafter's probability of its drafts before the cut times that of the token at the cut. Cuts
    after few drafts are the common ones, so they get more; a confident row's bets reach further."""
    draft_steps: int = 1
    """Refinement forwards per draft (two-forward mode only; greedy only)."""
    draft_threshold: Optional[float] = None
    """Instead of a fixed number of steps, commit slots whose confidence is above this per step."""
    shift: bool = True

    @property
    def draft_blocks(self) -> int:
        """One-pass mode: the most next blocks a verify pass carries."""
        return self.branches + self.candidates * (self.branches - 1)

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
        _check_counts(self.block_size, self.max_new_tokens)
        if not self.shift:
            raise ValueError("speculative decoding needs a token-shift model: without shift the clean half "
                             "is not an AR model, so it cannot verify drafts")
        if self.next_draft not in NEXT_DRAFTS:
            raise ValueError(f"next_draft must be one of {NEXT_DRAFTS}, got {self.next_draft!r}")
        if not self.two_pass and self.next_draft == "overlap" and self.block_size == 2:
            raise ValueError("next_draft='overlap' leaves no draft at block size 2; use 'masked' or B >= 3")
        if self.branches < 1 or self.branches > max(self.drafts_per_block, 0) + 1:
            raise ValueError(f"branches must be in [1, {max(self.drafts_per_block, 0) + 1}] (one per possible "
                             f"number of kept drafts at block size {self.block_size}), got {self.branches}")
        if self.two_pass and (self.branches > 1 or self.reuse_drafts or self.candidates):
            raise ValueError("branches, reuse_drafts and candidates are for the one-pass mode (the verify pass drafts "
                             "the next block); two_pass drafts every block afresh")
        if self.candidates < 0:
            raise ValueError(f"candidates must be >= 0, got {self.candidates}")
        if self.candidate_split not in CANDIDATE_SPLITS:
            raise ValueError(f"candidate_split must be one of {CANDIDATE_SPLITS}, got {self.candidate_split!r}")
        if self.candidate_split != "even" and not self.candidates:
            raise ValueError(f"candidate_split={self.candidate_split!r} shares out candidate blocks, but candidates "
                             "is 0: set candidates >= 1 (blocks per cut bet)")
        if self.candidates and (self.next_draft != "masked" or self.branches < 2):
            raise ValueError("candidates reveal the first slot of the next blocks that bet on a cut block: they need "
                             f"next_draft='masked' and branches >= 2, got next_draft={self.next_draft!r}, "
                             f"branches={self.branches}")
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


def _check_counts(block_size: int, max_new_tokens: int) -> None:
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


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


class AcceptanceStats:
    """What the `drafted` / `accepted` lists (one entry per verified block) of a speculative run
    say (SpeculativeOutput, megablock.inference.measure.DecodeRecord)."""

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


# --- KV caches ------------------------------------------------------------------------------------------
class KVCache:
    """A causal clean context plus a scratch window, one length for the whole batch.

    With context-causal training the clean half is a plain causal LM, so the clean context is an
    ordinary causal KV cache. Sampling runs two kinds of forward over it:
    - ``append`` (prefill, and a finished block): the new tokens attend causally to themselves and
      to every cached key; their K/V are kept (the cache grows);
    - ``peek`` (refining a block): the block attends to all cached keys and bidirectionally to
      itself, as the xt half in training; nothing is kept.
    Both write the new K/V right after the cached length (attention reads one contiguous view);
    only ``append`` advances it, so a peek's K/V are scratch the next forward overwrites.
    `key_valid` marks which slots hold real tokens (left padding); padded slots are never seen.
    A forward is bracketed by `begin(...)` / `end()`; every attention layer calls `store` (or
    `attend`, which stores and runs SDPA with `mask()`).
    """

    def __init__(self, batch: int, capacity: int):
        self.batch = batch
        self.capacity = capacity
        self.length = 0
        self.k: Dict[int, torch.Tensor] = {}
        self.v: Dict[int, torch.Tensor] = {}
        self.key_valid: Optional[torch.Tensor] = None  # [b, capacity] bool; None: every slot real
        self._append = False
        self._n_new = 0
        self._new_valid: Optional[torch.Tensor] = None
        self._mask: Optional[torch.Tensor] = None
        self._mask_ready = False

    # one forward
    def begin(self, n_new: int, append: bool, new_valid: Optional[torch.Tensor] = None) -> None:
        """Start a forward over `n_new` new slots. `new_valid` [b, n_new] marks real tokens among
        them (None: all real); it only matters for ``append``, where it is stored with the keys."""
        if self.length + n_new > self.capacity:
            raise RuntimeError(f"KV cache full: {self.length} + {n_new} slots > capacity {self.capacity}")
        self._append, self._n_new = append, n_new
        if new_valid is not None and bool(new_valid.all()):
            new_valid = None
        if new_valid is not None and self.key_valid is None:
            self.key_valid = torch.ones(self.batch, self.capacity, dtype=torch.bool, device=new_valid.device)
        self._new_valid = new_valid
        self._mask_ready = False

    def adapter_gate(self) -> bool:
        """Gated adapters (lora.scope=noised) run on a peek, the noised block, never on an append."""
        return not self._append

    def end(self) -> None:
        if self._append:
            if self.key_valid is not None:
                new = self._new_valid if self._new_valid is not None else True
                self.key_valid[:, self.length : self.length + self._n_new] = new
            self.length += self._n_new
        self._n_new = 0

    # every attention layer
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new k, v [b, hkv, s, d] (RoPE applied); returns every key and value the new
        queries may attend to, [b, hkv, length + s, d]."""
        b, hkv, s, d = k.shape
        if s != self._n_new:
            raise RuntimeError(f"attention got {s} new slots, begin() announced {self._n_new}")
        if layer not in self.k:
            self.k[layer] = k.new_empty(b, hkv, self.capacity, d)
            self.v[layer] = v.new_empty(b, hkv, self.capacity, d)
        end = self.length + s
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    @property
    def causal(self) -> bool:
        """Plain causal attention from an empty cache: SDPA's is_causal, no mask needed."""
        return self._append and self._n_new > 1 and self.length == 0 and self.mask() is None

    def mask(self, device=None) -> Optional[torch.Tensor]:
        """[b, 1, s, length + s] bool (True: visible) of this forward, or None when no key is
        hidden beyond plain causal attention from an empty cache (see `causal`)."""
        if not self._mask_ready:
            self._mask = self._build_mask(self._n_new, device)
            self._mask_ready = True
        return self._mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, hq, s, d]; k, v [b, hkv, s, d] (RoPE applied). Returns [b, hq, s, d]."""
        keys, values = self.store(layer, k, v)
        mask = self.mask(q.device)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=self.causal,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def _build_mask(self, s: int, device) -> Optional[torch.Tensor]:
        n = self.length
        padded = (self.key_valid is not None and not bool(self.key_valid[:, :n].all())) or self._new_valid is not None
        if not padded and (not self._append or s == 1 or n == 0):
            return None
        new = torch.ones(s, s, dtype=torch.bool, device=device)
        if self._append:
            new = new.tril()
        mask = torch.cat([torch.ones(s, n, dtype=torch.bool, device=device), new], dim=1)
        mask = mask.expand(self.batch, s, n + s).clone()
        if self.key_valid is not None:
            mask[:, :, :n] &= self.key_valid[:, None, :n]
        if self._new_valid is not None:
            mask[:, :, n:] &= self._new_valid[:, None, :]
            # A padding query sees no real key; let it see itself so its row is not all -inf
            # (its output is never used and no real query attends to it).
            mask[:, :, n:] |= torch.eye(s, dtype=torch.bool, device=device)
        return mask[:, None]

    # batch bookkeeping
    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (finished rows leave; their compute stops)."""
        for layer in self.k:
            self.k[layer] = self.k[layer].index_select(0, rows)
            self.v[layer] = self.v[layer].index_select(0, rows)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, rows)
        self.batch = int(rows.numel())


class RowKVCache:
    """A causal KV cache where each row has its own length, so rows can roll back different
    numbers of rejected slots.

    A forward brings `n_append + n_noised` new slots per row, written right after that row's
    length (a scatter, so rows need not line up):
    - the append part, `append_valid[r]` real tokens then padding: causal among themselves, over
      the row's cache;
    - the noised part, m draft blocks of n_noised / m slots (`noised_sees` [b] for one, [b, m]):
      block j is bidirectional among itself, over the row's cache and the first
      `noised_sees[r, j]` append slots; blocks never see each other, and append slots never see
      any of them.
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
        self.causal = top == 0 and n_noised == 0
        self._mask = None if self.causal else self._build_mask(n_append, append_valid, n_noised, noised_sees)

    def mask(self, device=None) -> Optional[torch.Tensor]:
        """[b, 1, n, width] bool: which key slots each new query sees (None when `causal`)."""
        return self._mask

    def _build_mask(self, n_app, valid, n_noise, sees) -> torch.Tensor:
        dev = self.lengths.device
        rel = torch.arange(self._width, device=dev)[None] - self.lengths[:, None]  # key slot - row length
        query = torch.arange(self._n, device=dev)[None, :, None]
        cached = (rel < 0)[:, None]
        app_key = ((rel >= 0) & (rel < valid.to(dev)[:, None]))[:, None]
        mask = cached | (app_key & (rel[:, None] <= query))
        if n_noise:
            sees = sees.to(dev).reshape(self.batch, -1)  # [b, m]
            width = n_noise // sees.shape[1]
            q_block = (query - n_app).clamp(min=0) // width  # [1, n, 1]
            k_block = (rel - n_app).div(width, rounding_mode="floor")[:, None]  # [b, 1, W]
            noise_key = (rel >= n_app)[:, None] & (rel < self._n)[:, None] & (k_block == q_block)
            q_sees = sees.gather(1, q_block[..., 0].expand(self.batch, -1))[..., None]  # [b, n, 1]
            seen = app_key & (rel[:, None] < q_sees)
            mask = torch.where(query < n_app, mask, cached | seen | noise_key)
        return mask[:, None]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter the new k, v [b, hkv, n, d] after each row's length; returns the keys and
        values of the first `width` slots (what `mask` indexes)."""
        b, hkv, n, d = k.shape
        if n != self._n:
            raise RuntimeError(f"attention got {n} new slots, begin() announced {self._n}")
        if layer not in self.k:
            self.k[layer] = k.new_zeros(b, hkv, self.capacity, d)
            self.v[layer] = v.new_zeros(b, hkv, self.capacity, d)
        index = self._index[:, None, :, None].expand(b, hkv, n, d)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer][:, :, : self._width], self.v[layer][:, :, : self._width]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, hq, n, d]; k, v [b, hkv, n, d] (RoPE applied). Returns [b, hq, n, d]."""
        keys, values = self.store(layer, k, v)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask, is_causal=self.causal,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def adapter_gate(self):
        """Gated adapters (lora.scope=noised) run on the draft block's slots only: the verify /
        append slots, whose K/V stay in the cache, are the base model's. True / False for a
        forward that is all draft / all append, else a [1, n] bool per slot."""
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


# --- the loops --------------------------------------------------------------------------------------
class Decoder:
    """What both loops need from the side that runs the network. Subclasses set `mask_token_id`,
    `eos` (a long tensor of EOS ids), `pad_token_id` and `device`, and implement:

    - `_encode(ids [b, n], pos [b, n], cache) -> hidden [b, n, H]`: one forward between the cache's
      `begin` and `end`, every attention layer going through the cache (`attend` or `store` + `mask`);
    - `_logits(hidden [..., H]) -> [..., V]` float logits of the real vocabulary, mask token -inf;
    - `_agree(t)`: the tensor every rank goes on with (identity on one process).
    """

    mask_token_id: Optional[int]
    eos: torch.Tensor
    pad_token_id: int
    device: torch.device

    def _encode(self, ids: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        raise NotImplementedError

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _agree(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def check_request(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Refuse what the model cannot decode (megablock: positions past a plain RoPE)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")


class ThresholdDecoder(Decoder):
    """Block-diffusion decoding with a `KVCache` (see `sampler`'s module doc for the loop)."""

    def _hidden(self, cache: KVCache, ids, pos, append: bool, valid=None) -> torch.Tensor:
        cache.begin(ids.shape[1], append, valid)
        hidden = self._encode(ids, pos, cache)
        cache.end()
        return hidden

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerateConfig,
                 stop: Optional[Callable[[int, list], bool]] = None) -> GenerationOutput:
        """`stop(row, tokens)`: called with a prompt's index and its new tokens so far after each
        block that did not end it; True ends the row there (the block's tokens are kept whole, so
        a caller cutting at a stop string cuts the text itself). It must decide from the tokens
        alone: under TP every rank calls it and must agree."""
        cfg.validate(self.mask_token_id)
        self.check_request(prompts, cfg.max_new_tokens)
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
            todo = needed & ~committed & before_eos(x, committed & needed, eos)
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


class SpeculativeDecoder(Decoder):
    """Lossless self-speculative decoding with a `RowKVCache` (see `speculative`'s module doc)."""

    def propose(self, rows: list, positions: list, drafts: list) -> list:
        """The drafts to verify for each row (row = original prompt index; positions[i] are the
        new-token indices the drafts stand for). The noised half's drafts as they are; tests
        override this to force a perfect or a corrupted drafter."""
        return drafts

    def _forward(self, cache: RowKVCache, append: list, noised: Optional[tuple] = None):
        """One model call. append: per row the tokens to append (at least one each, or none at all
        for a pure draft pass). noised: m draft blocks of B slots, (tokens [b, m * B], first
        positions [b, m], append slots seen [b, m]; [b] for m = 1), or None. Returns the hidden
        states (append [b, n_append, H], noised [b, m * B, H] or None): the caller takes logits
        of the few slots it needs (a prefill has many)."""
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
            n_noise, start = tokens.shape[1], start.reshape(b, -1)
            slots = start[:, :, None] + torch.arange(n_noise // start.shape[1])
            ids = torch.cat([ids, tokens.cpu()], dim=1)
            pos = torch.cat([pos, slots.reshape(b, n_noise)], dim=1)
        cache.begin(n_app, a, n_noise, None if noised is None else sees)
        hidden = self._encode(ids.to(dev), pos.to(dev), cache)
        cache.end()
        return hidden[:, :n_app], (hidden[:, n_app:] if n_noise else None)

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
            tokens, q = draw(logits, cfg.sampling, generator)
            tokens = tokens.cpu()
            conf = logits.softmax(-1).amax(-1).cpu()
            commit = select_commits(conf, todo[:, 1:], cfg.draft_threshold, per_step)
            decided = self._agree(torch.stack([tokens, commit.long()]).to(dev)).cpu()
            tokens, commit = decided[0], decided[1].bool()
            x[:, 1:][commit] = tokens[commit]
            todo[:, 1:] &= ~commit
        return x[:, 1:], q, forwards

    def _next_blocks(self, cache, tokens: list, points: list, B: int, overlap: bool,
                     first: Optional[list] = None) -> tuple:
        """The one-pass mode's draft blocks after `tokens` (each row's pending token + drafts), one
        per bet in points[r] (a number k of kept drafts: the block comes after tokens[:k + 1]):
        right after them with the first slot masked, or revealing first[r][j] there (a candidate
        for the verifier's token; None: masked), or overlapping their last one, which it reveals
        and which it (like a training block's first slot) does not see the clean copy of.
        Returns (tokens [b, m * B], first positions [b, m], append slots seen [b, m])."""
        back = 1 if overlap else 0
        seen = torch.tensor(points, dtype=torch.long) + 1 - back  # [b, m]
        x = torch.full((len(tokens), seen.shape[1], B), self.mask_token_id, dtype=torch.long)
        if overlap:
            x[:, :, 0] = torch.tensor([[t[k] for k in row] for t, row in zip(tokens, points)])
        for i, row in enumerate(first or []):
            for j, c in enumerate(row):
                if c is not None:
                    x[i, j, 0] = c
        return x.flatten(1), cache.lengths.cpu()[:, None] + seen, seen

    @staticmethod
    def _bets(drafts: list, branches: int, alts: Optional[list] = None, candidates: int = 0,
              split: CandidateSplit = "even") -> tuple:
        """Per row the next blocks' bets: (kept-draft counts, first tokens). Counts: every draft
        kept first, then none, one, ... (`branches` of them), each with a masked first slot (None);
        then candidate blocks revealing a token other than the draft at a cut slot k, from the
        drafter's (k, token) pairs alts[r], likeliest first: `candidates` per count k short of all
        ("even"), or that many times the cut counts from the top of the list ("likeliest"). A row
        with fewer bets repeats its first one (every row has the same width)."""
        counts, firsts = [], []
        for i, d in enumerate(drafts):
            ks = [len(d)] + [k for k in range(len(d)) if k < branches - 1]
            pairs = [(k, None) for k in ks]
            if candidates and alts[i] is not None:
                cut = ks[1:]
                mine = [(k, c) for k, c in alts[i] if k in cut and c != d[k]]
                if split == "even":
                    mine = [pair for k in cut for pair in [q for q in mine if q[0] == k][:candidates]]
                pairs += mine[: candidates * len(cut)]
            counts.append([k for k, _ in pairs])
            firsts.append([c for _, c in pairs])
        m = max(len(row) for row in counts)
        return ([(row + row[:1] * m)[:m] for row in counts], [(row + row[:1] * m)[:m] for row in firsts])

    @staticmethod
    def _ranked_pairs(logits: torch.Tensor, drafts: torch.Tensor, tops: int) -> torch.Tensor:
        """Per next block ([b, m, w, V] logits, [b, m, w] drafts) its candidate (slot k, token c)
        pairs as k * V + c, likeliest first: the `tops` likeliest tokens at each slot, scored by
        log q(c at k) plus the log q of the drafts before k (the drafter's chance that the block
        is cut at k and the verifier's token is c). The sort is stable, so one slot's tokens stay
        in their top-k order (what the "even" split takes per slot)."""
        lse = logits.float().logsumexp(-1)
        top = logits.topk(tops, dim=-1)
        before = (logits.gather(-1, drafts[..., None]).squeeze(-1).float() - lse).cumsum(-1)
        before = F.pad(before[..., :-1], (1, 0))  # the drafts strictly before slot k
        score = (top.values.float() - lse[..., None] + before[..., None]).flatten(2)
        slot = torch.arange(logits.shape[2], device=logits.device)[:, None].expand(-1, tops)
        code = (slot * logits.shape[-1] + top.indices).flatten(2)
        return code.gather(-1, score.argsort(dim=-1, descending=True, stable=True))

    @staticmethod
    def _matching_bet(counts: list, firsts: list, kept: int, token: int) -> Optional[int]:
        """The block drafted after exactly the kept drafts and the verifier's next token: one that
        revealed that token, else one with a masked first slot; None when no bet was right."""
        pairs = list(zip(counts, firsts))
        for bet in ((kept, token), (kept, None)):
            if bet in pairs:
                return pairs.index(bet)
        return None

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: SpeculativeConfig,
                 stop: Optional[Callable[[int, list], bool]] = None) -> SpeculativeOutput:
        """`stop(row, tokens)`: as in ThresholdDecoder.generate, called after each verified block
        that did not end the row."""
        cfg.validate(self.mask_token_id)
        self.check_request(prompts, cfg.max_new_tokens)
        t0 = time.perf_counter()
        B, dev, n = cfg.block_size, self.device, len(prompts)
        generator = torch.Generator(device=dev).manual_seed(cfg.seed)
        eos = set(self.eos.tolist())
        one_pass = not cfg.two_pass and cfg.drafts_per_block > 0
        overlap = cfg.next_draft == "overlap"
        cands = cfg.candidates if one_pass else 0
        cache = RowKVCache(n, max(len(p) for p in prompts) + cfg.max_new_tokens + (1 + cfg.draft_blocks) * B + 2, dev)

        rows = list(range(n))
        out: list[list[int]] = [[] for _ in range(n)]
        drafted, accepted = [], []
        drafts: list[list[int]] = [[] for _ in range(n)]
        qs: list = [None] * n
        alts: list = [None] * n  # one pass with candidates: the drafter's (slot, token) pairs, likeliest first
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
            bets, firsts = self._bets(drafts, min(cfg.branches, max(len(d) for d in drafts) + 1), alts,
                                      cands, cfg.candidate_split) if one_pass else (None, None)
            noised = self._next_blocks(cache, tokens, bets, B, overlap, firsts) if one_pass else None
            app_hidden, noise_hidden = self._forward(cache, tokens, noised)
            forwards += 1
            for r in rows:
                row_forwards[r] += 1
            # AR logits of each row's last known token and its drafts: [b, max drafts + 1, V].
            width = max(len(d) for d in drafts) + 1
            at = (torch.tensor(known)[:, None] - 1 + torch.arange(width)).clamp(max=app_hidden.shape[1] - 1)
            app_logits = self._logits(app_hidden.gather(1, at.to(dev)[..., None].expand(-1, -1, app_hidden.shape[-1])))

            # Decide every row (TP rank 0's decisions are broadcast so all ranks agree).
            m = len(bets[0]) if one_pass else 0
            width_next = cfg.drafts_per_block
            alt_at = 2 + max(m, 1) * width_next  # then, with candidates, each next draft's (slot, token) pairs
            vocab = app_logits.shape[-1]
            # tokens per slot: a slot may take every candidate block of the "likeliest" split, and one is the draft
            tops = min(cands * (1 if cfg.candidate_split == "even" else width_next) + 1, vocab) if cands else 0
            decision = torch.zeros(b, alt_at + m * width_next * tops, dtype=torch.long)
            for i in range(b):
                kept, nxt = verify_drafts(app_logits[i, : len(drafts[i]) + 1], drafts[i], qs[i],
                                          cfg.sampling, generator)
                decision[i, 0], decision[i, 1] = kept, nxt
            next_q = None
            if one_pass:
                skip = 1 if overlap else 0  # overlap: the first output duplicates the AR token
                outs = noise_hidden.reshape(b, m, B, -1)[:, :, skip: B - 1].reshape(b, m * width_next, -1)
                logits = self._logits(outs)
                nd, next_q = draw(logits, cfg.sampling, generator)
                decision[:, 2:alt_at] = nd.cpu()
                if cands:
                    decision[:, alt_at:] = self._ranked_pairs(logits.view(b, m, width_next, -1), nd.view(b, m, -1),
                                                              tops).reshape(b, -1).cpu()
                if next_q is not None:
                    next_q = next_q.view(b, m, width_next, -1)
            decision = self._agree(decision.to(dev)).cpu()

            keep_rows, commit = [], torch.zeros(b, dtype=torch.long)
            next_append, next_drafts, next_qs, next_alts = [], [], [], []
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
                j = self._matching_bet(bets[i], firsts[i], kept, nxt) if one_pass else None
                if j is not None:  # a next block was drafted after exactly these tokens
                    next_drafts.append(decision[i, 2 + j * width_next: 2 + (j + 1) * width_next].tolist())
                    next_qs.append(None if next_q is None else next_q[i, j])
                    w = width_next * tops
                    next_alts.append([divmod(x, vocab) for x in
                                      decision[i, alt_at + j * w: alt_at + (j + 1) * w].tolist()] if cands else None)
                elif one_pass and cfg.reuse_drafts:  # drafts[kept] was rejected; the ones after it still stand
                    next_drafts.append(drafts[i][kept + 1:])
                    next_qs.append(None if qs[i] is None else qs[i][kept + 1:])
                    next_alts.append(None if alts[i] is None else
                                     [(k - kept - 1, c) for k, c in alts[i] if k > kept])
                else:
                    next_drafts.append([])
                    next_qs.append(None)
                    next_alts.append(None)
            cache.commit(commit)
            if len(keep_rows) < b:
                cache.select(torch.tensor(keep_rows, dtype=torch.long))
            rows = [rows[i] for i in keep_rows]
            append, drafts, qs, alts = next_append, next_drafts, next_qs, next_alts

        return SpeculativeOutput(out, forwards, time.perf_counter() - t0, self.pad_token_id,
                                 drafted=drafted, accepted=accepted, row_forwards=row_forwards)

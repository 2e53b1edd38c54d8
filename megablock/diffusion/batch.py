"""From L clean tokens per sample to everything the model and the loss need: `DiffusionBatch`.

The objective (computed elsewhere with one cross-entropy over all S output positions) is
    L_diff = sum(diff_weights * CE) / diff_normalizer
    L_AR   = sum(ar_weights * CE) / sum(ar_weights)
    L      = L_diff + lambda * L_AR
so every choice about which position predicts which token, and how much it counts, lives here.

With token shift (default), output i predicts token i+1:
  - clean half (x0 at S-positions L..2L-1): target = next clean token, ar_weight 1 for clean
    positions 0..L-2; the clean position bB-1 also carries diff_weight 1, because it predicts the
    first token of block b >= 1 (never masked; an AR step of the NELBO);
  - noised half: xt output i (not the last of its block) predicts x0[i+1] with diff_weight w if
    that token was masked, else 0;  diff_normalizer = b*(L-1)  (token 0 is never a target).
  So L_diff is the whole per-token NELBO, and at B = 1 it is exactly the AR NLL.
Without shift (BD3-LM): xt output j predicts x0[j] with weight w where masked; diff_normalizer
b*L; the clean half only carries L_AR.
Weights: `elbo` w = 1/p (p = the token's masking probability), `uniform` w = 1.
Targets are 0 wherever both weights are 0.

Instruction (SFT) data: `loss_mask` ([b, L] bool, True at response tokens) restricts both
terms to response tokens. Only response tokens are eligible for masking (a prompt token always
stays visible in the noised half), a position carries weight only if the token it predicts is a
response token (in either half), and diff_normalizer counts the response tokens that are targets,
so L_diff is a per-response-token NELBO. `doc_ids` ([b, L]) gives the packed conversations'
boundaries directly (an EOS can occur inside a conversation, e.g. at each chat turn's end).
Without them (pretraining text) every token is eligible, and the result is exactly as before.

`first_slot_mask_prob` (with shift): some blocks also get their first slot hidden in the input
(a mask token), with no change to targets or weights; it trains drafting a block before its first
token is known (one-forward-per-block speculative decoding).

Special cases:
  - B = 1 with shift: nothing can be masked, so the batch is mode "ar": input x0 only (S = L),
    diff_weights = ar_weights; the same objective at half the cost.  (`complementary` is ignored
    here: both copies would be identical.)
  - attention "full" (Dream / DiffuLLaMA baseline): input xt only (S = L), the whole sequence is
    one block (one t per sample, layout block size L); with shift token 0 is never masked;
    ar_weights are all 0.
  - complementary: the batch holds 2b rows, rows b..2b-1 repeat rows 0..b-1 with the inverted mask
    over eligible positions; a complement token was masked with probability q = 1 - p and gets
    w = 1/max(q, eps) (each copy is on its own an importance-weighted NELBO estimate; the eps floor
    keeps a nearly empty complement from producing a 1/q spike).  diff_normalizer counts both
    copies, so L_diff is the mean of the two estimates.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Optional

import torch

from megablock.config import DiffusionSection
from megablock.diffusion.layout import AttentionLayout, shard_positions
from megablock.diffusion.loss import LossLabels
from megablock.diffusion.noise import Noise, draw_noise, hidden_first_slots


@dataclass
class DiffusionBatch:
    """One micro-batch, in the exact form the model and loss consume (see module docstring)."""

    input_ids: torch.Tensor
    """[b, S] long: [xt ; x0] for two-half modes, x0 for "ar", xt for "full"."""
    position_ids: torch.Tensor
    """[b, S] long: 0..L-1 (for both halves)."""
    targets: torch.Tensor
    """[b, S] long: token each output position is trained to predict (0 where unused)."""
    diff_weights: torch.Tensor
    """[b, S] float: weight of that position's CE in L_diff (0 = unused)."""
    ar_weights: torch.Tensor
    """[b, S] float: 1 where the position's CE belongs to L_AR, else 0."""
    diff_normalizer: float
    """Number of diffusion target tokens in the batch: b*(L-1) with shift, b*L without."""
    layout: AttentionLayout
    """Attention mode, L, B, doc_ids."""

    @property
    def noised_targets(self) -> torch.Tensor:
        """[b, S] bool: the noised half's positions that predict a masked token (the only
        positions the confidence term reads); none in "ar" mode, which has no noised half."""
        if self.layout.mode == "ar":
            return torch.zeros_like(self.diff_weights, dtype=torch.bool)
        rows = self.layout.rows
        if self.layout.context is not None:
            rows = shard_positions(self.layout, self.diff_weights.device).expand_as(self.diff_weights)
        if rows is None:
            rows = torch.arange(self.diff_weights.shape[1], device=self.diff_weights.device).expand_as(self.diff_weights)
        noised = rows.to(self.diff_weights.device) < self.layout.seq_len
        return noised & (self.diff_weights > 0)

    def loss_labels(self) -> LossLabels:
        """The loss's view of this batch (megablock.diffusion.loss.objective). A noised slot at
        position i of its half predicts the token that the clean position i predicts causally
        (token shift): that clean position, the x0 half's i-th carried row, is its teacher."""
        dev = self.targets.device
        S = self.targets.shape[1]
        columns = torch.zeros_like(self.targets)
        if self.layout.two_halves:
            full = self.layout.rows if self.layout.rows is not None else torch.arange(S, device=dev).expand_as(self.targets)
            columns = (S - self.layout.seq_len) + full.to(dev) % self.layout.seq_len
        return LossLabels(self.targets, self.diff_weights, self.ar_weights,
                          torch.tensor(float(self.diff_normalizer), device=dev), self.noised_targets.float(), columns)

    def map_positions(self, fn, layout: AttentionLayout) -> "DiffusionBatch":
        """The batch with `fn` applied to each of its [b, S] per-position tensors, and `layout`."""
        return replace(self, layout=layout, **{name: fn(getattr(self, name)) for name in _PER_POSITION})

    def to(self, device, non_blocking: bool = False) -> "DiffusionBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        layout = self.layout
        if layout.doc_ids is not None:
            layout = replace(layout, doc_ids=move(layout.doc_ids))
        if layout.rows is not None:
            layout = replace(layout, rows=move(layout.rows))
        return self.map_positions(move, layout)


_PER_POSITION = ("input_ids", "position_ids", "targets", "diff_weights", "ar_weights")


def document_ids(samples: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """[b, L] long document index per position; a new document starts after each EOD token
    (the EOD itself belongs to the document it ends)."""
    eod = (samples == eod_token_id).long()
    return torch.cumsum(eod, dim=1) - eod


def _weights(prob: torch.Tensor, masked: torch.Tensor, weighting: str, floor: float) -> torch.Tensor:
    if weighting == "uniform":
        w = torch.ones_like(prob)
    else:
        # Masked positions always have p > 0; the tiny clamp only avoids 1/0 where unused.
        w = 1.0 / prob.clamp_min(max(floor, torch.finfo(prob.dtype).tiny))
    return torch.where(masked, w, torch.zeros_like(w)).float()


@dataclass
class _Targets:
    """Next-token targets of the clean sequence (rows [b, L]); SFT data restricts them to
    response tokens (`sft_targets`)."""

    x0: torch.Tensor
    nxt: torch.Tensor
    """The token each position predicts with shift (0 past the end and, SFT, at prompt tokens)."""
    has_next: torch.Tensor
    """1.0 where that prediction counts."""
    positions: torch.Tensor
    normalizer_rows: Optional[torch.Tensor] = None
    """SFT: per row, the response tokens that are targets (None: every token after the first)."""

    def repeated(self) -> "_Targets":
        """Both copies of a complementary batch."""
        rows = None if self.normalizer_rows is None else torch.cat([self.normalizer_rows, self.normalizer_rows])
        return _Targets(*(torch.cat([t, t]) for t in (self.x0, self.nxt, self.has_next, self.positions)), rows)

    def normalizer(self, pretraining: float) -> float:
        return pretraining if self.normalizer_rows is None else max(float(self.normalizer_rows.sum()), 1.0)


def _next_tokens(x0: torch.Tensor) -> _Targets:
    b, L = x0.shape
    nxt = torch.zeros_like(x0)
    nxt[:, :-1] = x0[:, 1:]
    has_next = (torch.arange(L) < L - 1).float().expand(b, L)
    return _Targets(x0, nxt, has_next, torch.arange(L).expand(b, L))


def sft_targets(targets: _Targets, resp: torch.Tensor, shift: bool) -> _Targets:
    """The SFT masking of the targets: a position counts only where the token it predicts (its
    next token) is a response token; the normalizer counts the response tokens that are targets."""
    resp_next = torch.zeros_like(resp)
    resp_next[:, :-1] = resp[:, 1:]
    return _Targets(
        targets.x0, torch.where(resp_next, targets.nxt, torch.zeros_like(targets.nxt)),
        targets.has_next * resp_next.float(), targets.positions, (resp_next if shift else resp).float().sum(1))


def _checked(samples, sample_indices, block_size: int, loss_mask, doc_ids):
    x0 = torch.as_tensor(samples).long()
    if x0.dim() != 2:
        raise ValueError(f"samples must be [batch, L], got shape {tuple(x0.shape)}")
    b, L = x0.shape
    idx = torch.as_tensor(sample_indices).long().flatten()
    if idx.numel() != b:
        raise ValueError(f"{b} samples but {idx.numel()} sample indices")
    if block_size < 1 or L % block_size:
        raise ValueError(
            f"block size {block_size} does not divide data.seq_len {L}; choose a divisor of {L}"
        )
    resp = None
    if loss_mask is not None:
        resp = torch.as_tensor(loss_mask).bool()
        if resp.shape != x0.shape:
            raise ValueError(f"loss_mask shape {tuple(resp.shape)} is not the samples' {tuple(x0.shape)}")
    if doc_ids is not None:
        doc_ids = torch.as_tensor(doc_ids).long()
        if doc_ids.shape != x0.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} is not the samples' {tuple(x0.shape)}")
    return x0, idx, resp, doc_ids


def build_batch(
    samples: torch.Tensor,
    sample_indices,
    block_size: int,
    settings: Optional[DiffusionSection] = None,
    *,
    mask_token_id: Optional[int],
    seed: int = 0,
    eod_token_id: Optional[int] = None,
    loss_mask: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
    **overrides,
) -> DiffusionBatch:
    """Noise `samples` ([b, L] clean tokens whose global indices are `sample_indices`) at
    `block_size` and lay out inputs, targets and loss weights (module docstring has the rules).

    `loss_mask` / `doc_ids` ([b, L]) are the response flags and conversation ids of SFT windows
    (module docstring); None for pretraining text.

    `settings` is the run's `diffusion` config section (defaults when None); keyword `overrides`
    replace some of its fields by their config names (`schedule="clipped"`, `clip_min=0.5`), and
    are validated as the config validates them. `settings.stages` is not used: the block size is
    the caller's."""
    cfg = settings or DiffusionSection()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    x0, idx, resp, doc_ids = _checked(samples, sample_indices, block_size, loss_mask, doc_ids)
    if cfg.document_masking and eod_token_id is None and doc_ids is None:
        raise ValueError("document_masking needs eod_token_id (the tokenizer's EOS/EOD id)")
    ar_mode = cfg.shift and block_size == 1 and cfg.attention != "full"
    if not ar_mode and mask_token_id is None:
        raise ValueError(
            "no mask token id: convert the model with a mask token (tools/convert_hf.py "
            "--mask-token TEXT) so the tokenizer and embedding have one"
        )
    targets = _next_tokens(x0)
    if resp is not None:
        targets = sft_targets(targets, resp, cfg.shift)

    def document_of(tokens: torch.Tensor) -> Optional[torch.Tensor]:
        if doc_ids is not None:
            return doc_ids if tokens.shape[0] == doc_ids.shape[0] else torch.cat([doc_ids, doc_ids])
        return document_ids(tokens, eod_token_id) if cfg.document_masking else None

    if ar_mode:
        return ar_batch(targets, document_of(x0))
    noised = noise_inputs(targets, idx, block_size, cfg, seed, mask_token_id, resp)
    doc = document_of(noised.targets.x0)
    if cfg.attention == "full":
        return full_batch(noised, doc)
    return two_half_batch(noised, block_size, cfg, resp is not None, doc)


def ar_batch(targets: _Targets, doc: Optional[torch.Tensor]) -> DiffusionBatch:
    """B = 1 with shift: input x0 only (S = L), every next-token CE in both terms."""
    b, L = targets.x0.shape
    return DiffusionBatch(
        input_ids=targets.x0.clone(),
        position_ids=targets.positions.clone(),
        targets=targets.nxt,
        diff_weights=targets.has_next.clone(),
        ar_weights=targets.has_next.clone(),
        diff_normalizer=targets.normalizer(float(b * (L - 1))),
        layout=AttentionLayout("ar", L, 1, doc),
    )


@dataclass
class _Noised:
    """The noised half: input xt, and the targets / weights of its outputs."""

    targets: _Targets
    """The clean targets, repeated for a complementary batch."""
    xt: torch.Tensor
    xt_targets: torch.Tensor
    xt_weights: torch.Tensor
    normalizer: float


def noise_inputs(targets: _Targets, idx: torch.Tensor, block_size: int, cfg: DiffusionSection, seed: int,
                 mask_token_id: int, resp: Optional[torch.Tensor]) -> _Noised:
    """Draw the mask (per block, or one t per sample for full attention), hide the masked (and
    first-slot) tokens, and say what each noised output predicts with which weight."""
    x0 = targets.x0
    b, L = x0.shape
    full = cfg.attention == "full"
    noise = draw_noise(idx, L, L if full else block_size, cfg, seed=seed)
    # The noise is drawn exactly as for pretraining (same generator stream per sample); SFT data
    # then keeps its prompt tokens visible. Each response token is still masked with its own p.
    masked = noise.masked if resp is None else noise.masked & resp
    weights = _weights(noise.prob, masked, cfg.loss_weighting, 0.0)
    if cfg.complementary:
        comp: Noise = noise.complement()
        comp_masked = comp.masked if resp is None else comp.masked & resp
        weights = torch.cat([weights, _weights(comp.prob, comp_masked, cfg.loss_weighting, cfg.eps)])
        masked = torch.cat([masked, comp_masked])
        targets = targets.repeated()
        x0, b = targets.x0, 2 * b

    xt = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    if cfg.first_slot_mask_prob and not full:
        # Only the input changes: the hidden first slot is still predicted by the clean half, and
        # the targets below follow `masked`, which never holds a block start.
        hidden = hidden_first_slots(idx, L, block_size, cfg.first_slot_mask_prob, seed)
        if resp is not None:
            hidden = hidden & resp  # a prompt token stays visible
        if cfg.complementary:
            hidden = torch.cat([hidden, hidden])
        xt = torch.where(hidden, torch.full_like(xt, mask_token_id), xt)
    if cfg.shift:
        # xt output i predicts x0[i+1]; block starts are never masked, so a block's last output
        # (whose i+1 starts the next block) gets no weight automatically.
        xt_masked_target = torch.zeros_like(masked)
        xt_masked_target[:, :-1] = masked[:, 1:]
        xt_w = torch.zeros_like(weights)
        xt_w[:, :-1] = weights[:, 1:]
        xt_targets = torch.where(xt_masked_target, targets.nxt, torch.zeros_like(targets.nxt))
        normalizer = float(b * (L - 1))
    else:
        xt_w = weights
        xt_targets = torch.where(masked, x0, torch.zeros_like(x0))
        normalizer = float(b * L)
    return _Noised(targets, xt, xt_targets, xt_w, targets.normalizer(normalizer))


def full_batch(noised: _Noised, doc: Optional[torch.Tensor]) -> DiffusionBatch:
    """attention "full": input xt only (S = L), the whole sequence one block, no AR term."""
    b, L = noised.xt.shape
    return DiffusionBatch(
        input_ids=noised.xt,
        position_ids=noised.targets.positions.clone(),
        targets=noised.xt_targets,
        diff_weights=noised.xt_weights,
        ar_weights=torch.zeros(b, L),
        diff_normalizer=noised.normalizer,
        layout=AttentionLayout("full", L, L, doc),
    )


def two_half_batch(noised: _Noised, block_size: int, cfg: DiffusionSection, sft: bool,
                   doc: Optional[torch.Tensor]) -> DiffusionBatch:
    """[xt ; x0]: the noised half's diffusion targets, the clean half's next-token targets (L_AR);
    with shift, clean position bB-1 (b >= 1) also carries the AR step of the NELBO that predicts
    block b's unmasked first token."""
    t = noised.targets
    b, L = t.x0.shape
    clean_diff = torch.zeros(b, L)
    if cfg.shift:
        pos = torch.arange(L)
        clean_diff[:, ((pos + 1) % block_size == 0) & (pos < L - 1)] = 1.0
        if sft:
            clean_diff = clean_diff * t.has_next  # only where the block's first token is a response token
    return DiffusionBatch(
        input_ids=torch.cat([noised.xt, t.x0], dim=1),
        position_ids=torch.cat([t.positions, t.positions], dim=1),
        targets=torch.cat([noised.xt_targets, t.nxt], dim=1),
        diff_weights=torch.cat([noised.xt_weights, clean_diff], dim=1),
        ar_weights=torch.cat([torch.zeros(b, L), t.has_next], dim=1),
        diff_normalizer=noised.normalizer,
        layout=AttentionLayout(cfg.attention, L, block_size, doc),
    )


def drop_unmasked_blocks(batch: DiffusionBatch, multiple: int = 1) -> DiffusionBatch:
    """The same batch without the noised blocks that carry no loss, or `batch` itself when there
    are none.

    A noised block in which nothing is masked has no diffusion target, and no other position
    attends to it (a noised block is seen by its own slots only), so its forward and backward
    change nothing: with uniform t a fraction 1/B of the noised blocks (B - 1 maskable slots
    with shift, each unmasked with probability 1 - t: E[(1 - t)^(B - 1)] = 1 / B), i.e. half the
    noised half at B = 2 and a quarter at B = 4. The result carries the noised blocks that have a
    target and all of x0, in order; `layout.rows` says where each carried position sits in the
    full sequence (the attention places them there), so loss and gradients are exactly those of
    the full batch. Rows of a micro-batch keep the same number of blocks (a row with fewer
    targets keeps some of its empty blocks), and the carried length is made a multiple of
    `multiple` (the TP size under sequence parallelism) the same way.
    """
    layout = batch.layout
    if not layout.two_halves or layout.rows is not None:
        return batch
    b, L, B = batch.input_ids.shape[0], layout.seq_len, layout.block_size
    nb = L // B
    scored = (batch.diff_weights[:, :L] > 0) | (batch.ar_weights[:, :L] > 0)
    live = scored.reshape(b, nb, B).any(-1)
    n = int(live.sum(1).max())
    while (L + n * B) % multiple and n < nb:
        n += 1
    if n == nb or (L + n * B) % multiple:
        return batch
    block = torch.arange(nb, device=live.device).expand(b, nb)
    # Each row's blocks with a target first, then its empty ones, both in order; keep n of them.
    chosen = torch.where(live, block, block + nb).argsort(dim=1)[:, :n].sort(dim=1).values
    xt_rows = (chosen[:, :, None] * B + torch.arange(B, device=live.device)).reshape(b, n * B)
    rows = torch.cat([xt_rows, L + torch.arange(L, device=live.device).expand(b, L)], dim=1)
    return batch.map_positions(lambda t: t.gather(1, rows.to(t.device)), replace(layout, rows=rows))

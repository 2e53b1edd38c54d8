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
from megablock.diffusion.layout import AttentionLayout
from megablock.diffusion.noise import Noise, draw_noise


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

    def to(self, device, non_blocking: bool = False) -> "DiffusionBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        layout = self.layout
        if layout.doc_ids is not None:
            layout = replace(layout, doc_ids=move(layout.doc_ids))
        return replace(
            self,
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            targets=move(self.targets),
            diff_weights=move(self.diff_weights),
            ar_weights=move(self.ar_weights),
            layout=layout,
        )


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


def build_batch(
    samples: torch.Tensor,
    sample_indices,
    block_size: int,
    settings: Optional[DiffusionSection] = None,
    *,
    mask_token_id: Optional[int],
    seed: int = 0,
    eod_token_id: Optional[int] = None,
    **overrides,
) -> DiffusionBatch:
    """Noise `samples` ([b, L] clean tokens whose global indices are `sample_indices`) at
    `block_size` and lay out inputs, targets and loss weights (module docstring has the rules).

    `settings` is the run's `diffusion` config section (defaults when None); keyword `overrides`
    replace some of its fields by their config names (`schedule="clipped"`, `clip_min=0.5`), and
    are validated as the config validates them. `settings.stages` is not used: the block size is
    the caller's."""
    cfg = settings or DiffusionSection()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
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
    if cfg.document_masking and eod_token_id is None:
        raise ValueError("document_masking needs eod_token_id (the tokenizer's EOS/EOD id)")

    ar_mode = cfg.shift and block_size == 1 and cfg.attention != "full"
    if not ar_mode and mask_token_id is None:
        raise ValueError(
            "no mask token id: convert the model with a mask token (tools/convert_hf.py "
            "--mask-token TEXT) so the tokenizer and embedding have one"
        )
    positions = torch.arange(L).expand(b, L)
    nxt = torch.zeros_like(x0)
    nxt[:, :-1] = x0[:, 1:]
    has_next = (torch.arange(L) < L - 1).float().expand(b, L)

    if ar_mode:
        doc = document_ids(x0, eod_token_id) if cfg.document_masking else None
        return DiffusionBatch(
            input_ids=x0.clone(),
            position_ids=positions.clone(),
            targets=nxt,
            diff_weights=has_next.clone(),
            ar_weights=has_next.clone(),
            diff_normalizer=float(b * (L - 1)),
            layout=AttentionLayout("ar", L, 1, doc),
        )

    full = cfg.attention == "full"
    noise_block = L if full else block_size
    noise = draw_noise(idx, L, noise_block, cfg, seed=seed)
    weights = _weights(noise.prob, noise.masked, cfg.loss_weighting, 0.0)
    masked = noise.masked
    if cfg.complementary:
        comp: Noise = noise.complement()
        weights = torch.cat([weights, _weights(comp.prob, comp.masked, cfg.loss_weighting, cfg.eps)])
        masked = torch.cat([masked, comp.masked])
        x0, nxt, positions, has_next = (torch.cat([t, t]) for t in (x0, nxt, positions, has_next))
        b = 2 * b

    xt = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    if cfg.shift:
        # xt output i predicts x0[i+1]; block starts are never masked, so a block's last output
        # (whose i+1 starts the next block) gets no weight automatically.
        xt_masked_target = torch.zeros_like(masked)
        xt_masked_target[:, :-1] = masked[:, 1:]
        xt_w = torch.zeros_like(weights)
        xt_w[:, :-1] = weights[:, 1:]
        xt_targets = torch.where(xt_masked_target, nxt, torch.zeros_like(nxt))
        normalizer = float(b * (L - 1))
    else:
        xt_w = weights
        xt_targets = torch.where(masked, x0, torch.zeros_like(x0))
        normalizer = float(b * L)

    doc = document_ids(x0, eod_token_id) if cfg.document_masking else None
    if full:
        return DiffusionBatch(
            input_ids=xt,
            position_ids=positions.clone(),
            targets=xt_targets,
            diff_weights=xt_w,
            ar_weights=torch.zeros(b, L),
            diff_normalizer=normalizer,
            layout=AttentionLayout("full", L, L, doc),
        )

    # Clean half: next-token targets everywhere (L_AR); with shift, position bB-1 (b >= 1) also
    # carries the AR step of the NELBO that predicts block b's unmasked first token.
    clean_diff = torch.zeros(b, L)
    if cfg.shift:
        pos = torch.arange(L)
        clean_diff[:, ((pos + 1) % block_size == 0) & (pos < L - 1)] = 1.0
    return DiffusionBatch(
        input_ids=torch.cat([xt, x0], dim=1),
        position_ids=torch.cat([positions, positions], dim=1),
        targets=torch.cat([xt_targets, nxt], dim=1),
        diff_weights=torch.cat([xt_w, clean_diff], dim=1),
        ar_weights=torch.cat([torch.zeros(b, L), has_next], dim=1),
        diff_normalizer=normalizer,
        layout=AttentionLayout(cfg.attention, L, block_size, doc),
    )

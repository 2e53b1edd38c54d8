"""The NBDiff objective: L = L_diff + lambda * L_AR from one vocab-parallel cross-entropy.

Both terms read the same per-position cross-entropy over [xt ; x0]; the batch's weights say
which positions belong to which term (see megablock.diffusion.batch). Full-vocabulary logits
are never gathered on one rank.

Training computes logits only where a loss is (`selected_block_diffusion_loss`): the positions
with a diffusion weight (masked noised positions, and with shift the clean positions that predict
a block's first token) and, when lambda > 0, the clean positions of the AR loss are gathered
*before* the head, so unmasked noised positions (about half the xt half) and, without AR loss,
most of the clean half never reach the vocabulary projection. The cross-entropy then runs over
chunks of `chunk_tokens` positions, each chunk's head + CE recomputed in backward, so the
[tokens, V / TP] logits (and their fp32 softmax) exist for one chunk at a time, in forward and
in backward. Unselected positions have weight 0 in both sums, so loss and gradients are today's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch.utils.checkpoint import checkpoint


@dataclass
class LossParts:
    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    ar_loss: torch.Tensor
    """Not computed (0) when the AR loss has weight 0 and only loss positions are gathered."""


def token_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position CE [b, S] from this TP rank's vocabulary slice of the logits, in fp32."""
    # vocab_parallel_cross_entropy works in place on its input: hand it its own fp32 copy.
    return vocab_parallel_cross_entropy(logits_local.float().clone(), targets)


def block_diffusion_loss(
    logits_local: torch.Tensor,
    targets: torch.Tensor,
    diff_weights: torch.Tensor,
    ar_weights: torch.Tensor,
    diff_normalizer: float,
    ar_loss_weight: float,
) -> LossParts:
    """L_diff = sum(w * CE) / number of diffusion target tokens (a per-token NELBO, comparable
    with AR NLL); L_AR = mean next-token CE over the clean half. The reference form: logits of
    every position in (tests, benchmarks and evaluation use it)."""
    ce = token_cross_entropy(logits_local, targets)
    diffusion = (ce * diff_weights).sum() / diff_normalizer
    ar_count = ar_weights.sum()
    ar = (ce * ar_weights).sum() / ar_count.clamp(min=1)
    return LossParts(diffusion + ar_loss_weight * ar, diffusion, ar)


def loss_positions(diff_weights: torch.Tensor, ar_weights: torch.Tensor, ar_loss_weight: float) -> torch.Tensor:
    """Flat indices (into [b * S]) of the positions whose CE reaches the loss."""
    keep = diff_weights > 0
    if ar_loss_weight > 0:
        keep = keep | (ar_weights > 0)
    return keep.flatten().nonzero().squeeze(1)


def _weighted_ce_sums(hidden, targets, diff_w, ar_w, head: Callable):
    """(sum diff_w * CE, sum ar_w * CE) of one chunk: head + vocab-parallel CE, fp32."""
    ce = token_cross_entropy(head(hidden), targets)
    return (ce * diff_w).sum(), (ce * ar_w).sum()


def chunked_ce_sums(hidden: torch.Tensor, head: Callable, targets: torch.Tensor, diff_w: torch.Tensor,
                    ar_w: torch.Tensor, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted CE sums over [N, H] hidden states, `chunk_tokens` at a time (0: one piece).

    With more than one chunk each chunk is checkpointed: backward recomputes its head and CE
    instead of keeping its logits and softmax, so those live for one chunk only. That costs one
    more head forward per chunk; a single chunk needs no recompute (nothing else is alive).
    Inside a checkpoint the TP collectives of the head and the CE run again in backward, in
    the same order on every TP rank."""
    n = hidden.shape[0]
    if chunk_tokens <= 0 or n <= chunk_tokens:
        return _weighted_ce_sums(hidden, targets, diff_w, ar_w, head)
    diff = ar = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        d, a = checkpoint(_weighted_ce_sums, hidden[part], targets[part], diff_w[part], ar_w[part], head,
                          use_reentrant=False)
        diff, ar = diff + d, ar + a
    return diff, ar


def selected_block_diffusion_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    diff_weights: torch.Tensor,
    ar_weights: torch.Tensor,
    diff_normalizer: float,
    ar_loss_weight: float,
    chunk_tokens: int = 8192,
) -> LossParts:
    """`block_diffusion_loss` from the hidden states [b, S, H] before the head: `head` maps
    [N, H] gathered states to this rank's [N, V / TP] logits (the final norm is per position,
    so it may run before or after the gather). Only loss positions are gathered (module
    docstring); the sums and normalizers are exactly those of `block_diffusion_loss`."""
    idx = loss_positions(diff_weights, ar_weights, ar_loss_weight)
    flat = hidden.reshape(-1, hidden.shape[-1])
    dw, aw = diff_weights.reshape(-1), ar_weights.reshape(-1)
    if idx.numel() == 0:  # no target in this micro-batch: a zero that still reaches every weight
        zero = (head(flat[:1]).float().sum() * 0.0)
        return LossParts(zero, zero.detach(), zero.detach())
    diff_sum, ar_sum = chunked_ce_sums(flat.index_select(0, idx), head, targets.reshape(-1).index_select(0, idx),
                                       dw.index_select(0, idx), aw.index_select(0, idx), chunk_tokens)
    diffusion = diff_sum / diff_normalizer
    if ar_loss_weight > 0:
        ar = ar_sum / aw.sum().clamp(min=1)
    else:
        # Only the AR positions that also carry a diffusion weight were gathered: their mean
        # would not be the AR loss, so it is not reported.
        ar = torch.zeros_like(diffusion)
    return LossParts(diffusion + ar_loss_weight * ar, diffusion, ar)


def sample_diffusion_losses(
    logits_local: torch.Tensor, targets: torch.Tensor, diff_weights: torch.Tensor, diff_normalizer: float,
) -> torch.Tensor:
    """[rows] each row's L_diff on the same per-token scale as the batch's (its weighted CE over
    its share of the normalizer): the per-sample loss whose variance across noise draws BD3-LM's
    schedule search minimises. Their mean is the batch's L_diff."""
    ce = token_cross_entropy(logits_local, targets)
    rows = ce.shape[0]
    return (ce * diff_weights).sum(-1) / (diff_normalizer / rows)

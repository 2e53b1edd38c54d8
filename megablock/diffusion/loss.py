"""The NBDiff objective: L = L_diff + lambda * L_AR from one vocab-parallel cross-entropy.

Both terms read the same per-position cross-entropy over [xt ; x0]; the batch's weights say
which positions belong to which term (see megablock.diffusion.batch). Full-vocabulary logits
are never gathered on one rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


@dataclass
class LossParts:
    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    ar_loss: torch.Tensor


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
    with AR NLL); L_AR = mean next-token CE over the clean half."""
    ce = token_cross_entropy(logits_local, targets)
    diffusion = (ce * diff_weights).sum() / diff_normalizer
    ar_count = ar_weights.sum()
    ar = (ce * ar_weights).sum() / ar_count.clamp(min=1)
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

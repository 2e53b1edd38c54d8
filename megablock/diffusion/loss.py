"""The NBDiff objective: L = L_diff + lambda * L_AR (+ gamma * L_conf) from one vocab-parallel
cross-entropy.

Both main terms read the same per-position cross-entropy over [xt ; x0]; the batch's weights say
which positions belong to which term (see megablock.diffusion.batch). Full-vocabulary logits
are never gathered on one rank.

The optional confidence term (diffusion.confidence_loss_weight = gamma, default 0) is the mean
entropy of the noised half's predictive distributions at the masked-token targets whose argmax
is already the target (dParallel's certainty forcing, LLaDA2's CAP): threshold decoding commits
a slot once its top probability passes the threshold, so making correct predictions confident
lets more slots commit per forward, while wrong predictions are left to the cross-entropy.
With gamma = 0 it is not computed at all (the objective and its graph are exactly as without it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region, vocab_parallel_cross_entropy


@dataclass
class LossParts:
    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    ar_loss: torch.Tensor
    confidence_loss: Optional[torch.Tensor] = None
    """Mean entropy over the correctly predicted noised targets (None when gamma = 0)."""


def token_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position CE [b, S] from this TP rank's vocabulary slice of the logits, in fp32."""
    # vocab_parallel_cross_entropy works in place on its input: hand it its own fp32 copy.
    return vocab_parallel_cross_entropy(logits_local.float().clone(), targets)


def _tp() -> tuple[int, int, Optional[object]]:
    """(TP rank, TP size, TP group); a single rank when no model-parallel state exists."""
    if dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        size = parallel_state.get_tensor_model_parallel_world_size()
        if size > 1:
            return parallel_state.get_tensor_model_parallel_rank(), size, parallel_state.get_tensor_model_parallel_group()
    return 0, 1, None


def confident_entropy(logits_local: torch.Tensor, targets: torch.Tensor, select: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of entropies, count) over the positions of `select` ([b, S] bool) whose argmax over
    the real vocabulary equals the target. Works on vocab-parallel logits (-inf at padding and
    the mask token, which have probability 0 and add nothing to the entropy)."""
    rank, size, group = _tp()
    rows = logits_local[select].float()  # [n, V_local]: only the rows the term reads
    tgt = targets[select]
    local = rows.shape[-1]
    with torch.no_grad():  # which rows count: a selection, not differentiated
        top = rows.max(-1).values
        in_range = (tgt >= rank * local) & (tgt < (rank + 1) * local)
        tgt_logit = torch.where(in_range, rows.gather(-1, (tgt - rank * local).clamp(0, local - 1)[:, None])[:, 0],
                                torch.zeros_like(top))
        if group is not None:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(tgt_logit, group=group)
        correct = tgt_logit >= top  # ties count as correct: the target is among the argmax
    z = rows[correct]
    m = top[correct][:, None]
    finite = torch.isfinite(z)
    shifted = torch.where(finite, z - m, torch.zeros_like(z))  # 0 where z = -inf (its weight e is 0)
    e = torch.where(finite, shifted.exp(), torch.zeros_like(z))
    partial = torch.stack([e.sum(-1), (e * shifted).sum(-1)])
    if group is not None:  # sums over the vocabulary slices (backward: the identity, as for any replicated loss)
        partial = reduce_from_tensor_model_parallel_region(partial)
    total, weighted = partial[0], partial[1]
    # H = -sum p log p with p = e / Z and log p = (z - m) - log Z:  H = log Z - sum(e (z - m)) / Z.
    entropy = total.log() - weighted / total
    return entropy.sum(), correct.sum()


def block_diffusion_loss(
    logits_local: torch.Tensor,
    targets: torch.Tensor,
    diff_weights: torch.Tensor,
    ar_weights: torch.Tensor,
    diff_normalizer: float,
    ar_loss_weight: float,
    confidence_loss_weight: float = 0.0,
    noised_targets: Optional[torch.Tensor] = None,
) -> LossParts:
    """L_diff = sum(w * CE) / number of diffusion target tokens (a per-token NELBO, comparable
    with AR NLL); L_AR = mean next-token CE over the clean half; with `confidence_loss_weight` > 0
    also gamma * mean entropy at the correctly predicted `noised_targets` ([b, S] bool, the
    batch's masked-token targets; DiffusionBatch.noised_targets)."""
    ce = token_cross_entropy(logits_local, targets)
    diffusion = (ce * diff_weights).sum() / diff_normalizer
    ar_count = ar_weights.sum()
    ar = (ce * ar_weights).sum() / ar_count.clamp(min=1)
    loss = diffusion + ar_loss_weight * ar
    if not confidence_loss_weight:
        return LossParts(loss, diffusion, ar)
    if noised_targets is None:
        raise ValueError("confidence_loss_weight > 0 needs noised_targets (DiffusionBatch.noised_targets)")
    total, count = confident_entropy(logits_local, targets, noised_targets.bool())
    confidence = total / count.clamp(min=1)
    return LossParts(loss + confidence_loss_weight * confidence, diffusion, ar, confidence)


def sample_diffusion_losses(
    logits_local: torch.Tensor, targets: torch.Tensor, diff_weights: torch.Tensor, diff_normalizer: float,
) -> torch.Tensor:
    """[rows] each row's L_diff on the same per-token scale as the batch's (its weighted CE over
    its share of the normalizer): the per-sample loss whose variance across noise draws BD3-LM's
    schedule search minimises. Their mean is the batch's L_diff."""
    ce = token_cross_entropy(logits_local, targets)
    rows = ce.shape[0]
    return (ce * diff_weights).sum(-1) / (diff_normalizer / rows)

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

The optional confidence term (diffusion.confidence_loss_weight = gamma, default 0) is the mean
entropy of the noised half's predictive distributions at the masked-token targets whose argmax
is already the target (dParallel's certainty forcing, LLaDA2's CAP): threshold decoding commits
a slot once its top probability passes the threshold, so making correct predictions confident
lets more slots commit per forward, while wrong predictions are left to the cross-entropy.
`confidence_loss` takes the logits of those positions only (training gathers them before the
head, like the loss positions). With gamma = 0 it is not computed at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region, vocab_parallel_cross_entropy
from torch.utils.checkpoint import checkpoint


@dataclass
class LossParts:
    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    ar_loss: torch.Tensor
    """Not computed (0) when the AR loss has weight 0 and only loss positions are gathered."""
    confidence_loss: Optional[torch.Tensor] = None
    """Mean entropy over the correctly predicted noised targets (None when gamma = 0)."""


def token_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor, consume: bool = False) -> torch.Tensor:
    """Per-position CE [b, S] from this TP rank's vocabulary slice of the logits, in fp32.

    vocab_parallel_cross_entropy works in place on its input (it becomes the softmax, then the
    gradient), so it gets its own fp32 copy, unless `consume`: the caller's fp32 logits are a
    temporary nothing else reads (the head's output: the linear that made them keeps its
    inputs for backward, not its output), and copying [tokens, V / TP] costs as much as a layer."""
    logits = logits_local.float()  # a new tensor, unless the logits are fp32 already
    if logits is logits_local and not consume:
        logits = logits.clone()
    return vocab_parallel_cross_entropy(logits, targets)


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
    ce = token_cross_entropy(head(hidden), targets, consume=True)
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


def _tp() -> tuple[int, int, Optional[object]]:
    """(TP rank, TP size, TP group); a single rank when no model-parallel state exists."""
    if dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        size = parallel_state.get_tensor_model_parallel_world_size()
        if size > 1:
            return parallel_state.get_tensor_model_parallel_rank(), size, parallel_state.get_tensor_model_parallel_group()
    return 0, 1, None


def confident_entropy(rows_local: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of entropies, count) over the rows ([n, V / TP] logits, targets [n]) whose argmax over
    the real vocabulary equals the target. Works on vocab-parallel logits (-inf at padding and the
    mask token, which have probability 0 and add nothing to the entropy)."""
    rank, size, group = _tp()
    rows = rows_local.float()
    local = rows.shape[-1]
    with torch.no_grad():  # which rows count: a selection, not differentiated
        top = rows.max(-1).values
        in_range = (targets >= rank * local) & (targets < (rank + 1) * local)
        picked = rows.gather(-1, (targets - rank * local).clamp(0, local - 1)[:, None])[:, 0]
        tgt_logit = torch.where(in_range, picked, torch.zeros_like(top))
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


def confidence_loss(rows_local: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_conf: mean entropy over the correctly predicted rows (0 when none is correct)."""
    total, count = confident_entropy(rows_local, targets)
    return total / count.clamp(min=1)


def with_confidence(parts: LossParts, gamma: float, rows_local: torch.Tensor, targets: torch.Tensor) -> LossParts:
    """`parts` plus gamma * L_conf over the given noised-target rows."""
    conf = confidence_loss(rows_local, targets)
    return LossParts(parts.loss + gamma * conf, parts.diffusion_loss, parts.ar_loss, conf)

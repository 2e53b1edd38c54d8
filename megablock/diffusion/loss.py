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

The optional distillation term (diffusion.distill_weight = delta, default 0) is the mean, over
the noised slots that predict a masked token, of KL(p || q): p is the clean half's distribution
for the same target token (the AR model, the verifier of speculative decoding, computed in the
same step with its gradient stopped), q the slot's draft distribution. Why this direction:
a drafter cannot see the masked tokens before its slot, so for one input it faces many
contexts; the q minimising the expected KL(p || q) is the mean of p over them, whose argmax is
the token the verifier most often picks, which is what greedy acceptance pays for (and with
sampling, acceptance is 1 - TV(p, q), which a mass-covering q keeps small). The reverse KL(q ||
p) is minimised by the normalised geometric mean of p, which vetoes any token that one
plausible context finds unlikely: a sharper draft, but not one aimed at the verifier's argmax.
It is the hard-label NELBO term with the one-hot target replaced by the verifier's
distribution; both terms stay, each with its own weight (1 and delta).

`objective` composes all terms from `LossLabels`, for both engines (one stage and pipeline).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional

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
    distill_loss: Optional[torch.Tensor] = None
    """Mean KL(verifier || draft) over the noised targets (None when delta = 0)."""


@dataclass(frozen=True)
class LossWeights:
    """The objective's weights: L = L_diff + ar * L_AR + confidence * L_conf + distill * L_KL."""

    ar: float = 0.0
    confidence: float = 0.0
    distill: float = 0.0
    distill_temperature: float = 1.0
    chunk_tokens: int = 8192
    """train.loss_chunk_tokens: positions per head + cross-entropy chunk."""

    @classmethod
    def from_config(cls, cfg) -> "LossWeights":
        """From a megablock.config.Config."""
        d = cfg.diffusion
        return cls(d.ar_loss_weight, d.confidence_loss_weight, d.distill_weight, d.distill_temperature,
                   cfg.train.loss_chunk_tokens)

    @property
    def reads_drafts(self) -> bool:
        """Whether a term needs the logits of the noised targets (beyond the cross-entropy)."""
        return bool(self.confidence or self.distill)


class LossLabels(NamedTuple):
    """What the loss reads of a micro-batch, all tensors (a pipeline's last stage gets them as
    they are): `DiffusionBatch.loss_labels()`."""

    targets: torch.Tensor
    diff_weights: torch.Tensor
    ar_weights: torch.Tensor
    normalizer: torch.Tensor
    """0-dim: diff_normalizer."""
    noised_targets: torch.Tensor
    """[b, S'] float, 1 at the noised half's positions that predict a masked token."""
    teacher_columns: torch.Tensor
    """[b, S'] long: at those positions, the column of the clean position whose AR output
    predicts the same token (the distillation teacher)."""


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
    ar_count: Optional[torch.Tensor] = None,
) -> LossParts:
    """`block_diffusion_loss` from the hidden states [b, S, H] before the head: `head` maps
    [N, H] gathered states to this rank's [N, V / TP] logits (the final norm is per position,
    so it may run before or after the gather). Only loss positions are gathered (module
    docstring); the sums and normalizers are exactly those of `block_diffusion_loss`.
    `ar_count`: the AR normalizer when `hidden` is a shard of the sequence (the whole sample's
    count of AR positions; megablock.diffusion.context); None counts `ar_weights`."""
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
        ar = ar_sum / (aw.sum() if ar_count is None else ar_count).clamp(min=1)
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


def distill_kl(student_local: torch.Tensor, teacher_local: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[n] T^2 * KL(p || q), p = softmax(teacher / T), q = softmax(student / T), from this TP rank's
    vocabulary slices [n, V / TP] (-inf at padding and the mask token in both). The teacher gets
    no gradient. With sum(p) = 1, KL = sum p log p - sum p s + logsumexp(s) (s = student / T):
    the vocabulary sums are partial on each rank and all-reduced with an identity backward, so
    every rank's slice gets exactly its share T (q - p) of the gradient."""
    rank, size, group = _tp()
    dtype = torch.promote_types(student_local.dtype, torch.float32)  # fp32 at least
    s = student_local.to(dtype) / temperature
    with torch.no_grad():
        t = teacher_local.to(dtype) / temperature
        t_max = t.max(-1, keepdim=True).values
        if group is not None:
            dist.all_reduce(t_max, op=dist.ReduceOp.MAX, group=group)
        t_sum = (t - t_max).exp().sum(-1, keepdim=True)
        if group is not None:
            dist.all_reduce(t_sum, group=group)
        log_p = t - t_max - t_sum.log()
        p = log_p.exp()
        s_max = s.max(-1, keepdim=True).values
        if group is not None:
            dist.all_reduce(s_max, op=dist.ReduceOp.MAX, group=group)
    s_sum = (s - s_max).exp().sum(-1)
    # 0 * (-inf) at the -inf columns: those terms are 0 (p = 0 there).
    cross = torch.where(p > 0, p * (log_p - s), torch.zeros_like(s)).sum(-1)
    partial = torch.stack([s_sum, cross])
    if group is not None:
        partial = reduce_from_tensor_model_parallel_region(partial)
    kl = partial[1] + s_max.squeeze(-1) + partial[0].log()
    return kl * temperature**2


def objective(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: LossLabels,
              weights: LossWeights, ar_count: Optional[torch.Tensor] = None) -> LossParts:
    """The whole training loss of one micro-batch from its hidden states [b, S', H] (before the
    head: `head` maps gathered rows to this rank's logits). Both engines call this. `ar_count`:
    see `selected_block_diffusion_loss` (context parallelism)."""
    parts = selected_block_diffusion_loss(hidden, head, labels.targets, labels.diff_weights, labels.ar_weights,
                                          float(labels.normalizer), weights.ar, weights.chunk_tokens, ar_count)
    if not weights.reads_drafts:
        return parts
    sel = labels.noised_targets > 0
    drafts = head(hidden[sel])  # the head on the noised targets' rows only
    if weights.confidence:
        parts = with_confidence(parts, weights.confidence, drafts, labels.targets[sel])
    if weights.distill:
        rows = sel.nonzero(as_tuple=True)[0]
        with torch.no_grad():
            teacher = head(hidden.detach()[rows, labels.teacher_columns[sel]])
        kl = distill_kl(drafts, teacher, weights.distill_temperature)
        kl = kl.sum() / max(kl.numel(), 1)
        parts = replace(parts, loss=parts.loss + weights.distill * kl, distill_loss=kl)
    return parts

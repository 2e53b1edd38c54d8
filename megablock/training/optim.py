"""Optimizer and learning-rate schedule handed to DeepSpeed.

torch's fused AdamW (one pass over each parameter's state; HF Trainer's default optimizer with
torch >= 2.8) keeps runs free of DeepSpeed's JIT-compiled FusedAdam/CPUAdam. On CPU it steps the
SmolLM2-135M shape in under a third of the time of torch's per-parameter loop (0.07 vs 0.25 s,
benchmarks/train_throughput.py's machine). `GuardedAdamW` makes "skip a step with a non-finite
loss" a decision every rank takes together, whatever ZeRO partitioning or pipeline stage it holds.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megablock.config import TrainSection
from megablock.parallel.state import ParallelInfo


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips the update on every rank when any rank's gradients are not finite.

    DeepSpeed calls `step` once per optimizer step on every rank (inside its ZeRO or bf16
    wrapper too), so one all-reduce of a flag keeps all replicas and stages identical after a
    skip. When DeepSpeed hands it the raw gradients (ZeRO 0, fp32) it also measures and clips
    the global gradient norm itself (`clip_norm`): counting TP-sharded weights on every TP rank,
    replicated ones once, all pipeline stages, and a tied embedding once; DeepSpeed reads the
    norm back from `_global_grad_norm`.
    """

    def __init__(self, *args, parallel: ParallelInfo = ParallelInfo(), clip_norm: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.parallel = parallel
        self.clip_norm = clip_norm
        self.last_step_skipped = False
        self._global_grad_norm = None

    def _grad_norm(self) -> torch.Tensor:
        tp_rank, model_parallel = self.parallel.tp_rank, self.parallel.model_parallel_group
        sq = torch.zeros(1)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or getattr(p, "ds_pipe_replicated", False):
                    continue
                if tp_rank != 0 and not getattr(p, "tensor_model_parallel", False):
                    continue
                sq = sq.to(p.grad.device) + p.grad.detach().float().pow(2).sum()
        if model_parallel is not None:
            dist.all_reduce(sq, group=model_parallel)
        return sq.sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.clip_norm is not None:
            norm = self._grad_norm()
            self._global_grad_norm = float(norm)
            bad = (~torch.isfinite(norm)).float().cpu()
            if self.clip_norm > 0 and torch.isfinite(norm):
                coef = min(1.0, self.clip_norm / (float(norm) + 1e-6))
                if coef < 1.0:
                    for p in params:
                        p.grad.mul_(coef)
        else:
            bad = torch.tensor([float(any(not torch.isfinite(p.grad).all() for p in params))])
        if dist.is_initialized():
            device = params[0].device if params else torch.device("cpu")
            bad = bad.reshape(1).to(device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.last_step_skipped = bool(bad.item())
        if self.last_step_skipped:
            return None
        return super().step(closure)


def build_optimizer(params, t: TrainSection, parallel: ParallelInfo, own_clipping: bool) -> GuardedAdamW:
    """`own_clipping`: DeepSpeed passes raw gradients (ZeRO 0, fp32), so the optimizer clips."""
    decay, no_decay = [], []
    for name, p in params:
        if not p.requires_grad:
            continue
        # Norm weights and biases are not decayed (the usual LLM recipe).
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return GuardedAdamW(
        [g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps,
        parallel=parallel, clip_norm=t.grad_clip if own_clipping else None, fused=True,
    )


def lr_lambda(t: TrainSection):
    """Multiplier of train.lr at a step: linear warmup, then cosine/linear decay to min_lr."""
    floor = t.min_lr / t.lr if t.lr > 0 else 0.0

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.decay == "constant":
            return 1.0
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        if t.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * shape

    return factor


def build_scheduler(optimizer, t: TrainSection):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))


def follow_configured_schedule(scheduler, configured_base_lrs: list) -> list:
    """After a checkpoint load: set the coming step's LR from *this* run's schedule.

    Loading restores the optimizer's last LR and the scheduler's base LRs from the checkpoint,
    but the LR lambda is this run's (functions are not saved). Without this, a run resumed with
    a larger train.steps or a new train.lr would take its first step at the LR the old schedule
    ended on (min_lr, possibly 0) and only then jump onto the new curve. With an unchanged config
    this recomputes exactly the LR that was saved (same expression as LambdaLR.get_lr), so
    resume stays bit-exact. Returns the LRs now set."""
    scheduler.base_lrs = list(configured_base_lrs)
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]
    return list(scheduler._last_lr)

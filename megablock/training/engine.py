"""The engine interface the training loop drives: a train step, an eval step and a global mean,
with one implementation for a single stage (DeepSpeed engine, ZeRO 0-3) and one for a pipeline
(DeepSpeed PipelineEngine, ZeRO <= 1). Each owns the loss wrapper its DeepSpeed engine needs;
tensor parallelism lives inside the model's layers and needs nothing here."""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megablock.config import Config
from megablock.diffusion.batch import DiffusionBatch, drop_unmasked_blocks
from megablock.diffusion.clean_context import cached_clean_forward
from megablock.diffusion.context import context_loss, shard_batch
from megablock.diffusion.layout import ContextShard
from megablock.diffusion.loss import LossLabels, LossWeights, objective, sample_diffusion_losses
from megablock.model.transformer import BlockDiffusionLM
from megablock.parallel.state import MegatronMPU, ParallelInfo
from megablock.training.optim import build_optimizer, build_scheduler
from megablock.training.pipeline import build_pipeline, pack_layout

logger = logging.getLogger(__name__)


class Engine:
    """DeepSpeed engine plus the loss; `ds` is the DeepSpeed engine (checkpoints, scheduler)."""

    def __init__(self, ds, optimizer, info: ParallelInfo):
        self.ds, self.optimizer, self.info = ds, optimizer, info

    def train_step(self, micro_batches: list[DiffusionBatch]) -> Optional[torch.Tensor]:
        """One optimizer step; this rank's mean [loss, diffusion, ar] over its micro-batches,
        or None on a rank that computes no loss (an earlier pipeline stage)."""
        raise NotImplementedError

    def eval_step(self, batches: list[DiffusionBatch]) -> float:
        """Mean diffusion loss (the NELBO estimate) over the whole data-parallel group."""
        raise NotImplementedError

    def sample_losses(self, batches: list[DiffusionBatch]) -> Optional[torch.Tensor]:
        """[samples of this rank] per-sample diffusion losses, no gradients (None on a rank that
        computes no loss). For the schedule search's variance estimate."""
        raise NotImplementedError

    def global_mean(self, local: Optional[torch.Tensor], width: int) -> torch.Tensor:
        """Mean over data-parallel ranks, made known on every rank."""
        value = local.clone() if local is not None else torch.zeros(width)
        if not dist.is_initialized():
            return value
        value = value.to(self.info.device)
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= self.info.dp
        return value.cpu()

    def grad_norm(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)


class DiffusionObjective(torch.nn.Module):
    """The single-stage module DeepSpeed wraps: model forward plus the objective
    (megablock.diffusion.loss.objective), the head run only on the positions that carry a loss.

    `clean_pass="cached"` (gated adapters, lora.scope=noised): the clean half runs once without
    autograd and the noised half attends to its K/V (megablock.diffusion.clean_context); the
    loss and the adapter gradients are those of the joint forward."""

    def __init__(self, model: BlockDiffusionLM, weights: LossWeights, drop_unmasked: bool = True,
                 clean_pass: str = "joint", context: Optional[ContextShard] = None):
        super().__init__()
        self.model = model
        self.weights = weights
        self.drop_unmasked = drop_unmasked
        """train.drop_unmasked_blocks: the forward skips the noised blocks that carry no loss."""
        self.clean_pass = clean_pass
        self.context = context
        """Context parallelism: the forward runs this rank's shard (megablock.diffusion.context)."""

    def hidden_states(self, batch: DiffusionBatch) -> torch.Tensor:
        if self.clean_pass == "cached" and batch.layout.mode == "context_causal":
            return cached_clean_forward(self.model, batch.input_ids, batch.position_ids, batch.layout,
                                        self.model.attention_impl)
        return self.model.encode(batch.input_ids, batch.position_ids, batch.layout)

    def forward(self, batch: DiffusionBatch, per_sample: bool = False):
        whole = batch
        if self.context is not None:
            batch = shard_batch(batch, self.context)
        if per_sample:  # evaluation only (no_grad): logits of every position, as the search measures them
            logits = self.model(batch.input_ids, batch.position_ids, batch.layout)
            losses = sample_diffusion_losses(logits, batch.targets, batch.diff_weights, batch.diff_normalizer)
            if self.context is not None:  # each shard's share of every row
                dist.all_reduce(losses, group=self.context.group)
            return losses
        if self.context is not None:
            parts = objective(self.hidden_states(batch), self.model.head, batch.loss_labels(), self.weights,
                              ar_count=whole.ar_weights.sum())
            parts = context_loss(parts, self.context)
            return parts.loss, parts.diffusion_loss, parts.ar_loss
        if self.drop_unmasked:
            # Under sequence parallelism the carried length must still split over the TP ranks.
            batch = drop_unmasked_blocks(batch, self.model.tp if self.model.sequence_parallel else 1)
        parts = objective(self.hidden_states(batch), self.model.head, batch.loss_labels(), self.weights)
        return parts.loss, parts.diffusion_loss.detach(), parts.ar_loss.detach()


class SingleStageEngine(Engine):
    def train_step(self, micro_batches):
        records = []
        for batch in micro_batches:
            loss, diff, ar = self.ds(batch.to(self.info.device))
            self.ds.backward(loss)
            self.ds.step()
            records.append(torch.stack([loss.detach().float(), diff.float(), ar.float()]))
        return torch.stack(records).mean(0)

    @torch.no_grad()
    def eval_step(self, batches):
        self.ds.eval()
        values = [self.ds(b.to(self.info.device))[1].float() for b in batches]
        self.ds.train()
        return float(self.global_mean(torch.stack(values).mean().reshape(1), 1)[0])

    @torch.no_grad()
    def sample_losses(self, batches):
        self.ds.eval()
        values = [self.ds(b.to(self.info.device), per_sample=True).float().cpu() for b in batches]
        self.ds.train()
        return torch.cat(values)


class PipelineLoss:
    """Loss function of the last pipeline stage; keeps each micro-batch's parts for logging.
    The stage's last layer hands over the normed hidden states and its head (`PendingLogits`),
    so the head runs here, on the loss positions only."""

    def __init__(self, weights: LossWeights):
        self.weights = weights
        self.records: list[torch.Tensor] = []
        self.evaluating = False
        self.per_sample: Optional[list[torch.Tensor]] = None  # a list while collecting per-sample losses

    def __call__(self, pending, labels):
        labels = LossLabels(*labels)
        if self.per_sample is not None:
            logits = pending.logits_fn(pending.normed)
            self.per_sample.append(sample_diffusion_losses(logits, labels.targets, labels.diff_weights,
                                                           float(labels.normalizer)).detach().cpu())
        parts = objective(pending.normed, pending.logits_fn, labels, self.weights)
        self.records.append(torch.stack([parts.loss, parts.diffusion_loss, parts.ar_loss]).detach())
        return parts.diffusion_loss if self.evaluating else parts.loss


def pipeline_item(batch: DiffusionBatch):
    """(inputs, labels) tensors of one micro-batch: DeepSpeed pipelines send tensors only."""
    ints, docs = pack_layout(batch.layout, batch.input_ids.shape[0])
    device = batch.input_ids.device
    inputs = (batch.input_ids, batch.position_ids, ints.to(device), docs.to(device))
    return inputs, tuple(batch.loss_labels())


class PipelineEngine(Engine):
    def __init__(self, ds, optimizer, info: ParallelInfo, loss: PipelineLoss):
        super().__init__(ds, optimizer, info)
        self.loss = loss

    def _items(self, batches):
        return iter([pipeline_item(b.to(self.info.device)) for b in batches])

    def train_step(self, micro_batches):
        self.loss.records.clear()
        self.ds.train_batch(data_iter=self._items(micro_batches))
        if not self.loss.records:
            return None
        return torch.stack([r.float() for r in self.loss.records]).mean(0)

    def eval_step(self, batches):
        self.loss.evaluating = True
        try:
            return float(self.ds.eval_batch(data_iter=self._items(batches), num_micro_batches=len(batches)))
        finally:
            self.loss.evaluating = False

    def sample_losses(self, batches):
        self.loss.per_sample = []
        try:
            self.eval_step(batches)
            return torch.cat(self.loss.per_sample).float() if self.loss.per_sample else None
        finally:
            self.loss.per_sample = None

    def global_mean(self, local, width):
        # Losses live on the last stage: average there, then broadcast along the pipeline.
        value = super().global_mean(local, width)
        if dist.is_initialized():
            value = value.to(self.info.device)
            dist.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return value.cpu()


def build_engine(model: BlockDiffusionLM, cfg: Config, info: ParallelInfo, ds_config: dict) -> Engine:
    """Wrap `model` (this rank's stage) in the DeepSpeed engine its layout needs."""
    import deepspeed  # deferred: importing DeepSpeed costs seconds, and only training needs it

    weights = LossWeights.from_config(cfg)
    if info.pp == 1:
        clean_pass = cfg.lora.clean_pass if cfg.lora.enabled and cfg.lora.scope == "noised" else "joint"
        context = None
        if info.cp > 1:
            context = ContextShard(info.cp, info.cp_rank, info.cp_group, cfg.parallel.context_impl)
        module = DiffusionObjective(model, weights, cfg.train.drop_unmasked_blocks, clean_pass, context)
        mpu, loss = MegatronMPU, None
    else:
        loss = PipelineLoss(weights)
        module = build_pipeline(model, info.pp, info.tp, info.dp, cfg.parallel.layers_per_stage, loss)
        mpu = None  # the PipelineModule brings its own grid
    own_clipping = cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32" and not cfg.train.deepspeed_config
    if own_clipping:
        ds_config["gradient_clipping"] = 0.0  # the optimizer clips (see GuardedAdamW)
    optimizer = build_optimizer(module.named_parameters(), cfg.train, info, own_clipping)
    ds, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg.train), config=ds_config, mpu=mpu
    )
    logger.info(
        "engine: ZeRO %d, %s, TP %d x CP %d x DP %d x PP %d, accumulation %d",
        cfg.parallel.zero_stage, cfg.train.precision, info.tp, info.cp, info.dp, info.pp,
        ds_config.get("gradient_accumulation_steps", 1),
    )
    if info.pp == 1:
        return SingleStageEngine(ds, optimizer, info)
    return PipelineEngine(ds, optimizer, info, loss)

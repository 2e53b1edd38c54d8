"""The training loop: staged block-size growth on a DeepSpeed engine, exact resume, safe exits.

One code path serves a single stage (DeepSpeed engine, ZeRO 0-3) and a pipeline (DeepSpeed
PipelineEngine, ZeRO <= 1); tensor parallelism lives inside the model's layers.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from megablock.config import Config, deepspeed_config, validate_parallel_layout
from megablock.diffusion.batch import DiffusionBatch
from megablock.diffusion.loss import block_diffusion_loss
from megablock.parallel.state import MegatronMPU, initialize_parallel, seed_everything
from megablock.training.checkpointing import (
    TrainerState, latest_checkpoint, load_training_state, save_training_checkpoint,
)
from megablock.training.metrics import MetricsWriter, device_peak_flops, step_flops
from megablock.training.optim import build_optimizer, build_scheduler, follow_configured_schedule
from megablock.training.pipeline import build_pipeline, pack_layout
from megablock.training.resume_check import check_resume
from megablock.training.run_dir import claim_save_dir
from megablock.training.setup import build_data, build_stage_model, tokenizer_dir_of

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the last good checkpoint stays."""


class DiffusionObjective(torch.nn.Module):
    """The single-stage module DeepSpeed wraps: model forward plus the NBDiff loss."""

    def __init__(self, stage, ar_loss_weight: float):
        super().__init__()
        self.stage = stage
        self.ar_loss_weight = ar_loss_weight

    def forward(self, batch: DiffusionBatch):
        logits = self.stage(batch.input_ids, batch.position_ids, batch.layout)
        parts = block_diffusion_loss(
            logits, batch.targets, batch.diff_weights, batch.ar_weights, batch.diff_normalizer, self.ar_loss_weight
        )
        return parts.loss, parts.diffusion_loss.detach(), parts.ar_loss.detach()


class PipelineLoss:
    """Loss function of the last pipeline stage; keeps each micro-batch's parts for logging."""

    def __init__(self, ar_loss_weight: float):
        self.ar_loss_weight = ar_loss_weight
        self.records: list[torch.Tensor] = []
        self.evaluating = False

    def __call__(self, logits, labels):
        targets, diff_w, ar_w, normalizer = labels
        parts = block_diffusion_loss(logits, targets, diff_w, ar_w, normalizer.float(), self.ar_loss_weight)
        self.records.append(torch.stack([parts.loss, parts.diffusion_loss, parts.ar_loss]).detach())
        return parts.diffusion_loss if self.evaluating else parts.loss


def pipeline_item(batch: DiffusionBatch):
    ints, docs = pack_layout(batch.layout, batch.input_ids.shape[0])
    normalizer = torch.tensor(float(batch.diff_normalizer))
    inputs = (batch.input_ids, batch.position_ids, ints.to(batch.input_ids.device), docs.to(batch.input_ids.device))
    return inputs, (batch.targets, batch.diff_weights, batch.ar_weights, normalizer.to(batch.input_ids.device))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        p = cfg.parallel
        self.info = initialize_parallel(p.tensor, p.pipeline)
        validate_parallel_layout(cfg, self.info.world_size)
        self.run_lock = claim_save_dir(cfg, self.info)  # save_dir policy + lock, launcher watchdog
        seed_everything(cfg.train.seed)
        self.stage, self.source_meta, self.source_ckpt = build_stage_model(cfg, self.info)
        self.model_cfg = self.stage.cfg
        self.train_data, self.valid_data = build_data(cfg, self.model_cfg, self.info)
        self.ds_config = deepspeed_config(cfg, self.info.world_size)
        self._build_engine()
        self.state = TrainerState()
        self.is_logger = self.info.rank == 0
        self.metrics = MetricsWriter(cfg.checkpoint.save_dir, self.is_logger)
        self._stop_signal = False
        self._num_params = self._count_parameters()

    # ------------------------------------------------------------------ set-up
    def _build_engine(self) -> None:
        import deepspeed

        cfg, info = self.cfg, self.info
        lam = cfg.diffusion.ar_loss_weight
        if info.pp == 1:
            module = DiffusionObjective(self.stage, lam)
            mpu = MegatronMPU
        else:
            self.pipe_loss = PipelineLoss(lam)
            module = build_pipeline(self.stage, info.pp, info.tp, info.dp, cfg.parallel.layers_per_stage, self.pipe_loss)
            mpu = None  # the PipelineModule brings its own grid
        own_clipping = cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32" and not cfg.train.deepspeed_config
        if own_clipping:
            self.ds_config["gradient_clipping"] = 0.0  # the optimizer clips (see GuardedAdamW)
        self.optimizer = build_optimizer(module.named_parameters(), cfg.train, own_clipping)
        scheduler = build_scheduler(self.optimizer, cfg.train)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, lr_scheduler=scheduler, config=self.ds_config, mpu=mpu
        )
        logger.info(
            "engine: ZeRO %d, %s, TP %d x DP %d x PP %d, accumulation %d",
            cfg.parallel.zero_stage, cfg.train.precision, info.tp, info.dp, info.pp,
            self.ds_config.get("gradient_accumulation_steps", 1),
        )

    def _count_parameters(self) -> int:
        local = torch.tensor([float(sum(p.numel() for p in self.stage.parameters()))])
        if dist.is_initialized():
            dist.all_reduce(local)
        return int(local.item() / self.info.dp)

    def maybe_resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        ckpt = latest_checkpoint(self.cfg.checkpoint.save_dir)
        if ckpt is None:
            logger.info("checkpoint.resume: no checkpoint in %s yet; starting from step 0", self.cfg.checkpoint.save_dir)
            return
        check_resume(ckpt, self.cfg.to_dict(), self.model_cfg)  # refuse config changes that break exactness
        configured_lrs = list(self.engine.lr_scheduler.base_lrs)
        self.state = load_training_state(self.engine, ckpt, self.info.rank)
        lrs = follow_configured_schedule(self.engine.lr_scheduler, configured_lrs)
        self.metrics.truncate_after(self.state.step)
        logger.info("resumed from %s at step %d (%d tokens consumed); step %d lr %.3g (train.lr %g, train.steps %d)",
                    ckpt, self.state.step, self.state.consumed_tokens, self.state.step + 1, lrs[0],
                    self.cfg.train.lr, self.cfg.train.steps)

    # ------------------------------------------------------------------ steps
    def _batch_dtype(self, batch: DiffusionBatch) -> DiffusionBatch:
        return batch.to(self.info.device)

    def _train_step(self, micro_batches) -> Optional[torch.Tensor]:
        """Runs one optimizer step; returns this rank's mean [loss, diff, ar] if it has them."""
        if self.info.pp == 1:
            records = []
            for batch in micro_batches:
                loss, diff, ar = self.engine(self._batch_dtype(batch))
                self.engine.backward(loss)
                self.engine.step()
                records.append(torch.stack([loss.detach().float(), diff.float(), ar.float()]))
            return torch.stack(records).mean(0)
        self.pipe_loss.records.clear()
        items = iter([pipeline_item(self._batch_dtype(b)) for b in micro_batches])
        self.engine.train_batch(data_iter=items)
        if not self.pipe_loss.records:
            return None
        return torch.stack([r.float() for r in self.pipe_loss.records]).mean(0)

    def _global_mean(self, local: Optional[torch.Tensor], width: int) -> torch.Tensor:
        """Mean over data-parallel ranks, made known on every rank (losses live on the last stage)."""
        value = local.clone() if local is not None else torch.zeros(width)
        if not dist.is_initialized():
            return value
        value = value.to(self.info.device)
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= self.info.dp
        if self.info.pp > 1:
            dist.broadcast(
                value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return value.cpu()

    @torch.no_grad()
    def evaluate(self, block_size: int) -> float:
        """Validation NELBO per token at the current block size."""
        batches = self.valid_data.batches(block_size)
        if self.info.pp == 1:
            self.engine.eval()
            values = [self.engine(self._batch_dtype(b))[1].float() for b in batches]
            self.engine.train()
            local = torch.stack(values).mean().reshape(1)
            return float(self._global_mean(local, 1)[0])
        self.pipe_loss.evaluating = True
        try:
            items = iter([pipeline_item(self._batch_dtype(b)) for b in batches])
            loss = self.engine.eval_batch(data_iter=items, num_micro_batches=len(batches))
        finally:
            self.pipe_loss.evaluating = False
        return float(loss)

    # ------------------------------------------------------------------ loop
    def _on_signal(self, signum, frame) -> None:
        logger.warning("received signal %d: will save a checkpoint after this step and exit", signum)
        self._stop_signal = True

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal else 0.0])
        if dist.is_initialized():
            flag = flag.to(self.info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save(self) -> None:
        if self.cfg.checkpoint.save_dir is None:
            return
        save_training_checkpoint(
            engine=self.engine, stage_model=self.stage, info=self.info, save_dir=self.cfg.checkpoint.save_dir,
            state=self.state, run_config=self.cfg.to_dict(), source_meta=self.source_meta,
            tokenizer_dir=tokenizer_dir_of(self.source_ckpt), keep_last=self.cfg.checkpoint.keep_last,
            zero_stage=self.cfg.parallel.zero_stage,
        )

    def run(self) -> TrainerState:
        cfg, t = self.cfg, self.cfg.train
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.maybe_resume()
        peak = device_peak_flops()
        bar = tqdm(total=t.steps, initial=self.state.step, disable=not self.is_logger, dynamic_ncols=True, desc="train")
        nonfinite_in_a_row, steps_this_launch = 0, 0
        while self.state.step < t.steps:
            start = time.perf_counter()
            step_batches = self.train_data.step(self.state.consumed_samples)
            if step_batches.block_size != self.state.block_size or step_batches.stage != self.state.stage:
                logger.info("curriculum: stage %d, block size %d from %d tokens", step_batches.stage, step_batches.block_size, self.state.consumed_tokens)
            lr = self.optimizer.param_groups[0]["lr"]
            losses = self._global_mean(self._train_step(step_batches.micro_batches), 3)
            elapsed = time.perf_counter() - start
            tokens = t.global_batch_size * cfg.data.seq_len
            self.state.step += 1
            self.state.consumed_samples += t.global_batch_size
            self.state.consumed_tokens += tokens
            self.state.stage, self.state.block_size = step_batches.stage, step_batches.block_size
            steps_this_launch += 1

            if self.optimizer.last_step_skipped or not torch.isfinite(losses).all():
                nonfinite_in_a_row += 1
                logger.warning("step %d: non-finite loss or gradients; the update was skipped (%d in a row)", self.state.step, nonfinite_in_a_row)
            else:
                nonfinite_in_a_row = 0

            record = {
                "step": self.state.step, "consumed_tokens": self.state.consumed_tokens,
                "block_size": self.state.block_size, "loss": float(losses[0]), "diffusion_loss": float(losses[1]),
                "ar_loss": float(losses[2]), "lr": lr, "grad_norm": _grad_norm(self.engine),
                "tokens_per_s": tokens / elapsed,
            }
            if peak:
                two = step_batches.micro_batches[0].layout.two_halves
                flops = step_flops(self._num_params, tokens * (2 if two else 1), self.model_cfg.num_layers,
                                   self.model_cfg.hidden_size, cfg.data.seq_len, two)
                record["mfu"] = flops / elapsed / (peak * self.info.world_size)
            if t.eval_interval and self.state.step % t.eval_interval == 0:
                record["val_nelbo"] = self.evaluate(self.state.block_size)
            if self.is_logger and (self.state.step % t.log_interval == 0 or "val_nelbo" in record):
                self.metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", B=self.state.block_size, tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if nonfinite_in_a_row >= t.max_nonfinite_steps:
                bar.close()
                raise TrainingStopped(
                    f"{nonfinite_in_a_row} consecutive steps had a non-finite loss (last: step {self.state.step}); "
                    f"stopping. The last good checkpoint in {cfg.checkpoint.save_dir} remains 'latest'; "
                    f"lower train.lr or check the data, then resume with checkpoint.resume=true"
                )

            last = self.state.step >= t.steps
            exiting = self._stop_requested() or (t.exit_after_steps and steps_this_launch >= t.exit_after_steps)
            interval = cfg.checkpoint.interval and self.state.step % cfg.checkpoint.interval == 0
            if interval and nonfinite_in_a_row and not (last or exiting):
                logger.warning("step %d: not saving in the middle of non-finite steps", self.state.step)
            elif last or exiting or interval:
                self.save()
            if exiting and not last:
                logger.info("exiting at step %d after saving (resume with checkpoint.resume=true)", self.state.step)
                break
        bar.close()
        self.metrics.close()
        return self.state


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)

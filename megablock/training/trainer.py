"""The training loop: staged block-size growth on an engine (megablock.training.engine), exact
resume, safe exits. The loop is `Trainer.run`; what it decides on the way (stop after non-finite
losses, when to save, what a metrics record holds) are the small named pieces below it."""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from megablock.config import Config, deepspeed_config, validate_parallel_layout
from megablock.model.params import parameter_count, training_flops
from megablock.parallel.state import initialize_parallel, seed_everything
from megablock.training.checkpointing import Checkpointer, TrainerState
from megablock.training.engine import build_engine
from megablock.training.metrics import MetricsWriter, device_peak_flops
from megablock.training.optim import follow_configured_schedule
from megablock.training.run_dir import claim_save_dir
from megablock.training.schedule_search import SearchLog, SearchResult, search_interval
from megablock.training.setup import build_data, build_model, resolve_and_check_model

logger = logging.getLogger(__name__)


class TrainingStopped(ValueError):
    """The run cannot go on (e.g. repeated non-finite losses); the last good checkpoint stays. A
    ValueError like every expected error: the tools print its message as one line."""


@dataclass
class NonFinitePolicy:
    """Skipped steps (non-finite loss or gradients; the optimizer skipped the update on every
    rank) are tolerated `limit - 1` times in a row; the `limit`-th stops the run."""

    limit: int
    in_a_row: int = 0

    def observe(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        logger.warning("step %d: non-finite loss or gradients; the update was skipped (%d in a row)", step, self.in_a_row)

    @property
    def must_stop(self) -> bool:
        return self.in_a_row >= self.limit


def should_save(step: int, *, interval: int, last: bool, exiting: bool, nonfinite_in_a_row: int) -> bool:
    """Save at the end, before an exit, and every `interval` steps, but not in the middle of
    non-finite steps (the checkpoint would become `latest` for no good reason)."""
    if last or exiting:
        return True
    if not (interval and step % interval == 0):
        return False
    if nonfinite_in_a_row:
        logger.warning("step %d: not saving in the middle of non-finite steps", step)
        return False
    return True


def mfu(flops: float, seconds: float, peak_flops: Optional[float], world_size: int) -> Optional[float]:
    """Model FLOP utilisation: achieved FLOP/s over the peak of all the run's devices."""
    if not peak_flops or seconds <= 0:
        return None
    return flops / seconds / (peak_flops * world_size)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model_cfg, self.source_ckpt = resolve_and_check_model(cfg)
        self.info = initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cp=cfg.parallel.context)
        validate_parallel_layout(cfg, self.info.world_size)
        self.run_lock = claim_save_dir(cfg, self.info)  # save_dir policy + lock, launcher watchdog
        seed_everything(cfg.train.seed)
        self.model = build_model(cfg, self.model_cfg, self.source_ckpt, self.info)
        self.trainable_parameters, self.total_parameters = parameter_count(self.model_cfg, cfg.lora)
        data = build_data(cfg, self.model_cfg, self.info)
        self.train_data, self.valid_data, self.search_data = data.train, data.validation, data.search
        self.engine = build_engine(self.model, cfg, self.info, deepspeed_config(cfg, self.info.world_size))
        self.optimizer = self.engine.optimizer
        self.state = TrainerState()
        self.is_logger = self.info.rank == 0
        self.metrics = MetricsWriter(cfg.checkpoint.save_dir, self.is_logger)
        self.search_log = SearchLog(cfg.checkpoint.save_dir, self.is_logger and self.search_data is not None)
        self.checkpointer = Checkpointer(cfg, self.info, self.engine.ds, self.model, self.source_ckpt)
        self._stop_signal = False

    # ------------------------------------------------------------------ resume and save
    def maybe_resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        scheduler = self.engine.ds.lr_scheduler
        configured_lrs = list(scheduler.base_lrs)
        state = self.checkpointer.load()  # refuses config changes that break exactness
        if state is None:
            logger.info("checkpoint.resume: no checkpoint in %s yet; starting from step 0", self.cfg.checkpoint.save_dir)
            return
        self.state, ckpt = state, self.checkpointer.latest()
        lrs = follow_configured_schedule(scheduler, configured_lrs)
        self.metrics.truncate_after(self.state.step)
        self.search_log.truncate_from(self.state.step)
        if self.state.clip_min is not None:
            self._train_with_interval(self.state.clip_min, self.state.clip_max)
        logger.info("resumed from %s at step %d (%d tokens consumed); step %d lr %.3g (train.lr %g, train.steps %d)",
                    ckpt, self.state.step, self.state.consumed_tokens, self.state.step + 1, lrs[0],
                    self.cfg.train.lr, self.cfg.train.steps)

    def _what_remains(self) -> str:
        """Which checkpoint a stopped run leaves (none when it stopped before its first save)."""
        save_dir = self.cfg.checkpoint.save_dir
        if save_dir is None:
            return "No checkpoint was saved (checkpoint.save_dir is not set)"
        latest = self.checkpointer.latest()
        if latest is None:
            return f"No checkpoint was saved in {save_dir} before it stopped"
        return f"The last good checkpoint, {latest.name} in {save_dir}, remains 'latest'"

    def save(self) -> None:
        self.checkpointer.save(self.state.step, self.state)

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        logger.warning("received signal %d: will save a checkpoint after this step and exit", signum)
        self._stop_signal = True

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal else 0.0])
        if dist.is_initialized():
            flag = flag.to(self.info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ loop
    def _train_with_interval(self, clip_min: float, clip_max: float) -> None:
        self.train_data.settings = replace(self.train_data.settings, clip_min=clip_min, clip_max=clip_max)

    def maybe_search_schedule(self) -> Optional[SearchResult]:
        """diffusion.schedule=adaptive: before the coming step, search the clipped interval if a
        block-size stage starts or the search interval has passed (a stage at B = 1 masks
        nothing and is not searched). The choice goes into the trainer state, so a resumed run
        trains with it and repeats later searches exactly."""
        if self.search_data is None:
            return None
        d = self.cfg.diffusion
        stage, block_size = self.train_data.curriculum.stage_at(self.state.consumed_tokens)
        due = stage != self.state.searched_stage or (
            d.schedule_search_interval and self.state.step % d.schedule_search_interval == 0)
        if not due:
            return None
        self.state.searched_stage = stage
        if block_size == 1:
            return None
        result = search_interval(self.engine, self.search_data, block_size, self.train_data.settings,
                                 self.cfg.train.seed, self.state.step)
        self.state.clip_min, self.state.clip_max = result.interval
        self._train_with_interval(*result.interval)
        self.search_log.write(result)
        return result

    def evaluate(self, block_size: int) -> float:
        """Validation NELBO per token at the current block size."""
        return self.engine.eval_step(self.valid_data.batches(block_size))

    def _record(self, losses: torch.Tensor, lr: float, tokens: int, elapsed: float, two_halves: bool,
                peak: Optional[float]) -> dict:
        record = {
            "step": self.state.step, "consumed_tokens": self.state.consumed_tokens,
            "block_size": self.state.block_size, "loss": float(losses[0]), "diffusion_loss": float(losses[1]),
            "ar_loss": float(losses[2]), "lr": lr, "grad_norm": self.engine.grad_norm(),
            "tokens_per_s": tokens / elapsed,
        }
        flops = training_flops(self.model_cfg, tokens * (2 if two_halves else 1), self.cfg.data.seq_len, two_halves)
        utilisation = mfu(flops, elapsed, peak, self.info.world_size)
        if utilisation is not None:
            record["mfu"] = utilisation
        return record

    def run(self) -> TrainerState:
        cfg, t = self.cfg, self.cfg.train
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.maybe_resume()
        self.checkpointer.record_base()  # before training, not at the first save
        peak = device_peak_flops()
        nonfinite = NonFinitePolicy(t.max_nonfinite_steps)
        bar = tqdm(total=t.steps, initial=self.state.step, disable=not self.is_logger, dynamic_ncols=True, desc="train")
        steps_this_launch = 0
        while self.state.step < t.steps:
            searched = self.maybe_search_schedule()
            start = time.perf_counter()
            step_batches = self.train_data.step(self.state.consumed_samples)
            if (step_batches.block_size, step_batches.curriculum_stage) != (self.state.block_size, self.state.curriculum_stage):
                logger.info("curriculum: stage %d, block size %d from %d tokens", step_batches.curriculum_stage,
                            step_batches.block_size, self.state.consumed_tokens)
            lr = self.optimizer.param_groups[0]["lr"]
            losses = self.engine.global_mean(self.engine.train_step(step_batches.micro_batches), 3)
            elapsed = time.perf_counter() - start
            tokens = t.global_batch_size * cfg.data.seq_len
            self.state.advance(t.global_batch_size, tokens, step_batches.curriculum_stage, step_batches.block_size)
            steps_this_launch += 1
            nonfinite.observe(self.state.step, self.optimizer.last_step_skipped or not torch.isfinite(losses).all())

            record = self._record(losses, lr, tokens, elapsed, step_batches.micro_batches[0].layout.two_halves, peak)
            if self.search_data is not None:
                record.update(clip_min=self.train_data.settings.clip_min, clip_max=self.train_data.settings.clip_max)
                if searched is not None:
                    record["loss_variance"] = searched.variance
            if t.eval_interval and self.state.step % t.eval_interval == 0:
                record["val_nelbo"] = self.evaluate(self.state.block_size)
            if self.is_logger and (self.state.step % t.log_interval == 0 or "val_nelbo" in record):
                self.metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", B=self.state.block_size, tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if nonfinite.must_stop:
                bar.close()
                raise TrainingStopped(
                    f"{nonfinite.in_a_row} consecutive steps had a non-finite loss (last: step {self.state.step}); "
                    f"stopping. {self._what_remains()}; lower train.lr or check the data, then "
                    + ("resume with checkpoint.resume=true" if self.checkpointer.latest() else "start again")
                )

            last = self.state.step >= t.steps
            exiting = self._stop_requested() or bool(t.exit_after_steps and steps_this_launch >= t.exit_after_steps)
            if should_save(self.state.step, interval=cfg.checkpoint.interval, last=last, exiting=exiting,
                           nonfinite_in_a_row=nonfinite.in_a_row):
                self.save()
            if exiting and not last:
                logger.info("exiting at step %d after saving (resume with checkpoint.resume=true)", self.state.step)
                break
        bar.close()
        self.metrics.close()
        return self.state

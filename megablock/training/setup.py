"""Building what a run trains: the model of this rank (from a checkpoint or random init) and its data."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Optional, Union

from megablock.checkpoint.format import Checkpoint
from megablock.checkpoint.loading import stage_shard
from megablock.checkpoint.mappings import UnsupportedModel, get_family
from megablock.config import Config, ConfigError, DiffusionSection, split_fractions, validate_model
from megablock.data.datasets import TokenWindows, build_gpt_datasets, check_vocabulary
from megablock.data.loader import StepBatcher
from megablock.data.sft import SFTWindows
from megablock.data.sampler import DataParallelSampler
from megablock.diffusion.batch import DiffusionBatch, build_batch
from megablock.model.config import ModelConfig
from megablock.model.lora import apply_lora
from megablock.model.params import parameter_count
from megablock.model.transformer import BlockDiffusionLM
from megablock.parallel.state import ParallelInfo

logger = logging.getLogger(__name__)


def resolve_model_config(cfg: Config) -> tuple[ModelConfig, Optional[Checkpoint]]:
    """(architecture, source checkpoint or None for random init)."""
    if cfg.model.init_from:
        ckpt = Checkpoint.open(cfg.model.init_from)
        return ckpt.meta.model, ckpt
    if not cfg.model.architecture:
        raise ConfigError("set model.init_from (a converted checkpoint) or model.architecture (random init)")
    try:
        model_cfg = ModelConfig(**cfg.model.architecture)
        get_family(model_cfg.arch)
    except (TypeError, ValueError, UnsupportedModel) as err:
        raise ConfigError(f"model.architecture: {err}") from None
    return model_cfg, None


def resolve_and_check_model(cfg: Config) -> tuple[ModelConfig, Optional[Checkpoint]]:
    """`resolve_model_config` plus the checks between run and architecture: everything that can
    be known before a process group, a model or a dataset is built."""
    model_cfg, ckpt = resolve_model_config(cfg)
    validate_model(cfg, model_cfg)
    warn_past_positions(cfg, model_cfg)
    return model_cfg, ckpt


def warn_past_positions(cfg: Config, model_cfg: ModelConfig) -> None:
    """Training windows longer than the model's positions are not refused (training there is how
    a context is extended), but with plain RoPE they are rarely meant: say so once, with the
    numbers (a scaled RoPE, model.rope_scaling, is made to reach past them)."""
    if model_cfg.rope_scaling is None and cfg.data.seq_len > model_cfg.max_position_embeddings:
        logger.warning(
            "data.seq_len=%d is longer than the model's %d positions (max_position_embeddings): positions %d..%d "
            "were never trained and start from RoPE extrapolation; lower data.seq_len unless this run extends the "
            "context", cfg.data.seq_len, model_cfg.max_position_embeddings, model_cfg.max_position_embeddings,
            cfg.data.seq_len - 1)


def build_model(cfg: Config, model_cfg: ModelConfig, ckpt: Optional[Checkpoint],
                info: ParallelInfo) -> BlockDiffusionLM:
    """This rank's model on its device: loaded from `ckpt`, or randomly initialised if None."""
    lps = cfg.parallel.layers_per_stage
    model = BlockDiffusionLM(model_cfg, info, layers_per_stage=lps, initialize=ckpt is None)
    model.set_attention_impl(cfg.model.attention_impl)
    model.set_recompute(cfg.train.recompute)
    if ckpt is not None:
        model.load_weights({k: v.float() for k, v in stage_shard(ckpt, info, lps).items()})
    if cfg.lora.enabled:  # after loading: the base weights keep their names and stay frozen
        apply_lora(model, cfg.lora, seed=cfg.train.seed)
    model.set_sequence_parallel(cfg.parallel.sequence_parallel)
    log_parameter_counts(model_cfg, cfg)
    return model.to(info.device)


def log_parameter_counts(model_cfg: ModelConfig, cfg: Config) -> None:
    trainable, total = parameter_count(model_cfg, cfg.lora)
    lora = cfg.lora
    what = (f"LoRA rank {lora.rank} on {', '.join(lora.target_modules) or 'no linears'}"
            f"{' + mask-token row' if lora.train_mask_token_row else ''}"
            f"{' + norms' if lora.train_norms else ''}") if lora.enabled else "full model"
    logger.info("trainable parameters: %s of %s (%.3f%%; %s)", f"{trainable:,}", f"{total:,}",
                100.0 * trainable / max(total, 1), what)


def eod_token_id(model_cfg: ModelConfig) -> int:
    return model_cfg.eos_token_id if model_cfg.eos_token_id is not None else 0


@dataclass
class HeldOutData:
    """Fixed held-out samples (from the validation split), noised at whatever block size training
    is at: the validation NELBO, and the samples a noise-schedule search scores."""

    windows: Union[TokenWindows, SFTWindows]
    sampler: DataParallelSampler
    settings: DiffusionSection
    mask_token_id: Optional[int]
    seed: int
    eod_token_id: Optional[int]

    def batches(self, block_size: int, settings: Optional[DiffusionSection] = None,
                seed: Optional[int] = None) -> list[DiffusionBatch]:
        """This rank's micro-batches, noised with `settings` and `seed` (default: its own)."""
        return [
            build_batch(**self.windows.batch_inputs(indices), sample_indices=indices, block_size=block_size,
                        settings=settings or self.settings, mask_token_id=self.mask_token_id,
                        seed=self.seed if seed is None else seed, eod_token_id=self.eod_token_id)
            for indices in self.sampler.micro_batches(0)
        ]


@dataclass
class RunData:
    train: StepBatcher
    validation: Optional[HeldOutData]
    """Validation NELBO batches (train.eval_interval > 0)."""
    search: Optional[HeldOutData]
    """Held-out batches of the noise-schedule search (diffusion.schedule = adaptive)."""


def build_data(cfg: Config, model_cfg: ModelConfig, info: ParallelInfo) -> RunData:
    """Training, validation (if eval is on) and schedule-search (if adaptive) batches of this rank;
    the last two come from the validation split, which training never consumes. The windows are
    token windows of preprocessed text, or packed conversations (data.format=sft); samplers,
    noise and curriculum are the same for both."""
    if cfg.data.prefix is None:
        raise ConfigError("data.prefix is not set; point it at PREFIX from tools/preprocess_data.py")
    masks = any(b > 1 for b in cfg.diffusion.block_sizes) or cfg.diffusion.attention == "full"
    check_vocabulary(cfg.data.prefix, model_cfg.vocab_size, model_cfg.mask_token_id, require_mask=masks)
    t = cfg.train
    adaptive = cfg.diffusion.schedule == "adaptive"
    eval_samples = t.eval_batches * t.micro_batch_size * info.dp if t.eval_interval else 0
    search_samples = cfg.diffusion.schedule_search_batches * t.global_batch_size if adaptive else 0
    held_out_use = None if not (eval_samples or search_samples) else (
        "train.eval_interval is set" if eval_samples else "diffusion.schedule=adaptive searches on held-out samples")
    windows = sft_windows if cfg.data.format == "sft" else text_windows
    train_windows, valid_windows = windows(cfg, model_cfg, max(eval_samples, search_samples), held_out_use)

    sampler = DataParallelSampler(t.global_batch_size, t.micro_batch_size, info.dp_rank, info.dp)
    common = dict(mask_token_id=model_cfg.mask_token_id, seed=t.seed, eod_token_id=eod_token_id(model_cfg))
    # An adaptive schedule trains with the clipped interval its searches choose (set by the trainer).
    train_settings = replace(cfg.diffusion, schedule="clipped") if adaptive else cfg.diffusion
    train = StepBatcher(train_windows, sampler, train_settings, **common)

    def held_out(samples: int, settings: DiffusionSection) -> HeldOutData:
        held_sampler = DataParallelSampler(samples, t.micro_batch_size, info.dp_rank, info.dp)
        return HeldOutData(valid_windows, held_sampler, settings, **common)

    # Evaluation NELBO: t ~ U[eps, 1], unweighted by training tricks (DESIGN.md).
    unbiased = replace(cfg.diffusion, schedule="linear", antithetic=False, complementary=False, loss_weighting="elbo")
    return RunData(
        train=train,
        validation=held_out(eval_samples, unbiased) if eval_samples else None,
        search=held_out(search_samples, train_settings) if search_samples else None,
    )


def text_windows(cfg: Config, model_cfg: ModelConfig, held_out_samples: int,
                 held_out_use: Optional[str]) -> tuple[TokenWindows, Optional[TokenWindows]]:
    """(train, validation or None) windows of preprocessed text (megablock.data.datasets)."""
    t = cfg.train
    train_ds, valid_ds, _ = build_gpt_datasets(
        cfg.data.prefix, seq_len=cfg.data.seq_len, vocab_size=model_cfg.vocab_size,
        eod_token_id=eod_token_id(model_cfg), train_samples=t.steps * t.global_batch_size,
        valid_samples=held_out_samples or None, split=cfg.data.split, seed=t.seed, cache_dir=cfg.data.cache_dir,
    )
    if held_out_use and valid_ds is None:
        raise ConfigError(f"{held_out_use} but data.split={cfg.data.split!r} leaves no validation split; give it a "
                          "validation share (e.g. data.split='98,2,0')")
    return TokenWindows(train_ds, cfg.data.seq_len), (TokenWindows(valid_ds, cfg.data.seq_len) if held_out_use else None)


def warn_long_prompts(windows: SFTWindows, seq_len: int) -> None:
    """Once, with the numbers: prompts of seq_len tokens or more leave prompt-only windows, which
    carry no loss and are dropped (wasted data), and their responses see a cut-off prompt."""
    if windows.long_prompts:
        logger.warning(
            "SFT data: %d of %d conversations have a prompt of >= data.seq_len=%d tokens (longest %d): their "
            "prompt-only windows are dropped (%d of %d packed windows kept) and their responses are trained with "
            "a cut-off prompt; raise data.seq_len or shorten the prompts", windows.long_prompts,
            windows.conversations, seq_len, windows.longest_prompt, len(windows), windows.windows_total)


def sft_windows(cfg: Config, model_cfg: ModelConfig, held_out_samples: int,
                held_out_use: Optional[str]) -> tuple[SFTWindows, Optional[SFTWindows]]:
    """(train, validation or None) packed conversation windows (megablock.data.sft) with response
    flags and conversation ids, for data.format=sft."""
    t, d = cfg.train, cfg.data
    split = split_fractions(d.split)
    try:
        train_windows = SFTWindows(d.prefix, d.seq_len, split, 0, seed=t.seed, shift=cfg.diffusion.shift)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.prefix={d.prefix!r} (data.format=sft): {err}") from None
    logger.info("SFT data: %d windows of %d tokens with response targets (of %d packed)",
                len(train_windows), d.seq_len, train_windows.windows_total)
    warn_long_prompts(train_windows, d.seq_len)
    if not held_out_use:
        return train_windows, None
    try:
        return train_windows, SFTWindows(d.prefix, d.seq_len, split, 1, seed=t.seed, shift=cfg.diffusion.shift)
    except ValueError as err:
        raise ConfigError(f"{held_out_use}, which needs the SFT validation split (data.split={d.split!r}): {err}") from None

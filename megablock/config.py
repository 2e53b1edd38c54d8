"""The run configuration: YAML mapped 1:1 onto dataclasses, `--set key=value` overrides,
validated at load time with messages that name the key and the fix.

Every field's docstring is the documentation of its YAML key. The DeepSpeed config is derived
from this one (`deepspeed_config`); a user's own DeepSpeed JSON may still be given.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from megablock.diffusion.layout import ATTENTION_MODES


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


@dataclass
class ModelSection:
    init_from: Optional[str] = None
    """A converted (tools/convert_hf.py) or training checkpoint to start from; its
    megablock.json gives the architecture. None trains from random init with `architecture`."""
    architecture: Optional[dict] = None
    """ModelConfig fields for training from scratch (arch, hidden_size, num_layers, ...);
    ignored when init_from is set."""
    attention_impl: str = "auto"
    """auto (FlexAttention on GPU, the exact SDPA path on CPU) | sdpa | flex | dense (reference)."""


@dataclass
class DataSection:
    prefix: Union[str, list, None] = None
    """Indexed dataset prefix (PREFIX.bin/.idx from tools/preprocess_data.py), or a weighted
    blend [w1, prefix1, w2, prefix2, ...]."""
    seq_len: int = 256
    """L: clean tokens per sample; divisible by every stage's block size."""
    split: str = "98,2,0"
    """Train/valid/test split of the documents, Megatron style."""
    cache_dir: Optional[str] = None
    """Where megatron-core caches its sample indices (default: beside the data)."""


@dataclass
class ParallelSection:
    tensor: int = 1
    """Tensor-parallel size (megatron-core); divides heads, KV heads and the MLP width."""
    pipeline: int = 1
    """Pipeline stages (DeepSpeed PipelineModule); at most the number of layers."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (at most 1 with pipeline parallelism)."""
    layers_per_stage: Optional[list] = None
    """Explicit layer counts per pipeline stage; None splits evenly."""


@dataclass
class TrainSection:
    micro_batch_size: int = 1
    """Samples per forward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step = micro_batch_size x accumulation x data-parallel size."""
    steps: int = 100
    """Optimizer steps in the whole run (across all curriculum stages)."""
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: str = "cosine"
    """Learning-rate decay after warmup: cosine | linear | constant."""
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16 (bf16/fp16 through DeepSpeed's mixed precision)."""
    seed: int = 1234
    max_nonfinite_steps: int = 3
    """Consecutive steps with a non-finite loss (each skipped) after which the run stops."""
    log_interval: int = 1
    eval_interval: int = 0
    """Validation NELBO every this many steps (0: never)."""
    eval_batches: int = 4
    """Validation micro-batches per data-parallel rank."""
    exit_after_steps: Optional[int] = None
    """Save a checkpoint and exit 0 after this many steps of this launch (Megatron's exit
    interval; for job schedulers with time limits and for testing resume)."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON to use instead of the derived one (batch sizes must still agree)."""


@dataclass
class DiffusionSection:
    attention: str = "context_causal"
    """context_causal (NBDiff) | block_causal (BD3-LM) | full (bidirectional, one half)."""
    stages: list = field(default_factory=lambda: [{"block_size": 1, "tokens": None}])
    """Block-size curriculum [{block_size, tokens}, ...]; a stage lasts `tokens` consumed
    tokens, the last may omit it."""
    schedule: str = "linear"
    """Mask-ratio schedule: linear | clipped | position."""
    eps: float = 1e-3
    """Lower bound of t for the linear schedule."""
    clip_min: float = 0.3
    clip_max: float = 0.8
    """t range of the clipped schedule (BD3-LM's beta, omega)."""
    antithetic: bool = False
    """Stratify t across the blocks of a sample (variance reduction)."""
    complementary: bool = False
    """Also train each sample with the inverted mask."""
    shift: bool = True
    """Token shift: output i predicts token i+1 (keeps the AR head's meaning)."""
    loss_weighting: str = "elbo"
    """elbo (w = 1/t, a NELBO) | uniform (w = 1)."""
    ar_loss_weight: float = 0.5
    """lambda in L = L_diff + lambda * L_AR."""
    document_masking: bool = False
    """No attention across end-of-document tokens inside a packed sample."""
    position_strength: float = 0.5
    """Tilt of the `position` schedule in [0, 1]: how much more often later block positions are
    masked at low mask ratios."""


@dataclass
class CheckpointSection:
    save_dir: Optional[str] = None
    """Where checkpoints, metrics.jsonl and TensorBoard events go."""
    interval: int = 0
    """Save every this many steps (0: only at the end)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints."""
    resume: bool = False
    """Continue from `latest` in save_dir."""
    overwrite: bool = False


@dataclass
class LoraSection:
    """Parameter-efficient adaptation: LoRA adapters on the tensor-parallel linears
    (megablock/model/lora.py). The pretrained weights stay frozen; checkpoints keep them in
    model/ and the adapters in lora/; tools/export_hf.py merges them (or --lora-separate)."""

    enabled: bool = False
    """Train LoRA adapters instead of the full model."""
    rank: int = 64
    """r: rank of each adapter (A: [r, in], B: [out, r])."""
    alpha: float = 128.0
    """Scaling numerator: the update is alpha / rank * B A (PEFT's convention)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (drawn from the global RNG, the same on every TP rank)."""
    target_modules: list = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    """Which linears get adapters: linear_qkv, linear_proj (attention), linear_fc1, linear_fc2 (MLP)."""
    train_mask_token_row: bool = True
    """Also train the mask token's input embedding (a separate [hidden] delta added to that row)."""
    train_norms: bool = False
    """Also train the RMSNorm weights."""


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    lora: LoraSection = field(default_factory=LoraSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.4)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(options)}"


def _check_type(key: str, value: Any, annotation) -> Any:
    origin = typing.get_origin(annotation)
    allowed = typing.get_args(annotation) if origin is Union else (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} may not be null")
    for t in allowed:
        base = typing.get_origin(t) or t
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):
            try:  # YAML 1.1 reads "3e-4" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key}={value!r} should be {names}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} should be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}{_closest(key, names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, dotted + ".")
        else:
            kwargs[key] = _check_type(dotted, value, hint)
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Read YAML (optional), apply `--set` overrides, build and validate the Config."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
    for assignment in overrides or []:
        apply_override(data, assignment)
    config = _build(Config, data, "")
    validate(config)
    return config


# ----------------------------------------------------------------------------- validation


def _one_of(key: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {list(options)}")


def validate(cfg: Config) -> None:
    """Checks that need nothing but the config; model-dependent checks run in `validate_model`."""
    from megablock.diffusion.curriculum import Curriculum

    d, t, p = cfg.diffusion, cfg.train, cfg.parallel
    _one_of("diffusion.attention", d.attention, [m for m in ATTENTION_MODES if m != "ar"])
    _one_of("diffusion.schedule", d.schedule, ["linear", "clipped", "position"])
    _one_of("diffusion.loss_weighting", d.loss_weighting, ["elbo", "uniform"])
    _one_of("train.decay", t.decay, ["cosine", "linear", "constant"])
    _one_of("train.precision", t.precision, ["fp32", "bf16", "fp16"])
    _one_of("model.attention_impl", cfg.model.attention_impl, ["auto", "sdpa", "flex", "dense"])
    _one_of("parallel.zero_stage", p.zero_stage, [0, 1, 2, 3])
    if not 0 < d.eps < 1:
        raise ConfigError(f"diffusion.eps={d.eps} must be in (0, 1)")
    if not 0 < d.clip_min < d.clip_max <= 1:
        raise ConfigError(
            f"diffusion.clip_min={d.clip_min}, clip_max={d.clip_max}: need 0 < clip_min < clip_max <= 1"
        )
    for key in ("tensor", "pipeline"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key} must be >= 1")
    if p.pipeline > 1 and p.zero_stage > 1:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} with parallel.pipeline={p.pipeline}: DeepSpeed "
            f"pipelines support ZeRO stage 0 or 1; set parallel.zero_stage=1"
        )
    for key in ("micro_batch_size", "global_batch_size", "steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    if cfg.data.seq_len < 2:
        raise ConfigError("data.seq_len must be >= 2")
    try:
        Curriculum(d.stages, cfg.data.seq_len)
    except ValueError as err:
        raise ConfigError(f"diffusion.stages: {err}") from None
    if d.attention == "block_causal" and d.ar_loss_weight and any(s.get("block_size", 1) > 1 for s in d.stages):
        # With block-causal attention a clean-half position sees the rest of its block, next token
        # included, so the AR loss would be solved by copying instead of predicting.
        raise ConfigError(
            f"diffusion.ar_loss_weight={d.ar_loss_weight} with diffusion.attention=block_causal: the clean "
            "half is not causal inside a block, so the AR loss would see its own targets; set "
            "diffusion.ar_loss_weight=0 (as BD3-LM trains) or use attention=context_causal"
        )
    _validate_lora(cfg.lora)


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _validate_lora(lora: LoraSection) -> None:
    if lora.rank < 1:
        raise ConfigError(f"lora.rank={lora.rank} must be >= 1")
    if lora.alpha <= 0:
        raise ConfigError(f"lora.alpha={lora.alpha} must be > 0")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout={lora.dropout} must be in [0, 1)")
    unknown = [m for m in lora.target_modules if m not in LORA_TARGETS]
    if unknown:
        raise ConfigError(f"lora.target_modules: {unknown} are not LoRA targets; choose from {list(LORA_TARGETS)}")
    if len(set(lora.target_modules)) != len(lora.target_modules):
        raise ConfigError(f"lora.target_modules={lora.target_modules} lists a module twice")
    if lora.enabled and not (lora.target_modules or lora.train_mask_token_row or lora.train_norms):
        raise ConfigError("lora.enabled with nothing to train: set lora.target_modules (e.g. [linear_qkv, linear_fc1])")


def validate_parallel_layout(cfg: Config, world_size: int) -> int:
    """Batch arithmetic for a launch of `world_size` ranks; returns gradient accumulation steps."""
    p, t = cfg.parallel, cfg.train
    if world_size % (p.tensor * p.pipeline):
        raise ConfigError(
            f"{world_size} processes cannot form parallel.tensor={p.tensor} x parallel.pipeline="
            f"{p.pipeline}; launch a multiple of {p.tensor * p.pipeline}"
        )
    dp = world_size // (p.tensor * p.pipeline)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
        )
    return t.global_batch_size // per_step


def validate_model(cfg: Config, model_cfg) -> None:
    """Checks between the run and the architecture (TP/PP divisibility, window, positions)."""
    try:
        model_cfg.check_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    except ValueError as err:
        raise ConfigError(f"parallel.tensor/pipeline: {err}") from None
    if model_cfg.sliding_window is not None and cfg.data.seq_len > model_cfg.sliding_window:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's sliding window "
            f"{model_cfg.sliding_window}; use data.seq_len <= {model_cfg.sliding_window}"
        )
    if model_cfg.mask_token_id is None and any(s["block_size"] > 1 for s in cfg.diffusion.stages):
        raise ConfigError(
            "the model has no mask token: convert it with tools/convert_hf.py without "
            "--no-mask-token (or with --mask-token TEXT)"
        )


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON this run implies (or the user's, checked against the batch sizes)."""
    accumulation = validate_parallel_layout(cfg, world_size)
    t = cfg.train
    if t.deepspeed_config:
        ds = json.loads(Path(t.deepspeed_config).read_text())
        ds.setdefault("train_batch_size", t.global_batch_size)
        ds.setdefault("train_micro_batch_size_per_gpu", t.micro_batch_size)
        if ds["train_batch_size"] != t.global_batch_size or ds["train_micro_batch_size_per_gpu"] != t.micro_batch_size:
            raise ConfigError(
                f"{t.deepspeed_config}: train_batch_size/train_micro_batch_size_per_gpu disagree "
                f"with train.global_batch_size/train.micro_batch_size; make them equal"
            )
        return ds
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # torch's AdamW (megablock.training.optim) instead of DeepSpeed's compiled optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds

"""The run configuration: YAML mapped 1:1 onto typed dataclasses, `--set key=value` overrides,
every value checked when the config is built, with messages that name the key and the fix.

These sections are the single source of every setting: the batch builder, the noise, the
curriculum, LoRA and the trainer read them directly, so a field exists exactly once. Each
enumeration is a `Literal` below and every option list in the package derives from it
(`options(Attention)`); the decoding ones (DecodeMode, NextDraft) are in
megablock.diffusion.block_rules, which the exported folder carries and which imports torch only.
Validation sits next to the fields (each section's `check`), and
`Config.check` holds what spans sections; a config that exists is a valid one.

The DeepSpeed config is derived from this one (`deepspeed_config`); a user's own DeepSpeed JSON
may still be given.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

Attention = Literal["context_causal", "block_causal", "full"]
"""context_causal (NBDiff) | block_causal (BD3-LM) | full (bidirectional, xt only)."""
Schedule = Literal["linear", "clipped", "position", "adaptive"]
"""adaptive: clipped, with the interval chosen during training (megablock.training.schedule_search)."""
LossWeighting = Literal["elbo", "uniform"]
Decay = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
AttentionImpl = Literal["auto", "sdpa", "flex", "dense"]
ZeroStage = Literal[0, 1, 2, 3]
LoraTarget = Literal["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
Recompute = Literal["none", "selective", "full"]
"""Activation recompute: none | selective (the attention core) | full (each decoder layer)."""
LoraScope = Literal["all", "noised"]
"""Where LoRA deltas apply: all positions | the noised half only (a drafter over the frozen base)."""
CleanPass = Literal["cached", "joint"]
"""lora.scope=noised: how a step treats the frozen clean half (megablock.training.engine)."""
DataFormat = Literal["pretrain", "sft"]
"""pretrain (raw text, every token a target) | sft (prompt/response data with response flags)."""
ContextImpl = Literal["ring", "allgather"]
"""Context-parallel attention: K/V chunks passed around the ring | all-gathered (the reference)."""
WeightDtype = Literal["fp32", "bf16"]
"""dtypes of checkpoint shards, exports and inference weights."""


def options(kind) -> tuple:
    """The values of a Literal type, e.g. options(Schedule) == ("linear", "clipped", "position")."""
    return typing.get_args(kind)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


class Section:
    """Base of the config dataclasses: checks Literal fields on construction, then `check()`."""

    key: ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_literal(f"{self.key}{f.name}", getattr(self, f.name), _hints(type(self))[f.name])
        self.check()

    def check(self) -> None:
        """Range and consistency checks of this section's fields (ConfigError naming the key)."""

    def _require(self, ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{self.key}{name}={getattr(self, name)!r}: {why}")


def _check_literal(key: str, value: Any, hint) -> None:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union:  # Optional[Literal[...]]
        if value is None:
            return
        hint = next((a for a in args if typing.get_origin(a) is Literal), None)
    elif typing.get_origin(hint) is list and args and typing.get_origin(args[0]) is Literal:
        for item in value:
            _check_literal(key, item, args[0])
        return
    if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
        raise ConfigError(f"{key}={value!r} is not one of {list(typing.get_args(hint))}")


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelSection(Section):
    key: ClassVar[str] = "model."
    init_from: Optional[str] = None
    """A converted (tools/convert_hf.py) or training checkpoint to start from; its
    megablock.json gives the architecture. None trains from random init with `architecture`."""
    architecture: Optional[dict] = None
    """ModelConfig fields for training from scratch (arch, hidden_size, num_layers, ...);
    ignored when init_from is set."""
    attention_impl: AttentionImpl = "auto"
    """auto (FlexAttention on GPU, the exact SDPA path on CPU) | sdpa | flex | dense (reference)."""


def split_fractions(split: str) -> tuple[float, float, float]:
    """Megatron's "train,valid,test" weights as fractions summing to 1."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise ConfigError(f"data.split={split!r} must be three non-negative weights 'train,valid,test', e.g. '98,2,0'")
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


@dataclass
class DataSection(Section):
    key: ClassVar[str] = "data."
    prefix: Union[str, list, None] = None
    """Indexed dataset prefix (PREFIX.bin/.idx from tools/preprocess_data.py), or a weighted
    blend [w1, prefix1, w2, prefix2, ...]."""
    seq_len: int = 256
    """L: clean tokens per sample; divisible by every stage's block size."""
    split: str = "98,2,0"
    """Train/valid/test split of the documents, Megatron style."""
    cache_dir: Optional[str] = None
    """Where megatron-core caches its sample indices (default: beside the data)."""
    format: DataFormat = "pretrain"
    """pretrain: raw text, every token noised and scored. sft: datasets written by
    tools/preprocess_data.py --format sft (prompt/response or chat messages, with a companion
    PREFIX.flags dataset): prompt tokens are never masked and carry no loss, conversations are
    packed into seq_len with document masking, windows without a response token are skipped."""

    def check(self) -> None:
        self._require(self.seq_len >= 2, "seq_len", "must be >= 2")
        split_fractions(self.split)
        if self.format == "sft" and isinstance(self.prefix, list) and any(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in self.prefix):
            raise ConfigError(f"data.prefix={self.prefix!r} with data.format=sft: weighted blends are not supported "
                              "for SFT data; give one prefix or a list of prefixes (their conversations are concatenated)")


@dataclass
class ParallelSection(Section):
    key: ClassVar[str] = "parallel."
    tensor: int = 1
    """Tensor-parallel size (megatron-core); divides heads, KV heads and the MLP width."""
    pipeline: int = 1
    """Pipeline stages (DeepSpeed PipelineModule); at most the number of layers."""
    zero_stage: ZeroStage = 0
    """DeepSpeed ZeRO stage 0-3 (at most 1 with pipeline parallelism)."""
    layers_per_stage: Optional[list] = None
    """Explicit layer counts per pipeline stage; None splits evenly."""
    sequence_parallel: bool = False
    """Megatron-style sequence parallelism with TP > 1: norms and residuals sharded along the
    sequence, all-gather / reduce-scatter around the parallel linears (megablock.parallel.sequence)."""
    context: int = 1
    """Context-parallel size c: each sample's sequence is split over c ranks, which share weights and
    see the same samples (megablock.diffusion.context); gradients are reduced over data x context."""
    context_impl: ContextImpl = "ring"
    """How attention reads the other ranks' keys: ring (point-to-point, O(2L / c) K/V per rank) |
    allgather (all K/V on every rank; the reference)."""

    def check(self) -> None:
        self._require(self.tensor >= 1, "tensor", "must be >= 1")
        self._require(self.context >= 1, "context", "must be >= 1")
        if self.context > 1 and self.pipeline > 1:
            raise ConfigError(f"parallel.context={self.context} with parallel.pipeline={self.pipeline}: context "
                              "parallelism is not implemented for pipelines; set parallel.pipeline=1")
        if self.context > 1 and self.sequence_parallel:
            raise ConfigError(f"parallel.context={self.context} with parallel.sequence_parallel: the two are not "
                              "implemented together; set parallel.sequence_parallel=false")
        self._require(not self.sequence_parallel or self.tensor > 1, "sequence_parallel",
                      "shards the sequence over the tensor-parallel ranks, so it needs parallel.tensor > 1")
        self._require(self.pipeline >= 1, "pipeline", "must be >= 1")
        if self.pipeline > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} with parallel.pipeline={self.pipeline}: DeepSpeed "
                f"pipelines support ZeRO stage 0 or 1; set parallel.zero_stage=1"
            )
        if self.layers_per_stage is not None:
            counts = self.layers_per_stage
            self._require(
                len(counts) == self.pipeline and all(isinstance(n, int) and n >= 1 for n in counts),
                "layers_per_stage", f"must list {self.pipeline} positive layer counts (one per pipeline stage)",
            )


@dataclass
class TrainSection(Section):
    key: ClassVar[str] = "train."
    micro_batch_size: int = 1
    """Samples per forward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step = micro_batch_size x accumulation x data-parallel size."""
    steps: int = 100
    """Optimizer steps in the whole run (across all curriculum stages)."""
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: Decay = "cosine"
    """Learning-rate decay after warmup: cosine | linear | constant."""
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    precision: Precision = "fp32"
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
    recompute: Recompute = "none"
    """Activation recompute in backward: none | selective (the attention core: softmax
    probabilities and score workspaces are not kept; Megatron's "selective") | full (each
    decoder layer keeps only its input and reruns its forward in backward)."""
    loss_chunk_tokens: int = 8192
    """The head + cross-entropy run over at most this many loss positions at a time (each chunk
    recomputed in backward), so the [tokens, vocab / TP] logits never exist for all positions at
    once; 0 runs them in one piece."""
    drop_unmasked_blocks: bool = True
    """Leave out of the forward the noised blocks in which nothing is masked: they carry no loss
    and no other position attends to them (about 1 in B of the noised blocks), so loss and
    gradients are unchanged (megablock.diffusion.batch.drop_unmasked_blocks). Pipeline-parallel
    runs carry the full sequence (their stages exchange fixed shapes), and so do context-parallel
    runs (their zigzag shards keep fixed lengths)."""

    def check(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "steps", "max_nonfinite_steps",
                     "log_interval", "eval_batches"):
            self._require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("warmup_steps", "eval_interval", "weight_decay", "grad_clip", "min_lr", "loss_chunk_tokens"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        self._require(self.lr > 0, "lr", "must be > 0 (the peak learning rate)")
        self._require(self.min_lr <= self.lr, "min_lr", f"must be <= train.lr={self.lr}")
        self._require(self.adam_eps > 0, "adam_eps", "must be > 0")
        self._require(
            len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
            "betas", "must be two numbers in [0, 1), e.g. [0.9, 0.95]",
        )
        self._require(self.exit_after_steps is None or self.exit_after_steps >= 1, "exit_after_steps",
                      "must be >= 1 (or null)")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


@dataclass(frozen=True)
class Stage(Section):
    """One block-size curriculum stage: `block_size` for `tokens` consumed (clean) tokens."""

    key: ClassVar[str] = "diffusion.stages[]."
    block_size: int = 1
    """Tokens per diffusion block (1 = plain AR with token shift)."""
    tokens: Optional[int] = None
    """Consumed tokens this stage lasts; None only for the last stage (= forever)."""


def _whole(x: Any) -> Any:
    """YAML reads 1.0e6 as a float: accept whole-number floats as ints."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def parse_stages(stages: Any) -> list[Stage]:
    """`diffusion.stages` as typed stages, from YAML mappings (or Stage objects)."""
    if not isinstance(stages, list):
        raise ConfigError(f"diffusion.stages={stages!r} should be a list of {{block_size: B, tokens: N}}")
    out = []
    for i, s in enumerate(stages):
        if isinstance(s, Stage):
            s = dataclasses.asdict(s)
        if not isinstance(s, dict):
            raise ConfigError(f"diffusion.stages[{i}] = {s!r} is not a {{block_size, tokens}} mapping")
        unknown = set(s) - {"block_size", "tokens"}
        if unknown:
            raise ConfigError(f"diffusion.stages[{i}] has unknown keys {sorted(unknown)}; each stage is {{block_size: B, tokens: N}}")
        if "block_size" not in s:
            raise ConfigError(f"diffusion.stages[{i}] has no block_size; write {{block_size: B, tokens: N}}")
        out.append(Stage(_whole(s["block_size"]), _whole(s.get("tokens"))))
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_stages(stages: list[Stage], seq_len: Optional[int] = None) -> None:
    """Reject a curriculum that cannot run, naming the stage and the fix."""
    if not stages:
        raise ConfigError("diffusion.stages is empty; give at least one stage, e.g. [{block_size: 1, tokens: "
                          "1000000}, {block_size: 4}]")
    for i, s in enumerate(stages):
        if not _is_int(s.block_size) or s.block_size < 1:
            raise ConfigError(f"diffusion.stages[{i}]: block_size {s.block_size!r} must be a positive integer")
        if seq_len is not None and seq_len % s.block_size:
            divisors = [d for d in range(1, min(seq_len, 64) + 1) if seq_len % d == 0]
            raise ConfigError(
                f"diffusion.stages[{i}]: block_size {s.block_size} does not divide data.seq_len {seq_len}; "
                f"use a divisor of {seq_len} (e.g. {divisors}) or change data.seq_len"
            )
        if s.tokens is None and i != len(stages) - 1:
            raise ConfigError(f"diffusion.stages[{i}] (block_size {s.block_size}) has no tokens; only the last "
                              "stage may omit tokens (it then runs forever)")
        if s.tokens is not None and (not _is_int(s.tokens) or s.tokens <= 0):
            raise ConfigError(f"diffusion.stages[{i}] (block_size {s.block_size}): tokens {s.tokens!r} must be a "
                              "positive integer number of consumed tokens (or omitted on the last stage)")


@dataclass
class DiffusionSection(Section):
    """Noising and objective settings; the batch builder and the noise read them as they are."""

    key: ClassVar[str] = "diffusion."
    attention: Attention = "context_causal"
    """context_causal (NBDiff) | block_causal (BD3-LM) | full (bidirectional, one half)."""
    stages: list[Stage] = field(default_factory=lambda: [Stage(1)])
    """Block-size curriculum [{block_size, tokens}, ...]; a stage lasts `tokens` consumed
    tokens, the last may omit it."""
    schedule: Schedule = "linear"
    """Mask-ratio schedule: linear | clipped | position | adaptive (BD3-LM's data-driven clipped
    interval: searched at the start of each block-size stage and every schedule_search_interval steps)."""
    eps: float = 1e-3
    """Lower bound of t for the linear and position schedules; also floors complement
    probabilities in the loss weights."""
    clip_min: float = 0.3
    clip_max: float = 0.8
    """t range of the clipped schedule (BD3-LM's beta, omega)."""
    antithetic: bool = False
    """Stratify t across the blocks of a sample (variance reduction)."""
    complementary: bool = False
    """Also train each sample with the inverted mask."""
    shift: bool = True
    """Token shift: output i predicts token i+1 (keeps the AR head's meaning)."""
    loss_weighting: LossWeighting = "elbo"
    """elbo (w = 1/t, a NELBO) | uniform (w = 1)."""
    ar_loss_weight: float = 0.5
    """lambda in L = L_diff + lambda * L_AR."""
    document_masking: bool = False
    """No attention across end-of-document tokens inside a packed sample."""
    position_strength: float = 0.5
    """Tilt of the `position` schedule in [0, 1]: how much more often later block positions are
    masked at low mask ratios (<= 1 keeps every probability <= 1)."""
    schedule_search_interval: int = 0
    """adaptive: search the interval again every this many steps (0: only when a stage starts)."""
    schedule_search_widths: list = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    """adaptive: interval widths omega - beta of the grid (BD3-LM's clip-search widths, plus the full range)."""
    schedule_search_step: float = 0.1
    """adaptive: spacing of the grid's interval starts beta = 0, step, 2 step, ... (beta = 0 means eps)."""
    schedule_search_batches: int = 1
    """adaptive: held-out global batches (train.global_batch_size samples each, from the validation
    split) a search scores; split over data-parallel ranks like a training step, so every layout
    scores the same samples."""
    schedule_search_draws: int = 4
    """adaptive: noise draws per held-out sample; the variance is across these draws."""
    first_slot_mask_prob: float = 0.0
    """With token shift, the probability that a noised block's first slot is also hidden (a mask
    token in the input; still not a target: the clean half predicts it). It trains the layout of
    one-forward-per-block speculative decoding (`--next-draft masked`), where the next block is
    drafted before its first token is known. Drawn per (sample, block) from a stream of its own,
    so 0 (default) leaves every batch exactly as without the option."""
    confidence_loss_weight: float = 0.0
    """gamma in L = L_diff + lambda * L_AR + gamma * L_conf: L_conf is the mean entropy of the
    noised half's predictions at target positions the model already predicts correctly (argmax
    = target), as in dParallel's certainty forcing and LLaDA2's CAP; it sharpens the
    distributions that parallel decoding commits by threshold. 0 (default) leaves the objective
    and its computation exactly as without the term."""
    distill_weight: float = 0.0
    """delta in L = L_diff + lambda * L_AR + gamma * L_conf + delta * L_KL: L_KL is the mean, over
    the scored noised slots, of KL(p || q) between the clean half's distribution p for the same
    target token (computed in the same step, gradient stopped) and the slot's draft distribution q
    (megablock.diffusion.loss.distill_loss says why this direction). 0 (default) leaves the
    objective and its computation exactly as without the term."""
    distill_temperature: float = 1.0
    """T of the distillation term: p and q are softmax(logits / T), and the KL is scaled by T^2."""

    def check(self) -> None:
        self.stages = parse_stages(self.stages)
        check_stages(self.stages)
        self._require(0 < self.eps < 1, "eps", "must be in (0, 1) (it bounds 1/t)")
        if not 0 < self.clip_min <= self.clip_max <= 1:
            raise ConfigError(
                f"diffusion.clip_min={self.clip_min}, clip_max={self.clip_max}: need 0 < clip_min <= clip_max <= 1 "
                "(BD3-LM uses clip_min=0.3, clip_max=0.8)"
            )
        self._require(0 <= self.position_strength <= 1, "position_strength", "must be in [0, 1] (keeps p <= 1)")
        self._require(self.schedule_search_interval >= 0, "schedule_search_interval", "must be >= 0")
        self._require(bool(self.schedule_search_widths) and all(
            isinstance(w, (int, float)) and 0 < w <= 1 for w in self.schedule_search_widths),
            "schedule_search_widths", "must list widths in (0, 1], e.g. [0.5, 0.7, 0.9, 1.0]")
        self._require(0 < self.schedule_search_step <= 1, "schedule_search_step", "must be in (0, 1]")
        self._require(self.schedule_search_batches >= 1, "schedule_search_batches", "must be >= 1")
        self._require(self.schedule_search_draws >= 2, "schedule_search_draws",
                      "must be >= 2 (a variance across draws needs two)")
        self._require(self.ar_loss_weight >= 0, "ar_loss_weight", "must be >= 0")
        self._require(self.confidence_loss_weight >= 0, "confidence_loss_weight", "must be >= 0 (0 disables it)")
        self._require(0 <= self.first_slot_mask_prob <= 1, "first_slot_mask_prob", "must be in [0, 1]")
        self._require(self.distill_weight >= 0 and math.isfinite(self.distill_weight), "distill_weight",
                      "must be a finite number >= 0 (0 disables it)")
        self._require(0 < self.distill_temperature < math.inf, "distill_temperature", "must be > 0 and finite")
        if self.distill_weight and (not self.shift or self.attention != "context_causal"):
            raise ConfigError(
                f"diffusion.distill_weight={self.distill_weight} needs diffusion.shift=true and "
                "diffusion.attention=context_causal: only then is the clean half the AR model whose distribution "
                "for a slot's target token is the teacher; set distill_weight=0"
            )
        if self.first_slot_mask_prob and (not self.shift or self.attention == "full"):
            raise ConfigError(
                f"diffusion.first_slot_mask_prob={self.first_slot_mask_prob} needs token shift and a two-half "
                "attention (context_causal or block_causal): without them a block's first slot is an ordinary "
                "maskable position; set it to 0"
            )
        if self.attention == "block_causal" and self.ar_loss_weight and any(s.block_size > 1 for s in self.stages):
            # With block-causal attention a clean-half position sees the rest of its block, next token
            # included, so the AR loss would be solved by copying instead of predicting.
            raise ConfigError(
                f"diffusion.ar_loss_weight={self.ar_loss_weight} with diffusion.attention=block_causal: the clean "
                "half is not causal inside a block, so the AR loss would see its own targets; set "
                "diffusion.ar_loss_weight=0 (as BD3-LM trains) or use attention=context_causal"
            )

    @property
    def block_sizes(self) -> list[int]:
        return [s.block_size for s in self.stages]


@dataclass
class CheckpointSection(Section):
    key: ClassVar[str] = "checkpoint."
    save_dir: Optional[str] = None
    """Where checkpoints, metrics.jsonl and TensorBoard events go."""
    interval: int = 0
    """Save every this many steps (0: only at the end)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints."""
    resume: bool = False
    """Continue from `latest` in save_dir."""
    overwrite: bool = False

    def check(self) -> None:
        self._require(self.interval >= 0, "interval", "must be >= 0 (0 saves only at the end)")
        self._require(self.keep_last >= 1, "keep_last", "must be >= 1")


@dataclass
class LoraSection(Section):
    """Parameter-efficient adaptation: LoRA adapters on the tensor-parallel linears
    (megablock/model/lora.py). The pretrained weights stay frozen; checkpoints keep them in
    model/ and the adapters in lora/ (megablock/checkpoint/adapters.py); tools/export_hf.py
    merges them (or --lora-separate)."""

    key: ClassVar[str] = "lora."
    enabled: bool = False
    """Train LoRA adapters instead of the full model."""
    rank: int = 64
    """r: rank of each adapter (A: [r, in], B: [out, r])."""
    alpha: float = 128.0
    """Scaling numerator: the update is alpha / rank * B A (PEFT's convention)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (drawn from the global RNG, the same on every TP rank)."""
    target_modules: list[LoraTarget] = field(default_factory=lambda: list(options(LoraTarget)))
    """Which linears get adapters: linear_qkv, linear_proj (attention), linear_fc1, linear_fc2 (MLP)."""
    train_mask_token_row: bool = True
    """Also train the mask token's input embedding (a separate [hidden] delta added to that row)."""
    train_norms: bool = False
    """Also train the RMSNorm weights."""
    scope: LoraScope = "all"
    """all: the adapters apply at every position (an adapted model). noised: every adapter delta
    (and the mask-row delta) applies only at positions of the noised half, so the clean half,
    and with it the AR model that verifies speculative drafts, is exactly the frozen base: the
    adapters form a drafter, and decoding with them stays lossless against the base model."""
    clean_pass: CleanPass = "cached"
    """scope=noised: cached (pp = 1) runs the clean half once without autograd, keeping each
    layer's K/V, then the noised half with autograd attending to them; the same loss and adapter
    gradients as joint, the one [xt ; x0] forward (what pipeline parallelism runs)."""

    def check(self) -> None:
        self._require(self.rank >= 1, "rank", "must be >= 1")
        self._require(self.alpha > 0, "alpha", "must be > 0")
        self._require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        self._require(len(set(self.target_modules)) == len(self.target_modules), "target_modules",
                      "lists a module twice")
        if self.enabled and not (self.target_modules or self.train_mask_token_row or self.train_norms):
            raise ConfigError("lora.enabled with nothing to train: set lora.target_modules (e.g. [linear_qkv, linear_fc1])")
        if self.scope == "noised" and self.train_norms:
            raise ConfigError("lora.train_norms with lora.scope=noised: a trained norm would change the clean "
                              "half too, which must stay the frozen base; set lora.train_norms=false")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_saved(cls, saved: dict) -> "LoraSection":
        """The settings recorded in a checkpoint's megablock.json["lora"] (extra keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names}, enabled=True)


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    lora: LoraSection = field(default_factory=LoraSection)

    def __post_init__(self):
        # What spans sections; each section checked its own fields when it was built.
        check_stages(self.diffusion.stages, self.data.seq_len)
        if self.parallel.sequence_parallel:
            if self.data.seq_len % self.parallel.tensor:
                raise ConfigError(
                    f"parallel.sequence_parallel with data.seq_len={self.data.seq_len}: the sequence is split over "
                    f"parallel.tensor={self.parallel.tensor} ranks, so seq_len must be a multiple of it"
                )
            if self.lora.enabled:
                raise ConfigError(
                    "parallel.sequence_parallel with lora.enabled: sequence parallelism is not implemented for "
                    "LoRA adapters; set one of them to false"
                )
        if self.lora.scope == "noised":
            self._check_gated()
        if self.parallel.context > 1:
            self._check_context()

    def _check_context(self) -> None:
        """parallel.context > 1: every stage's sequence splits into 2c chunks of whole blocks."""
        c, L = self.parallel.context, self.data.seq_len
        if self.diffusion.attention == "full":
            raise ConfigError(f"diffusion.attention=full with parallel.context={c}: context parallelism is "
                              "implemented for context_causal and block_causal; choose one of them")
        for B in self.diffusion.block_sizes:
            if L % (2 * c * B):
                raise ConfigError(
                    f"parallel.context={c} with data.seq_len={L} and block size {B}: each half of the sequence is "
                    f"split into 2 x {c} chunks of whole blocks, so data.seq_len must be a multiple of "
                    f"2 x parallel.context x block size = {2 * c * B}")
        refused = [("lora.enabled", self.lora.enabled, "set lora.enabled=false"),
                   ("diffusion.confidence_loss_weight", self.diffusion.confidence_loss_weight,
                    "set diffusion.confidence_loss_weight=0"),
                   ("diffusion.distill_weight", self.diffusion.distill_weight, "set diffusion.distill_weight=0")]
        for key, value, fix in refused:
            if value:
                raise ConfigError(f"{key}={value!r} with parallel.context={c}: not implemented with context "
                                  f"parallelism; {fix}")

    def _check_gated(self) -> None:
        """lora.scope=noised: the clean half is the frozen base, so what would train it is refused."""
        lora, diff = self.lora, self.diffusion
        if not lora.enabled:
            raise ConfigError("lora.scope=noised needs lora.enabled=true (it says where the adapters apply)")
        if diff.attention not in ("context_causal", "block_causal"):
            raise ConfigError(f"lora.scope=noised with diffusion.attention={diff.attention}: the scope needs a "
                              "noised and a clean half; use context_causal (or block_causal)")
        if diff.ar_loss_weight:
            raise ConfigError(f"diffusion.ar_loss_weight={diff.ar_loss_weight} with lora.scope=noised: the AR loss "
                              "reads the clean half, which is the frozen base here, so it has nothing to train; "
                              "set diffusion.ar_loss_weight=0")
        if 1 in diff.block_sizes:
            raise ConfigError(f"lora.scope=noised with a block-size-1 stage (diffusion.stages block sizes "
                              f"{diff.block_sizes}): at B = 1 nothing is masked and the adapters never run; "
                              "start the stages at block size >= 2")
        if lora.clean_pass == "cached" and diff.attention != "context_causal":
            raise ConfigError("lora.clean_pass=cached needs diffusion.attention=context_causal (the clean half "
                              "as a causal pass); set lora.clean_pass=joint for block_causal")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        return _build(cls, data, "")


# ----------------------------------------------------------------------------- loading


def _closest(name: str, options_) -> str:
    match = difflib.get_close_matches(name, list(options_), n=1, cutoff=0.4)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(options_)}"


def _finite(key: str, value: float) -> float:
    """No setting is meaningful at inf or nan, and range checks pass them (.inf > 0; nan compares
    false both ways): train.lr=.inf used to validate."""
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    return value


def _check_type(key: str, value: Any, annotation) -> Any:
    origin = typing.get_origin(annotation)
    allowed = typing.get_args(annotation) if origin is Union else (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} may not be null")
    for t in allowed:
        base = typing.get_origin(t) or t
        if base is Literal:
            return value  # membership is the section's check (with the list of options)
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(key, float(value))
        if base is float and isinstance(value, str):
            try:  # YAML 1.1 reads "3e-4" (no dot) as a string
                number = float(value)
            except ValueError:
                pass
            else:
                return _finite(key, number)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key}={value!r} should be {names}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} should be a mapping, got {data!r}")
    hints = _hints(cls)
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
    try:
        node[parts[-1]] = yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({_yaml_problem(e)}); quote it") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping: PyYAML keeps the last one
    silently, so a second `train:` section dropped every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"the key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    f"only the last would count: merge them", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    return str(getattr(e, "problem", None) or e).strip().splitlines()[0]


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Read YAML (optional), apply `--set` overrides, build (and so validate) the Config."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                              f"UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {path}{where} is not valid YAML ({_yaml_problem(e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} should be a mapping of sections (model:, data:, train:, ...), "
                              f"got a {type(data).__name__}: write `section:` lines with `key: value` under them")
    for assignment in overrides or []:
        apply_override(data, assignment)
    return Config.from_dict(data)


# ----------------------------------------------------------------------------- layout checks


def validate_parallel_layout(cfg: Config, world_size: int) -> int:
    """Batch arithmetic for a launch of `world_size` ranks; returns gradient accumulation steps."""
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise ConfigError(
            f"{world_size} processes cannot form parallel.tensor={p.tensor} x parallel.pipeline="
            f"{p.pipeline} x parallel.context={p.context}; launch a multiple of {model_parallel}"
        )
    dp = world_size // model_parallel  # context ranks see the same samples
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
        )
    return t.global_batch_size // per_step


def validate_model(cfg: Config, model_cfg) -> None:
    """Checks between the run and the architecture (a megablock.model.ModelConfig): TP/PP
    divisibility, sliding window, mask token."""
    try:
        model_cfg.check_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    except ValueError as err:
        raise ConfigError(f"parallel.tensor/pipeline: {err}") from None
    if model_cfg.sliding_window is not None and cfg.data.seq_len > model_cfg.sliding_window:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's sliding window "
            f"{model_cfg.sliding_window}; use data.seq_len <= {model_cfg.sliding_window}"
        )
    if model_cfg.mask_token_id is None and any(b > 1 for b in cfg.diffusion.block_sizes):
        raise ConfigError(
            "the model has no mask token: convert it with tools/convert_hf.py without "
            "--no-mask-token (or with --mask-token TEXT)"
        )


# DeepSpeed's pipeline splits each tensor it sends between stages over the TP ranks and caches
# the split sizes; a curriculum changes the sequence length (S = L at block size 1, 2L after),
# and the cached sizes then break the all-gather (TP x PP runs failed at the first stage change).
# Stages send whole tensors instead; with sequence parallelism they are already 1 / t shards.
PIPELINE_TRANSFERS = {"pipe_partitioned": False, "grad_partitioned": False}


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON this run implies (or the user's, checked against the batch sizes)."""
    accumulation = validate_parallel_layout(cfg, world_size)
    t = cfg.train
    if t.deepspeed_config:
        try:
            ds = json.loads(Path(t.deepspeed_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"train.deepspeed_config={t.deepspeed_config!r} cannot be read as JSON ({e})") from None
        ds.setdefault("train_batch_size", t.global_batch_size)
        ds.setdefault("train_micro_batch_size_per_gpu", t.micro_batch_size)
        if ds["train_batch_size"] != t.global_batch_size or ds["train_micro_batch_size_per_gpu"] != t.micro_batch_size:
            raise ConfigError(
                f"{t.deepspeed_config}: train_batch_size/train_micro_batch_size_per_gpu disagree "
                f"with train.global_batch_size/train.micro_batch_size; make them equal"
            )
        for key, value in PIPELINE_TRANSFERS.items():
            ds.setdefault("pipeline", {}).setdefault(key, value)
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
        "pipeline": PIPELINE_TRANSFERS,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds

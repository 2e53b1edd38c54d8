"""The sharded megablock checkpoint format: metadata, per-rank safetensors shards, resharding.

Layout of a checkpoint folder CKPT:
    CKPT/megablock.json                       metadata (`CheckpointMeta`)
    CKPT/model/tp{TT:02d}_pp{PPP:03d}.safetensors   one shard per TP x PP rank, global layer names
    CKPT/tokenizer/                           HF tokenizer (with the mask token)
Training checkpoints use the same layout in SAVE/step_XXXX/, and SAVE/latest names the newest.

Any saved TP x PP loads at any other TP x PP through the full (unsharded) state dict:
`load_full_state_dict` merges, `shard_state_dict` splits; the per-parameter sharding rules are the
mapping kinds of the model's family (megablock/checkpoint/mappings), so they exist once.

Shards are written by `SafetensorsWriter`, which streams one tensor at a time into a standard
safetensors file (header first, shapes planned in advance): writers never hold a whole shard.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Optional

import torch
from safetensors import safe_open

from megablock.config import Attention, ConfigError, LoraSection, Section, WeightDtype, options
from megablock.model.config import ModelConfig, stage_layer_ranges

from .mappings import UnsupportedModel, get_family

FORMAT_VERSION = 1
METADATA_FILE = "megablock.json"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
LATEST_FILE = "latest"
LORA_DIR = "lora"
DTYPES = dict(zip(options(WeightDtype), (torch.float32, torch.bfloat16)))
_REQUIRED = ("format_version", "model", "tp", "pp", "layers_per_stage", "vocab_size", "padded_vocab_size", "dtype")
_ST_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or corrupt; the message says which and what to do."""


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# --- metadata ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointMeta(Section):
    """The contents of megablock.json, typed. Every default lives here: a file of an older
    megablock that lacks a field reads as that default (tests/fixtures/megablock_json_v1_*)."""

    key: ClassVar[str] = "megablock.json "

    model: ModelConfig
    tp: int = 1
    pp: int = 1
    layers_per_stage: Optional[tuple] = None
    """Layers of each pipeline stage; None is the even split, resolved on construction."""
    dtype: WeightDtype = "fp32"
    source: str = "random init"
    block_size: int = 1
    """The block size the weights were trained (or converted) at."""
    step: int = 0
    curriculum_stage: int = 0
    shift: bool = True
    attention: Attention = "context_causal"
    generation_config: Optional[dict] = None
    """The HF generation_config.json of the source model, kept for export."""
    lora: Optional[LoraSection] = None
    """The LoRA settings of a checkpoint with adapters in CKPT/lora/ (None: no adapters)."""
    trainable_parameters: Optional[int] = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        ranges = stage_layer_ranges(self.model.num_layers, self.pp, self.layers_per_stage)
        object.__setattr__(self, "layers_per_stage", tuple(len(r) for r in ranges))
        super().__post_init__()  # the Literal fields (dtype, attention)

    @property
    def mask_token_id(self) -> Optional[int]:
        return self.model.mask_token_id

    @property
    def padded_vocab_size(self) -> int:
        return self.model.padded_vocab_size(self.tp)

    @property
    def gated(self) -> bool:
        """The adapters are a gated drafter (lora.scope=noised): applied at draft positions only."""
        return self.lora is not None and self.lora.scope == "noised"

    def to_dict(self) -> dict:
        """The megablock.json object (vocab sizes and the mask id repeated at the top for readers
        that do not parse the model config)."""
        out = {
            "format_version": self.format_version, "model": self.model.to_dict(), "tp": self.tp, "pp": self.pp,
            "layers_per_stage": list(self.layers_per_stage), "vocab_size": self.model.vocab_size,
            "padded_vocab_size": self.padded_vocab_size, "mask_token_id": self.mask_token_id,
            "block_size": self.block_size, "step": self.step, "dtype": self.dtype, "source": self.source,
            "curriculum_stage": self.curriculum_stage, "shift": self.shift, "attention": self.attention,
            "generation_config": self.generation_config,
        }
        if self.lora is not None:
            fields = {k: v for k, v in dataclasses.asdict(self.lora).items() if k != "enabled"}
            out["lora"] = {**fields, "scaling": self.lora.scaling, "dir": LORA_DIR,
                           "trainable_parameters": self.trainable_parameters}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "CheckpointMeta":
        """Parse a megablock.json object (ValueError / TypeError on a bad one; `read_metadata`
        turns those into CheckpointError with the file's name). Absent optional fields and null
        ones take the defaults above."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        given = lambda key: defaults[key] if d.get(key) is None else d[key]  # noqa: E731
        lora = d.get("lora") or None
        return cls(
            model=ModelConfig.from_dict(d["model"]), tp=d["tp"], pp=d["pp"], layers_per_stage=d["layers_per_stage"],
            dtype=d["dtype"], source=given("source"), block_size=given("block_size"), step=given("step"),
            curriculum_stage=given("curriculum_stage"), shift=bool(given("shift")), attention=given("attention"),
            generation_config=d.get("generation_config") or None, format_version=d["format_version"],
            lora=LoraSection.from_saved(lora) if lora else None,
            trainable_parameters=lora.get("trainable_parameters") if lora else None,
        )


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder and its metadata, read and validated once. It is path-like
    (`Path(ckpt)`, `ckpt / "model"`), so file helpers take it where they take a folder."""

    path: Path
    meta: CheckpointMeta

    @classmethod
    def open(cls, path) -> "Checkpoint":
        """A checkpoint folder, or a training save dir (resolved to its `latest`), validated."""
        folder = resolve_checkpoint(path)
        return cls(folder, read_metadata(folder))

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other) -> Path:
        return self.path / other

    def __str__(self) -> str:
        return str(self.path)


def write_metadata(ckpt, meta: CheckpointMeta) -> None:
    """Write CKPT/megablock.json atomically (a reader never sees half a file)."""
    path = Path(ckpt) / METADATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a training save dir whose `latest` file names one."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist; pass a converted or training checkpoint")
    if (path / METADATA_FILE).is_file():
        return path
    if (path / LATEST_FILE).is_file():
        name = (path / LATEST_FILE).read_text().strip()
        target = path / name
        if not (target / METADATA_FILE).is_file():
            raise CheckpointError(
                f"{path / LATEST_FILE} names {name!r} but {target} has no {METADATA_FILE}; "
                f"pass one of the step folders in {path} explicitly"
            )
        return target
    raise CheckpointError(
        f"no {METADATA_FILE} in {path}: not a megablock checkpoint (convert one with tools/convert_hf.py, "
        f"or pass a training save dir with a '{LATEST_FILE}' file)"
    )


def read_metadata(ckpt) -> CheckpointMeta:
    """Read and validate megablock.json; CheckpointError with the fix when missing or corrupt."""
    path = Path(ckpt) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"no {METADATA_FILE} in {ckpt}: not a megablock checkpoint (convert one with tools/convert_hf.py)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-convert the model or use another checkpoint") from None
    missing = [k for k in _REQUIRED if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; re-convert the model or use another checkpoint")
    if raw["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {raw['format_version']}, newer than this megablock "
            f"({FORMAT_VERSION}); update megablock"
        )
    try:
        meta = CheckpointMeta.from_dict(raw)
        get_family(meta.model.arch)
    except UnsupportedModel as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{path} has an invalid model config ({e}); re-convert the model") from None
    check_metadata_consistent(ckpt, raw, meta)
    return meta


def check_metadata_consistent(ckpt, raw: dict, meta: CheckpointMeta) -> None:
    """megablock.json must agree with itself and with the shards it describes: an edited or
    mixed-up file (fewer layers, another vocabulary, a mask id past the vocabulary) would
    otherwise export silently and crash generation later. Reads only the shard headers."""
    path, cfg = Path(ckpt) / METADATA_FILE, meta.model
    fix = "the metadata was edited or belongs to another model: re-convert the model or use another checkpoint"
    if raw["vocab_size"] != cfg.vocab_size or raw["padded_vocab_size"] != meta.padded_vocab_size:
        raise CheckpointError(
            f"{path}: vocab_size {raw['vocab_size']} / padded_vocab_size {raw['padded_vocab_size']} disagree with "
            f"its model config (vocab_size {cfg.vocab_size}, padded to {meta.padded_vocab_size} at TP {meta.tp}); {fix}")
    mask = raw.get("mask_token_id")
    if mask is not None and not _token_id(mask, cfg.vocab_size):
        raise CheckpointError(f"{path}: mask_token_id {mask} is outside the vocabulary (size {cfg.vocab_size}); {fix}")
    if mask != cfg.mask_token_id:
        raise CheckpointError(
            f"{path}: mask_token_id {mask} disagrees with its model config ({cfg.mask_token_id}); {fix}")
    _check_special_tokens(path, meta, fix)
    _check_qk_norm(path, cfg, fix)
    for stage in range(meta.pp):
        want = shard_shapes(cfg, meta.tp, meta.pp, stage, meta.layers_per_stage)
        for rank in range(meta.tp):
            shard = shard_path(ckpt, rank, stage)
            if not shard.is_file():
                continue  # reported as "missing shard" by whoever reads it
            try:
                with safe_open(str(shard), "pt") as f:
                    have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as e:  # safetensors' own error type for a bad header
                raise CheckpointError(f"shard {shard} is corrupt ({e}); re-convert or use another checkpoint") from None
            extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
            wrong = [(k, have[k], want[k]) for k in want if k in have and have[k] != want[k]]
            if extra or missing or wrong:
                what = (f"holds {extra[0]} (and {len(extra) - 1} more) that megablock.json does not describe" if extra
                        else f"lacks {missing[0]} (and {len(missing) - 1} more)" if missing
                        else f"has {wrong[0][0]} of shape {list(wrong[0][1])} where megablock.json implies {list(wrong[0][2])}")
                raise CheckpointError(
                    f"{path} contradicts its shards: {shard.relative_to(Path(ckpt))} {what} "
                    f"(megablock.json: {cfg.num_layers} layers, vocab {cfg.vocab_size}, TP {meta.tp}, PP {meta.pp}); "
                    f"{fix}")


def _token_id(value, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


def _check_special_tokens(path: Path, meta: CheckpointMeta, fix: str) -> None:
    """bos / eos ids of the model config and generation_config (an int or a list of ints) must be
    tokens of the vocabulary: an eos past it can never be sampled, so generation never stops, and
    export would write it into config.json unchecked. (pad is not checked: some HF configs carry
    pad_token_id -1, and megablock never feeds it to the model.)"""
    cfg, gen = meta.model, meta.generation_config or {}
    fields = [("model.bos_token_id", cfg.bos_token_id), ("model.eos_token_id", cfg.eos_token_id),
              *((f"generation_config.{k}", gen.get(k)) for k in ("bos_token_id", "eos_token_id"))]
    for name, value in fields:
        for token in value if isinstance(value, list) else [value]:
            if token is not None and not _token_id(token, cfg.vocab_size):
                raise CheckpointError(f"{path}: {name} {value} is outside the vocabulary (size {cfg.vocab_size}); {fix}")


def _check_qk_norm(path: Path, cfg: ModelConfig, fix: str) -> None:
    """model.qk_norm must be what the family maps (Qwen3's q_norm / k_norm weights): the model
    builds those norms from the flag, the shards and export follow the family, so a flipped flag
    exported without them (or with random ones) while generation refused the checkpoint."""
    mapped = any(b.name.endswith("q_layernorm.weight") for b in get_family(cfg.arch).params(cfg, layers=range(1)))
    if mapped != cfg.qk_norm:
        raise CheckpointError(
            f"{path}: model.qk_norm is {cfg.qk_norm} but a {cfg.arch} checkpoint {'has' if mapped else 'has no'} "
            f"query/key norms; {fix}")

# --- parameter placement -----------------------------------------------------------------------
def shard_path(ckpt, tp_rank: int, pp_rank: int) -> Path:
    return Path(ckpt) / MODEL_DIR / f"tp{tp_rank:02d}_pp{pp_rank:03d}.safetensors"


def stage_param_names(cfg: ModelConfig, pp: int, pp_rank: int, layers_per_stage=None) -> list[str]:
    """Names stored on pipeline stage `pp_rank`: its layers; the embedding on stage 0; final norm and
    output layer on the last stage, which also keeps a copy of a tied embedding (its head uses it)."""
    ranges = stage_layer_ranges(cfg.num_layers, pp, layers_per_stage)
    first, last = pp_rank == 0, pp_rank == pp - 1
    names = []
    for b in get_family(cfg.arch).params(cfg, layers=ranges[pp_rank]):
        if b.layer is not None:
            names.append(b.name)
        elif b.name == "embedding.weight":
            if first or (last and cfg.tie_word_embeddings):
                names.append(b.name)
        elif last:
            names.append(b.name)
    return names


def home_stage(name: str, cfg: ModelConfig, pp: int, layers_per_stage=None) -> int:
    """The stage a loader reads `name` from (stage 0 for the embedding, even when tied)."""
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        for s, r in enumerate(stage_layer_ranges(cfg.num_layers, pp, layers_per_stage)):
            if layer in r:
                return s
    return 0 if name == "embedding.weight" else pp - 1


def full_shapes(cfg: ModelConfig, tp: int = 1) -> dict[str, tuple]:
    """Shape of every full megablock tensor (vocab padded for `tp`), from the config alone."""
    v, h, i, d = cfg.padded_vocab_size(tp), cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * d
    by_suffix = {
        "embedding.weight": (v, h), "output_layer.weight": (v, h), "input_layernorm.weight": (h,),
        "linear_qkv.weight": (qkv, h), "linear_qkv.bias": (qkv,), "q_layernorm.weight": (d,),
        "k_layernorm.weight": (d,), "linear_proj.weight": (h, cfg.num_attention_heads * d),
        "pre_mlp_layernorm.weight": (h,), "linear_fc1.weight": (2 * i, h), "linear_fc2.weight": (h, i),
        "final_layernorm.weight": (h,),
    }
    out = {}
    for b in get_family(cfg.arch).params(cfg):
        out[b.name] = next(s for suffix, s in by_suffix.items() if b.name.endswith(suffix))
    return out


def shard_shapes(cfg: ModelConfig, tp: int, pp: int, pp_rank: int, layers_per_stage=None) -> dict[str, tuple]:
    """Shape of each tensor in a TP rank's shard of stage `pp_rank` (same for every TP rank)."""
    family, shapes = get_family(cfg.arch), full_shapes(cfg, tp)
    out = {}
    for name in stage_param_names(cfg, pp, pp_rank, layers_per_stage):
        meta = torch.empty(shapes[name], device="meta")
        out[name] = tuple(family.find(name, cfg).split(meta, tp, 0, cfg).shape)
    return out


# --- shard I/O ---------------------------------------------------------------------------------
class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, in the planned order.

    The header (names, dtypes, shapes, offsets) is written first from `specs`, so no more than the
    tensor being written is ever in memory. The file appears under its name only on `close()`.
    """

    def __init__(self, path, specs: dict[str, tuple[tuple, torch.dtype]], metadata: Optional[dict] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.specs = list(specs.items())
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for name, (shape, dtype) in self.specs:
            size = dtype.itemsize
            for n in shape:
                size *= n
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.nbytes = offset
        self.f = open(self.partial, "wb")
        self.f.write(struct.pack("<Q", len(blob)) + blob)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, (shape, dtype) = self.specs[self.next]
        if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{self.path.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {want} {tuple(shape)} {dtype}")
        if tensor.numel():
            self.f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise ValueError(f"{self.path.name}: {len(self.specs) - self.next} tensors were never written")
        self.f.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.f.close()
        self.partial.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


def save_shard(ckpt, tp_rank: int, pp_rank: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one rank's shard (names with global layer indices)."""
    path = shard_path(ckpt, tp_rank, pp_rank)
    specs = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    with SafetensorsWriter(path, specs) as w:
        for n, t in tensors.items():
            w.write(n, t)
    return path


def _check_shard(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"missing shard {path}; the checkpoint is incomplete (re-convert or use another step)")


def load_shard(ckpt, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
    """All tensors of one rank's shard."""
    path = shard_path(ckpt, tp_rank, pp_rank)
    _check_shard(path)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for bad headers/sizes
        raise CheckpointError(f"shard {path} is corrupt ({e}); re-convert or use another checkpoint") from None


def read_shard_tensor(ckpt, tp_rank: int, pp_rank: int, name: str) -> torch.Tensor:
    """One tensor of one shard, opening the file just for it (keeps memory at one tensor)."""
    path = shard_path(ckpt, tp_rank, pp_rank)
    _check_shard(path)
    try:
        with safe_open(str(path), "pt") as f:
            if name not in f.keys():
                raise CheckpointError(f"shard {path} lacks {name}; the checkpoint is incomplete or for another model")
            return f.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"shard {path} is corrupt ({e}); re-convert or use another checkpoint") from None


def iter_full_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) in canonical order, merging the TP shards of each parameter as it
    goes: memory stays at about one full tensor (vocab rows padded as saved)."""
    meta = ckpt.meta
    cfg, tp, pp, lps = meta.model, meta.tp, meta.pp, meta.layers_per_stage
    for b in get_family(cfg.arch).params(cfg):
        stage = home_stage(b.name, cfg, pp, lps)
        shards = [read_shard_tensor(ckpt, r, stage, b.name) for r in range(tp)]
        yield b.name, b.merge(shards, cfg)


def load_full_state_dict(ckpt) -> dict[str, torch.Tensor]:
    """Merge all shards of checkpoint `ckpt` (a Checkpoint or a folder) into full tensors
    (vocabulary still padded, as saved). With `shard_state_dict` this reshards to any TP x PP."""
    return dict(iter_full_tensors(ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.open(ckpt)))


def shard_state_dict(full: dict[str, torch.Tensor], model_config: ModelConfig, tp: int, tp_rank: int,
                     pp: int, pp_rank: int, layers_per_stage=None) -> dict[str, torch.Tensor]:
    """The tensors TP rank `tp_rank` of stage `pp_rank` holds, cut from a full state dict (any
    source TP: vocabulary rows are re-padded to `model_config.padded_vocab_size(tp)`)."""
    model_config.check_parallel(tp, pp)
    family = get_family(model_config.arch)
    out = {}
    for name in stage_param_names(model_config, pp, pp_rank, layers_per_stage):
        if name not in full:
            raise KeyError(f"full state dict lacks {name}")
        out[name] = family.find(name, model_config).split(full[name], tp, tp_rank, model_config)
    return out

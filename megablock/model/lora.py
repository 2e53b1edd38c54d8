"""LoRA on the tensor-parallel linears, plus the adapter checkpoint files and their merge.

A target linear y = W x becomes y = W x + s * B (A dropout(x)), s = alpha / r, with W frozen,
A ~ kaiming-uniform (PEFT's default) and B = 0, so the adapted model starts exactly at the base.

Tensor parallelism (TP size t, same layouts as the base weight):

- Column-parallel base (linear_qkv, linear_fc1; W_k: [out/t, in] on rank k). A is replicated
  [r, in], B is column-sharded [out/t, r] with exactly W's row layout (Megatron's grouped qkv
  rows, [gate_k; up_k] for fc1), so y_k = W_k x + s B_k (A x) is rank k's slice of the output.
  h = A x is computed redundantly on every rank, and each rank's B_k only sees its slice of the
  output gradient: dL/dh = sum_k B_k^T g_k. `copy_to_tensor_model_parallel_region(h)` (identity
  forward, all-reduce backward) makes every rank see the full sum, so A's gradient and the LoRA
  branch's input gradient are the TP = 1 values on every rank (the trick RMSNorm's
  `sees_head_shard` uses for the q/k norms).
- Row-parallel base (linear_proj, linear_fc2; W_k: [out, in/t], local input shard x_k). A is
  row-sharded [r, in/t] like W, B is replicated [out, r]. A x = sum_k A_k x_k: each rank computes
  its partial product and `reduce_from_tensor_model_parallel_region` (all-reduce forward,
  identity backward) sums it — r numbers per token instead of `out` — and the replicated
  B (A x) is added to the (already reduced) base output. The gradient reaching h is the same on
  every rank (the output is replicated), so B's gradient is the TP = 1 gradient on every rank and
  A_k's gradient is its slice of the TP = 1 gradient.

Sharded factors carry megatron's `tensor_model_parallel` tag (gradient-norm code counts them on
every TP rank, replicated ones once). Full A is drawn once from a generator keyed by (seed, name)
and sliced, so every TP layout starts from the same adapters. Pipeline parallelism needs
nothing: the adapters live inside the layers a stage owns.

The mask-token row: `train_mask_token_row` adds a trainable [hidden] delta to the embedding
output wherever the input is the mask token (the input-embedding row only; the model never
predicts the mask token, so its output row does not matter). It is replicated over TP (the
embedding output is all-reduced, hence the same on every rank) and lives on the first stage.

Files: a checkpoint CKPT with adapters has megablock.json["lora"] (settings, trainable count)
and CKPT/lora/tp{TT}_pp{PPP}.safetensors beside the frozen base in CKPT/model/ (adapter tensors
named `layers.{i}.self_attention.linear_qkv.lora_A` / `.lora_B`, `embedding.mask_row_delta`).
`merge_into_shard` / `iter_merged_full_tensors` add s * B A (and the mask delta) per TP rank or
in full-tensor space; `peft_adapter` translates the adapters into a PEFT LoRA folder (the fused
qkv / fc1 LoRA becomes q/k/v and gate/up LoRAs sharing A, with B cut by rows).
"""
from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from torch import nn

logger = logging.getLogger(__name__)

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
ROW_PARALLEL = ("linear_proj", "linear_fc2")
LORA_DIR = "lora"
MASK_DELTA = "embedding.mask_row_delta"
_PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp", "linear_fc2": "mlp"}


@dataclass
class LoraSettings:
    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(TARGETS))
    train_mask_token_row: bool = True
    train_norms: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_section(cls, section) -> "LoraSettings":
        return cls(rank=section.rank, alpha=float(section.alpha), dropout=section.dropout,
                   target_modules=list(section.target_modules), train_mask_token_row=section.train_mask_token_row,
                   train_norms=section.train_norms)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- layers
class _LoraLinear:
    """State shared by both LoRA linears (set by `_attach`)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scaling: float
    lora_dropout: nn.Module

    def _lora_input(self, x):
        return self.lora_dropout(x).to(self.lora_A.dtype)


class LoraColumnParallelLinear(tensor_parallel.ColumnParallelLinear, _LoraLinear):
    """Column-parallel linear + LoRA (A replicated, B sharded like W's rows)."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        out, bias = super().forward(input_, weight, runtime_gather_output)
        h = F.linear(self._lora_input(input_), self.lora_A)
        h = tensor_parallel.copy_to_tensor_model_parallel_region(h)  # backward: sum dL/dh over TP
        return out + F.linear(h, self.lora_B).to(out.dtype) * self.lora_scaling, bias


class LoraRowParallelLinear(tensor_parallel.RowParallelLinear, _LoraLinear):
    """Row-parallel linear + LoRA (A sharded like W's columns, B replicated)."""

    def forward(self, input_):
        out, bias = super().forward(input_)
        h = F.linear(self._lora_input(input_), self.lora_A)  # this rank's partial A x
        h = tensor_parallel.reduce_from_tensor_model_parallel_region(h)  # A x, on every rank
        return out + F.linear(h, self.lora_B).to(out.dtype) * self.lora_scaling, bias


class MaskRowEmbedding(tensor_parallel.VocabParallelEmbedding):
    """Vocab-parallel embedding whose mask-token row gets a trainable delta."""

    mask_row_delta: nn.Parameter
    mask_token_id: int

    def forward(self, input_):
        out = super().forward(input_)
        hit = (input_ == self.mask_token_id).unsqueeze(-1).to(out.dtype)
        return out + hit * self.mask_row_delta.to(out.dtype)


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _attach(linear, name: str, settings: LoraSettings, seed: int, tp: int, tp_rank: int) -> None:
    row = isinstance(linear, tensor_parallel.RowParallelLinear)
    w = linear.weight
    r, in_full = settings.rank, linear.input_size
    # PEFT's default: kaiming_uniform_(a=sqrt(5)) on [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in)),
    # drawn for the full A and sliced, so TP layouts agree.
    g = torch.Generator().manual_seed(_name_seed(seed, name))
    full_a = (torch.rand(r, in_full, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(in_full)
    a = full_a.chunk(tp, dim=1)[tp_rank] if row else full_a  # row-parallel A: W's column split
    b = torch.zeros(w.shape[0], r, dtype=torch.float64)  # [out / tp, r] (column) or [out, r] (row)
    linear.__class__ = LoraRowParallelLinear if row else LoraColumnParallelLinear
    linear.lora_A = nn.Parameter(a.to(dtype=w.dtype, device=w.device).contiguous())
    linear.lora_B = nn.Parameter(b.to(dtype=w.dtype, device=w.device))
    sharded = linear.lora_A if row else linear.lora_B
    tensor_parallel.set_tensor_model_parallel_attributes(sharded, True, 1 if row else 0, 1)
    linear.lora_scaling = settings.scaling
    linear.lora_dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()


def apply_lora(model, settings: LoraSettings, seed: int = 0) -> None:
    """Freeze `model` (a BlockDiffusionLM stage) and add adapters in place; call it after the
    base weights are loaded. Names of the base weights do not change."""
    from megablock.model.layers import RMSNorm

    if getattr(model, "lora", None) is not None:
        raise ValueError("LoRA is already applied to this model")
    unknown = [t for t in settings.target_modules if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {TARGETS}")
    model.requires_grad_(False)
    tp, tp_rank = model.tp, model.tp_rank
    for i, layer in model.layers.items():
        for target in settings.target_modules:
            parent = getattr(layer, _PARENT[target])
            _attach(getattr(parent, target), f"layers.{i}.{_PARENT[target]}.{target}", settings, seed, tp, tp_rank)
    if settings.train_norms:
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.requires_grad_(True)
    mask_id = model.cfg.mask_token_id
    if settings.train_mask_token_row and model.pre_process:
        if mask_id is None:
            logger.warning("lora.train_mask_token_row: the model has no mask token; nothing to train there")
        else:
            emb = model.embedding
            emb.__class__ = MaskRowEmbedding
            emb.mask_token_id = mask_id
            emb.mask_row_delta = nn.Parameter(torch.zeros(emb.weight.shape[1], dtype=emb.weight.dtype, device=emb.weight.device))
    model.lora = settings


def settings_of(model) -> Optional[LoraSettings]:
    """The LoRA settings applied to a stage model (or found inside a DeepSpeed module), or None."""
    if getattr(model, "lora", None) is not None:
        return model.lora
    for m in model.modules():
        if getattr(m, "lora", None) is not None and isinstance(m.lora, LoraSettings):
            return m.lora
    ref = getattr(model, "stage_model", None)  # pipeline module keeps the stage outside modules()
    stage = getattr(ref, "stage", None)
    return getattr(stage, "lora", None)


def is_adapter_name(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B") or name == MASK_DELTA


def split_weights(weights: dict) -> tuple[dict, dict]:
    """(base tensors, adapter tensors) of a stage's `weights()`."""
    base = {k: v for k, v in weights.items() if not is_adapter_name(k)}
    return base, {k: v for k, v in weights.items() if is_adapter_name(k)}


def base_weight_name(adapter: str) -> str:
    return adapter.rsplit(".", 1)[0] + ".weight"


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model, summed over the stages and TP shards
    (replicated tensors once). Collective when torch.distributed is initialised."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    counts = torch.zeros(2, dtype=torch.float64)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not getattr(p, "tensor_model_parallel", False) and tp_rank != 0:
            continue
        if name == "embedding.weight" and not getattr(model, "pre_process", True):
            continue  # the last stage's copy of a tied embedding
        counts[1] += p.numel()
        if p.requires_grad:
            counts[0] += p.numel()
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        dist.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return int(counts[0]), int(counts[1])


# ----------------------------------------------------------------------------- files
def checkpoint_meta(settings: LoraSettings, trainable: Optional[int] = None) -> dict:
    """megablock.json["lora"]."""
    return {**settings.to_dict(), "scaling": settings.scaling, "dir": LORA_DIR, "trainable_parameters": trainable}


def adapter_shard_path(ckpt, tp_rank: int, pp_rank: int) -> Path:
    return Path(ckpt) / LORA_DIR / f"tp{tp_rank:02d}_pp{pp_rank:03d}.safetensors"


def save_adapter_shard(ckpt, tp_rank: int, pp_rank: int, tensors: dict) -> Path:
    from megablock.checkpoint.format import SafetensorsWriter

    path = adapter_shard_path(ckpt, tp_rank, pp_rank)
    with SafetensorsWriter(path, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}) as w:
        for n, t in tensors.items():
            w.write(n, t.detach())
    return path


def load_adapter_shard(ckpt, tp_rank: int, pp_rank: int) -> dict:
    from safetensors import safe_open

    from megablock.checkpoint.format import CheckpointError

    path = adapter_shard_path(ckpt, tp_rank, pp_rank)
    if not path.is_file():
        raise CheckpointError(f"missing LoRA adapter shard {path}; the checkpoint is incomplete (use another step)")
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _mapping(cfg, weight_name: str):
    from megablock.checkpoint.mappings import RowParallel, get_family

    bound = get_family(cfg.arch).find(weight_name, cfg)
    return bound, isinstance(bound.mapping, RowParallel)


def _merge_factor(cfg, adapter: str, shards: list) -> torch.Tensor:
    """Full tensor of one adapter factor from its TP shards (the sharded factor follows the base
    weight's mapping: grouped qkv rows, [gate; up] halves, row-parallel columns)."""
    if adapter == MASK_DELTA:
        return shards[0]
    bound, row = _mapping(cfg, base_weight_name(adapter))
    sharded = adapter.endswith(".lora_A") if row else adapter.endswith(".lora_B")
    return bound.merge(shards, cfg) if sharded else shards[0]


def split_factor(cfg, adapter: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s shard of a full adapter factor (inverse of the merge)."""
    if adapter == MASK_DELTA:
        return full
    bound, row = _mapping(cfg, base_weight_name(adapter))
    sharded = adapter.endswith(".lora_A") if row else adapter.endswith(".lora_B")
    return bound.split(full, tp, rank, cfg) if sharded else full


def _adapter_names(ckpt, meta: dict, pp_rank: int) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter_shard_path(ckpt, 0, pp_rank)), "pt") as f:
        return list(f.keys())


def full_adapters(ckpt, meta: dict) -> dict[str, torch.Tensor]:
    """Every adapter tensor of a checkpoint as a full (TP = 1) tensor."""
    from megablock.checkpoint.format import model_config

    cfg = model_config(meta)
    out = {}
    for s in range(meta["pp"]):
        shards = [load_adapter_shard(ckpt, r, s) for r in range(meta["tp"])]
        for name in shards[0]:
            out[name] = _merge_factor(cfg, name, [sh[name] for sh in shards])
    return out


def _delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return (b.double() @ a.double()) * scaling


def _add_mask_row(weight: torch.Tensor, delta: torch.Tensor, row: int) -> torch.Tensor:
    weight = weight.clone()
    weight[row] = (weight[row].double() + delta.double()).to(weight.dtype)
    return weight


def merge_into_shard(ckpt, meta: dict, shard: dict, tp_rank: int, pp_rank: int) -> dict:
    """A model shard of (tp_rank, pp_rank) with that rank's adapters merged in (no-op for a
    checkpoint without LoRA): W_k += s * B_k A_k for both column and row-parallel layouts."""
    if not meta.get("lora"):
        return shard
    from megablock.checkpoint.format import model_config

    cfg = model_config(meta)
    scaling = LoraSettings.from_dict(meta["lora"]).scaling
    adapters = load_adapter_shard(ckpt, tp_rank, pp_rank)
    shard = dict(shard)
    for name, a in adapters.items():
        if name.endswith(".lora_A"):
            w = base_weight_name(name)
            b = adapters[name[: -len("lora_A")] + "lora_B"]
            shard[w] = (shard[w].double() + _delta(a, b, scaling)).to(shard[w].dtype)
    if MASK_DELTA in adapters and "embedding.weight" in shard:
        local = shard["embedding.weight"].shape[0]
        row = cfg.mask_token_id - tp_rank * local
        if 0 <= row < local:
            shard["embedding.weight"] = _add_mask_row(shard["embedding.weight"], adapters[MASK_DELTA], row)
    return shard


def iter_merged_full_tensors(ckpt, meta: dict, merge_lora: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """`format.iter_full_tensors` with the adapters merged in full-tensor space (W + s * B A on
    the merged factors; the mask-token delta always). `merge_lora=False` leaves the LoRA
    factors out (for a base model + separate PEFT adapter). Streams like the plain iterator."""
    from megablock.checkpoint import format as fmt

    if not meta.get("lora"):
        yield from fmt.iter_full_tensors(ckpt, meta)
        return
    cfg = fmt.model_config(meta)
    scaling = LoraSettings.from_dict(meta["lora"]).scaling
    index = {}  # adapter name -> pipeline stage holding it
    for s in range(meta["pp"]):
        for name in _adapter_names(ckpt, meta, s):
            index[name] = s

    def factor(name: str) -> torch.Tensor:
        shards = [_read_adapter(ckpt, r, index[name], name) for r in range(meta["tp"])]
        return _merge_factor(cfg, name, shards)

    for name, full in fmt.iter_full_tensors(ckpt, meta):
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if merge_lora and prefix and prefix + ".lora_A" in index:
            full = (full.double() + _delta(factor(prefix + ".lora_A"), factor(prefix + ".lora_B"), scaling)).to(full.dtype)
        if name == "embedding.weight" and MASK_DELTA in index:
            full = _add_mask_row(full, factor(MASK_DELTA), cfg.mask_token_id)
        yield name, full


def _read_adapter(ckpt, tp_rank: int, pp_rank: int, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(adapter_shard_path(ckpt, tp_rank, pp_rank)), "pt") as f:
        return f.get_tensor(name)


def load_adapters(model, ckpt, meta: dict) -> None:
    """Load a checkpoint's adapters (unmerged) into a stage model that has LoRA applied with the
    checkpoint's settings, at any TP x PP (resharded through full tensors when it differs)."""
    wanted = {n for n in model.weights() if is_adapter_name(n)}
    if meta["tp"] == model.tp and meta["pp"] == parallel_state.get_pipeline_model_parallel_world_size():
        tensors = load_adapter_shard(ckpt, model.tp_rank, parallel_state.get_pipeline_model_parallel_rank())
    else:
        full = full_adapters(ckpt, meta)
        tensors = {n: split_factor(model.cfg, n, full[n], model.tp, model.tp_rank) for n in wanted if n in full}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ValueError(f"checkpoint adapters lack {missing[:5]}; was it trained with other lora settings?")
    model.load_state_dict({n: tensors[n] for n in wanted}, strict=False)


# ----------------------------------------------------------------------------- PEFT export
def peft_adapter(ckpt, meta: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """(adapter_config.json dict, {PEFT key: tensor}) for `PeftModel.from_pretrained` on the
    exported base model. Fused LoRAs split exactly: qkv's B rows go to q/k/v through the same
    grouped-layout mapping as the weight (all three share A); fc1's to gate/up."""
    from megablock.checkpoint.format import model_config

    cfg = model_config(meta)
    settings = LoraSettings.from_dict(meta["lora"])
    full = full_adapters(ckpt, meta)
    tensors, modules = {}, set()
    for name in sorted(n for n in full if n.endswith(".lora_A")):
        w = base_weight_name(name)
        bound, _ = _mapping(cfg, w)
        a, b = full[name], full[name[: -len("lora_A")] + "lora_B"]
        for hf_name, b_part in bound.to_hf(b, cfg).items():
            module = hf_name[: -len(".weight")]
            modules.add(module.rsplit(".", 1)[1])
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).clone()  # q/k/v share A: own copies
            tensors[f"base_model.model.{module}.lora_B.weight"] = b_part.to(dtype).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    return config, tensors


def write_peft_adapter(ckpt, meta: dict, out_dir, dtype: torch.dtype, base_model_path: Optional[str] = None) -> Path:
    from safetensors.torch import save_file

    config, tensors = peft_adapter(ckpt, meta, dtype)
    config["base_model_name_or_path"] = base_model_path
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def check_adapter_shards(ckpt, meta: dict, required: bool = False) -> None:
    """Every adapter shard of a LoRA checkpoint exists (CheckpointError otherwise); `required`:
    the caller needs adapters, so a checkpoint without LoRA is an error too."""
    from megablock.checkpoint.format import CheckpointError

    if not meta.get("lora"):
        if required:
            raise CheckpointError(f"{ckpt} has no LoRA adapters (megablock.json has no 'lora'); export it without --lora-separate")
        return
    for s in range(meta["pp"]):
        for r in range(meta["tp"]):
            if not adapter_shard_path(ckpt, r, s).is_file():
                raise CheckpointError(f"missing LoRA adapter shard {adapter_shard_path(ckpt, r, s)}; the checkpoint is incomplete")

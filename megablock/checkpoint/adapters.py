"""LoRA adapter files beside a checkpoint's model shards, their merge, and PEFT export.

A checkpoint CKPT with adapters has megablock.json["lora"] (settings, trainable count) and
CKPT/lora/tp{TT}_pp{PPP}.safetensors beside the frozen base in CKPT/model/ (adapter tensors named
as in megablock.model.lora). `merge_into_shard` / `iter_merged_full_tensors` add s * B A (and the
mask-token delta) per TP rank or in full-tensor space; `peft_adapter` translates the adapters into
a PEFT LoRA folder (the fused qkv / fc1 LoRA becomes q/k/v and gate/up LoRAs sharing A, with B cut
by rows through the same grouped-layout mapping as the weight).

A gated checkpoint (lora.scope=noised) holds a drafter: its adapters apply at draft positions
only, so they can never be merged into the weights. It loads as the frozen base plus attached,
gated adapters (`attach_adapters`), and exports as the base unchanged plus an adapter folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megablock.config import LoraSection
from megablock.model.lora import MASK_DELTA, apply_lora, base_weight_name

from .format import LORA_DIR, Checkpoint, CheckpointError, SafetensorsWriter, iter_full_tensors
from .mappings import RowParallel, get_family


def _refuse_merge(ckpt: Checkpoint) -> None:
    if ckpt.meta.gated:
        raise CheckpointError(
            f"{ckpt} holds a gated drafter (lora.scope=noised): its adapters apply only at draft positions, so "
            "they cannot be merged into the weights. Decode it with tools/generate.py --ckpt, export it with "
            "tools/export_hf.py (base unchanged + drafter folder), or train on from its base (model.init_from = "
            "the base checkpoint) with lora.scope=noised")


def attach_adapters(model, ckpt: Checkpoint) -> None:
    """Apply the checkpoint's LoRA settings to `model` (a stage holding the frozen base) and load
    its adapters, resharded to the model's TP rank: the unmerged form, which a gated drafter needs."""
    attach_full_adapters(model, ckpt.meta.lora, full_adapters(ckpt), ckpt)


def adapter_shard_path(ckpt, tp_rank: int, pp_rank: int) -> Path:
    return Path(ckpt) / LORA_DIR / f"tp{tp_rank:02d}_pp{pp_rank:03d}.safetensors"


def save_adapter_shard(ckpt, tp_rank: int, pp_rank: int, tensors: dict) -> Path:
    path = adapter_shard_path(ckpt, tp_rank, pp_rank)
    with SafetensorsWriter(path, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}) as w:
        for n, t in tensors.items():
            w.write(n, t.detach())
    return path


def load_adapter_shard(ckpt, tp_rank: int, pp_rank: int) -> dict:
    path = adapter_shard_path(ckpt, tp_rank, pp_rank)
    if not path.is_file():
        raise CheckpointError(f"missing LoRA adapter shard {path}; the checkpoint is incomplete (use another step)")
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _mapping(cfg, weight_name: str):
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


def _adapter_names(ckpt, pp_rank: int) -> list[str]:
    with safe_open(str(adapter_shard_path(ckpt, 0, pp_rank)), "pt") as f:
        return list(f.keys())


def full_adapters(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every adapter tensor of a checkpoint as a full (TP = 1) tensor."""
    cfg, meta = ckpt.meta.model, ckpt.meta
    out = {}
    for s in range(meta.pp):
        shards = [load_adapter_shard(ckpt, r, s) for r in range(meta.tp)]
        for name in shards[0]:
            out[name] = _merge_factor(cfg, name, [sh[name] for sh in shards])
    return out


def _delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return (b.double() @ a.double()) * scaling


def _add_mask_row(weight: torch.Tensor, delta: torch.Tensor, row: int) -> torch.Tensor:
    weight = weight.clone()
    weight[row] = (weight[row].double() + delta.double()).to(weight.dtype)
    return weight


def merge_into_shard(ckpt: Checkpoint, shard: dict, tp_rank: int, pp_rank: int) -> dict:
    """A model shard of (tp_rank, pp_rank) with that rank's adapters merged in (no-op for a
    checkpoint without LoRA): W_k += s * B_k A_k for both column and row-parallel layouts."""
    if ckpt.meta.lora is None:
        return shard
    _refuse_merge(ckpt)
    cfg, scaling = ckpt.meta.model, ckpt.meta.lora.scaling
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


def iter_merged_full_tensors(ckpt: Checkpoint, merge_lora: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """`format.iter_full_tensors` with the adapters merged in full-tensor space (W + s * B A on
    the merged factors; the mask-token delta always). `merge_lora=False` leaves the LoRA
    factors out (for a base model + separate PEFT adapter). Streams like the plain iterator.
    A gated drafter's base is the frozen base itself (no mask-token delta either), and only
    that can be asked for (merge_lora=False)."""
    meta = ckpt.meta
    if meta.lora is None or (meta.gated and not merge_lora):
        yield from iter_full_tensors(ckpt)
        return
    _refuse_merge(ckpt)
    cfg, scaling = meta.model, meta.lora.scaling
    index = {}  # adapter name -> pipeline stage holding it
    for s in range(meta.pp):
        for name in _adapter_names(ckpt, s):
            index[name] = s

    def factor(name: str) -> torch.Tensor:
        shards = [_read_adapter(ckpt, r, index[name], name) for r in range(meta.tp)]
        return _merge_factor(cfg, name, shards)

    for name, full in iter_full_tensors(ckpt):
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if merge_lora and prefix and prefix + ".lora_A" in index:
            full = (full.double() + _delta(factor(prefix + ".lora_A"), factor(prefix + ".lora_B"), scaling)).to(full.dtype)
        if name == "embedding.weight" and MASK_DELTA in index:
            full = _add_mask_row(full, factor(MASK_DELTA), cfg.mask_token_id)
        yield name, full


def _read_adapter(ckpt, tp_rank: int, pp_rank: int, name: str) -> torch.Tensor:
    with safe_open(str(adapter_shard_path(ckpt, tp_rank, pp_rank)), "pt") as f:
        return f.get_tensor(name)


# ----------------------------------------------------------------------------- PEFT export
def peft_adapter(ckpt: Checkpoint, dtype: torch.dtype) -> tuple[dict, dict]:
    """(adapter_config.json dict, {PEFT key: tensor}) for `PeftModel.from_pretrained` on the
    exported base model. Fused LoRAs split exactly: qkv's B rows go to q/k/v through the same
    grouped-layout mapping as the weight (all three share A); fc1's to gate/up."""
    cfg, settings = ckpt.meta.model, ckpt.meta.lora
    full = full_adapters(ckpt)
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


def write_peft_adapter(ckpt: Checkpoint, out_dir, dtype: torch.dtype, base_model_path: Optional[str] = None) -> Path:
    config, tensors = peft_adapter(ckpt, dtype)
    config["base_model_name_or_path"] = base_model_path
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


# ----------------------------------------------------------------------------- gated drafter folder
DRAFTER_CONFIG = "megablock_drafter.json"
DRAFTER_EXTRA = "megablock_drafter.safetensors"


def write_drafter(ckpt: Checkpoint, out_dir, dtype: torch.dtype, base_model_path: Optional[str] = None) -> Path:
    """A gated drafter as a folder beside its base: PEFT's LoRA layout (adapter_config.json,
    adapter_model.safetensors: what `PeftModel.from_pretrained` reads) plus what PEFT has no place
    for, in files of their own: the gate (megablock_drafter.json: the adapters apply at draft
    positions only) and the mask-token row delta (megablock_drafter.safetensors). Loaded by plain
    PEFT the adapters would apply everywhere, which is a different model than the base verifier:
    decode it with megablock (tools/generate.py --hf-dir BASE --drafter DIR)."""
    out = write_peft_adapter(ckpt, out_dir, dtype, base_model_path)
    settings = ckpt.meta.lora
    extra = {k: v.to(dtype).contiguous() for k, v in full_adapters(ckpt).items() if k == MASK_DELTA}
    if extra:
        save_file(extra, str(out / DRAFTER_EXTRA), metadata={"format": "pt"})
    info = {"scope": settings.scope, "rank": settings.rank, "alpha": settings.alpha,
            "target_modules": list(settings.target_modules), "mask_token_id": ckpt.meta.mask_token_id,
            "mask_row_delta": bool(extra), "base_model": base_model_path}
    (out / DRAFTER_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    return out


def read_drafter(folder, cfg) -> tuple[LoraSection, dict[str, torch.Tensor]]:
    """(settings, full megablock adapter tensors) of a folder written by `write_drafter`, for a
    model of config `cfg`: the PEFT q/k/v (gate/up) LoRAs fused back through the weight mappings."""
    folder = Path(folder)
    info_path, weights = folder / DRAFTER_CONFIG, folder / "adapter_model.safetensors"
    if not info_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder} is not a drafter folder (needs {DRAFTER_CONFIG} and adapter_model.safetensors, "
                              "as tools/export_hf.py writes for a lora.scope=noised run)")
    info = json.loads(info_path.read_text())
    if info.get("mask_token_id") != cfg.mask_token_id:
        raise CheckpointError(f"{folder} was trained with mask token {info.get('mask_token_id')}, the model has "
                              f"{cfg.mask_token_id}: use the base folder it was exported with")
    with safe_open(str(weights), "pt") as f:
        peft = {k: f.get_tensor(k) for k in f.keys()}
    family = get_family(cfg.arch)
    full = {}
    for bound in family.params(cfg):
        parts = bound.name.split(".")
        if parts[0] != "layers" or parts[-1] != "weight" or parts[-2] not in info["target_modules"]:
            continue
        hf = [n[: -len(".weight")] for n in bound.hf_names()]
        key = lambda module, part: f"base_model.model.{module}.lora_{part}.weight"  # noqa: E731
        missing = [key(m, "B") for m in hf if key(m, "B") not in peft]
        if missing:
            raise CheckpointError(f"{folder}: adapter_model.safetensors has no {missing[0]}; re-export the drafter")
        stem = bound.name[: -len(".weight")]
        full[f"{stem}.lora_A"] = peft[key(hf[0], "A")]
        full[f"{stem}.lora_B"] = bound.to_megablock(lambda name: peft[key(name[: -len(".weight")], "B")], cfg)
    if info.get("mask_row_delta"):
        with safe_open(str(folder / DRAFTER_EXTRA), "pt") as f:
            full[MASK_DELTA] = f.get_tensor(MASK_DELTA)
    settings = LoraSection(enabled=True, rank=info["rank"], alpha=info["alpha"], target_modules=info["target_modules"],
                           train_mask_token_row=bool(info.get("mask_row_delta")), scope=info["scope"])
    return settings, full


def attach_full_adapters(model, settings: LoraSection, full: dict, source) -> None:
    """apply_lora with `settings`, then load full (TP = 1) adapter tensors, split to the model's TP rank."""
    apply_lora(model, settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in full:
                p.copy_(split_factor(model.cfg, name, full[name], model.tp, model.tp_rank).to(p.dtype))
            elif name.endswith((".lora_A", ".lora_B")) or name == MASK_DELTA:
                raise CheckpointError(f"{source}: the adapter files have no {name}; they are incomplete")


def check_adapter_shards(ckpt: Checkpoint, required: bool = False) -> None:
    """Every adapter shard of a LoRA checkpoint exists (CheckpointError otherwise); `required`:
    the caller needs adapters, so a checkpoint without LoRA is an error too."""
    meta = ckpt.meta
    if meta.lora is None:
        if required:
            raise CheckpointError(f"{ckpt} has no LoRA adapters (megablock.json has no 'lora'); export it without --lora-separate")
        return
    for s in range(meta.pp):
        for r in range(meta.tp):
            if not adapter_shard_path(ckpt, r, s).is_file():
                raise CheckpointError(f"missing LoRA adapter shard {adapter_shard_path(ckpt, r, s)}; the checkpoint is incomplete")

"""Sharded megablock checkpoint (converted or from training, any TP x PP) -> plain HF folder.

Streams: each parameter's TP shards are read (one safetensors open per tensor), merged, mapped back
to HF tensors (vocabulary padding stripped, the mask row kept) and written straight into the
output safetensors file(s); memory stays at about one full tensor. Output above `max_shard_bytes`
is split into model-0000k-of-0000n.safetensors files with a model.safetensors.index.json, the
layout `save_pretrained` writes, so AutoModelForCausalLM loads either.

config.json is the source config (unmodeled entries verbatim) plus the block-diffusion settings
`block_size`, `mask_token_id`, `diffusion_shift`, `diffusion_attention`; with remote code (on by default for block sizes > 1)
also `auto_map`, beside the modeling files and a model card README.md (release.py). Same atomic-write rule as
conversion: OUT.tmp-<pid>, renamed when complete. OUT may not be, hold or be inside the checkpoint
(or the save dir given as --ckpt), and --force replaces only a previous export (convert.prepare_out).

A LoRA checkpoint (megablock.json "lora", adapters in CKPT/lora/) is merged in full-tensor space
as the tensors stream: W + alpha/r * B A, and the mask-token row delta (megablock.model.lora).
`lora_separate=True` instead writes the base (everything but the LoRA factors: frozen weights,
trained norms and mask row) to OUT and a PEFT LoRA folder to OUT/adapter, which
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT), OUT/adapter)` loads.

A gated drafter (lora.scope=noised) is never merged: OUT is the base exactly as it was trained
on (the same tensors as an export of the base checkpoint), and OUT/drafter the adapters
(`adapters.write_drafter`: PEFT's layout plus the gate and the mask-row delta).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from megablock.model.params import parameter_count

from . import adapters
from . import format as fmt
from . import release
from .convert import ConversionError, finish_out, prepare_out
from .mappings import get_family

MAX_SHARD_BYTES = 5 * 10**9
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_DIR = "adapter"
DRAFTER_DIR = "drafter"
# Written into every export: --force replaces only a folder that holds it (a real HF model with
# the same file names, e.g. model.safetensors, is never replaced).
EXPORT_MARKER = "megablock_export.json"


# Tokenizer files an export copies from CKPT/tokenizer/ (those present there, plus the usual
# names, so a previous export of another tokenizer is recognised too).
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
})


def _exported(name: str, ckpt: Path) -> bool:
    """Whether `name` at the top of an output folder is something export writes (what --force may
    replace)."""
    if name in (WEIGHTS_NAME, INDEX_NAME, "config.json", "generation_config.json", ADAPTER_DIR, DRAFTER_DIR,
                EXPORT_MARKER, release.MODEL_CARD) \
            or name in TOKENIZER_FILES or name in release.REMOTE_FILES:
        return True
    if name.startswith("model-") and name.endswith(".safetensors"):
        return True
    return (ckpt / fmt.TOKENIZER_DIR / name).is_file()


def diffusion_settings(meta: fmt.CheckpointMeta) -> dict:
    """Block-diffusion entries for config.json, from megablock.json."""
    return {
        "block_size": meta.block_size,
        "mask_token_id": meta.mask_token_id,
        "diffusion_shift": meta.shift,
        "diffusion_attention": meta.attention,
    }


def hf_config_dict(meta: fmt.CheckpointMeta, dtype: str) -> dict:
    cfg = meta.model
    config = get_family(cfg.arch).hf_config(cfg)
    config.pop("auto_map", None)  # a source's remote code is not ours: the export writes its own or none
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[dtype_key] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    config.update(diffusion_settings(meta))
    return config


def plan_files(specs: dict[str, tuple], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into files of at most `max_bytes` (a bigger tensor gets its own)."""
    files, current, size = [], [], 0
    for name, shape in specs.items():
        n = torch.Size(shape).numel() * dtype.itemsize
        if current and size + n > max_bytes:
            files.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        files.append(current)
    return files


def check_shards(ckpt: fmt.Checkpoint) -> None:
    """Every shard file exists and is readable before anything is written."""
    from safetensors import safe_open

    for s in range(ckpt.meta.pp):
        for r in range(ckpt.meta.tp):
            path = fmt.shard_path(ckpt, r, s)
            if not path.is_file():
                raise fmt.CheckpointError(f"missing shard {path}; the checkpoint is incomplete (use another step or re-convert)")
            try:
                with safe_open(str(path), "pt"):
                    pass
            except Exception as e:
                raise fmt.CheckpointError(f"shard {path} is corrupt ({e}); use another checkpoint or re-convert") from None


def export(ckpt, out, dtype: Optional[str] = None, force: bool = False, progress: bool = True,
           max_shard_bytes: int = MAX_SHARD_BYTES, log: Callable = print,
           lora_separate: bool = False, remote_code: Optional[bool] = None) -> dict:
    """Write checkpoint `ckpt` (a checkpoint folder, or a training save dir with `latest`) as an
    HF folder at `out` in `dtype` (default: the checkpoint's). `remote_code` (default: on when the
    block size is > 1) adds the files `block_generate` needs (release.py). Returns a summary dict."""
    start = time.time()
    given = ckpt
    ckpt = fmt.Checkpoint.open(ckpt)
    out, tmp = prepare_out(out, force, sources=[given, ckpt.path], owned=lambda name: _exported(name, ckpt.path),
                           marker=EXPORT_MARKER)
    meta = ckpt.meta
    dtype = dtype or meta.dtype
    if dtype not in fmt.DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; use one of {', '.join(fmt.DTYPES)}")
    torch_dtype = fmt.DTYPES[dtype]
    cfg = meta.model
    family = get_family(cfg.arch)
    if remote_code is None:
        remote_code = meta.block_size > 1
    if remote_code and meta.mask_token_id is None:
        raise ConversionError(f"{ckpt} has no mask token, so block_generate could not draft: export it with "
                              "--no-remote-code, or convert the model again without --no-mask-token")
    check_shards(ckpt)
    tensors, gated = fmt.iter_full_tensors(ckpt), meta.gated
    if meta.lora is not None or lora_separate:
        adapters.check_adapter_shards(ckpt, required=lora_separate)
        tensors = adapters.iter_merged_full_tensors(ckpt, merge_lora=not (lora_separate or gated))

    # Plan the HF tensors (names, shapes) on meta tensors, then the files they go to.
    shapes = fmt.full_shapes(cfg, meta.tp)
    specs = {}
    for b in family.params(cfg):
        for n, t in b.to_hf(torch.empty(shapes[b.name], device="meta"), cfg).items():
            specs[n] = tuple(t.shape)
    files = plan_files(specs, torch_dtype, max_shard_bytes)
    names = [WEIGHTS_NAME] if len(files) == 1 else [
        f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))
    ]
    file_of = {n: names[k] for k, group in enumerate(files) for n in group}

    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc="export", unit="tensor", disable=not progress)
        writer, k = None, -1
        try:
            for name, full in tensors:
                for hf_name, t in family.find(name, cfg).to_hf(full, cfg).items():
                    if writer is None or file_of[hf_name] != names[k]:
                        if writer is not None:
                            writer.close()
                        k += 1
                        writer = fmt.SafetensorsWriter(tmp / names[k], {n: (specs[n], torch_dtype) for n in files[k]})
                    writer.write(hf_name, t.to(torch_dtype))
                    bar.update()
            writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        bar.close()
        if len(files) > 1:
            total = sum(torch.Size(s).numel() for s in specs.values()) * torch_dtype.itemsize
            index = {"metadata": {"total_size": total}, "weight_map": file_of}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = hf_config_dict(meta, dtype)
        if remote_code:
            config["auto_map"] = release.write_remote_code(tmp, family.hf_class)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / release.MODEL_CARD).write_text(release.model_card(meta, ckpt.path, family.hf_class, remote_code, gated))
        if meta.generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(meta.generation_config, indent=2) + "\n")
        if gated:
            adapters.write_drafter(ckpt, tmp / DRAFTER_DIR, torch_dtype, base_model_path=str(out))
        elif lora_separate:
            adapters.write_peft_adapter(ckpt, tmp / ADAPTER_DIR, torch_dtype, base_model_path=str(out))
        tok = ckpt.path / fmt.TOKENIZER_DIR
        if tok.is_dir():
            for f in tok.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        else:
            log(f"warning: {ckpt} has no tokenizer/; the export has none either")
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "megablock tools/export_hf.py", "ckpt": str(ckpt)}) + "\n")
        finish_out(tmp, out, owned=lambda name: _exported(name, ckpt.path), marker=EXPORT_MARKER)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {
        "out": str(out), "ckpt": str(ckpt), "arch": cfg.arch, "parameters": parameter_count(cfg)[1],
        "files": len(files), "dtype": dtype, "from_tp": meta.tp, "from_pp": meta.pp,
        "seconds": round(time.time() - start, 2),
        "lora": None if meta.lora is None else ("drafter" if gated else "separate" if lora_separate else "merged"),
        "remote_code": remote_code,
    }
    log(f"exported {cfg.arch} ({summary['parameters']:,} parameters, {meta.tp}x{meta.pp} shards) to "
        f"{out} as {family.hf_class} in {len(files)} file(s), {dtype}, in {summary['seconds']} s")
    return summary

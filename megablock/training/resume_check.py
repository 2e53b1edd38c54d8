"""Resume compares the run's config with the one saved beside the checkpoint.

`checkpoint.resume=true` promises the saved run continued exactly. Most keys decide what the
remaining steps compute (the data stream, batch composition, noise, model, optimizer state
layout), so a change there would silently train something else, or fail deep inside DeepSpeed
with `Missing key(s)` / `size mismatch`. Those changes are refused, each with the key, both values
and the fix. A few keys only decide how long the run goes, how often it reports or saves, or
where files go; those may change (SAFE_KEYS, SAFE_SECTIONS).

The learning-rate schedule (train.lr, min_lr, warmup_steps, decay) may change as well: the
trainer re-applies the configured schedule after loading (optim.follow_configured_schedule), so
extending a run (train.steps) or lowering its LR is a deliberate, supported continuation.

A LoRA checkpoint holds only the trainable parameters; resume rebuilds the frozen base from
model.init_from. The same path may hold other weights today (`convert_hf.py --out BASE --force`
of another model), so each LoRA checkpoint records what its base was (BASE_FILE: size, mtime and
SHA-256 of megablock.json and every model/ and lora/ shard) and resume refuses another base.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from megablock.checkpoint.format import METADATA_FILE, CheckpointError, read_metadata
from megablock.config import Config, ConfigError

logger = logging.getLogger(__name__)
BASE_FILE = "base.json"

SAFE_KEYS = {
    "train.steps", "train.log_interval", "train.eval_interval", "train.eval_batches", "train.exit_after_steps",
    "train.max_nonfinite_steps", "train.lr", "train.min_lr", "train.warmup_steps", "train.decay",
    "data.cache_dir",          # where megatron caches its indices (rebuilt identically)
    "model.attention_impl",    # another exact implementation of the same attention (CPU vs GPU)
}
SAFE_SECTIONS = {"checkpoint"}  # save_dir, interval, keep_last, resume, overwrite
PATH_KEYS = {"model.init_from", "data.prefix"}
_WHY = {
    "data": "the data stream (which tokens each step sees)",
    "model": "the model being trained",
    "parallel": "the layout of the saved engine and optimizer state",
    "diffusion": "the objective (masking, attention, curriculum)",
    "lora": "which parameters are trained and saved",
    "train": "what each step computes or how the optimizer state is laid out",
}


def _flatten(cfg: dict) -> dict[str, Any]:
    out = {}
    for section, values in cfg.items():
        if isinstance(values, dict):
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        else:
            out[section] = values
    return out


def _same_path(a, b) -> bool:
    def norm(v):
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return os.path.realpath(v) if isinstance(v, str) else v

    return a == b or norm(a) == norm(b)


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def resume_differences(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key that may not change on resume. A key missing
    from either side (a config from another megablock version) counts as its default."""
    defaults = _flatten(Config().to_dict())
    saved_flat, new_flat = _flatten(saved), _flatten(new)
    diffs = []
    for key in sorted(set(saved_flat) | set(new_flat)):
        if key in SAFE_KEYS or key.split(".")[0] in SAFE_SECTIONS:
            continue
        a, b = saved_flat.get(key, defaults.get(key)), new_flat.get(key, defaults.get(key))
        same = _same_path(a, b) if key in PATH_KEYS else a == b
        if not same:
            diffs.append((key, a, b))
    return diffs


def check_resume_compatible(saved: dict, new: dict, where: str = "the checkpoint") -> None:
    """Raise ConfigError naming every key whose change would break an exact resume."""
    new = yaml.safe_load(yaml.safe_dump(new, sort_keys=False))  # same types as the saved YAML
    diffs = resume_differences(saved, new)
    if not diffs:
        return
    lines = [f"  {key}: saved {_yaml(a)}, this run {_yaml(b)} (changes {_WHY.get(key.split('.')[0], 'the run')})"
             for key, a, b in diffs]
    sets = " ".join(f"{key}={_yaml(a)!r}" if " " in _yaml(a) else f"{key}={_yaml(a)}" for key, a, _ in diffs)
    raise ConfigError(
        f"checkpoint.resume: {where} was saved by a run with other settings, and resuming would not "
        f"continue that run:\n" + "\n".join(lines) + "\n"
        f"Fix: resume with the saved values (--set {sets}), or start a new run in another "
        f"checkpoint.save_dir (or checkpoint.overwrite=true to replace this one). These may change on "
        f"resume: {', '.join(sorted(SAFE_KEYS))} and checkpoint.*"
    )


def check_resume(ckpt, new: dict, model_cfg=None) -> None:
    """Compare step folder `ckpt`'s config.yaml (and, given the model config this run built, its
    megablock.json architecture) with this run's; called before DeepSpeed loads anything."""
    ckpt = Path(ckpt)
    saved_file = ckpt / "config.yaml"
    if saved_file.is_file():
        try:
            saved = yaml.safe_load(saved_file.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{saved_file} is not valid YAML ({e}); the checkpoint is damaged: resume from "
                              f"another step folder (edit {ckpt.parent / 'latest'})") from None
        check_resume_compatible(saved if isinstance(saved, dict) else {}, new, where=str(ckpt))
    else:
        logger.warning("%s has no config.yaml; resuming without comparing the configs", ckpt)
    if model_cfg is not None:
        _check_architecture(ckpt, model_cfg)


def _check_architecture(ckpt: Path, model_cfg) -> None:
    """The same init_from path may hold another model today (re-converted): compare shapes."""
    try:
        saved = read_metadata(ckpt).model.to_dict()
    except CheckpointError:
        return  # loading the checkpoint reports a damaged megablock.json with its own message
    saved, now = (json.loads(json.dumps(c)) for c in (saved, model_cfg.to_dict()))  # the same JSON types
    diffs = [(k, saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: saved {a!r}, this run {b!r}" for k, a, b in diffs[:8])
        raise ConfigError(
            f"checkpoint.resume: {ckpt} holds another model than this run builds ({shown}); "
            f"model.init_from must give the model the run started from: point it there, or start a new "
            f"run in another checkpoint.save_dir"
        )


# ----------------------------------------------------------------------------- LoRA base
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def base_files(base: Path) -> list[Path]:
    """What building the frozen base reads from checkpoint `base`: megablock.json and the model/
    and lora/ shards (a LoRA checkpoint as init_from has its adapters merged in)."""
    return [base / METADATA_FILE, *sorted(base.glob("model/*.safetensors")), *sorted(base.glob("lora/*.safetensors"))]


def base_fingerprint(base, previous: dict | None = None) -> dict:
    """{"init_from", "files": {relative path: {size, mtime_ns, sha256}}} of checkpoint `base`. A
    shard whose size and mtime equal `previous`'s (an earlier fingerprint's "files") keeps that
    hash instead of being read again: only the first launch of a run hashes the whole base."""
    base, previous = Path(base), previous or {}
    files = {}
    for path in base_files(base):
        name, st = str(path.relative_to(base)), path.stat()
        old = previous.get(name) or {}
        unchanged = name != METADATA_FILE and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "sha256": old["sha256"] if unchanged and "sha256" in old else _sha256(path)}
    return {"init_from": str(base), "files": files}


def check_base(ckpt, base) -> dict | None:
    """Refuse to resume LoRA checkpoint `ckpt` on a base other than the one it was trained on
    (model.init_from resolved to `base`); returns the base's fingerprint for the next saves, or
    None for a checkpoint from before BASE_FILE (not compared)."""
    ckpt, record = Path(ckpt), Path(ckpt) / BASE_FILE
    if not record.is_file():
        logger.warning("%s has no %s (saved by an older megablock); resuming without checking that "
                       "model.init_from still holds the base it was trained on", ckpt, BASE_FILE)
        return None
    try:
        saved = json.loads(record.read_text())
        saved_files = saved["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{record} is damaged ({type(e).__name__}: {e}); resume from another step folder "
                          f"(edit {ckpt.parent / 'latest'})") from None
    now = base_fingerprint(base, saved_files)
    changed = [name for name in sorted(set(saved_files) | set(now["files"]))
               if (saved_files.get(name) or {}).get("sha256") != (now["files"].get(name) or {}).get("sha256")]
    if changed:
        shown = ", ".join(
            f"{name} ({'missing now' if name not in now['files'] else 'new' if name not in saved_files else 'other content'})"
            for name in changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(
            f"checkpoint.resume: model.init_from={base} is not the base {ckpt} was trained on (recorded in "
            f"{record}): {shown}. A LoRA checkpoint holds only the adapters, and resume rebuilds the frozen "
            f"base from model.init_from, so the run would train its adapters on other weights. Fix: restore "
            f"the original base (saved at {saved.get('init_from')}) and point model.init_from at it, or start a "
            f"new run in another checkpoint.save_dir"
        )
    return now

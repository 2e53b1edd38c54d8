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
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from megablock.checkpoint.format import METADATA_FILE
from megablock.config import Config, ConfigError

logger = logging.getLogger(__name__)

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
        saved = json.loads((ckpt / METADATA_FILE).read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # read_metadata reports a damaged megablock.json with its own message
    now = json.loads(json.dumps(model_cfg.to_dict()))  # same types as the saved JSON
    diffs = [(k, saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: saved {a!r}, this run {b!r}" for k, a, b in diffs[:8])
        raise ConfigError(
            f"checkpoint.resume: {ckpt} holds another model than this run builds ({shown}); "
            f"model.init_from must give the model the run started from: point it there, or start a new "
            f"run in another checkpoint.save_dir"
        )

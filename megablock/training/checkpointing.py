"""Training checkpoints: DeepSpeed engine state beside megablock's model shards.

SAVE/step_0000100/
    megablock.json, model/tp00_pp000.safetensors ...   (the sharded model format: export_hf.py
    tokenizer/                                           and model.init_from read it directly)
    lora/tp00_pp000.safetensors ...                      (LoRA runs: adapters, see below)
    deepspeed/                                          (optimizer, scheduler, ZeRO partitions)
    trainer_state.json                                   (step, consumed samples/tokens, stage)
    rng/rank00000.pt, config.yaml
SAVE/latest                                              (names the newest complete step folder)

A save is written into `step_X.tmp`, renamed when every rank has finished, and only then named
in `latest` (itself replaced atomically): an interrupted save never becomes `latest`.

LoRA runs (lora.enabled): model/ keeps the complete frozen base (equal to model.init_from's
weights, plus trained norms with lora.train_norms), so every reader of model/ finds a whole
model; the adapters (lora_A/lora_B per target linear, the mask-token row delta) go to
lora/tp{TT}_pp{PPP}.safetensors, one per rank like the model shards, and megablock.json gets a
"lora" entry (rank, alpha, targets, trainable parameter count). DeepSpeed's state excludes the
frozen parameters (exclude_frozen_parameters): it holds the trainable ones and their optimizer
state only, and resume rebuilds the frozen base from model.init_from. model/ + lora/ are what
loading (megablock.checkpoint.loading: merged) and tools/export_hf.py (merged, or
--lora-separate) read.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megablock.checkpoint import adapters
from megablock.checkpoint.format import (
    LATEST_FILE, TOKENIZER_DIR, make_metadata, read_metadata, resolve_checkpoint, save_shard, write_metadata,
)
from megablock.config import LoraSection
from megablock.model.lora import split_weights

logger = logging.getLogger(__name__)
STEP_PREFIX = "step_"


@dataclass
class TrainerState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    curriculum_stage: int = 0
    block_size: int = 1

    def advance(self, samples: int, tokens: int, curriculum_stage: int, block_size: int) -> None:
        """Account for one finished optimizer step."""
        self.step += 1
        self.consumed_samples += samples
        self.consumed_tokens += tokens
        self.curriculum_stage, self.block_size = curriculum_stage, block_size

    @classmethod
    def from_dict(cls, d: dict) -> "TrainerState":
        d = dict(d)
        if "stage" in d:  # written as "stage" before the curriculum stage got its own name
            d["curriculum_stage"] = d.pop("stage")
        return cls(**d)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def save_training_checkpoint(
    *, engine, model, info, save_dir: str, state: TrainerState, run_config: dict,
    source_meta: dict, tokenizer_dir: Optional[Path], keep_last: int, zero_stage: int,
    trainable_parameters: Optional[int] = None,
) -> Path:
    """Collective: every rank calls it. Returns the final step folder."""
    save_dir = Path(save_dir)
    name = step_dir_name(state.step)
    final, tmp = save_dir / name, save_dir / (name + ".tmp")
    if info.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()

    lora_settings = model.lora
    engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False, exclude_frozen_parameters=lora_settings is not None)
    weights, adapter_weights = split_weights(_gather_weights(model, zero_stage))
    if info.dp_rank == 0:
        dtype = next(iter(weights.values())).dtype
        if dtype not in (torch.float32, torch.bfloat16):
            weights = {k: v.float() for k, v in weights.items()}
            adapter_weights = {k: v.float() for k, v in adapter_weights.items()}
        save_shard(tmp, info.tp_rank, info.pp_rank, weights)
        if lora_settings is not None:
            adapters.save_adapter_shard(tmp, info.tp_rank, info.pp_rank, adapter_weights)
    rng_dir = tmp / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng_dir / f"rank{info.rank:05d}.pt")
    _barrier()

    if info.rank == 0:
        dtype = "bf16" if next(iter(weights.values())).dtype == torch.bfloat16 else "fp32"
        meta = make_metadata(
            model.cfg, info.tp, info.pp, run_config["parallel"]["layers_per_stage"], dtype,
            source=source_meta.get("source", "random init"), block_size=state.block_size, step=state.step,
            curriculum_stage=state.curriculum_stage, shift=run_config["diffusion"]["shift"],
            attention=run_config["diffusion"]["attention"],
            **{k: v for k, v in source_meta.items() if k in ("generation_config",)},
            **({"lora": adapters.checkpoint_meta(lora_settings, trainable_parameters)}
               if lora_settings is not None else {}),
        )
        write_metadata(tmp, meta)
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
        (tmp / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = save_dir / (LATEST_FILE + ".tmp")
        latest_tmp.write_text(name + "\n")
        os.replace(latest_tmp, save_dir / LATEST_FILE)
        _prune(save_dir, keep_last, keep=name)
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def _gather_weights(model, zero_stage: int) -> dict:
    if zero_stage == 3:
        import deepspeed  # deferred: DeepSpeed is only needed when ZeRO-3 partitions the weights

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in model.weights().items()}
    return {k: v.detach() for k, v in model.weights().items()}


def _prune(save_dir: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in save_dir.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(save_dir: Optional[str]) -> Optional[Path]:
    if save_dir is None or not (Path(save_dir) / LATEST_FILE).is_file():
        return None
    return resolve_checkpoint(save_dir)


def load_training_state(engine, model, ckpt: Path, rank: int) -> TrainerState:
    """Restore engine (weights, optimizer, scheduler) and trainer state from a step folder."""
    lora_settings = model.lora
    saved = (read_metadata(ckpt).get("lora") or None)
    if (lora_settings is None) != (saved is None) or (
        saved is not None and LoraSection.from_saved(saved) != lora_settings
    ):
        raise RuntimeError(
            f"{ckpt} was saved with lora={saved} but this run has lora="
            f"{lora_settings}; resume with the same lora settings"
        )
    # LoRA checkpoints hold only the trainable parameters (the frozen base comes from init_from).
    load_path, _ = engine.load_checkpoint(str(ckpt), tag="deepspeed", load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=lora_settings is None)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no engine state in {ckpt}/deepspeed; the checkpoint is incomplete")
    state = TrainerState.from_dict(json.loads((ckpt / "trainer_state.json").read_text()))
    rng_file = ckpt / "rng" / f"rank{rank:05d}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
    return state

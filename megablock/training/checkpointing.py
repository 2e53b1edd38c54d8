"""Training checkpoints: DeepSpeed engine state beside megablock's model shards.

SAVE/step_0000100/
    megablock.json, model/tp00_pp000.safetensors ...   (the sharded model format: export_hf.py
    tokenizer/                                           and model.init_from read it directly)
    lora/tp00_pp000.safetensors ...                      (LoRA runs: adapters, see below)
    deepspeed/                                          (optimizer, scheduler, ZeRO partitions)
    trainer_state.json                                   (step, consumed samples/tokens, stage)
    rng/rank00000.safetensors, config.yaml               (RNG states: tensors + JSON, no pickle)
SAVE/latest                                              (names the newest complete step folder)
SAVE/checkpoints.json                                    (the step folders this run wrote: the only
                                                          ones keep_last pruning deletes; run_dir)

A save is written into `step_X.tmp`, renamed when every rank has finished, and only then named
in `latest` (itself replaced atomically): an interrupted save never becomes `latest`. A save that
fails because the disk is full says so (DiskFullError) and removes its partial folder.

Trust: megablock's own files (safetensors, JSON, YAML) cannot run code when read; the RNG states
used to be a pickle (rng/rank*.pt), and such files from older checkpoints are read only with
torch.load(weights_only=True) and the three numpy globals an RNG state needs. DeepSpeed's engine
state in deepspeed/ is a pickle that DeepSpeed itself loads with weights_only=False; resume hands
DeepSpeed a checkpoint engine that loads it with weights_only=True and an allowlist of the few
DeepSpeed classes its files hold (DEEPSPEED_SAFE_GLOBALS), so a planted object is refused, not run.

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

import errno
import json
import logging
import os
import pickle
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megablock.checkpoint import adapters
from megablock.checkpoint.format import (
    LATEST_FILE, TOKENIZER_DIR, Checkpoint, CheckpointMeta, read_metadata, resolve_checkpoint, save_shard,
    write_metadata,
)
from megablock.config import Config
from megablock.model.lora import split_weights
from megablock.model.params import parameter_count
from megablock.parallel.state import ParallelInfo
from megablock.training.resume_check import BASE_FILE, base_fingerprint, check_base, check_resume
from megablock.training.run_dir import STEP_PREFIX, prune_checkpoints, record_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class TrainerState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    curriculum_stage: int = 0
    block_size: int = 1
    clip_min: Optional[float] = None
    clip_max: Optional[float] = None
    """diffusion.schedule=adaptive: the interval the last search chose (None before any)."""
    searched_stage: Optional[int] = None
    """diffusion.schedule=adaptive: the curriculum stage the last search was made in."""

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


RNG_FILE = "rank{rank:05d}.safetensors"
LEGACY_RNG_FILE = "rank{rank:05d}.pt"


class CheckpointLoadError(ValueError):
    """A file of a training checkpoint is damaged or not what megablock wrote (one line: the file, the fix)."""


class DiskFullError(OSError):
    """A checkpoint could not be written because its file system is full."""


def save_rng_state(path: Path) -> None:
    """This process's python, numpy and torch (CPU) RNG states, without pickle: the state arrays
    as safetensors tensors, the few scalars as JSON in the file's metadata."""
    from safetensors.torch import save_file

    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch": torch.get_rng_state(),
    }
    scalars = {"python_version": py_version, "python_gauss": py_gauss, "numpy_kind": np_kind,
               "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss)}
    save_file(tensors, str(path), metadata={"rng": json.dumps(scalars)})


def load_rng_state(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            scalars = json.loads(f.metadata()["rng"])
            py_state = tuple(int(x) for x in f.get_tensor("python_state").tolist())
            np_keys = f.get_tensor("numpy_keys").numpy().astype(np.uint32)
            torch_state = f.get_tensor("torch")
    except Exception as e:  # safetensors raises its own SafetensorError for a truncated header or body
        raise CheckpointLoadError(
            f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}): the RNG state is truncated "
            f"or damaged. Resume from another step folder (edit {path.parent.parent.parent / LATEST_FILE}), or delete "
            f"{path.parent} to resume without restoring the RNG (the run is then not bit-exact)"
        ) from None
    random.setstate((scalars["python_version"], py_state, scalars["python_gauss"]))
    np.random.set_state((scalars["numpy_kind"], np_keys, scalars["numpy_pos"], scalars["numpy_has_gauss"],
                         scalars["numpy_gauss"]))
    torch.set_rng_state(torch_state)


def load_legacy_rng_state(path: Path) -> None:
    """rng/rank*.pt of checkpoints written before the safetensors format: unpickled with
    weights_only=True, allowing only what numpy's RNG state array needs (a file that asks for
    anything else, e.g. a planted os.system, is refused instead of run)."""
    from numpy._core.multiarray import _reconstruct

    allowed = [_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        with torch.serialization.safe_globals(allowed):
            rng = torch.load(path, weights_only=True)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
    except Exception as e:  # UnpicklingError names the forbidden global; bad structure is TypeError/KeyError
        raise CheckpointLoadError(
            f"{path} is not a plain RNG state ({str(e).splitlines()[0][:200]}); refusing to unpickle it, since "
            f"that could run code planted in the checkpoint. If you trust the folder, delete {path.parent} to "
            f"resume without restoring the RNG (the run is then not bit-exact), or resume from another step"
        ) from None


def deepspeed_safe_globals() -> list:
    """The globals DeepSpeed's engine and ZeRO files pickle besides tensors and builtins (found by
    loading the files of ZeRO 0-3, bf16 and LoRA runs with weights_only=True): plain records and an
    enum, none of which runs code when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with `load` unpickling under weights_only=True and
    `deepspeed_safe_globals()` (everything else is delegated to the engine it wraps)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path, map_location=None):
        try:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointLoadError(
                f"{path} holds more than DeepSpeed's engine state ({str(e).splitlines()[0][:240]}); refusing to "
                f"unpickle it, since that could run code planted in the checkpoint. Resume from another step "
                f"folder (edit {Path(path).parent.parent.parent / LATEST_FILE}) or one you trust"
            ) from None
        except (RuntimeError, EOFError, OSError) as e:  # truncated or not a torch file
            raise CheckpointLoadError(
                f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}): the file is truncated "
                f"or damaged. Resume from another step folder (edit {Path(path).parent.parent.parent / LATEST_FILE})"
            ) from None


@contextmanager
def weights_only_loads(engine):
    """Within the block, DeepSpeed's `engine` loads its files with WeightsOnlyCheckpointEngine."""
    inner = getattr(engine, "checkpoint_engine", None)
    if inner is None:
        yield
        return
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def _disk_full(err: BaseException, save_dir: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save reports a short write as "unexpected pos" / "file write failed" without errno.
    if isinstance(err, RuntimeError) and any(m in str(err) for m in ("unexpected pos", "file write failed", "No space left")):
        try:
            return shutil.disk_usage(save_dir).free < 256 * 2**20
        except OSError:
            return False
    return False


class Checkpointer:
    """The run's checkpoints in checkpoint.save_dir: what a save writes, where, and what resume
    reads back (torchtitan's CheckpointManager shape). Built once by the trainer from the typed
    config, the parallel layout and what it checkpoints (the DeepSpeed engine and the model);
    after that the trainer hands it its TrainerState only. `source` is the model.init_from
    checkpoint (None for random init): its tokenizer, source name and generation config go
    into every save, and a LoRA run's saves record the fingerprint of its frozen base."""

    def __init__(self, cfg: Config, info: ParallelInfo, engine, model, source: Optional[Checkpoint] = None):
        self.info, self.engine, self.model, self.source = info, engine, model, source
        self.save_dir = Path(cfg.checkpoint.save_dir) if cfg.checkpoint.save_dir is not None else None
        self.keep_last, self.zero_stage = cfg.checkpoint.keep_last, cfg.parallel.zero_stage
        self.run_config = cfg.to_dict()  # written as config.yaml; resume compares it with the new run's
        self.layers_per_stage = cfg.parallel.layers_per_stage
        self.shift, self.attention = cfg.diffusion.shift, cfg.diffusion.attention
        self.lora = model.lora  # None, or the settings the model's adapters were applied with
        self.trainable_parameters = parameter_count(model.cfg, self.lora)[0] if self.lora is not None else None
        self.tokenizer_dir = (source / TOKENIZER_DIR) if source is not None and (source / TOKENIZER_DIR).is_dir() else None
        self.lora_base: Optional[dict] = None
        """LoRA runs from a checkpoint, rank 0: the fingerprint of the frozen base (BASE_FILE)."""

    @property
    def _base_is_recorded(self) -> bool:
        return self.lora is not None and self.source is not None and self.info.rank == 0

    def latest(self) -> Optional[Path]:
        """The step folder `latest` names (None: no complete checkpoint, or no save_dir)."""
        if self.save_dir is None or not (self.save_dir / LATEST_FILE).is_file():
            return None
        return resolve_checkpoint(self.save_dir)

    def record_base(self) -> None:
        """Fingerprint the frozen base before training (a no-op when resume already did, or for a
        run without LoRA from a checkpoint): what the saves record is the base this run was built
        from. Hashed once per run; later launches compare sizes and mtimes first."""
        if self._base_is_recorded and self.lora_base is None:
            self.lora_base = base_fingerprint(self.source.path)

    def load(self) -> Optional[TrainerState]:
        """Resume from `latest`: refuse a config, architecture or LoRA base that would not continue
        the saved run, then restore engine, RNG and trainer state (None: nothing saved yet)."""
        ckpt = self.latest()
        if ckpt is None:
            return None
        check_resume(ckpt, self.run_config, self.model.cfg)
        if self.lora is not None and self.source is not None:
            self.lora_base = check_base(ckpt, self.source.path)  # the adapters' base is still model.init_from
        return load_training_state(self.engine, self.model, ckpt, self.info.rank)

    def save(self, step: int, state: TrainerState) -> Optional[Path]:
        """Collective: every rank calls it. Writes SAVE/step_XXXX (None without a save_dir);
        a full disk is reported as DiskFullError, and its partial folder removed."""
        if self.save_dir is None:
            return None
        name = step_dir_name(step)
        tmp = self.save_dir / (name + ".tmp")
        try:
            return self._write(name, state)
        except (OSError, RuntimeError) as err:
            if not _disk_full(err, self.save_dir):
                raise
            if self.info.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays, and the space is back
            raise self._disk_full_error(name, err) from err

    def _disk_full_error(self, name: str, err: BaseException) -> DiskFullError:
        save_dir = self.save_dir
        latest = (save_dir / LATEST_FILE).read_text().strip() if (save_dir / LATEST_FILE).is_file() else None
        try:
            free = f"{shutil.disk_usage(save_dir).free / 2**20:,.0f} MiB free after removing the partial save"
        except OSError:
            free = "free space unknown"
        return DiskFullError(
            errno.ENOSPC,
            f"saving checkpoint {name} into {save_dir} failed: the disk is full ({free}; {type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]}). Free space or point checkpoint.save_dir at a larger disk "
            f"(lower checkpoint.keep_last keeps fewer checkpoints), then resume with checkpoint.resume=true; "
            + (f"'latest' still names the complete {latest}" if latest else "no checkpoint was completed yet"),
        )

    def _metadata(self, state: TrainerState, dtype: str) -> CheckpointMeta:
        source = self.source.meta if self.source is not None else None
        return CheckpointMeta(
            self.model.cfg, self.info.tp, self.info.pp, self.layers_per_stage, dtype,
            source=source.source if source is not None else CheckpointMeta.source,
            block_size=state.block_size, step=state.step, curriculum_stage=state.curriculum_stage,
            shift=self.shift, attention=self.attention,
            generation_config=source.generation_config if source is not None else None,
            lora=self.lora, trainable_parameters=self.trainable_parameters,
        )

    def _write(self, name: str, state: TrainerState) -> Path:
        info, save_dir = self.info, self.save_dir
        final, tmp = save_dir / name, save_dir / (name + ".tmp")
        if info.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()

        self.engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False,
                                    exclude_frozen_parameters=self.lora is not None)
        weights, adapter_weights = split_weights(_gather_weights(self.model, self.zero_stage))
        if info.dp_rank == 0 and info.cp_rank == 0:  # context ranks hold the same weights
            dtype = next(iter(weights.values())).dtype
            if dtype not in (torch.float32, torch.bfloat16):
                weights = {k: v.float() for k, v in weights.items()}
                adapter_weights = {k: v.float() for k, v in adapter_weights.items()}
            save_shard(tmp, info.tp_rank, info.pp_rank, weights)
            if self.lora is not None:
                adapters.save_adapter_shard(tmp, info.tp_rank, info.pp_rank, adapter_weights)
        rng_dir = tmp / "rng"
        rng_dir.mkdir(exist_ok=True)
        save_rng_state(rng_dir / RNG_FILE.format(rank=info.rank))
        _barrier()

        if info.rank == 0:
            dtype = "bf16" if next(iter(weights.values())).dtype == torch.bfloat16 else "fp32"
            write_metadata(tmp, self._metadata(state, dtype))
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
            (tmp / "config.yaml").write_text(yaml.safe_dump(self.run_config, sort_keys=False))
            if self._base_is_recorded and self.lora_base is not None:
                (tmp / BASE_FILE).write_text(json.dumps(self.lora_base, indent=2) + "\n")
            if self.tokenizer_dir is not None:
                shutil.copytree(self.tokenizer_dir, tmp / TOKENIZER_DIR)
            # On record before the rename, so a kill in between never leaves a step folder the run
            # would not own (pruning and overwrite delete only folders on record).
            record_checkpoint(save_dir, name)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            latest_tmp = save_dir / (LATEST_FILE + ".tmp")
            latest_tmp.write_text(name + "\n")
            os.replace(latest_tmp, save_dir / LATEST_FILE)
            prune_checkpoints(save_dir, keep_last=self.keep_last, keep=name)
            logger.info("saved checkpoint %s", final)
        _barrier()
        return final


def _gather_weights(model, zero_stage: int) -> dict:
    if zero_stage == 3:
        import deepspeed  # deferred: DeepSpeed is only needed when ZeRO-3 partitions the weights

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in model.weights().items()}
    return {k: v.detach() for k, v in model.weights().items()}


def read_trainer_state(path: Path, fix: str) -> TrainerState:
    try:
        return TrainerState.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as e:  # missing, not JSON, unknown or missing keys
        raise CheckpointLoadError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {fix}") from None


def load_training_state(engine, model, ckpt: Path, rank: int) -> TrainerState:
    """Restore engine (weights, optimizer, scheduler) and trainer state from a step folder."""
    lora_settings = model.lora
    saved = read_metadata(ckpt).lora
    if saved != lora_settings:
        raise CheckpointLoadError(
            f"{ckpt} was saved with lora={saved} but this run has lora="
            f"{lora_settings}; resume with the same lora settings"
        )
    other = f"resume from another step folder (edit {ckpt.parent / LATEST_FILE})"
    if not (ckpt / "deepspeed").is_dir():  # DeepSpeed would fail with an empty AssertionError
        raise CheckpointLoadError(f"{ckpt}/deepspeed is missing: the checkpoint is incomplete (a copy without it?); "
                                  f"{other}, or copy the folder back")
    state = read_trainer_state(ckpt / "trainer_state.json", other)  # before DeepSpeed loads anything
    # LoRA checkpoints hold only the trainable parameters (the frozen base comes from init_from).
    with weights_only_loads(engine):
        load_path, _ = engine.load_checkpoint(str(ckpt), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=lora_settings is None)
    if load_path is None:
        raise CheckpointLoadError(f"DeepSpeed found no engine state in {ckpt}/deepspeed; the checkpoint is incomplete: {other}")
    rng_file, legacy = ckpt / "rng" / RNG_FILE.format(rank=rank), ckpt / "rng" / LEGACY_RNG_FILE.format(rank=rank)
    if rng_file.is_file():
        load_rng_state(rng_file)
    elif legacy.is_file():
        load_legacy_rng_state(legacy)
    return state

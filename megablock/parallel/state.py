"""One distributed initialisation for `deepspeed`, `torchrun` and plain `python`.

Rank order is tensor fastest, then data, then pipeline: megatron-core's `parallel_state`
(order "tp-cp-ep-dp-pp") and DeepSpeed's `PipeModelDataParallelTopology` agree on it, so a
DeepSpeed pipeline and megatron-core tensor parallelism can share one world.
"""
from __future__ import annotations

import atexit
import logging
import os
import random
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the TP x DP x PP grid; the default is one process.

    The model, the shard loader and the optimizer take this instead of reading megatron-core's
    globals, so a model can be built (and run at TP = 1) without any process group.
    """

    world_size: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    device: torch.device = torch.device("cpu")
    tp_group: Optional[object] = field(default=None, compare=False, repr=False)
    """The tensor-parallel process group (None: no torch.distributed, TP = 1)."""
    model_parallel_group: Optional[object] = field(default=None, compare=False, repr=False)
    """The TP x PP group: one replica of the model (for counts and norms over the whole model)."""
    cp: int = 1
    """Context-parallel size: ranks that split each sample's sequence (same samples, same weights)."""
    cp_rank: int = 0
    cp_group: Optional[object] = field(default=None, compare=False, repr=False)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_process_group(device: torch.device | None = None, timeout_minutes: int = 30) -> None:
    """Start torch.distributed: from the launcher's environment (deepspeed, torchrun, Slurm
    scripts that export RANK/WORLD_SIZE), or as a world of one for plain `python`."""
    if dist.is_initialized():
        return
    device = device or default_device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        # A world of one gets an explicit rendezvous, not exported RANK/MASTER_PORT variables:
        # every subprocess (a tool, a training run) would inherit those and try to rendezvous
        # on this process's port. Only LOCAL_RANK is exported: DeepSpeed's engine asserts it,
        # and a child that inherits it still starts a world of its own.
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, timeout=timeout)
    # DeepSpeed's communication layer wraps the group just made (PipelineModule needs it).
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    _remove_shm_buffer_at_exit()


def _remove_shm_buffer_at_exit() -> None:
    """DeepSpeed's CPU all-reduce over shared memory (all ranks on one host, as under the
    `deepspeed` launcher) creates a 64 MiB /dev/shm segment per rank and never unlinks it, so
    every run leaves RAM behind until reboot. Unlinking at exit is safe: ranks that are still
    running keep their mappings, and every rank opened every segment during initialisation."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")

    def remove() -> None:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass

    atexit.register(remove)


def initialize_parallel(tp: int = 1, pp: int = 1, device: torch.device | None = None, cp: int = 1) -> ParallelInfo:
    """Initialise torch.distributed and megatron-core's TP/CP/DP/PP groups (idempotent)."""
    device = device or default_device()
    init_process_group(device)
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(
            f"world size {world} is not divisible by parallel.tensor x parallel.pipeline x parallel.context = "
            f"{tp} x {pp} x {cp}; launch a multiple of {tp * pp * cp} processes"
        )
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() != tp
            or parallel_state.get_pipeline_model_parallel_world_size() != pp
            or parallel_state.get_context_parallel_world_size() != cp
        ):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            order="tp-cp-ep-dp-pp",
            create_gloo_process_groups=device.type == "cuda",
        )
        logger.info("initialised parallel groups: world %d = TP %d x CP %d x DP %d x PP %d", world, tp, cp,
                    world // (tp * pp * cp), pp)
    return parallel_info(device)


def parallel_info(device: torch.device | None = None) -> ParallelInfo:
    return ParallelInfo(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device or default_device(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        model_parallel_group=parallel_state.get_model_parallel_group(),
        cp=parallel_state.get_context_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        cp_group=parallel_state.get_context_parallel_group(),
    )


def current_parallel() -> ParallelInfo:
    """The layout set up by `initialize_parallel`, or one process when there is none: the default
    of the loaders' `parallel` argument (the model itself is always handed its layout)."""
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return parallel_info()
    return ParallelInfo()


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """The `mpu` object `deepspeed.initialize(mpu=...)` expects, backed by megatron-core.

    DeepSpeed asks for get_model_parallel_* (its name for tensor parallelism) and the data
    parallel group, which sets its batch arithmetic. Context parallelism is DeepSpeed's
    "sequence parallelism" (Ulysses) as far as the engine is concerned: ranks that share weights
    and samples. Given get_sequence_* it averages gradients and shards ZeRO state over the
    data x context group, dividing the sum by the data-parallel size only, so each context rank's
    loss is its share of the sample's loss and the shares add up (megablock.diffusion.context).
    """

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_sequence_parallel_rank = staticmethod(parallel_state.get_context_parallel_rank)
    get_sequence_parallel_world_size = staticmethod(parallel_state.get_context_parallel_world_size)
    get_sequence_parallel_group = staticmethod(parallel_state.get_context_parallel_group)

    @staticmethod
    def get_sequence_data_parallel_group():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    @staticmethod
    def get_sequence_data_parallel_world_size():
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    @staticmethod
    def get_sequence_data_parallel_rank():
        return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def seed_everything(seed: int, info: ParallelInfo | None = None) -> None:
    """Seed python, numpy and torch.

    Every rank gets the same seed: model init must agree across DP ranks and the data pipeline
    draws its noise from generators keyed by (seed, sample index), so TP ranks see the same
    data and DP ranks different data by construction rather than by seed offsets. Dropout is
    not used by these models, so no per-TP-rank RNG tracker is needed.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)

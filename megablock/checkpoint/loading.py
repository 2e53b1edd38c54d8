"""Loading a model from a checkpoint: this rank's shard of a megablock checkpoint (any saved
TP x PP, LoRA adapters merged), or a model built in memory from HF tensors through the family
mappings (no checkpoint written)."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from megablock.model.config import ModelConfig, stage_layer_ranges
from megablock.model.transformer import BlockDiffusionLM
from megablock.parallel.state import ParallelInfo, current_parallel

from . import adapters
from .format import Checkpoint, CheckpointMeta, iter_full_tensors, load_shard, shard_state_dict
from .mappings import get_family

logger = logging.getLogger(__name__)


def stage_shard(ckpt: Checkpoint, parallel: ParallelInfo, layers_per_stage: Optional[list] = None,
                merge_lora: bool = True) -> dict:
    """The tensors of `parallel`'s (TP rank, PP stage): read directly when the checkpoint was
    saved at the same layout, else resharded through full tensors (any saved TP x PP loads at any
    other). A LoRA checkpoint's adapters (CKPT/lora/) are merged into the weights; with
    `merge_lora=False` (a gated drafter's base) they are left out."""
    meta, cfg = ckpt.meta, ckpt.meta.model
    tp, tp_rank, pp, pp_rank = parallel.tp, parallel.tp_rank, parallel.pp, parallel.pp_rank
    wanted = tuple(len(r) for r in stage_layer_ranges(cfg.num_layers, pp, layers_per_stage))
    merge = merge_lora and meta.lora is not None
    if (meta.tp, meta.pp, meta.layers_per_stage) == (tp, pp, wanted):
        shard = load_shard(ckpt, tp_rank, pp_rank)
        return adapters.merge_into_shard(ckpt, shard, tp_rank, pp_rank) if merge else shard
    # Resharding reads the whole model on each rank; convert at the training layout
    # (tools/convert_hf.py --tp --pp) to avoid that for large models.
    logger.info("resharding %s from TP%d x PP%d to TP%d x PP%d", ckpt, meta.tp, meta.pp, tp, pp)
    full = dict(adapters.iter_merged_full_tensors(ckpt) if merge else iter_full_tensors(ckpt))
    return shard_state_dict(full, cfg, tp, tp_rank, pp, pp_rank, layers_per_stage)


def load_model(
    path, parallel: Optional[ParallelInfo] = None, *, dtype: torch.dtype = torch.float32,
    layers_per_stage: Optional[list] = None,
) -> tuple[BlockDiffusionLM, CheckpointMeta]:
    """(model of this rank, checkpoint metadata) from a converted or training checkpoint folder
    (or a training save dir, which resolves to its `latest`), on `parallel.device`; `parallel`
    defaults to the current layout (megablock.parallel.state.current_parallel)."""
    parallel = parallel or current_parallel()
    ckpt = Checkpoint.open(path)
    model = BlockDiffusionLM(ckpt.meta.model, parallel, layers_per_stage=layers_per_stage, initialize=False)
    model.load_weights({k: v.float() for k, v in stage_shard(ckpt, parallel, layers_per_stage).items()})
    model.to(device=parallel.device, dtype=dtype)
    return model, ckpt.meta


def model_from_hf_tensors(cfg: ModelConfig, get: Callable[[str], torch.Tensor], parallel: ParallelInfo = ParallelInfo(),
                          dtype: torch.dtype = torch.float32) -> BlockDiffusionLM:
    """A model (pp = 1) holding `parallel`'s TP shard, each tensor mapped from HF tensors
    (`get(hf_name)`) by the family's declarative mappings: conversion in memory."""
    family = get_family(cfg.arch)
    model = BlockDiffusionLM(cfg, parallel, dtype=dtype, initialize=False)
    shard = {}
    for name in model.weights():
        b = family.find(name, cfg)
        shard[name] = b.split(b.to_megablock(get, cfg), parallel.tp, parallel.tp_rank, cfg).to(dtype)
    model.load_weights(shard)
    return model.eval()

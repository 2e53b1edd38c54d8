"""Load a sharded megablock checkpoint into this rank's model at the current TP x PP layout."""
from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core import parallel_state

from megablock.checkpoint.format import (
    load_full_state_dict, load_shard, model_config, read_metadata, resolve_checkpoint, shard_state_dict,
)
from megablock.model import lora
from megablock.model.config import stage_layer_ranges
from megablock.model.transformer import BlockDiffusionLM

logger = logging.getLogger(__name__)


def stage_shard(ckpt, meta: dict, layers_per_stage: Optional[list] = None) -> dict:
    """This rank's tensors: read directly when the checkpoint was saved at the same layout,
    else resharded through full tensors (any saved TP x PP loads at any other). A LoRA
    checkpoint's adapters (CKPT/lora/) are merged into the weights (megablock.model.lora)."""
    cfg = model_config(meta)
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    pp, pp_rank = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_rank()
    wanted = [len(r) for r in stage_layer_ranges(cfg.num_layers, pp, layers_per_stage)]
    if meta["tp"] == tp and meta["pp"] == pp and meta["layers_per_stage"] == wanted:
        return lora.merge_into_shard(ckpt, meta, load_shard(ckpt, tp_rank, pp_rank), tp_rank, pp_rank)
    # Resharding reads the whole model on each rank; convert at the training layout
    # (tools/convert_hf.py --tp --pp) to avoid that for large models.
    logger.info("resharding %s from TP%d x PP%d to TP%d x PP%d", ckpt, meta["tp"], meta["pp"], tp, pp)
    full = dict(lora.iter_merged_full_tensors(ckpt, meta)) if meta.get("lora") else load_full_state_dict(ckpt)
    return shard_state_dict(full, cfg, tp, tp_rank, pp, pp_rank, layers_per_stage)


def load_model(
    path, *, dtype: torch.dtype = torch.float32, layers_per_stage: Optional[list] = None,
    device: Optional[torch.device] = None,
) -> tuple[BlockDiffusionLM, dict]:
    """(model of this rank, checkpoint metadata) from a converted or training checkpoint folder
    (or a training save dir, which resolves to its `latest`)."""
    ckpt = resolve_checkpoint(path)
    meta = read_metadata(ckpt)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = BlockDiffusionLM(model_config(meta), pp_rank=pp_rank, layers_per_stage=layers_per_stage, initialize=False)
    model.load_weights({k: v.float() for k, v in stage_shard(ckpt, meta, layers_per_stage).items()})
    model.to(device=device or torch.device("cpu"), dtype=dtype)
    return model, meta

"""DeepSpeed pipeline stages over the same layers as the single-stage model.

Each rank builds only its own stage (`BlockDiffusionLM(pp_rank=...)`); the LayerSpecs below wrap
that stage's submodules, so PipelineModule builds nothing twice and the stage's weights keep
their checkpoint names. Between stages travel the hidden states, the position ids, the layout as
four integers and the document ids: never an S x S mask (each stage rebuilds it).
"""
from __future__ import annotations

import logging

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megablock.diffusion.layout import AttentionLayout
from megablock.model.config import stage_layer_ranges
from megablock.model.rope import rope_cos_sin
from megablock.model.transformer import BlockDiffusionLM

logger = logging.getLogger(__name__)


def pack_layout(layout: AttentionLayout, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(layout ints [4], doc ids [b, L]) — DeepSpeed sends tensors only, and no bools."""
    if layout.rows is not None:
        raise ValueError("pipeline stages exchange the full sequence; pass the batch before drop_unmasked_blocks")
    has_docs = layout.doc_ids is not None
    ints = torch.cat([layout.to_tensor(), torch.tensor([int(has_docs)])])
    docs = layout.doc_ids.long() if has_docs else torch.zeros(batch, layout.seq_len, dtype=torch.long)
    return ints, docs


def unpack_layout(ints: torch.Tensor, docs: torch.Tensor) -> AttentionLayout:
    return AttentionLayout.from_tensor(ints[:3], docs if int(ints[3]) else None)


class _StageRef:
    """Holds the stage without registering it as a submodule (its weights are registered by the
    wrappers that use them, once each)."""

    def __init__(self, stage: BlockDiffusionLM):
        self.stage = stage


class EmbeddingPipe(nn.Module):
    def __init__(self, stage: BlockDiffusionLM):
        super().__init__()
        self.embedding = stage.embedding
        self.ref = _StageRef(stage)

    def forward(self, inputs):
        input_ids, position_ids, layout_ints, docs = inputs
        stage = self.ref.stage
        hidden = stage.embed(input_ids, stage.adapter_gate(unpack_layout(layout_ints, docs), device=input_ids.device))
        if stage.sequence_parallel:  # stages then pass their [S / t, b, H] shards along
            hidden = stage.shard_sequence(hidden)
        return hidden, position_ids, layout_ints, docs


class DecoderLayerPipe(nn.Module):
    def __init__(self, stage: BlockDiffusionLM, layer_index: int):
        super().__init__()
        self.layer = stage.layers[str(layer_index)]
        self.ref = _StageRef(stage)

    def forward(self, inputs):
        hidden, position_ids, layout_ints, docs = inputs
        layout = unpack_layout(layout_ints, docs)
        stage = self.ref.stage
        cos, sin = rope_cos_sin(stage.cfg, position_ids, hidden.dtype)
        return self.layer(hidden, cos, sin, layout, gate=stage.adapter_gate(layout, device=hidden.device)), position_ids, layout_ints, docs


class FinalNormPipe(nn.Module):
    def __init__(self, stage: BlockDiffusionLM):
        super().__init__()
        self.final_layernorm = stage.final_layernorm
        self.ref = _StageRef(stage)

    def forward(self, inputs):
        hidden = inputs[0]
        if self.ref.stage.sequence_parallel:
            hidden = self.ref.stage.unshard_sequence(hidden)
        return self.final_layernorm(hidden)


class PendingLogits:
    """What the last stage's head layer returns: the normed hidden states and the function that
    makes this rank's vocabulary logits from them. The loss function applies it to the positions
    that carry a loss only (the last stage sends nothing onward, so this need not be a tensor)."""

    def __init__(self, normed: torch.Tensor, logits_fn):
        self.normed, self.logits_fn = normed, logits_fn


class HeadPipe(nn.Module):
    """Untied output layer (its weight is registered here; the loss function calls it)."""

    def __init__(self, stage: BlockDiffusionLM):
        super().__init__()
        self.output_layer = stage.output_layer
        self.ref = _StageRef(stage)

    def forward(self, normed):
        return PendingLogits(normed, self.ref.stage.logits)


def _tied_head(embedding_pipe: EmbeddingPipe, normed):
    return PendingLogits(normed, embedding_pipe.ref.stage.logits)


class BlockDiffusionPipe(PipelineModule):
    """PipelineModule whose stage boundaries are megablock's `stage_layer_ranges`, so a pipeline
    stage owns exactly the layers (and checkpoint shard) the sharded format says it does."""

    def __init__(self, stage: BlockDiffusionLM, specs, stage_parts, **kwargs):
        self._megablock_parts = stage_parts
        self.stage_model = None
        super().__init__(layers=specs, **kwargs)
        self.stage_model = _StageRef(stage)

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._megablock_parts)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])


def build_pipeline(stage: BlockDiffusionLM, pp: int, tp: int, dp: int, layers_per_stage, loss_fn) -> BlockDiffusionPipe:
    cfg = stage.cfg
    ranges = stage_layer_ranges(cfg.num_layers, pp, layers_per_stage)
    if cfg.tie_word_embeddings:
        embed = TiedLayerSpec("embed", EmbeddingPipe, stage, tied_weight_attr=["embedding.weight"])
        head = TiedLayerSpec("embed", EmbeddingPipe, stage, forward_fn=_tied_head, tied_weight_attr=["embedding.weight"])
    else:
        embed, head = LayerSpec(EmbeddingPipe, stage), LayerSpec(HeadPipe, stage)
    specs = [embed] + [LayerSpec(DecoderLayerPipe, stage, i) for i in range(cfg.num_layers)]
    specs += [LayerSpec(FinalNormPipe, stage), head]
    # spec index of each stage's first layer: the embedding rides with stage 0, norm+head with the last.
    parts = [0] + [1 + r.stop for r in ranges[:-1]] + [len(specs)]
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    logger.info("pipeline: %d stages, layers per stage %s, tied embeddings %s", pp, [len(r) for r in ranges], cfg.tie_word_embeddings)
    return BlockDiffusionPipe(stage, specs, parts, topology=topology, loss_fn=loss_fn, dynamic_shape=True)

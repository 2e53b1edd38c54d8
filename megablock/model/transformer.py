"""The block-diffusion language model: one decoder family for Llama, Qwen2, Qwen3 and Mistral.

One class serves a whole model (pp = 1) and any pipeline stage: a stage owns a contiguous range
of global layer indices, the first stage the embedding, the last the final norm and the head
(and, with tied embeddings, its own copy of the embedding that training keeps tied).
Weights are named as in the sharded checkpoint format (global layer indices), so a checkpoint
shard loads with `load_state_dict` as it is.

The parallel layout is passed in (`ParallelInfo`; the default is one process) and the TP group is
handed to every megatron-core layer: the model reads no process-group globals and builds without
any process group. Running it needs torch.distributed (a world of one at TP = 1), because
megatron-core's layers ask for a group even when there is nothing to communicate.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from torch import nn

from megablock.diffusion.layout import AttentionLayout, noised_positions
from megablock.model.config import ModelConfig, stage_layer_ranges
from megablock.model.layers import (
    DecoderLayer, RMSNorm, VocabEmbedding, copy_to_tp_region, mark_tensor_parallel, megatron_config, normal_init,
)
from megablock.model.rope import rope_cos_sin
from megablock.parallel.sequence import gather_from_sequence, scatter_to_sequence
from megablock.parallel.state import ParallelInfo


class BlockDiffusionLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        parallel: ParallelInfo = ParallelInfo(),
        *,
        layers_per_stage: Optional[list] = None,
        dtype: torch.dtype = torch.float32,
        initialize: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.tp, self.tp_rank, pp = parallel.tp, parallel.tp_rank, parallel.pp
        self.tp_group = parallel.tp_group
        cfg.check_parallel(self.tp, pp)
        self.padded_vocab_size = cfg.padded_vocab_size(self.tp)
        self.layer_range = stage_layer_ranges(cfg.num_layers, pp, layers_per_stage)[parallel.pp_rank]
        self.pre_process = parallel.pp_rank == 0
        self.post_process = parallel.pp_rank == pp - 1
        mcfg = megatron_config(self.tp, pp, dtype, initialize)
        group = parallel.tp_group

        if self.pre_process or (self.post_process and cfg.tie_word_embeddings):
            self.embedding = VocabEmbedding(
                self.padded_vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std), config=mcfg,
                tp_group=group,
            )
            self.embedding.sparse_grad = cfg.tie_word_embeddings and pp == 1 and self.tp == 1
            mark_tensor_parallel(self.embedding, 0)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, mcfg, i, group) for i in self.layer_range})
        if self.post_process:
            self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            if not cfg.tie_word_embeddings:
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    cfg.hidden_size, self.padded_vocab_size, config=mcfg,
                    init_method=normal_init(cfg.init_std), bias=False, gather_output=False, tp_group=group,
                )
                mark_tensor_parallel(self.output_layer, 0)
        self.lora = None
        """The LoraSection applied by megablock.model.lora.apply_lora, or None."""
        self.sequence_parallel = False
        """Set with set_sequence_parallel."""
        self.attention_impl = "auto"
        """Set with set_attention_impl."""
        self.to(dtype)

    # The pieces are separate methods so pipeline stages can call them one by one.
    def adapter_gate(self, layout: AttentionLayout, kv_cache=None, device=None):
        """Where this forward's adapters apply (megablock.model.lora): None when nothing is gated
        (no LoRA, or lora.scope=all); with scope=noised the noised half of the layout, or the
        draft slots of a decoding forward, which its cache knows (`kv_cache.adapter_gate()`)."""
        if self.lora is None or self.lora.scope == "all":
            return None
        if kv_cache is not None:
            return kv_cache.adapter_gate()
        return noised_positions(layout, device)

    def embed(self, input_ids: torch.Tensor, gate=None) -> torch.Tensor:
        if gate is None or not hasattr(self.embedding, "mask_row_delta"):
            return self.embedding(input_ids)
        return self.embedding(input_ids, adapter_gate=gate)

    def encode(self, input_ids, position_ids, layout: Optional[AttentionLayout] = None, kv_cache=None) -> torch.Tensor:
        """Embedding and decoder layers: the final hidden states before the norm and the head. The
        attention follows `layout`, or, in decoding, `kv_cache` (which then needs no layout)."""
        if layout is None and kv_cache is None:
            raise ValueError("encode needs an attention layout or a KV cache")
        gate = self.adapter_gate(layout, kv_cache, input_ids.device)
        return self.run_layers(self.embed(input_ids, gate), position_ids, layout, kv_cache, gate)

    def run_layers(self, hidden, position_ids, layout: Optional[AttentionLayout], kv_cache=None, gate=None):
        cos, sin = rope_cos_sin(self.cfg, position_ids, hidden.dtype)
        if gate is None:
            gate = self.adapter_gate(layout, kv_cache, hidden.device)
        sp = self.sequence_parallel and kv_cache is None
        if sp:
            hidden = self.shard_sequence(hidden)
        for layer in self.layers.values():
            hidden = layer(hidden, cos, sin, layout, kv_cache, gate)
        return self.unshard_sequence(hidden) if sp else hidden

    def shard_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, S, H] (the same on every TP rank) -> this rank's [S / t, b, H] shard."""
        return scatter_to_sequence(hidden.transpose(0, 1), self.tp_group)

    def unshard_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's [S / t, b, H] shard -> [b, S, H] on every TP rank (for the final norm and
        the head, whose input gradient is complete on every rank: so backward just splits it)."""
        return gather_from_sequence(hidden, self.tp_group).transpose(0, 1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(self.final_layernorm(hidden))

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """This TP rank's slice of the vocabulary logits.

        Padded entries and the mask token are -inf: padding never reaches a softmax, a loss or
        a sample, and the model never predicts the mask token (MDLM's "zero masking"), so at
        block size 1 its distribution over real tokens is exactly the AR model's.
        """
        if self.cfg.tie_word_embeddings:
            normed = copy_to_tp_region(normed, self.tp_group)
            logits = torch.nn.functional.linear(normed, self.embedding.weight)
        else:
            logits, _ = self.output_layer(normed)
        local = logits.shape[-1]
        start = self.tp_rank * local
        first_pad = self.cfg.vocab_size - start
        mask_id = self.cfg.mask_token_id
        mask_here = mask_id is not None and start <= mask_id < start + local
        if first_pad < local or mask_here:
            # In place: the linear that made the logits keeps its inputs for backward, not its
            # output, and a [tokens, vocab] copy costs as much as a small layer. Outside autograd,
            # whose record of the write would copy the whole gradient in backward only to zero
            # these columns: every consumer of the logits (softmax, cross-entropy, entropy) gives
            # an entry at -inf a gradient of exactly 0 already.
            with torch.no_grad():
                logits[..., max(first_pad, 0):] = float("-inf")
                if mask_here:
                    logits[..., mask_id - start] = float("-inf")
        return logits

    def forward(self, input_ids, position_ids, layout: Optional[AttentionLayout] = None, kv_cache=None):
        return self.head(self.encode(input_ids, position_ids, layout, kv_cache))

    def weights(self) -> dict:
        """Tensors as stored in a checkpoint shard (megatron's empty `_extra_state` left out)."""
        return {k: v for k, v in self.state_dict().items() if not k.endswith("_extra_state")}

    def load_weights(self, shard: dict) -> None:
        """Load one checkpoint shard of this (TP rank, PP stage); every weight must be present."""
        expected = self.weights()
        missing = sorted(set(expected) - set(shard))
        unexpected = sorted(set(shard) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint shard does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; was it written for another architecture?"
            )
        for name, value in shard.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(expected[name].shape)}"
                )
        self.load_state_dict(shard, strict=False)

    def set_recompute(self, mode: str) -> None:
        """Activation recompute of every decoder layer: none | selective | full (config.Recompute)."""
        for layer in self.layers.values():
            layer.set_recompute(mode)

    def set_sequence_parallel(self, enabled: bool) -> None:
        """Sequence parallelism of the training forward (megablock.model.layers docstring)."""
        if enabled and self.tp == 1:
            raise ValueError("sequence parallelism needs tensor parallelism (parallel.tensor > 1)")
        if enabled and self.lora is not None:
            raise ValueError("sequence parallelism is not implemented for LoRA adapters; "
                             "set parallel.sequence_parallel=false or lora.enabled=false")
        self.sequence_parallel = enabled
        for layer in self.layers.values():
            layer.set_sequence_parallel(enabled)

    def set_attention_impl(self, impl: str) -> None:
        """`auto` (FlexAttention on GPU, exact SDPA path on CPU), `sdpa`, `flex` or `dense`."""
        self.attention_impl = impl
        for layer in self.layers.values():
            layer.self_attention.attention_impl = impl

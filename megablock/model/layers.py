"""Tensor-parallel decoder layer: megatron-core parallel linears around block-diffusion attention.

Sharding (TP size t): linear_qkv is column-parallel over whole KV groups (Megatron's grouped
[q heads of group g, k_g, v_g] layout), so each rank runs num_kv_heads / t groups of attention
with no communication; linear_proj is row-parallel and all-reduces once. linear_fc1 is
column-parallel with each rank holding [its gate slice; its up slice]; linear_fc2 row-parallel.
Norms are replicated.

Sequence parallelism (`set_sequence_parallel`, megablock.parallel.sequence): the layer's input
and output are this rank's [S / t, b, H] shard of the residual stream (sequence first, as in
megatron-core); the column-parallel linears gather the sequence, the row-parallel ones
reduce-scatter it, and attention runs on the gathered sequence in the usual [b, S, ...] layout.
The norms then see a shard of the positions, so their replicated weights get partial gradients
that are summed over the TP group in backward. Only the full-sequence (training) forward is
sequence-parallel; a forward with a KV cache (decoding) is plain tensor-parallel.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel
from torch import nn
from torch.utils.checkpoint import checkpoint

from megablock.diffusion.attention import attend
from megablock.diffusion.layout import AttentionLayout
from megablock.model.config import ModelConfig
from megablock.model.rope import apply_rope
from megablock.parallel.sequence import column_parallel_linear, row_parallel_linear


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over the TP group in backward (skipped at TP = 1)."""
    if group is None or group.size() == 1:
        return x
    return tensor_parallel.copy_to_tensor_model_parallel_region(x, group=group)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as HF Llama/Qwen/Mistral do.

    `sees_head_shard`: the norm runs on this TP rank's heads only (Qwen3's q/k norms), and
    `sequence_sharded`: on this rank's positions only (sequence parallelism). Either way its
    replicated weight gets a partial gradient on each rank; summing it over the TP group in
    backward keeps the replicas equal to the TP = 1 gradient.
    """

    def __init__(self, dim: int, eps: float, sees_head_shard: bool = False, tp_group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.sees_head_shard = sees_head_shard
        self.sequence_sharded = False
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight
        if self.sees_head_shard or self.sequence_sharded:
            weight = copy_to_tp_region(weight, self.tp_group)
        return weight * h.to(dtype)


class VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
    """megatron-core's vocab-parallel embedding, whose weight gradient may come out sparse.

    `sparse_grad` (set by BlockDiffusionLM for a tied embedding of a one-stage model at TP = 1):
    on CPU the lookup's gradient is then the looked-up rows only. Autograd adds it to the head's
    dense gradient of the same weight before accumulating, so .grad stays dense and the same.
    The dense path fills a second [V, H] tensor with zeros and adds the two into a third (70 ms
    of a 3.2 s step at the SmolLM2-135M shape on the 2-core machine); the sparse sum copies the
    head's gradient once and adds the rows (25 ms). An untied embedding would be left with a
    sparse .grad that AdamW refuses, and GPUs fill and add at memory speed: both keep
    megatron's path.
    """

    sparse_grad = False

    def forward(self, input_):
        if self.sparse_grad and input_.is_cpu:
            return F.embedding(input_, self.weight, sparse=True)
        return super().forward(input_)


def gated_linear(module, x: torch.Tensor, gate):
    """module(x); a LoRA linear also gets the forward's adapter gate (megablock.model.lora)."""
    if gate is None or not hasattr(module, "lora_A"):
        return module(x)
    return module(x, adapter_gate=gate)


def megatron_config(tp: int, pp: int, dtype: torch.dtype, initialize: bool) -> ModelParallelConfig:
    # CPU initialisation draws each full weight once and slices it, so every TP layout starts
    # from the same numbers and no CUDA RNG tracker is needed.
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=True,
        perform_initialization=initialize,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def mark_tensor_parallel(module, partition_dim: int) -> None:
    """Tag a parallel layer's weight (and bias) as TP-sharded along `partition_dim`.

    megatron-core only tags weights it initialises; loaded checkpoints skip initialisation, and
    gradient-norm code (DeepSpeed's and ours) needs the tag to count sharded weights on every
    TP rank and replicated ones once.
    """
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if isinstance(p, torch.nn.Parameter) and not getattr(p, "tensor_model_parallel", False):
            dim = 0 if name == "bias" else partition_dim
            tensor_parallel.set_tensor_model_parallel_attributes(p, True, dim, 1)


def normal_init(std: float) -> Callable[[torch.Tensor], None]:
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


class ParallelAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, layer_index: int, tp_group=None):
        super().__init__()
        tp = mcfg.tensor_model_parallel_size
        self.layer_index = layer_index
        self.tp_group = tp_group
        self.sequence_parallel = False
        self.head_dim = cfg.head_dim
        self.heads_per_group = cfg.heads_per_group
        self.local_groups = cfg.num_kv_heads // tp
        qkv_out = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.linear_qkv = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, qkv_out, config=mcfg, init_method=normal_init(cfg.init_std),
            bias=cfg.qkv_bias, gather_output=False, tp_group=tp_group,
        )
        if cfg.qk_norm:
            self.q_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, sees_head_shard=tp > 1, tp_group=tp_group)
            self.k_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, sees_head_shard=tp > 1, tp_group=tp_group)
        else:
            self.q_layernorm = self.k_layernorm = None
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.linear_proj = tensor_parallel.RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, config=mcfg,
            init_method=normal_init(out_std), bias=False, input_is_parallel=True, skip_bias_add=False,
            tp_group=tp_group,
        )
        mark_tensor_parallel(self.linear_qkv, 0)
        mark_tensor_parallel(self.linear_proj, 1)
        self.attention_impl = "auto"
        self.recompute_core = False
        """Selective recompute: keep only q, k, v of the attention core and rerun it in backward."""

    def forward(self, x, cos, sin, layout: AttentionLayout, kv_cache=None, gate=None):
        sp = self.sequence_parallel and kv_cache is None
        if sp:  # [S / t, b, H] -> [b, S, qkv / t]
            qkv = column_parallel_linear(x, self.linear_qkv.weight, self.linear_qkv.bias, self.tp_group).transpose(0, 1)
        else:
            qkv, _ = gated_linear(self.linear_qkv, x, gate)
        b, s, _ = qkv.shape
        hpg = self.heads_per_group
        qkv = qkv.reshape(b, s, self.local_groups, hpg + 2, self.head_dim)
        q = qkv[:, :, :, :hpg].reshape(b, s, self.local_groups * hpg, self.head_dim)
        k, v = qkv[:, :, :, hpg], qkv[:, :, :, hpg + 1]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            core = functools.partial(kv_cache.attend, self.layer_index)
        else:
            core = functools.partial(attend, layout=layout, impl=self.attention_impl)
        if self.recompute_core and torch.is_grad_enabled():
            # The core's saved state (probabilities, score tiles, per-block pieces) is the largest
            # per-layer activation at long L and the cheapest to recompute: no weights, no comms.
            out = checkpoint(core, q, k, v, use_reentrant=False)
        else:
            out = core(q, k, v)
        out = out.transpose(1, 2).reshape(b, s, -1)
        if sp:  # [S, b, heads / t] -> the summed output's [S / t, b, H] shard
            return row_parallel_linear(out.transpose(0, 1), self.linear_proj.weight, self.tp_group)
        out, _ = gated_linear(self.linear_proj, out, gate)
        return out


class ParallelMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, tp_group=None):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = False
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, 2 * cfg.intermediate_size, config=mcfg,
            init_method=normal_init(cfg.init_std), bias=False, gather_output=False, tp_group=tp_group,
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, config=mcfg,
            init_method=normal_init(cfg.init_std / math.sqrt(2 * cfg.num_layers)),
            bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )
        mark_tensor_parallel(self.linear_fc1, 0)
        mark_tensor_parallel(self.linear_fc2, 1)

    def forward(self, x, sequence_parallel: bool = False, adapter_gate=None):
        if sequence_parallel:
            h = column_parallel_linear(x, self.linear_fc1.weight, None, self.tp_group)
        else:
            h, _ = gated_linear(self.linear_fc1, x, adapter_gate)
        gate, up = h.chunk(2, dim=-1)
        if sequence_parallel:
            return row_parallel_linear(F.silu(gate) * up, self.linear_fc2.weight, self.tp_group)
        out, _ = gated_linear(self.linear_fc2, F.silu(gate) * up, adapter_gate)
        return out


class DecoderLayer(nn.Module):
    """Pre-norm block; `layer_index` is the global index (it names the weights and the KV cache)."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, layer_index: int, tp_group=None):
        super().__init__()
        self.layer_index = layer_index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, tp_group=tp_group)
        self.self_attention = ParallelAttention(cfg, mcfg, layer_index, tp_group)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, tp_group=tp_group)
        self.mlp = ParallelMLP(cfg, mcfg, tp_group)
        self.recompute = "none"
        """none | selective | full (megablock.config.Recompute); set with set_recompute."""

    def set_recompute(self, mode: str) -> None:
        self.recompute = mode
        self.self_attention.recompute_core = mode == "selective"

    def set_sequence_parallel(self, enabled: bool) -> None:
        self.self_attention.sequence_parallel = self.mlp.sequence_parallel = enabled
        self.input_layernorm.sequence_sharded = self.pre_mlp_layernorm.sequence_sharded = enabled

    def forward(self, x, cos, sin, layout: AttentionLayout, kv_cache=None, gate=None):
        """`kv_cache`: anything with `attend(layer, q, k, v)` (decoding caches, the cached clean
        half of megablock.diffusion.clean_context); `gate`: the adapters' (megablock.model.lora)."""
        if self.recompute == "full" and torch.is_grad_enabled():
            # Keep only the layer's input; backward reruns the layer (its TP collectives too, in
            # the same order on every rank). The CPU/CUDA RNG state is saved and restored, so
            # dropout (LoRA's) draws the same mask again. (Decoding runs without grad.)
            return checkpoint(self._forward, x, cos, sin, layout, kv_cache, gate, use_reentrant=False)
        return self._forward(x, cos, sin, layout, kv_cache, gate)

    def _forward(self, x, cos, sin, layout: AttentionLayout, kv_cache=None, gate=None):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, layout, kv_cache, gate)
        return x + self.mlp(self.pre_mlp_layernorm(x), self.mlp.sequence_parallel and kv_cache is None, gate)

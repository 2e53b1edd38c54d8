"""LoRA on the tensor-parallel linears: the adapter layers and `apply_lora`.

A target linear y = W x becomes y = W x + s * B (A dropout(x)), s = alpha / r, with W frozen,
A ~ kaiming-uniform (PEFT's default) and B = 0, so the adapted model starts exactly at the base.
The settings are the run config's `lora` section (megablock.config.LoraSection); the adapter
files, merging and PEFT export are checkpoint concerns (megablock.checkpoint.adapters).

Tensor parallelism (TP size t, same layouts as the base weight):

- Column-parallel base (linear_qkv, linear_fc1; W_k: [out/t, in] on rank k). A is replicated
  [r, in], B is column-sharded [out/t, r] with exactly W's row layout (Megatron's grouped qkv
  rows, [gate_k; up_k] for fc1), so y_k = W_k x + s B_k (A x) is rank k's slice of the output.
  h = A x is computed redundantly on every rank, and each rank's B_k only sees its slice of the
  output gradient: dL/dh = sum_k B_k^T g_k. `copy_to_tensor_model_parallel_region(h)` (identity
  forward, all-reduce backward) makes every rank see the full sum, so A's gradient and the LoRA
  branch's input gradient are the TP = 1 values on every rank (the trick RMSNorm's
  `sees_head_shard` uses for the q/k norms).
- Row-parallel base (linear_proj, linear_fc2; W_k: [out, in/t], local input shard x_k). A is
  row-sharded [r, in/t] like W, B is replicated [out, r]. A x = sum_k A_k x_k: each rank computes
  its partial product and `reduce_from_tensor_model_parallel_region` (all-reduce forward,
  identity backward) sums it — r numbers per token instead of `out` — and the replicated
  B (A x) is added to the (already reduced) base output. The gradient reaching h is the same on
  every rank (the output is replicated), so B's gradient is the TP = 1 gradient on every rank and
  A_k's gradient is its slice of the TP = 1 gradient.

Sharded factors carry megatron's `tensor_model_parallel` tag (gradient-norm code counts them on
every TP rank, replicated ones once). Full A is drawn once from a generator keyed by (seed, name)
and sliced, so every TP layout starts from the same adapters. Pipeline parallelism needs
nothing: the adapters live inside the layers a stage owns.

The mask-token row: `train_mask_token_row` adds a trainable [hidden] delta to the embedding
output wherever the input is the mask token (the input-embedding row only; the model never
predicts the mask token, so its output row does not matter). It is replicated over TP (the
embedding output is all-reduced, hence the same on every rank) and lives on the first stage.
Adapter tensors are named `layers.{i}.self_attention.linear_qkv.lora_A` / `.lora_B` and
`embedding.mask_row_delta`.

Gating (`lora.scope=noised`): each forward passes the adapters a gate, a bool [b, s] tensor
(True where the delta applies), or True / False for all / no positions (None: no gating, as
with scope=all). Gated-off positions take the base output itself (`torch.where`, not a
multiplication by 0), so there every layer is exactly the frozen base function; with `False`
the adapter branch is not computed at all. The model derives the gate from the forward's
structure (`BlockDiffusionLM.adapter_gate`): the noised half in training, the draft slots of a
decoding forward. The gate is the same on every TP rank, so the collectives of the adapter
branch run on all ranks or on none.
"""
from __future__ import annotations

import logging
import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch import nn

from megablock.config import LoraSection
from megablock.model.layers import RMSNorm, VocabEmbedding

logger = logging.getLogger(__name__)

ROW_PARALLEL = ("linear_proj", "linear_fc2")
MASK_DELTA = "embedding.mask_row_delta"
_PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp", "linear_fc2": "mlp"}


class _LoraLinear:
    """State shared by both LoRA linears (set by `_attach`)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scaling: float
    lora_dropout: nn.Module

    def _lora_input(self, x):
        return self.lora_dropout(x).to(self.lora_A.dtype)

    def _with_delta(self, out, delta_fn, gate):
        """out plus the scaled adapter delta where `gate` says (see the module doc)."""
        if gate is False:
            return out
        delta = delta_fn().to(out.dtype) * self.lora_scaling
        if gate is None or gate is True:
            return out + delta
        return torch.where(gate.unsqueeze(-1), out + delta, out)


class LoraColumnParallelLinear(tensor_parallel.ColumnParallelLinear, _LoraLinear):
    """Column-parallel linear + LoRA (A replicated, B sharded like W's rows)."""

    def forward(self, input_, weight=None, runtime_gather_output=None, adapter_gate=None):
        out, bias = super().forward(input_, weight, runtime_gather_output)

        def delta():
            h = F.linear(self._lora_input(input_), self.lora_A)
            h = tensor_parallel.copy_to_tensor_model_parallel_region(h, group=self.tp_group)  # backward: sum dL/dh over TP
            return F.linear(h, self.lora_B)
        return self._with_delta(out, delta, adapter_gate), bias


class LoraRowParallelLinear(tensor_parallel.RowParallelLinear, _LoraLinear):
    """Row-parallel linear + LoRA (A sharded like W's columns, B replicated)."""

    def forward(self, input_, adapter_gate=None):
        out, bias = super().forward(input_)

        def delta():
            h = F.linear(self._lora_input(input_), self.lora_A)  # this rank's partial A x
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)  # A x, on every rank
            return F.linear(h, self.lora_B)
        return self._with_delta(out, delta, adapter_gate), bias


class MaskRowEmbedding(VocabEmbedding):
    """Vocab-parallel embedding whose mask-token row gets a trainable delta."""

    mask_row_delta: nn.Parameter
    mask_token_id: int

    def forward(self, input_, adapter_gate=None):
        out = super().forward(input_)
        if adapter_gate is False:
            return out
        hit = input_ == self.mask_token_id
        if adapter_gate is not None and adapter_gate is not True:
            hit = hit & adapter_gate
        return torch.where(hit.unsqueeze(-1), out + self.mask_row_delta.to(out.dtype), out)


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _attach(linear, name: str, settings: LoraSection, seed: int, tp: int, tp_rank: int) -> None:
    row = isinstance(linear, tensor_parallel.RowParallelLinear)
    w = linear.weight
    r, in_full = settings.rank, linear.input_size
    # PEFT's default: kaiming_uniform_(a=sqrt(5)) on [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in)),
    # drawn for the full A and sliced, so TP layouts agree.
    g = torch.Generator().manual_seed(_name_seed(seed, name))
    full_a = (torch.rand(r, in_full, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(in_full)
    a = full_a.chunk(tp, dim=1)[tp_rank] if row else full_a  # row-parallel A: W's column split
    b = torch.zeros(w.shape[0], r, dtype=torch.float64)  # [out / tp, r] (column) or [out, r] (row)
    linear.__class__ = LoraRowParallelLinear if row else LoraColumnParallelLinear
    linear.lora_A = nn.Parameter(a.to(dtype=w.dtype, device=w.device).contiguous())
    linear.lora_B = nn.Parameter(b.to(dtype=w.dtype, device=w.device))
    sharded = linear.lora_A if row else linear.lora_B
    tensor_parallel.set_tensor_model_parallel_attributes(sharded, True, 1 if row else 0, 1)
    linear.lora_scaling = settings.scaling
    linear.lora_dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()


def apply_lora(model, settings: LoraSection, seed: int = 0) -> None:
    """Freeze `model` (a BlockDiffusionLM stage) and add adapters in place; call it after the
    base weights are loaded. Names of the base weights do not change."""
    if model.lora is not None:
        raise ValueError("LoRA is already applied to this model")
    model.requires_grad_(False)
    tp, tp_rank = model.tp, model.tp_rank
    for i, layer in model.layers.items():
        for target in settings.target_modules:
            parent = getattr(layer, _PARENT[target])
            _attach(getattr(parent, target), f"layers.{i}.{_PARENT[target]}.{target}", settings, seed, tp, tp_rank)
    if settings.train_norms:
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.requires_grad_(True)
    mask_id = model.cfg.mask_token_id
    if settings.train_mask_token_row and model.pre_process:
        if mask_id is None:
            logger.warning("lora.train_mask_token_row: the model has no mask token; nothing to train there")
        else:
            emb = model.embedding
            emb.__class__ = MaskRowEmbedding
            emb.mask_token_id = mask_id
            emb.mask_row_delta = nn.Parameter(torch.zeros(emb.weight.shape[1], dtype=emb.weight.dtype, device=emb.weight.device))
    model.lora = settings


def is_adapter_name(name: str) -> bool:
    """An adapter tensor (LoRA factor or the mask-row delta) rather than a base weight."""
    return name.endswith(".lora_A") or name.endswith(".lora_B") or name == MASK_DELTA


def split_weights(weights: dict) -> tuple[dict, dict]:
    """(base tensors, adapter tensors) of a stage's `weights()`."""
    base = {k: v for k, v in weights.items() if not is_adapter_name(k)}
    return base, {k: v for k, v in weights.items() if is_adapter_name(k)}


def base_weight_name(adapter: str) -> str:
    return adapter.rsplit(".", 1)[0] + ".weight"

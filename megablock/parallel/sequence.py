"""Sequence parallelism (megatron-core's sense) with an explicit tensor-parallel group.

Between the parallel linears the activations are sharded along the sequence: each TP rank holds
S / t positions of the residual stream, in sequence-first layout [S / t, b, H], and runs the
norms and residual adds on its shard only. A column-parallel linear all-gathers its input along
the sequence and a row-parallel linear reduce-scatters its output, in place of the all-reduce
that plain tensor parallelism does after each row-parallel linear: the same bytes on the wire,
and the norm/residual activations take 1 / t of the memory.

megatron-core has these pieces (`gather_from_sequence_parallel_region`, the fused
gather-and-matmul in `LinearWithGradAccumulationAndAsyncCommunication`), but they allocate their
buffers on `torch.cuda.current_device()`, so they cannot run on CPU. The functions here have the
same semantics and use `all_gather_into_tensor` / `reduce_scatter_tensor` on the input's device,
which NCCL and gloo (torch >= 2.x) both provide: one code path, tested under gloo, run on NCCL
where a GPU is lent.

The fused linears save only this rank's shard of the input and gather it again in backward, as
megatron does, so the full-sequence input of a column-parallel linear is never kept for backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 (the sequence), rank order."""
    t = group.size()
    out = torch.empty((x.shape[0] * t, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, each rank keeping its chunk of dim 0."""
    t = group.size()
    if x.shape[0] % t:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tensor-parallel size {t}")
    out = torch.empty((x.shape[0] // t, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _split(x: torch.Tensor, group) -> torch.Tensor:
    t, rank = group.size(), group.rank()
    if x.shape[0] % t:
        raise ValueError(
            f"sequence length {x.shape[0]} is not divisible by the tensor-parallel size {t}: with "
            "parallel.sequence_parallel, data.seq_len must be a multiple of parallel.tensor"
        )
    return x.chunk(t, dim=0)[rank].contiguous()


class _Scatter(torch.autograd.Function):
    """Forward: keep this rank's chunk; backward: all-gather (each chunk's gradient is complete)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group), None


class _Gather(torch.autograd.Function):
    """Forward: all-gather; backward: keep this rank's chunk. For a gathered tensor that every
    rank then uses identically (the head, a pipeline boundary), whose gradient is the same
    complete tensor on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group), None


class _ColumnLinear(torch.autograd.Function):
    """y = gather(x) W^T + b with W this rank's output rows. Backward: dx = reduce_scatter(g W)
    (each rank's output columns give a partial input gradient), dW = g^T gather(x)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        out = torch.matmul(_gather(x, group), weight.t())
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        full = _gather(x, ctx.group)
        grad_x = _reduce_scatter(torch.matmul(grad, weight), ctx.group)
        grad_w = torch.matmul(grad.reshape(-1, grad.shape[-1]).t(), full.reshape(-1, full.shape[-1]))
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class _RowLinear(torch.autograd.Function):
    """y = reduce_scatter(x W^T) with x this rank's input columns (full sequence). Backward:
    the output gradient is gathered; dx = gather(g) W, dW = gather(g)^T x."""

    @staticmethod
    def forward(ctx, x, weight, group):
        ctx.group = group
        ctx.save_for_backward(x, weight)
        return _reduce_scatter(torch.matmul(x, weight.t()), group)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        full = _gather(grad, ctx.group)
        grad_x = torch.matmul(full, weight)
        grad_w = torch.matmul(full.reshape(-1, full.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w, None


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[S, ...] replicated -> this rank's [S / t, ...] shard (enter sequence parallelism)."""
    return _Scatter.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[S / t, ...] shards -> [S, ...] on every rank (leave sequence parallelism)."""
    return _Gather.apply(x, group)


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias, group) -> torch.Tensor:
    """Sequence-parallel input [S / t, b, in] -> this rank's output columns [S, b, out / t]."""
    return _ColumnLinear.apply(x, weight, bias, group)


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """This rank's input columns [S, b, in / t] -> the summed output's shard [S / t, b, out]."""
    return _RowLinear.apply(x, weight, group)

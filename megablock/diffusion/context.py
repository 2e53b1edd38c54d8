"""Context parallelism (CP) for the [xt ; x0] sequence: zigzag shards and exact attention across ranks.

The c ranks of a context-parallel group see the same samples and share the weights; each carries
S / c positions of every sample (`layout.shard_positions`): each half is cut into 2c chunks of
n = L / (2c) positions on block boundaries, and rank r holds chunks r and 2c-1-r of xt and of x0,
in the local order [xt_r, xt_(2c-1-r), x0_r, x0_(2c-1-r)]. Everything outside attention (norms,
MLPs, the head, the loss) is per position, so it runs on the shard as it is; position ids are
sharded with the tokens.

What a chunk needs from the others (q in chunk i of its half, keys in chunk j; "earlier" = j < i):
  context-causal:
    xt chunk i -> xt: only its own chunk (a block's noised keys are its own block, and chunks
                      hold whole blocks); -> x0: every earlier x0 chunk whole, and in x0 chunk i
                      the blocks before the query's block; later x0 chunks: nothing.
    x0 chunk i -> xt: nothing;  -> x0: every earlier x0 chunk whole, its own causally.
  block-causal: the same, except that x0 chunk i sees its own chunk block-causally.
  document masking: additionally same document, so a piece the rules allow may still hide some
    or all of its rows (those rows get no weight from the piece).
So a noised chunk's own clean chunk is on its rank, and the zigzag gives every rank the same
number of visible (query chunk, key chunk) pairs: rank r's early chunks see r earlier chunks,
its late ones 2c-1-r.

Attention (megablock.diffusion.attention.attend, by `ContextShard.impl`, parallel.context_impl):
  - ``allgather`` (the reference): all-gather K/V over the group (backward: reduce-scatter of
    dK/dV), place the local queries in a zero sequence of length S, run the single-sequence exact
    kernels (megablock.diffusion.attention) and read the local rows back. Zero query rows add
    nothing to dK/dV (their upstream gradient is 0), so this is exact; it holds all S keys.
  - ``ring``: the ranks pass their K/V shard around the ring, c - 1 point-to-point transfers, each
    posted before the current shard is used. Each (local query chunk, key chunk) pair is one
    flash-kernel piece; pairs the rules hide entirely are skipped (`PIECE_CALLS` counts the rest),
    and the pieces are merged exactly by their log-sum-exp. Backward (`_RingAttention`) passes
    the K/V around again, and each shard's dK/dV accumulator travels with it and ends on its
    owner. A rank holds two K/V shards at a time: O(2L / c) keys.
Under TP each rank exchanges its own heads only.

The loss (`context_loss`): each rank's loss is its shard's share (sums over its positions divided
by the normalizers of the whole sample, which every rank knows), so the shares add up to the
loss and DeepSpeed sums the gradients over the group (megablock.parallel.state.MegatronMPU).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist

from .batch import DiffusionBatch
from .layout import AttentionLayout, ContextShard, chunk_len, context_chunks, shard_positions
from .loss import LossParts
from .masks import LayoutCache, _rules

PIECE_CALLS: Counter = Counter()
"""Pieces of ring attention run so far: "forward" / "backward" kernel calls (tests count them)."""


def shard_batch(batch: DiffusionBatch, shard: ContextShard) -> DiffusionBatch:
    """This rank's zigzag shard of every per-position tensor; the layout knows the shard."""
    layout = replace(batch.layout, context=shard)
    if batch.layout.rows is not None:
        raise ValueError("a batch without its unmasked noised blocks cannot be sharded: context-parallel runs "
                         "carry the whole sequence (train.drop_unmasked_blocks does not apply)")
    idx = shard_positions(layout, batch.input_ids.device)
    return batch.map_positions(lambda t: t.index_select(1, idx), layout)


# ----------------------------------------------------------------------------- allgather


def _all_positions(layout: AttentionLayout, device) -> torch.Tensor:
    """[S]: position of every entry of the rank-order gather of all shards."""
    return torch.cat([shard_positions(layout, device, r) for r in range(layout.context.size)])


def gather_sequence(x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """[b, h, S / c, d] shards of the group -> [b, h, S, d] in sequence order on every rank
    (backward: the gradient reduce-scattered back to the shards)."""
    return _GatherSequence.apply(x, layout)


def ring_attend(q, k, v, layout: AttentionLayout, scale: Optional[float] = None) -> torch.Tensor:
    """Ring attention of this rank's shard (module docstring)."""
    return _RingAttention.apply(q, k, v, layout, scale)


class _GatherSequence(torch.autograd.Function):
    """[b, h, S / c, d] shards -> [b, h, S, d] in sequence order; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, layout: AttentionLayout):
        group, c = layout.context.group, layout.context.size
        ctx.layout = layout
        b, h, n, d = x.shape
        parts = torch.empty((c * b, h, n, d), dtype=x.dtype, device=x.device)  # gloo: dim 0 only
        dist.all_gather_into_tensor(parts, x.contiguous(), group=group)
        gathered = parts.view(c, b, h, n, d).permute(1, 2, 0, 3, 4).reshape(b, h, c * n, d)
        out = torch.empty_like(gathered)
        return out.index_copy_(2, _all_positions(layout, x.device), gathered)

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        c = layout.context.size
        b, h, S, d = grad.shape
        parts = grad.index_select(2, _all_positions(layout, grad.device)).view(b, h, c, S // c, d)
        parts = parts.permute(2, 0, 1, 3, 4).reshape(c * b, h, S // c, d)
        out = torch.empty((b, h, S // c, d), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, parts, group=layout.context.group)
        return out, None


# ----------------------------------------------------------------------------- ring pieces


@dataclass
class _Piece:
    """Local query rows [q0, q0+n) against key rows [k0, k0+n) of a source rank's shard."""

    q0: int
    k0: int
    n: int
    mask: Optional[torch.Tensor]  # additive [b or 1, 1, n, n]; None: every key visible
    valid: Optional[torch.Tensor]  # bool [b or 1, 1, n]: row sees a key here; None: all do

    def forward(self, q, k, v, scale):
        r, ks = slice(self.q0, self.q0 + self.n), slice(self.k0, self.k0 + self.n)
        o, lse = _kernel_forward(q[:, :, r], k[:, :, ks], v[:, :, ks], self.mask, scale)
        if self.valid is not None:  # the kernel reports lse 0 for a row without keys
            lse = lse.masked_fill(~self.valid, float("-inf"))
        return r, o, lse

    def backward(self, g, q, k, v, out, lse, scale, dq, dk, dv):
        r, ks = slice(self.q0, self.q0 + self.n), slice(self.k0, self.k0 + self.n)
        gq, gk, gv = _kernel_backward(g[:, :, r], q[:, :, r], k[:, :, ks], v[:, :, ks], out[:, :, r],
                                      lse[:, :, r].contiguous(), self.mask, scale)
        dq[:, :, r] += gq
        dk[:, :, ks] += gk
        dv[:, :, ks] += gv


_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

KERNEL = {"name": "auto"}
"""auto: the CPU flash kernel on CPU, plain matmuls elsewhere; "math" forces the matmuls (tests)."""


def _use_flash(q) -> bool:
    return q.device.type == "cpu" and KERNEL["name"] == "auto"


def _kernel_forward(q, k, v, mask, scale):
    """(out [b, hq, n, d], lse [b, hq, n] fp32) of one piece."""
    if _use_flash(q):
        return _flash_fwd(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    s = _scores(q, k, mask, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num_(0.0)  # rows without keys: 0
    return torch.matmul(p, _expand(v, q.shape[1]).float()).to(q.dtype), lse


def _kernel_backward(g, q, k, v, out, lse, mask, scale):
    """(dq, dk, dv) of one piece given the merged output and log-sum-exp of its rows."""
    if _use_flash(q):
        return _flash_bwd(g, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    hq, hkv = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kk, vv, gf = _expand(k, hq).float(), _expand(v, hq).float(), g.float()
    p = torch.exp(_scores(q, k, mask, scale) - lse.unsqueeze(-1))
    dp = torch.matmul(gf, vv.transpose(-1, -2))
    ds = p * (dp - (gf * out.float()).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kk) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    dv = torch.matmul(p.transpose(-1, -2), gf)
    fold = lambda t: t.view(t.shape[0], hkv, hq // hkv, *t.shape[2:]).sum(2).to(k.dtype)  # noqa: E731
    return dq.to(q.dtype), fold(dk), fold(dv)


def _expand(x, heads: int):
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _scores(q, k, mask, scale):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), _expand(k, q.shape[1]).float().transpose(-1, -2)) * scale
    return s if mask is None else s + mask.float()


@dataclass
class _RingPlan:
    steps: list  # steps[t]: the pieces against the shard of rank (rank - t) mod c
    skipped: int  # pairs the rules hide entirely


def _pair_piece(layout: AttentionLayout, qc: int, kc: int, q0: int, k0: int, n: int, device, dtype):
    """The piece of query chunk qc against key chunk kc, or None when the rules hide it."""
    qi = qc * n + torch.arange(n, device=device)
    ki = kc * n + torch.arange(n, device=device)
    allowed = _rules(layout, qi[:, None], ki[None, :])
    if not bool(allowed.any()):
        return None
    allowed = allowed[None]
    if layout.doc_ids is not None:
        doc = layout.doc_ids.to(device)
        L = layout.seq_len
        allowed = allowed & (doc[:, qi % L, None] == doc[:, None, ki % L])
    if bool(allowed.all()):
        return _Piece(q0, k0, n, None, None)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    valid = allowed.any(-1)
    return _Piece(q0, k0, n, mask[:, None], None if bool(valid.all()) else valid[:, None])


def _build_ring_plan(layout: AttentionLayout, device, dtype) -> _RingPlan:
    c, rank, n = layout.context.size, layout.context.rank, chunk_len(layout)
    mine = context_chunks(layout, rank)
    steps, skipped = [], 0
    for t in range(c):
        pieces = []
        for i, qc in enumerate(mine):
            for j, kc in enumerate(context_chunks(layout, (rank - t) % c)):
                piece = _pair_piece(layout, qc, kc, i * n, j * n, n, device, dtype)
                if piece is None:
                    skipped += 1
                else:
                    pieces.append(piece)
        steps.append(pieces)
    return _RingPlan(steps, skipped)


_RING_PLANS = LayoutCache()


def ring_plan(layout: AttentionLayout, device, dtype) -> _RingPlan:
    shard = layout.context
    return _RING_PLANS.get(layout, (str(device), dtype, shard.rank, shard.size),
                           lambda: _build_ring_plan(layout, device, dtype))


def _merge(out, lse, rows: slice, o, l) -> None:
    """Fold a piece's (o, l) into the running fp32 output and log-sum-exp of its rows."""
    cur = lse[:, :, rows]
    new = torch.logaddexp(cur, l)
    w = torch.exp(l - new).nan_to_num_(0.0).unsqueeze(-1)  # 0 where neither has a key yet
    out[:, :, rows].lerp_(o.float(), w)
    lse[:, :, rows] = new


def ring_step(q, k, v, pieces, scale):
    """(out fp32, lse) of the local queries against one source shard's k, v: the pieces merged.
    Rows that see no key of the shard have lse -inf and out 0."""
    b, h, S, d = q.shape
    out = torch.zeros(b, h, S, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, S), float("-inf"), dtype=torch.float32, device=q.device)
    for piece in pieces:
        rows, o, l = piece.forward(q, k, v, scale)
        PIECE_CALLS["forward"] += 1
        _merge(out, lse, rows, o, l)
    return out, lse


class _Ring:
    """Point-to-point exchange with the ring neighbours of a context-parallel group."""

    def __init__(self, shard: ContextShard):
        c, r = shard.size, shard.rank
        self.group = shard.group
        self.next = dist.get_global_rank(shard.group, (r + 1) % c)
        self.prev = dist.get_global_rank(shard.group, (r - 1) % c)

    def pass_on(self, x: torch.Tensor, tag: int):
        """Send x to the next rank and receive the previous rank's into a new buffer; returns
        (buffer, pending requests). Posted at once: the caller computes while they run."""
        buf = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, x, self.next, self.group, tag),
               dist.P2POp(dist.irecv, buf, self.prev, self.group, tag)]
        return buf, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


_KV, _DKV = 0, 1  # message tags


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: AttentionLayout, scale):
        shard = layout.context
        plan = ring_plan(layout, q.device, q.dtype)
        ring = _Ring(shard) if shard.size > 1 else None  # a group of one: nothing to exchange
        b, h, S, d = q.shape
        out = torch.zeros(b, h, S, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, h, S), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for t in range(shard.size):
            nxt, reqs = ring.pass_on(kv, _KV) if t < shard.size - 1 else (None, [])
            o, l = ring_step(q, kv[0], kv[1], plan.steps[t], scale)
            _merge(out, lse, slice(None), o, l)
            _wait(reqs)
            kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.shard = plan, scale, shard
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        shard, plan = ctx.shard, ctx.plan
        ring = _Ring(shard) if shard.size > 1 else None
        g = g.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v])
        acc, acc_reqs = None, []  # the dK/dV accumulator of the shard held now, arriving from prev
        for t in range(shard.size):
            nxt, reqs = ring.pass_on(kv, _KV) if t < shard.size - 1 else (None, [])
            mine = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            for piece in plan.steps[t]:
                piece.backward(g, q, kv[0], kv[1], out, lse, ctx.scale, dq, mine[0], mine[1])
                PIECE_CALLS["backward"] += 1
            _wait(acc_reqs)
            if acc is not None:
                mine += acc
            # On to the next rank, which holds this shard next; after the last step that is its owner.
            acc, acc_reqs = ring.pass_on(mine, _DKV) if ring is not None else (mine, [])
            _wait(reqs)
            kv = nxt
        _wait(acc_reqs)
        return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype), None, None


# ----------------------------------------------------------------------------- loss


def context_total(x: torch.Tensor, shard: ContextShard) -> torch.Tensor:
    """The sum of the group's shares, with this rank's share's gradient only (the other shares'
    gradients are their ranks'; DeepSpeed sums the weight gradients over the group)."""
    total = x.detach().clone()
    dist.all_reduce(total, group=shard.group)
    return x + (total - x.detach())


def context_loss(parts: LossParts, shard: ContextShard) -> LossParts:
    """A shard's loss parts -> the sample's (values summed over the group, gradients local)."""
    return LossParts(context_total(parts.loss, shard), context_total(parts.diffusion_loss, shard).detach(),
                     context_total(parts.ar_loss, shard).detach())

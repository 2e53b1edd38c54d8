"""Block-diffusion attention: one entry point, three exact implementations.

- ``dense``: SDPA with the full bool mask from `masks.dense_mask`. The reference; costs a
  2L x 2L product (8x a causal pass of length L) and an S x S mask per call.
- ``sdpa``: the CPU training path, exact. The attention is cut into pieces that map onto the
  CPU flash kernel (causal calls that skip masked tiles) and a small local piece, without any
  per-layer O(L^2) mask, and merged exactly with their log-sum-exp (see the comment above
  `_Span`). About 2x a causal pass of length L, where ``dense`` costs ~8x. On other devices
  it falls back to ``dense``.
- ``flex``: compiled FlexAttention with a cached `BlockMask`; the GPU path (FlexAttention has
  no backward on CPU in torch 2.13).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import List, Optional

import torch
import torch.nn.functional as F

from megablock.config import AttentionImpl, ContextImpl, options

from .context import gather_sequence, ring_attend
from .layout import AttentionLayout, shard_positions
from .masks import LayoutCache, _rules, dense_mask, flex_block_mask

IMPLS = options(AttentionImpl)

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: AttentionLayout,
    impl: str = "auto",
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention under the layout's rules.

    q: [b, hq, S, d]; k, v: [b, hkv, S, d] with hq a multiple of hkv (query head h reads
    key/value head h // (hq // hkv)); S = layout.total_len. Returns [b, hq, S, d].
    ``auto`` picks ``flex`` on CUDA and ``sdpa`` elsewhere. Under context parallelism
    (`layout.context`) q, k, v are this rank's shard (megablock.diffusion.context).
    """
    if layout.context is not None:
        return context_attend(q, k, v, layout, impl, scale)
    if layout.rows is not None:
        return _attend_carried(q, k, v, layout, impl, scale)
    _check_shapes(q, k, v, layout)
    if impl == "auto":
        impl = "flex" if q.is_cuda else "sdpa"
    if impl == "dense":
        return dense_attend(q, k, v, layout, scale)
    if impl == "sdpa":
        return sdpa_attend(q, k, v, layout, scale)
    if impl == "flex":
        return flex_attend(q, k, v, layout, scale)
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")


def attend_noised(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    clean_k: torch.Tensor,
    clean_v: torch.Tensor,
    layout: AttentionLayout,
    impl: str = "auto",
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The noised half's rows of `attend` when the clean half's K/V are already known.

    q, k, v: [b, h, n, d] of the noised positions the forward carries (all L, or the first n of
    `layout.rows`); clean_k, clean_v: [b, hkv, L, d] of x0. The keys are laid out as the joint
    [xt ; x0] sequence and only the xt query rows are computed, so each output row is exactly
    that row of the joint attention (the x0 rows, which see x0 only, are the clean pass's).
    """
    L = layout.seq_len
    if layout.mode != "context_causal":
        raise ValueError(f"attend_noised needs context-causal attention, got {layout.mode!r}")
    rows = None if layout.rows is None else layout.rows[:, : q.shape[2]].to(q.device)
    if rows is not None:
        q, k, v = (_spread(t, rows, L) for t in (q, k, v))
    full = replace(layout, rows=None)
    keys, values = torch.cat([k, clean_k], dim=2), torch.cat([v, clean_v], dim=2)
    if impl == "auto":
        impl = "flex" if q.is_cuda else "sdpa"
    if impl == "sdpa" and q.device.type == "cpu":
        plan = _PLANS.get(full, (str(q.device), q.dtype, "noised"),
                          lambda: _Plan(_build_plan(full, q.device, q.dtype).groups[:1]))
        padded = torch.cat([q, q.new_zeros(q.shape)], dim=2)  # x0 query rows: in no piece of the plan
        out = _PiecewiseAttention.apply(padded, keys, values, plan, scale)[:, :, :L]
    elif impl in ("dense", "sdpa"):
        mask = dense_mask(full, q.device)[:, None, :L]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=q.shape[1] != keys.shape[1])
    elif impl == "flex":
        out = flex_attend(torch.cat([q, q.new_zeros(q.shape)], dim=2), keys, values, full, scale)[:, :, :L]
    else:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if rows is not None:
        out = _per_row(lambda i: out[i].index_select(1, rows[i]), out.shape[0])
    return out


def context_attend(q, k, v, layout: AttentionLayout, impl: str = "auto", scale: Optional[float] = None):
    """Attention of this context rank's shard (q: [b, hq, S / c, d], k, v: [b, hkv, S / c, d])
    under the rules of the whole sequence (megablock.diffusion.context)."""
    shard = layout.context
    if shard.impl == "ring":
        return ring_attend(q, k, v, layout, scale)
    if shard.impl != "allgather":
        raise ValueError(f"parallel.context_impl={shard.impl!r} is not one of {list(options(ContextImpl))}")
    # The reference: every key on every rank, and the local queries in a zero sequence of length
    # S. Zero query rows add nothing to dK/dV (their output gradient is 0), so this is exact.
    rows = shard_positions(layout, q.device)
    b, h, _, d = q.shape
    spread = q.new_zeros(b, h, layout.total_len, d).index_copy(2, rows, q)
    out = attend(spread, gather_sequence(k, layout), gather_sequence(v, layout), replace(layout, context=None),
                 impl, scale)
    return out.index_select(2, rows)


def _spread(t: torch.Tensor, rows: torch.Tensor, S: int) -> torch.Tensor:
    """Carried positions [b, h, n, d] placed at `rows` of an S-long sequence, zeros elsewhere."""
    return _per_row(lambda i: t.new_zeros(t.shape[1], S, t.shape[3]).index_copy_(1, rows[i], t[i]), t.shape[0])


def _attend_carried(q, k, v, layout: AttentionLayout, impl: str, scale: Optional[float]) -> torch.Tensor:
    """Attention when the forward carries only `layout.rows` of the S positions.

    The rows left out are noised positions that no carried row attends to (whole noised blocks,
    which only their own block sees), so placing the carried q, k, v at their positions of the
    full sequence, with zeros elsewhere, and reading the carried rows back gives exactly their
    attention under the full layout; the zero rows' own outputs are discarded.
    """
    rows = layout.rows.to(q.device)
    if rows.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"layout.rows has shape {tuple(rows.shape)}, but q carries {q.shape[0]} rows of "
                         f"{q.shape[2]} positions")
    full = replace(layout, rows=None)

    # One micro-batch row at a time along the sequence dim (`_spread`): index_copy / index_select
    # read one index per position, where scatter / gather read one per element (3x the time at S = 512).
    S = full.total_len
    out = attend(_spread(q, rows, S), _spread(k, rows, S), _spread(v, rows, S), full, impl, scale)
    return _per_row(lambda i: out[i].index_select(1, rows[i]), q.shape[0])


def _per_row(fn, b: int) -> torch.Tensor:
    return fn(0).unsqueeze(0) if b == 1 else torch.stack([fn(i) for i in range(b)])


def _check_shapes(q, k, v, layout: AttentionLayout) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [b,hq,S,d], k and v [b,hkv,S,d]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if q.shape[2] != layout.total_len or k.shape[2] != layout.total_len:
        raise ValueError(f"sequence length {q.shape[2]} does not match the layout's {layout.total_len}")
    if layout.doc_ids is not None and tuple(layout.doc_ids.shape) != (q.shape[0], layout.seq_len):
        raise ValueError(f"doc_ids shape {tuple(layout.doc_ids.shape)} is not [batch, L]")


def dense_attend(q, k, v, layout: AttentionLayout, scale: Optional[float] = None) -> torch.Tensor:
    mask = dense_mask(layout, q.device)[:, None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


# ----------------------------------------------------------------------------------------
# flex


_compiled_flex = None


def flex_attend(
    q, k, v, layout: AttentionLayout, scale: Optional[float] = None, compile: bool = True
) -> torch.Tensor:
    """FlexAttention with the layout's BlockMask. ``compile=False`` runs the eager reference
    implementation (slow; forward-only on CPU), which is how CPU tests check the mask_mod."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if compile:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    block_mask = flex_block_mask(layout, q.device)
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# ----------------------------------------------------------------------------------------
# sdpa: exact pieces, merged by log-sum-exp
#
# Context-causal, S = 2L, rows [0, L) are xt and [L, 2L) are x0; a query at offset r of
# block b (position i = bB + r):
#   x0 rows: plain causal attention over x0 keys: one flash-kernel call with is_causal=True.
#   xt rows: allowed x0 keys are the whole blocks before b, i.e. positions < bB. Split them:
#     "shifted" : x0 positions <= i - B. For rows i >= B that is a causal call whose queries
#                 are xt[B:] and whose keys are x0[:L-B]: is_causal skips the masked tiles.
#     "local"   : what is left of block b-1 (offsets > r) plus all of xt block b: 2B keys
#                 per query block, a constant [B, 2B] mask. Tiny batched matmuls in fp32
#                 (the flash kernel's bf16 backward is slow on thousands of tiny problems).
#   Block-causal x0 rows use the same split with their own x0 block in place of the xt block.
# Each piece yields its log-sum-exp, and the pieces are merged exactly with it. The backward
# gives every piece the *merged* output and log-sum-exp; with those, the flash backward (and
# the local one, written the same way) returns exactly that piece's share of the gradient of
# the softmax over all allowed keys.
# Work: the causal and shifted calls cost a causal pass each, the local piece O(L*B): about
# 2x an AR pass, and no mask grows with L^2 (documents aside: one [b, L, L] mask per batch).


def _emit(out, lse, o, l, first: bool) -> None:
    """Write a piece's (o, l) into views of the running output, or fold it in: the piece's
    weight is exp(l - logaddexp(lse, l)) = sigmoid(l - lse), 0 where it had no key."""
    if first:
        out.copy_(o)
        lse.copy_(l)
    else:
        out.lerp_(o.to(out.dtype), torch.sigmoid(l - lse).unsqueeze(-1))
        torch.logaddexp(lse, l, out=lse)


@dataclass
class _Span:
    """Queries [q0, q0+n) against keys [k0, k0+n) on the CPU flash kernel; is_causal is
    top-left aligned (query j sees keys <= j)."""

    q0: int
    k0: int
    n: int
    causal: bool
    mask: Optional[torch.Tensor] = None  # additive [b, 1, n, n] (documents)
    valid: Optional[torch.Tensor] = None  # bool [b, 1, n]: row has at least one key

    @property
    def rows(self) -> slice:
        return slice(self.q0, self.q0 + self.n)

    @property
    def keys(self) -> slice:
        return slice(self.k0, self.k0 + self.n)

    def forward(self, q, k, v, scale, out, lse, first):
        r, ks = self.rows, self.keys
        o, l = _flash_fwd(q[:, :, r], k[:, :, ks], v[:, :, ks], 0.0, self.causal,
                          attn_mask=self.mask, scale=scale)
        if self.valid is not None:  # the kernel reports lse 0 for a row with no key
            l = l.masked_fill(~self.valid, float("-inf"))
        _emit(out[:, :, r], lse[:, :, r], o, l, first)

    def backward(self, g, q, k, v, out, lse, scale, dq, dk, dv):
        r, ks = self.rows, self.keys
        gq, gk, gv = _flash_bwd(g[:, :, r], q[:, :, r], k[:, :, ks], v[:, :, ks], out[:, :, r],
                                lse[:, :, r].contiguous(), 0.0, self.causal,
                                attn_mask=self.mask, scale=scale)
        dq[:, :, r] += gq
        dk[:, :, ks] += gk
        dv[:, :, ks] += gv


@dataclass
class _Local:
    """Each query block of rows [q0, q0+L) against 2B keys: the x0 block before it (from rows
    [prev0, prev0+L-B); zeros, masked, for block 0) and its own block (rows [own0, own0+L)).
    Query heads sharing a key/value head are stacked as rows, so GQA needs no copies of k/v."""

    q0: int
    prev0: int
    own0: int
    L: int
    B: int
    mask: torch.Tensor  # additive fp32 [b or 1, nb, 1, 1, B, 2B]

    @property
    def rows(self) -> slice:
        return slice(self.q0, self.q0 + self.L)

    def _row_blocks(self, x: torch.Tensor, hkv: int) -> torch.Tensor:
        """View of rows of x [b, hq, S, ...] as [b, nb, hkv, g, B, ...]."""
        b, hq = x.shape[:2]
        nb = self.L // self.B
        view = x[:, :, self.rows].view(b, hkv, hq // hkv, nb, self.B, *x.shape[3:])
        return view.permute(0, 3, 1, 2, 4, *range(5, view.dim()))

    def _queries(self, x: torch.Tensor, hkv: int) -> torch.Tensor:
        """fp32 copy of rows of x [b, hq, S, d] as [b, nb, hkv, g*B, d]."""
        src = self._row_blocks(x, hkv)
        b, nb, _, g, B, d = src.shape
        return torch.empty(src.shape, dtype=torch.float32, device=x.device).copy_(src).view(b, nb, hkv, g * B, d)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 [b, nb, hkv, 2B, d]: previous x0 block, then own block."""
        L, B = self.L, self.B
        b, h, _, d = x.shape
        keys = torch.empty(b, L // B, h, 2 * B, d, dtype=torch.float32, device=x.device)
        keys[:, 0, :, :B] = 0
        keys[:, 1:, :, :B] = x[:, :, self.prev0:self.prev0 + L - B].view(b, h, L // B - 1, B, d).transpose(1, 2)
        keys[:, :, :, B:] = x[:, :, self.own0:self.own0 + L].view(b, h, L // B, B, d).transpose(1, 2)
        return keys

    def _scatter_keys(self, gk: torch.Tensor, dx: torch.Tensor) -> None:
        L, B = self.L, self.B
        b, h, _, d = dx.shape
        dx[:, :, self.prev0:self.prev0 + L - B].view(b, h, L // B - 1, B, d).add_(gk[:, 1:, :, :B].transpose(1, 2))
        dx[:, :, self.own0:self.own0 + L].view(b, h, L // B, B, d).add_(gk[:, :, :, B:].transpose(1, 2))

    def _probs(self, qb, kb, scale, lse=None):
        """Masked scores [b, nb, hkv, g*B, 2B] and their softmax (against lse if given)."""
        b, nb, hkv, gB, _ = qb.shape
        s = torch.matmul(qb * scale, kb.transpose(-1, -2)).view(b, nb, hkv, gB // self.B, self.B, -1)
        s = s + self.mask
        if lse is None:
            lse = torch.logsumexp(s, dim=-1)
        return torch.exp(s - lse.unsqueeze(-1)).view(b, nb, hkv, gB, -1), lse

    def forward(self, q, k, v, scale, out, lse, first):
        hkv = k.shape[1]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        p, l = self._probs(self._queries(q, hkv), self._keys(k), scale)
        o = torch.matmul(p, self._keys(v))
        _emit(self._row_blocks(out, hkv), self._row_blocks(lse, hkv), o.view(self._row_blocks(out, hkv).shape), l, first)

    def backward(self, g, q, k, v, out, lse, scale, dq, dk, dv):
        hkv = k.shape[1]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        qb, kb, vb, gb = self._queries(q, hkv), self._keys(k), self._keys(v), self._queries(g, hkv)
        p, _ = self._probs(qb, kb, scale, self._row_blocks(lse, hkv))
        dp = torch.matmul(gb, vb.transpose(-1, -2))
        delta = (gb * self._queries(out, hkv)).sum(-1, keepdim=True)  # rowsum(dO * O), full row
        ds = p * (dp - delta)
        dq_rows = self._row_blocks(dq, hkv)
        dq_rows += torch.matmul(ds, kb).mul_(scale).view(dq_rows.shape)
        self._scatter_keys(torch.matmul(ds.transpose(-1, -2), qb).mul_(scale), dk)
        self._scatter_keys(torch.matmul(p.transpose(-1, -2), gb), dv)


@dataclass
class _Plan:
    """Groups of query rows, in order, covering [0, S); each group's first piece covers all
    its rows and the later pieces are merged into it."""

    groups: List[List[object]]


class _PiecewiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale):
        b, h, S, d = q.shape
        out = torch.empty(b, h, S, d, dtype=torch.float32, device=q.device)  # merged in fp32
        lse = torch.empty(b, h, S, dtype=torch.float32, device=q.device)
        for pieces in plan.groups:
            for i, p in enumerate(pieces):
                p.forward(q, k, v, scale, out, lse, first=i == 0)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        g = g.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        for pieces in ctx.plan.groups:
            for p in pieces:
                p.backward(g, q, k, v, out, lse, ctx.scale, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _local_mask(layout: AttentionLayout, q0: int, own0: int, device) -> torch.Tensor:
    """Additive fp32 [b or 1, nb, 1, 1, B, 2B] mask of a `_Local` piece, from the rules."""
    L, B = layout.seq_len, layout.block_size
    nb = L // B
    blk = torch.arange(nb, device=device)[:, None, None]
    r = torch.arange(B, device=device)
    qi = q0 + blk * B + r[:, None]  # [nb, B, 1]
    prev = L + (blk - 1) * B + r  # [nb, 1, B]
    own = own0 + blk * B + r
    ki = torch.cat([prev, own], dim=-1)  # [nb, 1, 2B]
    # Of the previous block only the offsets after the query's own are left to this piece
    # (the shifted span has the rest), and block 0 has no previous block.
    rest_of_prev = (r > r[:, None]) & (blk >= 1)  # [nb, B, B]
    allowed = _rules(layout, qi, ki) & torch.cat([rest_of_prev, torch.ones_like(rest_of_prev)], -1)
    if layout.doc_ids is not None:
        doc = layout.doc_ids.to(device)
        pos = torch.arange(layout.total_len, device=device) % L
        allowed = allowed & (doc[:, pos[qi]] == doc[:, pos[ki]])  # [b, nb, B, 2B]
    else:
        allowed = allowed[None]
    return _additive(allowed[:, :, None, None], torch.float32)


def _doc_masks(layout: AttentionLayout, device, dtype):
    """Additive same-document mask over clean positions [b, 1, L, L] (None without documents).
    Every span is a window of it (spans pair positions, whatever the half), so one per batch."""
    if layout.doc_ids is None:
        return None
    doc = layout.doc_ids.to(device)
    return _additive((doc[:, :, None] == doc[:, None, :])[:, None], dtype)


def _span(layout: AttentionLayout, doc_mask, q0: int, k0: int, n: int, causal: bool) -> _Span:
    if doc_mask is None:
        return _Span(q0, k0, n, causal)
    qp, kp = q0 % layout.seq_len, k0 % layout.seq_len
    mask = doc_mask[:, :, qp:qp + n, kp:kp + n]
    visible = mask == 0
    if causal:
        visible = visible & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return _Span(q0, k0, n, causal, mask, visible.any(-1))


def _build_plan(layout: AttentionLayout, device, dtype) -> _Plan:
    L, B, mode = layout.seq_len, layout.block_size, layout.mode
    doc_mask = _doc_masks(layout, device, dtype)
    if not layout.two_halves:  # only reached with documents
        return _Plan([[_span(layout, doc_mask, 0, 0, L, mode == "ar")]])

    def staircase_group(q0: int, own0: int):
        """Rows [q0, q0+L) that see whole earlier x0 blocks plus a local window."""
        pieces = [_Local(q0, L, own0, L, B, _local_mask(layout, q0, own0, device))]
        if L > B:
            pieces.append(_span(layout, doc_mask, q0 + B, L, L - B, True))
        return pieces

    groups = [staircase_group(0, 0)]
    if mode == "context_causal":
        groups.append([_span(layout, doc_mask, L, L, L, True)])
    else:
        groups.append(staircase_group(L, L))
    return _Plan(groups)


_PLANS = LayoutCache()


def _plan_for(layout: AttentionLayout, device, dtype) -> _Plan:
    return _PLANS.get(layout, (str(device), dtype), lambda: _build_plan(layout, device, dtype))


_warned_sdpa_device = False


def sdpa_attend(q, k, v, layout: AttentionLayout, scale: Optional[float] = None) -> torch.Tensor:
    global _warned_sdpa_device
    if q.device.type != "cpu":
        if not _warned_sdpa_device:
            warnings.warn("attention impl 'sdpa' is the CPU path; using 'dense' on "
                          f"{q.device.type} (use 'flex' there)")
            _warned_sdpa_device = True
        return dense_attend(q, k, v, layout, scale)
    if not layout.two_halves and layout.doc_ids is None:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=layout.mode == "ar", scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    plan = _plan_for(layout, q.device, q.dtype)
    return _PiecewiseAttention.apply(q, k, v, plan, scale)

"""Block-diffusion attention: one entry point, three exact implementations.

- ``dense``: SDPA with the full bool mask from `masks.dense_mask`. The reference; costs a
  2L x 2L product (8x a causal pass of length L) and an S x S mask per call.
- ``sdpa``: the CPU training path. The attention is cut into pieces that each map onto the
  CPU flash kernel without any per-layer O(L^2) mask, and the pieces are merged exactly
  with their log-sum-exp (see `_sdpa_plan`). About 2x a causal pass of length L.
- ``flex``: compiled FlexAttention with a cached `BlockMask`; the GPU path (FlexAttention has
  no backward on CPU in torch 2.13).
"""
from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from .layout import AttentionLayout
from .masks import _rules, dense_mask, flex_block_mask

IMPLS = ("auto", "dense", "sdpa", "flex")

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
    ``auto`` picks ``flex`` on CUDA and ``sdpa`` elsewhere.
    """
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
# sdpa: exact pieces on the CPU flash kernel, merged by log-sum-exp
#
# Context-causal, S = 2L, rows [0, L) are xt and [L, 2L) are x0; a query at offset r of
# block b (position i = bB + r):
#   x0 rows: plain causal attention over x0 keys: one kernel call with is_causal=True.
#   xt rows: allowed x0 keys are the whole blocks before b, i.e. positions < bB. Split them:
#     "shifted" : x0 positions <= i - B. For rows i >= B that is a causal call whose queries
#                 are xt[B:] and whose keys are x0[:L-B]: is_causal skips the masked tiles.
#     "local"   : what is left of block b-1 (positions bB-B+r+1 .. bB-1: offsets > r) plus
#                 all of xt block b. Each block's queries see 2B keys: one batched call with
#                 the blocks folded into the batch and a constant [B, 2B] mask.
#   Block-causal x0 rows use the same split with their own block in place of the xt block.
# The kernel returns each piece's log-sum-exp; the pieces are merged exactly with it. The
# backward hands each piece the *merged* output and log-sum-exp, for which the kernel's
# backward gives that piece's exact share of the full gradient (softmax over the union).
# Work: the causal and shifted calls cost a causal pass each, the local call ~ 2L*B*... i.e.
# about 2x an AR pass, and no mask grows with L^2 (documents aside).


@dataclass
class _Span:
    """Queries [q0, q0+n) against keys [k0, k0+n); is_causal (top-left) if causal."""

    q0: int
    k0: int
    n: int
    causal: bool
    mask: Optional[torch.Tensor] = None  # additive [b, 1, n, n] (documents)
    valid: Optional[torch.Tensor] = None  # bool [b, 1, n]: row has at least one key

    @property
    def rows(self) -> slice:
        return slice(self.q0, self.q0 + self.n)

    def forward(self, q, k, v, scale):
        ks = slice(self.k0, self.k0 + self.n)
        o, lse = _flash_fwd(q[:, :, self.rows], k[:, :, ks], v[:, :, ks], 0.0, self.causal,
                            attn_mask=self.mask, scale=scale)
        if self.valid is not None:  # the kernel reports lse 0 for a row with no key
            lse = lse.masked_fill(~self.valid, float("-inf"))
        return o, lse

    def backward(self, g, q, k, v, out, lse, scale, dq, dk, dv):
        r, ks = self.rows, slice(self.k0, self.k0 + self.n)
        gq, gk, gv = _flash_bwd(g[:, :, r], q[:, :, r], k[:, :, ks], v[:, :, ks], out[:, :, r],
                                lse[:, :, r].contiguous(), 0.0, self.causal,
                                attn_mask=self.mask, scale=scale)
        dq[:, :, r] += gq
        dk[:, :, ks] += gk
        dv[:, :, ks] += gv


def _to_blocks(x: torch.Tensor, B: int) -> torch.Tensor:
    """[b, h, n*B, ...] -> [b*n, h, B, ...]: blocks folded into the batch."""
    b, h, L = x.shape[:3]
    return x.reshape(b, h, L // B, B, *x.shape[3:]).transpose(1, 2).reshape(b * (L // B), h, B, *x.shape[3:])


def _from_blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    n, h, B = x.shape[:3]
    return x.reshape(b, n // b, h, B, *x.shape[3:]).transpose(1, 2).reshape(b, h, (n // b) * B, *x.shape[3:])


@dataclass
class _Local:
    """Each query block of rows [q0, q0+L) against 2B keys: the x0 block before it (rows
    [prev0, prev0+L) shifted by one block; zeros for block 0) and its own block of rows
    [own0, own0+L). ``mask`` is additive [b*nb, 1, B, 2B]."""

    q0: int
    prev0: int
    own0: int
    L: int
    B: int
    mask: torch.Tensor

    @property
    def rows(self) -> slice:
        return slice(self.q0, self.q0 + self.L)

    def _keys(self, x):
        L, B = self.L, self.B
        b, h, _, d = x.shape
        keys = x.new_empty(b, L // B, h, 2 * B, d)
        keys[:, 0, :, :B] = 0  # block 0 has no previous block; masked, but must be finite
        keys[:, 1:, :, :B] = x[:, :, self.prev0:self.prev0 + L - B].reshape(b, h, L // B - 1, B, d).transpose(1, 2)
        keys[:, :, :, B:] = x[:, :, self.own0:self.own0 + L].reshape(b, h, L // B, B, d).transpose(1, 2)
        return keys.reshape(b * (L // B), h, 2 * B, d)

    def _scatter_keys(self, g, dx):
        L, B = self.L, self.B
        b, h, _, d = dx.shape
        g = g.reshape(b, L // B, h, 2 * B, d)
        dx[:, :, self.prev0:self.prev0 + L - B] += g[:, 1:, :, :B].transpose(1, 2).reshape(b, h, L - B, d)
        dx[:, :, self.own0:self.own0 + L] += g[:, :, :, B:].transpose(1, 2).reshape(b, h, L, d)

    def forward(self, q, k, v, scale):
        o, lse = _flash_fwd(_to_blocks(q[:, :, self.rows], self.B), self._keys(k), self._keys(v),
                            0.0, False, attn_mask=self.mask, scale=scale)
        return _from_blocks(o, q.shape[0]), _from_blocks(lse, q.shape[0])

    def backward(self, g, q, k, v, out, lse, scale, dq, dk, dv):
        r, B = self.rows, self.B
        gq, gk, gv = _flash_bwd(
            _to_blocks(g[:, :, r], B), _to_blocks(q[:, :, r], B), self._keys(k), self._keys(v),
            _to_blocks(out[:, :, r], B), _to_blocks(lse[:, :, r], B), 0.0, False,
            attn_mask=self.mask, scale=scale,
        )
        dq[:, :, r] += _from_blocks(gq, q.shape[0])
        self._scatter_keys(gk, dk)
        self._scatter_keys(gv, dv)


@dataclass
class _Plan:
    """Groups of query rows, in order, covering [0, S); each group's first piece covers all
    its rows and the later pieces are merged into it."""

    groups: List[List[object]]


def _merge_into(o_acc, l_acc, o, l):
    """Fold a piece (o, l) into the running (o_acc, l_acc) in place. The new weight of the
    piece is exp(l - logaddexp(l_acc, l)) = sigmoid(l - l_acc); -inf (no key) gives 0."""
    w = torch.sigmoid(l - l_acc)
    o_acc.lerp_(o.to(o_acc.dtype), w.unsqueeze(-1))
    torch.logaddexp(l_acc, l, out=l_acc)


class _PiecewiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale):
        b, h, S, d = q.shape
        # merged in fp32; fp32 inputs are merged straight into the output
        out = torch.empty(b, h, S, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, S, dtype=torch.float32, device=q.device)
        for pieces in plan.groups:
            for i, p in enumerate(pieces):
                o, l = p.forward(q, k, v, scale)
                rows = p.rows
                if i == 0:
                    out[:, :, rows] = o
                    lse[:, :, rows] = l
                else:
                    _merge_into(out[:, :, rows], lse[:, :, rows], o, l)
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


def _local_mask(layout: AttentionLayout, q0: int, own0: int, device, dtype, batch: int) -> torch.Tensor:
    """Additive [batch*nb, 1, B, 2B] mask of a `_Local` piece, straight from the rules."""
    L, B = layout.seq_len, layout.block_size
    nb = L // B
    blk = torch.arange(nb, device=device)[:, None, None]
    r = torch.arange(B, device=device)
    qi = q0 + blk * B + r[:, None]  # [nb, B, 1]
    prev = L + (blk - 1) * B + r[None, None, :]  # [nb, 1, B]
    own = own0 + blk * B + r[None, None, :]
    ki = torch.cat([prev.expand(nb, 1, B), own], dim=-1)  # [nb, 1, 2B]
    # Of the previous block only the offsets after the query's own are left to this piece
    # (the shifted span has the rest), and block 0 has no previous block.
    is_own = torch.arange(2 * B, device=device) >= B
    rest_of_prev = (r[None, None, :] > r[:, None]).logical_and(blk >= 1)  # [nb, B, B]
    allowed = _rules(layout, qi, ki) & (is_own | torch.cat([rest_of_prev, torch.zeros_like(rest_of_prev)], -1))
    if layout.doc_ids is not None:
        doc = layout.doc_ids.to(device)
        pos = torch.arange(layout.total_len, device=device) % L
        dq = doc[:, pos[qi.clamp(min=0)]]  # [b, nb, B, 1]
        dk = doc[:, pos[ki.clamp(min=0)]]  # [b, nb, 1, 2B]
        allowed = allowed & (dq == dk)
    else:
        allowed = allowed.expand(batch, *allowed.shape)
    return _additive(allowed.reshape(batch * nb, 1, B, 2 * B), dtype)


def _span_masks(layout: AttentionLayout, q0: int, k0: int, n: int, causal: bool, device, dtype):
    """Document mask [b, 1, n, n] and row validity of a `_Span` (None without documents)."""
    if layout.doc_ids is None:
        return None, None
    doc = layout.doc_ids.to(device)
    pos = torch.arange(layout.total_len, device=device) % layout.seq_len
    dq = doc[:, pos[q0:q0 + n]]
    dk = doc[:, pos[k0:k0 + n]]
    allowed = (dq[:, :, None] == dk[:, None, :])[:, None]
    visible = allowed
    if causal:
        visible = allowed & torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return _additive(allowed, dtype), visible.any(-1)


def _build_plan(layout: AttentionLayout, batch: int, device, dtype) -> _Plan:
    L, B, mode = layout.seq_len, layout.block_size, layout.mode
    if not layout.two_halves:  # only reached with documents
        mask, valid = _span_masks(layout, 0, 0, L, mode == "ar", device, dtype)
        return _Plan([[_Span(0, 0, L, mode == "ar", mask, None)]])

    def staircase_group(q0: int, own0: int):
        """Rows [q0, q0+L) that see whole earlier x0 blocks plus a local window."""
        pieces = [_Local(q0, L, own0, L, B, _local_mask(layout, q0, own0, device, dtype, batch))]
        if L > B:
            mask, valid = _span_masks(layout, q0 + B, L, L - B, True, device, dtype)
            pieces.append(_Span(q0 + B, L, L - B, True, mask, valid))
        return pieces

    groups = [staircase_group(0, 0)]
    if mode == "context_causal":
        mask, _ = _span_masks(layout, L, L, L, True, device, dtype)
        groups.append([_Span(L, L, L, True, mask, None)])
    else:
        groups.append(staircase_group(L, L))
    return _Plan(groups)


_PLAN_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_PLAN_CACHE_SIZE = 8


def _plan_for(layout: AttentionLayout, batch: int, device, dtype) -> _Plan:
    """Plans are reused across the layers of a forward (and across steps without documents).

    With documents the key includes the doc_ids tensor's identity and version, checked
    through a weak reference so a recycled id can never match a dead tensor."""
    doc = layout.doc_ids
    key = (layout.mode, layout.seq_len, layout.block_size, batch, str(device), dtype,
           None if doc is None else (id(doc), doc._version))
    hit = _PLAN_CACHE.get(key)
    if hit is not None and (doc is None or hit[0]() is doc):
        _PLAN_CACHE.move_to_end(key)
        return hit[1]
    plan = _build_plan(layout, batch, device, dtype)
    _PLAN_CACHE[key] = (None if doc is None else weakref.ref(doc), plan)
    while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


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
    plan = _plan_for(layout, q.shape[0], q.device, q.dtype)
    return _PiecewiseAttention.apply(q, k, v, plan, scale)

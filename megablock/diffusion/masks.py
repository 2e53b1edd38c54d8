"""The block-diffusion attention rules as masks.

`dense_mask` is the single source of truth: every faster path is tested against it.
`flex_mask_mod` states the same rules as a FlexAttention mask_mod, and `flex_block_mask`
turns it into a `BlockMask` whose empty tiles the GPU kernel skips.

Rules (query q, key k; pos(i) = i mod L, blk(i) = pos(i) // B; in two-half modes the first
L positions are the noised half xt, the last L the clean half x0):
  xt -> xt: same block;  xt -> x0: blk(k) < blk(q);  x0 -> xt: never;
  x0 -> x0: pos(k) <= pos(q) (context_causal) or blk(k) <= blk(q) (block_causal);
  ar: causal over L;  full: everything over L;
  doc_ids given: additionally doc(q) == doc(k).
Every query keeps at least itself (xt in its own block, x0 causally), so no row is empty.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch

from .layout import AttentionLayout


def _rules(layout: AttentionLayout, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
    """The rules without documents, for broadcastable index tensors qi, ki.

    Written with tensor ops only, so the same function serves the dense mask (on index grids)
    and FlexAttention (on the scalar index tensors it vmaps over).
    """
    L, B = layout.seq_len, layout.block_size
    if layout.mode == "ar":
        return ki <= qi
    if layout.mode == "full":
        return (qi >= 0) & (ki >= 0)  # all True, shaped like the other modes
    q_xt, k_xt = qi < L, ki < L
    q_pos, k_pos = qi % L, ki % L
    q_blk, k_blk = q_pos // B, k_pos // B
    clean_rule = (k_pos <= q_pos) if layout.mode == "context_causal" else (k_blk <= q_blk)
    return (
        (q_xt & k_xt & (q_blk == k_blk))
        | (q_xt & ~k_xt & (k_blk < q_blk))
        | (~q_xt & ~k_xt & clean_rule)
    )


def _positions(layout: AttentionLayout, device) -> torch.Tensor:
    return torch.arange(layout.total_len, device=device) % layout.seq_len


def dense_mask(layout: AttentionLayout, device=None) -> torch.Tensor:
    """Bool [b or 1, S, S], True where the query (row) may attend to the key (column)."""
    if device is None and layout.doc_ids is not None:
        device = layout.doc_ids.device
    idx = torch.arange(layout.total_len, device=device)
    mask = _rules(layout, idx[:, None], idx[None, :])[None]
    if layout.doc_ids is not None:
        doc = layout.doc_ids.to(device)[:, _positions(layout, device)]  # [b, S]
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    return mask


def flex_mask_mod(layout: AttentionLayout) -> Callable:
    """mask_mod(b, h, q_idx, kv_idx) for torch.nn.attention.flex_attention."""
    doc = layout.doc_ids
    L = layout.seq_len

    if doc is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return _rules(layout, q_idx, kv_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            same_doc = doc[b, q_idx % L] == doc[b, kv_idx % L]
            return _rules(layout, q_idx, kv_idx) & same_doc
    return mask_mod


_BLOCK_MASK_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 8


def flex_block_mask(layout: AttentionLayout, device):
    """A FlexAttention `BlockMask` for the layout.

    Without documents the mask depends on (mode, L, B) only, and every layer of every step
    asks for it, so it is kept in a small LRU. With documents it depends on the batch and is
    rebuilt on every call (build it once per forward and pass it to every layer if it shows
    up in profiles).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device)
    S = layout.total_len
    if layout.doc_ids is not None:
        doc_layout = AttentionLayout(
            layout.mode, layout.seq_len, layout.block_size, layout.doc_ids.to(device)
        )
        return create_block_mask(
            flex_mask_mod(doc_layout), layout.doc_ids.shape[0], None, S, S, device=device
        )
    key = (layout.mode, layout.seq_len, layout.block_size, str(device))
    if key in _BLOCK_MASK_CACHE:
        _BLOCK_MASK_CACHE.move_to_end(key)
        return _BLOCK_MASK_CACHE[key]
    block_mask = create_block_mask(flex_mask_mod(layout), None, None, S, S, device=device)
    _BLOCK_MASK_CACHE[key] = block_mask
    while len(_BLOCK_MASK_CACHE) > _BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASK_CACHE.popitem(last=False)
    return block_mask

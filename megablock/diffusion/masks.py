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

import weakref
from collections import OrderedDict
from typing import Callable

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


class LayoutCache:
    """A small LRU of things built from a layout (block masks, attention plans).

    The model calls attention once per layer with the same layout, so whatever the mask
    needs is built once and shared by all layers. Without documents an entry depends on
    (mode, L, B, key) only and lives across steps. With documents it also depends on the
    batch: an entry matches only the same documents. On CPU that is checked by comparing
    contents (O(b*L), nothing next to attention), so a reused buffer refilled in place (say
    through numpy, which leaves the tensor's version alone) can never hit a stale mask; on
    other devices, where a comparison would synchronize, by tensor identity and version.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    @staticmethod
    def _same_docs(stored, doc: torch.Tensor) -> bool:
        if doc.device.type == "cpu":
            return torch.equal(stored, doc)
        return stored[0]() is doc and stored[1] == doc._version

    @staticmethod
    def _remember(doc: torch.Tensor):
        if doc.device.type == "cpu":
            return doc.clone()
        return (weakref.ref(doc), doc._version)

    def get(self, layout: AttentionLayout, key: tuple, build: Callable[[], object]):
        doc = layout.doc_ids
        full_key = (layout.mode, layout.seq_len, layout.block_size, key,
                    None if doc is None else (tuple(doc.shape), str(doc.device)))
        hit = self._entries.get(full_key)
        if hit is not None and (doc is None or self._same_docs(hit[0], doc)):
            self._entries.move_to_end(full_key)
            return hit[1]
        value = build()
        self._entries[full_key] = (None if doc is None else self._remember(doc), value)
        self._entries.move_to_end(full_key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value


_BLOCK_MASKS = LayoutCache()


def flex_block_mask(layout: AttentionLayout, device):
    """A FlexAttention `BlockMask` for the layout, from a `LayoutCache`: without documents
    built once per (mode, L, B, device); with documents once per batch."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device)
    S = layout.total_len

    def build():
        if layout.doc_ids is None:
            return create_block_mask(flex_mask_mod(layout), None, None, S, S, device=device)
        # a copy: the mask_mod must not see later in-place writes to the batch's buffer
        on_device = AttentionLayout(layout.mode, layout.seq_len, layout.block_size,
                                    layout.doc_ids.to(device, copy=True))
        return create_block_mask(flex_mask_mod(on_device), layout.doc_ids.shape[0], None, S, S,
                                 device=device)

    return _BLOCK_MASKS.get(layout, (str(device),), build)

"""KV cache for block-diffusion sampling: a causal clean context plus a scratch window.

With context-causal training the clean half of the model is a plain causal LM, so the clean
context of a sample is an ordinary causal KV cache. Sampling needs two kinds of forward over it:

- ``append`` (prefill, and a finished block): the new tokens attend causally to themselves and
  to every cached key; their K/V are kept (the cache grows).
- ``peek`` (refining a block): the block's queries attend to all cached keys and to *all* keys of
  the block (bidirectional inside the block, as the xt half in training); nothing is kept.

Both write the new K/V into the preallocated buffer right after the cached length (so attention
reads one contiguous view, no concatenation); only ``append`` advances the length, so a peek's
K/V are scratch that the next forward overwrites.

Left padding: rows of a batch may start at different slots. ``key_valid`` marks which slots hold
real tokens; padded slots are never attended to. The model calls `attend(layer, q, k, v)` from
every attention layer (see `ParallelAttention`); the sampler brackets each forward with
`begin(...)` / `end()`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(self, batch: int, capacity: int):
        self.batch = batch
        self.capacity = capacity
        self.length = 0
        self.k: Dict[int, torch.Tensor] = {}
        self.v: Dict[int, torch.Tensor] = {}
        self.key_valid: Optional[torch.Tensor] = None  # [b, capacity] bool; None: every slot real
        self._append = False
        self._n_new = 0
        self._new_valid: Optional[torch.Tensor] = None
        self._mask: Optional[torch.Tensor] = None
        self._mask_ready = False

    # --- one forward ---------------------------------------------------------------------------
    def begin(self, n_new: int, append: bool, new_valid: Optional[torch.Tensor] = None) -> None:
        """Start a forward over `n_new` new slots. `new_valid` [b, n_new] marks real tokens among
        them (None: all real); it only matters for ``append``, where it is stored with the keys."""
        if self.length + n_new > self.capacity:
            raise RuntimeError(f"KV cache full: {self.length} + {n_new} slots > capacity {self.capacity}")
        self._append, self._n_new = append, n_new
        if new_valid is not None and bool(new_valid.all()):
            new_valid = None
        if new_valid is not None and self.key_valid is None:
            self.key_valid = torch.ones(self.batch, self.capacity, dtype=torch.bool, device=new_valid.device)
        self._new_valid = new_valid
        self._mask_ready = False

    def adapter_gate(self) -> bool:
        """Gated adapters (lora.scope=noised) run on a peek, the noised block, never on an append."""
        return not self._append

    def end(self) -> None:
        if self._append:
            if self.key_valid is not None:
                new = self._new_valid if self._new_valid is not None else True
                self.key_valid[:, self.length : self.length + self._n_new] = new
            self.length += self._n_new
        self._n_new = 0

    # --- called by every attention layer ---------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, hq, s, d]; k, v [b, hkv, s, d] (RoPE applied). Returns [b, hq, s, d]."""
        b, hkv, s, d = k.shape
        if s != self._n_new:
            raise RuntimeError(f"attend got {s} new slots, begin() announced {self._n_new}")
        if layer not in self.k:
            self.k[layer] = k.new_empty(b, hkv, self.capacity, d)
            self.v[layer] = v.new_empty(b, hkv, self.capacity, d)
        end = self.length + s
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if not self._mask_ready:
            self._mask = self._build_mask(s, q.device)
            self._mask_ready = True
        causal = self._mask is None and self._append and s > 1 and self.length == 0
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=self._mask, is_causal=causal, enable_gqa=q.shape[1] != hkv
        )

    def _build_mask(self, s: int, device) -> Optional[torch.Tensor]:
        """[b, 1, s, length + s] bool, or None when SDPA needs no mask (every key visible, or
        plain causal from an empty cache, which `is_causal` covers)."""
        n = self.length
        padded = (self.key_valid is not None and not bool(self.key_valid[:, :n].all())) or self._new_valid is not None
        if not padded and (not self._append or s == 1 or n == 0):
            return None
        new = torch.ones(s, s, dtype=torch.bool, device=device)
        if self._append:
            new = new.tril()
        mask = torch.cat([torch.ones(s, n, dtype=torch.bool, device=device), new], dim=1)
        mask = mask.expand(self.batch, s, n + s).clone()
        if self.key_valid is not None:
            mask[:, :, :n] &= self.key_valid[:, None, :n]
        if self._new_valid is not None:
            mask[:, :, n:] &= self._new_valid[:, None, :]
            # A padding query sees no real key; let it see itself so its row is not all -inf
            # (its output is never used and no real query attends to it).
            mask[:, :, n:] |= torch.eye(s, dtype=torch.bool, device=device)
        return mask[:, None]

    # --- batch bookkeeping ------------------------------------------------------------------------
    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (finished rows leave; their compute stops)."""
        for layer in self.k:
            self.k[layer] = self.k[layer].index_select(0, rows)
            self.v[layer] = self.v[layer].index_select(0, rows)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, rows)
        self.batch = int(rows.numel())

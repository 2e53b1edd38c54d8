"""The gated drafter's cheaper step: the clean half once without autograd, then the noised half
over its K/V.

With `lora.scope=noised` the clean half x0 of a [xt ; x0] batch runs through the frozen base
only: nothing that trains touches it, so it needs no autograd. Under context-causal attention
its rows attend to x0 keys only, so it can run alone as a causal pass of length L
(document-masked like the x0 rows of the joint layout). `CleanCapture` is the `kv_cache` of that
pass and keeps each layer's K/V. The noised half then runs with autograd; through
`NoisedOverClean` each layer attends with its own K/V plus the kept clean ones under the joint
layout's rules for the xt rows (`attend_noised`). The x0 K/V are the joint forward's numbers, so
every xt row, the loss and every adapter gradient are the joint forward's; only the clean half's
backward (and its activations) are gone. This is the structure of decoding: a KV cache of the
clean prefix and draft blocks over it.

The two objects stand where a decoding cache stands in the layers (`attend(layer, q, k, v)`),
and tell the model where its gated adapters run (`adapter_gate`): nowhere in the clean pass,
everywhere in the noised one.
"""
from __future__ import annotations

from typing import Dict

import torch

from .attention import attend, attend_noised
from .layout import AttentionLayout


class CleanCapture:
    """kv_cache of the clean pass: causal attention over x0 (with the layout's documents),
    keeping every layer's K/V."""

    def __init__(self, layout: AttentionLayout, impl: str = "auto"):
        if layout.mode != "context_causal":
            raise ValueError(f"the cached clean pass needs context-causal attention, got {layout.mode!r}")
        self.joint = layout
        self.layout = AttentionLayout("ar", layout.seq_len, 1, layout.doc_ids)
        self.impl = impl
        self.k: Dict[int, torch.Tensor] = {}
        self.v: Dict[int, torch.Tensor] = {}

    def adapter_gate(self) -> bool:
        return False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k[layer], self.v[layer] = k, v
        return attend(q, k, v, self.layout, impl=self.impl)


class NoisedOverClean:
    """kv_cache of the noised pass: the xt rows of the joint attention over the captured x0 K/V."""

    def __init__(self, clean: CleanCapture):
        self.clean = clean

    def adapter_gate(self) -> bool:
        return True

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.clean
        return attend_noised(q, k, v, c.k[layer], c.v[layer], c.joint, impl=c.impl)


def cached_clean_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                         layout: AttentionLayout, impl: str = "auto") -> torch.Tensor:
    """Hidden states [b, S', H] of a context-causal [xt ; x0] batch (x0 the last L carried
    positions), as `model.encode` gives them, with the clean half computed without autograd."""
    L = layout.seq_len
    split = input_ids.shape[1] - L
    clean = CleanCapture(layout, impl)
    with torch.no_grad():
        clean_hidden = model.encode(input_ids[:, split:], position_ids[:, split:], clean.layout, kv_cache=clean)
    noised = model.encode(input_ids[:, :split], position_ids[:, :split], layout, kv_cache=NoisedOverClean(clean))
    return torch.cat([noised, clean_hidden], dim=1)

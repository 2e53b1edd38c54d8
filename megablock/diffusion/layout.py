"""What a batch's attention looks like: the one object the model needs to build its mask.

Every attention implementation (dense reference, CPU fast path, FlexAttention) takes an
`AttentionLayout` and nothing else about the mask, so pipeline stages can rebuild the mask
from a handful of integers instead of receiving an S x S tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megablock.config import Attention, options

ATTENTION_MODES = ("ar",) + options(Attention)
"""The configurable attentions plus "ar" (x0 only, causal: block size 1 with shift)."""


@dataclass
class AttentionLayout:
    """Sequence layout of one micro-batch.

    Modes:
      - ``ar``: the input is x0 only (length L), plain causal attention. Block size 1 with
        token shift is exactly this (nothing is masked), and evaluation in AR mode uses it.
      - ``context_causal`` (NBDiff) / ``block_causal`` (BD3-LM): the input is [xt ; x0],
        length 2L, position ids 0..L-1 for both halves (rules in DESIGN.md).
      - ``full``: the input is xt only (length L), bidirectional (Dream / DiffuLLaMA baseline).
    """

    mode: str
    seq_len: int
    """L: clean tokens per sample."""
    block_size: int = 1
    """B: tokens per diffusion block; divides L."""
    doc_ids: Optional[torch.Tensor] = None
    """[batch, L] int document index of every clean position, for document masking of packed
    samples (no attention across documents); None attends across document boundaries."""
    rows: Optional[torch.Tensor] = None
    """[batch, S'] long, ascending: the positions of the full S-long sequence that this forward
    carries (`megablock.diffusion.batch.drop_unmasked_blocks`); None carries all S."""

    def __post_init__(self):
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode {self.mode!r} is not one of {ATTENTION_MODES}")
        if self.seq_len % self.block_size:
            raise ValueError(
                f"block size {self.block_size} does not divide sequence length {self.seq_len}"
            )

    @property
    def two_halves(self) -> bool:
        return self.mode in ("context_causal", "block_causal")

    @property
    def total_len(self) -> int:
        """S: the length of the whole sequence the rules are written for."""
        return 2 * self.seq_len if self.two_halves else self.seq_len

    @property
    def carried_len(self) -> int:
        """The model's input length: S, or S' when only `rows` are carried."""
        return self.total_len if self.rows is None else int(self.rows.shape[1])

    def to_tensor(self) -> torch.Tensor:
        """Integers that cross a pipeline-stage boundary (DeepSpeed sends no bools or objects)."""
        return torch.tensor(
            [ATTENTION_MODES.index(self.mode), self.seq_len, self.block_size], dtype=torch.long
        )

    @classmethod
    def from_tensor(cls, t: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> "AttentionLayout":
        mode, seq_len, block_size = (int(x) for x in t.flatten()[:3].tolist())
        return cls(ATTENTION_MODES[mode], seq_len, block_size, doc_ids)


def noised_positions(layout: AttentionLayout, device=None):
    """Which input positions belong to the noised half: a bool [b or 1, S'] tensor over the
    carried positions for the two-half modes, or True / False for a forward that is all noised
    ("full", xt only) or all clean ("ar", x0 only)."""
    if not layout.two_halves:
        return layout.mode == "full"
    if layout.rows is not None:
        return layout.rows.to(device) < layout.seq_len
    return (torch.arange(layout.total_len, device=device) < layout.seq_len)[None]

"""What a batch's attention looks like: the one object the model needs to build its mask.

Every attention implementation (dense reference, CPU fast path, FlexAttention) takes an
`AttentionLayout` and nothing else about the mask, so pipeline stages can rebuild the mask
from a handful of integers instead of receiving an S x S tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megablock.config import Attention, ContextImpl, options

ATTENTION_MODES = ("ar",) + options(Attention)
"""The configurable attentions plus "ar" (x0 only, causal: block size 1 with shift)."""


@dataclass(frozen=True)
class ContextShard:
    """This rank's share of every sample under context parallelism (megablock.diffusion.context):
    chunks `rank` and 2c-1-`rank` of each half of the sequence, c = `size`."""

    size: int
    rank: int
    group: Optional[object] = field(default=None, compare=False, repr=False)
    """The context-parallel process group (megatron-core's)."""
    impl: ContextImpl = "ring"
    """parallel.context_impl: ring | allgather."""


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
    context: Optional[ContextShard] = None
    """Under context parallelism the forward carries this rank's zigzag shard of the S positions
    (`shard_positions`); the rules, L and doc_ids stay those of the whole sequence."""

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
        """The model's input length: S, S' when only `rows` are carried, or S / c under context
        parallelism."""
        if self.context is not None:
            return self.total_len // self.context.size
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
    if layout.context is not None:
        return (shard_positions(layout, device) < layout.seq_len)[None]
    if layout.rows is not None:
        return layout.rows.to(device) < layout.seq_len
    return (torch.arange(layout.total_len, device=device) < layout.seq_len)[None]


def context_chunks(layout: AttentionLayout, rank: int) -> list[int]:
    """The chunks of the S-long sequence that context rank `rank` holds, in its local order.

    Each half (xt, x0; one half in the "ar" and "full" modes) is cut into 2c chunks of
    L / (2c) positions; chunk j covers positions [j n, (j+1) n). Rank r holds chunks r and 2c-1-r
    of every half: the early chunk has little causal work and the late one much, so every rank
    gets the same amount (the zigzag), and a noised chunk's own clean chunk is on the same rank.
    """
    c = layout.context.size
    halves = 2 if layout.two_halves else 1
    return [h * 2 * c + j for h in range(halves) for j in (rank, 2 * c - 1 - rank)]


def chunk_len(layout: AttentionLayout) -> int:
    c = layout.context.size
    if layout.seq_len % (2 * c * layout.block_size):
        raise ValueError(f"sequence length {layout.seq_len} does not split into 2 x {c} chunks of whole "
                         f"blocks of {layout.block_size}")
    return layout.seq_len // (2 * c)


def shard_positions(layout: AttentionLayout, device=None, rank: Optional[int] = None) -> torch.Tensor:
    """[S / c] long: the positions of the whole sequence this context rank carries, in order."""
    n = chunk_len(layout)
    rank = layout.context.rank if rank is None else rank
    starts = torch.tensor(context_chunks(layout, rank), device=device) * n
    return (starts[:, None] + torch.arange(n, device=device)).flatten()

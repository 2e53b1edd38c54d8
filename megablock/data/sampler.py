"""Which global samples each rank trains on, as a pure function of consumed samples.

A training step consumes one global batch of G samples with global sample indices
consumed_samples .. consumed_samples + G - 1.  The step runs A = G / (m * D) accumulation
micro-steps of m samples on each of D data-parallel ranks.  Micro-step a on data-parallel rank r
takes global-batch positions  a*m*D + r*m  ..  a*m*D + r*m + m - 1,  so
  - the D ranks' samples are disjoint and their union is the global batch (the single-rank stream
    at D = 1 is the same samples in the same micro-step order);
  - tensor- and pipeline-parallel ranks pass only their data-parallel coordinates, so they get
    identical samples;
  - resuming from a consumed-samples count reproduces the same batches (and, since the noise is
    keyed by global sample index, the same masks).
"""
from __future__ import annotations

from dataclasses import dataclass


def data_parallel_coords(rank: int, world_size: int, tensor: int = 1, pipeline: int = 1) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of a global rank, with megatron's / DeepSpeed's
    order: tensor fastest, then data, then pipeline."""
    if world_size % (tensor * pipeline):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor ({tensor}) x pipeline ({pipeline})"
        )
    dp_size = world_size // (tensor * pipeline)
    return (rank // tensor) % dp_size, dp_size


@dataclass(frozen=True)
class DataParallelSampler:
    global_batch_size: int
    """G: samples per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int
    """m: samples per forward/backward on one rank."""
    data_parallel_rank: int = 0
    data_parallel_size: int = 1

    def __post_init__(self):
        G, m, D = self.global_batch_size, self.micro_batch_size, self.data_parallel_size
        if min(G, m, D) < 1:
            raise ValueError(f"batch sizes and data-parallel size must be >= 1 (G={G}, m={m}, D={D})")
        if G % (m * D):
            raise ValueError(
                f"train.global_batch_size {G} is not a multiple of train.micro_batch_size {m} x "
                f"data-parallel size {D} = {m * D}; set global_batch_size to a multiple of {m * D}"
            )
        if not 0 <= self.data_parallel_rank < D:
            raise ValueError(f"data-parallel rank {self.data_parallel_rank} not in [0, {D})")

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def micro_batches(self, consumed_samples: int) -> list[list[int]]:
        """Global sample indices of this rank's micro-batches for the step that starts after
        `consumed_samples` samples: A lists of m indices, in micro-step order.  Any count is
        accepted, so a run may resume with a different global batch size."""
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        m, D = self.micro_batch_size, self.data_parallel_size
        out = []
        for a in range(self.accumulation_steps):
            first = consumed_samples + a * m * D + self.data_parallel_rank * m
            out.append(list(range(first, first + m)))
        return out

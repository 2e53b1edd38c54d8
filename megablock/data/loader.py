"""One rank's training micro-batches for a step: sampler -> token windows -> curriculum -> noise.

The whole step uses the block size of the curriculum stage at the step's first consumed token
(consumed tokens = consumed samples x L; complementary copies are not extra data and do not
count), so a step never mixes block sizes and a resumed run picks the stage up exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megablock.data.datasets import TokenWindows
from megablock.data.sampler import DataParallelSampler
from megablock.diffusion.batch import BatchConfig, DiffusionBatch, build_batch_from_config
from megablock.diffusion.curriculum import Curriculum


@dataclass
class StepBatches:
    consumed_samples: int
    stage: int
    block_size: int
    micro_batches: list  # list[DiffusionBatch]


class DiffusionBatches:
    """Builds the micro-batches of a training step for this rank."""

    def __init__(
        self,
        windows: TokenWindows,
        sampler: DataParallelSampler,
        curriculum: Curriculum,
        config: BatchConfig,
        *,
        mask_token_id: Optional[int],
        seed: int = 0,
        eod_token_id: Optional[int] = None,
    ):
        config.validate()
        for i, b in enumerate(curriculum.block_sizes):
            if windows.seq_len % b:
                raise ValueError(
                    f"diffusion.stages[{i}]: block_size {b} does not divide data.seq_len {windows.seq_len}"
                )
        self.windows, self.sampler, self.curriculum, self.config = windows, sampler, curriculum, config
        self.mask_token_id, self.seed, self.eod_token_id = mask_token_id, seed, eod_token_id

    def consumed_tokens(self, consumed_samples: int) -> int:
        return consumed_samples * self.windows.seq_len

    def step(self, consumed_samples: int) -> StepBatches:
        stage, block_size = self.curriculum.stage_at(self.consumed_tokens(consumed_samples))
        batches: list[DiffusionBatch] = []
        for indices in self.sampler.micro_batches(consumed_samples):
            batches.append(
                build_batch_from_config(
                    self.windows.get(indices), indices, block_size, self.config,
                    mask_token_id=self.mask_token_id, seed=self.seed, eod_token_id=self.eod_token_id,
                )
            )
        return StepBatches(consumed_samples, stage, block_size, batches)

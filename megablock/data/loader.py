"""One rank's training micro-batches for a step: sampler -> token windows -> curriculum -> noise.

The whole step uses the block size of the curriculum stage at the step's first consumed token
(consumed tokens = consumed samples x L; complementary copies are not extra data and do not
count), so a step never mixes block sizes and a resumed run picks the stage up exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from megablock.config import DiffusionSection
from megablock.data.datasets import TokenWindows
from megablock.data.sft import SFTWindows
from megablock.data.sampler import DataParallelSampler
from megablock.diffusion.batch import DiffusionBatch, build_batch
from megablock.diffusion.curriculum import Curriculum


@dataclass
class StepBatches:
    consumed_samples: int
    curriculum_stage: int
    block_size: int
    micro_batches: list[DiffusionBatch]


class StepBatcher:
    """Builds the micro-batches of each training step for this rank."""

    def __init__(
        self,
        windows: Union[TokenWindows, SFTWindows],
        sampler: DataParallelSampler,
        settings: DiffusionSection,
        *,
        mask_token_id: Optional[int],
        seed: int = 0,
        eod_token_id: Optional[int] = None,
    ):
        self.curriculum = Curriculum(settings.stages, windows.seq_len)
        self.windows, self.sampler, self.settings = windows, sampler, settings
        self.mask_token_id, self.seed, self.eod_token_id = mask_token_id, seed, eod_token_id

    def step(self, consumed_samples: int) -> StepBatches:
        stage, block_size = self.curriculum.stage_at(consumed_samples * self.windows.seq_len)
        batches = [
            build_batch(**self.windows.batch_inputs(indices), sample_indices=indices, block_size=block_size,
                        settings=self.settings, mask_token_id=self.mask_token_id, seed=self.seed,
                        eod_token_id=self.eod_token_id)
            for indices in self.sampler.micro_batches(consumed_samples)
        ]
        return StepBatches(consumed_samples, stage, block_size, batches)

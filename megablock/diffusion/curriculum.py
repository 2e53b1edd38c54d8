"""Block-size curriculum: which block size to train at, as a pure function of consumed tokens.

`diffusion.stages` is a list of {block_size, tokens} (`megablock.config.Stage`): stage i lasts
`tokens` consumed (clean) tokens, starting where stage i-1 ended.  The last stage may leave
`tokens` out (None): it runs forever.  If the last stage does give `tokens`, training past its end
stays in the last stage.  Because the stage depends on consumed tokens only (not on steps or
wall-clock), a resumed run lands in exactly the stage it left, whatever the batch size or
parallel layout.
"""
from __future__ import annotations

import bisect
from typing import Optional

from megablock.config import Stage, check_stages, parse_stages


class Curriculum:
    """Validated stages with O(log n) lookup of the stage at a consumed-token count."""

    def __init__(self, stages: list, seq_len: Optional[int] = None):
        self.stages: list[Stage] = parse_stages(list(stages))
        check_stages(self.stages, seq_len)
        # starts[i] = first consumed-token count of stage i
        self.starts = [0]
        for s in self.stages[:-1]:
            self.starts.append(self.starts[-1] + s.tokens)

    def stage_at(self, consumed_tokens: int) -> tuple[int, int]:
        """(stage index, block size) in effect once `consumed_tokens` tokens have been trained on."""
        if consumed_tokens < 0:
            raise ValueError(f"consumed_tokens must be >= 0, got {consumed_tokens}")
        i = bisect.bisect_right(self.starts, consumed_tokens) - 1
        return i, self.stages[i].block_size

    def next_switch(self, consumed_tokens: int) -> Optional[int]:
        """Consumed-token count of the next stage change after `consumed_tokens` (None if none)."""
        i, _ = self.stage_at(consumed_tokens)
        return self.starts[i + 1] if i + 1 < len(self.starts) else None

    @property
    def block_sizes(self) -> list[int]:
        return [s.block_size for s in self.stages]


def stage_at(stages: list, consumed_tokens: int, seq_len: Optional[int] = None) -> tuple[int, int]:
    """Pure-function form: (stage index, block size) at `consumed_tokens`."""
    return Curriculum(stages, seq_len).stage_at(consumed_tokens)

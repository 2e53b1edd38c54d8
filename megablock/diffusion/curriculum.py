"""Block-size curriculum: which block size to train at, as a pure function of consumed tokens.

`diffusion.stages` is a list of {block_size, tokens}: stage i lasts `tokens` consumed (clean)
tokens, starting where stage i-1 ended.  The last stage may leave `tokens` out (None): it runs
forever.  If the last stage does give `tokens`, training past its end stays in the last stage.
Because the stage depends on consumed tokens only (not on steps or wall-clock), a resumed run
lands in exactly the stage it left, whatever the batch size or parallel layout.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterable, Optional


@dataclass(frozen=True)
class Stage:
    block_size: int
    """Tokens per diffusion block (1 = plain AR with token shift)."""
    tokens: Optional[int] = None
    """Consumed tokens this stage lasts; None only for the last stage (= forever)."""


def _whole(x: Any) -> Any:
    """YAML reads 1.0e6 as a float: accept whole-number floats as ints."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _as_stage(i: int, s: Any) -> Stage:
    if isinstance(s, Stage):
        return Stage(_whole(s.block_size), _whole(s.tokens))
    if isinstance(s, dict):
        unknown = set(s) - {"block_size", "tokens"}
        if unknown:
            raise ValueError(
                f"diffusion.stages[{i}] has unknown keys {sorted(unknown)}; "
                "each stage is {block_size: B, tokens: N}"
            )
        if "block_size" not in s:
            raise ValueError(f"diffusion.stages[{i}] has no block_size; write {{block_size: B, tokens: N}}")
        return Stage(_whole(s["block_size"]), _whole(s.get("tokens")))
    if hasattr(s, "block_size"):
        return Stage(_whole(s.block_size), _whole(getattr(s, "tokens", None)))
    raise ValueError(f"diffusion.stages[{i}] = {s!r} is not a {{block_size, tokens}} mapping")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Curriculum:
    """Validated stages with O(log n) lookup of the stage at a consumed-token count."""

    def __init__(self, stages: Iterable[Any], seq_len: Optional[int] = None):
        self.stages = [_as_stage(i, s) for i, s in enumerate(stages)]
        validate_stages(self.stages, seq_len)
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

    def stage_start(self, index: int) -> int:
        """Consumed-token count at which stage `index` begins."""
        return self.starts[index]

    def next_switch(self, consumed_tokens: int) -> Optional[int]:
        """Consumed-token count of the next stage change after `consumed_tokens` (None if none)."""
        i, _ = self.stage_at(consumed_tokens)
        return self.starts[i + 1] if i + 1 < len(self.starts) else None

    @property
    def block_sizes(self) -> list[int]:
        return [s.block_size for s in self.stages]


def validate_stages(stages: list[Stage], seq_len: Optional[int] = None) -> None:
    """Reject stages that cannot run, naming the stage and the fix."""
    if not stages:
        raise ValueError(
            "diffusion.stages is empty; give at least one stage, e.g. [{block_size: 1, tokens: "
            "1000000}, {block_size: 4}]"
        )
    last = len(stages) - 1
    for i, s in enumerate(stages):
        if not _is_int(s.block_size) or s.block_size < 1:
            raise ValueError(
                f"diffusion.stages[{i}]: block_size {s.block_size!r} must be a positive integer"
            )
        if seq_len is not None and seq_len % s.block_size:
            divisors = [d for d in range(1, min(seq_len, 64) + 1) if seq_len % d == 0]
            raise ValueError(
                f"diffusion.stages[{i}]: block_size {s.block_size} does not divide data.seq_len "
                f"{seq_len}; use a divisor of {seq_len} (e.g. {divisors}) or change data.seq_len"
            )
        if s.tokens is None:
            if i != last:
                raise ValueError(
                    f"diffusion.stages[{i}] (block_size {s.block_size}) has no tokens; only the "
                    "last stage may omit tokens (it then runs forever)"
                )
        elif not _is_int(s.tokens) or s.tokens <= 0:
            raise ValueError(
                f"diffusion.stages[{i}] (block_size {s.block_size}): tokens {s.tokens!r} must be a "
                "positive integer number of consumed tokens (or omitted on the last stage)"
            )


def stage_at(stages: Iterable[Any], consumed_tokens: int, seq_len: Optional[int] = None) -> tuple[int, int]:
    """Pure-function form: (stage index, block size) at `consumed_tokens`."""
    return Curriculum(stages, seq_len).stage_at(consumed_tokens)

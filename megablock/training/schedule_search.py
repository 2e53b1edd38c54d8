"""BD3-LM's data-driven noise schedule (`diffusion.schedule: adaptive`).

The training loss is a Monte-Carlo estimate over noise draws; its variance, not its mean, is what
a clipped mask-ratio range t ~ U[beta, omega] changes. BD3-LM's proxy for that variance: on fixed
held-out samples, draw the noise several times and measure how much each sample's diffusion loss
varies across the draws. The search scores a grid of intervals that way and training uses the
interval of lowest variance until the next search, which comes at the start of every block-size
stage and every `schedule_search_interval` steps.

- Held-out samples: the first `schedule_search_batches` micro-batches per data-parallel rank of
  the validation split, which training never consumes.
- Draw k of every candidate uses the same noise seed (common random numbers: the candidates
  differ by their interval, not by luck), keyed by (train.seed, k) and the global sample index,
  so every layout draws the same masks and a resumed run repeats a search exactly.
- The number is a global one: the mean over all held-out samples of the unbiased variance across
  draws, summed over data-parallel ranks (losses live on the last pipeline stage and are
  broadcast; TP ranks agree), so TP, PP and DP give the one-process value.
- Evaluation keeps the unbiased t ~ U[eps, 1]: the validation NELBO stays comparable across runs.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from megablock.config import DiffusionSection
from megablock.diffusion.noise import sample_seed
from megablock.training.engine import Engine
from megablock.training.setup import HeldOutData

logger = logging.getLogger(__name__)

_SEARCH_STREAM = 0x5EA6C4  # keeps search draws apart from the training and validation noise streams


def candidate_intervals(widths: list, step: float, eps: float) -> list[tuple[float, float]]:
    """The grid: for each width w, intervals [beta, beta + w] with beta = 0, step, 2 step, ... while
    beta + w <= 1 (beta = 0 becomes eps, which keeps 1/t finite)."""
    out: list[tuple[float, float]] = []
    for w in sorted(set(float(x) for x in widths)):
        k = 0
        while k * step + w <= 1.0 + 1e-9:
            lo, hi = round(max(k * step, eps), 6), round(min(k * step + w, 1.0), 6)
            if (lo, hi) not in out and lo < hi:
                out.append((lo, hi))
            k += 1
    return out


def draw_seed(seed: int, draw: int) -> int:
    return sample_seed(seed ^ _SEARCH_STREAM, draw)


def loss_variance(engine: Engine, held: HeldOutData, block_size: int, settings: DiffusionSection,
                  draws: int, seed: int) -> float:
    """Mean over the held-out samples of the (unbiased) variance across `draws` noise draws of the
    per-sample diffusion loss under `settings`; the same number on every rank and layout."""
    per_draw = [engine.sample_losses(held.batches(block_size, settings, seed=draw_seed(seed, k))) for k in range(draws)]
    if per_draw[0] is None:  # an earlier pipeline stage: the last one holds the losses
        local = torch.zeros(2, dtype=torch.float64)
    else:
        losses = torch.stack(per_draw).double()  # [draws, samples of this rank]
        local = torch.stack([losses.var(dim=0, unbiased=True).sum(), torch.tensor(float(losses.shape[1]), dtype=torch.float64)])
    total = engine.global_mean(local, 2)  # means over DP ranks of (sum, count): their ratio is global
    return float(total[0] / total[1])


@dataclass
class SearchResult:
    step: int
    block_size: int
    interval: tuple[float, float]
    variance: float
    table: list[tuple[float, float, float]]
    """(clip_min, clip_max, variance) of every candidate."""


def search_interval(engine: Engine, held: HeldOutData, block_size: int, settings: DiffusionSection,
                    seed: int, step: int) -> SearchResult:
    """Score every candidate interval and pick the lowest variance (the first of equals)."""
    table = []
    for lo, hi in candidate_intervals(settings.schedule_search_widths, settings.schedule_search_step, settings.eps):
        candidate = replace(settings, schedule="clipped", clip_min=lo, clip_max=hi)
        table.append((lo, hi, loss_variance(engine, held, block_size, candidate, settings.schedule_search_draws, seed)))
    lo, hi, var = min(table, key=lambda row: row[2])
    logger.info("schedule search at step %d (B = %d): t ~ U[%.3g, %.3g], loss variance %.4g (%d candidates)",
                step, block_size, lo, hi, var, len(table))
    return SearchResult(step, block_size, (lo, hi), var, table)


class SearchLog:
    """SAVE/schedule_search.jsonl: every search's candidates and choice (rank 0 writes)."""

    def __init__(self, save_dir: Optional[str], enabled: bool):
        self.path = Path(save_dir) / "schedule_search.jsonl" if enabled and save_dir else None

    def write(self, result: SearchResult) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": result.step, "block_size": result.block_size, "clip_min": result.interval[0],
                  "clip_max": result.interval[1], "loss_variance": result.variance,
                  "candidates": [list(row) for row in result.table]}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_from(self, step: int) -> None:
        """On resume: drop searches made at or after `step` (the resumed run repeats them)."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a partial last line of a killed run
        self.path.write_text("".join(line + "\n" for line in kept))

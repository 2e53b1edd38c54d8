"""What a run reports on global rank 0: metrics.jsonl, TensorBoard scalars, a progress bar."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s of accelerators whose name we can recognise (for an MFU estimate).
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def device_peak_flops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors the numbers to TensorBoard."""

    def __init__(self, save_dir: Optional[str], enabled: bool):
        self.enabled = enabled and save_dir is not None
        self.tb = None
        if not self.enabled:
            return
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(save_dir) / "metrics.jsonl"
        self.tb_dir = Path(save_dir) / "tensorboard"
        self._first_write = True

    def _tensorboard(self):
        """Opened at the first record, not before: a launch refused while resuming (another base,
        other settings) leaves no new events file in the run's folder."""
        if self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.tb_dir))
        return self.tb

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._first_write:
            # Whatever this launch starts from (a checkpoint, or step 0 after a kill before the
            # first checkpoint), records of this step and later ones are from a run that was cut
            # off and are redone now: drop them, and with them a partial last line.
            self._first_write = False
            self.truncate_after(record["step"] - 1)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step, tb = record["step"], self._tensorboard()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                tb.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}", value, step)
        tb.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (on resume: steps the checkpoint does not contain;
        they will be redone).  A line that does not parse (a kill in the middle of a write leaves
        a partial last line) is dropped with a warning instead of failing the resume."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                logger.warning("%s line %d is not a complete record (a write cut off by a kill?); dropped", self.path, n)
                continue
            if record_step <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)  # a kill now leaves the old file or the new one, never half of it

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

"""What a run reports on global rank 0: metrics.jsonl, TensorBoard scalars, a progress bar."""
from __future__ import annotations

import json
import logging
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
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(Path(save_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}", value, step)
        self.tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps the checkpoint does not contain (they will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

#!/usr/bin/env python
"""Plot a training run's metrics.jsonl as PNG files: `python tools/plot_metrics.py --help`.

A thin wrapper: the tool is megablock.commands.plot_metrics (also installed as the console command
`megablock-plot-metrics`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablock.commands.plot_metrics import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

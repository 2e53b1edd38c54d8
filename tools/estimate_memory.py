#!/usr/bin/env python
"""Per-rank memory of a training config: `python tools/estimate_memory.py --help`.

A thin wrapper: the tool is megablock.commands.estimate_memory (also installed as the console command
`megablock-estimate-memory`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablock.commands.estimate_memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

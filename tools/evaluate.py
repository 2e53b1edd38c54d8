#!/usr/bin/env python
"""NELBO / perplexity bound, AR-mode NLL and generation metrics of a block-diffusion LM: `python tools/evaluate.py --help`.

A thin wrapper: the tool is megablock.commands.evaluate (also installed as the console command
`megablock-evaluate`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablock.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

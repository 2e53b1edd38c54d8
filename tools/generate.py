#!/usr/bin/env python
"""Block-diffusion sampling with a KV cache and parallel decoding: `python tools/generate.py --help`.

A thin wrapper: the tool is megablock.commands.generate (also installed as the console command
`megablock-generate`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablock.commands.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

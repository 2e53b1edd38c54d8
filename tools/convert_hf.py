#!/usr/bin/env python
"""Convert a Hugging Face model into a sharded megablock checkpoint: `python tools/convert_hf.py --help`.

A thin wrapper: the tool is megablock.commands.convert_hf (also installed as the console command
`megablock-convert-hf`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablock.commands.convert_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

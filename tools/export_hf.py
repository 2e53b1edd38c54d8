#!/usr/bin/env python
"""Export a megablock checkpoint as a plain Hugging Face folder: `python tools/export_hf.py --help`.

A thin wrapper: the tool is megablock.commands.export_hf (also installed as the console command
`megablock-export-hf`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablock.commands.export_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

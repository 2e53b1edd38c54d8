#!/usr/bin/env python
"""Tokenize jsonl/txt (optionally .gz) into a megatron-core indexed dataset PREFIX.bin/.idx.

    python tools/preprocess_data.py --input FILE... --tokenizer DIR --output-prefix PREFIX [--workers N]

All logic lives in megablock.data.preprocess and megablock.data.sft (--format sft); the CLI is
megablock.commands.preprocess_data; run with --help for the options.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablock.commands.preprocess_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

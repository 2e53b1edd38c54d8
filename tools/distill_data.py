#!/usr/bin/env python
"""Self-distillation data: the model's own continuations as prompt/response JSON lines.

    python tools/distill_data.py (--ckpt DIR | --hf-dir DIR) --out FILE.jsonl (--prompts FILE | --corpus FILE) ...

All logic lives in megablock.inference.distill (CLI: megablock.commands.distill_data); run with --help for the options.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablock.commands.distill_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

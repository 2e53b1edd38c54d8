#!/usr/bin/env python
"""Score a megablock model on lm-evaluation-harness tasks: `python tools/lm_eval.py --help`.

A thin wrapper: the tool is megablock.commands.lm_eval (also installed as the console command
`megablock-lm-eval`).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named like the harness's package: take its folder off the path, or `import lm_eval`
# would import this script.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, os.path.dirname(HERE))

from megablock.commands.lm_eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

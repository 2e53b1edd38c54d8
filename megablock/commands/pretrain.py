"""Block-diffusion adaptation of a pretrained AR model (NBDiff recipe).

    deepspeed [--num_accelerators N] examples/pretrain_nbdiff.py --config CONFIG.yaml [--set key=value ...]

Also runs under torchrun and as plain `python` (one process). The loop lives in
megablock.training; this module parses the command line and turns any error into one line
(with `--debug` or MEGABLOCK_DEBUG=1, the traceback).
"""
from __future__ import annotations

import argparse
import logging
import os

from megablock.cli import add_common_flags, run_tool
from megablock.config import load_config
from megablock.training.trainer import Trainer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (examples/configs/)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys; values are YAML (repeatable)")
    return add_common_flags(parser)


def run(args) -> int:
    cfg = load_config(args.config, args.set)
    state = Trainer(cfg).run()
    logging.getLogger("pretrain_nbdiff").info(
        "done: step %d, %d tokens, block size %d", state.step, state.consumed_tokens, state.block_size
    )
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The trainer's process group ends with the process, as under DeepSpeed's launcher.
    return run_tool(run, args, None, teardown=False)

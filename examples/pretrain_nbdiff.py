"""Block-diffusion adaptation of a pretrained AR model (NBDiff recipe).

    deepspeed [--num_accelerators N] examples/pretrain_nbdiff.py --config CONFIG.yaml [--set key=value ...]

Also runs under torchrun and as plain `python` (one process). The loop lives in
megablock.training; this file only parses the command line.
"""
import argparse
import logging
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not __import__("torch").cuda.is_available() else "cuda")

from megablock.config import ConfigError, load_config  # noqa: E402
from megablock.training.trainer import Trainer, TrainingStopped  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (examples/configs/)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys; values are YAML (repeatable)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.config, args.set)
        state = Trainer(cfg).run()
    except (ConfigError, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    logging.getLogger("pretrain_nbdiff").info(
        "done: step %d, %d tokens, block size %d", state.step, state.consumed_tokens, state.block_size
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

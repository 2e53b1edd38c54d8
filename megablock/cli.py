"""What megablock's command-line tools share: one exit-code convention, errors as one line,
the parallel set-up of a launched tool, and library argument names turned into flags.

Exit codes (every tool): 0 success; 1 the input or the run failed (a message says what and how
to fix it); 2 the command line itself is wrong (argparse's own convention).

Library errors speak of arguments (`block_size=3 does not divide seq_len=32`); `as_flags` says
the same with the tool's flags (`--block-size 3 does not divide --seq-len 32`). Unexpected errors
also become one line; `--debug` or MEGABLOCK_DEBUG=1 keeps the traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from typing import Callable, Optional

import torch.distributed as dist

from megablock.parallel.state import ParallelInfo, default_device, destroy_parallel, initialize_parallel

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def add_common_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or MEGABLOCK_DEBUG=1)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


def add_model_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model a decoding tool loads (megablock.inference.loading.load): a checkpoint, or an HF
    folder with, optionally, a gated drafter beside it."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="megablock checkpoint folder (or a training save dir with 'latest')")
    src.add_argument("--hf-dir", help="Hugging Face model folder (plain, or exported by export_hf.py)")
    parser.add_argument("--drafter", help="with --hf-dir: a drafter folder (export_hf.py of a lora.scope=noised run, "
                                          "OUT/drafter) that drafts for the untouched base (speculative decoding)")
    return parser


def as_flags(message: str, parser: Optional[argparse.ArgumentParser]) -> str:
    """Rewrite `dest=value` mentions of the parser's arguments as `--flag value` (a switch's
    `dest=True` as just `--flag`)."""
    if parser is None:
        return message
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in ("help",):
            if isinstance(action, argparse._StoreTrueAction):
                message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}=True\b", longs[0], message)
            message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}=\s*", longs[0] + " ", message)
    return message


def debugging(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("MEGABLOCK_DEBUG") not in (None, "", "0")


def run_tool(run: Callable, args, parser: Optional[argparse.ArgumentParser] = None, teardown: bool = True) -> int:
    """Run a tool's `run(args)` with the exit-code convention. With `teardown`, a process group
    the tool created is destroyed at the end; one that already existed (the tool called
    in-process, as tests do) is kept."""
    owns_world = teardown and not dist.is_initialized()
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless debugging
        if debugging(args):
            traceback.print_exc()
        expected = isinstance(e, (ValueError, OSError))
        what = as_flags(str(e), parser) if expected else f"{type(e).__name__}: {e}"
        print(f"error: {what}", file=sys.stderr)
        if not expected and not debugging(args):
            print("(an unexpected error: rerun with --debug for the traceback, and report it)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if owns_world:
            destroy_parallel()


def launched_parallel() -> ParallelInfo:
    """One process (TP = 1), or every process of a torchrun / deepspeed launch a TP rank."""
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    return initialize_parallel(tp=tp, pp=1, device=default_device())


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0

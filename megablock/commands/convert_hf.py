"""Convert a Hugging Face model (folder or GGUF file) into a sharded megablock checkpoint.

    python tools/convert_hf.py --hf-dir DIR | --gguf FILE --out DIR --tp N --pp M
           [--mask-token TEXT | --no-mask-token] [--dtype fp32|bf16] [--layers-per-stage a,b,..] [--force]

Errors in the input print one line (problem and fix) and exit 1, leaving no output folder
(megablock.cli has the exit-code convention).
"""
import argparse
import sys

from megablock.checkpoint.convert import DEFAULT_MASK_TOKEN, convert
from megablock.cli import add_common_flags, run_tool
from megablock.config import WeightDtype, options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="Hugging Face model folder (config.json + safetensors or pytorch_model.bin)")
    src.add_argument("--gguf", help="GGUF file (dequantized by transformers; needs `pip install gguf`)")
    p.add_argument("--out", required=True, help="output checkpoint folder (must be empty unless --force)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    mask = p.add_mutually_exclusive_group()
    mask.add_argument("--mask-token", help="use this existing token as the diffusion mask token")
    mask.add_argument("--no-mask-token", action="store_true", help="add no mask token (weights unchanged)")
    p.add_argument("--dtype", default="fp32", choices=options(WeightDtype), help="dtype of the shards")
    p.add_argument("--layers-per-stage", help="comma-separated layer counts per pipeline stage, e.g. 7,9")
    p.add_argument("--force", action="store_true",
                   help="replace a previous output of this tool in --out (never the source, never other files)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return add_common_flags(p)


def run(args) -> int:
    try:
        lps = [int(x) for x in args.layers_per_stage.split(",")] if args.layers_per_stage else None
    except ValueError:
        raise ValueError(f"--layers-per-stage {args.layers_per_stage!r} must be comma-separated integers, e.g. 7,9") from None
    mask = None if args.no_mask_token else (args.mask_token or DEFAULT_MASK_TOKEN)
    convert(args.out, hf_dir=args.hf_dir, gguf=args.gguf, tp=args.tp, pp=args.pp, mask_token=mask,
            explicit_mask=args.mask_token is not None, dtype=args.dtype, layers_per_stage=lps,
            force=args.force, progress=not args.quiet)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    return run_tool(run, parser.parse_args(argv), parser)

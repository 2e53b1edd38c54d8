"""Export a megablock checkpoint (converted or training, any TP x PP) as a plain HF folder.

    python tools/export_hf.py --ckpt DIR --out DIR [--dtype fp32|bf16] [--force] [--lora-separate]
                              [--remote-code | --no-remote-code]

--ckpt is a checkpoint folder (megablock.json + model/ shards) or a training save dir whose
`latest` file names one. Errors print one line and exit 1, leaving no output folder.
A LoRA checkpoint is exported with its adapters merged into the weights, or with
--lora-separate as the base model plus a PEFT adapter folder in OUT/adapter.
--remote-code (the default for block sizes > 1) adds modeling files so that
AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True).block_generate(...) decodes the
folder with transformers alone (docs/release_folder.md).
"""
import argparse
import sys

from megablock.checkpoint.export import export
from megablock.cli import add_common_flags, run_tool
from megablock.config import WeightDtype, options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder, or a training save dir with `latest`")
    p.add_argument("--out", required=True, help="output HF folder (must be empty unless --force)")
    p.add_argument("--dtype", choices=options(WeightDtype), help="output dtype (default: the checkpoint's)")
    p.add_argument("--force", action="store_true",
                   help="replace a previous output of this tool in --out (never the source, never other files)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--lora-separate", action="store_true",
                   help="LoRA checkpoint: write the base model plus a PEFT adapter folder (OUT/adapter) instead of merging")
    p.add_argument("--remote-code", action=argparse.BooleanOptionalAction, default=None,
                   help="write block_generate's remote code and auto_map (default: on for block size > 1)")
    return add_common_flags(p)


def run(args) -> int:
    export(args.ckpt, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet,
           lora_separate=args.lora_separate, remote_code=args.remote_code)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    return run_tool(run, parser.parse_args(argv), parser)

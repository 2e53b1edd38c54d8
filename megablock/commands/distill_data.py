"""Self-distillation data: the model's own continuations as prompt/response JSON lines (thin CLI).

    python tools/distill_data.py (--ckpt DIR | --hf-dir DIR) --out FILE.jsonl --max-new-tokens N \
        (--prompts FILE | --corpus FILE --num-prompts N --prefix-tokens MIN MAX) \
        [--batch-size 8] [--temperature 0] [--seed 0]
    python tools/distill_data.py --import FILE.jsonl --out FILE.jsonl    # generations made elsewhere

Generation is megablock's KV-cached sampler at block size 1 (AR), prompts batched; the output is
resumable (rerun the same command after an interruption: finished records are kept, nothing is
duplicated). Feed the output to tools/preprocess_data.py --format sft. The logic lives in
megablock.inference.distill.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megablock.cli import add_common_flags, launched_parallel, run_tool
from megablock.config import WeightDtype, options
from megablock.data.preprocess import TEXT_SPLITS
from megablock.inference.distill import corpus_prompts, distill, import_records, read_prompt_file
from megablock.inference.loading import load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output JSONL (appended to when resuming)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="megablock checkpoint folder (or a training save dir with 'latest')")
    src.add_argument("--hf-dir", help="Hugging Face model folder")
    src.add_argument("--import", dest="import_file", metavar="FILE",
                     help="JSONL with prompt/response fields generated elsewhere: checked and written to --out")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", help="prompt file: one per line, or JSONL with a 'prompt' field")
    prompts.add_argument("--corpus", help="text corpus (.txt/.gz/.jsonl) to cut prompts from")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts cut from --corpus")
    p.add_argument("--prefix-tokens", type=int, nargs=2, default=[16, 48], metavar=("MIN", "MAX"),
                   help="length range of prompts cut from --corpus, in tokens")
    p.add_argument("--doc-range", type=int, nargs=2, default=None, metavar=("START", "END"),
                   help="cut prompts only from these documents of --corpus (e.g. keep held-out ones apart)")
    p.add_argument("--text-split", choices=TEXT_SPLITS, default="auto",
                   help="documents of a text --corpus (auto, as preprocess_data.py: blank-line blocks, or lines)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="prompt cutting and sampling seed")
    p.add_argument("--dtype", default="fp32", choices=options(WeightDtype))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return add_common_flags(p)


def run(args) -> int:
    if args.import_file:
        stats = import_records(args.import_file, args.out)
    else:
        if not (args.ckpt or args.hf_dir):
            raise ValueError("give the model (--ckpt DIR or --hf-dir DIR), or --import FILE")
        if not (args.prompts or args.corpus):
            raise ValueError("give prompts: --prompts FILE or --corpus FILE")
        im = load(ckpt=args.ckpt, hf_dir=args.hf_dir, dtype=args.dtype, parallel=launched_parallel())
        if args.prompts:
            prompts = read_prompt_file(args.prompts)
        else:
            lo, hi = args.prefix_tokens
            prompts = corpus_prompts(args.corpus, im.tokenizer, args.num_prompts, lo, hi, seed=args.seed,
                                     text_split=args.text_split, doc_range=tuple(args.doc_range) if args.doc_range else None)
        stats = distill(im, prompts, args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, progress=not args.quiet,
                        model=str(Path(args.ckpt or args.hf_dir).resolve()))
    print(json.dumps({"out": args.out, "prompts": stats.prompts, "written": stats.written,
                      "already_there": stats.skipped, "new_tokens": stats.new_tokens,
                      "seconds": round(stats.seconds, 2)}))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    return run_tool(run, parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())

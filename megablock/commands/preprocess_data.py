"""Tokenize text or instruction data into megatron-core indexed datasets.

    python tools/preprocess_data.py --input FILE... --tokenizer DIR --output-prefix PREFIX [--workers N]
    python tools/preprocess_data.py --format sft --input CHATS.jsonl --tokenizer DIR --output-prefix PREFIX

--format pretrain (default) is megablock.data.preprocess: raw text (jsonl/txt, optionally .gz),
one document per text, EOD appended. --format sft is megablock.data.sft: JSONL of {"prompt",
"response"} or {"messages": [...]} records (chats rendered with the tokenizer's chat template),
written as PREFIX.bin/.idx plus the response flags PREFIX.flags.bin/.idx; train on it with
data.format=sft. An error leaves no output (megablock.cli has the exit-code convention).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from megablock.cli import add_common_flags, run_tool
from megablock.config import DataFormat, options
from megablock.data.preprocess import TEXT_SPLITS, PreprocessError, preprocess
from megablock.data.sft import preprocess_sft


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="input files, in order")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer folder or sentencepiece .model file")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--json-key", default="text", help="field holding the text in .jsonl inputs")
    p.add_argument(
        "--text-split", choices=TEXT_SPLITS, default="auto",
        help="documents of .txt inputs: blank-line separated blocks, lines, or the whole file; "
        "auto (default): blank-line separated if the file has a blank line, else one per line",
    )
    p.add_argument(
        "--append-eod", action=argparse.BooleanOptionalAction, default=True,
        help="append the tokenizer's EOS id after every document (default on)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--format", choices=options(DataFormat), default="pretrain",
        help="pretrain: raw text (default). sft: JSONL of prompt/response or chat 'messages' records; also "
        "writes PREFIX.flags.bin/.idx marking the response tokens (train with data.format=sft)",
    )
    return add_common_flags(p)


def run(args) -> int:
    try:
        if args.format == "sft":
            counts = preprocess_sft(args.input, args.tokenizer, args.output_prefix, append_eod=args.append_eod,
                                    progress=not args.quiet)
            summary = (f"and {args.output_prefix}.flags.bin/.idx  conversations: {counts['documents']:,}  "
                       f"tokens: {counts['tokens']:,}  response tokens: {counts['response_tokens']:,}")
        else:
            summary = " " + preprocess(
                args.input, args.tokenizer, args.output_prefix, workers=args.workers, json_key=args.json_key,
                text_split=args.text_split, append_eod=args.append_eod, progress=not args.quiet,
            ).summary()
    except PreprocessError as e:
        raise PreprocessError(f"{e}; no output written") from None
    print(f"wrote {args.output_prefix}.bin/.idx {summary}")
    return 0


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    return run_tool(run, parser.parse_args(argv), parser, teardown=False)


if __name__ == "__main__":
    sys.exit(main())

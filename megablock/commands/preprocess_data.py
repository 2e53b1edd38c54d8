"""Tokenize text or instruction data into megatron-core indexed datasets (thin CLI).

    python tools/preprocess_data.py --input FILE... --tokenizer DIR --output-prefix PREFIX [--workers N]
    python tools/preprocess_data.py --format sft --input CHATS.jsonl --tokenizer DIR --output-prefix PREFIX

--format pretrain (default) is megablock.data.preprocess: raw text, one document per text, EOD
appended. --format sft is megablock.data.sft: JSONL of {"prompt", "response"} or {"messages": [...]}
records (chats rendered with the tokenizer's chat template), written as PREFIX.bin/.idx plus the
response flags PREFIX.flags.bin/.idx; train on it with data.format=sft.
"""
from __future__ import annotations

import sys
from typing import Optional

from megablock.config import DataFormat, options
from megablock.data.preprocess import PreprocessError, build_parser as text_parser, run as run_text
from megablock.data.sft import preprocess_sft


def build_parser():
    p = text_parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument(
        "--format", choices=options(DataFormat), default="pretrain",
        help="pretrain: raw text (default). sft: JSONL of prompt/response or chat 'messages' records; also "
        "writes PREFIX.flags.bin/.idx marking the response tokens (train with data.format=sft)",
    )
    return p


def run_sft(args) -> int:
    try:
        counts = preprocess_sft(args.input, args.tokenizer, args.output_prefix, append_eod=args.append_eod,
                                progress=not args.quiet)
    except PreprocessError as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        print("no output written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; no output written", file=sys.stderr)
        return 130
    print(f"wrote {args.output_prefix}.bin/.idx and {args.output_prefix}.flags.bin/.idx  "
          f"conversations: {counts['documents']:,}  tokens: {counts['tokens']:,}  "
          f"response tokens: {counts['response_tokens']:,}")
    return 0


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_sft(args) if args.format == "sft" else run_text(args)


if __name__ == "__main__":
    sys.exit(main())

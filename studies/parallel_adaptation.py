#!/usr/bin/env python
"""An adaptation meant to decode in parallel: SmolLM2-135M-Instruct trained with block diffusion on
its own continuations (self-distilled SFT data), block size grown 1 -> 2 -> 4 -> 8.

    python studies/parallel_adaptation.py [--tokens 49152] [--chunk-steps 8]   # resumable
    python studies/parallel_adaptation.py --report-only                       # page numbers from what exists

Every phase leaves its result under --out (default study/parallel/, git-ignored) and is skipped
when rerun, so an interrupted run continues where it stopped (training resumes from its latest
checkpoint; an interrupted distillation keeps its finished records):

  1. base       the converted SmolLM2-135M-Instruct with a mask token (--base, copied) and its HF export
  2. prompts    cut from the three corpora of --corpora (Wikipedia leads, KJV verses, Shakespeare
                speeches): the first 16-32 tokens of documents. Train prompts come from each corpus's
                first 90% of documents, held-out prompts from the last 10%, never distilled or trained on
  3. distill    the base model's greedy continuations of the train prompts (tools/distill_data.py,
                KV-cached sampler at B = 1) -> prompt/response JSONL
  4. data       tools/preprocess_data.py --format sft (response flags), and the held-out raw text of the
                Wikipedia leads (pretrain format) for the AR-mode perplexity
  5. train      examples/pretrain_nbdiff.py, data.format=sft, L = 128, 4 sequences per step, growth
                1 -> 2 -> 4 -> 8 (1/8, 1/8, 1/4 of the budget, then 8), a checkpoint kept every
                --chunk-steps steps; then a curve point per checkpoint (and the base): greedy tokens per
                forward at B = 8, threshold 0.9, on --curve-prompts held-out prompts  -> curve.jsonl
  6. evaluate   results.json: AR-mode perplexity on held-out text (base vs trained); threshold decoding
                at B = 4 / 8 (tokens per forward, generative perplexity under the base at temperature 1);
                speculative decoding (when megablock.inference.speculative exists): accepted draft tokens
                per block and tokens/s at B = 4 / 8 / 16 vs HF generate, all at batch 1, greedy
  7. plot       parallel_adaptation.png: tokens per forward against training tokens
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
CORPORA = {  # name: (file, how documents are split)
    "wiki": ("wiki_summaries_en.txt.gz", "blank-line"),
    "kjv": ("kjv.txt.gz", "line"),
    "shakespeare": ("shakespeare_modern.txt.gz", "blank-line"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None,
                   help="converted SmolLM2-135M-Instruct with a mask token (tools/convert_hf.py --gguf; "
                        "scripts/quickstart.sh makes quickstart/smollm2-135m); needed until OUT/base exists")
    p.add_argument("--corpora", default=None,
                   help="folder with the corpora of CORPORA; needed until the prompts and held-out data exist")
    p.add_argument("--out", default=str(ROOT / "study" / "parallel"))
    p.add_argument("--train-prompts", type=int, default=40, help="per corpus")
    p.add_argument("--heldout-prompts", type=int, default=8, help="per corpus")
    p.add_argument("--prefix-tokens", type=int, nargs=2, default=[16, 32])
    p.add_argument("--response-tokens", type=int, default=64)
    p.add_argument("--distill-batch", type=int, default=32)
    p.add_argument("--distill-limit", type=int, default=None,
                   help="distill only the first N train prompts (the file interleaves the corpora, so any "
                        "prefix is balanced); for a machine too busy for all of them")
    p.add_argument("--eval-prompts", type=int, default=12, help="held-out prompts of the threshold-decoding table")
    p.add_argument("--tokens", type=int, default=49152, help="clean training tokens (512 per step)")
    p.add_argument("--chunk-steps", type=int, default=8, help="keep a checkpoint every this many steps (a curve point each)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--confidence", type=float, default=0.0, help="diffusion.confidence_loss_weight")
    p.add_argument("--curve-prompts", type=int, default=6)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--spec-prompts", type=int, default=6, help="held-out prompts of the speculative measurement")
    p.add_argument("--spec-tokens", type=int, default=32, help="new tokens per prompt there")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", default="", help="a second training run on the same data and base (e.g. with "
                   "--confidence 0.1): its run, curve, evaluations and results get this suffix")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--until", choices=["data", "train"], default=None,
                   help="stop after this phase (e.g. distil now, train once the machine is free)")
    p.add_argument("--first-slot-mask", type=float, default=0.0,
                   help="diffusion.first_slot_mask_prob (the one-forward-per-block draft layout in training)")
    return p.parse_args(argv)


def needed(args, name: str) -> str:
    """A machine path the study needs now (it is given on the command line, never assumed)."""
    value = getattr(args, name)
    if value is None:
        sys.exit(f"--{name} is needed to build what {args.out} lacks: pass it (see --help)")
    return value


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list, logfile: Path, env: dict) -> str:
    """Runs a tool with its output in `logfile`; a failure stops the script (rerun resumes)."""
    start = time.perf_counter()
    with logfile.open("a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(proc.stdout)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}) after {time.perf_counter() - start:.0f} s: {' '.join(map(str, cmd))}; "
                 f"see {logfile}")
    return proc.stdout


def stages(tokens: int) -> list:
    return [{"block_size": 1, "tokens": tokens // 8}, {"block_size": 2, "tokens": tokens // 8},
            {"block_size": 4, "tokens": tokens // 4}, {"block_size": 8}]


# ----------------------------------------------------------------------------- phases


def prepare_base(args, out: Path, env: dict) -> tuple[Path, Path]:
    base, hf = out / "base", out / "base_hf"
    if not (base / "megablock.json").is_file():
        log(f"copying the base checkpoint from {needed(args, 'base')}")
        shutil.copytree(args.base, out / "base.tmp", dirs_exist_ok=True)
        os.replace(out / "base.tmp", base)
    if not (hf / "config.json").is_file():
        log("exporting the base to an HF folder (reference model, HF generate)")
        run([PY, "tools/export_hf.py", "--ckpt", base, "--out", hf, "--force"], out / "logs" / "export.log", env)
    return base, hf


def make_prompts(args, out: Path, base: Path) -> tuple[Path, Path]:
    train, heldout = out / "prompts_train.jsonl", out / "prompts_heldout.jsonl"
    if train.is_file() and heldout.is_file():
        return train, heldout
    from transformers import AutoTokenizer

    from megablock.data.preprocess import iter_documents
    from megablock.inference.distill import corpus_prompts

    tok = AutoTokenizer.from_pretrained(str(base / "tokenizer"))
    rows = {"train": [], "heldout": []}
    lo, hi = args.prefix_tokens
    for name, (file, split) in CORPORA.items():
        path = str(Path(needed(args, "corpora")) / file)
        n = sum(1 for _ in iter_documents(path, text_split=split))
        cut = int(n * 0.9)
        for part, count, rng in (("train", args.train_prompts, (0, cut)), ("heldout", args.heldout_prompts, (cut, n))):
            for prompt in corpus_prompts(path, tok, count, lo, hi, seed=1 if part == "train" else 2,
                                         text_split=split, doc_range=rng):
                rows[part].append({"prompt": prompt, "corpus": name})
        log(f"prompts from {name}: {args.train_prompts} train (documents 0..{cut}), "
            f"{args.heldout_prompts} held out (documents {cut}..{n})")
    for path, part in ((train, "train"), (heldout, "heldout")):
        # Interleaved by corpus, so any prefix of the file (a partly distilled one) is balanced.
        by_corpus = [[r for r in rows[part] if r["corpus"] == name] for name in CORPORA]
        ordered = [r for group in zip(*by_corpus) for r in group]
        path.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    return train, heldout


def heldout_text(args, out: Path, base: Path, env: dict) -> Path:
    """The Wikipedia leads' last 10% of documents as a pretraining-format dataset (AR perplexity)."""
    prefix = out / "data" / "heldout_wiki"
    if Path(f"{prefix}.idx").is_file():
        return prefix
    from megablock.data.preprocess import iter_documents

    path = str(Path(needed(args, "corpora")) / CORPORA["wiki"][0])
    docs = list(iter_documents(path))
    text = out / "data" / "heldout_wiki.txt"
    text.write_text("\n\n".join(docs[int(len(docs) * 0.9):]) + "\n")
    run([PY, "tools/preprocess_data.py", "--input", text, "--tokenizer", base / "tokenizer", "--output-prefix", prefix,
         "--quiet"], out / "logs" / "data.log", env)
    return prefix


def distill_and_preprocess(args, out: Path, base: Path, prompts: Path, env: dict) -> Path:
    distilled = out / "distilled.jsonl"
    done = out / "distilled.done"
    if not done.is_file():
        if args.distill_limit:
            lines = prompts.read_text().splitlines(keepends=True)[: args.distill_limit]
            prompts = out / "prompts_distilled.jsonl"
            prompts.write_text("".join(lines))
        log(f"distilling: greedy continuations of {args.response_tokens} tokens (batches of {args.distill_batch})")
        result = run([PY, "tools/distill_data.py", "--ckpt", base, "--prompts", prompts, "--out", distilled,
                      "--max-new-tokens", args.response_tokens, "--batch-size", args.distill_batch, "--quiet"],
                     out / "logs" / "distill.log", env)
        done.write_text(result.strip().splitlines()[-1])
        log(f"distilled: {done.read_text()}")
    prefix = out / "data" / "distilled"
    if not Path(f"{prefix}.flags.idx").is_file():
        run([PY, "tools/preprocess_data.py", "--format", "sft", "--input", distilled, "--tokenizer", base / "tokenizer",
             "--output-prefix", prefix, "--quiet"], out / "logs" / "data.log", env)
    return prefix


def train_settings(args, base: Path, data: Path, save: Path, out: Path) -> list:
    steps = args.tokens // 512
    sets = {
        "model.init_from": base, "data.prefix": data, "data.format": "sft", "data.split": "100,0,0",
        "data.seq_len": 128, "checkpoint.save_dir": save, "checkpoint.resume": "true",
        "checkpoint.interval": args.chunk_steps, "checkpoint.keep_last": steps // args.chunk_steps + 1,
        "train.steps": steps,
        "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.eval_interval": 0,
        "train.lr": args.lr, "train.min_lr": args.lr / 10, "train.warmup_steps": max(1, steps // 24),
        "diffusion.stages": json.dumps(stages(args.tokens)),
        "diffusion.confidence_loss_weight": args.confidence, "diffusion.ar_loss_weight": 0.5,
    }
    if args.first_slot_mask:
        sets["diffusion.first_slot_mask_prob"] = args.first_slot_mask
    return [f"{k}={v}" for k, v in sets.items()]


def latest_step(save: Path) -> int:
    latest = save / "latest"
    return int(latest.read_text().strip().split("_")[-1]) if latest.is_file() else 0


# ----------------------------------------------------------------------------- measurements


def load_prompts(path: Path, tokenizer) -> list:
    return [tokenizer(json.loads(x)["prompt"], add_special_tokens=False)["input_ids"]
            for x in path.read_text().splitlines() if x.strip()]


def spread(prompts: list, count: int) -> list:
    """`count` prompts spread over the list (it is ordered by corpus)."""
    step = len(prompts) / count
    return [prompts[int(i * step)] for i in range(count)]


def curve_point(ckpt: Path, heldout: Path, args) -> dict:
    """Greedy threshold decoding at B = 8 on held-out prompts: tokens per forward."""
    import torch

    from megablock.cli import launched_parallel
    from megablock.inference.loading import load
    from megablock.inference.measure import decode
    from megablock.inference.sampler import GenerateConfig
    from megablock.inference.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    em = load(ckpt=str(ckpt), parallel=launched_parallel())
    prompts = spread(load_prompts(heldout, em.tokenizer), args.curve_prompts)
    r = decode(em, prompts, GenerateConfig(block_size=8, max_new_tokens=args.gen_tokens, threshold=0.9, shift=em.shift,
                                           sampling=SamplingParams(0.0)))
    return {"tokens_per_forward": r.tokens_per_forward, "new_tokens": r.new_tokens, "forwards": r.forwards,
            "seconds": round(r.seconds, 2)}


def add_curve_point(curve: Path, ckpt: Path, heldout: Path, args, consumed: int, step: int, block: int) -> None:
    points = [json.loads(x) for x in curve.read_text().splitlines()] if curve.is_file() else []
    if any(p["step"] == step for p in points):
        return
    point = {"step": step, "consumed_tokens": consumed, "block_size": block, **curve_point(ckpt, heldout, args)}
    with curve.open("a") as f:
        f.write(json.dumps(point) + "\n")
    log(f"curve: step {step}, {consumed} tokens, B={block}: {point['tokens_per_forward']:.2f} tokens/forward")


def train(args, out: Path, base: Path, data: Path, heldout: Path, env: dict) -> Path:
    """One training launch (it resumes from `latest` when rerun after an interruption) that keeps a
    checkpoint every --chunk-steps steps; then a curve point per kept checkpoint (and the base)."""
    save = out / f"run{args.suffix}"
    steps = args.tokens // 512
    curve = out / f"curve{args.suffix}.jsonl"
    main_curve = out / "curve.jsonl"
    if args.suffix and main_curve.is_file() and not curve.is_file():  # the base point is the same model
        curve.write_text(main_curve.read_text().splitlines(keepends=True)[0])
    if latest_step(save) < steps:
        log(f"training {steps} steps from step {latest_step(save)} (a checkpoint every {args.chunk_steps})")
        t0 = time.perf_counter()
        run([PY, "examples/pretrain_nbdiff.py", "--config", "examples/configs/quickstart_cpu.yaml", "--set",
             *train_settings(args, base, data, save, out)], out / "logs" / "train.log", env)
        log(f"trained in {time.perf_counter() - t0:.0f} s")
    metrics = {m["step"]: m for m in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())}
    add_curve_point(curve, base, heldout, args, 0, 0, 1)
    for ckpt in sorted(save.glob("step_*")):
        step = int(ckpt.name.split("_")[-1])
        m = metrics[step]
        add_curve_point(curve, ckpt, heldout, args, m["consumed_tokens"], step, m["block_size"])
    return save


def ar_perplexity(ckpt: Path, data: Path, out: Path, name: str, env: dict) -> dict:
    path = out / "eval" / f"ar_{name}.json"
    if not path.is_file():
        result = run([PY, "tools/evaluate.py", "--ckpt", ckpt, "--data", data, "--seq-len", 128, "--block-size", 1,
                      "--max-tokens", 4096, "--json", "--quiet"], out / "logs" / "eval.log", env)
        path.write_text(result.strip().splitlines()[-1])
    return json.loads(path.read_text())


def threshold_decoding(ckpt: Path, ref: Path, heldout: Path, args, out: Path, name: str) -> list:
    """Threshold 0.9 at B = 4 and 8 on --eval-prompts held-out prompts: greedy tokens per forward, and
    tokens per forward + generative perplexity (under the base) of temperature-1 samples."""
    path = out / "eval" / f"threshold_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    from megablock.cli import launched_parallel
    from megablock.inference.evaluation import reference_nll
    from megablock.inference.loading import load
    from megablock.inference.measure import decode as measure_decoding
    from megablock.inference.sampler import GenerateConfig
    from megablock.inference.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    em = load(ckpt=str(ckpt), parallel=launched_parallel())
    prompts = spread(load_prompts(heldout, em.tokenizer), args.eval_prompts)
    decode = lambda ids: em.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    rows = []
    for B in (4, 8):
        for temperature in (0.0, 1.0):
            r = measure_decoding(em, prompts, GenerateConfig(block_size=B, max_new_tokens=args.gen_tokens, threshold=0.9,
                                                             shift=em.shift, sampling=SamplingParams(temperature)))
            samples, forwards, seconds = r.tokens, r.forwards, r.seconds
            row = {"block_size": B, "temperature": temperature, "new_tokens": sum(map(len, samples)),
                   "forwards": forwards, "tokens_per_forward": sum(map(len, samples)) / forwards,
                   "seconds": round(seconds, 2)}
            if temperature:
                nll, count = reference_nll(ref, [decode(p) for p in prompts], [decode(s) for s in samples])
                row["gen_ppl"] = math.exp(nll / count)
            rows.append(row)
            log(f"{name}: threshold 0.9, B={B}, T={temperature}: {row['tokens_per_forward']:.2f} tokens/forward"
                + (f", gen ppl {row['gen_ppl']:.1f}" if "gen_ppl" in row else ""))
    path.write_text(json.dumps(rows, indent=1))
    return rows


def speculative(ckpt: Path, ref: Path, heldout: Path, args, out: Path, name: str):
    """Self-speculative decoding (lossless, greedy, one forward per block) at batch 1 on held-out
    prompts, B = 4 / 8 / 16: accepted draft tokens per block, tokens per forward and tokens/s, with
    HF `generate` (greedy, KV cache, the base weights: the same architecture and cost) on the same
    prompts in the same process. Speeds are tokens per second of this process's CPU time on one
    thread (time.process_time), as benchmarks/generate.py does: on a machine shared with other jobs
    wall time mostly measures the other jobs. Every row runs
    --spec-tokens new tokens (EOS does not stop it) and is checked against the model's own AR
    decoding (megablock's sampler at B = 1): lossless means identical tokens. None when this
    checkout has no speculative sampler."""
    path = out / "eval" / f"speculative_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch
    from transformers import AutoModelForCausalLM

    from megablock.cli import launched_parallel
    from megablock.inference.loading import load
    from megablock.inference.measure import measure
    from megablock.inference.speculative import SpeculativeConfig

    torch.set_num_threads(1)
    em = load(ckpt=str(ckpt), parallel=launched_parallel())
    em.eos_token_ids = []  # fixed-length rows: equal work for every decoder
    prompts = spread(load_prompts(heldout, em.tokenizer), args.spec_prompts)
    n = args.spec_tokens
    hf = AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32).eval()
    result = {"prompts": len(prompts), "new_tokens_per_prompt": n, "clock": "process CPU time, 1 thread",
              "load_avg_start": os.getloadavg()[0], "rows": []}
    records = measure(em, prompts, {B: SpeculativeConfig(block_size=B, max_new_tokens=n) for B in (4, 8, 16)},
                      max_new_tokens=n, hf_model=hf, clock=time.process_time)
    result["hf_tokens_per_s"] = records["hf"].tokens_per_s
    for B in (4, 8, 16):
        r = records[B]
        row = {"block_size": B, "mean_accepted_per_block": r.mean_accepted, "drafts_per_block": r.drafts_per_block,
               "verified_blocks": len(r.accepted), "tokens_per_forward": r.tokens_per_forward,
               "tokens_per_s": r.tokens_per_s, "identical_to_ar": f"{r.identical_to_ar}/{len(prompts)}"}
        row["speedup_vs_hf"] = row["tokens_per_s"] / result["hf_tokens_per_s"]
        result["rows"].append(row)
        log(f"{name}: speculative B={B}: {row['mean_accepted_per_block']:.2f} of {row['drafts_per_block']:.1f} drafts "
            f"kept per block, {row['tokens_per_forward']:.2f} tokens/forward, {row['tokens_per_s']:.1f} tokens/s "
            f"(HF generate {result['hf_tokens_per_s']:.1f}), identical to AR: {row['identical_to_ar']}")
    result["load_avg_end"] = os.getloadavg()[0]
    path.write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- report


def plot(curve: Path, png: Path, tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [json.loads(x) for x in curve.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["consumed_tokens"] for p in points], [p["tokens_per_forward"] for p in points], marker="o")
    edge, plan = 0, stages(tokens)
    for s, nxt in zip(plan[:-1], plan[1:]):  # where each stage begins
        edge += s["tokens"]
        ax.axvline(edge, color="gray", ls=":", lw=0.8)
        ax.text(edge, ax.get_ylim()[1], f" B={nxt['block_size']}", va="top", fontsize=8, color="gray")
    ax.set_xlabel("clean training tokens")
    ax.set_ylabel("tokens per forward (B=8, thr 0.9, greedy)")
    ax.set_title("SmolLM2-135M on self-distilled data: parallel decoding vs training", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def report(results: dict) -> str:
    """The markdown tables of docs/parallel_decoding.md."""
    lines = ["| model | AR-mode ppl (held-out Wikipedia) | thr 0.9 B=4 greedy tok/fwd | B=4 T=1 tok/fwd, gen ppl "
             "| thr 0.9 B=8 greedy tok/fwd | B=8 T=1 tok/fwd, gen ppl |", "|---|---|---|---|---|---|"]
    names = ("base", f"trained{results['args']['suffix']}")
    for name in names:
        ar = results[f"ar_{name}"]["ar_ppl"]
        cells = []
        for row in results[f"threshold_{name}"]:
            cells.append(f"{row['tokens_per_forward']:.2f}" + (f", {row['gen_ppl']:.1f}" if "gen_ppl" in row else ""))
        lines.append(f"| {name} | {ar:.2f} | " + " | ".join(cells) + " |")
    for name in names:
        spec = results.get(f"speculative_{name}")
        if not spec:
            continue
        lines += ["", f"Speculative decoding, {name} model, batch 1, greedy, {spec['prompts']} held-out prompts x "
                  f"{spec['new_tokens_per_prompt']} tokens; HF generate {spec['hf_tokens_per_s']:.1f} tokens/s "
                  f"(load average {spec['load_avg_start']:.1f} -> {spec['load_avg_end']:.1f})", "",
                  "| B | drafts kept per block (of) | tokens/forward | tokens/s | vs HF generate | identical to AR |",
                  "|---|---|---|---|---|---|"]
        for r in spec["rows"]:
            lines.append(f"| {r['block_size']} | {r['mean_accepted_per_block']:.2f} (of {r['drafts_per_block']:.1f}) | "
                         f"{r['tokens_per_forward']:.2f} | {r['tokens_per_s']:.1f} | {r['speedup_vs_hf']:.2f}x | "
                         f"{r['identical_to_ar']} |")
    lines += ["", "| step | clean tokens | block size | tokens/forward (B=8, thr 0.9, greedy) |", "|---|---|---|---|"]
    for p in results["curve"]:
        lines.append(f"| {p['step']} | {p['consumed_tokens']} | {p['block_size']} | {p['tokens_per_forward']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    for sub in ("logs", "eval", "data"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    args.suffix = f"_{args.variant}" if args.variant else ""
    (out / f"args{args.suffix}.json").write_text(json.dumps(vars(args), indent=1))
    base, ref = prepare_base(args, out, env)
    train_prompts, heldout = make_prompts(args, out, base)
    data = distill_and_preprocess(args, out, base, train_prompts, env)
    held_text = heldout_text(args, out, base, env)
    if args.until == "data":
        return 0
    save, trained = out / f"run{args.suffix}", f"trained{args.suffix}"
    if not args.report_only:
        save = train(args, out, base, data, heldout, env)
    if args.until == "train":
        return 0
    results = {"args": vars(args)}
    results["ar_base"] = ar_perplexity(base, held_text, out, "base", env)
    results[f"ar_{trained}"] = ar_perplexity(save, held_text, out, trained, env)
    results["threshold_base"] = threshold_decoding(base, ref, heldout, args, out, "base")
    results[f"threshold_{trained}"] = threshold_decoding(save, ref, heldout, args, out, trained)
    results["speculative_base"] = speculative(base, ref, heldout, args, out, "base")
    results[f"speculative_{trained}"] = speculative(save, ref, heldout, args, out, trained)
    results["curve"] = [json.loads(x) for x in (out / f"curve{args.suffix}.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    results["train"] = {"steps": metrics[-1]["step"], "consumed_tokens": metrics[-1]["consumed_tokens"],
                        "mean_tokens_per_s": sum(m["tokens_per_s"] for m in metrics) / len(metrics),
                        "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"]}
    (out / f"results{args.suffix}.json").write_text(json.dumps(results, indent=1))
    (out / f"results{args.suffix}.md").write_text(report(results) + "\n")
    print(report(results))
    plot(out / f"curve{args.suffix}.jsonl", out / f"parallel_adaptation{args.suffix}.png", args.tokens)
    b, t = results["ar_base"]["ar_ppl"], results[f"ar_{trained}"]["ar_ppl"]
    log(f"AR-mode perplexity on held-out text: base {b:.2f}, trained {t:.2f} ({100 * (t / b - 1):+.1f}%)")
    print(json.dumps({k: results[k] for k in ("train", "curve")} | {"ar_ppl_base": b, "ar_ppl_trained": t}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

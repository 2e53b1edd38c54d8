#!/usr/bin/env python
"""The adaptation study: which parts of the NBDiff recipe matter, at equal token budgets.

    python benchmarks/adaptation_study.py                    # all variants, ~1 hour on 2 CPU cores
    python benchmarks/adaptation_study.py --variants a c     # some of them
    python benchmarks/adaptation_study.py --report-only      # table and plot from finished runs

Starts from SmolLM2-135M converted with a mask token (scripts/quickstart.sh leaves it in
quickstart/smollm2-135m; --base points elsewhere). Every variant trains from that checkpoint
with examples/configs/quickstart_cpu.yaml (L = 128, 4 sequences = 512 clean tokens per step) for
--steps steps, so all see the same clean tokens, in the same order, then is evaluated at the
target block size (--block-size, default 4):

  (a) full recipe     context-causal clean half, AR loss (lambda 0.5), growth 1 -> 2 -> target
                      (a quarter of the budget at B = 1, a quarter at B = 2 for target 4)
  (b) no AR loss      (a) with lambda = 0
  (c) no growth       (a) trained at the target block size from the first step
  (d) block-causal    BD3-LM's clean half (block-causal); lambda = 0 (the AR loss would see its
                      own targets inside a block), growth as (a)
  (e) full diffusion  naive adaptation: one bidirectional half, the whole sequence one block
  (f) LoRA rank 64    (a) with LoRA adapters (examples/configs/quickstart_lora_cpu.yaml settings)
  base                the converted model, untrained (the AR reference)

Data: the committed public-domain Shakespeare sample (examples/data); its last --heldout-frac of
lines (whole plays at the end of the file) is held out, never trained on. Evaluation
(tools/evaluate.py) on the first --eval-tokens held-out tokens in windows of 128:
  - NELBO per token at the target block size and its perplexity bound exp(NELBO), --samples noise
    draws per window (for (e), its own whole-sequence bound: it has no blocks);
  - AR-mode perplexity: one causal pass (how much next-token ability survives);
  - generation: --gen-prompts held-out prompts of 32 tokens, 32 new tokens at the target block
    size, temperature 1, commit threshold 0.9: tokens per forward and the generative perplexity
    of the samples under the untrained base model (exported to HF). (e) is skipped: its sampler
    would refine the whole sequence, which the block sampler with a KV cache does not do.

Outputs under --out (default study/): runs/<variant>/ (training, metrics.jsonl), eval/*.json,
results.json, results.md (the table), adaptation_study.png. Re-running skips finished work.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CORPUS = ROOT / "examples" / "data" / "shakespeare_sample.txt.gz"

VARIANTS = {
    "a": ("(a) full recipe", {}),
    "b": ("(b) no AR loss", {"diffusion.ar_loss_weight": 0.0}),
    "c": ("(c) no growth", {"growth": False}),
    "d": ("(d) block-causal", {"diffusion.attention": "block_causal", "diffusion.ar_loss_weight": 0.0}),
    "e": ("(e) full diffusion", {"diffusion.attention": "full", "diffusion.ar_loss_weight": 0.0, "growth": False}),
    "f": ("(f) LoRA r64", {"lora": True}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(ROOT / "quickstart" / "smollm2-135m"),
                   help="converted SmolLM2-135M with a mask token (scripts/quickstart.sh makes it)")
    p.add_argument("--out", default=str(ROOT / "study"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=48, help="optimizer steps per variant (512 clean tokens each)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak LR of full-model training (LoRA: 10x)")
    p.add_argument("--block-size", type=int, default=4, help="target block size")
    p.add_argument("--heldout-frac", type=float, default=0.1)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--samples", type=int, default=2, help="noise draws per held-out window")
    p.add_argument("--gen-prompts", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def run(cmd: list, log: Path, env: dict) -> str:
    """Runs a tool, streams nothing, keeps its output in `log`; a failure stops the study."""
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}) after {time.perf_counter() - start:.0f} s: {' '.join(map(str, cmd))}\n"
                 f"see {log}:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return proc.stdout


def split_corpus(out: Path, frac: float, tokenizer: Path, env: dict) -> tuple[Path, Path]:
    """train / held-out token files from the Shakespeare sample, cut at a blank line."""
    data = out / "data"
    prefixes = data / "train", data / "heldout"
    if all(Path(f"{p}.idx").is_file() for p in prefixes):
        return prefixes
    data.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(CORPUS, "rt", encoding="utf-8").read().splitlines(keepends=True)
    cut = int(len(lines) * (1 - frac))
    while cut < len(lines) and lines[cut].strip():
        cut += 1
    for prefix, part in zip(prefixes, (lines[:cut], lines[cut:])):
        text = data / f"{prefix.name}.txt"
        text.write_text("".join(part), encoding="utf-8")
        run([PY, "tools/preprocess_data.py", "--input", text, "--tokenizer", tokenizer, "--output-prefix", prefix,
             "--workers", "1"], data / f"{prefix.name}.log", env)
    return prefixes


def overrides(key: str, args, base: Path, train: Path, save: Path, cache: Path) -> tuple[str, list]:
    _, change = VARIANTS[key]
    config = "quickstart_lora_cpu.yaml" if change.get("lora") else "quickstart_cpu.yaml"
    tokens = args.steps * 512
    if change.get("growth", True):
        stages = [{"block_size": b, "tokens": tokens // 4} for b in (1, 2)] + [{"block_size": args.block_size}]
    else:
        stages = [{"block_size": args.block_size}]
    lr = args.lr * (10 if change.get("lora") else 1)
    sets = {
        "model.init_from": base, "data.prefix": train, "data.split": "100,0,0", "data.cache_dir": cache,
        "checkpoint.save_dir": save, "checkpoint.resume": "true", "checkpoint.interval": args.steps,
        "checkpoint.keep_last": 1, "train.steps": args.steps, "train.eval_interval": 0,
        "train.lr": lr, "train.min_lr": lr / 10, "train.warmup_steps": max(1, args.steps // 12),
        "diffusion.stages": json.dumps(stages),
    }
    sets.update({k: v for k, v in change.items() if "." in k})
    return config, [f"{k}={v}" for k, v in sets.items()]


def finished(save: Path, steps: int) -> bool:
    latest = save / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:07d}"


def evaluate(name: str, src: list, heldout: Path, block_size: int, args, out: Path, env: dict, ref: Path,
             generate: bool) -> dict:
    path = out / "eval" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cmd = [PY, "tools/evaluate.py", *src, "--data", heldout, "--seq-len", 128, "--block-size", block_size,
           "--samples", args.samples, "--max-tokens", args.eval_tokens, "--json", "--quiet"]
    if generate:
        cmd += ["--generate", "--gen-prompts", args.gen_prompts, "--gen-prompt-len", 32, "--gen-tokens", 32,
                "--gen-temperature", 1.0, "--gen-threshold", 0.9, "--ref-hf-dir", ref]
    result = json.loads(run(cmd, out / "eval" / f"{name}.log", env).strip().splitlines()[-1])
    path.write_text(json.dumps(result, indent=1))
    return result


def trainable(save: Path) -> int | None:
    meta = json.loads((save / (save / "latest").read_text().strip() / "megablock.json").read_text())
    return (meta.get("lora") or {}).get("trainable_parameters")


def main(argv=None) -> int:
    args = parse_args(argv)
    out, base = Path(args.out).resolve(), Path(args.base).resolve()
    if not (base / "megablock.json").is_file():
        sys.exit(f"--base {base} is not a converted checkpoint: run scripts/quickstart.sh (it converts "
                 "SmolLM2-135M to quickstart/smollm2-135m) or tools/convert_hf.py, then pass --base")
    (out / "eval").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    train, heldout = split_corpus(out, args.heldout_frac, base / "tokenizer", env)
    ref = out / "base_hf"
    if not (ref / "config.json").is_file():
        run([PY, "tools/export_hf.py", "--ckpt", base, "--out", ref, "--force"], out / "base_hf.log", env)

    rows, t0 = [], time.perf_counter()
    for key in args.variants:
        label, change = VARIANTS[key]
        save = out / "runs" / key
        config, sets = overrides(key, args, base, train, save, out / "data" / "cache")
        if not finished(save, args.steps):
            if args.report_only:
                continue
            print(f"[{time.perf_counter() - t0:5.0f} s] training {label}: {args.steps} steps", flush=True)
            run([PY, "examples/pretrain_nbdiff.py", "--config", f"examples/configs/{config}", "--set", *sets],
                out / "runs" / f"{key}.log", env)
        print(f"[{time.perf_counter() - t0:5.0f} s] evaluating {label}", flush=True)
        r = evaluate(key, ["--ckpt", save], heldout, args.block_size, args, out, env, ref,
                     generate=change.get("diffusion.attention") != "full")
        metrics = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
        rows.append({"key": key, "variant": label, "trained_tokens": metrics[-1]["consumed_tokens"],
                     "train_seconds": round(sum(m["consumed_tokens"] / m["step"] / m["tokens_per_s"] for m in metrics), 1),
                     "trainable_params": trainable(save), **r})
    print(f"[{time.perf_counter() - t0:5.0f} s] evaluating the base model", flush=True)
    base_rows = [
        {"key": "base", "variant": "base AR (untrained)", "trained_tokens": 0,
         **evaluate("base_b1", ["--ckpt", base], heldout, 1, args, out, env, ref, True)},
        {"key": "base_b", "variant": f"base, untrained, at B={args.block_size}", "trained_tokens": 0,
         **evaluate(f"base_b{args.block_size}", ["--ckpt", base], heldout, args.block_size, args, out, env, ref,
                    False)},
    ]
    rows = base_rows + rows
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    table = report(rows, args)
    (out / "results.md").write_text(table + "\n")
    print(table)
    plot(rows, out / "adaptation_study.png", args.block_size)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'adaptation_study.png'}")
    return 0


def _fmt(value, spec="{:.3f}") -> str:
    return "–" if value is None else spec.format(value)


def report(rows: list, args) -> str:
    B = args.block_size
    head = (f"| variant | clean tokens | NELBO at B={B} | ppl bound | AR-mode ppl | tokens / forward | "
            f"generative ppl |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        nelbo = r["nelbo"] if r["key"] != "base" else None  # B = 1 row: its NELBO is the AR NLL
        lines.append(
            f"| {r['variant']} | {r['trained_tokens']} | {_fmt(nelbo)} | {_fmt(r['ppl_bound'] if nelbo else None, '{:.2f}')}"
            f" | {r['ar_ppl']:.2f} | {_fmt(r.get('gen_tokens_per_forward'), '{:.2f}')}"
            f" | {_fmt(r.get('gen_ppl'), '{:.2f}')} |"
        )
    return "\n".join(lines)


def plot(rows: list, path: Path, B: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["trained_tokens"]]
    names = [r["variant"] for r in trained]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    base_ar = next(r for r in rows if r["key"] == "base")["ar_ppl"]
    base_b = next((r for r in rows if r["key"] == "base_b"), None)
    axes[0].barh(names, [r["ppl_bound"] for r in trained], color="tab:blue")
    if base_b:
        axes[0].axvline(base_b["ppl_bound"], color="gray", ls="--", label="base, untrained")
    axes[0].axvline(base_ar, color="black", ls=":", label="base AR perplexity")
    axes[0].set_xscale("log")
    axes[0].set_title(f"held-out perplexity bound at B={B} (lower is better)")
    axes[0].legend(fontsize=8)
    axes[0].invert_yaxis()
    axes[1].barh(names, [r["ar_ppl"] for r in trained], color="tab:orange")
    axes[1].axvline(base_ar, color="black", ls=":", label="base AR")
    axes[1].set_xscale("log")
    axes[1].set_title("AR-mode perplexity (AR ability kept)")
    axes[1].legend(fontsize=8)
    axes[1].invert_yaxis()
    for r in rows:
        if r.get("gen_ppl") is not None:
            axes[2].scatter(r["gen_tokens_per_forward"], r["gen_ppl"], s=40)
            axes[2].annotate(r["variant"], (r["gen_tokens_per_forward"], r["gen_ppl"]), fontsize=8,
                             xytext=(4, 2), textcoords="offset points")
    axes[2].set_xlabel("tokens per forward")
    axes[2].set_ylabel("generative perplexity (base model)")
    axes[2].set_title("generation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

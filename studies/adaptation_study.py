#!/usr/bin/env python
"""The adaptation study: which parts of the NBDiff recipe matter, at equal token budgets.

    python studies/adaptation_study.py                    # all variants, ~1 hour on 2 CPU cores
    python studies/adaptation_study.py --variants a c     # some of them
    python studies/adaptation_study.py --report-only      # table and plot from finished runs

Starts from SmolLM2-135M converted with a mask token (scripts/quickstart.sh leaves it in
quickstart/smollm2-135m; --base points elsewhere). Every variant trains from that checkpoint
with examples/configs/quickstart_cpu.yaml (L = 128, 4 sequences = 512 clean tokens per step) for
--steps steps, so all see the same clean tokens, in the same order, then is evaluated at the
target block size (--block-size, default 4):

  (a) full recipe     context-causal clean half, AR loss (lambda 0.5), growth 1 -> 2 -> ... ->
                      target, doubling; the stages below the target share half the budget
                      (target 4: a quarter at B = 1, a quarter at B = 2, then B = 4)
  (b) no AR loss      (a) with lambda = 0
  (c) no growth       (a) trained at the target block size from the first step
  (d) block-causal    BD3-LM's clean half (block-causal); lambda = 0 (the AR loss would see its
                      own targets inside a block), growth as (a)
  (e) full diffusion  naive adaptation: one bidirectional half, the whole sequence one block
  (f) LoRA rank 64    (a) with LoRA adapters (examples/configs/quickstart_lora_cpu.yaml settings)
  (g) clipped         (a) with t ~ U[0.3, 0.8] (BD3-LM's fixed clipped schedule)
  (h) adaptive        (a) with diffusion.schedule=adaptive (the clipped interval searched at the
                      start of each stage; 95% of the training file trained on, 5% scores searches)
  base                the converted model, untrained (the AR reference)

Data: the committed public-domain Shakespeare sample (examples/data); its last --heldout-frac of
lines (whole plays at the end of the file) is held out, never trained on. Evaluation
(tools/evaluate.py) on the first --eval-tokens held-out tokens in windows of 128:
  - NELBO per token at the target block size and its perplexity bound exp(NELBO), --samples noise
    draws per window (for (e), its own whole-sequence bound: it has no blocks);
  - AR-mode perplexity: one causal pass (how much next-token ability survives);
  - generation: --gen-prompts held-out prompts of 32 tokens, 32 new tokens at the target block
    size with the KV-cached block sampler, temperature 1, at each commit threshold of
    --thresholds and each fixed number of tokens committed per refinement forward of
    --tokens-per-step (at B = 4 with shift, 3 per step = one refinement and one append forward
    per block: 2 tokens per forward at best): tokens per forward and the
    generative perplexity of the samples under the untrained base model (exported to HF; it is
    also the base row's own model, so that row's number is its sampling entropy, not a quality
    edge). (e) is skipped: its sampler would refine the whole sequence, which the block sampler
    does not do.

For (a), (g), (h) the study also measures the schedule's loss variance: on the same held-out windows
and noise draws, the variance across --variance-draws draws of each window's diffusion loss at the
target block size under the schedule the variant trained with (for (h) its last chosen interval),
averaged over windows: the quantity BD3-LM's search minimises.

Outputs under --out (default study/): runs/<variant>/ (training, metrics.jsonl), eval/*.json,
results.json, results.md (the table), adaptation_study.png. Re-running skips finished work.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
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
    # Noise schedules at the same budget ((a) is the linear one): BD3-LM's fixed clipped range, and
    # the adaptive search, which scores its intervals on a validation split of the training file.
    "g": ("(g) clipped [0.3, 0.8]", {"diffusion.schedule": "clipped", "diffusion.clip_min": 0.3,
                                     "diffusion.clip_max": 0.8}),
    "h": ("(h) adaptive schedule", {"diffusion.schedule": "adaptive", "data.split": "95,5,0"}),
}
# --search-grid small: a 6-interval grid with 2 draws per sample (a CPU budget), instead of the 21 x 4 default.
SMALL_SEARCH = {"diffusion.schedule_search_widths": "[0.5, 0.7, 1.0]", "diffusion.schedule_search_step": 0.25,
                "diffusion.schedule_search_draws": 2}
SCHEDULE_VARIANTS = ("a", "g", "h")


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
    p.add_argument("--variance-draws", type=int, default=8, help="noise draws per window for the schedule variance")
    p.add_argument("--samples", type=int, default=2, help="noise draws per held-out window")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1000], help="noise seeds of the NELBO evaluation")
    p.add_argument("--gen-prompts", type=int, default=24)
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.9],
                   help="generation sweep: commit thresholds (adaptive parallel decoding)")
    p.add_argument("--tokens-per-step", type=int, nargs="*", default=[2, 3],
                   help="generation sweep: fixed tokens committed per refinement forward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-generation", action="store_true", help="skip the generation sweep (likelihood and variance only)")
    p.add_argument("--search-grid", choices=["default", "small"], default="default",
                   help="(h): the config's default search grid, or a 6-interval one with 2 draws (for a loaded CPU)")
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
    if change.get("growth", True):  # doubling from 1; the stages below the target share half the budget
        below = [2 ** i for i in range(args.block_size.bit_length() - 1)]
        stages = [{"block_size": b, "tokens": tokens // (2 * len(below))} for b in below]
        stages.append({"block_size": args.block_size})
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
    if change.get("diffusion.schedule") == "adaptive" and args.search_grid == "small":
        sets.update(SMALL_SEARCH)
    return config, [f"{k}={v}" for k, v in sets.items()]


def finished(save: Path, steps: int) -> bool:
    latest = save / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:07d}"


def evaluate(name: str, ckpt: Path, heldout: Path, block_size: int, args, out: Path, env: dict) -> dict:
    """tools/evaluate.py: NELBO at `block_size` and the AR-mode NLL on the held-out windows, once
    per noise seed of --seeds; `nelbo` is their mean and `nelbo_spread` (max - min) / 2 shows
    how much the noise draw alone moves it (every model sees the same draws per seed)."""
    runs = []
    for seed in args.seeds if block_size > 1 else args.seeds[:1]:  # B = 1 draws no noise
        path = out / "eval" / (f"{name}.json" if seed == 0 else f"{name}_seed{seed}.json")
        if not path.is_file():
            cmd = [PY, "tools/evaluate.py", "--ckpt", ckpt, "--data", heldout, "--seq-len", 128, "--block-size",
                   block_size, "--samples", args.samples, "--max-tokens", args.eval_tokens, "--seed", seed,
                   "--json", "--quiet"]
            result = json.loads(run(cmd, out / "eval" / f"{path.stem}.log", env).strip().splitlines()[-1])
            path.write_text(json.dumps(result, indent=1))
        runs.append(json.loads(path.read_text()))
    nelbos = [r["nelbo"] for r in runs]
    mean = sum(nelbos) / len(nelbos)
    return {**runs[0], "nelbo": mean, "ppl_bound": math.exp(mean), "nelbo_spread": (max(nelbos) - min(nelbos)) / 2,
            "nelbo_by_seed": nelbos}


def decodings(args) -> list:
    """Generation settings as (label, threshold, tokens per step): "thr 0.9" commits by
    confidence, "k=3" a fixed number of slots per refinement forward."""
    return ([(f"thr {t}", t, None) for t in args.thresholds]
            + [(f"k={k}", 1.0, k) for k in args.tokens_per_step])


def generation_sweep(name: str, ckpt: Path, heldout: Path, block_size: int, args, out: Path, ref: Path) -> list:
    """[{decoding, tokens_per_forward, gen_ppl, sample}] per decoding setting (megablock.inference.evaluation,
    in this process: one model load serves them all)."""
    import torch

    from megablock.data.datasets import eval_windows
    from megablock.cli import launched_parallel
    from megablock.inference.evaluation import generation_prompts, reference_nll
    from megablock.inference.loading import load
    from megablock.inference.measure import decode as measure_decoding
    from megablock.inference.sampler import GenerateConfig

    path = out / "eval" / f"{name}_gen.json"
    if path.is_file():
        return json.loads(path.read_text())
    torch.set_num_threads(args.threads)
    em = load(ckpt=str(ckpt), parallel=launched_parallel())
    prompts = generation_prompts(eval_windows(str(heldout), 128, args.eval_tokens), args.gen_prompts, 32)
    decode = lambda ids: em.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    points = []
    for decoding, threshold, per_step in (decodings(args) if block_size > 1 else [("AR", 1.0, None)]):
        record = measure_decoding(em, prompts, GenerateConfig(block_size=block_size, max_new_tokens=32, threshold=threshold,
                                                              tokens_per_step=per_step, shift=em.shift))
        samples, forwards = record.tokens, record.forwards
        nll, count = reference_nll(ref, [decode(p) for p in prompts], [decode(t) for t in samples])
        points.append({"decoding": decoding, "new_tokens": sum(map(len, samples)), "forwards": forwards,
                       "tokens_per_forward": sum(map(len, samples)) / forwards, "ref_tokens": count,
                       "gen_ppl": math.exp(nll / count), "sample": decode(prompts[0]) + decode(samples[0])})
    path.write_text(json.dumps(points, indent=1))
    return points


def schedule_variance(name: str, save: Path, heldout: Path, change: dict, args, out: Path) -> dict:
    """Mean over held-out windows of the variance across noise draws of each window's diffusion
    loss, under the schedule the run trained with (adaptive: the interval of its last search)."""
    path = out / "eval" / f"{name}_variance.json"
    if path.is_file():
        return json.loads(path.read_text())
    import statistics
    from dataclasses import replace

    import torch

    from megablock.cli import launched_parallel
    from megablock.config import Config
    from megablock.data.datasets import eval_windows
    from megablock.diffusion.batch import build_batch
    from megablock.diffusion.loss import sample_diffusion_losses
    from megablock.inference.loading import load
    from megablock.training.schedule_search import draw_seed

    torch.set_num_threads(args.threads)
    step = (save / "latest").read_text().strip()
    cfg = Config.from_dict(__import__("yaml").safe_load((save / step / "config.yaml").read_text()))
    settings = cfg.diffusion
    if settings.schedule == "adaptive":
        state = json.loads((save / step / "trainer_state.json").read_text())
        settings = replace(settings, schedule="clipped", clip_min=state["clip_min"], clip_max=state["clip_max"])
    im = load(ckpt=str(save), parallel=launched_parallel())
    windows = eval_windows(str(heldout), 128, min(args.eval_tokens, 64 * 128))
    per_draw = []
    with torch.no_grad():
        for k in range(args.variance_draws):
            losses = []
            for start in range(0, len(windows), 8):
                rows = windows[start:start + 8]
                b = build_batch(rows, torch.arange(start, start + len(rows)), args.block_size, settings,
                                mask_token_id=im.mask_token_id, seed=draw_seed(0, k))
                logits = im.model(b.input_ids, b.position_ids, b.layout)
                losses += sample_diffusion_losses(logits, b.targets, b.diff_weights, b.diff_normalizer).tolist()
            per_draw.append(losses)
    variance = statistics.fmean(statistics.variance(col) for col in zip(*per_draw))
    result = {"schedule": settings.schedule, "clip": [settings.clip_min, settings.clip_max] if settings.schedule == "clipped"
              else None, "loss_variance": variance, "windows": len(windows), "draws": args.variance_draws}
    path.write_text(json.dumps(result, indent=1))
    return result


def trainable(save: Path) -> int | None:
    from megablock.checkpoint.format import Checkpoint

    return Checkpoint.open(save).meta.trainable_parameters


def main(argv=None) -> int:
    args = parse_args(argv)
    out, base = Path(args.out).resolve(), Path(args.base).resolve()
    if args.block_size < 2 or args.block_size & (args.block_size - 1) or 128 % args.block_size:
        sys.exit(f"--block-size {args.block_size}: the study grows the block size by doubling from 1 over windows "
                 "of 128 tokens; use 2, 4, 8, ... up to 128")
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
        r = evaluate(key, save, heldout, args.block_size, args, out, env)
        if change.get("diffusion.attention") != "full" and not args.no_generation:
            r["generation"] = generation_sweep(key, save, heldout, args.block_size, args, out, ref)
        if key in SCHEDULE_VARIANTS:
            r["schedule_variance"] = schedule_variance(key, save, heldout, change, args, out)
        metrics = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
        rows.append({"key": key, "variant": label, "trained_tokens": metrics[-1]["consumed_tokens"],
                     "train_seconds": round(sum(m["consumed_tokens"] / m["step"] / m["tokens_per_s"] for m in metrics), 1),
                     "trainable_params": trainable(save), **r})
    print(f"[{time.perf_counter() - t0:5.0f} s] evaluating the base model", flush=True)
    base_rows = [
        {"key": "base", "variant": "base AR (untrained)", "trained_tokens": 0,
         **evaluate("base_b1", base, heldout, 1, args, out, env),
         "generation": [] if args.no_generation else generation_sweep("base_b1", base, heldout, 1, args, out, ref)},
        {"key": "base_b", "variant": f"base, untrained, at B={args.block_size}", "trained_tokens": 0,
         **evaluate(f"base_b{args.block_size}", base, heldout, args.block_size, args, out, env)},
    ]
    rows = base_rows + rows
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    table = report(rows, args) + schedule_report(rows, args)
    (out / "results.md").write_text(table + "\n")
    print(table)
    plot(rows, out / "adaptation_study.png", args.block_size)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'adaptation_study.png'}")
    return 0


def _fmt(value, spec="{:.3f}") -> str:
    return "–" if value is None else spec.format(value)


def report(rows: list, args) -> str:
    """The markdown table: one row per model, one generation column per threshold."""
    B = args.block_size
    settings = [label for label, _, _ in decodings(args)]
    gen_head = " | ".join(f"{d}: tok/fwd, gen ppl" for d in settings)
    lines = [f"| variant | trainable params | NELBO at B={B} | ppl bound | AR-mode ppl | {gen_head} |",
             "|---" * (5 + len(settings)) + "|"]
    for r in rows:
        nelbo = None if r["key"] == "base" else r["nelbo"]  # the B = 1 row's NELBO is its AR NLL
        by_setting = {g["decoding"]: g for g in r.get("generation", [])}
        if r["key"] == "base":  # AR decoding: one token per forward, in every column
            by_setting = {d: r["generation"][0] for d in settings} if r["generation"] else {}
        gen = " | ".join(
            f"{g['tokens_per_forward']:.2f}, {g['gen_ppl']:.1f}" if g else "–"
            for g in (by_setting.get(d) for d in settings)
        )
        params = r.get("trainable_params")
        spread = "" if nelbo is None else f" ± {r['nelbo_spread']:.3f}"
        lines.append(
            f"| {r['variant']} | {'all' if params is None else f'{params / 1e6:.1f}M'} | "
            f"{_fmt(nelbo)}{spread} | "
            f"{_fmt(r['ppl_bound'] if nelbo is not None else None, '{:.1f}')} | {r['ar_ppl']:.1f} | {gen} |"
        )
    return "\n".join(lines)


def schedule_report(rows: list, args) -> str:
    """The noise-schedule comparison: held-out NELBO (unbiased t ~ U[eps, 1]) and loss variance."""
    picked = [r for r in rows if r.get("schedule_variance")]
    if not picked:
        return ""
    lines = ["", "", f"| schedule (B = {args.block_size}) | trained with | NELBO | loss variance across draws |",
             "|---|---|---|---|"]
    for r in picked:
        v = r["schedule_variance"]
        clip = f"U[{v['clip'][0]:.3g}, {v['clip'][1]:.3g}]" if v["clip"] else "U[eps, 1]"
        lines.append(f"| {r['variant']} | {clip} | {r['nelbo']:.3f} ± {r['nelbo_spread']:.3f} | {v['loss_variance']:.4f} |")
    return "\n".join(lines)


def plot(rows: list, path: Path, B: int) -> None:
    """Three panels: perplexity bound at B, AR-mode perplexity, generation quality vs speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["trained_tokens"]]
    names = [r["variant"] for r in trained]
    base_ar = next(r for r in rows if r["key"] == "base")
    base_b = next((r for r in rows if r["key"] == "base_b"), None)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    low = [r["ppl_bound"] - math.exp(r["nelbo"] - r["nelbo_spread"]) for r in trained]
    high = [math.exp(r["nelbo"] + r["nelbo_spread"]) - r["ppl_bound"] for r in trained]
    ax.barh(names, [r["ppl_bound"] for r in trained], xerr=[low, high], color="tab:blue")
    if base_b:
        ax.axvline(base_b["ppl_bound"], color="gray", ls="--", label=f"base, untrained, B={B}")
    ax.axvline(base_ar["ar_ppl"], color="black", ls=":", label="base AR perplexity")
    ax.set_xscale("log")
    ax.set_title(f"held-out perplexity bound at B={B} (lower is better)")
    ax.legend(fontsize=8)
    ax.invert_yaxis()
    ax = axes[1]
    ax.barh(names, [r["ar_ppl"] for r in trained], color="tab:orange")
    ax.axvline(base_ar["ar_ppl"], color="black", ls=":", label="base AR")
    ax.set_xscale("log")
    ax.set_title("AR-mode perplexity (AR ability kept; lower is better)")
    ax.legend(fontsize=8)
    ax.invert_yaxis()
    ax = axes[2]
    for r in rows:
        points = r.get("generation")
        if points:
            ax.plot([g["tokens_per_forward"] for g in points], [g["gen_ppl"] for g in points],
                    marker="o", label=r["variant"])
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("generative perplexity under the base model")
    ax.set_yscale("log")
    ax.set_title(f"generation at B={B}: thresholds, then k tokens per step", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""A drafter for SmolLM2-135M-Instruct: gated LoRA on the noised positions (lora.scope=noised), the
verifier the untouched base model, against the full-model recipe at the same token budget.

    python studies/parallel_adaptation.py --until data --out PREP ...     # once: base, prompts, distilled data
    python studies/drafter_adaptation.py --prep PREP [--out DIR]          # resumable; rerun to continue
    python studies/drafter_adaptation.py --prep PREP --report-only        # tables and plot from what exists

Every arm trains in chunks of --chunk-tokens (`train.exit_after_steps`, the learning-rate schedule
fixed by the whole --tokens budget, so the chunks are one exact run) and gets a curve point after
each chunk: greedy speculative decoding of the held-out prompts (batched; every row's count is
its count at batch 1) at B = 4 and 8 in the three layouts, drafts kept per verified block and
tokens per forward, and for the full-model arm the AR perplexity of held-out Wikipedia text. The
arms take turns (the one with the fewest tokens trains next) up to --round-tokens each; then the
best gated arm (most tokens per forward at B = 8, one forward per block, masked layout; chosen
once, OUT/best.txt) continues to --tokens, and then the full-model arms to the same budget. An
interruption loses at most the chunk in flight (a curve point it cut off is taken on the rerun).

Data (all prepared by parallel_adaptation.py --until data under PREP, plus one file made here):
  - distilled: the base model's own greedy continuations of corpus prompts (SFT format: the
    response tokens are scored), which is what the drafter must predict;
  - raw: documents of the three corpora's training parts (the first 90%, where the train prompts
    come from; the held-out prompts are from the last 10%) as SFT records with an empty prompt,
    so every token is scored: in the blend, about --raw-tokens of them (SFT sets blend by size).
Arms (ARMS below): gated LoRA rank 64, lambda = 0, block size 2 -> 4 -> 8 with half the blocks'
first slot masked (the one-forward layout):
  - the recipe of the first sittings (t ~ U[eps, 1], distillation weight 1, lr 1e-3);
  - every slot masked (t = 1, the draft block's own pattern) at lr 3e-4 and 1e-3 with
    distillation, and at 1e-3 without;
and the full-model recipe (lambda 0.5, lr 3e-5, block size 1 -> 2 -> 4 -> 8) with three blends
(RAW_TOKENS), whose AR perplexity on held-out Wikipedia text is compared with the base's (a gated
arm's AR model is the base itself).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "studies"))
from parallel_adaptation import CORPORA, PY, latest_step, load_prompts, log, needed, run  # noqa: E402

TOKENS_PER_STEP = 512  # 4 sequences of L = 128
GATED = {"lora.enabled": "true", "lora.scope": "noised", "lora.rank": 64, "lora.alpha": 128,
         "diffusion.ar_loss_weight": 0, "diffusion.first_slot_mask_prob": 0.5}
# Every eligible slot of every block masked (t = 1): a speculative draft block is all masks, so
# this is the only mask pattern the drafter meets when it decodes, and every slot is a target.
ALL_MASKED = {"diffusion.schedule": "clipped", "diffusion.clip_min": 1.0, "diffusion.clip_max": 1.0}
FULL = {"diffusion.ar_loss_weight": 0.5, "train.lr": 3e-5, "diffusion.first_slot_mask_prob": 0.5}
ARMS = {
    "gated_lr1e-3_kl": {**GATED, "train.lr": 1e-3, "diffusion.distill_weight": 1.0},
    "gated_lr3e-4_kl_t1": {**GATED, **ALL_MASKED, "train.lr": 3e-4, "diffusion.distill_weight": 1.0},
    "gated_lr1e-3_t1": {**GATED, **ALL_MASKED, "train.lr": 1e-3},
    "gated_lr1e-3_kl_t1": {**GATED, **ALL_MASKED, "train.lr": 1e-3, "diffusion.distill_weight": 1.0},
    "full_lr3e-5": FULL,
    "full_lr3e-5_raw100k": FULL,
    "full_lr3e-5_raw60k": FULL,
}
# An arm's raw-corpus tokens in its blend, where not --raw-tokens. Beside the ~191k distilled tokens,
# 240k raw (56%) left the full model's AR perplexity 19.5% *below* the base's after 524k tokens, and
# SFT alone raised it 34% (docs/parallel_decoding.md). A third raw (100k) was still 6.6% below at 131k
# tokens and falling, so a quarter (60k) is the next guess for the 5% band.
RAW_TOKENS = {"full_lr3e-5_raw100k": 100_000, "full_lr3e-5_raw60k": 60_000}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prep", required=True, help="output folder of parallel_adaptation.py --until data")
    p.add_argument("--corpora", default=None,
                   help="folder with the corpora; needed until OUT/raw.jsonl exists")
    p.add_argument("--out", default=str(ROOT / "study" / "drafter"))
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated names of ARMS")
    p.add_argument("--tokens", type=int, default=524288, help="the schedule's budget (the best gated arm's tokens)")
    p.add_argument("--round-tokens", type=int, default=131072, help="every arm trains this far before the best continues")
    p.add_argument("--chunk-tokens", type=int, default=32768, help="tokens per training launch and curve point")
    p.add_argument("--raw-tokens", type=int, default=240000, help="raw-corpus tokens in the blend (about)")
    p.add_argument("--curve-prompts", type=int, default=24)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--curve-layouts", type=int, default=None,
                   help="measure only the first N entries of LAYOUTS (at least the 3 basic ones; default all): "
                        "the candidate layouts make a point slow")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data
def raw_name(args, tokens: int) -> str:
    """The raw set's file stem: "raw" for --raw-tokens (the first blend's name), else raw_TOKENS."""
    return "raw" if tokens == args.raw_tokens else f"raw_{tokens}"


def raw_records(args, out: Path, tokenizer, tokens: int) -> Path:
    """Documents of the corpora's training parts, about `tokens` in all, as SFT records (a smaller
    set is a prefix of each corpus's part of a larger one)."""
    path = out / f"{raw_name(args, tokens)}.jsonl"
    if path.is_file():
        return path
    from megablock.data.preprocess import iter_documents

    per_corpus, rows = tokens // len(CORPORA), []
    for name, (file, split) in CORPORA.items():
        docs = list(iter_documents(str(Path(needed(args, "corpora")) / file), text_split=split))
        cut, count = int(len(docs) * 0.9), 0
        stride = max(1, cut // 4000)  # spread over the training part, not its first chapters
        for doc in docs[:cut:stride]:
            if count >= per_corpus:
                break
            rows.append({"prompt": "", "response": doc, "corpus": name})
            count += len(tokenizer(doc, add_special_tokens=False)["input_ids"])
        log(f"raw {name}: {count} tokens from {sum(r['corpus'] == name for r in rows)} documents")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


def prepare(args, prep: Path, out: Path, env: dict) -> dict:
    from transformers import AutoTokenizer

    base = prep / "base"
    tok = AutoTokenizer.from_pretrained(str(base / "tokenizer"))
    blends = {}
    for arm in args.arms.split(","):
        tokens = RAW_TOKENS.get(arm, args.raw_tokens)
        raw = out / "data" / raw_name(args, tokens)
        if not Path(f"{raw}.flags.idx").is_file():
            (out / "data").mkdir(parents=True, exist_ok=True)
            run([PY, "tools/preprocess_data.py", "--format", "sft", "--input", raw_records(args, out, tok, tokens),
                 "--tokenizer", base / "tokenizer", "--output-prefix", raw, "--quiet"], out / "logs" / "data.log", env)
        blends[arm] = [prep / "data" / "distilled", raw]
    return {"base": base, "hf": prep / "base_hf", "heldout": prep / "prompts_heldout.jsonl",
            "heldout_text": prep / "data" / "heldout_wiki", "data": blends}


# ----------------------------------------------------------------------------- training
def stages(arm: str, tokens: int) -> list:
    if arm.startswith("gated"):  # at B = 1 nothing is masked: the drafter starts at 2
        return [{"block_size": 2, "tokens": tokens // 16}, {"block_size": 4, "tokens": tokens // 8}, {"block_size": 8}]
    return [{"block_size": 1, "tokens": tokens // 16}, {"block_size": 2, "tokens": tokens // 16},
            {"block_size": 4, "tokens": tokens // 8}, {"block_size": 8}]


def train_chunk(args, arm: str, paths: dict, out: Path, env: dict) -> None:
    save = out / arm
    steps, chunk = args.tokens // TOKENS_PER_STEP, args.chunk_tokens // TOKENS_PER_STEP
    lr = ARMS[arm]["train.lr"]
    sets = {
        "model.init_from": paths["base"], "data.prefix": json.dumps([str(p) for p in paths["data"][arm]]),
        "data.format": "sft", "data.split": "100,0,0", "data.seq_len": 128,
        "checkpoint.save_dir": save, "checkpoint.resume": "true", "checkpoint.interval": chunk,
        "checkpoint.keep_last": 1, "train.steps": steps, "train.exit_after_steps": chunk,
        "train.micro_batch_size": 4, "train.global_batch_size": 4, "train.eval_interval": 0,
        "train.min_lr": lr / 10, "train.warmup_steps": 16, "diffusion.stages": json.dumps(stages(arm, args.tokens)),
        **ARMS[arm],
    }
    t0 = time.perf_counter()
    run([PY, "examples/pretrain_nbdiff.py", "--config", "examples/configs/quickstart_cpu.yaml", "--set",
         *[f"{k}={v}" for k, v in sets.items()]], out / "logs" / f"train_{arm}.log", env)
    log(f"{arm}: trained to step {latest_step(save)} in {time.perf_counter() - t0:.0f} s")


def consumed(out: Path, arm: str) -> int:
    return latest_step(out / arm) * TOKENS_PER_STEP


# ----------------------------------------------------------------------------- measurement
def curve_point(args, ckpt: Path, paths: dict) -> dict:
    """Greedy speculative decoding of the held-out prompts at B = 4, 8 in every layout."""
    import torch

    from megablock.cli import launched_parallel
    from megablock.inference.loading import load
    from megablock.inference.measure import decode
    from megablock.inference.speculative import LAYOUTS, layout_config

    torch.set_num_threads(args.threads)
    im = load(ckpt=str(ckpt), parallel=launched_parallel())
    im.eos_token_ids = []  # fixed-length rows
    prompts = load_prompts(paths["heldout"], im.tokenizer)[: args.curve_prompts]
    point = {}
    for B in (4, 8):
        for name, layout in list(LAYOUTS.items())[: args.curve_layouts]:
            r = decode(im, prompts, layout_config(layout, B, max_new_tokens=args.gen_tokens), batched=True)
            point[f"B{B} {name}"] = {"kept_per_block": round(r.mean_accepted, 4),
                                     "offered_per_block": round(r.drafts_per_block, 3),
                                     "tokens_per_forward": round(r.row_tokens_per_forward, 4),
                                     "histogram": r.histogram()}
    return point


def add_curve_point(args, arm: str, paths: dict, out: Path, env: dict) -> None:
    curve = out / f"curve_{arm}.jsonl"
    points = [json.loads(x) for x in curve.read_text().splitlines()] if curve.is_file() else []
    tokens = consumed(out, arm)
    if any(p["tokens"] == tokens for p in points):
        return
    ckpt = paths["base"] if tokens == 0 else out / arm
    t0 = time.perf_counter()
    point = {"tokens": tokens, **curve_point(args, ckpt, paths)}
    if not arm.startswith("gated"):  # a gated arm's AR model is the base itself
        point["ar_ppl"] = ar_perplexity(ckpt, paths, out, f"{arm}_{tokens}", env)["ar_ppl"]
    with curve.open("a") as f:
        f.write(json.dumps(point) + "\n")
    m = point["B8 one pass, masked"]
    log(f"{arm} @ {tokens} tokens: B=8 one pass (masked) {m['kept_per_block']:.2f} kept per block, "
        f"{m['tokens_per_forward']:.2f} tokens/forward ({time.perf_counter() - t0:.0f} s)")


def ar_perplexity(ckpt: Path, paths: dict, out: Path, name: str, env: dict) -> dict:
    path = out / "eval" / f"ar_{name}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        result = run([PY, "tools/evaluate.py", "--ckpt", ckpt, "--data", paths["heldout_text"], "--seq-len", 128,
                      "--block-size", 1, "--max-tokens", 8192, "--json", "--quiet"], out / "logs" / "eval.log", env)
        path.write_text(result.strip().splitlines()[-1])
    return json.loads(path.read_text())


def chosen_arm(args, out: Path, arms: list) -> str:
    """The gated arm that continues to --tokens: the most tokens per forward at B = 8 (one forward
    per block, masked layout) once every arm has its --round-tokens, chosen once (OUT/best.txt),
    so a noisy later point cannot switch the budget to another arm."""
    path = out / "best.txt"
    if path.is_file():
        return path.read_text().strip()

    def score(arm):
        curve = out / f"curve_{arm}.jsonl"
        if not curve.is_file():
            return -1.0
        return json.loads(curve.read_text().splitlines()[-1])["B8 one pass, masked"]["tokens_per_forward"]
    best = max((a for a in arms if a.startswith("gated")), key=score)
    path.write_text(best + "\n")
    log(f"{best} continues to {args.tokens} tokens")
    return best


# ----------------------------------------------------------------------------- report
def report(args, out: Path, arms: list) -> str:
    """Two tables: drafts kept / offered per block and tokens per forward in the three basic
    layouts, then tokens per forward of the one-pass variants that use more of the drafts."""
    points = {}
    for arm in ["base", *arms]:
        path = out / f"curve_{arm}.jsonl"
        if path.is_file():  # every arm's curve starts with the base's point: show it once, as "base"
            curve = [json.loads(x) for x in path.read_text().splitlines()]
            points[arm] = [p for p in curve if arm == "base" or p["tokens"]]
    from megablock.inference.speculative import LAYOUTS

    basic = [f"B{B} {n}" for B in (4, 8) for n in list(LAYOUTS)[:3]]
    more = [f"B{B} {n}" for B in (4, 8) for n in list(LAYOUTS)[3:]]
    lines = ["| arm | tokens | " + " | ".join(f"{k}: kept / offered, tok/fwd" for k in basic)
             + " | AR perplexity (held-out Wikipedia) |", "|---|---|" + "---|" * (len(basic) + 1)]
    for arm, curve in points.items():
        for p in curve:
            cells = [f"{p[k]['kept_per_block']:.2f} / {p[k]['offered_per_block']:.1f}, {p[k]['tokens_per_forward']:.2f}"
                     for k in basic]
            ppl = f"{p['ar_ppl']:.2f}" if "ar_ppl" in p else "the base's"
            lines.append(f"| {arm} | {p['tokens']} | " + " | ".join(cells) + f" | {ppl} |")
    lines += ["", "| arm | tokens | " + " | ".join(f"{k}: tok/fwd" for k in more) + " |",
              "|---|---|" + "---|" * len(more)]
    for arm, curve in points.items():
        for p in curve:
            cells = [f"{p[k]['tokens_per_forward']:.2f}" if k in p else "-" for k in more]
            lines.append(f"| {arm} | {p['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(out: Path, arms: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm in arms:
        curve = out / f"curve_{arm}.jsonl"
        if not curve.is_file():
            continue
        points = [json.loads(x) for x in curve.read_text().splitlines()]
        t = [p["tokens"] / 1000 for p in points]
        for ax, (key, field) in zip(axes, [("B4 one pass, masked", "kept_per_block"),
                                           ("B8 one pass, masked", "kept_per_block"),
                                           ("B8 one pass, masked, all branches", "tokens_per_forward")]):
            ax.plot(t, [p[key][field] if key in p else float("nan") for p in points], marker="o", label=arm)
            ax.set_title(f"{key}: {field.replace('_', ' ')}")
            ax.set_xlabel("training tokens (thousands)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "drafter.png", dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.curve_layouts is not None and args.curve_layouts < 3:
        sys.exit(f"--curve-layouts {args.curve_layouts}: the report needs the 3 basic layouts; give 3 or more")
    out, prep = Path(args.out), Path(args.prep)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if not (prep / "data" / "distilled.flags.idx").is_file():
        sys.exit(f"{prep} has no distilled data: run studies/parallel_adaptation.py --until data --out {prep} first")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    paths = prepare(args, prep, out, env)
    if not args.report_only:
        for arm in arms:  # the base's point: every arm starts from the same model
            if not (out / f"curve_{arm}.jsonl").is_file() and (out / "curve_base.jsonl").is_file():
                (out / f"curve_{arm}.jsonl").write_text((out / "curve_base.jsonl").read_text())
        if not (out / "curve_base.jsonl").is_file():
            add_curve_point(args, "base", paths, out, env)
            for arm in arms:
                (out / f"curve_{arm}.jsonl").write_text((out / "curve_base.jsonl").read_text())
        for arm in arms:  # a point an interruption cut off after its chunk had been saved
            if consumed(out, arm):
                add_curve_point(args, arm, paths, out, env)
        while True:
            todo = [a for a in arms if consumed(out, a) < args.round_tokens]
            if not todo:
                todo = [a for a in [chosen_arm(args, out, arms)] if consumed(out, a) < args.tokens]
            if not todo:  # beside the best drafter, the full-model recipe at the same budget
                todo = [a for a in arms if not a.startswith("gated") and consumed(out, a) < args.tokens]
            if not todo:
                break
            arm = min(todo, key=lambda a: consumed(out, a))
            train_chunk(args, arm, paths, out, env)
            add_curve_point(args, arm, paths, out, env)
    text = report(args, out, arms)
    (out / "report.md").write_text(text + "\n")
    plot(out, arms)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

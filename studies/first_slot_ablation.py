#!/usr/bin/env python
"""What `diffusion.first_slot_mask_prob` buys: two short runs from the same base on the same data,
with and without the option, then the speculative sampler's acceptance in each draft layout.

    python studies/first_slot_ablation.py --work study/parallel100k   # after parallel_adaptation.py's data phase

One-forward-per-block speculative decoding drafts block k+1 in the pass that verifies block k,
before block k+1's first token is known (`next_draft="masked"`: that slot is a mask). Plain
training never shows the model such a block (with token shift a block's first slot is always
revealed); the option hides it with some probability. Both runs start from --work's base with
the same data, noise seeds and steps at one block size (no growth, so the only difference is the
option); each is scored on the held-out prompts of --work by drafts kept per verified block, in
the three layouts: one pass with the first slot masked (what the option trains), one pass
overlapping the last verified slot, and two passes (a draft forward with the first slot known).
Acceptance and forward counts are exact counts (greedy, lossless: every row is checked against
the model's own AR decoding), so this runs on a busy machine as well as on an idle one.

Resumable: a finished run or evaluation is kept under --out and skipped when rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from parallel_adaptation import PY, ROOT, latest_step, load_prompts, log, run, spread  # noqa: E402

LAYOUTS = {"one pass, first slot masked": (False, "masked"), "one pass, overlap": (False, "overlap"),
           "two passes": (True, "masked")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(ROOT / "study" / "parallel100k"),
                   help="parallel_adaptation.py's --out: its base/, data/distilled and prompts_heldout.jsonl")
    p.add_argument("--out", default=str(ROOT / "study" / "first_slot"))
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=24, help="optimizer steps of 4 x 128 tokens")
    p.add_argument("--probs", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--prompts", type=int, default=12, help="held-out prompts")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def train(args, work: Path, save: Path, prob: float, env: dict) -> None:
    if latest_step(save) >= args.steps:
        return
    sets = {
        "model.init_from": work / "base", "data.prefix": work / "data" / "distilled", "data.format": "sft",
        "data.split": "100,0,0", "data.seq_len": 128, "checkpoint.save_dir": save, "checkpoint.resume": "true",
        "checkpoint.interval": args.steps, "train.steps": args.steps, "train.micro_batch_size": 2,
        "train.global_batch_size": 4, "train.eval_interval": 0, "train.lr": args.lr, "train.min_lr": args.lr / 10,
        "train.warmup_steps": 2, "diffusion.stages": json.dumps([{"block_size": args.block_size}]),
        "diffusion.ar_loss_weight": 0.5, "diffusion.first_slot_mask_prob": prob,
    }
    log(f"training {save.name}: {args.steps} steps at B = {args.block_size}, first_slot_mask_prob {prob}")
    run([PY, "examples/pretrain_nbdiff.py", "--config", "examples/configs/quickstart_cpu.yaml", "--set",
         *[f"{k}={v}" for k, v in sets.items()]], save.parent / "train.log", env)


def acceptance(args, ckpt: Path, heldout: Path) -> dict:
    import torch

    from megablock.cli import launched_parallel
    from megablock.inference.loading import load
    from megablock.inference.measure import measure
    from megablock.inference.speculative import SpeculativeConfig

    torch.set_num_threads(args.threads)
    im = load(ckpt=str(ckpt), parallel=launched_parallel())
    im.eos_token_ids = []  # fixed-length rows
    prompts = spread(load_prompts(heldout, im.tokenizer), args.prompts)
    configs = {name: SpeculativeConfig(block_size=args.block_size, max_new_tokens=args.tokens, two_pass=two_pass,
                                       next_draft=layout) for name, (two_pass, layout) in LAYOUTS.items()}
    records = measure(im, prompts, configs, max_new_tokens=args.tokens)
    return {name: {"kept_per_block": r.mean_accepted, "offered_per_block": r.drafts_per_block,
                   "tokens_per_forward": r.tokens_per_forward, "identical_to_ar": f"{r.identical_to_ar}/{len(prompts)}"}
            for name, r in records.items() if name in configs}


def main(argv=None) -> int:
    args = parse_args(argv)
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    heldout = work / "prompts_heldout.jsonl"
    results = {}
    for prob in [None] + list(args.probs):  # None: the untrained base
        name = "base" if prob is None else f"p{prob:g}"
        path = out / f"accept_{name}_B{args.block_size}.json"
        if not path.is_file():
            if prob is None:
                ckpt = work / "base"
            else:
                ckpt = out / f"run_{name}_B{args.block_size}"
                train(args, work, ckpt, prob, env)
            path.write_text(json.dumps(acceptance(args, ckpt, heldout), indent=1))
        results[name] = json.loads(path.read_text())
        for layout, r in results[name].items():
            log(f"{name}: {layout}: {r['kept_per_block']:.2f} of {r['offered_per_block']:.2f} drafts kept per block, "
                f"{r['tokens_per_forward']:.2f} tokens/forward, identical to AR {r['identical_to_ar']}")
    print(f"\nB = {args.block_size}, {args.steps} steps of 512 tokens, {args.prompts} held-out prompts x {args.tokens} tokens")
    print("| model | " + " | ".join(LAYOUTS) + " |")
    print("|---|" + "---|" * len(LAYOUTS))
    for name, rows in results.items():
        cells = [f"{rows[k]['kept_per_block']:.2f} / {rows[k]['offered_per_block']:.1f} ({rows[k]['tokens_per_forward']:.2f} tok/fwd)"
                 for k in LAYOUTS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(json.dumps({"benchmark": "first_slot_ablation", "block_size": args.block_size, "steps": args.steps,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

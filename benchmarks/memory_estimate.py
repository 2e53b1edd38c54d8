#!/usr/bin/env python
"""The memory estimator (megablock/training/memory.py) against the measured peak of real steps.

    python benchmarks/memory_estimate.py                 # the default cases below
    python benchmarks/memory_estimate.py --quick         # two cases (what tests/test_memory.py runs)

Each case runs in a fresh process (2 ranks under gloo for TP = 2): a small random-init model
in fp32, torch's fused AdamW (the trainer's), one warm-up step (it allocates the optimizer state), then one measured
training step (forward, the NBDiff loss with logits only at loss positions, backward, AdamW
step) on a real block-diffusion batch. The measured number is the peak of bytes allocated
through torch's CPU allocator during that step (torch.profiler memory events) plus the bytes
alive before it (weights, optimizer state, the batch); the estimate is `estimate(...).peak`
for the same config, with the batch's actual number of loss positions. TP = 2 reports rank 0.

Prints a table, then one JSON object on the last line (per case: estimate, measured, ratio).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

ARCH = dict(arch="llama", vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4,
            num_attention_heads=4, num_kv_heads=2, mask_token_id=4095, max_position_embeddings=1024)
CASES = [
    # (label, tp, overrides)
    ("none", 1, {"train.recompute": "none"}),
    ("selective", 1, {"train.recompute": "selective"}),
    ("full", 1, {"train.recompute": "full"}),
    ("none, one-piece loss", 1, {"train.recompute": "none", "train.loss_chunk_tokens": 0}),
    ("none, AR stage (B=1)", 1, {"train.recompute": "none", "diffusion.stages": [{"block_size": 1}]}),
    ("none, TP=2", 2, {"train.recompute": "none"}),
    ("full, TP=2", 2, {"train.recompute": "full"}),
    ("none, TP=2 + SP", 2, {"train.recompute": "none", "parallel.sequence_parallel": True}),
    ("full, TP=2 + SP", 2, {"train.recompute": "full", "parallel.sequence_parallel": True}),
]
QUICK = [CASES[0], CASES[2]]


def make_config(overrides: dict, seq_len: int, micro_batch: int, tp: int):
    from megablock.config import Config

    data = {"data": {"seq_len": seq_len},
            "model": {"architecture": ARCH},
            "parallel": {"tensor": tp},
            "train": {"micro_batch_size": micro_batch, "global_batch_size": micro_batch, "loss_chunk_tokens": 256},
            "diffusion": {"stages": [{"block_size": 16}], "ar_loss_weight": 0.5}}
    for key, value in overrides.items():
        section, name = key.split(".")
        data[section][name] = value
    return Config.from_dict(data)


def _measure(rank, world, overrides, seq_len, micro_batch):
    import gc

    import torch
    from common import peak_tensor_bytes

    from megablock.diffusion.batch import build_batch
    from megablock.diffusion.loss import loss_positions
    from megablock.model.config import ModelConfig
    from megablock.model.transformer import BlockDiffusionLM
    from megablock.parallel.state import initialize_parallel
    from megablock.diffusion.loss import LossWeights
    from megablock.training.engine import DiffusionObjective
    from megablock.training.memory import estimate

    cfg = make_config(overrides, seq_len, micro_batch, world)
    m = ModelConfig(**ARCH)
    info = initialize_parallel(world, 1)
    torch.manual_seed(0)
    model = BlockDiffusionLM(m, info)
    model.set_recompute(cfg.train.recompute)
    if world > 1:
        model.set_sequence_parallel(cfg.parallel.sequence_parallel)
    objective = DiffusionObjective(model, LossWeights.from_config(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer's
    x0 = torch.randint(0, m.mask_token_id, (micro_batch, seq_len), generator=torch.Generator().manual_seed(1))
    batch = build_batch(x0, torch.arange(micro_batch), cfg.diffusion.stages[0].block_size, cfg.diffusion,
                        mask_token_id=m.mask_token_id, seed=2)

    def step():
        loss = objective(batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: the optimizer state exists from here on
    gc.collect()
    alive = sum(p.numel() * p.element_size() for p in model.parameters())
    alive += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    peak = peak_tensor_bytes(step)
    n_loss = int(loss_positions(batch.diff_weights, batch.ar_weights, cfg.diffusion.ar_loss_weight).numel())
    est = estimate(cfg, m, dp=1, loss_tokens=n_loss)[0]
    return {"measured": alive + peak, "estimate": est.peak, "alive_before": alive, "loss_tokens": n_loss,
            "activations_estimate": est.activations}


def run_case(label, tp, overrides, seq_len, micro_batch) -> dict:
    from megablock.testing import run_distributed

    res = run_distributed(_measure, tp, overrides, seq_len, micro_batch)[0]
    res.update(label=label, tp=tp, ratio=res["estimate"] / res["measured"])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from common import MiB, machine_note, table

    rows = [run_case(label, tp, ov, args.seq_len, args.micro_batch) for label, tp, ov in (QUICK if args.quick else CASES)]
    print(f"model {ARCH}, L = {args.seq_len}, micro-batch {args.micro_batch}, B = 16, fp32; machine: {machine_note()}")
    print(table([{**r, "m": r["measured"] / MiB, "e": r["estimate"] / MiB} for r in rows],
                [("case", "label", "{}"), ("TP", "tp", "{}"), ("loss tokens", "loss_tokens", "{}"),
                 ("measured MiB", "m", "{:.1f}"), ("estimate MiB", "e", "{:.1f}"), ("est/meas", "ratio", "{:.3f}")]))
    print(json.dumps({"benchmark": "memory_estimate", "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                      "cases": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Context parallelism (parallel.context) on CPU: memory per rank at CP = 1 against CP = 2, step
time of `ring` against `allgather`, and the memory estimator against the measurement.

    python benchmarks/context_parallel.py                        # L = 2048 and 8192
    python benchmarks/context_parallel.py --seq-lens 2048 --repeats 2

The model has SmolLM2-135M's layer shape (hidden 576, intermediate 1536, 9 / 3 heads, vocab
49152) with --layers decoder layers (default 2: the full 30 would take minutes per step on two
cores), random init, fp32, recompute none, block size 16, one sample per micro-batch, the NBDiff
loss (L_diff + 0.5 L_AR, logits at loss positions only). Each case runs in fresh processes under
gloo (one process for CP = 1, two for CP = 2, one thread each): one warm-up step, one step whose
memory is measured (rank 0: the peak of torch's CPU allocator above what was alive before the
step, benchmarks/common.py), the same for a forward alone (what it keeps for backward plus its
transients: the activation memory), then --repeats timed forward + backward steps (a barrier
before each; best and median of rank 0). The estimates are memory.py's for the same config and
the batch's real number of loss positions: the activations (the loss's logits included) for
the forward, the backward peak without weights and optimizer state for the step. The step peak
also holds the gradients of every weight and the head's, which do not shrink with CP.

What this cannot show: the ring posts each transfer before the computation it should hide
behind, but gloo on one CPU host copies through shared memory on the CPU that computes, so no
overlap of transfer and compute can be measured here (benchmarks/gpu_check.sh has a CP = 2 case
for a machine with two GPUs).

Prints a table, then one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

SMOLLM2 = dict(arch="llama", vocab_size=49153, hidden_size=576, intermediate_size=1536,
               num_attention_heads=9, num_kv_heads=3, mask_token_id=49152, max_position_embeddings=8192,
               tie_word_embeddings=True)
CASES = [("CP 1", 1, "ring"), ("CP 2 ring", 2, "ring"), ("CP 2 allgather", 2, "allgather")]


def make_config(seq_len: int, cp: int, impl: str, layers: int, device: str):
    from megablock.config import Config

    return Config.from_dict({
        "data": {"seq_len": seq_len},
        "model": {"architecture": {**SMOLLM2, "num_layers": layers}, "attention_impl": "auto"},
        "parallel": {"context": cp, "context_impl": impl},
        "train": {"micro_batch_size": 1, "global_batch_size": 1, "recompute": "none",
                  "drop_unmasked_blocks": False, "precision": "fp32"},
        "diffusion": {"stages": [{"block_size": 16}], "ar_loss_weight": 0.5},
    })


def _measure(rank, world, seq_len, impl, layers, repeats, device):
    import torch
    import torch.distributed as dist
    from common import peak_tensor_bytes

    from megablock.diffusion.batch import build_batch
    from megablock.diffusion.layout import ContextShard
    from megablock.diffusion.loss import LossWeights, loss_positions
    from megablock.model.config import ModelConfig
    from megablock.model.transformer import BlockDiffusionLM
    from megablock.parallel.state import initialize_parallel
    from megablock.training.engine import DiffusionObjective
    from megablock.training.memory import estimate

    cfg = make_config(seq_len, world, impl, layers, device)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    info = initialize_parallel(1, 1, dev, cp=world)
    m = ModelConfig(**cfg.model.architecture)
    torch.manual_seed(0)
    model = BlockDiffusionLM(m, info).to(dev)
    shard = ContextShard(world, info.cp_rank, info.cp_group, impl) if world > 1 else None
    objective = DiffusionObjective(model, LossWeights.from_config(cfg), drop_unmasked=False, context=shard)
    x0 = torch.randint(0, m.mask_token_id, (1, seq_len), generator=torch.Generator().manual_seed(1))
    batch = build_batch(x0, torch.arange(1), 16, cfg.diffusion, mask_token_id=m.mask_token_id, seed=2).to(dev)

    def step():
        loss = objective(batch)[0]
        loss.backward()
        model.zero_grad(set_to_none=True)

    def peak(fn):
        if device != "cuda":
            return peak_tensor_bytes(fn)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - before

    step()
    measured = peak(step)
    held = []
    forward = peak(lambda: held.append(objective(batch)[0]))  # what the forward keeps, and its transients
    held.pop().backward()
    model.zero_grad(set_to_none=True)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    n_loss = int(loss_positions(batch.diff_weights, batch.ar_weights, 0.5).numel())
    est = estimate(cfg, m, dp=1, loss_tokens=n_loss)[0]
    p = est.parts
    step_estimate = (max(est.activations + p["head_grads"], est.gradients)
                     + max(p["logits_chunk"], p["layer_workspace"]))
    forward_estimate = est.activations  # what autograd keeps, the loss's logits included
    return {"measured": measured, "estimate": step_estimate, "forward": forward, "forward_estimate": forward_estimate,
            "times": times}


def run_case(label, cp, impl, seq_len, layers, repeats, device) -> dict:
    from common import stats

    from megablock.testing import run_distributed

    res = run_distributed(_measure, cp, seq_len, impl, layers, repeats, device)[0]
    res.update(label=label, cp=cp, impl=impl if cp > 1 else "-", seq_len=seq_len, **stats(res["times"]))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: one GPU per rank, NCCL (needs two GPUs)")
    args = p.parse_args(argv)
    from common import MiB, machine_note, table

    rows = []
    for L in args.seq_lens:
        for label, cp, impl in CASES:
            rows.append(run_case(label, cp, impl, L, args.layers, args.repeats, args.device))
            print(f"  {label} at L = {L}: {rows[-1]['measured'] / MiB:.0f} MiB, best {rows[-1]['min_s']:.2f} s",
                  file=sys.stderr, flush=True)
    for r in rows:
        base = next(b for b in rows if b["seq_len"] == r["seq_len"] and b["cp"] == 1)
        r.update(m=r["measured"] / MiB, e=r["estimate"] / MiB, ratio=r["estimate"] / r["measured"],
                 vs_cp1=r["measured"] / base["measured"], f=r["forward"] / MiB, fe=r["forward_estimate"] / MiB,
                 f_vs_cp1=r["forward"] / base["forward"])
    print(f"SmolLM2-135M layer shape x {args.layers} layers, B = 16, micro-batch 1, fp32, recompute none, "
          f"{args.device}; machine: {machine_note()}")
    print(table(rows, [("case", "label", "{}"), ("L", "seq_len", "{}"), ("forward MiB", "f", "{:.0f}"),
                       ("vs CP 1", "f_vs_cp1", "{:.3f}"), ("estimate", "fe", "{:.0f}"), ("step peak MiB", "m", "{:.0f}"),
                       ("vs CP 1", "vs_cp1", "{:.3f}"), ("estimate MiB", "e", "{:.0f}"),
                       ("est/meas", "ratio", "{:.3f}"), ("best s", "min_s", "{:.2f}"), ("median s", "median_s", "{:.2f}")]))
    print(json.dumps({"benchmark": "context_parallel", "layers": args.layers, "device": args.device,
                      "cases": [{k: v for k, v in r.items() if k not in ("m", "e", "f", "fe")} for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

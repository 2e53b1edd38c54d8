#!/usr/bin/env python
"""Cost of one training forward+backward: AR vs block diffusion (fast path) vs a dense mask.

    python benchmarks/train_step.py                          # 12 layers, L = 512 and 2048
    python benchmarks/train_step.py --lengths 256 --layers 2 --hidden 128 --repeats 2   # quick
    python benchmarks/train_step.py --profile                # + torch.profiler op table at max L

Model: BlockDiffusionLM, random init, 12 layers, hidden 512, intermediate 1408, 8 heads / 2 KV
heads (GQA), vocab 32000 (untied head), fp32, batch 1, torch.set_num_threads(2). Per L:
  (a) ar     : an AR step on L tokens (AttentionLayout "ar"; build_batch with B = 1),
  (b) sdpa   : a block-diffusion step, B = 16, context_causal, [xt ; x0] = 2L tokens, attention
               impl "sdpa" (the exact CPU fast path),
  (c) dense  : the same batch with impl "dense" (SDPA with the 2L x 2L bool mask),
  (d) gated  : (--configs ... gated) the gated drafter's step on (b)'s batch: a second model,
               frozen, with LoRA rank --lora-rank on every linear gated to the noised half
               (lora.scope=noised), lambda = 0, the clean half run once without autograd
               (lora.clean_pass=cached). Compared with (b), the full-model step (issue 23's target:
               <= 0.6x in time and in tensor peak at L = 2048).
A step is forward -> block_diffusion_loss (on a real DiffusionBatch from build_batch) -> backward.
Batches (noise, masks of the batch) are built outside the timed region; gradients are reset to
None before every step (untimed), so each step allocates its gradients like a training step.

Time: one warm-up round, then --repeats rounds; a round runs (a), (b), (c) back to back on the
same model (interleaved: load from other processes hits all three alike). Wall seconds (min and
median; the ratios and the target use the min); "cores" = CPU seconds / wall seconds of the
fastest run (~2 when it had both cores; less: other jobs took them, see benchmarks/common.py).

Memory: each (config, L) in a fresh subprocess (benchmarks/common.py explains both numbers):
  - "tensor peak": peak bytes allocated through torch's CPU allocator during one step above
    the level before it (activations, saved tensors, logits and loss temporaries, attention
    workspaces, the gradients), from torch.profiler's memory events. The ratios use this.
  - "RSS delta": peak RSS during a step (VmHWM, reset just before) minus the RSS before it.
Both after one warm-up step, with the gradients reset to None before the measured step.

Breakdown (same interleaving): the attention call alone (fwd+bwd on random q, k, v of the
step's shapes, times the number of layers) and the head + loss alone (final norm, vocabulary
projection, cross-entropy, fwd+bwd); "rest" = step - attention - head/loss (linears, norms,
RoPE, embedding, ...).

Prints a table, then one JSON object on the last line: per-L results and the ratios b/a and c/a
in time (min) and tensor peak memory. Targets at L = 2048 (issue 17): b/a <= 2.0 in time (loss
logits only where a loss is let the head cost less than twice AR's) and <= 2.0 in peak memory
without recompute; with --recompute full, (b)'s peak <= AR's peak without recompute (compare two
runs). The SmolLM2-135M shape: --layers 30 --hidden 576 --intermediate 1536 --heads 9
--kv-heads 3 --vocab 49152.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

from common import (  # noqa: E402
    MiB, init_single_process, interleaved, machine_note, peak_tensor_bytes, rss_peak_delta,
    run_worker, setup_cpu, stats, table,
)

CONFIGS = ("ar", "sdpa", "dense", "gated")
LABEL = {"ar": "(a) AR, L tokens", "sdpa": "(b) BD sdpa, 2L", "dense": "(c) BD dense, 2L",
         "gated": "(d) gated drafter, 2L"}
DEFAULT_CONFIGS = ("ar", "sdpa", "dense")
VOCAB = 32000
MASK_ID = VOCAB - 1
TARGET_TIME, TARGET_MEM = 2.0, 2.0  # issue 17, at L = 2048
GATED_TARGET = 0.6  # issue 23: the gated step against the full-model step (b), time and tensor peak


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the per-config memory subprocesses")
    p.add_argument("--no-timing", action="store_true",
                   help="memory only (byte counts do not depend on machine load; time them on a quiet machine)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the attention / head+loss timings")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler op table for (a) and (b) at the largest L ((b) and (d) with --configs ... gated)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(DEFAULT_CONFIGS),
                   help="which steps to run (the AR step is always run: the ratios need it)")
    p.add_argument("--loss", choices=["selected", "full"], default="selected",
                   help="selected: the head and CE only at loss positions, in chunks (training's path); "
                        "full: logits of all positions (the reference, and the path before issue 17)")
    p.add_argument("--loss-chunk-tokens", type=int, default=8192, help="train.loss_chunk_tokens (0: one piece)")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none", help="train.recompute")
    p.add_argument("--keep-unmasked-blocks", action="store_true",
                   help="train.drop_unmasked_blocks=false: (b) and (c) carry every noised block")
    p.add_argument("--ar-loss-weight", type=float, default=1.0,
                   help="lambda (0: the clean half reaches the head only where it predicts a block's first token)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: bf16 weights, compiled FlexAttention, peak memory from torch.cuda, MFU")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--lora-rank", type=int, default=64, help="(d): rank of the gated LoRA (alpha = 2 x rank)")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--worker-length", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model(args, gated: bool = False):
    """The benchmark model; `gated`: frozen, with LoRA on every linear gated to the noised half."""
    import torch
    from megablock.model.config import ModelConfig
    from megablock.model.transformer import BlockDiffusionLM

    if gated:
        from megablock.config import LoraSection
        from megablock.model.lora import apply_lora

        model = build_model(args)
        apply_lora(model, LoraSection(enabled=True, rank=args.lora_rank, alpha=2.0 * args.lora_rank, scope="noised"))
        return model

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
        mask_token_id=args.vocab - 1, max_position_embeddings=max(args.lengths + [args.worker_length or 0]),
    )
    if args.device == "cuda":
        return BlockDiffusionLM(cfg, dtype=torch.bfloat16).cuda()
    return BlockDiffusionLM(cfg)


def make_batch(config: str, L: int, block_size: int, args=None):
    import torch
    from megablock.diffusion.batch import build_batch

    vocab = args.vocab if args is not None else VOCAB
    g = torch.Generator().manual_seed(L)
    x0 = torch.randint(0, vocab - 1, (1, L), generator=g)
    batch = build_batch(x0, [0], 1 if config == "ar" else block_size, mask_token_id=vocab - 1,
                        attention="context_causal", seed=1)
    return batch.to("cuda") if args is not None and args.device == "cuda" else batch


def step_fn(model, config: str, batch, args):
    from megablock.diffusion.loss import block_diffusion_loss
    from megablock.diffusion.loss import LossWeights
    from megablock.training.engine import DiffusionObjective

    impl = "dense" if config == "dense" else ("auto" if args.device == "cuda" else "sdpa")
    lam = 0.0 if config == "gated" else args.ar_loss_weight  # the gated drafter has no AR loss to train
    objective = DiffusionObjective(model, LossWeights(lam, chunk_tokens=args.loss_chunk_tokens),
                                   drop_unmasked=not args.keep_unmasked_blocks,
                                   clean_pass="cached" if config == "gated" else "joint")

    def step():
        model.set_attention_impl(impl)
        model.set_recompute(args.recompute)
        if args.loss == "full":
            logits = model(batch.input_ids, batch.position_ids, batch.layout)
            parts = block_diffusion_loss(logits, batch.targets, batch.diff_weights, batch.ar_weights,
                                         batch.diff_normalizer, lam)
            loss = parts.loss
        else:
            loss = objective(batch)[0]
        loss.backward()
        return loss.item()

    return step


def zero_grad(*models):
    def before(_name=None):
        for model in models:
            model.zero_grad(set_to_none=True)
        gc.collect()

    return before


# ---------------------------------------------------------------------------------------------
# pieces of a step, for the breakdown


def attention_fn(cfg, config: str, batch):
    """fwd+bwd of one attention call with the step's shapes (random q, k, v)."""
    import torch
    from megablock.diffusion.attention import attend

    S = batch.layout.total_len
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, cfg.num_attention_heads, S, cfg.head_dim, generator=g, requires_grad=True)
    k = torch.randn(1, cfg.num_kv_heads, S, cfg.head_dim, generator=g, requires_grad=True)
    v = torch.randn(1, cfg.num_kv_heads, S, cfg.head_dim, generator=g, requires_grad=True)
    grad = torch.randn(1, cfg.num_attention_heads, S, cfg.head_dim, generator=g)
    impl = "dense" if config == "dense" else "sdpa"

    def run():
        q.grad = k.grad = v.grad = None
        attend(q, k, v, batch.layout, impl=impl).backward(grad)

    return run


def head_loss_fn(model, batch, args):
    """fwd+bwd of final norm + vocabulary projection + the loss (as the step computes it)."""
    import torch
    from megablock.diffusion.loss import block_diffusion_loss, selected_block_diffusion_loss

    S = batch.layout.total_len
    w = model.final_layernorm.weight
    hidden = torch.randn(1, S, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(w.device, w.dtype).requires_grad_()
    lam = args.ar_loss_weight

    def run():
        hidden.grad = None
        if args.loss == "full":
            parts = block_diffusion_loss(model.head(hidden), batch.targets, batch.diff_weights, batch.ar_weights,
                                         batch.diff_normalizer, lam)
        else:
            parts = selected_block_diffusion_loss(hidden, model.head, batch.targets, batch.diff_weights,
                                                  batch.ar_weights, batch.diff_normalizer, lam, args.loss_chunk_tokens)
        parts.loss.backward()

    return run


# ---------------------------------------------------------------------------------------------
# memory worker (fresh process per config)


def worker(args) -> dict:
    setup_cpu(args.threads)
    init_single_process()
    model = build_model(args, gated=args.worker == "gated")
    L = args.worker_length
    batch = make_batch(args.worker, L, args.block_size, args)
    step = step_fn(model, args.worker, batch, args)
    step()  # warm-up: code, thread pools and the layout's cached plan are resident afterwards
    zero_grad(model)()
    rss = rss_peak_delta(step)
    zero_grad(model)()
    tensor_peak = peak_tensor_bytes(step)
    return {"config": args.worker, "L": L, "tensor_peak_mib": tensor_peak / MiB, **rss}


def measure_memory(args, config: str, L: int) -> dict:
    argv = [os.path.abspath(__file__), "--worker", config, "--worker-length", L,
            "--layers", args.layers, "--hidden", args.hidden, "--intermediate", args.intermediate,
            "--heads", args.heads, "--kv-heads", args.kv_heads, "--block-size", args.block_size,
            "--threads", args.threads, "--lengths", *args.lengths, "--loss", args.loss,
            "--loss-chunk-tokens", args.loss_chunk_tokens, "--recompute", args.recompute,
            "--ar-loss-weight", args.ar_loss_weight, "--vocab", args.vocab]
    if args.keep_unmasked_blocks:
        argv.append("--keep-unmasked-blocks")
    return run_worker(argv)


def cuda_memory(model, step) -> dict:
    """Peak CUDA bytes allocated during one step above what was allocated before it."""
    import torch

    zero_grad(model)()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return {"tensor_peak_mib": (torch.cuda.max_memory_allocated() - before) / MiB, "rss_delta_mib": float("nan"),
            "rss_peak_mib": float("nan")}


# ---------------------------------------------------------------------------------------------
# profile


def profile_ops(model, steps: dict, top: int = 14) -> str:
    """Self CPU seconds per op for each step (one profiled run each), side by side."""
    from torch.profiler import ProfilerActivity, profile

    per = {}
    for name, (step, before) in steps.items():
        before()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        per[name] = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    names = list(steps)
    keys = sorted(set().union(*per.values()), key=lambda k: -max(p.get(k, 0) for p in per.values()))[:top]
    rows = []
    for k in keys:
        row = {"op": k[:58]}
        for n in names:
            row[n] = per[n].get(k, 0.0)
        if len(names) == 2 and per[names[0]].get(k):
            row["ratio"] = per[names[1]].get(k, 0.0) / per[names[0]][k]
        rows.append(row)
    total = {"op": "total (self CPU)", **{n: sum(per[n].values()) for n in names}}
    if len(names) == 2:
        total["ratio"] = total[names[1]] / total[names[0]]
    rows.append(total)
    cols = [("op", "op", "{}")] + [(f"{n} s", n, "{:.3f}") for n in names]
    if len(names) == 2:
        cols.append(("ratio", "ratio", "{:.2f}"))
    return table(rows, cols)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    setup_cpu(args.threads)
    init_single_process()
    model = build_model(args)
    cfg = model.cfg
    peak = None
    if args.device == "cuda":
        from megablock.model.params import training_flops
        from megablock.training.metrics import device_peak_flops

        peak = device_peak_flops()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
          f"{cfg.num_attention_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}, "
          f"{n_params / 1e6:.1f}M params, {'bf16 on ' + args.device if args.device == 'cuda' else 'fp32'}, batch 1, "
          f"B = {args.block_size}")
    print(f"machine: {machine_note()}; warm-up 1 + {args.repeats} interleaved repeats")

    configs = ["ar"] + [c for c in CONFIGS if c in args.configs and c != "ar"]
    models = {c: model for c in configs}
    if "gated" in configs:
        models["gated"] = build_model(args, gated=True)
    dropping = args.loss == "selected" and not args.keep_unmasked_blocks  # the full-logits path carries 2L
    print(f"loss: {args.loss} (chunk {args.loss_chunk_tokens}), recompute: {args.recompute}, "
          f"lambda {args.ar_loss_weight}, noised blocks without a mask {'dropped' if dropping else 'kept'}")
    results, ratios, rows, brows = {}, {}, [], []
    for L in args.lengths:
        batches = {c: make_batch(c, L, args.block_size, args) for c in configs}
        steps = {c: step_fn(models[c], c, batches[c], args) for c in configs}
        nan = float("nan")
        res = {c: {"tokens": batches[c].layout.total_len, "min_s": nan, "median_s": nan, "cores": nan}
               for c in configs}
        if not args.no_timing:
            cpu = {}
            times = interleaved(steps, args.repeats, warmup=1, before=zero_grad(*set(models.values())), cpu=cpu)
            res = {c: {"tokens": batches[c].layout.total_len, **stats(times[c], cpu[c])} for c in configs}

        if not args.no_breakdown and not args.no_timing:
            parts = {}
            for c in (c for c in configs if c != "gated"):  # (d) has no attention call of its own shape
                parts[f"attn_{c}"] = attention_fn(cfg, c, batches[c])
                parts[f"head_{c}"] = head_loss_fn(model, batches[c], args)
            pt = interleaved(parts, args.repeats, warmup=1, before=zero_grad(model))
            for c in (c for c in configs if c != "gated"):
                attn = min(pt[f"attn_{c}"]) * cfg.num_layers
                head = min(pt[f"head_{c}"])
                res[c].update(attention_s=attn, head_loss_s=head, rest_s=res[c]["min_s"] - attn - head)
                brows.append({"L": L, "config": LABEL[c], "step": res[c]["min_s"], "attn": attn,
                              "head": head, "rest": res[c]["rest_s"],
                              "attn_x": attn / res["ar"]["attention_s"] if "attention_s" in res["ar"] else None,
                              "head_x": head / res["ar"]["head_loss_s"] if "head_loss_s" in res["ar"] else None,
                              "rest_x": res[c]["rest_s"] / res["ar"]["rest_s"] if "rest_s" in res["ar"] else None})

        if args.device == "cuda":
            for c in configs:
                res[c].update(cuda_memory(model, steps[c]))
                flops = training_flops(cfg, batches[c].layout.total_len, L, batches[c].layout.two_halves)
                res[c]["tokens_per_s"] = L / res[c]["min_s"]
                res[c]["mfu"] = flops / res[c]["min_s"] / peak if peak else None
                print(f"  L={L} {c}: {res[c]['min_s'] * 1e3:.1f} ms, {res[c]['tokens_per_s']:.0f} clean tokens/s, "
                      f"MFU {res[c]['mfu'] if res[c]['mfu'] is None else round(res[c]['mfu'], 3)}, "
                      f"peak {res[c]['tensor_peak_mib']:.0f} MiB above weights", flush=True)
        elif not args.no_memory:
            for c in configs:
                mem = measure_memory(args, c, L)
                res[c].update(tensor_peak_mib=mem["tensor_peak_mib"], rss_delta_mib=mem["rss_delta_mib"],
                              rss_peak_mib=mem["rss_peak_mib"])

        a = res["ar"]
        ratios[L] = {}
        for c, tag, ref in (("sdpa", "b/a", "ar"), ("dense", "c/a", "ar"), ("gated", "d/b", "sdpa")):
            if c not in res or ref not in res:
                continue
            r = res[ref]
            ratios[L][f"{tag}_time"] = res[c]["min_s"] / r["min_s"]
            ratios[L][f"{tag}_time_median"] = res[c]["median_s"] / r["median_s"]
            if "tensor_peak_mib" in r:
                ratios[L][f"{tag}_memory"] = res[c]["tensor_peak_mib"] / r["tensor_peak_mib"]
                ratios[L][f"{tag}_rss"] = res[c]["rss_delta_mib"] / r["rss_delta_mib"]
        for c in configs:
            r = res[c]
            rows.append({"L": L, "config": LABEL[c], "tokens": r["tokens"], "min": r["min_s"],
                         "median": r["median_s"], "cores": r["cores"],
                         "tmem": r.get("tensor_peak_mib"),
                         "rss": r.get("rss_delta_mib"),
                         "t_x": r["min_s"] / a["min_s"],
                         "m_x": r["tensor_peak_mib"] / a["tensor_peak_mib"] if "tensor_peak_mib" in r else None})
        results[L] = res
        print(f"L = {L} done", flush=True)

    print()
    print(table(rows, [("L", "L", "{}"), ("config", "config", "{}"), ("tokens", "tokens", "{}"),
                       ("min s", "min", "{:.2f}"), ("median s", "median", "{:.2f}"),
                       ("cores", "cores", "{:.2f}"), ("x AR time", "t_x", "{:.2f}"),
                       ("tensor peak MiB", "tmem", "{:.0f}"),
                       ("x AR mem", "m_x", "{:.2f}"), ("RSS delta MiB", "rss", "{:.0f}")]))
    if brows:
        print("\nbreakdown (seconds, min over repeats; x = relative to the AR step's same part):")
        print(table(brows, [("L", "L", "{}"), ("config", "config", "{}"), ("step", "step", "{:.2f}"),
                            ("attention", "attn", "{:.2f}"), ("x", "attn_x", "{:.2f}"),
                            ("head+loss", "head", "{:.2f}"), ("x", "head_x", "{:.2f}"),
                            ("rest", "rest", "{:.2f}"), ("x", "rest_x", "{:.2f}")]))

    L_max = max(args.lengths)
    if args.profile:  # (a) against (b), or with (d) the full-model step against the gated one
        pair = ("sdpa", "gated") if "gated" in configs else ("ar", "sdpa")
        batches = {c: make_batch(c, L_max, args.block_size, args) for c in pair}
        prof_steps = {c: (step_fn(models[c], c, batches[c], args), zero_grad(models[c])) for c in pair}
        for s, b in prof_steps.values():  # warm
            b()
            s()
        print(f"\ntorch.profiler, one step each at L = {L_max} (self CPU seconds per op):")
        print(profile_ops(model, prof_steps))

    target = None
    if 2048 in ratios and not args.no_timing:
        r = ratios[2048]
        target = {"b/a_time_at_2048": r["b/a_time"], "time_target": TARGET_TIME,
                  "time_met": r["b/a_time"] <= TARGET_TIME}
        if "b/a_memory" in r:
            target.update({"b/a_memory_at_2048": r["b/a_memory"], "memory_target": TARGET_MEM,
                           "memory_met": r["b/a_memory"] <= TARGET_MEM})
        print(f"\ntarget at L = 2048: b/a time {r['b/a_time']:.2f} (<= {TARGET_TIME}: "
              f"{'met' if target['time_met'] else 'MISSED'})"
              + (f", b/a memory {r['b/a_memory']:.2f} (<= {TARGET_MEM}: "
                 f"{'met' if target['memory_met'] else 'MISSED'})" if "b/a_memory" in r else ""))
    if 2048 in ratios and "d/b_time" in ratios[2048]:
        r = ratios[2048]
        target = {**(target or {}), "d/b_time_at_2048": r["d/b_time"], "d/b_time_median_at_2048": r["d/b_time_median"],
                  "gated_target": GATED_TARGET, "gated_time_met": r["d/b_time"] <= GATED_TARGET}
        line = (f"gated drafter vs full-model step at L = 2048: time {r['d/b_time']:.2f} best "
                f"({r['d/b_time_median']:.2f} median)")
        if "d/b_memory" in r:
            target.update({"d/b_memory_at_2048": r["d/b_memory"], "gated_memory_met": r["d/b_memory"] <= GATED_TARGET})
            line += f", tensor peak {r['d/b_memory']:.2f}"
        print(f"{line} (target <= {GATED_TARGET} each)")
    print(json.dumps({
        "benchmark": "train_step",
        "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_kv_heads, "vocab": cfg.vocab_size,
                  "params": n_params},
        "block_size": args.block_size, "repeats": args.repeats, "threads": args.threads,
        "loss": args.loss, "loss_chunk_tokens": args.loss_chunk_tokens, "recompute": args.recompute,
        "drop_unmasked_blocks": dropping,
        "ar_loss_weight": args.ar_loss_weight,
        "results": {str(L): v for L, v in results.items()},
        "ratios": {str(L): v for L, v in ratios.items()},
        "target": target,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

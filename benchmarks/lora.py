"""Benchmark: a LoRA training step vs a full-model training step (same NBDiff objective).

Model: the quickstart architecture (SmolLM2-135M shape: 30 layers, hidden 576, 9/3 heads,
MLP 1536, vocab 49152 + the mask token, tied embeddings) with random weights; L = 256 clean
tokens per sample at block size 4 (the model sees 2L = 512 tokens), micro-batch 1.
One step = forward + backward + torch AdamW step over the trainable parameters
(megablock.training.optim, as the trainer uses it without DeepSpeed's wrappers).

Each mode runs in its own child process, so its peak memory is its own. On CPU: the peak RSS
during the training steps (Linux VmHWM, reset after the model and optimizer are built, so it
is model + optimizer + activations + gradients at their highest) and the child's lifetime peak
(os.wait4's ru_maxrss), with glibc told to return large blocks to the system at once
(MALLOC_MMAP_THRESHOLD_) so that RSS follows live tensors; on GPU torch.cuda.max_memory_allocated.
Also reported, exactly: the model-state bytes (weights + gradients + Adam moments) and the
activations saved for backward (autograd saved-tensor hooks, parameters excluded), trainable
parameter counts, seconds per step
(median), tokens/s (clean tokens, as metrics.jsonl counts them) and CPU seconds per step. CPU
runs use --threads 1 by default: on a shared 2-core machine OpenMP threads that spin while
waiting for a busy core inflate both wall and CPU time.

    python benchmarks/lora.py [--seq-len 256] [--steps 3] [--rank 64] [--device cpu|cuda] [--threads N]

Prints a table, then one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_135M = dict(
    arch="llama", vocab_size=49153, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_attention_heads=9, num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
    max_position_embeddings=8192, tie_word_embeddings=True, mask_token_id=49152,
)


def child(args) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    import torch

    from megablock.config import LoraSection, TrainSection
    from megablock.diffusion.batch import build_batch
    from megablock.diffusion.loss import block_diffusion_loss
    from megablock.model.config import ModelConfig
    from megablock.model.lora import apply_lora
    from megablock.model.params import parameter_count
    from megablock.model.transformer import BlockDiffusionLM
    from megablock.parallel.state import initialize_parallel
    from megablock.training.optim import build_optimizer

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = initialize_parallel(1, 1, device)
    torch.manual_seed(0)
    cfg = ModelConfig(**SMOLLM2_135M)
    model = BlockDiffusionLM(cfg, info, initialize=True)
    lora = LoraSection(enabled=args.mode == "lora", rank=args.rank, alpha=2.0 * args.rank)
    if lora.enabled:
        apply_lora(model, lora, seed=0)
    model.to(device)
    trainable, total = parameter_count(cfg, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model.named_parameters(), TrainSection(lr=1e-4, steps=100), info, own_clipping=True)
    tokens = torch.randint(0, cfg.vocab_size - 1, (args.micro_batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    batch = build_batch(tokens, torch.arange(args.micro_batch), args.block_size, mask_token_id=cfg.mask_token_id, seed=3).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        rss_before = _proc_status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    walls, cpus, losses, activations = [], [], [], []
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    for step in range(args.warmup + args.steps):
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(batch.input_ids, batch.position_ids, batch.layout)
            parts = block_diffusion_loss(logits, batch.targets, batch.diff_weights, batch.ar_weights, batch.diff_normalizer, 0.5)
        activations.append(sum(saved.values()))
        parts.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        losses.append(float(parts.loss))
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes += sum(p.numel() * p.element_size() for p in params) * 3  # gradient + Adam exp_avg, exp_avg_sq
    out = {
        "mode": args.mode, "trainable": trainable, "total": total, "state_mib": state_bytes / 2**20,
        "activations_mib": max(activations) / 2**20,
        "step_s": statistics.median(walls), "cpu_s_per_step": statistics.median(cpus),
        "tokens_per_s": args.micro_batch * args.seq_len / statistics.median(walls), "losses": losses,
        "optimizer_tensors": sum(len(s) > 0 for s in optimizer.state.values()),
    }
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["step_peak_rss_mib"] = _proc_status("VmHWM")
        out["rss_before_steps_mib"] = rss_before
    return out


def _proc_status(key: str) -> float:
    """A /proc/self/status memory line (kB) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def run_child(argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "1048576"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"child {' '.join(argv)} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, torch's own on GPU)")
    p.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return 0
    common = ["--seq-len", str(args.seq_len), "--block-size", str(args.block_size), "--micro-batch", str(args.micro_batch),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank), "--device", args.device,
              "--threads", str(args.threads or 0)]
    rows = {mode: run_child(["--child", mode, *common]) for mode in ("full", "lora")}
    mem_key = "peak_mib" if args.device == "cuda" else "step_peak_rss_mib"
    threads = f", {args.threads} thread(s)" if args.threads else ""
    print(f"SmolLM2-135M shape, L={args.seq_len} (2L in the model), block size {args.block_size}, "
          f"micro-batch {args.micro_batch}, {args.device}{threads}, torch AdamW; LoRA rank {args.rank}, alpha {2 * args.rank}")
    print(f"{'mode':6} {'trainable':>12} {'of total':>12} {'state MiB':>10} {'activ. MiB':>10} {'peak MiB':>9} "
          f"{'(process)':>9} {'s/step':>7} {'CPU s/step':>10} {'tokens/s':>9}")
    for mode, r in rows.items():
        print(f"{mode:6} {r['trainable']:>12,} {r['total']:>12,} {r['state_mib']:>10.0f} {r['activations_mib']:>10.0f} "
              f"{r[mem_key]:>9.0f} "
              f"{r['peak_rss_mib'] if args.device == 'cpu' else float('nan'):>9.0f} "
              f"{r['step_s']:>7.2f} {r['cpu_s_per_step']:>10.2f} {r['tokens_per_s']:>9.1f}")
    full, lora = rows["full"], rows["lora"]
    print(f"LoRA vs full: {lora['trainable'] / full['trainable']:.2%} of the trainable parameters, peak memory "
          f"x{lora[mem_key] / full[mem_key]:.2f}, model state x{lora['state_mib'] / full['state_mib']:.2f}, "
          f"tokens/s x{lora['tokens_per_s'] / full['tokens_per_s']:.2f}")
    result = {
        "model": "SmolLM2-135M shape (random weights)", "seq_len": args.seq_len, "block_size": args.block_size,
        "micro_batch": args.micro_batch, "device": args.device, "threads": args.threads, "rank": args.rank,
        "memory": mem_key,
        **{f"{mode}_{k}": r[k] for mode, r in rows.items()
           for k in ("trainable", "total", "state_mib", "activations_mib", mem_key, "peak_rss_mib", "rss_before_steps_mib", "step_s",
                     "cpu_s_per_step", "tokens_per_s") if k in r},
        "peak_memory_ratio": lora[mem_key] / full[mem_key], "tokens_per_s_ratio": lora["tokens_per_s"] / full["tokens_per_s"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

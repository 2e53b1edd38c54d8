"""The quickstart pipeline end to end on a tiny random model, every step a subprocess of the real
tool, in the order scripts/quickstart.sh runs them: convert -> preprocess -> train (block size
1 -> 2 -> 4) -> export -> generate -> evaluate (B = 4 and B = 1) -> plot.

scripts/quickstart.sh itself runs the same tools on SmolLM2-135M (minutes, and it sets up .venv);
this test keeps the commands honest in well under 2 minutes. Training is one plain `python`
process (no launcher, ~20 s saved) on examples/configs/tiny.yaml.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megablock.testing import save_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def tool(*args, timeout=300) -> str:
    proc = subprocess.run([sys.executable, *map(str, args)], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_quickstart_pipeline_on_a_tiny_model(tmp_path):
    qs = tmp_path / "quickstart"
    save_tiny_hf_model(tmp_path / "hf_source", "llama")

    tool("tools/convert_hf.py", "--hf-dir", tmp_path / "hf_source", "--out", qs / "base", "--quiet")
    meta = json.loads((qs / "base" / "megablock.json").read_text())
    assert meta["mask_token_id"] is not None

    tool("tools/preprocess_data.py", "--input", "examples/data/shakespeare_sample.txt.gz",
         "--tokenizer", qs / "base" / "tokenizer", "--output-prefix", qs / "data" / "shakespeare", "--quiet")

    run = qs / "run"
    tool("examples/pretrain_nbdiff.py", "--config", "examples/configs/tiny.yaml", "--set",
         f"model.init_from={qs / 'base'}", f"data.prefix={qs / 'data' / 'shakespeare'}",
         f"checkpoint.save_dir={run}", "checkpoint.resume=true", f"data.cache_dir={qs / 'data' / 'cache'}")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["block_size"] for m in metrics] == [1, 1, 2, 2, 4, 4]
    assert (run / "latest").read_text().strip() == "step_0000006"
    losses = [m[k] for m in metrics for k in ("loss", "diffusion_loss", "ar_loss")]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    # The AR loss (clean half, the same objective at every block size) falls as the model trains.
    assert metrics[-1]["ar_loss"] < metrics[0]["ar_loss"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and all("val_nelbo" in metrics[i] for i in (2, 5))

    tool("tools/export_hf.py", "--ckpt", run, "--out", qs / "hf", "--quiet")
    config = json.loads((qs / "hf" / "config.json").read_text())
    assert config["block_size"] == 4 and config["mask_token_id"] == meta["mask_token_id"]

    gen = last_json(tool("tools/generate.py", "--hf-dir", qs / "hf", "--prompt", "To be, or not to be",
                         "--max-new-tokens", "8", "--block-size", "4", "--json"))
    # Eight new tokens (the tiny model emits no EOS on this prompt), each block of 4 costing at
    # least one refinement forward and one append, after one prefill.
    assert gen["new_tokens"] == 8 and isinstance(gen["text"], str) and gen["text"]
    assert 1 + 2 * 2 <= gen["forwards"] <= 1 + 2 * 4 + 1

    common = ["--data", qs / "data" / "shakespeare", "--seq-len", "32", "--max-tokens", "512", "--json"]
    b4 = last_json(tool("tools/evaluate.py", "--ckpt", run, *common, "--block-size", "4", "--samples", "2",
                        "--generate", "--gen-prompts", "2", "--gen-tokens", "8", "--gen-prompt-len", "8"))
    b1 = last_json(tool("tools/evaluate.py", "--hf-dir", qs / "hf", *common, "--block-size", "1"))
    assert b4["block_size"] == 4 and b4["windows"] == 16 and b4["gen_new_tokens"] == 16
    assert 0 < b4["gen_tokens_per_forward"] <= 4
    # Plausible numbers: a bound above zero, its perplexity exp(bound), and an AR NLL between a
    # perfect model's 0 and a little over the uniform guess over the vocabulary.
    vocab = meta["vocab_size"]
    for r in (b4, b1):
        assert 0 < r["ar_nll"] < math.log(vocab) + 1 and 0 < r["nelbo"] < 3 * math.log(vocab)
        assert r["ppl_bound"] == pytest.approx(math.exp(r["nelbo"]), rel=1e-6)
    # The B = 1 bound is the AR NLL, and the same weights give it from --ckpt (B = 4 run) and the export.
    assert b1["nelbo"] == b1["ar_nll"] == pytest.approx(b4["ar_nll"], rel=1e-6)

    out = tool("tools/plot_metrics.py", run, "--out", qs / "plots")
    assert "metrics.png" in out
    for name in ("metrics", "loss", "losses", "block_size", "val_nelbo", "tokens_per_s"):
        png = qs / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_quickstart_script_is_valid_bash():
    for script in ("scripts/quickstart.sh", "scripts/setup_env.sh"):
        proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    text = (ROOT / "scripts" / "quickstart.sh").read_text()
    # The script must use the fixed interfaces it documents.
    for needle in ("tools/convert_hf.py --gguf", "tools/preprocess_data.py", "examples/pretrain_nbdiff.py",
                   "quickstart_cpu.yaml", "tools/export_hf.py", "tools/generate.py", "tools/evaluate.py",
                   "tools/plot_metrics.py", "tools/lm_eval.py", "source scripts/setup_env.sh"):
        assert needle in text, needle


def test_plot_metrics_reads_resumed_and_partial_files(tmp_path):
    """A resumed run can log a step twice (the redo wins) and a killed run can leave half a line."""
    from megablock.commands import plot_metrics

    rec = lambda step, b, **kw: json.dumps({"step": step, "block_size": b, "loss": 1.0 / step, **kw})  # noqa: E731
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([rec(1, 1), rec(2, 2, val_nelbo=3.0), rec(2, 2, loss=9.0), rec(3, 4), '{"step": 4, "lo']))
    records = plot_metrics.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and records[1]["loss"] == 9.0
    assert plot_metrics.stage_changes(records) == [(2, 2), (3, 4)]
    assert plot_metrics.main([str(path), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "metrics.png").is_file()
    assert plot_metrics.main([str(tmp_path / "missing")]) == 1  # megablock.cli's exit-code convention
    path.write_text("not json\n" + rec(1, 1))
    assert plot_metrics.main([str(path)]) == 1
    # An adaptive-schedule run gets a panel with the searched interval and its variance.
    path.write_text("\n".join([rec(1, 1, clip_min=0.3, clip_max=0.8, loss_variance=0.5), rec(2, 4, clip_min=0.5, clip_max=1.0)]))
    assert plot_metrics.main([str(path), "--out", str(tmp_path / "adaptive")]) == 0
    assert (tmp_path / "adaptive" / "schedule.png").read_bytes()[:4] == b"\x89PNG"

"""End to end (issue 13): a used save_dir refuses a fresh run, and a resume with settings that
break exactness (another seq_len, another TP) fails with the key, both values and the fix
instead of continuing silently or raising DeepSpeed's `Missing key(s)`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megablock.testing import free_port, save_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "examples" / "pretrain_nbdiff.py"
CONFIG = ROOT / "examples" / "configs" / "tiny.yaml"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step run in SAVE (checkpoint at step 2)."""
    from megablock.checkpoint.convert import convert
    from megablock.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("resume_safety")
    save_tiny_hf_model(root / "hf", "llama")
    convert(root / "ckpt", hf_dir=root / "hf", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    preprocess([str(ROOT / "examples/data/shakespeare_sample.txt.gz")], str(root / "ckpt" / "tokenizer"),
               str(root / "data"), progress=False)
    proc = _train(root, "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _train(root, *extra, launcher=None):
    sets = [f"model.init_from={root / 'ckpt'}", f"data.prefix={root / 'data'}", f"checkpoint.save_dir={root / 'save'}",
            f"data.cache_dir={root / 'cache'}", "train.eval_interval=0", *extra]
    return subprocess.run([*(launcher or [sys.executable]), str(ENTRY), "--config", str(CONFIG), "--set", *sets],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_fresh_run_into_used_save_dir_is_refused(run):
    before = (run / "save" / "metrics.jsonl").read_text()
    proc = _train(run, "train.steps=2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "already holds a run" in proc.stderr and "checkpoint.resume=true" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run / "save" / "metrics.jsonl").read_text() == before  # the old run is untouched
    assert not (run / "save" / "run.lock").exists()  # released on the way out


def test_resume_with_other_seq_len_is_refused(run):
    proc = _train(run, "checkpoint.resume=true", "train.steps=3", "data.seq_len=64")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "data.seq_len: saved 32, this run 64" in proc.stderr and "--set data.seq_len=32" in proc.stderr
    assert [json.loads(x)["step"] for x in (run / "save" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_at_other_tp_names_the_key_not_deepspeed_keys(run):
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2",
                "--master_port", str(free_port())]
    proc = _train(run, "checkpoint.resume=true", "train.steps=3", "parallel.tensor=2", launcher=launcher)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "parallel.tensor: saved 1, this run 2" in out, out[-3000:]
    assert "Missing key" not in out and "size mismatch" not in out

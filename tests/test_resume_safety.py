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
    assert json.loads((root / "save" / "checkpoints.json").read_text()) == {"checkpoints": ["step_0000002"]}
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


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["planted", "truncated"])
def test_resume_does_not_unpickle_a_planted_deepspeed_state(run, tmp_path, damage):
    """Issue 25.5: an object planted in mp_rank_00_model_states.pt ran a command on resume (rc 0).
    DeepSpeed's files are loaded with weights_only=True; a truncated one is named (issue 25.10)."""
    import shutil

    import torch

    save = tmp_path / "save"
    shutil.copytree(run / "save", save)
    states = save / "step_0000002" / "deepspeed" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "PWNED"
    if damage == "planted":
        from megablock.training.checkpointing import deepspeed_safe_globals

        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            sd = torch.load(states, weights_only=True)
        sd["planted"] = _Planted(marker)
        torch.save(sd, states)
    else:
        states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    before = _files(save)
    proc = _train(run, "checkpoint.resume=true", "train.steps=3", f"checkpoint.save_dir={save}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not marker.exists(), "resume ran a command planted in the checkpoint"
    expected = "refusing to unpickle it" if damage == "planted" else "cannot be read"
    assert f"{states} " in proc.stderr and expected in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr
    assert _files(save) == before


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished 2-step LoRA run in SAVE on the base in ckpt/."""
    from megablock.checkpoint.convert import convert
    from megablock.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("lora_base")
    save_tiny_hf_model(root / "hf", "llama")
    save_tiny_hf_model(root / "other", "llama", seed=1)  # the same architecture, other weights
    convert(root / "ckpt", hf_dir=root / "hf", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    preprocess([str(ROOT / "examples/data/shakespeare_sample.txt.gz")], str(root / "ckpt" / "tokenizer"),
               str(root / "data"), progress=False)
    proc = _train(root, "train.steps=2", "lora.enabled=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_lora_resume_on_a_replaced_base_is_refused(lora_run):
    """Issue 25.1: `convert_hf.py --out BASE --force` of another model, then resume: the adapters
    would silently train on other weights."""
    from megablock.checkpoint.convert import convert

    save = lora_run / "save"
    assert json.loads((save / "step_0000002" / "base.json").read_text())["files"]["model/tp00_pp000.safetensors"]
    before = _files(save)
    convert(lora_run / "ckpt", hf_dir=lora_run / "other", mask_token="<|mask|>", force=True, progress=False,
            log=lambda *a: None)
    proc = _train(lora_run, "checkpoint.resume=true", "train.steps=3", "lora.enabled=true")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"model.init_from={lora_run / 'ckpt'} is not the base" in proc.stderr, proc.stderr[-3000:]
    assert "model/tp00_pp000.safetensors (other content)" in proc.stderr and "Traceback" not in proc.stderr
    assert _files(save) == before  # nothing trained, nothing saved, the lock released


def test_lora_base_check_accepts_a_copy_and_names_a_missing_shard(tmp_path):
    """A copy of the base (new mtimes, same bytes) is the same base; a lost shard is named."""
    from megablock.checkpoint.convert import convert
    from megablock.config import ConfigError
    from megablock.training.resume_check import BASE_FILE, base_fingerprint, check_base

    save_tiny_hf_model(tmp_path / "hf", "llama")
    convert(tmp_path / "base", hf_dir=tmp_path / "hf", progress=False, log=lambda *a: None)
    step = tmp_path / "step"
    step.mkdir()
    (step / BASE_FILE).write_text(json.dumps(base_fingerprint(tmp_path / "base")))
    import shutil

    shutil.copytree(tmp_path / "base", tmp_path / "copy", copy_function=shutil.copyfile)  # mtimes not kept
    assert check_base(step, tmp_path / "copy")["files"].keys() == {"megablock.json", "model/tp00_pp000.safetensors"}
    (tmp_path / "copy" / "model" / "tp00_pp000.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model/tp00_pp000.safetensors \(missing now\)"):
        check_base(step, tmp_path / "copy")

"""End-to-end training: parallel layouts agree, resume is exact, saves are safe.

One converted tiny checkpoint and one small real-text dataset serve every test. DeepSpeed
launches cost ~20 s each, so the parallel layouts share one single-process reference run.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megablock.testing import free_port, run_distributed, save_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "examples" / "pretrain_nbdiff.py"
CONFIG = ROOT / "examples" / "configs" / "tiny.yaml"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megablock.checkpoint.convert import convert
    from megablock.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("train")
    save_tiny_hf_model(root / "hf", "llama")
    convert(root / "ckpt", hf_dir=root / "hf", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    corpus = ROOT / "examples" / "data"
    inputs = sorted(str(p) for p in corpus.glob("*.txt.gz"))
    assert inputs, "examples/data has no corpus sample"
    preprocess(inputs, str(root / "ckpt" / "tokenizer"), str(root / "data"), workers=1, progress=False)
    return root


def _overrides(assets, save_dir, *extra):
    return ["--set", f"model.init_from={assets / 'ckpt'}", f"data.prefix={assets / 'data'}",
            f"checkpoint.save_dir={save_dir}", f"data.cache_dir={assets / 'cache'}", *extra]


def _train(assets, save_dir, *extra, launcher=None, check=True):
    cmd = launcher or [sys.executable]
    proc = subprocess.run(
        [*cmd, str(ENTRY), "--config", str(CONFIG), *_overrides(assets, save_dir, *extra)],
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(save_dir):
    return [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]


def _deepspeed(procs: int = 2):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(procs),
            "--master_port", str(free_port())]


@pytest.fixture(scope="module")
def reference(assets):
    save = assets / "reference"
    _train(assets, save)
    return _metrics(save)


def test_curriculum_switches_at_configured_tokens(reference):
    # tiny.yaml: B=1 for 256 tokens, B=2 for 256 more, then B=4; each step consumes 4 x 32 tokens
    # and takes the block size of the stage at its first token.
    assert [m["block_size"] for m in reference] == [1, 1, 2, 2, 4, 4]
    assert [m["consumed_tokens"] for m in reference] == [128 * (i + 1) for i in range(6)]
    assert all(m["diffusion_loss"] == pytest.approx(m["ar_loss"]) for m in reference[:2])  # B=1 is AR
    assert "val_nelbo" in reference[2] and "val_nelbo" in reference[5]
    assert (reference[0]["loss"] == pytest.approx(1.5 * reference[0]["ar_loss"]))  # lambda = 0.5


def _shm_buffers() -> set:
    return set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")) if Path("/dev/shm").is_dir() else set()


@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"])
def test_two_process_layouts_match_single_process(assets, reference, layout, tmp_path):
    before = _shm_buffers()
    _train(assets, tmp_path / "run", layout, launcher=_deepspeed())
    # DeepSpeed's shared-memory all-reduce segments (64 MiB per rank) are removed at exit.
    assert _shm_buffers() <= before
    got = _metrics(tmp_path / "run")
    assert [m["step"] for m in got] == [m["step"] for m in reference]
    for a, b in zip(reference, got):
        # Same samples and noise on every layout; only the order of fp32 sums differs (TP splits
        # matmuls, DP averages gradients over ranks), so losses agree to ~1e-6 relative.
        for key in ("loss", "diffusion_loss", "ar_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (layout, a["step"], key)
        assert b["block_size"] == a["block_size"]


@pytest.mark.parametrize("layout", [
    ("parallel.zero_stage=3", "train.recompute=full"),
    ("parallel.pipeline=2", "train.recompute=selective", "train.loss_chunk_tokens=16"),
    ("parallel.tensor=2", "train.recompute=full", "train.loss_chunk_tokens=16"),
    ("parallel.tensor=2", "parallel.sequence_parallel=true", "train.recompute=selective"),
    ("parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"),
])
def test_recompute_and_loss_chunks_match_single_process(assets, reference, layout, tmp_path):
    """Recompute with ZeRO-3 / PP / TP, the chunked loss (16 of the 2 x 2 x 64 positions per
    chunk) on the pipeline's last stage and under TP, and sequence parallelism (with a pipeline:
    its stages pass sequence shards): the reference run's losses and grad norms."""
    procs = 4 if "parallel.pipeline=2" in layout and "parallel.tensor=2" in layout else 2
    _train(assets, tmp_path / "run", *layout, launcher=_deepspeed(procs))
    got = _metrics(tmp_path / "run")
    assert [m["step"] for m in got] == [m["step"] for m in reference]
    for a, b in zip(reference, got):
        for key in ("loss", "diffusion_loss", "ar_loss", "grad_norm"):  # fp32 sum order only
            assert b[key] == pytest.approx(a[key], rel=1e-4), (layout, a["step"], key)


def test_context_parallel_matches_single_process_and_resumes_exactly(assets, reference, tmp_path):
    """Context parallelism (ring, CP 2): the reference run's losses, grad norms and validation
    NELBO (every rank shards each sample, gradients are summed over the group), and a stop at
    step 3 and resume that continues the uninterrupted CP run bit for bit."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    _train(assets, whole, "parallel.context=2", launcher=_deepspeed())
    got = _metrics(whole)
    assert [m["step"] for m in got] == [m["step"] for m in reference]
    for a, b in zip(reference, got):
        for key in ("loss", "diffusion_loss", "ar_loss", "grad_norm", "val_nelbo"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    _train(assets, stopped, "parallel.context=2", "train.exit_after_steps=3", launcher=_deepspeed())
    _train(assets, stopped, "parallel.context=2", "checkpoint.resume=true", launcher=_deepspeed())
    resumed = _metrics(stopped)
    assert [m["step"] for m in resumed] == [m["step"] for m in got]
    for a, b in zip(got, resumed):
        for key in ("loss", "diffusion_loss", "ar_loss", "grad_norm", "lr", "block_size"):
            assert a[key] == b[key], (a["step"], key)


def test_stop_and_resume_is_exact(assets, reference, tmp_path):
    save = tmp_path / "run"
    _train(assets, save, "train.exit_after_steps=2")
    assert (save / "latest").read_text().strip() == "step_0000002"
    _train(assets, save, "checkpoint.resume=true")
    resumed = _metrics(save)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(reference, resumed):
        for key in ("loss", "diffusion_loss", "ar_loss", "grad_norm", "lr", "block_size"):
            assert a[key] == b[key], (a["step"], key)  # bit-exact on CPU in fp32
    # The exported step equals a checkpoint of the uninterrupted run's weights.
    ref_ckpt = assets / "reference" / "step_0000006" / "model" / "tp00_pp000.safetensors"
    from safetensors.torch import load_file

    ref, got = load_file(ref_ckpt), load_file(save / "step_0000006" / "model" / "tp00_pp000.safetensors")
    assert all(torch.equal(ref[k], got[k]) for k in ref)

    # Extending a finished run (train.steps 6 -> 8): the LR follows the new schedule from the
    # first resumed step on, not the end of the old one (min_lr) and then a jump.
    from megablock.config import load_config
    from megablock.training.optim import lr_lambda

    _train(assets, save, "checkpoint.resume=true", "train.steps=8")
    longer = load_config(str(CONFIG), ["train.steps=8"]).train
    extended = _metrics(save)
    assert [m["step"] for m in extended] == [1, 2, 3, 4, 5, 6, 7, 8]
    for m in extended[6:]:
        assert m["lr"] == pytest.approx(longer.lr * lr_lambda(longer)(m["step"] - 1), rel=1e-12), m["step"]
    assert extended[6]["lr"] > extended[5]["lr"]  # the stretched cosine is higher at step 7 than the old end


def test_sigterm_saves_and_exits_zero(assets, tmp_path):
    save = tmp_path / "run"
    cmd = [sys.executable, str(ENTRY), "--config", str(CONFIG),
           *_overrides(assets, save, "train.steps=100000", "checkpoint.interval=0", "train.eval_interval=0")]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((save / "metrics.jsonl").exists() and (save / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    state = json.loads((save / (save / "latest").read_text().strip() / "trainer_state.json").read_text())
    assert state["step"] == _metrics(save)[-1]["step"] >= 2


def _crash_in_save(rank, world, assets, save_dir):
    """Train 3 steps with a checkpoint every 2; the second save dies after DeepSpeed wrote its
    state but before the model shards: `latest` must still name the first checkpoint."""
    import megablock.training.checkpointing as ckpt_mod
    from megablock.config import load_config
    from megablock.training.trainer import Trainer

    cfg = load_config(str(CONFIG), _overrides(assets, save_dir, "train.steps=4", "checkpoint.interval=2")[1:])
    real_save_shard = ckpt_mod.save_shard
    calls = []

    def dying_save_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during save")
        return real_save_shard(*args, **kwargs)

    ckpt_mod.save_shard = dying_save_shard
    try:
        Trainer(cfg).run()
    except KeyboardInterrupt:
        pass
    return sorted(p.name for p in Path(save_dir).iterdir())


def test_kill_during_save_keeps_previous_latest(assets, tmp_path):
    save = tmp_path / "run"
    names = run_distributed(_crash_in_save, 1, assets, save)[0]
    assert (save / "latest").read_text().strip() == "step_0000002"
    assert "step_0000004" not in names and "step_0000004.tmp" in names
    # The interrupted run resumes from the complete checkpoint.
    _train(assets, save, "train.steps=4", "checkpoint.interval=2", "checkpoint.resume=true")
    assert (save / "latest").read_text().strip() == "step_0000004"


def _nonfinite(rank, world, assets, save_dir):
    import megablock.training.engine as engine_mod
    from megablock.config import load_config
    from megablock.training.trainer import Trainer, TrainingStopped

    cfg = load_config(str(CONFIG), _overrides(assets, save_dir, "train.steps=8", "checkpoint.interval=2",
                                              "train.max_nonfinite_steps=2", "train.eval_interval=0")[1:])
    real_loss = engine_mod.objective

    def poisoned(*args):
        parts = real_loss(*args)
        if trainer.state.step >= 3:  # steps 4.. produce NaN gradients
            parts.loss = parts.loss * float("nan")
        return parts

    engine_mod.objective = poisoned
    trainer = Trainer(cfg)
    try:
        trainer.run()
    except TrainingStopped as err:
        message = str(err)
    else:
        message = None
    finite = all(torch.isfinite(p).all() for p in trainer.model.parameters())
    return message, trainer.state.step, finite


def test_nonfinite_steps_are_skipped_then_stop(assets, tmp_path):
    save = tmp_path / "run"
    message, step, finite = run_distributed(_nonfinite, 1, assets, save)[0]
    assert finite  # the NaN updates were never applied
    assert message is not None and "2 consecutive steps had a non-finite loss" in message
    assert step == 5  # steps 4 and 5 were skipped, then the run stopped
    assert (save / "latest").read_text().strip() == "step_0000002"
    records = _metrics(save)
    assert records[-1]["step"] == 5 and records[-1]["loss"] != records[-1]["loss"]  # NaN logged


def test_random_init_from_architecture(assets, tmp_path):
    # From-scratch baselines: no init_from, the architecture in the config (vocab covers the
    # dataset's tokenizer plus a mask token).
    arch = ("{arch: llama, vocab_size: 321, hidden_size: 32, intermediate_size: 64, num_layers: 2, "
            "num_attention_heads: 4, num_kv_heads: 2, mask_token_id: 320, eos_token_id: 0}")
    _train(assets, tmp_path / "run", "model.init_from=null", f"model.architecture={arch}", "train.steps=4",
           "train.eval_interval=0")
    records = _metrics(tmp_path / "run")
    assert len(records) == 4 and all(r["loss"] == r["loss"] for r in records)
    # A random init starts near the uniform-distribution loss ln(320) per token.
    assert abs(records[0]["ar_loss"] - torch.log(torch.tensor(320.0)).item()) < 0.5

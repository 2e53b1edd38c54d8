"""Issue 13, save_dir safety without DeepSpeed launches: the save_dir policy, the run lock, ranks
exiting with their launcher, metrics.jsonl bookkeeping, RNG state without pickle, a disk-full
save, and the resume config comparison."""
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megablock.config import ConfigError, load_config
from megablock.training import checkpointing as ck
from megablock.training import run_dir
from megablock.training.metrics import MetricsWriter
from megablock.training.resume_check import check_resume_compatible

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _old_run(save: Path, steps=(10,)):
    for s in steps:
        (save / f"step_{s:07d}" / "model").mkdir(parents=True)
    (save / "latest").write_text(f"step_{steps[-1]:07d}\n")
    (save / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, steps[-1] + 1)))
    (save / "tensorboard").mkdir()


# ------------------------------------------------------------------ policy
def test_fresh_run_into_a_used_save_dir_is_refused(tmp_path):
    _old_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        run_dir.check_save_dir_policy(tmp_path, resume=False, overwrite=False)
    msg = str(err.value)
    assert "already holds a run" in msg and "latest is step_0000010" in msg
    assert "checkpoint.resume=true" in msg and "checkpoint.overwrite=true" in msg
    assert (tmp_path / "step_0000010").is_dir()  # nothing touched
    run_dir.check_save_dir_policy(tmp_path, resume=True, overwrite=False)  # continuing is fine
    with pytest.raises(ConfigError, match="contradict"):
        run_dir.check_save_dir_policy(tmp_path, resume=True, overwrite=True)
    run_dir.check_save_dir_policy(tmp_path / "new", resume=False, overwrite=False)  # empty/new: fine


def test_overwrite_deletes_only_what_a_run_writes(tmp_path):
    _old_run(tmp_path, steps=(5, 10))
    (tmp_path / "step_0000015.tmp").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    run_dir.check_save_dir_policy(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]


def test_resume_without_checkpoint_restarts_metrics(tmp_path):
    # A run killed before its first checkpoint logged steps 1..3; the resumed run starts at 0.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in (1, 2, 3)))
    run_dir.check_save_dir_policy(tmp_path, resume=True, overwrite=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def _tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _user_folders(save: Path) -> dict:
    """A copy of a checkpoint under a name of the user's, and a backup folder."""
    (save / "step_0000003_keep" / "model").mkdir(parents=True)
    (save / "step_0000003_keep" / "model" / "w.safetensors").write_bytes(b"weights")
    (save / "step_backup").mkdir()
    (save / "step_backup" / "notes.txt").write_text("mine")
    return {k: v for k, v in _tree_bytes(save).items() if k.startswith(("step_0000003_keep", "step_backup"))}


def test_pruning_deletes_only_the_runs_own_checkpoints(tmp_path):
    """Issue 25.3: keep_last pruning deleted a user's step_0000003_keep (prefix match)."""
    for step in (1, 2, 3):
        (tmp_path / f"step_{step:07d}").mkdir()
        run_dir.record_checkpoint(tmp_path, f"step_{step:07d}")
    mine = _user_folders(tmp_path)
    run_dir.prune_checkpoints(tmp_path, keep_last=1, keep="step_0000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoints.json", "step_0000003", "step_0000003_keep", "step_backup"]
    assert run_dir.read_record(tmp_path) == ["step_0000003"]
    assert {k: v for k, v in _tree_bytes(tmp_path).items() if k in mine} == mine  # byte-identical
    # A save_dir from before the record: its exact-name step folders are the run's, nothing else.
    legacy = tmp_path / "legacy"
    for step in (1, 2, 3):
        (legacy / f"step_{step:07d}").mkdir(parents=True)
    mine = _user_folders(legacy)
    run_dir.prune_checkpoints(legacy, keep_last=1, keep="step_0000003")
    assert sorted(p.name for p in legacy.iterdir()) == [
        "checkpoints.json", "step_0000003", "step_0000003_keep", "step_backup"]
    assert {k: v for k, v in _tree_bytes(legacy).items() if k in mine} == mine


def test_overwrite_keeps_user_folders_and_refuses_a_foreign_step_folder(tmp_path):
    """Issue 25.3: checkpoint.overwrite=true deleted a user folder step_backup/."""
    _old_run(tmp_path, steps=(5, 10))
    run_dir.write_record(tmp_path, ["step_0000005", "step_0000010"])
    (tmp_path / "schedule_search.jsonl").write_text('{"step": 2}\n')
    mine = _user_folders(tmp_path)
    run_dir.check_save_dir_policy(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000003_keep", "step_backup"]  # issue 25.8 too
    assert _tree_bytes(tmp_path) == mine

    # A folder with a step name that the run did not write: a save of that step would replace it.
    _old_run(tmp_path, steps=(5,))
    run_dir.write_record(tmp_path, ["step_0000005"])
    (tmp_path / "step_0000010").mkdir()
    (tmp_path / "step_0000010" / "notes.txt").write_text("a copy of mine")
    before = _tree_bytes(tmp_path)
    for resume, overwrite in ((True, False), (False, True)):
        with pytest.raises(ConfigError, match=r"holds step_0000010, named like this run's checkpoints but not"):
            run_dir.check_save_dir_policy(tmp_path, resume=resume, overwrite=overwrite)
        assert _tree_bytes(tmp_path) == before


def test_fresh_run_beside_only_user_folders_is_not_refused(tmp_path):
    _user_folders(tmp_path)
    run_dir.check_save_dir_policy(tmp_path, resume=False, overwrite=False)  # step_backup/ is not a run


def test_resume_without_checkpoint_restarts_the_schedule_search_log(tmp_path):
    """Issue 25.8: schedule_search.jsonl kept the killed run's searches (rows 2, 4, 7, ... twice)."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in (1, 2, 3)))
    (tmp_path / "schedule_search.jsonl").write_text('{"step": 2}\n{"step": 4}\n')
    run_dir.check_save_dir_policy(tmp_path, resume=True, overwrite=False)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "schedule_search.jsonl").exists()
    (tmp_path / "schedule_search.jsonl").write_text('{"step": 2}\n')  # only searches: still a run
    with pytest.raises(ConfigError, match=r"already holds a run \(schedule_search.jsonl\)"):
        run_dir.check_save_dir_policy(tmp_path, resume=False, overwrite=False)


def test_config_has_overwrite_key(tmp_path):
    cfg = load_config(None, ["checkpoint.overwrite=true"])
    assert cfg.checkpoint.overwrite is True and load_config(None, []).checkpoint.overwrite is False


# ------------------------------------------------------------------ lock
def _try_lock_in_subprocess(save, env=None):
    code = ("import sys; from megablock.training.run_dir import RunLock; from megablock.config import ConfigError\n"
            f"try:\n    RunLock.acquire({str(save)!r}); print('ACQUIRED')\n"
            "except ConfigError as e:\n    print('REFUSED', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env or ENV, capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_a_second_run_and_takes_over_stale_locks(tmp_path):
    lock = run_dir.RunLock.acquire(tmp_path)
    holder = json.loads((tmp_path / "run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    out = _try_lock_in_subprocess(tmp_path)
    assert "REFUSED" in out and f"pid {os.getpid()}" in out and "in use by another run" in out, out
    lock.release()
    assert not (tmp_path / "run.lock").exists()

    # Dead pid on this host: stale.
    (tmp_path / "run.lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    assert "ACQUIRED" in _try_lock_in_subprocess(tmp_path)

    # Another host, refreshed recently: held; not refreshed for STALE_AFTER_S: stale.
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "other-node", "slurm_job_id": "77"}))
    assert "REFUSED" in _try_lock_in_subprocess(tmp_path)
    assert "ACQUIRED" in _try_lock_in_subprocess(tmp_path, env={**ENV, "SLURM_JOB_ID": "77"})  # requeued job
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "other-node"}))
    old = time.time() - run_dir.STALE_AFTER_S - 60
    os.utime(tmp_path / "run.lock", (old, old))
    assert "ACQUIRED" in _try_lock_in_subprocess(tmp_path)


def test_lock_release_never_removes_another_runs_lock(tmp_path):
    lock = run_dir.RunLock.acquire(tmp_path)
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 123, "host": "other-node"}))  # taken over
    lock.release()
    assert (tmp_path / "run.lock").exists()


# ------------------------------------------------------------------ launcher watchdog
_CHAIN = textwrap.dedent("""
    import os, subprocess, sys, time
    role, out = sys.argv[1], sys.argv[2]
    if role == "runner":      # stands for the `deepspeed` runner
        subprocess.Popen([sys.executable, __file__, "launcher", out, "deepspeed.launcher.launch"])
    elif role == "launcher":  # stands for deepspeed's per-node launch.py (its name is in argv)
        subprocess.Popen([sys.executable, __file__, "rank", out], env={**os.environ, "LOCAL_RANK": "0"})
    else:                     # a training rank
        from megablock.training.run_dir import launcher_links, watch_launcher
        watch_launcher(interval=0.2)
        open(out, "w").write(f"{os.getpid()} {os.getppid()} {len(launcher_links())}")
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_ranks_exit_when_the_runner_is_killed(tmp_path):
    script, out = tmp_path / "chain.py", tmp_path / "rank.txt"
    script.write_text(_CHAIN)
    runner = subprocess.Popen([sys.executable, str(script), "runner", str(out)], env=ENV)
    deadline = time.time() + 60
    while not (out.exists() and out.read_text().count(" ") == 2):
        assert time.time() < deadline, "the fake rank never started"
        time.sleep(0.2)
    rank_pid, launcher_pid, links = map(int, out.read_text().split())
    assert links == 2  # itself -> launch.py, launch.py -> runner
    try:
        runner.send_signal(signal.SIGKILL)  # kill -9 the runner only: launch.py survives as an orphan
        runner.wait()
        deadline = time.time() + 15
        while _alive(rank_pid):
            assert time.time() < deadline, "the rank kept running after its runner was killed"
            time.sleep(0.2)
        assert _alive(launcher_pid)  # (the rank noticed the runner, not its own parent)
    finally:
        for pid in (rank_pid, launcher_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_no_watchdog_for_a_run_started_by_hand(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert run_dir.launcher_links() == []


# ------------------------------------------------------------------ metrics.jsonl
def _lines(path):
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


def test_metrics_partial_last_line_and_no_duplicate_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in (1, 2, 3)) + '{"step": 4, "lo')
    w = MetricsWriter(str(tmp_path), True)
    w.truncate_after(2)  # resume from a step-2 checkpoint: used to raise JSONDecodeError
    assert _lines(path) == [1, 2]
    w.close()

    # A launch that starts over (killed before its first checkpoint) or a run that does not resume:
    # its first record replaces the old records of that step and later ones.
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in (1, 2, 3)) + '{"st')
    w = MetricsWriter(str(tmp_path), True)
    for step in (1, 2):
        w.write({"step": step, "loss": 0.5})
    w.close()
    assert _lines(path) == [1, 2]


# ------------------------------------------------------------------ RNG state, planted pickles
def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trips_without_pickle(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.randn()  # cached gaussians are part of the state
    ck.save_rng_state(tmp_path / "r.safetensors")
    want = _draws()
    _draws()
    ck.load_rng_state(tmp_path / "r.safetensors")
    assert _draws() == want
    assert not (tmp_path / "r.safetensors").read_bytes().startswith(b"\x80")  # not a pickle

    # An RNG file of an older checkpoint (a pickle of plain states) still resumes exactly.
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "old.pt")
    want = _draws()
    ck.load_legacy_rng_state(tmp_path / "old.pt")
    assert _draws() == want


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _training_ckpt(tmp_path):
    """A real checkpoint folder (megablock.json + shards) with trainer_state.json."""
    from megablock.checkpoint.convert import convert
    from megablock.testing import save_tiny_hf_model

    save_tiny_hf_model(tmp_path / "hf", "llama")
    ckpt = tmp_path / "step_0000002"
    convert(ckpt, hf_dir=tmp_path / "hf", progress=False, log=lambda *a: None)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (ckpt / "rng").mkdir()
    (ckpt / "deepspeed").mkdir()
    return ckpt


def test_resume_does_not_run_a_planted_rng_pickle(tmp_path):
    ckpt = _training_ckpt(tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"python": _Planted(marker), "numpy": None, "torch": None}, ckpt / "rng" / "rank00000.pt")
    engine = SimpleNamespace(load_checkpoint=lambda *a, **k: (str(ckpt), {}))
    model = SimpleNamespace(lora=None)
    with pytest.raises(ck.CheckpointLoadError, match="refusing to unpickle"):
        ck.load_training_state(engine, model, ckpt, 0)
    assert not marker.exists(), "resume ran a command planted in the checkpoint"


@pytest.mark.parametrize("damage,message", [
    ("no deepspeed", r"step_0000002/deepspeed is missing: the checkpoint is incomplete"),
    ("trainer_state not json", r"step_0000002/trainer_state.json cannot be read \(JSONDecodeError"),
    ("trainer_state unknown key", r"step_0000002/trainer_state.json cannot be read \(TypeError"),
    ("rng truncated", r"step_0000002/rng/rank00000.safetensors cannot be read"),
])
def test_damaged_checkpoint_files_are_named(tmp_path, damage, message):
    """Issue 25.10: a missing deepspeed/ was an empty AssertionError; a bad trainer_state.json or
    a truncated RNG file did not name the file; all printed as "an unexpected error"."""
    ckpt = _training_ckpt(tmp_path)
    ck.save_rng_state(ckpt / "rng" / "rank00000.safetensors")
    loaded = []
    engine = SimpleNamespace(load_checkpoint=lambda *a, **k: loaded.append(1) or (str(ckpt), {}))
    if damage == "no deepspeed":
        (ckpt / "deepspeed").rmdir()
    elif damage == "trainer_state not json":
        (ckpt / "trainer_state.json").write_text('{"step": 2')
    elif damage == "trainer_state unknown key":
        (ckpt / "trainer_state.json").write_text('{"step": 2, "stepz": 3}')
    else:
        rng = ckpt / "rng" / "rank00000.safetensors"
        rng.write_bytes(rng.read_bytes()[:40])
    with pytest.raises(ck.CheckpointLoadError, match=message) as err:
        ck.load_training_state(engine, SimpleNamespace(lora=None), ckpt, 0)
    assert "resume from another step folder" in str(err.value) or "Resume from another" in str(err.value)
    assert isinstance(err.value, ValueError)  # the CLI prints it as one expected line
    assert loaded == ([1] if damage == "rng truncated" else [])  # refused before DeepSpeed loads


# ------------------------------------------------------------------ disk full
@pytest.mark.parametrize("failure", ["enospc", "torch_short_write"])
def test_disk_full_save_says_so(tmp_path, monkeypatch, failure):
    save = tmp_path / "run"
    save.mkdir()
    (save / "latest").write_text("step_0000002\n")

    def save_checkpoint(path, **kwargs):
        Path(path, "deepspeed").mkdir(parents=True)
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2112 vs 2016")

    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=1 << 30, free=0))
    engine = SimpleNamespace(save_checkpoint=save_checkpoint)
    info = SimpleNamespace(rank=0, dp_rank=0, tp_rank=0, pp_rank=0)
    cfg = load_config(str(ROOT / "examples/configs/tiny.yaml"), ["data.prefix=data/x", f"checkpoint.save_dir={save}"])
    checkpointer = ck.Checkpointer(cfg, info, engine, SimpleNamespace(lora=None, cfg=None))
    with pytest.raises(ck.DiskFullError) as err:
        checkpointer.save(4, ck.TrainerState(step=4))
    msg = str(err.value)
    assert "the disk is full" in msg and "checkpoint.save_dir" in msg and "step_0000002" in msg
    assert err.value.errno == errno.ENOSPC
    assert not (save / "step_0000004.tmp").exists()  # the partial save was removed


# ------------------------------------------------------------------ resume config comparison
def _cfg(*sets):
    return load_config(str(ROOT / "examples/configs/tiny.yaml"),
                       ["model.init_from=ckpt", "data.prefix=data/x", "checkpoint.save_dir=runs/a", *sets]).to_dict()


def test_resume_refuses_changes_that_break_exactness():
    saved = _cfg()
    for sets, key, a, b in [
        (["data.seq_len=64"], "data.seq_len", "32", "64"),
        (["train.global_batch_size=8"], "train.global_batch_size", "4", "8"),
        (["model.init_from=other"], "model.init_from", "ckpt", "other"),
        (["parallel.tensor=2"], "parallel.tensor", "1", "2"),
        (["train.seed=1"], "train.seed", "1234", "1"),
        (["lora.enabled=true", "lora.target_modules=[linear_qkv]"], "lora.enabled", "false", "true"),
        (["diffusion.ar_loss_weight=1.0"], "diffusion.ar_loss_weight", "0.5", "1.0"),
    ]:
        with pytest.raises(ConfigError) as err:
            check_resume_compatible(saved, _cfg(*sets), where="runs/a/step_0000003")
        msg = str(err.value)
        assert f"{key}: saved {a}, this run {b}" in msg, msg
        assert f"--set {key}={a}" in msg and "another checkpoint.save_dir" in msg


def test_resume_allows_safe_changes(tmp_path, monkeypatch):
    saved = _cfg()
    check_resume_compatible(saved, _cfg("train.steps=100", "train.log_interval=5", "train.eval_interval=0",
                                        "train.exit_after_steps=2", "checkpoint.keep_last=9", "checkpoint.interval=7",
                                        "checkpoint.resume=true", "train.lr=3e-4", "data.cache_dir=/tmp/c"))
    # The same paths written differently (relative vs absolute) are the same run.
    monkeypatch.chdir(tmp_path)
    check_resume_compatible(saved, _cfg(f"model.init_from={tmp_path / 'ckpt'}", f"data.prefix={tmp_path}/data/./x"))

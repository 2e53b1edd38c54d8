"""examples/slurm/pretrain_nbdiff.sbatch with stub srun / scontrol / deepspeed: config values
reach deepspeed as arguments (never as shell code), and the preemption relay signals only this
job's ranks, not another job of the same user on the node."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "examples" / "slurm" / "pretrain_nbdiff.sbatch"

FAKE_RANK = """
import os, signal, sys, time
tag = sys.argv[-1]
def on_usr1(*_):
    open(tag + ".usr1", "w").close()
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
open(tag + ".pid", "w").write(str(os.getpid()))
time.sleep(60)
"""


RANK_LAUNCH = "os.execv(sys.executable, [sys.executable, out + '/fake_rank.py', 'pretrain_nbdiff.py', '--local_rank=0', out + '/ours'])\n"


def _stubs(tmp: Path, deepspeed_tail: str = RANK_LAUNCH) -> Path:
    """Stub srun, scontrol (answers `show hostnames`, logs every call to scontrol.log) and
    deepspeed (records its arguments, then runs `deepspeed_tail`)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexport SLURM_NODEID=0\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {tmp}/scontrol.log\necho localhost\n')
    (bin_dir / "deepspeed").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "out = os.environ['STUB_OUT']\n"
        "json.dump(sys.argv[1:], open(out + '/args.json', 'w'))\n" + deepspeed_tail
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp / "fake_rank.py").write_text(FAKE_RANK)
    (tmp / "venv" / "bin").mkdir(parents=True)
    (tmp / "venv" / "bin" / "activate").write_text("")
    return bin_dir


def _wait_for(path: Path, seconds=30):
    deadline = time.time() + seconds
    while not path.exists() or not path.read_text():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return path.read_text()


@pytest.mark.parametrize("warning", [signal.SIGUSR1, signal.SIGTERM])
def test_sbatch_passes_values_as_arguments_and_signals_only_its_job(tmp_path, warning):
    bin_dir = _stubs(tmp_path)
    script = SBATCH.read_text()
    script = re.sub(r"^CONFIG=.*$", 'CONFIG="my configs/x.yaml; touch PWNED"', script, count=1, flags=re.M)
    script = re.sub(r"^EXTRA_SETS=.*$", "EXTRA_SETS=(train.lr=2e-5 \"checkpoint.save_dir=runs/exp 2\" '$(touch PWNED2)')",
                    script, count=1, flags=re.M)
    script = re.sub(r"^VENV=.*$", f"VENV={tmp_path / 'venv'}", script, count=1, flags=re.M)
    (tmp_path / "job.sbatch").write_text(script)

    # Another job of the same user on this node, running the same entry point.
    other = subprocess.Popen([sys.executable, str(tmp_path / "fake_rank.py"), "pretrain_nbdiff.py", "--local_rank=0",
                              str(tmp_path / "other")], env={**os.environ, "SLURM_JOB_ID": "999"})
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_OUT": str(tmp_path), "SLURM_JOB_ID": "123",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1"}
    job = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(tmp_path / "ours.pid")
        other_pid = int(_wait_for(tmp_path / "other.pid"))
        job.send_signal(warning)  # Slurm's time-limit warning (USR1) or a preemption / scancel (TERM)
        out, _ = job.communicate(timeout=60)
        assert job.returncode == 0, out
        assert (tmp_path / "ours.usr1").exists(), f"this job's rank was not signalled:\n{out}"
        # After the time-limit warning the job continues from its checkpoint; a TERM is Slurm's to requeue.
        assert ("requeue 123" in (tmp_path / "scontrol.log").read_text()) == (warning == signal.SIGUSR1), out
        assert not (tmp_path / "other.usr1").exists() and other.poll() is None, "another job's rank was signalled"
        os.kill(other_pid, 0)
    finally:
        other.kill()
        if job.poll() is None:
            job.kill()
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[:2] == ["--no_ssh", "--node_rank=0"]
    assert args[-6:] == ["--config", "my configs/x.yaml; touch PWNED", "--set", "train.lr=2e-5",
                         "checkpoint.save_dir=runs/exp 2", "$(touch PWNED2)"]
    assert not list(tmp_path.glob("PWNED*")), "a config value ran as shell code"


def _job_env(tmp_path, bin_dir):
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_OUT": str(tmp_path), "SLURM_JOB_ID": "123",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1"}


def test_sbatch_exits_with_the_training_exit_code(tmp_path):
    """Issue 25.6: with deepspeed returning 3 the script exited 0, so Slurm recorded COMPLETED."""
    bin_dir = _stubs(tmp_path, deepspeed_tail="sys.exit(3)\n")
    script = re.sub(r"^VENV=.*$", f"VENV={tmp_path / 'venv'}", SBATCH.read_text(), count=1, flags=re.M)
    (tmp_path / "job.sbatch").write_text(script)
    proc = subprocess.run(["bash", str(tmp_path / "job.sbatch")], cwd=tmp_path, env=_job_env(tmp_path, bin_dir),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "training exited with code 3" in proc.stdout
    assert "requeue" not in (tmp_path / "scontrol.log").read_text()  # a failed run is not requeued


def test_cluster_example_agrees_with_its_sbatch_and_fits_its_gpus():
    """The README's cluster walkthrough: the sbatch's default config divides its ranks into whole
    TP x PP replicas, its global batch splits over them, the convert command in the config's header
    writes the layout it trains, the architecture splits at that TP, and the estimator fits it."""
    import io
    from contextlib import redirect_stdout

    from megablock.commands.estimate_memory import architecture_from_hf, main as estimate
    from megablock.config import load_config, validate_model

    text = SBATCH.read_text()
    config = ROOT / re.search(r"^CONFIG=(\S+)", text, re.M).group(1)
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    gpus = int(re.search(r"^GPUS_PER_NODE=(\d+)", text, re.M).group(1))
    assert int(re.search(r"^#SBATCH --gpus-per-node=(\d+)", text, re.M).group(1)) == gpus
    cfg = load_config(str(config))
    replica = cfg.parallel.tensor * cfg.parallel.pipeline
    assert (nodes * gpus) % replica == 0, (nodes, gpus, replica)
    dp = nodes * gpus // replica
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0
    header = config.read_text()
    convert = re.search(r"convert_hf\.py .* --tp (\d+) --pp (\d+)", header)
    assert (int(convert.group(1)), int(convert.group(2))) == (cfg.parallel.tensor, cfg.parallel.pipeline)
    assert f"--data-parallel {dp}" in header
    hf_config = re.search(r"--hf-config (\S+)", header).group(1)
    validate_model(cfg, architecture_from_hf(str(ROOT / hf_config)))
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert estimate(["--config", str(config), "--hf-config", str(ROOT / hf_config),
                         "--data-parallel", str(dp), "--device-memory-gb", "80", "--json"]) == 0
    report = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert report["peak_bytes"] <= 0.9 * 80e9, report["peak_bytes"]
    assert report["largest_micro_batch"] >= cfg.train.micro_batch_size

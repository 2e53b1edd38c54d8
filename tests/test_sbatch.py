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


def _stubs(tmp: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexport SLURM_NODEID=0\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    (bin_dir / "deepspeed").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "out = os.environ['STUB_OUT']\n"
        "json.dump(sys.argv[1:], open(out + '/args.json', 'w'))\n"
        "os.execv(sys.executable, [sys.executable, out + '/fake_rank.py', 'pretrain_nbdiff.py', '--local_rank=0', out + '/ours'])\n"
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


def test_sbatch_passes_values_as_arguments_and_signals_only_its_job(tmp_path):
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
        job.send_signal(signal.SIGUSR1)  # Slurm's preemption warning to the batch shell
        out, _ = job.communicate(timeout=60)
        assert job.returncode == 0, out
        assert (tmp_path / "ours.usr1").exists(), f"this job's rank was not signalled:\n{out}"
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

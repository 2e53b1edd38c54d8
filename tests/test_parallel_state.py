"""One-process worlds (plain `python`, notebooks, the tools) must not leak into subprocesses."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARENT = textwrap.dedent("""
    import os, subprocess, sys
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(1, 1)
    child = "from megablock.parallel.state import initialize_parallel; initialize_parallel(1, 1)"
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    print("child exit", done.returncode, done.stderr[-2000:])
    print("exported", [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ])
""")


def test_one_process_world_does_not_leak_into_subprocesses():
    # A tool or training run started from a process that already holds a one-process world
    # (say a notebook that loaded a model) must start its own world, not rendezvous on the
    # parent's port: exporting RANK/MASTER_PORT made it fail with EADDRINUSE.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "child exit 0" in proc.stdout, proc.stdout[-3000:]
    assert "exported []" in proc.stdout, proc.stdout[-3000:]

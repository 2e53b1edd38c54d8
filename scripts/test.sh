#!/usr/bin/env bash
# Sets up .venv from the pinned requirements (once) and runs the test suite:
#     bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
PY=.venv/bin/python
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
pip_install -r requirements.txt
# DeepSpeed ships as source. Building its CPU shared-memory comm op at install time
# (DS_BUILD_SHM_COMM=1, DeepSpeed's own pre-build switch) keeps every later launch free of a
# ~80 s JIT compile in deepspeed.init_distributed.
if ! "$PY" -c "from deepspeed.git_version_info import installed_ops as o; assert o.get('deepspeed_shm_comm')" 2>/dev/null; then
  echo "pre-building DeepSpeed's CPU communication op (once, ~2 min)"
  DS_BUILD_SHM_COMM=1 pip_install --no-build-isolation --no-cache-dir --force-reinstall --no-deps \
    "$(grep -E '^deepspeed==' requirements.txt)"
fi
pip_install --no-deps -e .
exec "$PY" -m pytest -q tests "$@"

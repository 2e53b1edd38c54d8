#!/usr/bin/env bash
# Sets up .venv from the pinned requirements (once) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv || python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest -q tests "$@"

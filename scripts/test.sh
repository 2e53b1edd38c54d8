#!/usr/bin/env bash
# Sets up .venv from the pinned requirements (once) and runs the test suite:
#     bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "$PY" -m pytest -q tests "$@"

# Shared environment set-up, sourced (not run) by scripts/test.sh and scripts/quickstart.sh so a
# test run and a quickstart install exactly the same thing:
#     source scripts/setup_env.sh        (from the repository root; bash, `set -e` in the caller)
# Creates .venv once (Python 3.11 if present), installs the pinned requirements, pre-builds
# DeepSpeed's CPU comm op and installs megablock in editable mode. Idempotent: a second call only
# checks (a few seconds). Leaves PY (the venv's python) and pip_install (quiet pip) defined.

export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
PY=.venv/bin/python
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

echo "installing the pinned requirements into .venv (first time ~70 s, then a quick check)"
pip_install -r requirements.txt
# DeepSpeed ships as source. Building its CPU shared-memory comm op at install time
# (DS_BUILD_SHM_COMM=1, DeepSpeed's own pre-build switch) keeps every later launch free of a
# ~80 s JIT compile in deepspeed.init_distributed.
if ! "$PY" -c "from deepspeed.git_version_info import installed_ops as o; assert o.get('deepspeed_shm_comm')" 2>/dev/null; then
  echo "pre-building DeepSpeed's CPU communication op (once, ~2 min)"
  DS_BUILD_SHM_COMM=1 pip_install --no-build-isolation --no-cache-dir --force-reinstall --no-deps \
    "$(grep -E '^deepspeed==' requirements.txt)"
fi
# Editable install of megablock itself, unless this checkout is already the one installed.
if ! "$PY" -I -c "import megablock, pathlib, sys; sys.exit(pathlib.Path(megablock.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())" 2>/dev/null; then
  pip_install --no-deps -e .
fi

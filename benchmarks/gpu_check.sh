#!/usr/bin/env bash
# Prepared GPU check (issue 17) for one H200 whose image has PyTorch 2.11 on Python 3.12 and no
# DeepSpeed or megatron-core, and which reaches no registry: the wheels travel in .whl/.
#
# 1. Here, on a machine with pip and network, once (megatron-core is the one package the CUDA
#    tests and benchmarks/train_step.py need that the image lacks; DeepSpeed is not needed):
#        bash benchmarks/gpu_check.sh --download
# 2. On the device machine (the `run` tool: command "bash benchmarks/gpu_check.sh",
#    carry [".whl"], timeout_s 540): installs the wheels into /tmp/site, then runs
#      - the CUDA-only tests (compiled FlexAttention vs the dense reference; bf16 logits-only-where-
#        a-loss-is vs full logits; recompute vs none, with CUDA peak memory),
#      - the context-parallel ring kernel's CUDA test, and benchmarks/context_parallel.py at CP = 2
#        over NCCL where two GPUs and DeepSpeed are present (skipped, and said so, otherwise),
#      - benchmarks/train_step.py on a ~1B shape (16 layers, hidden 2048, intermediate 5632,
#        16/4 heads, vocab 32000) in bf16 with compiled FlexAttention at L = 2048: step time,
#        tokens/s, MFU and peak memory for AR vs block diffusion, without and with full recompute.
#    Everything is budgeted to finish in under 8 minutes; logs land in $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
MEGATRON_CORE=megatron_core==0.16.1

if [[ "${1:-}" == "--download" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$MEGATRON_CORE"
    ls -la .whl
    exit 0
fi

LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 - <<'PY'
import torch, megatron.core
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("megatron-core", megatron.core.__version__)
PY
echo "== CUDA-only tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_memory.py -k "cuda or flex" || echo "TESTS FAILED (rc $?)"
echo "== train_step, ~1B shape, bf16, FlexAttention, L = 2048 ($(( $(date +%s) - start )) s so far)"
SHAPE="--device cuda --layers 16 --hidden 2048 --intermediate 5632 --heads 16 --kv-heads 4 --lengths 2048 --repeats 3 --configs ar sdpa --no-breakdown"
timeout 150 python3 benchmarks/train_step.py $SHAPE --recompute none || echo "BENCH FAILED (rc $?)"
timeout 120 python3 benchmarks/train_step.py $SHAPE --recompute full || echo "BENCH FAILED (rc $?)"
echo "== context parallelism ($(( $(date +%s) - start )) s so far): the ring kernel on CUDA; CP = 2 over NCCL with 2 GPUs"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_context_parallel.py -k cuda || echo "TESTS FAILED (rc $?)"
if [[ $(python3 -c "import torch; print(torch.cuda.device_count())") -ge 2 ]] && python3 -c "import deepspeed" 2>/dev/null; then
    timeout 240 python3 benchmarks/context_parallel.py --device cuda --seq-lens 8192 --layers 4 --repeats 3 \
        || echo "BENCH FAILED (rc $?)"
else
    echo "CP = 2 benchmark skipped: it needs two GPUs and DeepSpeed (megablock.parallel.state starts through it)"
fi
echo "== done in $(( $(date +%s) - start )) s"

#!/bin/bash
# Score an adapted Qwen3 / Qwen2.5 export on gsm8k_cot, humaneval, mbpp and mmlu with the
# harness's `megablock` model, on one GPU node where the datasets can be downloaded.
#   bash examples/eval/qwen3_gpu_node.sh            (or: sbatch --gpus-per-node=8 examples/eval/qwen3_gpu_node.sh)
# NOT RUN YET: written and checked on CPU only (see examples/eval/README.md).
#SBATCH --job-name=megablock-eval
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out

# ---- edit these -------------------------------------------------------------------------------
HF_DIR=hf/qwen3-4b-nbdiff     # tools/export_hf.py output (config.json has block_size, mask_token_id)
DRAFTER=                      # optional: OUT/drafter of a lora.scope=noised run (speculative mode)
OUT=evals/qwen3-4b-nbdiff
VENV=.venv                    # pip install -r requirements.txt && pip install -e .
GPUS=8                        # data-parallel replicas (TP 1 each; --tp 2 for models that need two GPUs)
BLOCK_SIZE=4                  # the block size the model was trained at (SDAR's released models: 4;
                              # Fast-dLLM / dInfer decode LLaDA with blocks of 32)
THRESHOLD=0.9                 # commit confidence (Fast-dLLM's and dInfer's reported setting)
GEN_TOKENS=256                # generation length (Fast-dLLM / dInfer: 256 for GSM8K, 256-512 for code)
CODE_TOKENS=512
BATCH=16                      # requests per forward, per replica
CHAT=--apply_chat_template    # instruct / chat models; empty for base models (then drop --fewshot_as_multiturn)
MODES=(ar threshold speculative)  # ar: the clean half's AR decoding, the reference the others are read against
# ------------------------------------------------------------------------------------------------

set -euo pipefail
source "$VENV/bin/activate"
mkdir -p logs "$OUT"
export HF_ALLOW_CODE_EVAL=1   # humaneval / mbpp execute the generated code (the harness asks for both)
EXTRA=()
if [[ -n "$DRAFTER" ]]; then EXTRA=(--drafter "$DRAFTER"); fi

run() {  # run MODE TASK ARGS... : one data-parallel harness run over the node's GPUs
    local mode=$1 task=$2; shift 2
    local block=()
    if [[ "$mode" != ar ]]; then block=(--block-size "$BLOCK_SIZE"); fi
    if [[ "$mode" == threshold ]]; then block+=(--threshold "$THRESHOLD"); fi
    torchrun --standalone --nproc_per_node "$GPUS" tools/lm_eval.py --tp 1 --hf-dir "$HF_DIR" "${EXTRA[@]}" \
        --dtype bf16 --mode "$mode" "${block[@]}" --tasks "$task" --batch_size "$BATCH" \
        --output_path "$OUT/$mode" --log_samples "$@" 2>&1 | tee "$OUT/$mode-$task.log"
}

for mode in "${MODES[@]}"; do
    # GSM8K, chain of thought: the task's 8 fixed exemplars ("The answer is N"), greedy.
    run "$mode" gsm8k_cot --num_fewshot 8 $CHAT ${CHAT:+--fewshot_as_multiturn} --gen_kwargs "max_gen_toks=$GEN_TOKENS"
    # HumanEval (0-shot) and MBPP (3-shot): pass@1, greedy; the harness runs the tests.
    run "$mode" humaneval --num_fewshot 0 --confirm_run_unsafe_code --gen_kwargs "max_gen_toks=$CODE_TOKENS"
    run "$mode" mbpp --num_fewshot 3 --confirm_run_unsafe_code --gen_kwargs "max_gen_toks=$CODE_TOKENS"
done
# MMLU (5-shot) is multiple choice: log-likelihoods of the clean causal pass, the same in every mode.
run ar mmlu --num_fewshot 5

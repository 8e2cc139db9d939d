#!/usr/bin/env bash
# GRPO on prompt records with reward functions (built-ins exact_match, similarity, math, format, box_iou, or
# FILE.py:FUNCTION),
# LoRA on the language model. Start from an SFT run by giving its output folder as MODEL_NAME.
# Edit the knobs below or set them in the environment; extra flags go to `vlmtune grpo`.
# No MODEL_NAME: the embedded tiny model on data_examples/grpo.json (a CPU demo). Real run, e.g.:
#   MODEL_NAME=outputs/lora DATA_PATH=questions.json IMAGE_FOLDER=images/ REWARDS="math format" \
#   bash scripts/finetune_grpo.sh
if [ -z "${MODEL_NAME:-}" ]; then
    : "${DATA_PATH:=data_examples/grpo.json}" "${EPOCHS:=3}" "${LR:=5e-3}" "${MAX_COMPLETION_LENGTH:=16}"
    # the tiny model starts from random weights and never earns exact_match: partial credit gives it a signal
    : "${REWARDS:=similarity exact_match}"
fi
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
VLMTUNE_COMMAND=grpo

MODEL_NAME=${MODEL_NAME:-}
DATA_PATH=${DATA_PATH:-grpo.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-images}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/grpo}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-16}
BATCH_PER_DEVICE=${BATCH_PER_DEVICE:-2}   # prompts; each is sampled NUM_GENERATIONS times
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-6}
MODE=${MODE:-lora}                        # full | lora | lora_vision
LORA_RANK=${LORA_RANK:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
NUM_GENERATIONS=${NUM_GENERATIONS:-4}
MAX_COMPLETION_LENGTH=${MAX_COMPLETION_LENGTH:-256}
TEMPERATURE=${TEMPERATURE:-1.0}
BETA=${BETA:-0.0}                         # KL weight; 0: no reference model
REWARDS=${REWARDS:-"exact_match format"}  # summed with REWARD_WEIGHTS (default: 1 each)
REWARD_WEIGHTS=${REWARD_WEIGHTS:-}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-4096}
IMAGE_MAX_PIXELS=${IMAGE_MAX_PIXELS:-}
SAVE_STEPS=${SAVE_STEPS:-200}
LOGGING_STEPS=${LOGGING_STEPS:-1}
DEEPSPEED=${DEEPSPEED-$(on_cuda scripts/zero2.json)}  # empty: no DeepSpeed

extra=()
# shellcheck disable=SC2206
if [ -n "$REWARD_WEIGHTS" ]; then extra=(--reward_weights $REWARD_WEIGHTS); fi
# shellcheck disable=SC2086
launch --mode "$MODE" --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --num_generations "$NUM_GENERATIONS" \
    --max_completion_length "$MAX_COMPLETION_LENGTH" --temperature "$TEMPERATURE" --beta "$BETA" \
    --reward_funcs $REWARDS "${extra[@]}" "$@"

#!/usr/bin/env bash
# LoRA on the language model; vision tower and merger frozen.
# Edit the knobs below or set them in the environment; extra flags go to `vlmtune train` (see --help).
# No MODEL_NAME: the embedded tiny model on data_examples/ (a CPU demo).
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

MODEL_NAME=${MODEL_NAME:-}
DATA_PATH=${DATA_PATH:-data.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-images}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/lora}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
BATCH_PER_DEVICE=${BATCH_PER_DEVICE:-4}
EPOCHS=${EPOCHS:-1}
LR=${LR:-2e-4}
LORA_RANK=${LORA_RANK:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-4096}
IMAGE_MAX_PIXELS=${IMAGE_MAX_PIXELS:-}
SAVE_STEPS=${SAVE_STEPS:-200}
LOGGING_STEPS=${LOGGING_STEPS:-10}
DEEPSPEED=${DEEPSPEED-$(on_cuda scripts/zero2.json)}  # empty: no DeepSpeed

launch --mode lora --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" "$@"

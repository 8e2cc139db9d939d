#!/usr/bin/env bash
# LoRA on the language model and the vision tower; the merger trains fully.
# Edit the knobs below or set them in the environment; extra flags go to `vlmtune train` (see --help).
# No MODEL_NAME: the embedded tiny model on data_examples/ (a CPU demo). Real run, e.g.:
#   MODEL_NAME=Qwen/Qwen2.5-VL-3B-Instruct DATA_PATH=data.json IMAGE_FOLDER=images/ bash scripts/finetune_lora_vision.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

MODEL_NAME=${MODEL_NAME:-}
DATA_PATH=${DATA_PATH:-data.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-images}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/lora_vision}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
BATCH_PER_DEVICE=${BATCH_PER_DEVICE:-4}
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-4}
VISION_LR=${VISION_LR:-2e-5}
MERGER_LR=${MERGER_LR:-1e-5}
LORA_RANK=${LORA_RANK:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-4096}
IMAGE_MAX_PIXELS=${IMAGE_MAX_PIXELS:-}   # e.g. $((1280*28*28)); empty: the processor's
SAVE_STEPS=${SAVE_STEPS:-200}
LOGGING_STEPS=${LOGGING_STEPS:-10}
DEEPSPEED=${DEEPSPEED-$(on_cuda scripts/zero2.json)}  # empty: no DeepSpeed

launch --mode lora_vision --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" \
    --vision_lr "$VISION_LR" --merger_lr "$MERGER_LR" "$@"

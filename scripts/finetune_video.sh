#!/usr/bin/env bash
# LoRA on the language model for video data: frames sampled at FPS, each frame under VIDEO_MAX_PIXELS.
# Edit the knobs below or set them in the environment; extra flags go to `vlmtune train` (see --help).
# No MODEL_NAME: the embedded tiny model on data_examples/ (which holds videos; a CPU demo).
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

MODEL_NAME=${MODEL_NAME:-}
DATA_PATH=${DATA_PATH:-data.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-videos}
VIDEO_FOLDER=${VIDEO_FOLDER:-}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/video}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-32}
BATCH_PER_DEVICE=${BATCH_PER_DEVICE:-1}
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-4}
LORA_RANK=${LORA_RANK:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-16384}
FPS=${FPS:-1.0}
VIDEO_MAX_PIXELS=${VIDEO_MAX_PIXELS:-}   # e.g. $((360*420)); empty: the processor's
SAVE_STEPS=${SAVE_STEPS:-200}
LOGGING_STEPS=${LOGGING_STEPS:-10}
DEEPSPEED=${DEEPSPEED-$(on_cuda scripts/zero3.json)}  # empty: no DeepSpeed

launch --mode lora --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" "$@"

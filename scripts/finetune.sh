#!/usr/bin/env bash
# Full fine-tune of the language model and the merger; the vision tower stays frozen
# (pass --freeze_vision_tower False to train it too, at VISION_LR).
# Edit the knobs below or set them in the environment; extra flags go to `vlmtune train` (see --help).
# No MODEL_NAME: the embedded tiny model on data_examples/ (a CPU demo).
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

MODEL_NAME=${MODEL_NAME:-}
DATA_PATH=${DATA_PATH:-data.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-images}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/full}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
BATCH_PER_DEVICE=${BATCH_PER_DEVICE:-4}
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-5}
VISION_LR=${VISION_LR:-2e-6}
MERGER_LR=${MERGER_LR:-1e-5}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-4096}
IMAGE_MAX_PIXELS=${IMAGE_MAX_PIXELS:-}
SAVE_STEPS=${SAVE_STEPS:-200}
LOGGING_STEPS=${LOGGING_STEPS:-10}
DEEPSPEED=${DEEPSPEED-$(on_cuda scripts/zero3.json)}  # empty: no DeepSpeed

if [ -z "$MODEL_NAME" ]; then LR=${DEMO_FULL_LR:-2e-3}; fi  # full training of the tiny model needs less than LoRA
launch --mode full --vision_lr "$VISION_LR" --merger_lr "$MERGER_LR" "$@"

#!/usr/bin/env bash
# Continued pre-training on documents (vlmtune train --stage cpt): records {"text", "image" / "video"} with <image> /
# <video> tags where the media go (none: the media come before the text, e.g. an image and its caption). No chat
# template: every text token trains, vision pad tokens never; documents end with <|endoftext|>. Start from a base
# model (e.g. Qwen/Qwen2.5-VL-7B) or an Instruct one. LoRA on the language model, documents packed into rows
# (--packing: M-RoPE positions restart per document); pass --mode full to train the language model and merger fully.
# Edit the knobs below or set them in the environment; extra flags go to `vlmtune train` (see --help).
# No MODEL_NAME: the embedded tiny model on data_examples/documents.json (a CPU demo).
if [ -z "${MODEL_NAME:-}" ]; then : "${DATA_PATH:=data_examples/documents.json}"; fi
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

MODEL_NAME=${MODEL_NAME:-}
DATA_PATH=${DATA_PATH:-documents.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-images}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/cpt}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
BATCH_PER_DEVICE=${BATCH_PER_DEVICE:-4}
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-4}
LORA_RANK=${LORA_RANK:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-4096}
IMAGE_MAX_PIXELS=${IMAGE_MAX_PIXELS:-}
SAVE_STEPS=${SAVE_STEPS:-200}
LOGGING_STEPS=${LOGGING_STEPS:-10}
DEEPSPEED=${DEEPSPEED-$(on_cuda scripts/zero2.json)}  # empty: no DeepSpeed

launch --stage cpt --packing True --mode lora --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" "$@"

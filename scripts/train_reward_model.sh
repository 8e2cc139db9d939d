#!/usr/bin/env bash
# A reward model (the model plus a scalar head) on preference records, the DPO data format, with the Bradley-Terry
# loss; LoRA on the language model. Its output folder (or `vlmtune merge`'s) is a reward for
# `vlmtune grpo --reward_model PATH`. Edit the knobs below or set them in the environment; extra flags go to
# `vlmtune reward-model`.
# No MODEL_NAME: the embedded tiny model on data_examples/preference.json (a CPU demo). Real run, e.g.:
#   MODEL_NAME=outputs/lora DATA_PATH=prefs.json IMAGE_FOLDER=images/ bash scripts/train_reward_model.sh
if [ -z "${MODEL_NAME:-}" ]; then : "${DATA_PATH:=data_examples/preference.json}" "${EPOCHS:=6}" "${LR:=1e-2}"; fi
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
VLMTUNE_COMMAND=reward-model

MODEL_NAME=${MODEL_NAME:-}
DATA_PATH=${DATA_PATH:-preference.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-images}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/reward_model}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
BATCH_PER_DEVICE=${BATCH_PER_DEVICE:-4}   # pairs: each is two sequences in the same forward
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-5}
MODE=${MODE:-lora}                        # full | lora | lora_vision
LORA_RANK=${LORA_RANK:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-4096}
IMAGE_MAX_PIXELS=${IMAGE_MAX_PIXELS:-}
SAVE_STEPS=${SAVE_STEPS:-200}
LOGGING_STEPS=${LOGGING_STEPS:-10}
DEEPSPEED=${DEEPSPEED-$(on_cuda scripts/zero2.json)}  # empty: no DeepSpeed

launch --mode "$MODE" --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" "$@"

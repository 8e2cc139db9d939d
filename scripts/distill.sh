#!/usr/bin/env bash
# Distillation: the student (MODEL_NAME) learns the teacher's token distributions on SFT records (forward KL by
# default; BETA 1 reverse KL, between: generalized JSD), plus CE_WEIGHT x cross-entropy; LMBDA > 0 makes that share
# of the steps on-policy (GKD: the student's own samples). The teacher must share the student's tokenizer and
# vision tokens. Edit the knobs below or set them in the environment; extra flags go to `vlmtune distill`.
# No MODEL_NAME: the embedded tiny model learns from a teacher built here, the tiny model with 4 layers (a CPU
# demo). Real run, e.g.:
#   MODEL_NAME=Qwen/Qwen3-VL-2B-Instruct TEACHER=Qwen/Qwen3-VL-8B-Instruct DATA_PATH=data.json bash scripts/distill.sh
if [ -z "${MODEL_NAME:-}" ]; then : "${EPOCHS:=10}" "${LR:=2e-2}"; fi
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
VLMTUNE_COMMAND=distill

MODEL_NAME=${MODEL_NAME:-}
if [ -z "$MODEL_NAME" ] && [ -z "${TEACHER:-}" ]; then
    TEACHER=outputs/tiny_teacher
    "$PYTHON" -c "from vlmtune.testing.tiny import build_tiny_model as b; b('$TEACHER', text_overrides={'num_hidden_layers': 4})"
fi
TEACHER=${TEACHER:?set TEACHER to the teacher model folder or training output}
DATA_PATH=${DATA_PATH:-data.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-images}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/distill}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
BATCH_PER_DEVICE=${BATCH_PER_DEVICE:-4}
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-5}
MODE=${MODE:-lora}                        # full | lora | lora_vision
LORA_RANK=${LORA_RANK:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
BETA=${BETA:-0}                           # 0 forward KL, 1 reverse KL, between: generalized JSD
TEMPERATURE=${TEMPERATURE:-1.0}
CE_WEIGHT=${CE_WEIGHT:-0}
LMBDA=${LMBDA:-0}                         # share of on-policy steps (GKD)
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-4096}
IMAGE_MAX_PIXELS=${IMAGE_MAX_PIXELS:-}
SAVE_STEPS=${SAVE_STEPS:-200}
LOGGING_STEPS=${LOGGING_STEPS:-10}
DEEPSPEED=${DEEPSPEED-$(on_cuda scripts/zero2.json)}  # empty: no DeepSpeed

launch --mode "$MODE" --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --teacher "$TEACHER" --beta "$BETA" \
    --temperature "$TEMPERATURE" --ce_weight "$CE_WEIGHT" --lmbda "$LMBDA" "$@"

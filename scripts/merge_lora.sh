#!/usr/bin/env bash
# Merge a LoRA run (adapters + trained merger / layers) into a standalone model folder that transformers and
# vLLM load as they are. The merge is verified (logits vs base + adapters) before anything is written.
# Edit the knobs below or set them in the environment; extra flags go to `vlmtune merge` (see --help), e.g.
#   RUN_DIR=outputs/lora_vision/checkpoint-200 bash scripts/merge_lora.sh --data_path my_data.json
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RUN_DIR=${RUN_DIR:-outputs/lora_vision}   # training output or checkpoint-N folder
OUT_DIR=${OUT_DIR:-${RUN_DIR%/}-merged}   # refused if it exists and is not empty (add --force to replace it)
DTYPE=${DTYPE:-}                          # empty: the training dtype (bf16 stays bf16); or bfloat16 / float16 / float32
BASE_MODEL=${BASE_MODEL:-}                # empty: the base model named in RUN_DIR/vlmtune_run.json

if [ -x "$ROOT/.venv/bin/vlmtune" ]; then VLMTUNE="$ROOT/.venv/bin/vlmtune"; else VLMTUNE=vlmtune; fi
args=("$RUN_DIR" "$OUT_DIR")
[ -z "$DTYPE" ] || args+=(--dtype "$DTYPE")
[ -z "$BASE_MODEL" ] || args+=(--base_model "$BASE_MODEL")

echo "[merge] $RUN_DIR -> $OUT_DIR"
"$VLMTUNE" merge "${args[@]}" "$@"

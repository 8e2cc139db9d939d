#!/usr/bin/env bash
# The whole journey on the embedded tiny model, on CPU, in minutes: set up, check the data, fine-tune with
# LoRA on the LLM and the vision tower, merge into a standalone model, ask it about an image, a video and a
# text-only question, and score it against the base model. Outputs land under outputs/quickstart/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=${OUT:-outputs/quickstart}
start=$(date +%s)

bash scripts/setup.sh
VLMTUNE=.venv/bin/vlmtune

echo "== 1/5 check the data (builds the tiny model on first use)"
"$VLMTUNE" check-data data_examples/data.json --image_folder data_examples

echo "== 2/5 fine-tune: scripts/finetune_lora_vision.sh"
rm -rf "$OUT/lora_vision" "$OUT/lora_vision-merged"
OUTPUT_DIR="$OUT/lora_vision" bash scripts/finetune_lora_vision.sh --disable_tqdm True

echo "== 3/5 merge: scripts/merge_lora.sh"
RUN_DIR="$OUT/lora_vision" OUT_DIR="$OUT/lora_vision-merged" bash scripts/merge_lora.sh

echo "== 4/5 predict with the merged model"
MERGED="$OUT/lora_vision-merged"
"$VLMTUNE" predict --model "$MERGED" --image data_examples/images/red_circle.png --prompt "What shape is in the picture?"
"$VLMTUNE" predict --model "$MERGED" --video data_examples/videos/ball_right.mp4 --prompt "Where does the ball move?"
"$VLMTUNE" predict --model "$MERGED" --prompt "How many sides does a triangle have?"
"$VLMTUNE" predict --model "$MERGED" --data data_examples/data.json --output "$OUT/predictions.jsonl"

echo "== 5/5 evaluate: the base tiny model against the fine-tuned one (on its training data: a demo)"
BASE=$(.venv/bin/python -c "from vlmtune.testing.tiny import tiny_model_path; print(tiny_model_path())")
"$VLMTUNE" eval --model "$BASE" --name base --compare "$MERGED" --compare_name fine-tuned \
    --data data_examples/data.json --max_new_tokens 32 --output_dir "$OUT/eval"

cat <<MSG

Done in $(( $(date +%s) - start )) s.
  adapters + trained merger: $OUT/lora_vision
  merged standalone model:   $MERGED
  predictions on the data:   $OUT/predictions.jsonl
  plots of the run:          $OUT/lora_vision/plots/run.png
  eval, base vs fine-tuned:  $OUT/eval/metrics.json
The tiny model starts from random weights: its replies show the pipeline works, not what a real model learns.
MSG

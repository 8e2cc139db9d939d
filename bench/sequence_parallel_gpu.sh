#!/usr/bin/env bash
# Sequence parallelism's memory split on GPUs (not run yet: no device was lent when it was written): peak
# torch.cuda.max_memory_allocated per rank for --sequence_parallel_size 1, 2 and 4 at two lengths, with the ratio
# to SP 1 measured in the same run (bench/sequence_parallel_memory.py, NCCL; the same path as `vlmtune train
# --sequence_parallel_size N`). Needs 4 GPUs for SP 4 (SIZES="1 2" on 2). One H100 runs only SIZES=1.
#   MODEL: a model folder (default: the embedded tiny Qwen2-VL); LENGTHS: tokens per sample.
#   bash bench/sequence_parallel_gpu.sh                      # tiny model, 32k and 128k tokens
#   MODEL=/models/Qwen2.5-VL-7B-Instruct LENGTHS="16384 65536" bash bench/sequence_parallel_gpu.sh
# The results JSON goes to $OUT (the device tool's folder that comes back), else bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 VLMTUNE_CACHE=${VLMTUNE_CACHE:-/tmp/vlmtune-cache}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/te-vlmtune}
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
sizes=${SIZES:-$(for n in 1 2 4; do [ "$n" -le "$gpus" ] && printf '%s ' "$n"; done)}
timeout "${BENCH_TIMEOUT:-540}" python3 bench/sequence_parallel_memory.py --device cuda --dtype bfloat16 \
    --model "${MODEL:-tiny}" --lengths ${LENGTHS:-32768 131072} --sizes $sizes \
    --out "$OUT/sequence-parallel-cuda-$(date +%F).json" 2>&1 | grep -v "Loading weights" | tee "$OUT/sequence-parallel.log"

#!/usr/bin/env bash
# The GPU checks as one command for the device machine (at most about 9.5 minutes: the tests and the benchmark
# stop at TEST_TIMEOUT + BENCH_TIMEOUT seconds), after `bash bench/gpu_wheels.sh` here; through the device tool:
# command `bash bench/gpu_run.sh`, carry [".whl"], timeout_s 600.
#   1. the CUDA tests (Liger vs plain loss in bf16 per family, flash-attn vs sdpa, QLoRA 4-bit) in tests/test_load.py
#   2. bench/train_step.py on the tiny model and the Qwen2.5-VL-3B shape (random weights), every configuration
# Logs and the results JSON go to $OUT (the device tool's folder that comes back), else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 VLMTUNE_CACHE=/tmp/vlmtune-cache
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>&1 \
    | tee "$OUT/versions.log"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -rs -p no:cacheprovider tests/test_load.py 2>&1 \
    | tee "$OUT/cuda-tests.log"
timeout "${BENCH_TIMEOUT:-390}" python3 bench/train_step.py --models "${MODELS:-tiny,Qwen2.5-VL-3B}" --out "$OUT" 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/train-step.log"

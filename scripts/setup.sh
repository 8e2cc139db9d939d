#!/usr/bin/env bash
# Make .venv (if absent) and install vlmtune into it, editable, with the extras in $EXTRAS.
# A torch + torchvision pair that already imports is kept; otherwise the pinned pair is installed
# (pip never resolves an unpinned torch here: that would pull a multi-GB build of its choosing).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-video,deepspeed,rl,test}
TORCH_PAIR=${TORCH_PAIR:-"torch==2.14.1 torchvision==0.29.1"}
PY=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_PAIR"
    # shellcheck disable=SC2086
    .venv/bin/pip install -q $TORCH_PAIR
fi
.venv/bin/pip install -q -e ".[${EXTRAS}]"
.venv/bin/python -c "import torch, torchvision, transformers, vlmtune; print(f'[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, vlmtune {vlmtune.__version__}')"

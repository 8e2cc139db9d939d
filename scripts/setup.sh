#!/usr/bin/env bash
# Make .venv (if absent) and install vlmtune into it, editable, with the extras in $EXTRAS.
# A torch + torchvision pair that already imports is kept; otherwise the pinned pair is installed
# (pip never resolves an unpinned torch here: that would pull a multi-GB build of its choosing).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-video,deepspeed,rl,test}
TORCH_PAIR=${TORCH_PAIR:-"torch==2.14.1 torchvision==0.29.1"}
PY=${PYTHON:-python3}
# pip byte-compiles what it installs: keep it (no --no-compile), or every process compiles torch and transformers
# again at import wherever PYTHONDONTWRITEBYTECODE is set (it is on this machine: the suite took 1.5x as long).
PIP=(.venv/bin/pip install -q)

[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_PAIR"
    # shellcheck disable=SC2086
    "${PIP[@]}" $TORCH_PAIR
fi
"${PIP[@]}" -e ".[${EXTRAS}]"
# DeepSpeed compiles its CPU ops (CPU Adam for the offload configs, shared-memory collectives) on first use; the
# tests' DeepSpeed runs would each wait on that build, so build them here, once per environment, where the tests
# look for them (tests/conftest.py: TORCH_EXTENSIONS_DIR inside .venv), with the compiler they name (CXX: c++ without
# DeepSpeed's -g, tests/cxx_without_debug_info.sh). The build (minutes of compiling, on every
# core) runs beside the rest of the set-up (the browser's install, the import check) and is waited for at the end.
ops=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
build=
if [[ ",$EXTRAS," == *",test,"* ]] && ! { [ -f "$ops/cpu_adam/cpu_adam.so" ] && [ -f "$ops/deepspeed_shm_comm/deepspeed_shm_comm.so" ]; }; then
    echo "[setup] building DeepSpeed's CPU ops (cpu_adam, shm_comm) once, for the tests (a few minutes)"
    mkdir -p "$ops"
    CXX=${CXX:-$(pwd -P)/tests/cxx_without_debug_info.sh} TORCH_EXTENSIONS_DIR=$ops .venv/bin/python -c "
from deepspeed.accelerator import get_accelerator
for name in ('ShareMemCommBuilder', 'CPUAdamBuilder'):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and builder.is_compatible(verbose=False):
        builder.load(verbose=False)" > "$ops/build.log" 2>&1 &
    build=$!
fi
# The browser tests (tests/test_view.py) drive Debian's headless Chromium; as root, install it when missing. Where apt
# cannot (not root, no Debian, offline), those tests skip with one line saying why.
if [[ ",$EXTRAS," == *",test,"* ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing chromium and chromium-driver (apt) for the browser tests"
        { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
            chromium chromium-driver; } >/dev/null 2>&1 || echo "[setup] apt could not install chromium: the browser tests will skip"
    else
        echo "[setup] no chromium / chromedriver (install them as root: apt-get install chromium chromium-driver): the browser tests will skip"
    fi
fi
.venv/bin/python -c "import torch, torchvision, transformers, vlmtune; print(f'[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, vlmtune {vlmtune.__version__}')"
if [ -n "$build" ] && ! wait "$build"; then
    echo "[setup] DeepSpeed's CPU ops did not build (the offload tests will fail); the build's last lines ($ops/build.log):"
    tail -n 5 "$ops/build.log"
fi

#!/usr/bin/env bash
# Make .venv (if absent) and install vlmtune into it, editable, with the extras in $EXTRAS.
# A torch + torchvision pair that already imports is kept; otherwise the pinned pair is installed
# (pip never resolves an unpinned torch here: that would pull a multi-GB build of its choosing).
# With the test extra, two slow steps run beside pip's main install instead of after it: Debian's headless browser
# (for tests/test_view.py, installed as root where missing) and DeepSpeed's CPU ops (built as soon as DeepSpeed is in).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
EXTRAS=${EXTRAS:-video,deepspeed,rl,test}
TORCH_PAIR=${TORCH_PAIR:-"torch==2.14.1 torchvision==0.29.1"}
PY=${PYTHON:-python3}
# pip byte-compiles what it installs: keep it (no --no-compile), or every process compiles torch and transformers
# again at import wherever PYTHONDONTWRITEBYTECODE is set (it is on this machine: the suite took 1.5x as long).
PIP=(.venv/bin/pip install -q)
testing=false
[[ ",$EXTRAS," == *",test,"* ]] && testing=true

# The browser tests drive Debian's headless Chromium; as root, apt installs it in the background. Where apt cannot
# (not root, no Debian, offline), those tests skip with one line saying why.
browser=
if $testing && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing chromium and chromium-driver (apt, in the background) for the browser tests"
        { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq \
            --no-install-recommends chromium chromium-driver; } >/dev/null 2>&1 &
        browser=$!
    else
        echo "[setup] no chromium / chromedriver (install them as root: apt-get install chromium chromium-driver): the browser tests will skip"
    fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_PAIR"
    # shellcheck disable=SC2086
    "${PIP[@]}" $TORCH_PAIR
fi

# DeepSpeed compiles its CPU ops (CPU Adam for the offload configs, shared-memory collectives) on first use; the
# tests' DeepSpeed runs would each wait on that build, so build them here, once per environment, where the tests
# look for them (tests/conftest.py: TORCH_EXTENSIONS_DIR inside .venv), with the compiler they name (CXX: c++ without
# DeepSpeed's -g, tests/cxx_without_debug_info.sh). DeepSpeed goes in first (the requirement as the test extra
# names it), so that the build (minutes of compiling) runs beside the rest of pip's install.
ops=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
build=
if $testing && ! { [ -f "$ops/cpu_adam/cpu_adam.so" ] && [ -f "$ops/deepspeed_shm_comm/deepspeed_shm_comm.so" ]; }; then
    deepspeed=$(.venv/bin/python -c "import tomllib
extra = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['test']
print(next(r for r in extra if r.startswith('deepspeed')))")
    "${PIP[@]}" "$deepspeed"
    echo "[setup] building DeepSpeed's CPU ops (cpu_adam, shm_comm) once, for the tests, beside the install"
    mkdir -p "$ops"
    CXX=${CXX:-$(pwd -P)/tests/cxx_without_debug_info.sh} TORCH_EXTENSIONS_DIR=$ops .venv/bin/python -c "
from deepspeed.accelerator import get_accelerator
for name in ('ShareMemCommBuilder', 'CPUAdamBuilder'):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and builder.is_compatible(verbose=False):
        builder.load(verbose=False)" > "$ops/build.log" 2>&1 &
    build=$!
fi
"${PIP[@]}" -e ".[${EXTRAS}]"
.venv/bin/python -c "import torch, torchvision, transformers, vlmtune; print(f'[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, vlmtune {vlmtune.__version__}')"
if [ -n "$browser" ] && ! wait "$browser"; then
    echo "[setup] apt could not install chromium: the browser tests will skip"
fi
if [ -n "$build" ] && ! wait "$build"; then
    echo "[setup] DeepSpeed's CPU ops did not build (the offload tests will fail); the build's last lines ($ops/build.log):"
    tail -n 5 "$ops/build.log"
fi
echo "[setup] ready in $((SECONDS - start)) s"

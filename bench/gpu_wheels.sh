#!/usr/bin/env bash
# Run HERE, before a GPU session's device run: downloads into .whl/ (git-ignored) the wheels the device
# machine lacks, for its Python 3.12 on x86_64. The device has torch, transformers (another version), peft,
# accelerate, tokenizers, safetensors; it reaches no index. flash-attn is left out: PyPI has it as source only.
#   QUANT=1 bash bench/gpu_wheels.sh   # + bitsandbytes (43 MB) for the QLoRA test; the tree + wheels must stay
#                                      #   under the device tool's 64 MiB, so leave decord out then (NO_VIDEO=1)
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(transformers==5.22.2 peft==0.21.2 liger-kernel==0.8.5 qwen-vl-utils==0.0.14)
[ "${NO_VIDEO:-0}" = 1 ] || wheels+=(decord==0.6.0)
[ "${QUANT:-0}" = 1 ] && wheels+=(bitsandbytes==0.50.2)
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux2010 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
done
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform any -d .whl "${wheels[@]}"
du -sh .whl && ls .whl

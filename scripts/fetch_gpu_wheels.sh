#!/usr/bin/env bash
# Download the wheels the lent GPU machine lacks into .whl/ (gitignored), on a machine that reaches the package
# registry. The GPU machine reaches none: its image (Python 3.12, x86_64) has torch, triton, transformers and
# peft but no bitsandbytes, and scripts/gpu_check.sh installs whatever .whl/ holds (--no-deps, --no-index) before
# its stages, so the 4-bit rows compare with bitsandbytes and the QLoRA tests reach PEFT's bitsandbytes layers.
#
#   bash scripts/fetch_gpu_wheels.sh            # then carry .whl with the device call (about 41 MB)
#
# bitsandbytes' own needs (torch, numpy, packaging) are on that image already: --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=("bitsandbytes==0.50.2")
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${WHEELS[@]}"
ls -l .whl

#!/usr/bin/env bash
# The one command for a GPU machine (see ../shared/reference/gpu.md): build the extension, run the GPU tests,
# a compute-sanitizer pass on small cases, the benchmarks; full logs and results go to the folder given as
# the argument, a short table is printed last. No registry is needed: it installs with --no-deps into the
# machine's own torch/triton.
#
#   bash scripts/gpu_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export FASTPEFT_CUDA_ARCHS=${FASTPEFT_CUDA_ARCHS:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
declare -A status

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember pass/fail
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then status[$name]="pass"; else status[$name]="FAIL (rc $?)"; fi
  status[$name]+=" $((SECONDS - start))s"
  tail -n 5 "$OUT/$name.log"
}

{ nvidia-smi; "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__)"; } >"$OUT/machine.log" 2>&1
step build "$PY" -m pip install --no-build-isolation --no-deps -v -e .
"$PY" -m fastpeft.cli env >"$OUT/env.log" 2>&1
step tests "$PY" -m pytest -q -x --junitxml="$OUT/tests.xml" tests
if command -v compute-sanitizer >/dev/null; then
  step sanitizer compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" scripts/sanitize_lora.py
  step racecheck env FASTPEFT_BACKEND=cuda compute-sanitizer --tool racecheck --error-exitcode 9 \
    "$PY" scripts/sanitize_lora.py
else
  status[sanitizer]="skipped (no compute-sanitizer)"
fi
step bench "$PY" benchmarks/run.py --out "$OUT"

echo
cat "$OUT/env.log"
echo
grep -A200 "^mode " "$OUT/bench.log" | head -150
echo
for name in build tests sanitizer racecheck bench; do printf '%-10s %s\n' "$name" "${status[$name]:-not run}"; done

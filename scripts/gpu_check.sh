#!/usr/bin/env bash
# The one command for a GPU machine (../shared/reference/gpu.md): build, GPU tests, compute-sanitizer, benchmarks.
#
#   bash scripts/gpu_check.sh OUT [STAGE...]      STAGE: build test sanitize bench (default: all, in that order)
#
# Each stage runs under its own `timeout`, writes its log under OUT as it goes and its state to
# OUT/<stage>.status ("running" until it ends, then "pass", "FAIL rc=N" or "TIMEOUT"), so a stage cut off still
# returns what it did and says so. No registry is needed: it installs with --no-deps into the machine's own
# torch and triton. Triton's compiled kernels and autotuning results are cached in .triton_cache across stages
# and processes (TRITON_CACHE_AUTOTUNING=1), which a warm machine keeps between device calls.
#
# Sizing, on one H100 (limits in seconds; override one with GPU_CHECK_<STAGE>_S, e.g. GPU_CHECK_BENCH_S=500):
#   build     150  csrc/lora.cu, multi_lora.cu, qlora.cu and ops.cpp for sm_90 with MAX_JOBS=16: about a minute
#   test      390  the GPU subset of tests/ (GPU_SHAPES, not every CPU case again) with one fixed Triton config
#                  per kernel (FASTPEFT_TRITON_AUTOTUNE=0): a few hundred cases, the time mostly Triton compiles
#   sanitize  570  memcheck and racecheck x the backends each scripts/sanitize_<op>.py has cases for (lora, dora,
#                  multi_lora, qlora and bottleneck, each on cuda and triton: twenty runs of a few small cases,
#                  about 25 s each,
#                  mostly torch and CUDA starting under the sanitizer), fixed Triton configs (cached by the test
#                  stage)
#   bench     300  benchmarks/run.py with a budget 40 s under the limit: TARGETS.md's cases of every op first
#                  (about three minutes with autotuning), then the sweeps, shortest first (the four training
#                  steps of a small Llama, about a minute; multi_lora's, DoRA's, LoRA's) until the budget is
#                  spent; summary last, then the regression table against the committed results of this GPU
# Whole run at most 1410 s (23.5 min). In device calls of at most 10 minutes: `build test` (540 s), `sanitize`
# (570 s), then `bench` (300 s), each call right after the last so the machine stays warm; a fresh machine
# needs `build` again first (about a minute).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ALL_STAGES=(build test sanitize bench)
declare -A LIMIT=([build]=150 [test]=390 [sanitize]=570 [bench]=300)

die() {  # one line naming the problem, on stderr, and a non-zero exit
  echo "gpu_check: $2" >&2
  exit "$1"
}

OUT=${1:-}
[[ -n $OUT ]] || die 2 "usage: bash scripts/gpu_check.sh OUT [STAGE...] (stages: ${ALL_STAGES[*]})"
shift
STAGES=("$@")
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=("${ALL_STAGES[@]}")
for stage in "${STAGES[@]}"; do
  [[ -n ${LIMIT[$stage]+set} ]] || die 2 "unknown stage '$stage' (expected some of: ${ALL_STAGES[*]})"
done

created_out=0
[[ -d $OUT ]] || created_out=1
if ! mkdir -p "$OUT" 2>/dev/null || ! touch "$OUT/.writable" 2>/dev/null; then
  die 2 "cannot write to OUT '$OUT'"
fi
rm -f "$OUT/.writable"
OUT=$(cd "$OUT" && pwd)

PY=${PYTHON:-python3}
gpu_problem=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
  gpu_problem="no GPU visible (nvidia-smi not found)"
elif ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  gpu_problem="no GPU visible (nvidia-smi lists none)"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpu_problem="no GPU visible to torch ($PY)"
fi
if [[ -n $gpu_problem ]]; then
  [[ $created_out == 1 ]] && rmdir "$OUT" 2>/dev/null  # leave nothing behind that could pass for results
  die 3 "$gpu_problem"
fi

export FASTPEFT_CUDA_ARCHS=${FASTPEFT_CUDA_ARCHS:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/.triton_cache}
export TRITON_CACHE_AUTOTUNING=1
export PY OUT

stage_build() {
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . &&
    "$PY" -m fastpeft.cli env | tee "$OUT/env.txt" &&
    "$PY" -c "from fastpeft._extension import require_extension; require_extension(); print('fastpeft._C loads')"
}

stage_test() {
  FASTPEFT_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -rfE -p no:cacheprovider --durations=15 \
    --junitxml="$OUT/test-junit.xml" tests
}

stage_sanitize() {  # every scripts/sanitize_<op>.py, each backend, under memcheck and racecheck
  local rc=0 tool backend script log
  for script in scripts/sanitize_*.py; do
    for tool in memcheck racecheck; do
      for backend in $("$PY" "$script" --backends); do  # the backends the op family has kernels on
        log="$OUT/$(basename "$script" .py)-$tool-$backend.log"
        echo "--- compute-sanitizer --tool $tool $script --backend $backend (log: $(basename "$log"))"
        compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 30 \
          "$PY" "$script" --backend "$backend" >"$log" 2>&1
        local status=$?
        tail -n 4 "$log"
        [[ $status == 0 ]] || rc=$status
      done
    done
  done
  return $rc
}

stage_bench() {  # --compare auto: against benchmarks/results/<gpu>/results.json when one is committed
  "$PY" benchmarks/run.py --out "$OUT/bench" --budget-s $((BENCH_LIMIT_S - 40)) --compare auto
}
export -f stage_build stage_test stage_sanitize stage_bench

for stage in "${ALL_STAGES[@]}"; do
  var="GPU_CHECK_${stage^^}_S"
  LIMIT[$stage]=${!var:-${LIMIT[$stage]}}
done
export BENCH_LIMIT_S=${LIMIT[bench]}  # the bench stops starting cases 40 s before its stage's timeout

{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  >"$OUT/machine.txt" 2>&1

declare -A RESULT
for stage in "${STAGES[@]}"; do
  if [[ $stage == sanitize ]] && ! command -v compute-sanitizer >/dev/null; then
    RESULT[$stage]="skipped (no compute-sanitizer)"
    echo "${RESULT[$stage]}" >"$OUT/$stage.status"
    continue
  fi
  echo "=== $stage (limit ${LIMIT[$stage]} s, log $OUT/$stage.log)"
  echo "running" >"$OUT/$stage.status"
  start=$SECONDS
  timeout --kill-after=15 "${LIMIT[$stage]}" bash -c "stage_$stage" >"$OUT/$stage.log" 2>&1
  rc=$?
  case $rc in
    0) RESULT[$stage]="pass" ;;
    124 | 137) RESULT[$stage]="TIMEOUT" ;;
    *) RESULT[$stage]="FAIL rc=$rc" ;;
  esac
  RESULT[$stage]+=" $((SECONDS - start))s"
  echo "${RESULT[$stage]}" >"$OUT/$stage.status"
  tail -n 12 "$OUT/$stage.log"
done

echo
[[ -f $OUT/bench/summary.md ]] && cat "$OUT/bench/summary.md" && echo
failed=0
for stage in "${STAGES[@]}"; do
  printf '%-9s %s\n' "$stage" "${RESULT[$stage]}"
  [[ ${RESULT[$stage]} == pass* || ${RESULT[$stage]} == skipped* ]] || failed=1
done
exit $failed

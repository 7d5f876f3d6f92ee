#!/usr/bin/env bash
# The one command for a GPU machine: build, a GPU correctness subset, the TARGETS rows, compute-sanitizer.
#
#   bash scripts/gpu_check.sh OUT [STAGE...]    STAGE: build test bench sanitize (default, in this order) and tune
#
# Sized for the lent H200 (15 minutes of device time in all, machine start included, 10 minutes a command): the
# default stages take at most 11 minutes together, in two commands on one warm machine,
#
#   bash scripts/gpu_check.sh OUT build test        # at most 6 minutes
#   bash scripts/gpu_check.sh OUT bench sanitize    # at most 5 minutes (builds first if the machine is fresh)
#
# ordered so that a run cut short still brings back the most valuable part. Each stage runs under its own
# `timeout`, writes its log under OUT line by line and its state to OUT/<stage>.status ("running" until it ends,
# then "pass", "FAIL rc=N", "TIMEOUT" or "skipped (why)"); a short table comes last. No registry is needed: the
# project installs with --no-deps into the machine's torch and triton, and wheels the machine lacks
# (bitsandbytes: scripts/fetch_gpu_wheels.sh puts them in .whl/, carried with the call) install from .whl/.
#
# Stage      limit (s)  what                                                                   measured on a GPU
#   build      120      the extension for sm_90 only (no fp64 kernels), MAX_JOBS=16              not yet
#   test       240      the GPU correctness subset: every op's tests (every kernel x dtype x     not yet
#                       edge shapes: M = 0 and 1, odd sizes, non-contiguous), pinned tiles
#                       (FASTPEFT_TRITON_AUTOTUNE=0: nothing timed), pytest -v (a line per test
#                       as it ends), 120 s per test, 8 processes when pytest-xdist is there
#   bench      180      the TARGETS rows only (benchmarks/run.py --targets), pinned tiles, each   not yet
#                       row appended to OUT/bench/results.json as measured, then compared with
#                       benchmarks/results/<gpu>/results.json when committed
#   sanitize   120      compute-sanitizer memcheck over every op family's small cases, one        not yet
#                       process per backend (scripts/sanitize.py); skipped with a one-line note
#                       where the runtime refuses the device ("Device not supported" on gVisor)
#   tune       300      opt-in: the TARGETS rows again with autotuning on, the configurations    not yet
#                       the autotuner picks printed (TRITON_PRINT_AUTOTUNING=1), in OUT/tune/
# No GPU has run these yet: the limits are estimates (kernel compiles dominate the test and bench stages; the
# first GPU session replaces the last column with what each stage took). Override one with
# GPU_CHECK_<STAGE>_S (e.g. GPU_CHECK_TEST_S=300).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ALL_STAGES=(build test bench sanitize tune)
DEFAULT_STAGES=(build test bench sanitize)
declare -A LIMIT=([build]=120 [test]=240 [bench]=180 [sanitize]=120 [tune]=300)
# The correctness subset: the op tests (they parametrize over every backend the device has, at GPU_SHAPES).
GPU_TESTS=(tests/test_lora.py tests/test_lora_dy_pass.py tests/test_lora_dropout.py tests/test_lora_philox.py
  tests/test_dora.py tests/test_multi_lora.py tests/test_multi_lora_sgmv.py tests/test_multi_lora_4bit.py
  tests/test_qlora.py tests/test_quant_4bit.py tests/test_bottleneck.py)

die() {  # one line naming the problem, on stderr, and a non-zero exit
  echo "gpu_check: $2" >&2
  exit "$1"
}

OUT=${1:-}
[[ -n $OUT ]] || die 2 "usage: bash scripts/gpu_check.sh OUT [STAGE...] (stages: ${ALL_STAGES[*]})"
shift
STAGES=("$@")
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=("${DEFAULT_STAGES[@]}")
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
export PY OUT ROOT
GPU_TESTS_LIST="${GPU_TESTS[*]}"
export GPU_TESTS_LIST

if compgen -G ".whl/*.whl" >/dev/null; then  # wheels the machine lacks, carried along (fetch_gpu_wheels.sh)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$ROOT/.gpu_site" .whl/*.whl \
    >"$OUT/wheels.log" 2>&1 && export PYTHONPATH="$ROOT/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi

installed() {
  "$PY" -c "import fastpeft, fastpeft._C" 2>/dev/null
}

stage_build() {
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . &&
    "$PY" -m fastpeft.cli env | tee "$OUT/env.txt" &&
    "$PY" -c "from fastpeft._extension import require_extension; require_extension(); print('fastpeft._C loads')"
}

stage_test() {
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
  "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)
  # shellcheck disable=SC2086  # the list of test files
  FASTPEFT_TRITON_AUTOTUNE=0 "$PY" -m pytest -v -rfE -p no:cacheprovider -m "not slow" "${extra[@]}" \
    --junitxml="$OUT/test-junit.xml" $GPU_TESTS_LIST
}

stage_bench() {  # --compare auto: against benchmarks/results/<gpu>/results.json when one is committed
  local status=0
  FASTPEFT_TRITON_AUTOTUNE=0 "$PY" benchmarks/run.py --targets --out "$OUT/bench" \
    --budget-s $((STAGE_LIMIT_S - 30)) --compare auto || status=$?
  # measured beside the cost model's prediction, for every target row the run answered
  "$PY" benchmarks/roofline.py --compare "$OUT/bench/results.json" | tee "$OUT/bench/predicted.md" || true
  return $status
}

stage_tune() {  # opt-in: the same rows autotuned, and the configurations the autotuner picks
  TRITON_PRINT_AUTOTUNING=1 FASTPEFT_TRITON_AUTOTUNE=1 "$PY" benchmarks/run.py --targets --out "$OUT/tune" \
    --budget-s $((STAGE_LIMIT_S - 30))
}

stage_sanitize() {  # memcheck, every family's cases in one process per backend
  local rc=0 backend log status
  for backend in $("$PY" scripts/sanitize.py --backends); do
    log="$OUT/sanitize-memcheck-$backend.log"
    echo "--- compute-sanitizer --tool memcheck scripts/sanitize.py --backend $backend (log: $(basename "$log"))"
    compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 30 \
      "$PY" scripts/sanitize.py --backend "$backend" >"$log" 2>&1
    status=$?
    tail -n 4 "$log"
    [[ $status == 0 ]] || rc=$status
  done
  return $rc
}
export -f stage_build stage_test stage_bench stage_tune stage_sanitize

sanitizer_refusal() {  # empty when compute-sanitizer runs a CUDA program here, else its one-line reason
  if ! command -v compute-sanitizer >/dev/null; then
    echo "no compute-sanitizer on PATH"
    return
  fi
  local probe
  probe=$(timeout 120 compute-sanitizer --tool memcheck "$PY" -c \
    "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()" 2>&1)
  if [[ $? != 0 ]] || grep -q "Device not supported" <<<"$probe"; then
    grep -m1 -E "Device not supported|Error|error" <<<"$probe" || echo "the probe failed"
  fi
}

for stage in "${ALL_STAGES[@]}"; do
  var="GPU_CHECK_${stage^^}_S"
  LIMIT[$stage]=${!var:-${LIMIT[$stage]}}
done

{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  >"$OUT/machine.txt" 2>&1

run_stage() {  # run_stage NAME: under its limit, log and status under OUT; sets RESULT[NAME]
  local stage=$1 start=$SECONDS rc
  echo "=== $stage (limit ${LIMIT[$stage]} s, log $OUT/$stage.log)"
  echo "running" >"$OUT/$stage.status"
  STAGE_LIMIT_S=${LIMIT[$stage]} timeout --kill-after=15 "${LIMIT[$stage]}" bash -c "stage_$stage" \
    >"$OUT/$stage.log" 2>&1
  rc=$?
  case $rc in
    0) RESULT[$stage]="pass" ;;
    124 | 137) RESULT[$stage]="TIMEOUT" ;;
    *) RESULT[$stage]="FAIL rc=$rc" ;;
  esac
  RESULT[$stage]+=" $((SECONDS - start))s"
  echo "${RESULT[$stage]}" >"$OUT/$stage.status"
  tail -n 12 "$OUT/$stage.log"
}
export STAGE_LIMIT_S=0

declare -A RESULT
for stage in "${STAGES[@]}"; do
  if [[ $stage != build ]] && ! installed && [[ -z ${RESULT[build]+set} ]]; then
    echo "fastpeft._C is not installed on this machine (a fresh one): building first"
    run_stage build
  fi
  if [[ $stage == sanitize ]]; then
    refusal=$(sanitizer_refusal)
    if [[ -n $refusal ]]; then
      RESULT[$stage]="skipped (compute-sanitizer refuses this machine: ${refusal:0:120})"
      echo "${RESULT[$stage]}" | tee "$OUT/$stage.status"
      continue
    fi
  fi
  run_stage "$stage"
done

echo
[[ -f $OUT/bench/summary.md ]] && cat "$OUT/bench/summary.md" && echo
failed=0
for stage in "${ALL_STAGES[@]}"; do
  [[ -n ${RESULT[$stage]+set} ]] || continue
  printf '%-9s %s\n' "$stage" "${RESULT[$stage]}"
  [[ ${RESULT[$stage]} == pass* || ${RESULT[$stage]} == skipped* ]] || failed=1
done
exit $failed

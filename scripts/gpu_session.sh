#!/usr/bin/env bash
# One call on a GPU machine: build, test, check and benchmark fsq-kernels there, in at most six
# minutes, each step time-boxed, results written to $OUT as they come (at most 8 files).
#
#   OUT=/path/to/results bash scripts/gpu_session.sh          # on the GPU machine, from the checkout
#   bash scripts/gpu_session.sh --dry-run                      # print the plan; runs nothing, needs no GPU
#
# The machine may run another stack than development (e.g. Python 3.12, torch 2.11, triton 3.6,
# pytest-xdist, hypothesis and scipy, no vector-quantize-pytorch, no network): the extension is
# built against ITS torch, for its own GPU's architecture; tests that need the peer skip.
# A step that fails or runs out of time is recorded and the session goes on.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
OUT="${OUT:-$ROOT/out/gpu-session}"
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
WORKERS="${WORKERS:-8}"
GPU_TESTS="tests/test_triton.py tests/test_triton_residual.py tests/test_native.py tests/test_native_residual.py \
tests/test_api.py tests/test_residual.py tests/test_nn.py tests/test_cli.py tests/test_dither.py tests/test_usage.py"
CHECKS="scripts/gpu_session_checks.py"

# name | seconds | output file (under $OUT) | command
STEPS=(
  "build|175|01-build.log|export MAX_JOBS=\$(nproc); $PY setup.py build_ext --inplace || $PY $CHECKS build-jit"
  "info|10|02-info.json|$PY -m fsq_kernels --json"
  "tests|60|03-tests.log|FSQ_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider -n $WORKERS -m 'not slow' $GPU_TESTS"
  "check|40|04-check.txt|$PY -m fsq_kernels check --device cuda --quick"
  "bench|30|05-bench.json|$PY -m fsq_kernels bench --device cuda --tokens 16777216 --json"
  "large|15|06-extras.txt|$PY $CHECKS large"
  "device guard and CUDA graph|10|06-extras.txt|$PY $CHECKS guard graph"
  "torch.compile|20|06-extras.txt|$PY $CHECKS compile"
)
# + 00-summary.txt (the plan, then each step's status and time) and 05-bench.txt (the table)
FILES=(00-summary.txt 05-bench.txt)

total=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r _ secs file _ <<<"$step"
  total=$((total + secs))
  [[ " ${FILES[*]} " == *" $file "* ]] || FILES+=("$file")
done

plan() {
  echo "fsq-kernels GPU session: ${#STEPS[@]} steps, at most ${total} s, ${#FILES[@]} files in \$OUT ($OUT)"
  local i=1
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name secs file cmd <<<"$step"
    printf '  %d. %-28s %4ss  -> %-14s %s\n' "$i" "$name" "$secs" "$file" "$cmd"
    i=$((i + 1))
  done
  echo "  files: ${FILES[*]}"
}

if (( total > 360 || ${#FILES[@]} > 8 )); then
  echo "gpu_session.sh: the plan breaks its limits (${total} s > 360 or ${#FILES[@]} files > 8)" >&2
  exit 3
fi
if (( DRY_RUN )); then
  plan
  # the helper must at least parse and list its checks here (no GPU needed for that)
  $PY "$CHECKS" --list >/dev/null || { echo "gpu_session.sh: $CHECKS --list failed" >&2; exit 4; }
  exit 0
fi

mkdir -p "$OUT"
SUMMARY="$OUT/00-summary.txt"
{ plan; echo; date -u '+started %Y-%m-%d %H:%M:%S UTC'; nvidia-smi -L 2>&1 | head -8; } >"$SUMMARY"
failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name secs file cmd <<<"$step"
  start=$(date +%s)
  if [[ "$file" == *.json ]]; then
    # JSON on stdout, progress and warnings in the summary
    timeout -s INT -k 10 "$secs" bash -c "$cmd" >"$OUT/$file" 2>>"$SUMMARY"
  else
    { echo "=== $name: $cmd"; } >>"$OUT/$file"
    timeout -s INT -k 10 "$secs" bash -c "$cmd" >>"$OUT/$file" 2>&1
  fi
  rc=$?
  status="ok"
  (( rc == 124 || rc == 137 )) && status="TIMED OUT after ${secs}s"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="FAILED (exit $rc)"
  [[ "$status" == ok ]] || failed=$((failed + 1))
  printf '%-28s %-22s %4ss  %s\n' "$name" "$status" "$(( $(date +%s) - start ))" "$file" >>"$SUMMARY"
  if [[ "$name" == bench && -s "$OUT/05-bench.json" ]]; then
    $PY -c "import json, sys; from fsq_kernels.quickbench import format_rows; r = json.load(open(sys.argv[1])); \
print(format_rows(r['rows'], r['device']))" "$OUT/05-bench.json" >"$OUT/05-bench.txt" 2>&1
  fi
done
tail -n 3 "$OUT/03-tests.log" >>"$SUMMARY" 2>/dev/null
tail -n 1 "$OUT/04-check.txt" >>"$SUMMARY" 2>/dev/null
date -u '+finished %Y-%m-%d %H:%M:%S UTC' >>"$SUMMARY"
echo "$failed of ${#STEPS[@]} steps failed or timed out" | tee -a "$SUMMARY"
cat "$SUMMARY"
exit $(( failed > 0 ))

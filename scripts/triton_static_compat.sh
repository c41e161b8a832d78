#!/usr/bin/env bash
# Compile the Triton kernels statically (PTX and ptxas for sm_80 and sm_90, no GPU needed) against
# several triton releases, each in a venv of its own, by running tests/test_triton_static.py
# there: vector loads, one load per element, 0 spills, for every kernel.
#
#   bash scripts/triton_static_compat.sh              # triton 3.6 and 3.8
#   bash scripts/triton_static_compat.sh 3.6 3.7      # others
#
# For the developer's machine, not CI: it downloads triton wheels (~150 MB each, from PyPI).
# Each venv sees the installed torch, pytest and fsq-kernels (--system-site-packages) and has only
# triton==VERSION.* of its own. Venvs live in $VENV_ROOT (default /tmp/fsq-triton-venvs) and are
# reused. Prints one line per version; logs go to $LOG_DIR (default build/triton-static).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
VENV_ROOT="${VENV_ROOT:-/tmp/fsq-triton-venvs}"
LOG_DIR="${LOG_DIR:-$ROOT/build/triton-static}"
VERSIONS=("$@")
(( ${#VERSIONS[@]} )) || VERSIONS=(3.6 3.8)
mkdir -p "$VENV_ROOT" "$LOG_DIR"

failed=0
for version in "${VERSIONS[@]}"; do
  venv="$VENV_ROOT/triton-$version"
  log="$LOG_DIR/triton-$version.log"
  if [[ ! -x "$venv/bin/python" ]]; then
    # no pip/setuptools of its own: the system's pip installs into the venv
    "$PY" -m venv --system-site-packages --without-pip "$venv" || { echo "triton $version: venv failed"; failed=1; continue; }
  fi
  if ! "$venv/bin/python" -m pip install -q --no-warn-conflicts "triton==$version.*" >"$log" 2>&1; then
    echo "triton $version: pip install failed (see $log)"; failed=1; continue
  fi
  got=$("$venv/bin/python" -c "import triton; print(triton.__version__)" 2>>"$log")
  start=$(date +%s)
  # each kernel case on its own, so that one that does not compile does not hide the others
  cases=$(env -u TRITON_INTERPRET PYTHONPATH="$ROOT" "$venv/bin/python" - 2>>"$log" <<'PY'
import importlib.util, json
spec = importlib.util.spec_from_file_location("static", "tests/test_triton_static.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
jobs = [(m._case, (k, dt, lay, cc)) for cc in m.TARGETS for k in m.KERNELS for dt in m.DTYPES for lay in m.LAYOUTS]
jobs += [(m._residual_case, (k, dt, lay, cc)) for cc in m.TARGETS for k, dt, lay in m.RESIDUAL_CASES]
ok, bad, spills = 0, [], 0
for fn, args in jobs:
    try:
        case = fn(*args)
        ok += 1
        spills += case["spill_store_bytes"] + case["spill_load_bytes"]
    except Exception as exc:
        bad.append(f"{'/'.join(map(str, args))}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:160]}")
print(f"{ok}/{len(jobs)} kernel cases compiled, {spills} spill bytes" + "".join(f"\n    not compiled: {b}" for b in bad))
PY
)
  echo "$cases" >>"$log"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton_static.py >>"$log" 2>&1
  rc=$?
  result=$(grep -E "(passed|failed|error).* in [0-9.]+s" "$log" | tail -n 1)
  echo "triton $got (venv $venv): $cases"
  echo "    tests/test_triton_static.py: ${result:-no pytest summary, see $log} [$(( $(date +%s) - start )) s]"
  (( rc == 0 )) || failed=1
done
exit $failed

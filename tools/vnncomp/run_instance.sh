#!/usr/bin/env bash
# VNN-COMP calling convention: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT
# Writes RESULTS_FILE (sat + counterexample / unsat / unknown / timeout / error).
set -uo pipefail
if [ "$#" -ne 6 ] || [ "$1" != "v1" ]; then
    echo "usage: $0 v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT" >&2
    exit 1
fi
ONNX="$3"; VNNLIB="$4"; RESULTS="$5"; TIMEOUT="$6"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${CERTONNX_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# leave ~1 s for interpreter start-up and writing the file
BUDGET=$(awk -v t="$TIMEOUT" 'BEGIN { b = t - 1.5; if (b < 1) b = 1; print b }')
"$PY" -m certonnx verify "$ONNX" "$VNNLIB" --timeout "$BUDGET" --results-file "$RESULTS"
rc=$?
if [ ! -s "$RESULTS" ]; then
    echo "error" > "$RESULTS"
fi
exit $rc

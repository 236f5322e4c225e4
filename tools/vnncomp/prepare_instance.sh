#!/usr/bin/env bash
# VNN-COMP calling convention: prepare_instance.sh v1 CATEGORY ONNX VNNLIB
# Checks that the network and property can be read (no verification, no state kept).
set -euo pipefail
if [ "$#" -ne 4 ] || [ "$1" != "v1" ]; then
    echo "usage: $0 v1 CATEGORY ONNX VNNLIB" >&2
    exit 1
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${CERTONNX_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" - "$3" "$4" <<'PYEOF'
import sys
from certonnx.certify.vnnlib import parse_vnnlib_file
from certonnx.io.load import read_model
read_model(sys.argv[1])
parse_vnnlib_file(sys.argv[2])
PYEOF

#!/usr/bin/env bash
# Install torch into the venv: from the PyTorch CPU wheel index when it is reachable
# (a ~200 MB CPU build), otherwise from the default index (PyPI, or what pip is
# configured with; on Linux that is the multi-GB CUDA build).  Says which one, and
# records it in $VENV/.torch-index.
#   usage: install_torch.sh VENV_PYTHON   (env: TORCH_SPEC, TORCH_INDEX, TORCH_RECORD)
set -euo pipefail
PY="$1"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"  # set but empty: default index
RECORD="${TORCH_RECORD:-$(dirname "$(dirname "$PY")")/.torch-index}"

reachable() {
    "$PY" - "$1" <<'PYEOF'
import sys
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)
except Exception:
    sys.exit(1)
PYEOF
}

if [ -z "$TORCH_INDEX" ]; then
    echo "torch: TORCH_INDEX is empty; using the default index" >&2
elif reachable "$TORCH_INDEX"; then
    echo "torch: installing $TORCH_SPEC from $TORCH_INDEX (the PyTorch CPU wheel index unless TORCH_INDEX is set)"
    if "$PY" -m pip install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX"; then
        echo "$TORCH_INDEX" > "$RECORD"
        exit 0
    fi
    echo "torch: installing from $TORCH_INDEX failed; falling back to the default index" >&2
else
    echo "torch: $TORCH_INDEX is not reachable; falling back to the default index" >&2
fi
echo "torch: installing $TORCH_SPEC from the default package index (on Linux PyPI serves the CUDA build)"
"$PY" -m pip install --quiet "$TORCH_SPEC"
echo "default" > "$RECORD"

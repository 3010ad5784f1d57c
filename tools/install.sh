#!/usr/bin/env bash
# Install areal-hpc (editable) with the CPU torch pin into the current Python environment.
# On a GPU cluster, install your site's CUDA torch first; then `pip install -e .` keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"   # CPU wheel; an unpinned torch pulls a multi-GB CUDA build
fi
"$PY" -m pip install -q -e ".[dev]"

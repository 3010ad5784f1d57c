#!/usr/bin/env bash
# Install areal-hpc for development (editable, with the test extras and ray) into the current Python
# environment. Which torch you end up with:
#   * A torch that is already installed is kept when it satisfies the torch floor in setup.cfg:
#     on a GPU cluster, install your site's CUDA build of torch first (module load / conda / the
#     matching wheel), then run this. An older torch would be replaced by pip.
#   * Without one, this script asks pip for torch==2.13.0. What that is depends on where pip looks:
#     on the project's dev/CI machines a local CPU wheel (2.13.0+cpu) is configured and taken; from
#     PyPI, on Linux, it is the CUDA build, which pulls the CUDA libraries (cuda-toolkit, cuDNN, NCCL,
#     ...: several GB).
#     For a CPU-only torch elsewhere, install it first from PyTorch's CPU index:
#       pip install torch --index-url https://download.pytorch.org/whl/cpu
# A non-editable install (`pip install .`, or a wheel from `pip wheel --no-deps .`) works too: the
# sbatch templates are package data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev,ray]"   # ray: mode=ray and its tests (no torch of its own)

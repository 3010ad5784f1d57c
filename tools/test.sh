#!/usr/bin/env bash
# The test command (README, CI): install areal-hpc + test deps into the active Python, install the
# local Slurm packages (root only; the tests start and stop the throw-away cluster themselves),
# then run pytest (its 25 slowest tests listed at the end: where CI's time goes). Extra arguments go to pytest,
# e.g. `tools/test.sh -m "not slurm" -x`. Two workers (pytest-xdist; the Slurm tests all in one, each other file in
# one): the suite waits on processes it started for much of its time, so two fill CI's two cores; `-n 0` runs one.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
if [ "$(id -u)" = 0 ]; then
    tools/slurm/local-cluster.sh install
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 -m pytest -q -rs --durations=25 -n 2 --dist loadgroup "$@"

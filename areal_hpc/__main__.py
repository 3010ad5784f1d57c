"""`python -m areal_hpc ...` == `areal-hpc ...` (compute nodes need no console script on PATH)."""

import sys

from areal_hpc.cli.main import main

sys.exit(main())

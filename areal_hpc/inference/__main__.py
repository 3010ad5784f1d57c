import sys

from areal_hpc.inference.server import main

sys.exit(main())

"""`python -m galore_bench.cli`, for launchers that take a module (torchrun -m); same as `galore-bench`."""

import sys

from galore_bench.cli import main

sys.exit(main())

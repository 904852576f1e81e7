"""`python -m galore_bench.cli`: what launchers that take a module (torchrun -m) run; same as `galore-bench`."""
import sys

from galore_bench.cli import main

sys.exit(main())

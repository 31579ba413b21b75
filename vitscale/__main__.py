"""`python -m vitscale` (and `torchrun -m vitscale`) runs the command line."""

import gc
import sys

# What the imports build (torch's ~200k objects) lives as long as the process, yet each of the
# collector's full passes scanned it again: ~1.5 s of CPU in a short training run. Collection is
# off while importing and the imported objects are frozen out of its passes; it is on for the run.
gc.disable()
from vitscale.cli import main  # noqa: E402

gc.freeze()
gc.enable()

sys.exit(main())

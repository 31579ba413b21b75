"""`python -m vitscale` (and `torchrun -m vitscale`) runs the command line."""

import sys

from vitscale.cli import main

sys.exit(main())

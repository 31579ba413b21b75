"""`python -m vitscale` (and `torchrun -m vitscale`) runs the command line."""

import sys

from vitscale.cli.main import main

sys.exit(main())

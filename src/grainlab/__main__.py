"""`python -m grainlab`: the `grainlab` command, as `torchrun -m grainlab boundaries train` runs it."""

import sys

from grainlab.cli import main

sys.exit(main())

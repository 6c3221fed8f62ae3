"""`python -m bpl`: the same as the `bpl` command."""

import sys

from bpl.cli import main

sys.exit(main())

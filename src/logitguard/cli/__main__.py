"""`python -m logitguard.cli` (what `accelerate launch -m logitguard.cli train ...` runs): the console script."""

import sys

from . import main

sys.exit(main())

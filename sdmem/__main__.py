"""`python -m sdmem` (and `accelerate launch -m sdmem ...`)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m sparsetrain``: the same command line as the ``sparsetrain`` script."""

import sys

from .cli import main

sys.exit(main())

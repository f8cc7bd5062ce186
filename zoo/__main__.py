"""``python -m zoo``: the same command line as the ``zoo`` console script."""

import sys

from zoo.cli import main

sys.exit(main())

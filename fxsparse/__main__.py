"""``python -m fxsparse``: the same command as the ``fxsparse`` console script."""

import sys

from .cli import main

sys.exit(main())

"""``python -m calid``: the same as the ``calid`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m wantel``: the same as the ``wantel`` console script."""

import sys

from wantel.cli import main

sys.exit(main())

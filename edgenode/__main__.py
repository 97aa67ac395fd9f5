"""``python -m edgenode``: the same as the ``edgenode`` command."""

import sys

from .cli import main

sys.exit(main())

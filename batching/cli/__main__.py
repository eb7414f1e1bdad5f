"""``python -m batching.cli``: the same as the ``batching`` command."""

import sys

from . import main

sys.exit(main())

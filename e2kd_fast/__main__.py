"""``python -m e2kd_fast``: the ``e2kd-fast`` command line."""

import sys

from e2kd_fast.cli import main

sys.exit(main())

"""``python -m colocate ...``: the same as the ``colocate`` command (used by Slurm hooks)."""

import sys

from colocate.cli import main

sys.exit(main())

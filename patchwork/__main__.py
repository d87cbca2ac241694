"""python -m patchwork: the `patchwork` command."""

import sys

from patchwork.cli import main

sys.exit(main())

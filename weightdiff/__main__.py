"""``python -m weightdiff`` — same as the ``weightdiff`` console script."""

import sys

from weightdiff.cli import main

sys.exit(main())

#!/usr/bin/env python
"""``weightdiff benchmark`` under its script name: the same options (``--help`` lists them).

    python scripts/benchmark.py --suite adapt-lora --model runs/demo/generator \
        --zoo checkpoints_zoo/rotdigits-lora --out runs/bench/adapt-lora --from-description
"""

from __future__ import annotations

import sys

from weightdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))

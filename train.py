#!/usr/bin/env python
"""Train a Kimi Linear model: a thin command line over `k2jax.training.cli` (`python train.py --help`).

With no arguments it trains configs/default.yaml, a small hybrid KDA/MLA MoE, on the embedded MQAR recall task.
"""

import sys

from k2jax.training.cli import main

if __name__ == "__main__":
    sys.exit(main())

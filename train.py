#!/usr/bin/env python
"""Train a Kimi Linear model: a thin command line over `k2jax.training.cli` (`python train.py --help`).

With no arguments it trains configs/default.yaml, a small hybrid KDA/MLA MoE, on the embedded MQAR recall task.
"""

import sys

from k2jax.training.cli import main
from k2jax.training.hostmem import reexec_with_huge_pages

if __name__ == "__main__":
    reexec_with_huge_pages()  # huge pages for XLA's per-step buffers (k2jax.training.hostmem; K2JAX_HUGE_PAGES=0: off)
    sys.exit(main())

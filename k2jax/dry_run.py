"""`python -m k2jax.dry_run`: plan a pod run without a pod (k2jax.training.dry_run; the arguments of train.py).

    python -m k2jax.dry_run --config kimi_linear_48b_a3b --mesh fsdp=8,expert=8 --batch 64 --seq-len 4096
"""

import sys

from k2jax.training.cli import dry_run_main

if __name__ == "__main__":
    sys.exit(dry_run_main())

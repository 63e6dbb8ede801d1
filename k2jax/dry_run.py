"""`python -m k2jax.dry_run`: plan a pod run without a pod (the command line of k2jax.training.dry_run).

    python -m k2jax.dry_run --config kimi_linear_48b_a3b --mesh fsdp=8,expert=8 --batch 64 --seq-len 4096
"""

from k2jax.training.dry_run import main

if __name__ == "__main__":
    main()

"""The `train.py` command line: `python train.py [--config FILE] [--data FILES] [key=value ...]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from k2jax.config import ConfigError
from k2jax.training.config import load_run_config
from k2jax.training.loop import TrainingDiverged, train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a Kimi Linear model. Without arguments: configs/default.yaml (a small hybrid KDA/MLA MoE) "
                    "on the embedded MQAR recall task.",
        epilog="Overrides: model.<field>=value and train.<field>=value (bare names work when unambiguous), "
               "e.g. model.hidden_size=256 train.steps=100 train.mesh.data=2.")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--config", default="default", help="run config: a configs/ name or a YAML file")
    p.add_argument("--data", help="text files to train on (comma-separated paths, globs or folders of .txt, "
                                  ".jsonl, .parquet); default: MQAR")
    p.add_argument("--run-dir", help="where metrics and checkpoints go (train.run_dir)")
    p.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    p.add_argument("--dry-run", action="store_true",
                   help="plan a pod run without one: lower one step on simulated devices and report memory "
                        "(k2jax.dry_run; see python -m k2jax.dry_run --help for its flags)")
    return p


def _default_compile_cache() -> None:
    """Reuse compiled programs across runs (JAX's persistent cache) unless the user chose a cache already."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/k2jax/jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: Sequence[str] | None = None) -> int:
    """`python train.py [--config FILE] [--data FILES] [key=value ...]`. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:
        from k2jax.training import dry_run

        dry_run.main(argv)
        return 0
    args = _parser().parse_intermixed_args(argv)
    _default_compile_cache()
    overrides = list(args.overrides)
    for flag, field in (("data", "data"), ("run_dir", "run_dir"), ("coordinator_address", "coordinator_address"),
                        ("num_processes", "num_processes"), ("process_id", "process_id")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"train.{field}={json.dumps(value) if isinstance(value, str) else value}")
    try:
        mcfg, tcfg = load_run_config(args.config, overrides)
        result = train(mcfg, tcfg)
    except (ConfigError, ValueError) as e:
        if os.environ.get("K2JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    last = result.evals[-1] if result.evals else None
    summary = f"{result.stopped} at step {result.step}"
    if result.losses:
        summary += f", loss {result.losses[result.step]:.4f}"
    if last:
        summary += f", eval accuracy {last['accuracy']:.4f}"
    print(f"{summary}; run directory {result.run_dir}")
    return 0

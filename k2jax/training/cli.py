"""The command lines of training: `python train.py [--config FILE] [--data FILES] [key=value ...]`, and its dry
run (`train.py --dry-run ...` or `python -m k2jax.dry_run ...`), which takes the same arguments and lowers the
same step on simulated devices. Unknown arguments are an error."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import jax

from k2jax.config import ConfigError
from k2jax.training import dry_run
from k2jax.training.config import load_run_config
from k2jax.training.loop import TrainingDiverged, train

# flag -> TrainConfig field it sets (an override like train.<field>=value, applied after the positional ones)
_TRAIN_FLAGS = {"data": "data", "run_dir": "run_dir", "batch": "batch_size", "seq_len": "seq_len",
                "coordinator_address": "coordinator_address", "num_processes": "num_processes",
                "process_id": "process_id"}


def parser(prog: str = "train.py", default_config: str = "default", dry_run_only: bool = False
           ) -> argparse.ArgumentParser:
    """The argument parser of train.py (and, with `dry_run_only`, of `python -m k2jax.dry_run`)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Plan a pod run without one: lower and compile the training step on simulated CPU devices and "
                    "report per-device memory." if dry_run_only else
                    "Train a Kimi Linear model. Without arguments: configs/default.yaml (a small hybrid KDA/MLA "
                    "MoE) on the embedded MQAR recall task.",
        epilog="Overrides: model.<field>=value and train.<field>=value (bare names work when unambiguous), "
               "e.g. model.hidden_size=256 train.steps=100 train.mesh.data=2.")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--config", default=default_config,
                   help=f"run config: a configs/ name, a YAML file or an HF config.json (default {default_config})")
    p.add_argument("--data", help="text files to train on (comma-separated paths, globs or folders of .txt, "
                                  ".jsonl, .parquet); default: MQAR (train.data)")
    p.add_argument("--batch", type=int, help="global batch in sequences (train.batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (train.seq_len)")
    p.add_argument("--run-dir", help="where metrics and checkpoints go (train.run_dir)")
    p.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    g = p.add_argument_group("dry run", None if dry_run_only else "with --dry-run: lower and compile one training "
                             "step on simulated CPU devices and report per-device memory (k2jax.training.dry_run)")
    if not dry_run_only:
        g.add_argument("--dry-run", action="store_true", help="plan a pod run instead of training")
    g.add_argument("--mesh", help="'fsdp=8,context=8' or 'data,fsdp,expert,context,tensor' sizes (default: the run "
                                  "config's train.mesh, else chosen for --devices)")
    g.add_argument("--devices", type=int, help="simulated device count (default: the mesh's size, else 8)")
    g.add_argument("--no-compile", action="store_true", help="lower only (no activation estimate)")
    g.add_argument("--target", choices=sorted(dry_run.TARGETS),
                   help="chip to check the plan against (HBM GiB: v5p 95, v6e 32, h200 141): prints whether it fits")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    """The positional overrides, then one train.<field>=value per given flag."""
    out = list(args.overrides)
    for flag, field in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            out.append(f"train.{field}={json.dumps(value) if isinstance(value, str) else value}")
    return out


def _default_compile_cache() -> None:
    """Reuse compiled programs across runs (JAX's persistent cache) unless the user chose a cache already."""

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/k2jax/jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _error(e: Exception) -> int:
    if os.environ.get("K2JAX_DEBUG"):
        raise e
    print(f"error: {e}", file=sys.stderr)
    return 2


def _dry_run(args: argparse.Namespace) -> int:
    reexec = list(getattr(sys, "orig_argv", [None] + sys.argv)[1:])
    try:
        dry_run.plan(args.config, _overrides(args), mesh=args.mesh, devices=args.devices,
                     compile=not args.no_compile, argv_for_reexec=reexec, target=args.target)
    except (ConfigError, ValueError) as e:
        return _error(e)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python train.py [--config FILE] [--data FILES] [key=value ...]`. Returns the exit status."""
    p = parser()
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
    if args.dry_run:
        return _dry_run(args)
    if args.mesh or args.devices or args.no_compile or args.target:
        p.error("--mesh, --devices, --no-compile and --target apply to --dry-run (the mesh of a run is train.mesh)")
    _default_compile_cache()
    try:
        mcfg, tcfg = load_run_config(args.config, _overrides(args))
        result = train(mcfg, tcfg)
    except (ConfigError, ValueError) as e:
        return _error(e)
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


def dry_run_main(argv: Sequence[str] | None = None) -> int:
    """`python -m k2jax.dry_run [--config FILE] [--mesh M] [--devices N] [key=value ...]` (default config: the
    48B model). Returns the exit status."""
    args = parser("python -m k2jax.dry_run", "kimi_linear_48b_a3b", dry_run_only=True).parse_intermixed_args(
        sys.argv[1:] if argv is None else list(argv))
    return _dry_run(args)

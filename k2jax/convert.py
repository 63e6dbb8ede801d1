"""Convert between Hugging Face checkpoints (safetensors) and k2jax orbax parameter checkpoints.

    python -m k2jax.convert hf-to-orbax --hf HF_DIR --out ORBAX_DIR [--dtype bfloat16]
    python -m k2jax.convert orbax-to-hf --orbax ORBAX_DIR --out HF_DIR [--config NAME_OR_PATH]
                                        [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]

Progress bars go to stderr; errors are one line naming the problem (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from k2jax.checkpoint import restore_params, save_params, saved_config
from k2jax.config_files import load_config
from k2jax.hf import load_hf_checkpoint, save_hf_checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m k2jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="HF folder (config.json + safetensors) -> orbax params checkpoint")
    a.add_argument("--hf", required=True, help="Hugging Face checkpoint folder")
    a.add_argument("--out", required=True, help="new orbax checkpoint directory (must not exist)")
    a.add_argument("--dtype", default=None, help="parameter dtype (default: the checkpoint's)")
    b = sub.add_parser("orbax-to-hf", help="orbax params checkpoint -> HF folder")
    b.add_argument("--orbax", required=True, help="orbax checkpoint directory written by save_params")
    b.add_argument("--out", required=True, help="Hugging Face checkpoint folder to write")
    b.add_argument("--config", default=None,
                   help="configs/ name, YAML or HF config.json of the model (default: the config saved with it)")
    b.add_argument("--dtype", default=None, help="tensor dtype to write (default: the saved parameters')")
    b.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB or bytes (default 5GB)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def _hf_to_orbax(args) -> Path:
    if Path(args.out).exists():
        raise FileExistsError(f"--out {args.out} already exists")
    model = load_hf_checkpoint(args.hf, dtype=args.dtype, progress=True)
    print(f"saving orbax checkpoint to {args.out} ...", file=sys.stderr)
    return save_params(model, args.out)


def _orbax_to_hf(args) -> Path:
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} already exists (pass --overwrite to replace it)")
    config = load_config(args.config) if args.config else saved_config(args.orbax)
    if args.dtype:
        config = config.replace(param_dtype=args.dtype)
    print(f"restoring {args.orbax} ...", file=sys.stderr)
    model = restore_params(config, args.orbax)
    return save_hf_checkpoint(model, args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                              progress=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 on a bad input or checkpoint)."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        out = _hf_to_orbax(args) if args.command == "hf-to-orbax" else _orbax_to_hf(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

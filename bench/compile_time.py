"""Compile time of one training step against depth, with and without scanned layers.

    python bench/compile_time.py                       # 7 and 28 layers, scanned and unrolled (a few minutes)
    python bench/compile_time.py --layers 7 28 --scanned-only

The model is configs/tiny.yaml with the 48B layer schedule (every 4th layer MLA, layer 0 dense FFN, the rest
MoE) at the requested depth. The step is training's (k2jax.training.step: loss, gradients, AdamW update, router
bias update), lowered by the dry run on one CPU device, batch 2 x 64 tokens; the persistent compilation cache is
off. Reported: trace + lower seconds, XLA compile seconds, and
their sum; with --scan, layers are scanned in groups of the repeating pattern (config.scan_layers), so the
program holds one copy of the pattern whatever the depth.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from k2jax.config_files import load_config  # noqa: E402
from k2jax.model import block_layout  # noqa: E402
from k2jax.training.dry_run import dry_run  # noqa: E402


def config_with_depth(layers: int, scan: bool):
    """configs/tiny.yaml at `layers` layers with the 48B schedule (1-based MLA layers 4, 8, ... and the last)."""
    mla = [i for i in range(1, layers + 1) if i % 4 == 0 or i == layers]
    kda = [i for i in range(1, layers + 1) if i not in mla]
    return load_config("tiny", num_hidden_layers=layers, kda_layers=kda, full_attn_layers=mla, scan_layers=scan)


def compile_seconds(config, batch: int = 2, seq_len: int = 64) -> tuple[float, float]:
    """(trace + lower seconds, compile seconds) of the training step, layers as the config says."""
    r = dry_run(config, {"data": 1}, batch, seq_len, scan_layers=config.scan_layers, devices=jax.devices()[:1],
                verbose=False)
    return r["lower_s"], r["compile_s"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[7, 28])
    p.add_argument("--scanned-only", action="store_true")
    args = p.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    # Untimed warm-up: the first trace and compile of a process pay one-off costs (imports, kernel caches).
    compile_seconds(load_config("tiny", num_hidden_layers=1, kda_layers=[1], full_attn_layers=[]))
    rows = []
    for n in args.layers:  # depth-major, so both layouts of a depth see about the same machine load
        for scan in ([True] if args.scanned_only else [True, False]):
            cfg = config_with_depth(n, scan)
            lower_s, compile_s = compile_seconds(cfg)
            bodies = sum(1 if e[0] == "layer" else e[2] for e in block_layout(cfg)) if scan else n
            rows.append((n, scan, bodies, lower_s, compile_s))
            print(f"layers {n:3d}  {'scanned' if scan else 'unrolled':8s}  layer bodies {bodies:3d}  "
                  f"lower {lower_s:6.1f} s  compile {compile_s:6.1f} s  total {lower_s + compile_s:6.1f} s",
                  flush=True)
    for scan in (True, False):
        sel = [r for r in rows if r[1] == scan]
        if len(sel) >= 2:
            lo, hi = sel[0], sel[-1]
            ratio = (hi[3] + hi[4]) / (lo[3] + lo[4])
            print(f"{'scanned' if scan else 'unrolled'}: {hi[0]} / {lo[0]} layers total time ratio {ratio:.2f}")


if __name__ == "__main__":
    main()

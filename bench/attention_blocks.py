"""Benchmark (not a test): the XLA blocked attention's forward + backward time by block size, against the blocks
`default_blocks` picks.

    python bench/attention_blocks.py                               # the shapes default_blocks' rule was set on
    python bench/attention_blocks.py --shapes 32x256,1x4096 --blocks 256x512,64x64 --repeats 9 --out r.md

Each shape BxT: B rows of T tokens, H query and key heads (--heads, default 4), q/k head dim --dk (48) and v head
dim --dv (32): the default config's expanded MLA. Causal, float32, jitted forward and backward (a vjp against a
fixed cotangent); the blocks of one shape are timed in interleaved rounds (bench.timing.interleaved_medians), so
compare within a row. 'auto' is `default_blocks(B, H, T, T)`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench.timing import interleaved_medians, write_report  # noqa: E402
from pallas_kernels.attention import attention_blocked  # noqa: E402
from pallas_kernels.attention.blocked import default_blocks  # noqa: E402


def fwd_bwd(block_q, block_k, ct):
    """Jitted (q, k, v) -> (o, (dq, dk, dv)) of causal `attention_blocked` with these blocks against cotangent ct."""
    def run(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: attention_blocked(q, k, v, block_q=block_q, block_k=block_k), q, k, v)
        return o, vjp(ct)
    return jax.jit(run)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="32x256,8x1024,4x2048,1x4096", help="comma-separated BxT")
    p.add_argument("--blocks", default="256x512,128x256,128x128,64x128,64x64", help="comma-separated QxK")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dk", type=int, default=48)
    p.add_argument("--dv", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    blocks = [tuple(int(n) for n in b.split("x")) for b in args.blocks.split(",")]
    H = args.heads
    lines = [f"XLA blocked attention, causal, float32, forward + backward, H={H}, Dk={args.dk}, Dv={args.dv}: "
             "median ms (interleaved)", "",
             "| B x T | auto (blocks) | " + " | ".join(f"{q}x{k}" for q, k in blocks) + " |",
             "|---|---:|" + "---:|" * len(blocks)]
    for shape in args.shapes.split(","):
        B, T = (int(n) for n in shape.split("x"))
        keys = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(keys[0], (B, T, H, args.dk))
        k = jax.random.normal(keys[1], (B, T, H, args.dk))
        v = jax.random.normal(keys[2], (B, T, H, args.dv))
        ct = jax.random.normal(keys[3], (B, T, H, args.dv))
        auto = default_blocks(B, H, T, T)
        fns = {"auto": fwd_bwd(None, None, ct), **{b: fwd_bwd(*b, ct) for b in blocks}}
        ms = {name: s * 1e3 for name, s in interleaved_medians(fns, (q, k, v), repeats=args.repeats).items()}
        lines.append(f"| {B} x {T} | {ms['auto']:.1f} ({auto[0]}x{auto[1]}) | "
                     + " | ".join(f"{ms[b]:.1f}" for b in blocks) + " |")
    write_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()

"""Benchmark: the XLA INT4 weight-only matmul path vs a bf16 matmul, at decode and prefill shapes.

Prints a markdown table: median wall time per call (jitted, after warm-up), and the weight bytes each variant
reads (int4: packed nibbles + bf16 group scales; bf16: the dense weight). On CPU the int4 XLA path dequantizes
the whole weight (to float32) and then runs an f32 dot, so its time is the dequantize plus a dot that CPUs run
faster in f32 than in bf16; the byte column is what a TPU/GPU kernel, which dequantizes tiles on chip, saves.

    python bench/int4.py [--repeats 5] [--impl xla]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.int4 import int4_matmul, quantize_int4  # noqa: E402

SHAPES = [  # (label, M, K, N)
    ("decode", 1, 2048, 2048), ("decode", 8, 2048, 2048), ("decode", 64, 2048, 2048),
    ("prefill", 2048, 2048, 2048),
    ("expert decode", 1, 2304, 1024), ("expert decode", 8, 2304, 1024), ("expert decode", 64, 2304, 1024),
    ("expert prefill", 2048, 2304, 1024),
]


def _median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def run(repeats: int, impl: str):
    bf16_mm = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    int4_mm = jax.jit(lambda x, qw: int4_matmul(x, qw, impl=impl))
    rows = []
    for label, M, K, N in SHAPES:
        kx, kw = jax.random.split(jax.random.PRNGKey(M + K + N))
        w = jax.random.normal(kw, (K, N), jnp.float32)
        x = jax.random.normal(kx, (M, K), jnp.float32).astype(jnp.bfloat16)
        qw = quantize_int4(w)
        wb = w.astype(jnp.bfloat16)
        t_bf16 = _median_ms(bf16_mm, x, wb, repeats=repeats)
        t_int4 = _median_ms(int4_mm, x, qw, repeats=repeats)
        rows.append((label, M, K, N, t_bf16, t_int4, wb.nbytes, qw.nbytes))
    return rows


def table(rows, impl: str) -> str:
    out = [f"| shape | M | K | N | bf16 matmul (ms) | int4 {impl} (ms) | int4 / bf16 time | bf16 weight bytes | "
           "int4 weight bytes | bytes ratio |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for label, M, K, N, tb, ti, bb, bi in rows:
        out.append(f"| {label} | {M} | {K} | {N} | {tb:.2f} | {ti:.2f} | {ti / tb:.2f}x | {bb:,} | {bi:,} | "
                   f"{bb / bi:.2f}x |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impl", default="xla", choices=("xla", "auto", "pallas"))
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, x bf16, median of {args.repeats}")
    print(table(run(args.repeats, args.impl), args.impl))


if __name__ == "__main__":
    main()

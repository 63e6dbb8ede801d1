"""Benchmark (not a test): KDA forward and forward+backward wall time per implementation, with achieved GFLOP/s.

    python bench/kda.py [--quick] [--lengths 512,2048,8192] [--impls reference,chunk,pallas] [--out results.md]

Shapes: B=1, H=4, K=V=128, float32, under jit; compile and one warm-up run are excluded, each cell is the median
of --repeats runs. FLOPs follow the Kimi Linear tech report's per-head count (arXiv 2510.26692):
forward = 6*T*d^2 + 3*T*C*d + T*C^2 with C=64, d=128; backward counted as 2x forward (the customary convention),
so forward+backward = 3x forward. The plain float32 matmul (--matmul N, N^3) is the machine's practical limit:
it is timed right before every timed KDA call and each cell reports the median of (KDA rate / matmul rate), so
the percentage stays meaningful on a shared, noisy machine (wall times there are not).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import interleaved_rate, median_seconds  # noqa: E402
from pallas_kernels.kda.dispatch import IMPLS, kda  # noqa: E402

B, H, D, C = 1, 4, 128, 64
BWD_FACTOR = 2.0


def kda_flops(T: int) -> float:
    """Forward FLOPs for the benchmark shape (per head count times B*H)."""
    return B * H * (6 * T * D**2 + 3 * T * C * D + T * C**2)


def make_inputs(T: int, seed: int = 0):
    """L2-normalised q, k; log-decays g = -softplus(.); beta in (0, 1); random initial state and cotangents."""
    ks = jax.random.split(jax.random.key(seed), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(ks[0], (B, T, H, D)))
    k = unit(jax.random.normal(ks[1], (B, T, H, D)))
    v = jax.random.normal(ks[2], (B, T, H, D))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, D)) - 2.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    s0 = 0.1 * jax.random.normal(ks[5], (B, H, D, D))
    do = jax.random.normal(ks[6], (B, T, H, D))
    ds = jax.random.normal(ks[7], (B, H, D, D))
    return (q, k, v, g, beta, s0), (do, ds)


def build(impl: str):
    """Jitted forward and forward+backward (gradients wrt q, k, v, g, beta, initial_state) for `impl`."""
    def fwd(q, k, v, g, beta, s0):
        return kda(q, k, v, g, beta, initial_state=s0, output_final_state=True, impl=impl)

    def loss(args, cot):
        o, s = fwd(*args)
        return jnp.sum(o * cot[0]) + jnp.sum(s * cot[1])

    return jax.jit(fwd), jax.jit(jax.grad(loss))


def matmul_call(n: int):
    """(jitted float32 n x n matmul, its operands, its FLOPs): the reference rate."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    return jax.jit(jnp.dot), (a, b), 2.0 * n**3


def matmul_gflops(n: int, repeats: int) -> float:
    fn, args, flops = matmul_call(n)
    return flops / median_seconds(fn, *args, repeats=repeats) / 1e9


def _ratio(ref, x) -> float:
    ref, x = jnp.asarray(ref, jnp.float32), jnp.asarray(x, jnp.float32)
    return float(jnp.linalg.norm(ref - x) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def pallas_check(T: int, args, cot, oracle: str) -> str:
    """Interpret-mode Pallas vs `oracle`: error ratios of o, final state and the worst of the six gradients."""
    (fp, fbp), (fo, fbo) = build("pallas"), build(oracle)
    (o_p, s_p), (o_o, s_o) = fp(*args), fo(*args)
    grads = max(_ratio(a, b) for a, b in zip(fbo(args, cot), fbp(args, cot)))
    return (f"| {T} | pallas (interpret) vs {oracle} | o {_ratio(o_o, o_p):.1e} | state {_ratio(s_o, s_p):.1e} "
            f"| grads (max of 6) {grads:.1e} | — | — | — | — |")


def run(lengths, impls, repeats, ref_bwd_max, matmul_n):
    peak = matmul_gflops(matmul_n, repeats)
    mm, mm_args, mm_flops = matmul_call(matmul_n)
    rate = lambda fn, args, flops: interleaved_rate(fn, args, flops, mm, mm_args, mm_flops,  # noqa: E731
                                                    repeats=repeats)
    rows, notes = [], []
    for T in lengths:
        args, cot = make_inputs(T)
        flops = kda_flops(T)
        for impl in impls:
            if impl == "pallas" and jax.default_backend() == "cpu":
                # On CPU Pallas only interprets: report correctness, not time.
                rows.append(pallas_check(T, args, cot, "reference" if T <= ref_bwd_max else "chunk"))
                print(rows[-1], flush=True)
                continue
            f, fb = build(impl)
            tf, pf = rate(f, args, flops)
            if impl == "reference" and T > ref_bwd_max:
                tb = pb = None
                notes.append(f"reference fwd+bwd skipped at T={T} (> --ref-bwd-max {ref_bwd_max}): too slow on CPU.")
            else:
                tb, pb = rate(fb, (args, cot), (1 + BWD_FACTOR) * flops)
            gb = None if tb is None else (1 + BWD_FACTOR) * flops / tb / 1e9
            rows.append((T, impl, tf, flops / tf / 1e9, pf, tb, gb, pb))
            print(_row(rows[-1]), flush=True)
    return peak, rows, notes


def _row(r):
    if isinstance(r, str):
        return r
    T, impl, tf, gf, pf, tb, gb, pb = r
    fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    return (f"| {T} | {impl} | {tf * 1e3:.1f} | {gf:.2f} | {pct(pf)} | {fmt(tb and tb * 1e3, '.1f')} "
            f"| {fmt(gb, '.2f')} | {pct(pb)} |")


def table(peak, rows, notes, matmul_n) -> str:
    head = [
        f"KDA on {jax.default_backend().upper()} ({jax.devices()[0].device_kind}, {os.cpu_count()} cores visible, "
        f"load average (1/5/15 min) at the end {'/'.join(f'{x:.1f}' for x in os.getloadavg())}), "
        f"jax {jax.__version__}; B={B}, H={H}, K=V={D}, float32, "
        "jit, median wall time (compile and one warm-up run excluded).",
        f"FLOPs per head: forward 6*T*d^2 + 3*T*C*d + T*C^2 (C={C}, d={D}); fwd+bwd counted as "
        f"{1 + BWD_FACTOR:g}x forward (backward = {BWD_FACTOR:g}x forward).",
        f"Practical limit: plain float32 matmul {matmul_n}^3 = {peak:.1f} GFLOP/s at the start; '% mm' = median of "
        "(KDA rate / rate of that matmul timed right before each call).",
        "",
        "| T | impl | fwd ms | fwd GFLOP/s | fwd % mm | fwd+bwd ms | fwd+bwd GFLOP/s | fwd+bwd % mm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [_row(r) for r in rows] + [""] + [f"Note: {n}" for n in notes])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,2048,8192", help="comma-separated sequence lengths T")
    p.add_argument("--impls", default="reference,chunk",
                   help=f"comma-separated implementations, from {[i for i in IMPLS if i != 'auto']}")
    p.add_argument("--quick", action="store_true", help="T=512,2048 only, 3 repeats")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ref-bwd-max", type=int, default=2048,
                   help="skip reference fwd+bwd above this T (the per-token scan backward is slow)")
    p.add_argument("--matmul", type=int, default=2048, help="size n of the n^3 float32 matmul peak")
    p.add_argument("--out", help="also write the markdown table to this file")
    a = p.parse_args(argv)
    lengths = [512, 2048] if a.quick else [int(x) for x in a.lengths.split(",")]
    repeats = 3 if a.quick else a.repeats
    impls = [x.strip() for x in a.impls.split(",") if x.strip()]
    bad = [x for x in impls if x not in IMPLS or x == "auto"]
    if bad:
        p.error(f"unknown --impls {bad}; choose from {[i for i in IMPLS if i != 'auto']}")
    peak, rows, notes = run(lengths, impls, repeats, a.ref_bwd_max, a.matmul)
    md = table(peak, rows, notes, a.matmul)
    print()
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()

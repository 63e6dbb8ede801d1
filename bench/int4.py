"""Benchmark: the XLA INT4 weight-only matmul path vs a bf16 matmul, at decode and prefill shapes.

Prints a markdown table: median wall time per call (jitted, after warm-up), and the weight bytes each variant
reads (int4: packed nibbles + bf16 group scales; bf16: the dense weight). On CPU the int4 XLA path dequantizes
the whole weight (to float32) and then runs an f32 dot, so its time is the dequantize plus a dot that CPUs run
faster in f32 than in bf16; the byte column is what a TPU/GPU kernel, which dequantizes tiles on chip, saves.

The second table times one whole MoE layer (k2jax.layers.moe.MoE: router, routed experts, shared expert; bf16 compute,
moe_impl 'auto') with bf16 experts vs INT4 experts (config quantization.experts: int4, the same weights packed),
at the Kimi Linear 48B expert shape (hidden 2304, I 1024) with fewer experts (--moe-experts, top --moe-topk).
"touched" bytes are the routed-expert weights of the experts this batch selects: what a grouped kernel reads
(on CPU, decode-sized batches take the dense path, which reads every expert).

    python bench/int4.py [--repeats 5] [--impl xla] [--what all|matmul|moe]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.timing import median_seconds  # noqa: E402
from k2jax import load_config  # noqa: E402
from k2jax.layers.moe import MoE  # noqa: E402
from pallas_kernels.int4 import int4_matmul, quantize_int4  # noqa: E402

SHAPES = [  # (label, M, K, N)
    ("decode", 1, 2048, 2048), ("decode", 8, 2048, 2048), ("decode", 64, 2048, 2048),
    ("prefill", 2048, 2048, 2048),
    ("expert decode", 1, 2304, 1024), ("expert decode", 8, 2304, 1024), ("expert decode", 64, 2304, 1024),
    ("expert prefill", 2048, 2304, 1024),
]


def _ms(fn, *args, repeats: int) -> float:
    return 1e3 * median_seconds(fn, *args, repeats=repeats)


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
        t_bf16 = _ms(bf16_mm, x, wb, repeats=repeats)
        t_int4 = _ms(int4_mm, x, qw, repeats=repeats)
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


MOE_TOKENS = [("decode", 1), ("decode", 8), ("decode", 64), ("prefill", 512), ("prefill", 2048)]


def moe_layers(experts: int, topk: int):
    """(bf16 MoE, INT4 MoE) with the same router, shared expert and (packed) routed experts."""
    cfg = load_config("kimi_linear_48b_a3b").replace(num_experts=experts, num_experts_per_token=topk,
                                                     param_dtype="bfloat16", dtype="bfloat16", moe_impl="auto")
    fm = MoE(cfg, rngs=nnx.Rngs(0))
    qm = nnx.eval_shape(lambda: MoE(cfg.replace(quantization={"experts": "int4"}), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(qm)
    src = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(fm, nnx.Variable))}
    flat = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(path)
        if path[0] == "experts":
            name, part = str(path[1]).split("_")
            value = getattr(quantize_int4(src[("experts", name)]), part)
        else:
            value = src[path]
        flat.append((path, var.replace(value)))
    return cfg, fm, nnx.merge(graphdef, nnx.from_flat_state(flat))


def run_moe(repeats: int, experts: int, topk: int):
    cfg, fm, qm = moe_layers(experts, topk)
    fwd = nnx.jit(lambda m, x: m(x)[0])
    per_expert_bf16 = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    per_expert_int4 = per_expert_bf16 // 4 + 3 * cfg.hidden_size * cfg.moe_intermediate_size // 32 * 2
    rows = []
    for label, M in MOE_TOKENS:
        x = jax.random.normal(jax.random.PRNGKey(M), (1, M, cfg.hidden_size), jnp.float32).astype(jnp.bfloat16)
        idx, _ = fm.gate(x.reshape(M, -1))
        touched = int(np.unique(np.asarray(idx)).size)
        rows.append((label, M, touched, _ms(fwd, fm, x, repeats=repeats),
                     _ms(fwd, qm, x, repeats=repeats), touched * per_expert_bf16, touched * per_expert_int4))
    return cfg, rows


def moe_table(cfg, rows) -> str:
    out = [f"MoE layer: {cfg.num_experts} experts top-{cfg.num_experts_per_token}, hidden {cfg.hidden_size}, "
           f"I {cfg.moe_intermediate_size}, 1 shared expert, bf16 compute",
           "| shape | tokens | experts touched | bf16 MoE (ms) | INT4 MoE (ms) | INT4 / bf16 time | "
           "bf16 bytes touched | INT4 bytes touched | bytes ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, M, touched, tb, ti, bb, bi in rows:
        out.append(f"| {label} | {M} | {touched} | {tb:.2f} | {ti:.2f} | {ti / tb:.2f}x | {bb:,} | {bi:,} | "
                   f"{bb / bi:.2f}x |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impl", default="xla", choices=("xla", "auto", "pallas"))
    ap.add_argument("--what", default="all", choices=("all", "matmul", "moe"))
    ap.add_argument("--moe-experts", type=int, default=16)
    ap.add_argument("--moe-topk", type=int, default=4)
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, x bf16, median of {args.repeats}")
    if args.what in ("all", "matmul"):
        print(table(run(args.repeats, args.impl), args.impl))
    if args.what in ("all", "moe"):
        print(moe_table(*run_moe(args.repeats, args.moe_experts, args.moe_topk)))


if __name__ == "__main__":
    main()

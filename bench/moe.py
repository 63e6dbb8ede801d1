"""Time the routed-expert implementations of k2jax.layers.moe on this machine: the table behind moe_impl='auto'.

    python bench/moe.py                      # both shapes (a few minutes on 2 CPU cores)
    python bench/moe.py --shapes default     # the CPU demo config only (seconds)

For each shape: forward, and forward + backward (grads wrt x and the expert weights), of
- dense:        every expert on every token (E / k x the useful FLOPs),
- ragged:       the sorted dropless path with its platform grouped matmul (blocked on CPU, ragged_dot else),
- ragged_xla:   the same with `jax.lax.ragged_dot` forced (what 'ragged' runs on TPU/GPU; masked dense on CPU).
Routing comes from a random router (roughly balanced loads). Times are the median of --repeats runs after one
compile-and-run call, in milliseconds. ragged_xla at the large shape runs at --xla-tokens tokens and is scaled
linearly to the full count (it is G x dense on CPU and would take minutes); such rows are marked '*'.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import median_seconds  # noqa: E402
from k2jax import load_config  # noqa: E402
from k2jax.layers import moe  # noqa: E402
from pallas_kernels.moe import xla_ragged_dot  # noqa: E402

SHAPES = {
    # name: (config overrides, tokens)
    "default": (dict(), 8 * 256),
    "decode": (dict(), 8),
    "small32": (dict(), 32),
    "small64": (dict(), 64),
    "small256": (dict(), 256),
    "large": (dict(num_experts=64, num_experts_per_token=8, hidden_size=1024, moe_intermediate_size=512,
                   num_expert_group=1, topk_group=1), 4096),
}
IMPLS = {
    "dense": moe.experts_dense,
    "ragged": moe.experts_sorted,
    "ragged_xla": lambda *a: moe.experts_sorted(*a, gmm=xla_ragged_dot),
}


def _case(cfg, tokens, dtype, seed=0):
    E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (tokens, D), jnp.float32)
    kernel = jax.random.normal(ks[1], (D, E), jnp.float32) * 0.02
    idx, w = moe.route(cfg, x, kernel, jnp.zeros((E,), jnp.float32))
    ws = [(jax.random.normal(k, s, jnp.float32) * 0.02).astype(dtype)
          for k, s in zip(ks[2:], [(E, D, I), (E, D, I), (E, I, D)])]
    return x.astype(dtype), idx, w, ws


def bench(shapes, impls, dtype, repeats, xla_tokens, large_tokens):
    dt = jnp.dtype(dtype)
    base = load_config("default")
    print(f"platform={jax.default_backend()} devices={jax.device_count()} dtype={dtype} repeats={repeats}")
    print("| shape | E | k | hidden | I | tokens | impl | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in shapes:
        overrides, tokens = SHAPES[name]
        tokens = large_tokens if name == "large" else tokens
        cfg = base.replace(**overrides)
        for impl_name in impls:
            impl = IMPLS[impl_name]
            n = tokens
            if impl_name == "ragged_xla" and name == "large" and jax.default_backend() == "cpu":
                n = min(tokens, xla_tokens)
            x, idx, w, (w1, w3, w2) = _case(cfg, n, dt)
            fwd = jax.jit(lambda x, idx, w, w1, w3, w2, impl=impl: impl(x, idx, w, w1, w3, w2, dt))
            loss = lambda x, w1, w3, w2, idx, w, impl=impl: jnp.sum(impl(x, idx, w, w1, w3, w2, dt) ** 2)
            bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
            scale = tokens / n
            f_ms = 1e3 * median_seconds(fwd, x, idx, w, w1, w3, w2, repeats=repeats) * scale
            b_ms = 1e3 * median_seconds(bwd, x, w1, w3, w2, idx, w, repeats=repeats) * scale
            mark = "*" if n != tokens else ""
            print(f"| {name} | {cfg.num_experts} | {cfg.num_experts_per_token} | {cfg.hidden_size} | "
                  f"{cfg.moe_intermediate_size} | {tokens} | {impl_name}{mark} | {f_ms:.1f} | {b_ms:.1f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="default,large", help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + ",".join(IMPLS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--xla-tokens", type=int, default=256, help="tokens for ragged_xla at the large shape on CPU")
    ap.add_argument("--large-tokens", type=int, default=4096, help="tokens of the large shape (4096: its definition)")
    a = ap.parse_args()
    shapes = [s for s in a.shapes.split(",") if s]
    impls = [s for s in a.impls.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES] + [s for s in impls if s not in IMPLS]
    if bad:
        ap.error(f"unknown shapes/impls {bad}; choose from {list(SHAPES)} / {list(IMPLS)}")
    bench(shapes, impls, a.dtype, a.repeats, a.xla_tokens, a.large_tokens)


if __name__ == "__main__":
    main()

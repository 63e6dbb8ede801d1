"""KDA context parallelism: what splitting a sequence over n devices costs beyond one device's kda.

    python bench/context_parallel.py [--T 4096 --H 4 --K 128 --V 128 --repeats 3]

Part 1, measured on simulated CPU devices (they share the host's cores, so wall time shows total work, not
speedup): forward + backward of `kda` on the whole row on one device against `kda_context_parallel` with the row
split over context = 2, 4, 8, with per device: matmul flops (counted from the program, scan bodies times their
length), bytes sent by collectives, and XLA's temporary memory against that of a plain local `kda` call on the
shard's T / n tokens.

Part 2, counted (traced on an abstract mesh, nothing runs): the same per-device figures at 1,048,576 tokens, the
48B model's KDA shape (H = 32, K = V = 128), on 64, 128 and 256 devices.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

if __name__ == "__main__":   # simulated devices must be requested before jax is imported
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from bench.timing import median_seconds
from pallas_kernels.kda import kda, kda_context_parallel

COLLECTIVES = ("ppermute", "all_gather", "psum", "psum_invariant", "all_reduce")


def _sub_jaxprs(params):
    """Jaxprs held in an equation's params (scan/pjit bodies, cond branches, shard_map and custom-vjp bodies)."""
    for value in params.values():
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr


def count(jaxpr):
    """(matmul flops, collective bytes sent, ppermutes) per device of a jaxpr: dot_general flops and the operand
    bytes of collectives, scan bodies times their length, the largest branch of a cond."""
    flops = sent = permutes = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            flops += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif name in COLLECTIVES:
            sent += sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in eqn.invars)
            permutes += name == "ppermute"
        subs = [count(j) for j in _sub_jaxprs(eqn.params)]
        if not subs:
            continue
        totals = max(subs) if name == "cond" else tuple(sum(x) for x in zip(*subs))
        times = eqn.params.get("length", 1) if name == "scan" else 1
        flops, sent, permutes = (a + times * b for a, b in zip((flops, sent, permutes), totals))
    return flops, sent, permutes


def inputs(B, T, H, K, V, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(jax.random.normal(ks[0], (B, T, H, K))), unit(jax.random.normal(ks[1], (B, T, H, K)))
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)) + 2.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    s0 = jax.random.normal(ks[5], (B, H, K, V))
    return tuple(x.astype(dtype) for x in (q, k, v)) + (g, beta, s0)


def loss_single(chunk):
    def loss(q, k, v, g, beta, s0):
        o, s = kda(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=chunk, impl="chunk")
        return o.astype(jnp.float32).sum() + s.sum()
    return loss


def loss_context(mesh, chunk):
    seq = P(None, "context")

    def local(q, k, v, g, beta, s0):
        return kda_context_parallel(q, k, v, g, beta, axis_name="context", initial_state=s0,
                                    output_final_state=True, chunk_size=chunk, impl="chunk")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(seq,) * 5 + (P(),), out_specs=(seq, P()))

    def loss(*args):
        o, s = sharded(*args)
        return o.astype(jnp.float32).sum() + s.sum()
    return loss


def grad_fn(loss):
    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))


def program_counts(fn, args):
    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def temp_bytes(fn, args):
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def specs(B, T, H, K, V, dtype):
    s = jax.ShapeDtypeStruct
    return (s((B, T, H, K), dtype), s((B, T, H, K), dtype), s((B, T, H, V), dtype), s((B, T, H, K), jnp.float32),
            s((B, T, H), jnp.float32), s((B, H, K, V), jnp.float32))


def measured(a):
    dtype = jnp.dtype(a.dtype)
    args = inputs(a.B, a.T, a.H, a.K, a.V, dtype)
    print(f"Part 1: forward + backward, B={a.B} T={a.T} H={a.H} K={a.K} V={a.V} chunk {a.chunk} {dtype.name}, "
          f"{jax.device_count()} simulated CPU devices, median of {a.repeats}")
    print(f"{'context':>8} {'seconds':>8} {'x 1 dev':>8} {'GFLOP/dev':>10} {'sum/1dev':>9} {'coll KiB/dev':>13} "
          f"{'temp MiB/dev':>13} {'x local kda':>12}")
    single = grad_fn(loss_single(a.chunk))
    t1 = median_seconds(single, *args, repeats=a.repeats)
    f1 = program_counts(single, args)[0]
    print(f"{'1 (kda)':>8} {t1:8.3f} {1.0:8.2f} {f1 / 1e9:10.3f} {1.0:9.2f} {0:13.1f} "
          f"{temp_bytes(single, args) / 2**20:13.1f} {'':>12}")
    for n in (2, 4, 8):
        mesh = Mesh(np.array(jax.devices()[:n]), ("context",))
        fn = grad_fn(loss_context(mesh, a.chunk))
        t = median_seconds(fn, *args, repeats=a.repeats)
        f, sent, _ = program_counts(fn, args)
        local = grad_fn(loss_single(a.chunk))
        local_args = tuple(x[:, : a.T // n] if x.ndim >= 3 and x.shape[1] == a.T else x for x in args)
        mem, mem_local = temp_bytes(fn, args), temp_bytes(local, local_args)
        print(f"{n:>8} {t:8.3f} {t / t1:8.2f} {f / 1e9:10.3f} {n * f / f1:9.2f} {sent / 2**10:13.1f} "
              f"{mem / 2**20:13.1f} {mem / mem_local:12.2f}")


def counted(chunk):
    T, H, K, V, B = 1 << 20, 32, 128, 128, 1
    print(f"\nPart 2 (counted, nothing runs): one KDA layer of the 48B model, B={B} T={T} H={H} K=V={K}, "
          f"chunk {chunk}, forward + backward, per device; extra = zero-start run + scan and corrections")
    print(f"{'context':>8} {'tokens/dev':>10} {'kda GFLOP':>10} {'cp GFLOP':>9} {'extra':>6} {'zero-start':>11} "
          f"{'scan+corr':>10} {'ppermutes':>10} {'coll MiB/dev':>13}")
    for n in (64, 128, 256):
        Tl = T // n
        local = program_counts(jax.grad(loss_single(chunk), argnums=tuple(range(6))),
                               specs(B, Tl, H, K, V, jnp.bfloat16))[0]
        zero_start = program_counts(loss_single(chunk), specs(B, Tl, H, K, V + K, jnp.bfloat16))[0]
        mesh = AbstractMesh((n,), ("context",))
        f, sent, permutes = program_counts(jax.grad(loss_context(mesh, chunk), argnums=tuple(range(6))),
                                           specs(B, T, H, K, V, jnp.bfloat16))
        print(f"{n:>8} {Tl:>10} {local / 1e9:10.1f} {f / 1e9:9.1f} {f / local - 1:6.0%} {zero_start / local:11.0%} "
              f"{(f - local - zero_start) / local:10.1%} {permutes:>10} {sent / 2**20:13.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-measured", action="store_true", help="only part 2 (counts, no runs)")
    a = p.parse_args()
    if a.T % 8:
        p.error(f"--T must be a multiple of 8 (split over up to 8 devices), got {a.T}")
    if not a.skip_measured:
        measured(a)
    counted(a.chunk)


if __name__ == "__main__":
    main()

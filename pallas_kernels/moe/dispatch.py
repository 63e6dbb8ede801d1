"""Grouped matmul dispatch: the blocked form on CPU, `jax.lax.ragged_dot` on TPU/GPU, and the INT4 variant.

`jax.lax.platform_dependent` picks the branch when the program is lowered, so cross-platform lowering stays right.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.int4 import Int4Weight, dequantize_int4, int4_ragged_dot
from pallas_kernels.moe.blocked import blocked_grouped_matmul


def xla_ragged_dot(x, w, group_sizes):
    """`jax.lax.ragged_dot` with float32 output: x [M, K] rows sorted by group, w [G, K, N], group_sizes int32 [G]
    -> float32 [M, N]. The TPU/GPU branch of `grouped_matmul` (and the reference it is tested against)."""
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


def grouped_matmul(x, w, group_sizes):
    """Grouped matmul (ragged_dot contract, float32 out): x [M, K] rows sorted by group, w [G, K, N] (a float
    array or an Int4Weight), group_sizes int32 [G] (sum <= M; rows past the sum are left for the caller to mask)
    -> float32 [M, N]. The blocked form on CPU, lax.ragged_dot elsewhere; an Int4Weight w goes to
    `int4_grouped_matmul`."""
    if isinstance(w, Int4Weight):
        return int4_grouped_matmul(x, w, group_sizes)
    return jax.lax.platform_dependent(x, w, group_sizes, cpu=blocked_grouped_matmul, default=xla_ragged_dot)


def frozen_dequantized(w, dtype):
    """An Int4Weight [..., K, N] as a dense array [..., K, N] in dtype (frozen: no gradient to the scales); a float
    array unchanged."""
    return jax.lax.stop_gradient(dequantize_int4(w, dtype)) if isinstance(w, Int4Weight) else w


def int4_grouped_matmul_kernel(x, qw, group_sizes):
    """INT4 grouped matmul by `int4_ragged_dot` (Pallas on TPU/GPU; its dx VJP included): x [M, K] sorted by
    expert, qw: Int4Weight [E, K, N], group_sizes int32 [E] -> float32 [M, N]. The TPU/GPU branch of
    `int4_grouped_matmul`."""
    return int4_ragged_dot(x, qw, group_sizes).astype(jnp.float32)


def int4_grouped_matmul_cpu(x, qw, group_sizes):
    """INT4 grouped matmul on CPU: dequantize every expert once, then the blocked form (lax.ragged_dot, which the
    kernel's XLA path uses, costs E x the FLOPs on CPU). Same shapes as `int4_grouped_matmul_kernel`."""
    return blocked_grouped_matmul(x, frozen_dequantized(qw, x.dtype), group_sizes)


def int4_grouped_matmul(x, qw, group_sizes):
    """x [M, K] sorted by expert, qw: Int4Weight [E, K, N], group_sizes int32 [E] -> float32 [M, N] (ragged_dot
    semantics)."""
    return jax.lax.platform_dependent(x, qw, group_sizes, cpu=int4_grouped_matmul_cpu,
                                      default=int4_grouped_matmul_kernel)

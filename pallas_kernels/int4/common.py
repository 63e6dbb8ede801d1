"""Pieces shared by the dense and grouped INT4 kernels: tile dequantization, dots, block choice, platform dispatch.

Two kernel styles, one algorithm:
- "grid" (Mosaic TPU, and the interpreter on CPU): the reduction is a sequential grid axis with an f32 VMEM
  accumulator; blocks obey the TPU rule (last two dims multiples of (8, 128) or the full dim).
- "loop" (Triton on GPU): Triton runs grid steps in parallel and has no scratch, so the reduction is a
  `fori_loop` inside the kernel over `pl.ds` slices of whole-dim blocks; every loaded tile is a power of two.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.int4.packing import unpack_halves

IMPLS = ("auto", "pallas", "xla")
_FLOATS = (jnp.float32, jnp.bfloat16)


class Cfg(NamedTuple):
    """Static dispatch settings of one call (hashable: a custom_vjp nondiff argument)."""

    impl: str
    interpret: bool | None
    blocks: Blocks | None


class Blocks(NamedTuple):
    """Block sizes: bm rows of x, bn output columns, bk input rows (of the unpacked weight) per step."""

    bm: int
    bn: int
    bk: int


# ---------------------------------------------------------------- tile math (runs inside every kernel)

def dequant_halves(packed, scale, dtype):
    """Packed [..., R, n] + scale [..., R*2/g, n] -> (even rows, odd rows) of w, each [..., R, n] in `dtype`.

    Each scale row covers g/2 packed rows; it is broadcast by a leading-dim reshape (no sublane interleave),
    which lowers for Mosaic and Triton alike. The product is formed in f32, as `dequantize_int4` does.
    """
    even, odd = unpack_halves(packed)
    r, n = packed.shape[-2:]
    s = scale.astype(jnp.float32)
    lead, groups = s.shape[:-2], s.shape[-2]
    s = jnp.broadcast_to(s[..., None, :], (*lead, groups, r // groups, n)).reshape(*lead, r, n)
    return (even.astype(jnp.float32) * s).astype(dtype), (odd.astype(jnp.float32) * s).astype(dtype)


def dequant_full(packed, scale, dtype):
    """Whole weight [..., K, N] in `dtype` from packed [..., K/2, N] (the XLA paths' one big dequantize)."""
    even, odd = dequant_halves(packed, scale, dtype)
    *lead, r, n = even.shape
    return jnp.stack([even, odd], axis=-2).reshape(*lead, 2 * r, n)


def _precision(dtype):
    # f32 inputs must not be truncated to bf16 (TPU) or tf32 (GPU); bf16 inputs are exact at DEFAULT.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b):
    """a [m, k] @ b [k, n] with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a.dtype),
                               preferred_element_type=jnp.float32)


def dot_nt(a, b):
    """a [m, n] @ b[k, n]^T -> [m, k] with float32 accumulation (the transposed problem of the backward)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a.dtype),
                               preferred_element_type=jnp.float32)


# ---------------------------------------------------------------- layout helpers (XLA, outside the kernels)

def split_even_odd(x):
    """x [M, K] -> (x[:, 0::2], x[:, 1::2]), the activations matching the low and high nibbles."""
    return x[:, 0::2], x[:, 1::2]


def merge_even_odd(even, odd):
    """Inverse of `split_even_odd`: two [M, K/2] -> [M, K]."""
    m, h = even.shape
    return jnp.stack([even, odd], axis=-1).reshape(m, 2 * h)


def pad_rows(x, multiple: int):
    """Zero-pad axis 0 of x up to a multiple of `multiple`."""
    extra = -x.shape[0] % multiple
    return jnp.pad(x, ((0, extra),) + ((0, 0),) * (x.ndim - 1)) if extra else x


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------- block choice

def _first_divisor(n: int, candidates, ok=lambda c: True):
    return next((c for c in candidates if c <= n and n % c == 0 and ok(c)), None)


def tpu_blocks(M: int, K: int, N: int, group_size: int, dtype) -> Blocks:
    """Blocks legal on Mosaic TPU: bn a multiple of 128 or N; bk/2 a multiple of 128 with bk/g scale rows a
    multiple of 16 (bf16 sublane tile) or 8, or the full K (always legal); bm a multiple of the sublane tile."""
    sub = 16 if jnp.dtype(dtype) == jnp.bfloat16 else 8
    bm = min(256, round_up(M, sub))
    bn = _first_divisor(N, (512, 256, 128)) or N
    rows = lambda c: c // group_size  # noqa: E731
    bk = _first_divisor(K, (512, 1024, 256), lambda c: c % group_size == 0 and rows(c) % 16 == 0)
    if bk is None and K > 4096:
        bk = _first_divisor(K, (512, 1024, 256), lambda c: c % group_size == 0 and rows(c) % 8 == 0)
    return Blocks(bm, bn, bk or K)


def triton_blocks(M: int, K: int, N: int, group_size: int) -> Blocks | None:
    """Power-of-two blocks for Triton (tl.dot needs every dim >= 16); None if the shape has none."""
    bm = min(64, max(16, 1 << max(0, (M - 1).bit_length())))
    bn = _first_divisor(N, (128, 64, 32, 16))
    bk = _first_divisor(K, (256, 128, 64, 32), lambda c: c % group_size == 0 and c // group_size >= 1)
    if bn is None or bk is None or group_size & (group_size - 1):
        return None
    return Blocks(bm, bn, bk)


def check_blocks(blocks, M: int, K: int, N: int, group_size: int, op: str) -> Blocks:
    """Validate a user block override (bm, bn, bk)."""
    bm, bn, bk = blocks = Blocks(*blocks)
    if bm <= 0 or N % bn or K % bk or bk % group_size or bk % 2:
        raise ValueError(f"{op}: block_sizes (bm, bn, bk)={tuple(blocks)} must have bn | N={N}, bk | K={K}, "
                         f"group_size={group_size} | bk")
    return blocks


def tpu_params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def triton_params():
    return pltriton.CompilerParams(num_warps=4, num_stages=2)


# ---------------------------------------------------------------- dispatch

def dispatch(cfg: Cfg, pallas_fn, xla_fn, *args):
    """Pick the implementation at lowering time, per platform (never from `jax.default_backend()`).

    On CPU the XLA path computes in float32: faster there than bf16 dots, and clear of CPU bf16 dot gaps.
    """
    xla_cpu = functools.partial(xla_fn, compute=jnp.float32)
    if cfg.impl == "xla":
        return jax.lax.platform_dependent(*args, default=xla_cpu, tpu=xla_fn, cuda=xla_fn)
    kw = dict(blocks=cfg.blocks)
    if cfg.interpret:
        return pallas_fn(*args, style="grid", interpret=True, **kw)
    if cfg.impl == "auto":
        default = xla_cpu  # interpreting a kernel is never the fast path on CPU
    else:  # "pallas": interpret on CPU unless told not to (then Pallas itself reports that CPU cannot compile)
        default = functools.partial(pallas_fn, style="grid", interpret=cfg.interpret is None, **kw)
    return jax.lax.platform_dependent(
        *args, default=default,
        tpu=functools.partial(pallas_fn, style="grid", interpret=False, **kw),
        cuda=functools.partial(pallas_fn, style="loop", interpret=False, **kw))


# ---------------------------------------------------------------- boundary checks

def check_impl(impl: str, op: str):
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")


def check_x(x, K: int, op: str):
    if x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(f"{op}: x must be [..., K_in] with K_in={K}, got shape {x.shape}")
    if not any(jnp.dtype(x.dtype) == jnp.dtype(d) for d in _FLOATS):
        raise ValueError(f"{op}: x must be float32 or bfloat16, got {x.dtype}")


def cost(M: int, K: int, N: int, packed, scale, x_itemsize: int):
    """A cost estimate for XLA's scheduler: the weight read is what a weight-only kernel is about."""
    weight_bytes = packed.size + scale.size * scale.dtype.itemsize
    return pl.CostEstimate(flops=2 * M * K * N, transcendentals=0,
                           bytes_accessed=weight_bytes + (M * K + M * N) * x_itemsize)

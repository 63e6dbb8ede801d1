"""Weight-only INT4 matmul y = x @ w (W4A16): Pallas kernels (TPU grid, Triton loop), an XLA path, dispatch, VJP.

The kernels read the packed weight tile, unpack and dequantize it on chip, and run two dots per step: the even
columns of x with the low nibbles and the odd columns with the high nibbles (see `packing.py`), accumulating in
float32. The backward (gradient wrt x only; the weights are frozen) is the transposed problem dx = dy @ w^T, done
by the same tiles with an NT dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.int4 import common as C
from pallas_kernels.int4.quantize import Int4Weight, check_int4_weight

# ---------------------------------------------------------------- kernels, "grid" style (TPU, interpreter)

def _grid_fwd_kernel(xe_ref, xo_ref, p_ref, s_ref, o_ref, acc_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    we, wo = C.dequant_halves(p_ref[...], s_ref[...], xe_ref.dtype)
    acc_ref[...] += C.dot(xe_ref[...], we) + C.dot(xo_ref[...], wo)

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _grid_bwd_kernel(dy_ref, p_ref, s_ref, dxe_ref, dxo_ref, acc_e, acc_o):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        acc_e[...] = jnp.zeros_like(acc_e)
        acc_o[...] = jnp.zeros_like(acc_o)

    we, wo = C.dequant_halves(p_ref[...], s_ref[...], dy_ref.dtype)
    dy = dy_ref[...]
    acc_e[...] += C.dot_nt(dy, we)
    acc_o[...] += C.dot_nt(dy, wo)

    @pl.when(n == pl.num_programs(2) - 1)
    def _store():
        dxe_ref[...] = acc_e[...].astype(dxe_ref.dtype)
        dxo_ref[...] = acc_o[...].astype(dxo_ref.dtype)


def _grid_fwd(xe, xo, packed, scale, b: C.Blocks, interpret: bool):
    M, hk = xe.shape[0], b.bk // 2
    N, sk = packed.shape[1], b.bk * scale.shape[0] // (2 * packed.shape[0])
    return pl.pallas_call(
        _grid_fwd_kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), xe.dtype),
        grid=(M // b.bm, N // b.bn, 2 * packed.shape[0] // b.bk),
        in_specs=[pl.BlockSpec((b.bm, hk), lambda i, j, k: (i, k)),
                  pl.BlockSpec((b.bm, hk), lambda i, j, k: (i, k)),
                  pl.BlockSpec((hk, b.bn), lambda i, j, k: (k, j)),
                  pl.BlockSpec((sk, b.bn), lambda i, j, k: (k, j))],
        out_specs=pl.BlockSpec((b.bm, b.bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((b.bm, b.bn), jnp.float32)],
        compiler_params=None if interpret else C.tpu_params("parallel", "parallel", "arbitrary"),
        cost_estimate=C.cost(M, 2 * xe.shape[1], N, packed, scale, xe.dtype.itemsize),
        interpret=interpret, name="int4_matmul_fwd",
    )(xe, xo, packed, scale)


def _grid_bwd(dy, packed, scale, b: C.Blocks, interpret: bool):
    M, N = dy.shape
    hk, sk = b.bk // 2, b.bk * scale.shape[0] // (2 * packed.shape[0])
    Kh = packed.shape[0]
    out = jax.ShapeDtypeStruct((M, Kh), dy.dtype)
    dx_spec = pl.BlockSpec((b.bm, hk), lambda i, k, n: (i, k))
    return pl.pallas_call(
        _grid_bwd_kernel,
        out_shape=(out, out),
        grid=(M // b.bm, 2 * Kh // b.bk, N // b.bn),
        in_specs=[pl.BlockSpec((b.bm, b.bn), lambda i, k, n: (i, n)),
                  pl.BlockSpec((hk, b.bn), lambda i, k, n: (k, n)),
                  pl.BlockSpec((sk, b.bn), lambda i, k, n: (k, n))],
        out_specs=(dx_spec, dx_spec),
        scratch_shapes=[pltpu.VMEM((b.bm, hk), jnp.float32), pltpu.VMEM((b.bm, hk), jnp.float32)],
        compiler_params=None if interpret else C.tpu_params("parallel", "parallel", "arbitrary"),
        cost_estimate=C.cost(M, 2 * Kh, N, packed, scale, dy.dtype.itemsize),
        interpret=interpret, name="int4_matmul_bwd",
    )(dy, packed, scale)


# ---------------------------------------------------------------- kernels, "loop" style (Triton)

def _loop_fwd_kernel(xe_ref, xo_ref, p_ref, s_ref, o_ref, *, hk: int, sk: int):
    def step(r, acc):
        rows = pl.ds(pl.multiple_of(r * hk, hk), hk)
        we, wo = C.dequant_halves(p_ref[rows, :], s_ref[pl.ds(r * sk, sk), :], xe_ref.dtype)
        return acc + C.dot(xe_ref[:, rows], we) + C.dot(xo_ref[:, rows], wo)

    acc = jax.lax.fori_loop(0, p_ref.shape[0] // hk, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _loop_bwd_kernel(dy_ref, p_ref, s_ref, dxe_ref, dxo_ref, *, bn: int):
    def step(c, accs):
        cols = pl.ds(pl.multiple_of(c * bn, bn), bn)
        we, wo = C.dequant_halves(p_ref[:, cols], s_ref[:, cols], dy_ref.dtype)
        dy = dy_ref[:, cols]
        return accs[0] + C.dot_nt(dy, we), accs[1] + C.dot_nt(dy, wo)

    zeros = jnp.zeros(dxe_ref.shape, jnp.float32)
    acc_e, acc_o = jax.lax.fori_loop(0, p_ref.shape[1] // bn, step, (zeros, zeros))
    dxe_ref[...] = acc_e.astype(dxe_ref.dtype)
    dxo_ref[...] = acc_o.astype(dxo_ref.dtype)


def _loop_fwd(xe, xo, packed, scale, b: C.Blocks, interpret: bool):
    M, Kh = xe.shape
    N, G = packed.shape[1], scale.shape[0]
    hk, sk = b.bk // 2, b.bk * G // (2 * Kh)
    kernel = functools.partial(_loop_fwd_kernel, hk=hk, sk=sk)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), xe.dtype),
        grid=(M // b.bm, N // b.bn),
        in_specs=[pl.BlockSpec((b.bm, Kh), lambda i, j: (i, 0)),
                  pl.BlockSpec((b.bm, Kh), lambda i, j: (i, 0)),
                  pl.BlockSpec((Kh, b.bn), lambda i, j: (0, j)),
                  pl.BlockSpec((G, b.bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((b.bm, b.bn), lambda i, j: (i, j)),
        compiler_params=None if interpret else C.triton_params(),
        interpret=interpret, name="int4_matmul_fwd_loop",
    )(xe, xo, packed, scale)


def _loop_bwd(dy, packed, scale, b: C.Blocks, interpret: bool):
    M, N = dy.shape
    Kh, G = packed.shape[0], scale.shape[0]
    hk, sk = b.bk // 2, b.bk * G // (2 * Kh)
    out = jax.ShapeDtypeStruct((M, Kh), dy.dtype)
    dx_spec = pl.BlockSpec((b.bm, hk), lambda i, k: (i, k))
    return pl.pallas_call(
        functools.partial(_loop_bwd_kernel, bn=b.bn),
        out_shape=(out, out),
        grid=(M // b.bm, 2 * Kh // b.bk),
        in_specs=[pl.BlockSpec((b.bm, N), lambda i, k: (i, 0)),
                  pl.BlockSpec((hk, N), lambda i, k: (k, 0)),
                  pl.BlockSpec((sk, N), lambda i, k: (k, 0))],
        out_specs=(dx_spec, dx_spec),
        compiler_params=None if interpret else C.triton_params(),
        interpret=interpret, name="int4_matmul_bwd_loop",
    )(dy, packed, scale)


# ---------------------------------------------------------------- XLA path

def _xla_fwd(x, packed, scale, compute=None):
    """Dequantize the whole weight to `compute` (default x.dtype), then one dot."""
    cd = compute or x.dtype
    return C.dot(x.astype(cd), C.dequant_full(packed, scale, cd)).astype(x.dtype)


def _xla_bwd(dy, packed, scale, compute=None):
    cd = compute or dy.dtype
    return C.dot_nt(dy.astype(cd), C.dequant_full(packed, scale, cd)).astype(dy.dtype)


# ---------------------------------------------------------------- block choice + padding per style

def _blocks(style, M, K, N, g, dtype, override):
    if override is not None:
        return override
    return C.tpu_blocks(M, K, N, g, dtype) if style == "grid" else C.triton_blocks(M, K, N, g)


def pallas_fwd(x, packed, scale, *, style: str, interpret: bool, blocks=None):
    """One Pallas forward on x [M, K] (any M): pads M to the block, splits x into even/odd columns."""
    M, K = x.shape
    b = _blocks(style, M, K, packed.shape[1], K // scale.shape[0], x.dtype, blocks)
    if b is None:  # no legal Triton tiling (N not a multiple of 16): the XLA path is exact too
        return _xla_fwd(x, packed, scale)
    xe, xo = C.split_even_odd(C.pad_rows(x, b.bm))
    out = (_grid_fwd if style == "grid" else _loop_fwd)(xe, xo, packed, scale, b, interpret)
    return out[:M]


def pallas_bwd(dy, packed, scale, *, style: str, interpret: bool, blocks=None):
    """dx = dy @ w^T for dy [M, N] with the transposed-tile kernel."""
    M, N = dy.shape
    K = 2 * packed.shape[0]
    b = _blocks(style, M, K, N, K // scale.shape[0], dy.dtype, blocks)
    if b is None:
        return _xla_bwd(dy, packed, scale)
    dxe, dxo = (_grid_bwd if style == "grid" else _loop_bwd)(C.pad_rows(dy, b.bm), packed, scale, b, interpret)
    return C.merge_even_odd(dxe, dxo)[:M]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _int4_mm(x, packed, scale, cfg: C.Cfg):
    return C.dispatch(cfg, pallas_fwd, _xla_fwd, x, packed, scale)


def _int4_mm_fwd(x, packed, scale, cfg):
    return _int4_mm(x, packed, scale, cfg), (packed, scale)


def _int4_mm_bwd(cfg, res, dy):
    packed, scale = res
    # Frozen weights: no cotangent for packed (integer) or scale.
    return C.dispatch(cfg, pallas_bwd, _xla_bwd, dy, packed, scale), None, None


_int4_mm.defvjp(_int4_mm_fwd, _int4_mm_bwd)
_int4_mm_jit = jax.jit(_int4_mm, static_argnums=(3,))  # eager callers get one compiled program, not op-by-op


def int4_matmul(x, qw: Int4Weight, *, impl: str = "auto", interpret: bool | None = None, block_sizes=None):
    """x @ w for x [..., K_in] (float32 or bfloat16) and an INT4 weight w [K_in, N_out] -> [..., N_out] in x.dtype.

    impl: "auto" (Pallas on TPU/GPU, XLA on CPU), "pallas" (the kernel; interpreted on CPU when interpret is
    None) or "xla" (unpack + dequantize + dot; in float32 on CPU). Accumulation is float32. Differentiable in x
    (dx = dy @ w^T by the same implementation); the weights are frozen (zero cotangent). block_sizes: optional (bm, bn, bk) for the
    Pallas kernel, for tests and tuning (bk counts unpacked input rows and must be a multiple of group_size).
    """
    C.check_impl(impl, "int4_matmul")
    K, N, g = check_int4_weight(qw, "int4_matmul")
    if qw.packed.ndim != 2:
        raise ValueError(f"int4_matmul: w must be 2-D [K_in, N_out], got packed {qw.packed.shape} "
                         "(use int4_ragged_dot for per-expert weights)")
    C.check_x(x, K, "int4_matmul")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    blocks = None if block_sizes is None else C.check_blocks(block_sizes, x2.shape[0], K, N, g, "int4_matmul")
    y = _int4_mm_jit(x2, qw.packed, qw.scale, C.Cfg(impl, interpret, blocks))
    return y.reshape(*lead, N)

"""Per-expert INT4 matmul over rows sorted by expert: `jax.lax.ragged_dot` semantics with packed weights.

Rows are cut into tiles of bm. A tile may hold rows of several experts, so the kernels visit (tile, expert)
pairs and mask the rows of the other experts:
- "grid" (TPU, interpreter): a flat list of work items (tile, expert, row range) is scalar-prefetched; the grid
  walks the items in row order with the reduction innermost and accumulates a tile over all its items in f32
  VMEM scratch (first item of a tile zeroes it, last one stores). The item axis is a dynamic grid dim sized
  to the items in use (at most num_tiles + E - 1; experts with no rows cost nothing). Items with nothing to
  do (tiles past the last row) keep the previous weight block index, so they cost no DMA.
- "loop" (Triton): one program per (tile, column block) loops over the experts of its tile, then the reduction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.int4 import common as C
from pallas_kernels.int4.quantize import Int4Weight, check_int4_weight

# ---------------------------------------------------------------- work lists (XLA, from traced group sizes)

def group_bounds(group_sizes, rows: int):
    """Row range [start, end) of each expert, clipped to the `rows` real rows (int32 [E] each)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def work_items(group_sizes, rows: int, num_tiles: int, bm: int):
    """The (tile, expert, row range, first, last) list walked by the "grid" kernels, sorted by tile: int32
    arrays of static length num_tiles + E - 1, and the number of items in use (the dynamic grid size; the
    rest repeat the last tile as no-ops)."""
    E = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes, rows)
    first_tile, last_tile = starts // bm, (ends - 1) // bm
    count = jnp.where(ends > starts, last_tile - first_tile + 1, 0)
    cum = jnp.cumsum(count)
    n_real = cum[-1]
    covered = -(-ends[-1] // bm)  # tiles holding at least one grouped row
    i = jnp.arange(num_tiles + E - 1, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(cum, i, side="right"), E - 1).astype(jnp.int32)
    real = i < n_real
    tile = jnp.where(real, first_tile[g] + i - (cum[g] - count[g]),
                     jnp.minimum(covered + i - n_real, num_tiles - 1))
    last_g = jnp.minimum(jnp.searchsorted(cum, n_real - 1, side="right"), E - 1).astype(jnp.int32)
    expert = jnp.where(real, g, last_g)
    lo = jnp.where(real, starts[g], 0)
    hi = jnp.where(real, ends[g], 0)
    n_used = n_real + num_tiles - covered
    change = (tile[1:] != tile[:-1]).astype(jnp.int32)
    one = jnp.ones((1,), jnp.int32)
    first = jnp.concatenate([one, change])
    last = jnp.concatenate([change, one]) | (i == n_used - 1)
    items = tuple(a.astype(jnp.int32) for a in (tile, expert, lo, hi, first, last))
    return items, n_used.astype(jnp.int32)


def tile_groups(group_sizes, rows: int, num_tiles: int, bm: int):
    """For the "loop" kernels: first and last expert touching each row tile (int32 [num_tiles]; last < first
    for a tile with no grouped rows), then each expert's row range (starts, ends: int32 [E])."""
    starts, ends = group_bounds(group_sizes, rows)
    t0 = jnp.arange(num_tiles, dtype=jnp.int32) * bm
    total = ends[-1]
    g0 = jnp.searchsorted(ends, t0, side="right").astype(jnp.int32)
    g1 = jnp.searchsorted(ends, jnp.minimum(t0 + bm, total) - 1, side="right").astype(jnp.int32)
    return g0, jnp.where(t0 < total, g1, g0 - 1), starts, ends


def _row_mask(tile, lo, hi, bm: int, width: int):
    rows = tile * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, width), 0)
    return (rows >= lo) & (rows < hi)


# ---------------------------------------------------------------- "grid" kernels (TPU, interpreter)

def _grid_fwd_kernel(tile_r, ex_r, lo_r, hi_r, first_r, last_r, xe_ref, xo_ref, p_ref, s_ref, o_ref, acc_ref):
    del ex_r
    w, k = pl.program_id(1), pl.program_id(2)
    lo, hi = lo_r[w], hi_r[w]

    @pl.when((first_r[w] == 1) & (k == 0))
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(lo < hi)
    def _accumulate():
        mask = _row_mask(tile_r[w], lo, hi, *xe_ref.shape)
        we, wo = C.dequant_halves(p_ref[...], s_ref[...], xe_ref.dtype)
        xe = jnp.where(mask, xe_ref[...], 0)
        xo = jnp.where(mask, xo_ref[...], 0)
        acc_ref[...] += C.dot(xe, we) + C.dot(xo, wo)

    @pl.when((last_r[w] == 1) & (k == pl.num_programs(2) - 1))
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _grid_bwd_kernel(tile_r, ex_r, lo_r, hi_r, first_r, last_r, dy_ref, p_ref, s_ref, dxe_ref, dxo_ref,
                     acc_e, acc_o):
    del ex_r
    w, n = pl.program_id(1), pl.program_id(2)
    lo, hi = lo_r[w], hi_r[w]

    @pl.when((first_r[w] == 1) & (n == 0))
    def _init():
        acc_e[...] = jnp.zeros_like(acc_e)
        acc_o[...] = jnp.zeros_like(acc_o)

    @pl.when(lo < hi)
    def _accumulate():
        dy = jnp.where(_row_mask(tile_r[w], lo, hi, *dy_ref.shape), dy_ref[...], 0)
        we, wo = C.dequant_halves(p_ref[...], s_ref[...], dy_ref.dtype)
        acc_e[...] += C.dot_nt(dy, we)
        acc_o[...] += C.dot_nt(dy, wo)

    @pl.when((last_r[w] == 1) & (n == pl.num_programs(2) - 1))
    def _store():
        dxe_ref[...] = acc_e[...].astype(dxe_ref.dtype)
        dxo_ref[...] = acc_o[...].astype(dxo_ref.dtype)


def _red(lo, hi, w, r, nr):
    """Reduction block index; items with no rows stay on the last block so their weight DMA is skipped."""
    return jnp.where(lo[w] < hi[w], r, nr - 1)


def _grid_fwd(xe, xo, packed, scale, work, b: C.Blocks, interpret: bool):
    M, Kh = xe.shape
    E, _, N = packed.shape
    hk, sk, nk = b.bk // 2, b.bk * scale.shape[1] // (2 * Kh), 2 * Kh // b.bk
    x_map = lambda n, w, k, t, e, lo, hi, f, l: (t[w], _red(lo, hi, w, k, nk))  # noqa: E731
    w_map = lambda n, w, k, t, e, lo, hi, f, l: (e[w], _red(lo, hi, w, k, nk), n)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6, grid=(N // b.bn, work[1], nk),
        in_specs=[pl.BlockSpec((b.bm, hk), x_map), pl.BlockSpec((b.bm, hk), x_map),
                  pl.BlockSpec((None, hk, b.bn), w_map), pl.BlockSpec((None, sk, b.bn), w_map)],
        out_specs=pl.BlockSpec((b.bm, b.bn), lambda n, w, k, t, *_: (t[w], n)),
        scratch_shapes=[pltpu.VMEM((b.bm, b.bn), jnp.float32)])
    return pl.pallas_call(
        _grid_fwd_kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((M, N), xe.dtype),
        compiler_params=None if interpret else C.tpu_params("parallel", "arbitrary", "arbitrary"),
        cost_estimate=C.cost(M, 2 * Kh, N, packed, scale, xe.dtype.itemsize),
        interpret=interpret, name="int4_ragged_dot_fwd",
    )(*work[0], xe, xo, packed, scale)


def _grid_bwd(dy, packed, scale, work, b: C.Blocks, interpret: bool):
    M, N = dy.shape
    E, Kh, _ = packed.shape
    hk, sk, nn = b.bk // 2, b.bk * scale.shape[1] // (2 * Kh), N // b.bn
    dy_map = lambda k, w, n, t, e, lo, hi, f, l: (t[w], _red(lo, hi, w, n, nn))  # noqa: E731
    w_map = lambda k, w, n, t, e, lo, hi, f, l: (e[w], k, _red(lo, hi, w, n, nn))  # noqa: E731
    dx_spec = pl.BlockSpec((b.bm, hk), lambda k, w, n, t, *_: (t[w], k))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6, grid=(2 * Kh // b.bk, work[1], nn),
        in_specs=[pl.BlockSpec((b.bm, b.bn), dy_map),
                  pl.BlockSpec((None, hk, b.bn), w_map), pl.BlockSpec((None, sk, b.bn), w_map)],
        out_specs=(dx_spec, dx_spec),
        scratch_shapes=[pltpu.VMEM((b.bm, hk), jnp.float32), pltpu.VMEM((b.bm, hk), jnp.float32)])
    out = jax.ShapeDtypeStruct((M, Kh), dy.dtype)
    return pl.pallas_call(
        _grid_bwd_kernel, grid_spec=grid_spec, out_shape=(out, out),
        compiler_params=None if interpret else C.tpu_params("parallel", "arbitrary", "arbitrary"),
        cost_estimate=C.cost(M, 2 * Kh, N, packed, scale, dy.dtype.itemsize),
        interpret=interpret, name="int4_ragged_dot_bwd",
    )(*work[0], dy, packed, scale)


# ---------------------------------------------------------------- "loop" kernels (Triton)

def _loop_fwd_kernel(g0_r, g1_r, lo_r, hi_r, xe_ref, xo_ref, p_ref, s_ref, o_ref, *, hk: int, sk: int):
    t = pl.program_id(0)
    bm = xe_ref.shape[0]

    def expert(e, acc):
        lo, hi = lo_r[e], hi_r[e]
        mask = _row_mask(t, lo, hi, bm, hk)

        def step(r, acc):
            rows = pl.ds(pl.multiple_of(r * hk, hk), hk)
            we, wo = C.dequant_halves(p_ref[e, rows, :], s_ref[e, pl.ds(r * sk, sk), :], xe_ref.dtype)
            xe = jnp.where(mask, xe_ref[:, rows], 0)
            xo = jnp.where(mask, xo_ref[:, rows], 0)
            return acc + C.dot(xe, we) + C.dot(xo, wo)

        loop = lambda a: jax.lax.fori_loop(0, p_ref.shape[1] // hk, step, a)  # noqa: E731
        return jax.lax.cond(lo < hi, loop, lambda a: a, acc)

    acc = jax.lax.fori_loop(g0_r[t], g1_r[t] + 1, expert, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _loop_bwd_kernel(g0_r, g1_r, lo_r, hi_r, dy_ref, p_ref, s_ref, dxe_ref, dxo_ref, *, bn: int):
    t = pl.program_id(0)
    bm = dy_ref.shape[0]

    def expert(e, accs):
        lo, hi = lo_r[e], hi_r[e]
        mask = _row_mask(t, lo, hi, bm, bn)

        def step(c, accs):
            cols = pl.ds(pl.multiple_of(c * bn, bn), bn)
            we, wo = C.dequant_halves(p_ref[e, :, cols], s_ref[e, :, cols], dy_ref.dtype)
            dy = jnp.where(mask, dy_ref[:, cols], 0)
            return accs[0] + C.dot_nt(dy, we), accs[1] + C.dot_nt(dy, wo)

        loop = lambda a: jax.lax.fori_loop(0, p_ref.shape[2] // bn, step, a)  # noqa: E731
        return jax.lax.cond(lo < hi, loop, lambda a: a, accs)

    zeros = jnp.zeros(dxe_ref.shape, jnp.float32)
    acc_e, acc_o = jax.lax.fori_loop(g0_r[t], g1_r[t] + 1, expert, (zeros, zeros))
    dxe_ref[...] = acc_e.astype(dxe_ref.dtype)
    dxo_ref[...] = acc_o.astype(dxo_ref.dtype)


def _full(a):
    return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _loop_fwd(xe, xo, packed, scale, bounds, b: C.Blocks, interpret: bool):
    M, Kh = xe.shape
    E, _, N = packed.shape
    G = scale.shape[1]
    kernel = functools.partial(_loop_fwd_kernel, hk=b.bk // 2, sk=b.bk * G // (2 * Kh))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((M, N), xe.dtype), grid=(M // b.bm, N // b.bn),
        in_specs=[*map(_full, bounds),
                  pl.BlockSpec((b.bm, Kh), lambda t, j: (t, 0)), pl.BlockSpec((b.bm, Kh), lambda t, j: (t, 0)),
                  pl.BlockSpec((E, Kh, b.bn), lambda t, j: (0, 0, j)),
                  pl.BlockSpec((E, G, b.bn), lambda t, j: (0, 0, j))],
        out_specs=pl.BlockSpec((b.bm, b.bn), lambda t, j: (t, j)),
        compiler_params=None if interpret else C.triton_params(),
        interpret=interpret, name="int4_ragged_dot_fwd_loop",
    )(*bounds, xe, xo, packed, scale)


def _loop_bwd(dy, packed, scale, bounds, b: C.Blocks, interpret: bool):
    M, N = dy.shape
    E, Kh, _ = packed.shape
    hk, sk = b.bk // 2, b.bk * scale.shape[1] // (2 * Kh)
    out = jax.ShapeDtypeStruct((M, Kh), dy.dtype)
    dx_spec = pl.BlockSpec((b.bm, hk), lambda t, k: (t, k))
    return pl.pallas_call(
        functools.partial(_loop_bwd_kernel, bn=b.bn), out_shape=(out, out), grid=(M // b.bm, 2 * Kh // b.bk),
        in_specs=[*map(_full, bounds), pl.BlockSpec((b.bm, N), lambda t, k: (t, 0)),
                  pl.BlockSpec((E, hk, N), lambda t, k: (0, k, 0)),
                  pl.BlockSpec((E, sk, N), lambda t, k: (0, k, 0))],
        out_specs=(dx_spec, dx_spec),
        compiler_params=None if interpret else C.triton_params(),
        interpret=interpret, name="int4_ragged_dot_bwd_loop",
    )(*bounds, dy, packed, scale)


# ---------------------------------------------------------------- XLA path

def _ragged(a, b, group_sizes):
    return jax.lax.ragged_dot(a, b, group_sizes, precision=C._precision(a.dtype),
                              preferred_element_type=jnp.float32)


def _xla_fwd(x, packed, scale, group_sizes, compute=None):
    """Dequantize every expert to `compute` (default x.dtype), then one ragged_dot."""
    cd = compute or x.dtype
    return _ragged(x.astype(cd), C.dequant_full(packed, scale, cd), group_sizes).astype(x.dtype)


def _xla_bwd(dy, packed, scale, group_sizes, compute=None):
    cd = compute or dy.dtype
    w_t = jnp.swapaxes(C.dequant_full(packed, scale, cd), 1, 2)  # [E, N, K]
    return _ragged(dy.astype(cd), w_t, group_sizes).astype(dy.dtype)


# ---------------------------------------------------------------- per-style wrappers, dispatch, VJP

def _blocks(style, M, K, N, g, dtype, override):
    if override is not None:
        return override
    return C.tpu_blocks(M, K, N, g, dtype) if style == "grid" else C.triton_blocks(M, K, N, g)


def pallas_fwd(x, packed, scale, group_sizes, *, style: str, interpret: bool, blocks=None):
    """Grouped forward on x [M, K] (any M): pads rows to the tile, builds the work list, runs one kernel."""
    M, K = x.shape
    b = _blocks(style, M, K, packed.shape[2], K // scale.shape[1], x.dtype, blocks)
    if b is None:
        return _xla_fwd(x, packed, scale, group_sizes)
    xp = C.pad_rows(x, b.bm)
    xe, xo = C.split_even_odd(xp)
    tiles = xp.shape[0] // b.bm
    if style == "grid":
        out = _grid_fwd(xe, xo, packed, scale, work_items(group_sizes, M, tiles, b.bm), b, interpret)
    else:
        out = _loop_fwd(xe, xo, packed, scale, tile_groups(group_sizes, M, tiles, b.bm), b, interpret)
    return out[:M]


def pallas_bwd(dy, packed, scale, group_sizes, *, style: str, interpret: bool, blocks=None):
    """Grouped dx = dy @ w_e^T per row's expert, for dy [M, N]."""
    M, N = dy.shape
    K = 2 * packed.shape[1]
    b = _blocks(style, M, K, N, K // scale.shape[1], dy.dtype, blocks)
    if b is None:
        return _xla_bwd(dy, packed, scale, group_sizes)
    dyp = C.pad_rows(dy, b.bm)
    tiles = dyp.shape[0] // b.bm
    if style == "grid":
        dxe, dxo = _grid_bwd(dyp, packed, scale, work_items(group_sizes, M, tiles, b.bm), b, interpret)
    else:
        dxe, dxo = _loop_bwd(dyp, packed, scale, tile_groups(group_sizes, M, tiles, b.bm), b, interpret)
    return C.merge_even_odd(dxe, dxo)[:M]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _int4_rd(x, packed, scale, group_sizes, cfg: C.Cfg):
    return C.dispatch(cfg, pallas_fwd, _xla_fwd, x, packed, scale, group_sizes)


def _int4_rd_fwd(x, packed, scale, group_sizes, cfg):
    return _int4_rd(x, packed, scale, group_sizes, cfg), (packed, scale, group_sizes)


def _int4_rd_bwd(cfg, res, dy):
    packed, scale, group_sizes = res
    return C.dispatch(cfg, pallas_bwd, _xla_bwd, dy, packed, scale, group_sizes), None, None, None


_int4_rd.defvjp(_int4_rd_fwd, _int4_rd_bwd)
_int4_rd_jit = jax.jit(_int4_rd, static_argnums=(4,))


def int4_ragged_dot(x, qw: Int4Weight, group_sizes, *, impl: str = "auto", interpret: bool | None = None,
                    block_sizes=None):
    """Per-expert x @ w_e: x [M, K_in] with rows sorted by expert, qw holding w [E, K_in, N_out], group_sizes
    int [E] (rows per expert, in order) -> [M, N_out] in x.dtype, float32 accumulation.

    Same semantics as `jax.lax.ragged_dot(x, w, group_sizes)`: rows past sum(group_sizes) come out zero.
    impl/interpret/block_sizes as in `int4_matmul`. Differentiable in x; the weights are frozen.
    """
    C.check_impl(impl, "int4_ragged_dot")
    K, N, g = check_int4_weight(qw, "int4_ragged_dot")
    if qw.packed.ndim != 3:
        raise ValueError(f"int4_ragged_dot: w must be [E, K_in, N_out], got packed {qw.packed.shape}")
    E = qw.packed.shape[0]
    if x.ndim != 2:
        raise ValueError(f"int4_ragged_dot: x must be [M, K_in], got shape {x.shape}")
    C.check_x(x, K, "int4_ragged_dot")
    if group_sizes.shape != (E,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"int4_ragged_dot: group_sizes must be integer [E]=[{E}], got "
                         f"{group_sizes.dtype}{list(group_sizes.shape)}")
    blocks = None if block_sizes is None else C.check_blocks(block_sizes, x.shape[0], K, N, g, "int4_ragged_dot")
    return _int4_rd_jit(x, qw.packed, qw.scale, group_sizes.astype(jnp.int32), C.Cfg(impl, interpret, blocks))

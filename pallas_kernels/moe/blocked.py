"""Grouped matmul for CPU: rows padded to per-group blocks, each block times its group's weight, with a custom VJP.

XLA:CPU lowers `jax.lax.ragged_dot` to a masked product over every group (G x the useful FLOPs); here each group's
rows are padded to whole blocks of b rows and each block is multiplied by its one group's weight, about
(M + G b) K N FLOPs (bench/moe.py has the measurements). Two forms of that product:
- small (the nb blocks' weights, nb x K x N float32, within GATHER_MAX_BYTES): the weights gathered per block and
  one batched matmul over all blocks;
- large: a scan, one block and one weight slab at a time, so that no [nb, K, N] array exists (at 48B on XLA:CPU
  that was 1,312 x 9 MiB = 12 GiB per matmul). Its steps run one after another, each a small matmul.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.vma import vary_like

# The largest per-block weight array (nb x K x N, counted as float32) for which the blocks are multiplied as one
# batched matmul instead of a scan. At the default training config's micro-batch (M = 4,096 rows, 40 blocks of
# [128, 128] x [128, 64], 1.3 MiB) the batched form of the expert MLP took 0.56x the scan's time forward + backward;
# at 36 MiB the two forms took the same time, at 320 MiB the batched one 1.8x the scan's (both forms in one process;
# docs/results.md, "Batched expert blocks").
GATHER_MAX_BYTES = 32 << 20


def _block_layout(group_sizes, M: int, G: int):
    """Where each of M group-sorted rows goes when every group is padded to whole blocks of b rows.

    Returns (b, nb, dest [M] padded row of each row, block_group [nb] group of each block). b is a power of two
    near M / (4 G) in [16, 128] (bench/moe.py); nb is the static bound M + G (b - 1) rows, in blocks.
    """
    b = min(128, max(16, 1 << round(math.log2(max(M / (4 * G), 1.0)))))
    nb = -(-(M + G * (b - 1)) // b)
    padded = (group_sizes + b - 1) // b * b
    pad_end = jnp.cumsum(padded)
    row_group = jnp.repeat(jnp.arange(G), group_sizes, total_repeat_length=M)
    dest = (pad_end - padded)[row_group] + jnp.arange(M) - (jnp.cumsum(group_sizes) - group_sizes)[row_group]
    # Blocks past the last used one hold only zero rows; any valid group index will do for them.
    block_group = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(nb) * b, side="right"), G - 1)
    return b, nb, dest, block_group


def _gathered(nb: int, K: int, N: int) -> bool:
    """Whether nb blocks of a [K, N] weight are multiplied in one batched matmul (see GATHER_MAX_BYTES)."""
    return nb * K * N * 4 <= GATHER_MAX_BYTES


def _blocks_times(xp, w, block_group):
    """xp [nb, b, K] times w[block_group[i]] [K, N] for each block i -> float32 [nb, b, N]: one batched matmul of
    the gathered weights when small (`_gathered`), else a scan (one weight slab at a time)."""
    nb, _, K = xp.shape
    if _gathered(nb, K, w.shape[2]):
        return jnp.einsum("bmk,bkn->bmn", xp, w[block_group], preferred_element_type=jnp.float32)

    def block(_, xb_g):
        xb, g = xb_g
        return None, jnp.dot(xb, w[g], preferred_element_type=jnp.float32)

    return jax.lax.scan(block, None, (xp, block_group))[1]


def _pad_rows(v, dest, nb, b):
    return jnp.zeros((nb * b, v.shape[1]), v.dtype).at[dest].set(v, unique_indices=True).reshape(nb, b, -1)


@jax.custom_vjp
def blocked_grouped_matmul(x, w, group_sizes):
    """`jax.lax.ragged_dot` semantics for CPU: x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] int32
    (sum M) -> float32 [M, N].

    XLA:CPU lowers ragged_dot to a masked product over every group (G x the FLOPs). Here each group's rows are
    padded to whole blocks and a scan multiplies each block by its one group's weight: about (M + G b) K N FLOPs.
    The custom VJP computes dw as batched per-block products, G blocks at a time, added into their groups, instead
    of autodiff's scan that carries (and copies) the whole [G, K, N] gradient through every one-block step.
    """
    return _blocked_fwd(x, w, group_sizes)[0]


def _blocked_fwd(x, w, group_sizes):
    (M, _), G = x.shape, w.shape[0]
    b, nb, dest, block_group = _block_layout(group_sizes, M, G)
    xp = _pad_rows(x, dest, nb, b)
    y = _blocks_times(xp, w, block_group).reshape(nb * b, -1)[dest]
    return y, (xp, w, dest, block_group)


def _weight_grad(xp, dyp, block_group, G: int):
    """dw [G, K, N] float32 = sum over blocks i of xp[i]^T dyp[i] into group block_group[i]; xp [nb, b, K], dyp
    [nb, b, N]. Blocks are taken G at a time (a scan; the remainder in one product), so at most G per-block
    products [G, K, N] exist at once besides dw itself: one batched product over all nb blocks held nb of them
    (at 48B on XLA:CPU, 1,312 x 9 MiB = 12 GiB per matmul). When that is small (`_gathered`), all nb at once."""
    nb, _, K = xp.shape
    N = dyp.shape[2]

    def add(dw, xs, ds, gs):
        blocks = jnp.einsum("bmk,bmn->bkn", xs, ds, preferred_element_type=jnp.float32)
        return dw.at[gs].add(blocks, indices_are_sorted=True)

    if _gathered(nb, K, N):
        return add(jnp.zeros((G, K, N), jnp.float32), xp, dyp, block_group)
    c = min(G, nb)
    full = nb // c * c

    def chunk(dw, xdg):
        return add(dw, *xdg), None

    split = lambda a: a[:full].reshape(full // c, c, *a.shape[1:])
    zero = vary_like(jnp.zeros((G, K, N), jnp.float32), xp, dyp)  # inside shard_map the carry varies like them
    dw = jax.lax.scan(chunk, zero, (split(xp), split(dyp), split(block_group)))[0]
    if full < nb:
        dw = add(dw, xp[full:], dyp[full:], block_group[full:])
    return dw


def _blocked_bwd(res, dy):
    xp, w, dest, block_group = res
    nb, b, _ = xp.shape
    dyp = _pad_rows(dy.astype(w.dtype), dest, nb, b)
    dx = _blocks_times(dyp, jnp.swapaxes(w, 1, 2), block_group).reshape(nb * b, -1)[dest]
    dw = _weight_grad(xp, dyp, block_group, w.shape[0])
    return dx.astype(xp.dtype), dw.astype(w.dtype), None


blocked_grouped_matmul.defvjp(_blocked_fwd, _blocked_bwd)

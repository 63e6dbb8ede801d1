"""Nibble packing of signed 4-bit values, two per byte, along the input (row) axis.

Layout: byte `packed[..., r, n]` holds row `2r` of the weight in its LOW nibble and row `2r + 1` in its HIGH
nibble, each as a two's-complement 4-bit integer (-8..7; quantization uses only -7..7). Pairing consecutive rows
keeps every quantization group (32 consecutive rows) inside 16 consecutive bytes, so a kernel can unpack a tile
with two masks and no data movement: the low nibbles give the even rows, the high nibbles the odd rows, and the
matching activations are the even and odd columns of x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sign_extend4(v):
    """Map 4-bit two's-complement codes 0..15 (int32) to signed values -8..7."""
    return (v ^ 8) - 8


def unpack_halves(packed):
    """Split packed bytes [..., R, N] into (even rows, odd rows), each int32 [..., R, N] in -8..7.

    Uses only int32 masks and shifts, which lower on CPU, Mosaic TPU and Triton alike.
    """
    p = packed.astype(jnp.int32)
    return sign_extend4(p & 15), sign_extend4((p >> 4) & 15)


@jax.jit
def pack_int4(q):
    """Pack signed 4-bit values q (integer [..., K, N], values in -8..7, K even) into uint8 [..., K/2, N]."""
    if q.ndim < 2:
        raise ValueError(f"pack_int4: q must be [..., K, N], got shape {q.shape}")
    if q.shape[-2] % 2:
        raise ValueError(f"pack_int4: the row count K={q.shape[-2]} must be even (two rows per byte)")
    q = q.astype(jnp.int32)
    even, odd = q[..., 0::2, :], q[..., 1::2, :]
    return ((even & 15) | ((odd & 15) << 4)).astype(jnp.uint8)


@jax.jit
def unpack_int4(packed):
    """Inverse of `pack_int4`: uint8 [..., K/2, N] -> int8 [..., K, N] with values in -8..7."""
    if packed.ndim < 2:
        raise ValueError(f"unpack_int4: packed must be [..., K/2, N], got shape {packed.shape}")
    even, odd = unpack_halves(packed)
    q = jnp.stack([even, odd], axis=-2)  # [..., K/2, 2, N]: row 2r then 2r + 1
    return q.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1]).astype(jnp.int8)

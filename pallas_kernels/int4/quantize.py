"""Symmetric group-wise INT4 weight quantization (Kimi K2 Thinking scheme: levels -7..7, one scale per 32 inputs)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.int4.packing import pack_int4, unpack_halves

QMAX = 7  # symmetric: 15 of the 16 levels, -8 is never produced


@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """A weight w [..., K_in, N_out] stored as packed 4-bit integers and one scale per group of rows.

    packed: uint8 [..., K_in/2, N_out]; byte r holds row 2r (low nibble) and row 2r+1 (high nibble), signed.
    scale: [..., K_in/group_size, N_out] (bfloat16 by default); w[k, n] ~= q[k, n] * scale[k // group_size, n].
    shape: the logical (unstacked) weight shape [..., K_in, N_out] (static).
    group_size: rows per scale (static).
    Leading dims (e.g. experts) are carried through unchanged. A registered pytree: `packed` and `scale` are leaves.
    """

    packed: jax.Array
    scale: jax.Array
    shape: tuple[int, ...]
    group_size: int

    @property
    def nbytes(self) -> int:
        """Bytes really stored (packed nibbles plus scales)."""
        return int(self.packed.size * self.packed.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)

    @property
    def in_features(self) -> int:
        return self.shape[-2]

    @property
    def out_features(self) -> int:
        return self.shape[-1]


jax.tree_util.register_dataclass(Int4Weight, data_fields=["packed", "scale"], meta_fields=["shape", "group_size"])


def check_int4_weight(qw, op: str) -> tuple[int, int, int]:
    """Validate an Int4Weight's arrays against its static fields; returns (K_in, N_out, group_size)."""
    if not isinstance(qw, Int4Weight):
        raise ValueError(f"{op}: expected an Int4Weight, got {type(qw).__name__}")
    K, N = qw.shape[-2:]
    g = qw.group_size
    if qw.packed.dtype != jnp.uint8:
        raise ValueError(f"{op}: packed must be uint8, got {qw.packed.dtype}")
    if qw.packed.shape[-2:] != (K // 2, N):
        raise ValueError(f"{op}: packed must end in [K_in/2, N_out] = {(K // 2, N)}, got {qw.packed.shape}")
    if qw.scale.shape[-2:] != (K // g, N) or qw.scale.shape[:-2] != qw.packed.shape[:-2]:
        raise ValueError(f"{op}: scale must be {qw.packed.shape[:-2] + (K // g, N)}, got {qw.scale.shape}")
    return K, N, g


def _check_group(K: int, group_size: int, op: str):
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"{op}: group_size must be a positive even number, got {group_size}")
    if K % group_size:
        raise ValueError(f"{op}: K_in={K} (the input dim, axis -2) must be a multiple of group_size={group_size}")


def quantize_int4(w, group_size: int = 32, scale_dtype=jnp.bfloat16) -> Int4Weight:
    """Quantize w [..., K_in, N_out] to INT4 with one symmetric absmax scale per `group_size` inputs.

    scale = max|w| / 7 over each group (rounded to `scale_dtype`), q = clip(round(w / scale), -7, 7); a group of
    zeros gets scale 0 and dequantizes to 0 (never NaN). Leading dims (experts) are quantized independently.
    """
    if w.ndim < 2:
        raise ValueError(f"quantize_int4: w must be [..., K_in, N_out], got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"quantize_int4: w must be a float array, got {w.dtype}")
    _check_group(w.shape[-2], group_size, "quantize_int4")
    packed, scale = _quantize(w, group_size, jnp.dtype(scale_dtype))
    return Int4Weight(packed=packed, scale=scale, shape=tuple(w.shape), group_size=group_size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(w, group_size: int, scale_dtype):
    K, N = w.shape[-2:]
    wg = w.astype(jnp.float32).reshape(*w.shape[:-2], K // group_size, group_size, N)
    scale = (jnp.max(jnp.abs(wg), axis=-2) / QMAX).astype(scale_dtype)
    # Divide by the stored (rounded) scale so that q * scale is the closest grid point the checkpoint can express.
    s = scale.astype(jnp.float32)[..., None, :]
    q = jnp.where(s > 0, jnp.round(wg / jnp.where(s > 0, s, 1.0)), 0.0)
    q = jnp.clip(q, -QMAX, QMAX).astype(jnp.int8).reshape(w.shape)
    return pack_int4(q), scale


def dequantize_int4(qw: Int4Weight, dtype=jnp.float32):
    """Int4Weight -> dense weight [..., K_in, N_out] in `dtype` (q * scale computed in float32, then cast)."""
    check_int4_weight(qw, "dequantize_int4")
    return _dequantize(qw, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize(qw: Int4Weight, dtype):
    K, N = qw.shape[-2:]
    g = qw.group_size
    even, odd = unpack_halves(qw.packed)  # [..., K/2, N] each
    q = jnp.stack([even, odd], axis=-2).astype(jnp.float32)  # [..., K/2, 2, N]
    lead = qw.packed.shape[:-2]
    q = q.reshape(*lead, K // g, g, N)
    w = q * qw.scale.astype(jnp.float32)[..., None, :]
    return w.reshape(*lead, K, N).astype(dtype)

"""Bit-exact conversion between `Int4Weight` and the compressed-tensors "pack-quantized" INT4 layout.

The layout (as used by Kimi K2 Thinking checkpoints: num_bits=4, symmetric, strategy "group", group_size 32),
read from compressed-tensors `compressors/quantized_compressors/pack_quantized.py` (`pack_to_int32` /
`unpack_from_int32`, vllm-project/compressed-tensors and its neuralmagic predecessor agree):
- the weight is a torch Linear weight [out, in] = [N, K], so every tensor is transposed relative to `Int4Weight`;
- `weight_packed`: int32 [N, ceil(K / 8)], packed along the input dim (packed_dim=1): the value of input column
  8j + i sits in bits 4i..4i+3 of word j (first column in the least significant nibble);
- each nibble holds the value OFFSET BY +8 (unsigned 0..15, i.e. stored = q + 8), not two's complement; the
  int32 is the raw bit pattern (words with a top nibble >= 8 are negative);
- `weight_scale`: [N, K / group_size] (bf16 in the K2 checkpoints); `weight_shape`: int64 [2] = [N, K];
  symmetric, so no zero point is stored; dequantized w = (stored - 8) * scale.

Conversion is pure bit manipulation: a nibble's +8 offset equals flipping its top bit (x ^ 8), so a byte of
`Int4Weight.packed` (low nibble row 2r, high nibble row 2r+1, two's complement) maps to a byte of the int32
word by `byte ^ 0x88`, and four bytes make one little-endian word.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int4.quantize import Int4Weight, check_int4_weight

_OFFSET_BITS = 0x88  # +8 on both nibbles of a byte


def to_compressed_tensors(qw: Int4Weight) -> dict:
    """Int4Weight (w [..., K, N]) -> {"weight_packed": int32 [..., N, K/8], "weight_scale": bf16 [..., N, K/g],
    "weight_shape": int64 [2] = [N, K]}. Exact when qw's scales are bf16 (they are cast otherwise)."""
    K, N, g = check_int4_weight(qw, "to_compressed_tensors")
    if K % 8:
        raise ValueError(f"to_compressed_tensors: K_in={K} must be a multiple of 8 (eight nibbles per int32)")
    packed, scale = _to_ct(qw.packed, qw.scale)
    return {"weight_packed": packed, "weight_scale": scale, "weight_shape": np.array([N, K], dtype=np.int64)}


@jax.jit
def _to_ct(packed, scale):
    *lead, Kh, N = packed.shape
    b = jnp.swapaxes(packed, -1, -2) ^ jnp.uint8(_OFFSET_BITS)  # [..., N, K/2], offset-binary nibbles
    b = b.reshape(*lead, N, Kh // 4, 4).astype(jnp.uint32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return word.view(jnp.int32), jnp.swapaxes(scale, -1, -2).astype(jnp.bfloat16)


def from_compressed_tensors(weight_packed, weight_scale, weight_shape) -> Int4Weight:
    """compressed-tensors pack-quantized tensors of a Linear [N, K] (leading expert dims allowed on
    weight_packed and weight_scale) -> Int4Weight for w = W^T [..., K, N]; the scales keep their dtype.

    weight_shape must be concrete (numpy, list or a committed array), as it fixes static shapes.
    """
    try:
        N, K = (int(v) for v in np.asarray(weight_shape).reshape(-1)[-2:])
    except Exception as e:  # a tracer cannot give static shapes
        raise ValueError(f"from_compressed_tensors: weight_shape must be concrete [N, K], got {weight_shape!r}") from e
    if jnp.dtype(weight_packed.dtype) != jnp.int32:
        raise ValueError(f"from_compressed_tensors: weight_packed must be int32, got {weight_packed.dtype}")
    if K % 8 or weight_packed.shape[-2:] != (N, K // 8):
        raise ValueError(f"from_compressed_tensors: weight_packed must be [..., N, K/8] = [..., {N}, {K / 8}] "
                         f"with K a multiple of 8, got {weight_packed.shape}")
    groups = weight_scale.shape[-1]
    if weight_scale.shape[-2] != N or groups == 0 or K % groups or weight_scale.shape[:-2] != weight_packed.shape[:-2]:
        raise ValueError(f"from_compressed_tensors: weight_scale must be [..., N, K/group] with N={N} and a "
                         f"group size dividing K={K}, got {weight_scale.shape}")
    packed, scale = _from_ct(jnp.asarray(weight_packed), jnp.asarray(weight_scale))
    return Int4Weight(packed=packed, scale=scale, shape=(*weight_packed.shape[:-2], K, N), group_size=K // groups)


@jax.jit
def _from_ct(words, scale):
    *lead, N, K8 = words.shape
    u = words.view(jnp.uint32)
    b = jnp.stack([(u >> s) & 0xFF for s in (0, 8, 16, 24)], axis=-1).astype(jnp.uint8)
    b = b.reshape(*lead, N, 4 * K8) ^ jnp.uint8(_OFFSET_BITS)  # back to two's complement nibbles
    return jnp.swapaxes(b, -1, -2), jnp.swapaxes(scale, -1, -2)

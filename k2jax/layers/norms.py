"""Normalisations: HF KimiRMSNorm, the gated RMSNorm of the KDA output (fla FusedRMSNormGated), and L2 norm.

All statistics are computed in float32 whatever the activation dtype (kimi_linear.md sections 1.3, 1.7 and 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.sharding import make_param


def _rms_scale(x32, eps: float):
    """rsqrt(mean(x^2) + eps) over the last axis, keeping it for broadcasting (x32 is float32)."""
    return jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """HF `KimiRMSNorm`: y = weight * cast(x * rsqrt(mean(x^2) + eps), x.dtype).

    The normalisation runs in float32 and is rounded back to x's dtype *before* the weight multiplies, as HF
    does (the order changes bf16 results). The product is formed in float32 and rounded once to x.dtype, which
    is bit-identical to HF's `weight * x` whenever the weight is representable in x's dtype (it always is for a
    bf16 checkpoint run in bf16) and more accurate otherwise.
    Param `weight` [dim] (logical ('norm',)), initialised to ones.
    """

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.dim, self.eps = dim, float(eps)
        self.weight = make_param(rngs, (dim,), ("norm",), init=jax.nn.initializers.ones, dtype=param_dtype)

    def __call__(self, x):
        """x: [..., dim] -> [..., dim] in x.dtype."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm: last dim of x must be {self.dim}, got shape {x.shape}")
        x32 = x.astype(jnp.float32)
        normed = (x32 * _rms_scale(x32, self.eps)).astype(x.dtype)
        return (normed.astype(jnp.float32) * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """The KDA output norm (fla `FusedRMSNormGated`, activation sigmoid), one weight shared by all heads.

    y = o * rsqrt(mean(o^2) + eps) * weight * sigmoid(z), all in float32, then cast to o.dtype.
    Param `weight` [dim] (logical ('norm',)), initialised to ones.
    """

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.dim, self.eps = dim, float(eps)
        self.weight = make_param(rngs, (dim,), ("norm",), init=jax.nn.initializers.ones, dtype=param_dtype)

    def __call__(self, o, z):
        """o, z: [..., dim] (same shape) -> [..., dim] in o.dtype. The RMS is taken over the last axis only."""
        if o.shape[-1] != self.dim or z.shape != o.shape:
            raise ValueError(f"GatedRMSNorm: o and z must both be [..., {self.dim}], got o {o.shape}, z {z.shape}")
        o32 = o.astype(jnp.float32)
        y = o32 * _rms_scale(o32, self.eps) * self.weight[...].astype(jnp.float32)
        return (y * jax.nn.sigmoid(z.astype(jnp.float32))).astype(o.dtype)


def l2_normalize(x, eps: float = 1e-6):
    """x / sqrt(sum(x^2) + eps) over the last axis, in float32, returned in x.dtype. x: [..., d]."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)

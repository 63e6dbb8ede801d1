"""A bias-free linear layer with logical axis names, the building block of every projection."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from k2jax.sharding import make_param


class Linear(nnx.Module):
    """y = x @ kernel, with kernel [in, out] (HF stores [out, in]: the loader transposes).

    `dtype` is the compute dtype (inputs and kernel are cast to it; accumulation is float32 on every backend
    and the result is returned in `dtype`).
    """

    def __init__(self, in_features: int, out_features: int, *, names: Sequence[str | None], rngs: nnx.Rngs,
                 std: float = 0.02, param_dtype=jnp.float32, dtype=jnp.float32):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = make_param(rngs, (in_features, out_features), names, std=std, dtype=param_dtype)

    def __call__(self, x):
        """x: [..., in] -> [..., out] in the compute dtype."""
        w = self.kernel[...].astype(self.dtype)
        y = jnp.dot(x.astype(self.dtype), w, preferred_element_type=jnp.float32)
        return y.astype(self.dtype)

"""The SwiGLU feed-forward block: the dense layer-0 MLP and the MoE shared experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.layers.linear import Linear


class SwiGLU(nnx.Module):
    """y = down(silu(gate(x)) * up(x)), HF `KimiMLP` (gate_proj, up_proj, down_proj; no biases).

    Children: `gate_proj`, `up_proj` (kernels [hidden, intermediate], logical ('embed', 'mlp')) and `down_proj`
    ([intermediate, hidden], ('mlp', 'embed')). The activation is evaluated in float32 and rounded to `dtype`
    before the product with up(x), as torch does for a bf16 `silu`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32, std: float = 0.02):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.dtype = jnp.dtype(dtype)
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, std=std)
        self.gate_proj = Linear(hidden_size, intermediate_size, names=("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, names=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, names=("mlp", "embed"), **kw)

    def __call__(self, x):
        """x: [..., hidden] -> [..., hidden] in `dtype`."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"SwiGLU: last dim of x must be hidden_size={self.hidden_size}, got shape {x.shape}")
        act = jax.nn.silu(self.gate_proj(x).astype(jnp.float32)).astype(self.dtype)
        return self.down_proj(act * self.up_proj(x))

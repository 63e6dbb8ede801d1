"""Logical axis names for parameters and activations, and the one table that maps them to mesh axes.

Model code only ever names logical axes (`embed`, `heads`, `expert`, ...); which mesh axis (if any) shards each
of them is decided here, so the model never mentions devices.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("kda_low_rank", None),
    ("conv", None),
    ("norm", None),
    ("expert", "expert"),
    ("expert_embed", "fsdp"),
    ("expert_mlp", "tensor"),
)


def make_param(rngs: nnx.Rngs | None, shape: Sequence[int], names: Sequence[str | None], *,
               init: Callable | None = None, std: float = 0.02, dtype=jnp.float32) -> nnx.Param:
    """A parameter of `shape` annotated with logical axis `names` (one per dim).

    `init(key, shape, dtype)` defaults to a normal with standard deviation `std`. The sharding is recorded as
    metadata only (no mesh needed at creation); `k2jax.sharding` resolves it against a mesh when one is used.
    """
    if len(names) != len(shape):
        raise ValueError(f"make_param: {len(names)} logical names {tuple(names)} for a {len(shape)}-d shape {tuple(shape)}")
    if init is None:
        init = jax.nn.initializers.normal(std)
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), sharding_names=tuple(names), eager_sharding=False)

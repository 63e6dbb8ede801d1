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
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


def logical_names(variable) -> tuple[str | None, ...] | None:
    """The logical axis names `make_param` recorded on an nnx Variable (None if it has none).

    Flax has spelled this metadata key differently across versions ('out_sharding' in 0.12.8, earlier
    'sharding_names' / 'sharding'); every spelling is accepted.
    """
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def logical_to_mesh_spec(names: Sequence[str | None], mesh, shape: Sequence[int] | None = None):
    """PartitionSpec for an array whose dims have logical `names`, resolved with LOGICAL_AXIS_RULES on `mesh`.

    Mesh axes absent from `mesh`, or already used by an earlier dim, are skipped; with `shape`, trailing mesh
    axes are dropped from a dim until its size divides evenly (so odd sizes stay replicated, never fail).
    Unknown logical names raise ValueError.
    """
    rules = dict(LOGICAL_AXIS_RULES)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical_to_mesh_spec: {len(names)} names {tuple(names)} for shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical_to_mesh_spec: unknown logical axis {name!r}; known: {sorted(rules)}")
        target = rules[name]
        axes = [] if target is None else [target] if isinstance(target, str) else list(target)
        axes = [a for a in axes if a in mesh.shape and a not in used]
        while shape is not None and axes and shape[i] % _prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return jax.sharding.PartitionSpec(*spec)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out

"""Logical axis names for parameters and activations, and the one table that maps them to mesh axes.

Model code only ever names logical axes (`embed`, `heads`, `expert`, ...); which mesh axis (if any) shards each
of them is decided here, so the model never mentions devices.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils

# `context` splits the sequence (context parallelism); it sits next to `tensor` so that its ring neighbours are
# close on a TPU torus.
MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
CONTEXT_AXIS = "context"

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "context"),
    # The flattened [batch * length] token rows of the MoE: batch axes major, context minor (a [B, T] reshape).
    ("tokens", ("data", "fsdp", "expert", "context")),
    ("vocab", "tensor"),
    # Parameters are also sharded over `context` (gathered layer by layer like fsdp's): the devices of a context
    # group each hold a different part of one sequence, so they should not each hold every weight.
    ("embed", ("fsdp", "context")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    # Low-rank dims are the only shardable dim of the up-projections (q_b, kv_b, f_b, g_b), so they take fsdp
    # (the down-projections already put fsdp on `embed`).
    ("q_lora", ("fsdp", "context")),
    ("kv_lora", ("fsdp", "context")),
    ("kda_low_rank", ("fsdp", "context")),
    ("conv", None),
    ("norm", None),
    ("expert", "expert"),
    ("expert_embed", ("fsdp", "context")),
    ("expert_mlp", "tensor"),
    ("layers", None),  # the stacked-layer dim of scanned layers (model.LayerStack)
    # The experts of a stacked expert weight while the optimizer orthogonalises them (Muon): split over every
    # data-parallel device, each holding whole [in, out] matrices (no device repeats another's Newton-Schulz).
    ("optimizer_experts", ("expert", "fsdp", "context", "data")),
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

    Mesh axes absent from `mesh`, or already used by an earlier dim, and `context` of size 1 are skipped; with `shape`, trailing mesh
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
        # `context` of size 1 is left out, so that a mesh without context parallelism gives the specs it gave
        # before that axis existed
        axes = [a for a in axes if a in mesh.shape and a not in used and not (a == CONTEXT_AXIS and mesh.shape[a] == 1)]
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


# ---- meshes and placement ----------------------------------------------------------------------------------------
# Convention: every mesh has the five MESH_AXES, in this order, with AxisType.Auto (GSPMD propagates shardings;
# jax.make_mesh would default to Explicit axes on JAX >= 0.7, which changes shard_map's input rules). Activate a
# mesh with `jax.set_mesh(mesh)` around jit/tracing: `constrain` and the expert-parallel MoE read it from there.


def _mesh_dims(shape, n_devices: int) -> tuple[int, ...]:
    """Mesh sizes in MESH_AXES order from None, a {axis: size} dict, a 5-sequence in MESH_AXES order or a
    4-sequence (data, fsdp, expert, tensor; context 1: the layout before the context axis); one -1 takes the rest."""
    if shape is None:
        dims = [1] * len(MESH_AXES)
    elif isinstance(shape, dict):
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"make_mesh: unknown mesh axes {unknown}; the axes are {MESH_AXES}")
        dims = [shape.get(a, 1) for a in MESH_AXES]
    else:
        dims = list(shape)
        if len(dims) == len(MESH_AXES) - 1:
            dims.insert(MESH_AXES.index(CONTEXT_AXIS), 1)
        elif len(dims) != len(MESH_AXES):
            raise ValueError(f"make_mesh: shape {tuple(dims)} must give {len(MESH_AXES)} sizes, for {MESH_AXES} "
                             f"(or 4, without context)")
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in dims):
        raise ValueError(f"make_mesh: mesh sizes must be integers, got {dims}")
    dims = [int(d) for d in dims]
    if dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
        raise ValueError(f"make_mesh: mesh sizes must be positive (at most one -1 = the rest), got {dims}")
    if -1 in dims:
        rest = _prod(d for d in dims if d != -1)
        if n_devices % rest:
            raise ValueError(f"make_mesh: {n_devices} devices do not split into {dims}")
        dims[dims.index(-1)] = n_devices // rest
    if _prod(dims) > n_devices:
        raise ValueError(f"make_mesh: mesh {dict(zip(MESH_AXES, dims))} needs {_prod(dims)} devices, "
                         f"only {n_devices} available")
    return tuple(dims)


def make_mesh(shape=None, devices=None) -> jax.sharding.Mesh:
    """A Mesh over MESH_AXES = ('data', 'fsdp', 'expert', 'context', 'tensor'), all AxisType.Auto.

    shape: None (one device: the default, behaves like no mesh), a dict {axis: size} (missing axes are 1), a
    5-sequence in MESH_AXES order, or a 4-sequence (data, fsdp, expert, tensor) with context 1; one size may be -1 (all remaining devices). devices: defaults to
    `jax.devices()` (every process's devices on multi-host); the first prod(shape) are used, laid out by
    `mesh_utils.create_device_mesh` (TPU-topology aware) when it accepts the shape, else in order.
    """
    devices = list(jax.devices() if devices is None else devices)
    dims = _mesh_dims(shape, len(devices))
    devices = devices[:_prod(dims)]
    try:
        grid = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
    except Exception:  # non-TPU topologies or shapes the helper refuses: plain order is always valid
        grid = np.array(devices, dtype=object).reshape(dims)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_state, mesh):
    """NamedSharding for every Variable of an nnx State (or Module), from its logical axis names.

    Returns a tree of the state's structure with each Variable's value replaced by its NamedSharding (usable as
    jit in/out_shardings for that state, or with `jax.device_put`). Variables without names are replicated;
    dims whose size the mesh axes do not divide stay replicated (see logical_to_mesh_spec).
    """
    if isinstance(abstract_state, nnx.Module):
        abstract_state = nnx.state(abstract_state)

    def one(var):
        shape = tuple(var.get_value().shape)
        names = logical_names(var)
        spec = (jax.sharding.PartitionSpec() if names is None or len(names) != len(shape)
                else logical_to_mesh_spec(names, mesh, shape))
        return var.replace(jax.sharding.NamedSharding(mesh, spec))

    return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def shard_model(model, mesh):
    """Place every Variable of `model` on `mesh` per its logical names (in place); returns the model."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


def batch_sharding(mesh, shape: Sequence[int] | None = None):
    """NamedSharding for [batch, length] inputs (tokens, segment ids, targets): batch over data, fsdp, expert,
    length over context.
    With `shape`, axes that do not divide the batch are dropped (see logical_to_mesh_spec)."""
    return jax.sharding.NamedSharding(mesh, logical_to_mesh_spec(("batch", "length"), mesh, shape))


def constrain(x, names: Sequence[str | None]):
    """`jax.lax.with_sharding_constraint` of activation x [..] to its logical `names` under the active mesh
    (`jax.set_mesh`); a no-op without one, on a one-device mesh, and inside shard_map (manual axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return x
    spec = logical_to_mesh_spec(names, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def context_size() -> int:
    """Size of the `context` axis of the active mesh (1 without a mesh, without that axis, or inside a shard_map,
    where the layers' context-parallel paths must not nest)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return 1
    return int(mesh.shape.get(CONTEXT_AXIS, 1))

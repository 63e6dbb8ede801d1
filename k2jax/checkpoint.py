"""Minimal orbax checkpoints of a KimiLinear's variables (parameters and router biases) plus its config.

Layout of a checkpoint directory (written atomically by orbax: a temporary directory renamed on success):
    params/   orbax StandardSave of the model's variables as a nested dict (nnx.to_pure_dict)
    config/   the ModelConfig as JSON (ModelConfig.to_dict)
The training code extends this with optimizer state and steps; this module only covers model weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from flax import nnx

from k2jax.config import ModelConfig, from_dict, load_config
from k2jax.sharding import logical_names, logical_to_mesh_spec


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_params(model, directory: str | os.PathLike) -> Path:
    """Save every nnx Variable of `model` (a KimiLinear) and its config to `directory` (must not exist yet).

    Sharded arrays are written by each host's own shards (orbax), so this works on multi-host meshes.
    Returns the absolute path.
    """
    ocp, ckptr = _checkpointer()
    path = Path(directory).absolute()
    if path.exists():
        raise FileExistsError(f"save_params: {path} already exists")
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Variable))
    ckptr.save(path, args=ocp.args.Composite(params=ocp.args.StandardSave(tree),
                                             config=ocp.args.JsonSave(model.config.to_dict())))
    return path


def saved_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a `save_params` checkpoint."""
    ocp, ckptr = _checkpointer()
    path = Path(directory).absolute()
    if not (path / "config").exists():
        raise ValueError(f"{path}: not a k2jax params checkpoint (no config/ item)")
    d = ckptr.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return from_dict(dict(d), source=str(path / "config"))


def restore_params(config: ModelConfig | str | os.PathLike | None, directory: str | os.PathLike, mesh=None):
    """Restore a KimiLinear saved by `save_params`.

    config: the ModelConfig (or a load_config name/path) to build; None uses the saved one. Its param_dtype may
        differ from the saved dtype (values are cast); shapes must match, else ValueError.
    mesh: place each variable on the NamedSharding given by its logical axis names; None: the default device.
    """
    from k2jax.model import KimiLinear

    ocp, ckptr = _checkpointer()
    path = Path(directory).absolute()
    if not (path / "params").exists():
        raise ValueError(f"{path}: not a k2jax params checkpoint (no params/ item)")
    if config is None:
        config = saved_config(path)
    elif not isinstance(config, ModelConfig):
        config = load_config(config)
    abstract = nnx.eval_shape(lambda: KimiLinear(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(var):
        sds = var.get_value()
        if mesh is None:
            sharding = device
        else:
            names = logical_names(var) or (None,) * len(sds.shape)
            sharding = jax.sharding.NamedSharding(mesh, logical_to_mesh_spec(names, mesh, sds.shape))
        return jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)

    abstract_tree = nnx.to_pure_dict(jax.tree.map(target, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    try:
        restored = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_tree)))
    except ValueError as e:
        raise ValueError(f"{path}: the saved parameters do not fit a model built from config {config.name!r}: "
                         f"{e}") from None
    nnx.replace_by_pure_dict(state, restored["params"])
    return nnx.merge(graphdef, state)

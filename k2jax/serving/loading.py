"""Serving's model loading and placement: a KimiLinear from a Hugging Face folder or a k2jax orbax checkpoint, and
the ('data', 'expert', 'tensor') serving mesh."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from k2jax import checkpoint as ckpt
from k2jax.hf import load_hf_checkpoint
from k2jax.sharding import logical_names, logical_to_mesh_spec


# ---- model loading and placement ----------------------------------------------------------------------------------
def make_mesh(tensor: int = 1, expert: int = 1, devices=None):
    """A ('data', 'expert', 'tensor') mesh with Auto axes over all (or the given) devices; 'data' takes the rest."""
    devices = list(jax.devices() if devices is None else devices)
    n = tensor * expert
    if tensor < 1 or expert < 1 or len(devices) % n:
        raise ValueError(f"make_mesh: tensor={tensor} x expert={expert} must divide the {len(devices)} devices")
    grid = np.array(devices).reshape(len(devices) // n, expert, tensor)
    return jax.sharding.Mesh(grid, ("data", "expert", "tensor"))


def shard_model(model, mesh):
    """Place every variable of `model` on the NamedSharding its logical axis names give on `mesh` (in place)."""
    state = nnx.state(model, nnx.Variable)

    def place(var):
        names = logical_names(var) or (None,) * var.get_value().ndim
        sh = jax.sharding.NamedSharding(mesh, logical_to_mesh_spec(names, mesh, var.get_value().shape))
        return var.replace(jax.device_put(var.get_value(), sh))

    nnx.update(model, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return model


def load_model(path, *, dtype: str | None = None, mesh=None, config_overrides: dict | None = None):
    """A KimiLinear from a Hugging Face folder (config.json + safetensors) or an orbax checkpoint written by
    k2jax (train.py or `k2jax.checkpoint.save_params`). dtype: parameter and compute dtype (default: the
    checkpoint's); mesh: place the parameters by their logical axes."""
    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"no checkpoint at {str(path)!r}")
    overrides = dict(config_overrides or {})
    if (folder / "config.json").is_file():
        if dtype is not None:
            overrides.setdefault("dtype", dtype)
        return load_hf_checkpoint(folder, dtype=dtype, mesh=mesh, config_overrides=overrides or None)
    params_dir = _params_dir(folder)
    config = ckpt.saved_config(params_dir)
    if dtype is not None:
        overrides.update(param_dtype=dtype, dtype=dtype)
    return ckpt.restore_params(config.replace(**overrides) if overrides else config, params_dir, mesh=mesh)


def _params_dir(folder: Path) -> Path:
    """The params checkpoint inside `folder`: itself, or the newest numbered step below it."""
    if (folder / "params").exists():
        return folder
    steps = sorted((int(p.name), p) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    for _, step in reversed(steps):
        if (step / "params").exists():
            return step
    raise ValueError(f"{folder}: neither a Hugging Face folder (config.json) nor a k2jax checkpoint (params/, or "
                     f"numbered step folders holding params/)")

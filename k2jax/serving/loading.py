"""Serving's model loading: a KimiLinear from a Hugging Face folder or a k2jax orbax checkpoint. Meshes and
placement are k2jax.sharding's (`make_mesh`, `shard_model`), the same four axes as training."""

from __future__ import annotations

from pathlib import Path

from k2jax import checkpoint as ckpt
from k2jax.hf import load_hf_checkpoint


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

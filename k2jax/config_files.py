"""Model configs from files: a `configs/` name, a YAML file of ModelConfig fields, or a Hugging Face `config.json`
(Kimi-Linear, DeepSeek-V3 or Kimi-K2; the released remote-code keys and transformers 5's native keys alike), which
k2jax.hf.config translates.

This module sits above both k2jax.config (the config system) and k2jax.hf (which builds ModelConfigs), so that
neither imports the other's caller.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from k2jax.config import ConfigError, ModelConfig, read_yaml
from k2jax.hf.config import config_from_hf

CONFIG_DIR = Path(os.environ.get("K2JAX_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))


def available_configs() -> list[str]:
    """The names of the shipped configs (configs/*.yaml stems)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """An existing file or folder, else configs/<name>.yaml; ConfigError listing the shipped names otherwise."""
    p = Path(name_or_path)
    if p.exists():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(f"no config named {str(name_or_path)!r}: not a file, and not one of {available_configs()}")


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """Load a config: a `configs/` name ("tiny"), a YAML path, or an HF `config.json` (or a folder holding one),
    translated by `k2jax.hf.config_from_hf` (its `quantization_config` included); then apply `overrides`.

    A YAML run config's `train:` section (k2jax.training.config) is skipped. Raises ConfigError naming the file,
    the field, the value and what is allowed.
    """
    p = resolve_config_path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
        if not p.exists():
            raise ConfigError(f"{name_or_path}: a folder without config.json")
    if p.suffix == ".json":
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON: {e}") from None
        cfg = config_from_hf(d, source=str(p))
    else:
        d = read_yaml(p)
        d.pop("train", None)  # a run config's training section, not a model field
        d.setdefault("name", p.stem)
        cfg = ModelConfig.from_dict(d, source=str(p))
    return cfg.replace(**overrides) if overrides else cfg

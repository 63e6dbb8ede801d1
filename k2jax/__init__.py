"""k2jax: Kimi Linear (KDA + MLA hybrid with MoE) and Kimi K2 in JAX / Flax NNX."""

from k2jax.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "KimiLinear", "ModelConfig", "load_config"]


def __getattr__(name):
    # The model and the config-file reader (which reads HF config.json through k2jax.hf) pull in JAX, Flax and the
    # kernels; load them on first use so that `import k2jax` stays light.
    if name == "KimiLinear":
        from k2jax.model import KimiLinear

        return KimiLinear
    if name == "load_config":
        from k2jax.config_files import load_config

        return load_config
    raise AttributeError(f"module 'k2jax' has no attribute {name!r}")

"""k2jax: Kimi Linear (KDA + MLA hybrid with MoE) and Kimi K2 in JAX / Flax NNX."""

from k2jax.config import ConfigError, ModelConfig, load_config

__all__ = ["ConfigError", "KimiLinear", "ModelConfig", "load_config"]


def __getattr__(name):
    # The model pulls in Flax and the kernels; load it on first use so `import k2jax` stays light.
    if name == "KimiLinear":
        from k2jax.model import KimiLinear

        return KimiLinear
    raise AttributeError(f"module 'k2jax' has no attribute {name!r}")

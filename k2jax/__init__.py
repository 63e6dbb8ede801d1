"""k2jax: Kimi Linear (KDA + MLA hybrid with MoE) and Kimi K2 in JAX / Flax NNX."""

from k2jax.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "KimiLinear", "ModelConfig", "load_config"]  # noqa: F822 (two are loaded lazily)


def __getattr__(name):
    # PEP 562 lazy attributes: the model and the config-file reader (which reads HF config.json through k2jax.hf)
    # pull in JAX, Flax and the kernels, seconds of imports; `import k2jax` (k2jax.config, the CLIs' --help and
    # argument errors) stays light until one of them is used.
    if name == "KimiLinear":
        from k2jax.model import KimiLinear  # noqa: PLC0415 (see above)

        return KimiLinear
    if name == "load_config":
        from k2jax.config_files import load_config  # noqa: PLC0415 (see above)

        return load_config
    raise AttributeError(f"module 'k2jax' has no attribute {name!r}")

"""Test-wide setup: 8 simulated CPU devices and JAX's persistent compile cache (set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/k2jax/jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def error_ratio(ref, x) -> float:
    """||ref - x|| / ||ref||, in float64 (the tolerance measure every test states)."""
    ref = np.asarray(ref, np.float64)
    x = np.asarray(x, np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(ref - x) / (denom if denom > 0 else 1.0))

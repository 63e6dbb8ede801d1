"""Helpers shared by the kernel tests: a quick-compiling jit, the KDA sequence specs, and a count of the Pallas
kernels a function lowers to for TPU or GPU from this CPU machine."""

import contextlib
import functools

import jax
import jax.numpy as jnp

# The interpreted kernels are large programs; XLA's backend optimisations only cost compile time in tests.
jit_fast_compile = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def kda_sequence_specs(B, T, H, K, V, dtype):
    """ShapeDtypeStructs of kda's (q, k, v, g, beta, initial_state, segment_ids) for a [B, T] batch of H heads."""
    s = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    return (s(B, T, H, K), s(B, T, H, K), s(B, T, H, V), s(B, T, H, K, dt=jnp.float32), s(B, T, H, dt=jnp.float32),
            s(B, H, K, V, dt=jnp.float32), s(B, T, dt=jnp.int32))


def count_pallas_kernels(fn, specs, platform):
    """Number of Pallas kernels in `fn` lowered for `platform` ("tpu" or "cuda") on this CPU machine.

    For cuda an abstract GPU mesh stands in for the device (required from JAX 0.11, accepted by 0.10)."""
    context = contextlib.nullcontext()
    if platform == "cuda":
        gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
        context = jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=gpu))
    with context:
        text = jax.jit(fn).trace(*specs).lower(lowering_platforms=(platform,)).as_text()
    return text.count("tpu_custom_call") if platform == "tpu" else text.count("xla.gpu.triton")

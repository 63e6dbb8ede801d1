"""Dispatch between KDA implementations.

"auto" picks the Pallas kernels when the program is lowered for TPU or GPU and the chunked XLA form elsewhere (on
CPU Pallas only interprets, which is a correctness tool, not a speed path). The choice is made with
`jax.lax.platform_dependent`, never `jax.default_backend()`, so one jitted function lowers for any platform.
"""

from __future__ import annotations

import jax

from pallas_kernels.kda.chunk import kda_chunk
from pallas_kernels.kda.pallas import CHUNK_SIZES, kda_pallas
from pallas_kernels.kda.pallas_step import kda_step_pallas
from pallas_kernels.kda.reference import kda_reference, kda_step_reference

IMPLS = ("auto", "chunk", "pallas", "reference")
STEP_IMPLS = ("auto", "pallas", "reference")


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
        chunk_size=64, impl="auto"):
    """KDA over a sequence with the implementation `impl` (see `kda_reference` for shapes and semantics).

    impl: "auto" (Pallas on TPU/GPU, chunk elsewhere), "chunk", "pallas" (interpreted on CPU), "reference".
    """
    if impl not in IMPLS:
        raise ValueError(f"kda: impl must be one of {IMPLS}, got {impl!r}")
    kw = dict(scale=scale, output_final_state=output_final_state, segment_ids=segment_ids)
    if impl == "reference":
        return kda_reference(q, k, v, g, beta, initial_state=initial_state, **kw)
    kw["chunk_size"] = chunk_size
    if impl == "pallas":
        return kda_pallas(q, k, v, g, beta, initial_state=initial_state, **kw)
    if impl == "chunk" or chunk_size not in CHUNK_SIZES:
        return kda_chunk(q, k, v, g, beta, initial_state=initial_state, **kw)

    # platform_dependent traces every branch, so both must accept the same (array) operands.
    def pallas(q, k, v, g, beta, s0):
        return kda_pallas(q, k, v, g, beta, initial_state=s0, interpret=False, **kw)

    def chunk(q, k, v, g, beta, s0):
        return kda_chunk(q, k, v, g, beta, initial_state=s0, **kw)

    return jax.lax.platform_dependent(q, k, v, g, beta, initial_state, tpu=pallas, cuda=pallas, default=chunk)


def kda_step(q, k, v, g, beta, state, *, scale=None, impl="auto"):
    """One decode token: q, k, g: [B, H, K]; v: [B, H, V]; beta: [B, H]; state: [B, H, K, V] float32.

    Returns (o [B, H, V] in v.dtype, new_state [B, H, K, V] float32). "auto": the Pallas in-place kernel on TPU/GPU
    (donate `state` under jit to update it in place), plain jnp elsewhere.
    """
    if impl not in STEP_IMPLS:
        raise ValueError(f"kda_step: impl must be one of {STEP_IMPLS}, got {impl!r}")
    if impl == "reference":
        return kda_step_reference(q, k, v, g, beta, state, scale=scale)
    if impl == "pallas":
        return kda_step_pallas(q, k, v, g, beta, state, scale=scale)

    def pallas(*a):
        return kda_step_pallas(*a, scale=scale, interpret=False)

    def reference(*a):
        return kda_step_reference(*a, scale=scale)

    return jax.lax.platform_dependent(q, k, v, g, beta, state, tpu=pallas, cuda=pallas, default=reference)

"""Dispatch between KDA implementations."""

from __future__ import annotations

from pallas_kernels.kda.chunk import kda_chunk
from pallas_kernels.kda.reference import kda_reference, kda_step_reference

IMPLS = ("auto", "chunk", "reference")


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
        chunk_size=64, impl="auto"):
    """KDA over a sequence with the implementation `impl` (see `kda_reference` for shapes and semantics).

    "auto" uses the chunked XLA form on every platform until the Pallas kernels land.
    """
    if impl not in IMPLS:
        raise ValueError(f"kda: impl must be one of {IMPLS}, got {impl!r}")
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids)
    if impl == "reference":
        return kda_reference(q, k, v, g, beta, **kwargs)
    return kda_chunk(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)


def kda_step(q, k, v, g, beta, state, *, scale=None):
    """One decode token: q, k, g: [B, H, K]; v: [B, H, V]; beta: [B, H]; state: [B, H, K, V] float32.

    Returns (o [B, H, V] in v.dtype, new_state [B, H, K, V] float32).
    """
    return kda_step_reference(q, k, v, g, beta, state, scale=scale)

"""Kimi Delta Attention ops (time-major layout, as in fla), each beside the reference it is tested against.

- `kda_reference`, `kda_step_reference`: the per-token recurrence, ground truth.
- `kda_chunk`: chunked WY/UT form in pure JAX/XLA.
- `kda_pallas`, `kda_step_pallas`: Pallas kernels (forward, fused backward under custom_vjp, in-place decode).
- `kda`, `kda_step`: dispatch (`impl="auto"`: Pallas on TPU/GPU, XLA on CPU).
- `kda_context_parallel`: `kda` with the sequence split over a mesh axis, inside `jax.shard_map`.
"""

from pallas_kernels.kda.chunk import kda_chunk
from pallas_kernels.kda.context_parallel import kda_context_parallel
from pallas_kernels.kda.dispatch import kda, kda_step
from pallas_kernels.kda.pallas import kda_pallas
from pallas_kernels.kda.pallas_step import kda_step_pallas
from pallas_kernels.kda.reference import kda_reference, kda_step_reference

__all__ = ["kda", "kda_chunk", "kda_context_parallel", "kda_pallas", "kda_reference", "kda_step", "kda_step_pallas",
           "kda_step_reference"]

"""Kimi Delta Attention ops (time-major layout, as in fla).

- `kda_reference`: the per-token recurrence, ground truth.
- `kda_chunk`: chunked WY/UT form in pure JAX/XLA.
- `kda_step`: one decode token.
- `kda`: dispatch by platform (`impl="auto"`).
"""

from pallas_kernels.kda.reference import kda_reference, kda_step_reference
from pallas_kernels.kda.chunk import kda_chunk
from pallas_kernels.kda.dispatch import kda, kda_step

__all__ = ["kda", "kda_chunk", "kda_reference", "kda_step", "kda_step_reference"]

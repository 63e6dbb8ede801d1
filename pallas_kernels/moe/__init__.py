"""Grouped matmuls for the routed experts (jax.lax.ragged_dot semantics: rows sorted by expert, one weight each).

- `grouped_matmul`: float32 out; the blocked form on CPU, `jax.lax.ragged_dot` on TPU/GPU (chosen when lowering);
  an Int4Weight goes to `int4_grouped_matmul`.
- `blocked_grouped_matmul`: the CPU path (rows padded to per-expert blocks, one batched matmul over them or, for
  large weights, a scan; a custom VJP for dw).
- `xla_ragged_dot`: the TPU/GPU path, also the reference the blocked one is tested against.
- `int4_grouped_matmul`: packed INT4 experts (`pallas_kernels.int4.int4_ragged_dot` on TPU/GPU; dequantize and the
  blocked form on CPU); `int4_grouped_matmul_kernel` / `int4_grouped_matmul_cpu` are its two branches.
- `frozen_dequantized`: an Int4Weight as a dense array without gradient to its scales.
"""

from pallas_kernels.moe.blocked import blocked_grouped_matmul
from pallas_kernels.moe.dispatch import (
    frozen_dequantized,
    grouped_matmul,
    int4_grouped_matmul,
    int4_grouped_matmul_cpu,
    int4_grouped_matmul_kernel,
    xla_ragged_dot,
)

__all__ = ["blocked_grouped_matmul", "frozen_dequantized", "grouped_matmul", "int4_grouped_matmul",
           "int4_grouped_matmul_cpu", "int4_grouped_matmul_kernel", "xla_ragged_dot"]

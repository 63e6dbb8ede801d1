"""INT4 weight-only quantization (symmetric, levels -7..7, one scale per 32 inputs) and matmuls.

- `quantize_int4` / `dequantize_int4` / `Int4Weight`: packed storage, two 4-bit values per byte along K_in.
- `int4_matmul`: x @ w with a Pallas kernel (TPU, GPU), an XLA path (CPU) and a VJP for x.
- `int4_ragged_dot`: per-expert weights [E, K_in, N_out] over rows sorted by expert (jax.lax.ragged_dot semantics).
- `to_compressed_tensors` / `from_compressed_tensors`: the "pack-quantized" checkpoint layout, bit-exact.
"""

from pallas_kernels.int4.compressed_tensors import from_compressed_tensors, to_compressed_tensors
from pallas_kernels.int4.grouped import int4_ragged_dot
from pallas_kernels.int4.matmul import int4_matmul
from pallas_kernels.int4.packing import pack_int4, unpack_int4
from pallas_kernels.int4.quantize import Int4Weight, dequantize_int4, quantize_int4

__all__ = ["Int4Weight", "dequantize_int4", "from_compressed_tensors", "int4_matmul", "int4_ragged_dot", "pack_int4",
           "quantize_int4", "to_compressed_tensors", "unpack_int4"]

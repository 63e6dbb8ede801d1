"""Kernels for k2jax, independent of the model: each op in its own folder with its reference beside it.

- `pallas_kernels.kda`: Kimi Delta Attention (gated delta rule with channel-wise decay).
- `pallas_kernels.int4`: INT4 weight-only quantization and matmul.
"""

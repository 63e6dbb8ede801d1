"""Kernels for k2jax, independent of the model: each op in its own folder with its reference beside it.

- `pallas_kernels.kda`: Kimi Delta Attention (gated delta rule with channel-wise decay).
- `pallas_kernels.int4`: INT4 weight-only quantization and matmul.
- `pallas_kernels.attention`: softmax attention (MLA expanded and absorbed) in O(T) memory.
- `pallas_kernels.cross_entropy`: lm_head + softmax cross-entropy without [N, V] logits.
- `pallas_kernels.moe`: grouped matmuls of the routed experts (float and INT4), blocked on CPU.
"""

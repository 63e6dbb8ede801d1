"""The model's building blocks, one concern per module; each imports kernels from `pallas_kernels`, never the reverse.

- `linear`, `norms`, `mlp`, `rope`, `short_conv`: projections, RMS norms, SwiGLU, rotary embeddings (YaRN), the
  causal depthwise convolution of KDA.
- `kda`: Kimi Delta Attention (the layer around `pallas_kernels.kda`); `mla`: multi-head latent attention.
- `moe`: the router and the MoE module (routed + shared experts); `expert_parallel`: its expert-parallel dispatch.
- `qat`: INT4 fake quantization of the experts for quantization-aware training.
"""

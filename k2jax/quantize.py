"""Post-training INT4 quantization of the routed experts and byte accounting (the public `k2jax.quantize` path).

Scheme (`pallas_kernels.int4`): symmetric, levels -7..7, one scale (bf16 by default) per `group_size` consecutive
inputs; w1/w3 [E, hidden, I] and w2 [E, I, hidden] are packed two 4-bit values per byte along their input dim.
Only routed experts are quantized: attention, dense and shared MLPs, router, embeddings and norms stay float.

- config `quantization: {experts: int4, group_size: 32}`: the model holds `QuantizedMoEExperts` (k2jax.layers.moe)
  and runs them through `int4_ragged_dot` (sorted path) or a dequantized dense product ('dense' path).
- config `quantization: {qat: true, group_size: 32}`: float experts, fake-quantized in the forward with a
  straight-through gradient (k2jax.layers.qat); `quantize_model_experts` then packs them exactly as trained.
- `quantize_model_experts(model)`: post-training conversion of a float model.
- The compressed-tensors checkpoint format lives in k2jax.hf.compressed_tensors.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from k2jax.layers.qat import int4_experts
from k2jax.model import KimiLinear
from pallas_kernels.int4 import quantize_int4


# ---- PTQ ---------------------------------------------------------------------------------------------------------
def quantize_model_experts(model, group_size: int | None = None, scale_dtype: str | None = None):
    """Post-training quantization: a new KimiLinear whose routed experts are packed INT4 (QuantizedMoEExperts);
    every other variable is shared with `model`, which is left unchanged.

    group_size / scale_dtype default to the model's QAT settings (config.quantization) if any, else 32 / bfloat16,
    so a QAT-trained model is packed onto the grid it was trained on (its forward is then unchanged).
    The new config has quantization = {experts: int4, group_size, scale_dtype, qat: false}.
    """
    cfg = model.config
    if int4_experts(cfg):
        raise ValueError("quantize_model_experts: the model's experts are already INT4")
    if cfg.num_experts == 0:
        raise ValueError("quantize_model_experts: the model has no routed experts (num_experts = 0)")
    q = cfg.quantization or {}
    g = group_size if group_size is not None else q.get("group_size", 32)
    sd = scale_dtype if scale_dtype is not None else q.get("scale_dtype", "bfloat16")
    new_cfg = cfg.replace(quantization={"experts": "int4", "group_size": g, "scale_dtype": sd, "qat": False})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: KimiLinear(new_cfg, rngs=nnx.Rngs(0))))
    old = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Variable))}
    packed: dict[tuple, object] = {}
    new_flat = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(path)
        if path in old:
            value = old[path]
        else:  # (..., 'experts', 'w1_packed' | 'w1_scale'): quantize the float weight once
            name, part = str(path[-1]).split("_")
            src = path[:-1] + (name,)
            if src not in packed:
                packed[src] = quantize_int4(old[src], g, jnp.dtype(sd))
            value = getattr(packed[src], part)
        new_flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _is_routed_expert(path) -> bool:
    return len(path) >= 2 and str(path[-2]) == "experts"


def expert_weight_bytes(model, as_dtype=None) -> int:
    """Bytes of the routed-expert weights: what is really stored (packed nibbles plus scales, or the float arrays),
    or, with `as_dtype`, what the same logical weights would take as dense `as_dtype` arrays."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable)):
        if not _is_routed_expert(path):
            continue
        v = var.get_value()
        n = math.prod(v.shape)
        if as_dtype is None:
            total += n * jnp.dtype(v.dtype).itemsize
        else:
            leaf = str(path[-1])
            logical = 2 * n if leaf.endswith("_packed") else 0 if leaf.endswith("_scale") else n
            total += logical * jnp.dtype(as_dtype).itemsize
    return total

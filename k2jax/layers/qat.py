"""INT4 quantization-aware training of the routed experts, and the config switches the MoE layer reads.

Scheme (`pallas_kernels.int4`): symmetric, levels -7..7, one scale (bf16 by default) per `group_size` consecutive
inputs. config `quantization: {qat: true, group_size: 32}` keeps float experts and fake-quantizes them in the forward
with a straight-through gradient (`fake_quantize_int4`); `k2jax.quantize.quantize_model_experts` then packs them
exactly as trained. config `quantization: {experts: int4, ...}` (`int4_experts`) stores them packed
(`k2jax.layers.moe.QuantizedMoEExperts`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.int4 import dequantize_int4, quantize_int4


def fake_quantize_int4(w, group_size: int = 32, scale_dtype=jnp.bfloat16, dtype=None):
    """w [..., K_in, N_out] -> the values `dequantize_int4(quantize_int4(w, group_size, scale_dtype))` in `dtype`
    (default w.dtype), with a straight-through gradient: d out / d w = identity.

    Written as sg(fq) + (w - sg(w)): the second term is exactly zero, so the forward is bit-identical to the packed
    weights a later `quantize_model_experts` produces.
    """
    dtype = jnp.dtype(dtype or w.dtype)
    wq = dequantize_int4(quantize_int4(jax.lax.stop_gradient(w), group_size, scale_dtype), dtype)
    return wq + (w - jax.lax.stop_gradient(w)).astype(dtype)


def qat_settings(config) -> tuple[int, str] | None:
    """(group_size, scale_dtype) when `config` asks for QAT on float experts, else None."""
    q = config.quantization
    return (q["group_size"], q["scale_dtype"]) if q and q["qat"] else None


def int4_experts(config) -> bool:
    """Whether `config` stores the routed experts packed as INT4."""
    return bool(config.quantization) and config.quantization["experts"] == "int4"

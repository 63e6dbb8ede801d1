"""INT4 weight-only quantization of the routed experts: QAT fake quantization, PTQ conversion, byte accounting and
the compressed-tensors checkpoint format (as Kimi K2 Thinking ships it).

Scheme (`pallas_kernels.int4`): symmetric, levels -7..7, one scale (bf16 by default) per `group_size` consecutive
inputs; w1/w3 [E, hidden, I] and w2 [E, I, hidden] are packed two 4-bit values per byte along their input dim.
Only routed experts are quantized: attention, dense and shared MLPs, router, embeddings and norms stay float.

- config `quantization: {experts: int4, group_size: 32}`: the model holds `QuantizedMoEExperts` (k2jax.moe) and runs
  them through `int4_ragged_dot` (sorted path) or a dequantized dense product ('dense' path).
- config `quantization: {qat: true, group_size: 32}`: float experts, fake-quantized in the forward with a
  straight-through gradient (`fake_quantize_int4`); `quantize_model_experts` then packs them exactly as trained.
- `quantize_model_experts(model)`: post-training conversion of a float model.
- compressed-tensors: `quantization_from_compressed_tensors` / `compressed_tensors_config` translate the
  `quantization_config` of config.json; `ct_bytes_to_packed` / `packed_to_ct` move packed nibbles between the
  checkpoint's int32 words [N, K/8] and `Int4Weight.packed` [K/2, N] without dequantizing (k2jax.hf uses them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.config import ConfigError
from pallas_kernels.int4 import dequantize_int4, quantize_int4

# Byte-wise +8 offset of both nibbles: compressed-tensors stores q + 8, Int4Weight two's complement.
_CT_OFFSET = np.uint8(0x88)


# ---- QAT ---------------------------------------------------------------------------------------------------------
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


# ---- PTQ ---------------------------------------------------------------------------------------------------------
def quantize_model_experts(model, group_size: int | None = None, scale_dtype: str | None = None):
    """Post-training quantization: a new KimiLinear whose routed experts are packed INT4 (QuantizedMoEExperts);
    every other variable is shared with `model`, which is left unchanged.

    group_size / scale_dtype default to the model's QAT settings (config.quantization) if any, else 32 / bfloat16,
    so a QAT-trained model is packed onto the grid it was trained on (its forward is then unchanged).
    The new config has quantization = {experts: int4, group_size, scale_dtype, qat: false}.
    """
    from k2jax.model import KimiLinear

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


# ---- compressed-tensors config -------------------------------------------------------------------------------------
# Non-expert Linear modules, left unquantized (regexes match both the Kimi-Linear and DeepSeek-V3 / K2 names; the
# routers are not nn.Linear in the HF code).
_CT_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"]
_CT_SUPPORTED = ("k2jax loads only compressed-tensors 'pack-quantized' INT4 weights of the routed experts "
                 "(num_bits 4, type int, symmetric, strategy group, static, no activation or KV-cache quantization)")


def compressed_tensors_config(quantization: dict) -> dict:
    """The config.json `quantization_config` for INT4 routed experts with quantization['group_size']."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": quantization["group_size"], "dynamic": False, "actorder": None,
               "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "ignore": list(_CT_IGNORE), "kv_cache_scheme": None, "sparsity_config": {}}


def _refuse(source: str, key: str, value) -> None:
    raise ConfigError(f"{source}: quantization_config.{key} = {value!r} is not supported: {_CT_SUPPORTED}")


def _check_ct_group(name: str, group, source: str) -> int:
    """Validate one config group; returns its group_size."""
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        _refuse(source, f"config_groups.{name}", group)
    w = group["weights"]
    expect = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    for key, want in expect.items():
        if w.get(key) != want:
            _refuse(source, f"config_groups.{name}.weights.{key}", w.get(key))
    for key in ("dynamic", "actorder", "block_structure"):
        if w.get(key):
            _refuse(source, f"config_groups.{name}.weights.{key}", w.get(key))
    for key in ("input_activations", "output_activations"):
        if group.get(key):
            _refuse(source, f"config_groups.{name}.{key}", group.get(key))
    if group.get("format") not in (None, "pack-quantized"):
        _refuse(source, f"config_groups.{name}.format", group.get("format"))
    g = w.get("group_size")
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
        _refuse(source, f"config_groups.{name}.weights.group_size", g)
    return g


def quantization_from_compressed_tensors(qc, source: str = "config.json") -> dict:
    """Our `quantization` dict from an HF `quantization_config`; ConfigError naming the offending key for any
    other scheme. Which modules are quantized is checked against the tensors when the checkpoint is loaded."""
    if not isinstance(qc, dict):
        _refuse(source, "", qc)
    if qc.get("quant_method") != "compressed-tensors":
        _refuse(source, "quant_method", qc.get("quant_method"))
    if qc.get("format") not in (None, "pack-quantized"):
        _refuse(source, "format", qc.get("format"))
    if qc.get("quantization_status", "compressed") != "compressed":
        _refuse(source, "quantization_status", qc.get("quantization_status"))
    for key in ("kv_cache_scheme", "sparsity_config"):
        if qc.get(key):
            _refuse(source, key, qc.get(key))
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        _refuse(source, "config_groups", groups)
    sizes = {_check_ct_group(name, group, source) for name, group in groups.items()}
    if len(sizes) != 1:
        _refuse(source, "config_groups (several group sizes)", sorted(sizes))
    return {"experts": "int4", "group_size": sizes.pop(), "scale_dtype": "bfloat16", "qat": False}


# ---- compressed-tensors tensors (numpy, for the streaming loader and writer) -----------------------------------------
def ct_bytes_to_packed(raw) -> np.ndarray:
    """The bytes of `weight_packed` rows, uint8 [n, K/2] (int32 words [n, K/8] read as little-endian bytes, as the
    file stores them) -> our packed columns uint8 [K/2, n]: byte r of a row holds inputs 2r (low nibble) and 2r+1
    (high nibble) in both layouts, so the conversion is the +8 offset flip and a transpose."""
    return (np.asarray(raw, np.uint8) ^ _CT_OFFSET).T


def packed_to_ct(packed) -> np.ndarray:
    """Our packed uint8 [K/2, N] of one expert -> compressed-tensors `weight_packed` int32 [N, K/8]."""
    packed = np.asarray(packed, np.uint8)
    if packed.shape[0] % 4:
        raise ValueError(f"packed_to_ct: K_in={2 * packed.shape[0]} must be a multiple of 8 (eight nibbles per "
                         "int32 word)")
    return np.ascontiguousarray((packed ^ _CT_OFFSET).T).view("<i4")

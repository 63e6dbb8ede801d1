"""The compressed-tensors checkpoint format of INT4 routed experts (as Kimi K2 Thinking ships it).

`quantization_from_compressed_tensors` / `compressed_tensors_config` translate the `quantization_config` of
config.json; `ct_bytes_to_packed` / `packed_to_ct` move packed nibbles between the checkpoint's int32 words [N, K/8]
and `Int4Weight.packed` [K/2, N] without dequantizing (the loader and writer of k2jax.hf use them).
"""

from __future__ import annotations

import numpy as np

from k2jax.config import ConfigError

# Byte-wise +8 offset of both nibbles: compressed-tensors stores q + 8, Int4Weight two's complement.
_CT_OFFSET = np.uint8(0x88)


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

"""Hugging Face interop: load and save Kimi-Linear and Kimi K2 / DeepSeek-V3 checkpoints (config.json + safetensors).

Two conventions exist for each family, and both load and save:
- REMOTE_CODE: the released checkpoints' own keys and names, read by the modeling code shipped with them
  (`configuration_kimi.py`, `configuration_deepseek.py`; `model_type` kimi_linear, deepseek_v3 or kimi_k2).
- TRANSFORMERS: what transformers 5's native `KimiLinearForCausalLM` / `DeepseekV3ForCausalLM` write
  (`layer_types`, `mlp_layer_types`, `linear_*`, `rope_parameters`, `rope_interleave`, null token ids, ...).
`config_from_hf` reads either; every key of a config.json is mapped, known not to change the computation, or an
error naming it (the key tables below). `save_hf_checkpoint(..., format=...)` writes either; REMOTE_CODE is the
default.

Our parameter tree mirrors the HF module names without the `model.` prefix; the layouts differ (kimi_linear.md §6):

    ours                                        HF
    Linear kernel [in, out]                     `*.weight` [out, in]                     (transpose)
    embed_tokens [V, hidden]                    model.embed_tokens.weight [V, hidden]   (as is)
    lm_head.kernel [hidden, V]                  lm_head.weight [V, hidden]              (absent when tied)
    *_conv1d.weight [W, D]                      *_conv1d.weight [D, 1, W]
    A_log [H]                                   A_log [1, 1, H, 1]
    experts.w1 / w3 [E, hidden, I]              experts.{e}.w1 / w3 .weight [I, hidden]  (Kimi-Linear)
    experts.w2 [E, I, hidden]                   experts.{e}.w2.weight [hidden, I]
    experts.w1_packed u8 [E, hidden/2, I]       experts.{e}.w1.weight_packed i32 [I, hidden/8]  (INT4 experts:
    experts.w1_scale [E, hidden/g, I]           experts.{e}.w1.weight_scale [I, hidden/g]    compressed-tensors,
                                                experts.{e}.w1.weight_shape i64 [2] = [I, hidden]  k2jax.quantize)
    norms, dt_bias, e_score_correction_bias     same name, same layout

Tensor namings (`Naming`): Kimi-Linear's remote code keeps the MoE under `block_sparse_moe.` with experts
`w1/w2/w3` and the dense MLP under `mlp.`; transformers saves Kimi-Linear the same way except that the dense MLP
is under `block_sparse_moe.` too. Kimi K2 / DeepSeek-V3 put both under `mlp.` with experts
`gate_proj/down_proj/up_proj`. transformers' in-memory names (written by `save_pretrained(...,
save_original_format=False)`) fuse tensors: `experts.gate_up_proj` [E, 2I, hidden], `experts.down_proj`
[E, hidden, I], `self_attn.conv1d.weight` [3D, 1, W] (q, k, v), and move the KDA gate under
`self_attn.forget_gate.`; they load too (loading picks the naming from the stored names).

Safetensors headers are parsed here (the format is a u64 header size, a JSON header and raw little-endian data) and
tensors are read with plain `readinto` calls at their offsets: no memory map, so file pages never count towards the
process's resident memory. Each model parameter is assembled in one 64-byte-aligned buffer in our layout, streaming
1 MiB blocks of HF rows into it (transposes and dtype casts included); routed experts fill one preallocated [E, ...]
buffer. On CPU, XLA adopts such an aligned buffer in `device_put` without copying, so loading peaks at about the
model size (bench/hf_load.py: 1.01x for a 1 GB checkpoint); on an accelerator the host holds one parameter at a time.
Pickle-based weights (`.bin`, `.pt`) are refused, never unpickled.

Quantized checkpoints: only compressed-tensors "pack-quantized" INT4 routed experts (Kimi K2 Thinking) are accepted;
their nibbles are copied into the model's packed INT4 experts without dequantizing. A model with INT4 experts is
saved the same way.

Multi-token-prediction (MTP) layers (DeepSeek-V3's `num_nextn_predict_layers`) are not loaded: k2jax has no MTP
head, and their tensors (layers >= num_hidden_layers) are skipped with a logged warning that counts them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from k2jax.config import ConfigError, ModelConfig, field_names
from k2jax.quantize import (compressed_tensors_config, ct_bytes_to_packed, int4_experts, packed_to_ct,
                            quantization_from_compressed_tensors)
from k2jax.rope import yarn_attention_factor, yarn_get_mscale
from k2jax.sharding import logical_names, logical_to_mesh_spec

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

REMOTE_CODE = "remote_code"  # the released config keys and tensor names (the checkpoints' own modeling code)
TRANSFORMERS = "transformers"  # transformers 5's native classes
FORMATS = (REMOTE_CODE, TRANSFORMERS)

# Every safetensors dtype code and its element size; only the floating ones can be loaded.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_NP_DTYPES = {"F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
              "F64": np.dtype(np.float64)}
_CODES = {v: k for k, v in _NP_DTYPES.items()}
_CODES.update({np.dtype("<i4"): "I32", np.dtype("<i8"): "I64"})  # INT4 experts' weight_packed and weight_shape
_INT_SHAPE_DTYPES = {"I64": np.dtype("<i8"), "I32": np.dtype("<i4")}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
_MAX_LISTED = 20  # names shown per category in a mismatch error
_BLOCK_BYTES = 2**20  # read granularity of transposed and cast tensors (cache-sized strided copies)
_ALIGN = 64

_KIMI_LINEAR_AUTO_MAP = {
    "AutoConfig": "configuration_kimi.KimiLinearConfig",
    "AutoModel": "modeling_kimi.KimiLinearModel",
    "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
}
_K2_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
}
# Config fields that only choose an implementation or a runtime dtype: never written into config.json.
_RUNTIME_FIELDS = ("name", "param_dtype", "dtype")
# Fields that choose how k2jax computes or trains, not what the model is; a config.json in either format may carry
# them under their own names (transformers keeps unknown keys and ignores them).
_IMPLEMENTATION_FIELDS = ("kda_impl", "kda_chunk_size", "moe_impl", "moe_ep_impl", "moe_capacity_factor",
                          "scan_layers", "remat", "moe_bias_update_rate", "initializer_range")


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be loaded (missing, corrupt, mismatched or unsupported)."""


# ---- config.json keys ----------------------------------------------------------------------------------------------
# Every key of a config.json is a ModelConfig field name (k2jax writes the fields a format cannot express under their
# own names), or is in exactly one of the tables below; any other key is an error, so a setting that changes the
# computation is never dropped silently.
_MODEL_TYPES = ("kimi_linear", "deepseek_v3", "kimi_k2")  # kimi_k2: Kimi K2's remote code, which is DeepSeek-V3's

# Other spellings of ModelConfig fields (released remote code and transformers 5, both families).
_SPELLINGS = {
    "n_routed_experts": "num_experts",  # DeepSeek-V3
    "num_local_experts": "num_experts",  # transformers' alias in both families
    "num_experts_per_tok": "num_experts_per_token",
    "n_shared_experts": "num_shared_experts",
    "n_group": "num_expert_group",
    "norm_topk_prob": "moe_renormalize",
    "scoring_func": "moe_router_activation_func",
    "model_max_length": "max_position_embeddings",  # Kimi-Linear
    "linear_num_heads": "kda_num_heads",  # transformers' Kimi-Linear
    "linear_head_dim": "kda_head_dim",
    "linear_conv_kernel_dim": "short_conv_kernel_size",
}

# Keys the translation in `config_from_hf` reads, and what they set.
_TRANSLATED = {
    "model_type": "the family: tensor names and the family's fixed choices",
    "_name_or_path": "name",
    "linear_attn_config": "kda_layers, full_attn_layers, kda_num_heads, kda_head_dim, short_conv_kernel_size "
                          "(remote code)",
    "layer_types": "kda_layers, full_attn_layers (transformers: linear_attention / full_attention per layer)",
    "mlp_layer_types": "first_k_dense_replace, moe_layer_freq (transformers: dense / sparse per layer)",
    "rope_parameters": "rope_theta, rope_scaling (transformers' YaRN rules, see _rope_from_parameters)",
    "dtype": "param_dtype and dtype: the dtype the tensors are stored in",
    "torch_dtype": "param_dtype and dtype (older spelling of dtype)",
    "quantization_config": "quantization: compressed-tensors INT4 routed experts only (k2jax.quantize)",
}

# Keys k2jax computes with one value only: (the value, why).
_FIXED = {
    "hidden_act": ("silu", "k2jax's MLPs and experts are SwiGLU with SiLU"),
    "attention_bias": (False, "k2jax's attention projections have no bias"),
    "topk_method": ("noaux_tc", "the DeepSeek-V3 router (sigmoid scores, a selection-only correction bias); "
                                "'greedy' and 'group_limited_greedy' route differently"),
    "partial_rotary_factor": (1.0, "RoPE rotates all qk_rope_head_dim channels"),
}

# Keys that do not change what the model computes, and why.
_INERT = {
    "architectures": "names the model class; model_type decides",
    "auto_map": "names remote-code files, which k2jax never runs",
    "transformers_version": "the version that wrote the file",
    "use_cache": "whether transformers keeps a cache while generating; the outputs are the same",
    "head_dim": "derived: transformers sets it to qk_rope_head_dim; the remote Kimi-Linear code does not use it",
    "qk_head_dim": "derived: qk_nope_head_dim + qk_rope_head_dim",
    "num_key_value_heads": "MLA gives every query head its own key and value (kv_b_proj); transformers' DeepseekV3 "
                           "writes 128 by default and its SDPA path ignores it (k2jax sets num_attention_heads)",
    "attention_dropout": "dropout is off at inference, and k2jax trains without attention dropout",
    "pretraining_tp": "the tensor-parallel degree of pretraining; the forward pass does not use it",
    "ep_size": "the expert-parallel degree of the remote DeepSeek-V3 code; the outputs are the same",
    "aux_loss_alpha": "the weight of a training-time balance loss, not part of the forward pass",
    "seq_aux": "whether that balance loss is per sequence, not part of the forward pass",
    "output_router_logits": "whether transformers also returns router logits; the logits are the same",
    "output_attentions": "whether transformers also returns attention weights",
    "output_hidden_states": "whether transformers also returns hidden states",
    "return_dict": "the type of transformers' return value",
    "num_nextn_predict_layers": "multi-token-prediction modules: not part of the causal LM; their tensors are "
                                "skipped with a logged warning",
    "num_mtp_layers": "transformers' spelling of num_nextn_predict_layers",
}

# Remote-code keys that transformers' native classes do not read: the native code always computes with the value
# below. In a config.json of the TRANSFORMERS convention they must hold that value (or be absent), else the two codes
# compute different things and k2jax will not guess which one the weights were trained with. (Also the fields
# transformers has no key for.)
_NATIVE_FIXED = {
    "kimi_linear": {"mla_use_nope": True, "moe_router_activation_func": "sigmoid", "use_grouped_topk": True,
                    "moe_router_weights_from_biased_scores": False, "mla_latent_norm_eps": 1e-6},
    "deepseek_v3": {"mla_use_nope": False, "moe_router_activation_func": "sigmoid", "moe_layer_freq": 1,
                    "use_grouped_topk": True, "moe_router_weights_from_biased_scores": False,
                    "mla_latent_norm_eps": 1e-6},
}
# Keys whose presence means transformers 5's native class wrote the file (the remote-code classes have no such keys).
_NATIVE_KEYS = {"kimi_linear": ("layer_types", "mlp_layer_types"),
                "deepseek_v3": ("rope_parameters", "rope_interleave")}

# Fields a config.json must set: the families' own defaults differ from k2jax's (the released 48B values) and from
# each other, so k2jax guesses none of them (always / with routed experts / with RoPE MLA / for the remote Kimi code).
_REQUIRED = {
    "always": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rms_norm_eps"),
    "experts": ("moe_intermediate_size", "num_experts_per_token", "num_shared_experts", "routed_scaling_factor",
                "moe_renormalize", "num_expert_group", "topk_group", "first_k_dense_replace"),
    "rope": ("rope_theta",),
    "remote_kimi": ("mla_use_nope",),
}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")

_LAYER_TYPES = ("linear_attention", "full_attention")  # transformers' Kimi-Linear layer_types values
_MLP_LAYER_TYPES = ("dense", "sparse")
_LINEAR_ATTN_CONFIG = {"kda_layers": "kda_layers", "full_attn_layers": "full_attn_layers",
                       "num_heads": "kda_num_heads", "head_dim": "kda_head_dim",
                       "short_conv_kernel_size": "short_conv_kernel_size"}
_ROPE_PARAMETER_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
                        "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
                        "partial_rotary_factor"}


def _dtype_name(dtype) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"dtype {dtype!r} is not a dtype; use 'float32', 'bfloat16' or 'float16'") from None
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r} is not supported for parameters; use 'float32', 'bfloat16' or 'float16'")
    return name


def hf_convention(hf: dict) -> str:
    """TRANSFORMERS when config.json holds keys only transformers 5's native classes write (`layer_types`,
    `mlp_layer_types` for kimi_linear; `rope_parameters`, `rope_interleave` for deepseek_v3), else REMOTE_CODE.
    kimi_k2 has no native class: always REMOTE_CODE. The convention decides what the keys mean where the two codes
    differ: Kimi-Linear's routing weights (the remote code takes them from the bias-corrected scores, transformers
    from the plain ones) and YaRN's cos/sin scale."""
    return TRANSFORMERS if any(k in hf for k in _NATIVE_KEYS.get(hf.get("model_type"), ())) else REMOTE_CODE


def _family(model_type: str) -> str:
    return "kimi_linear" if model_type == "kimi_linear" else "deepseek_v3"


def config_from_hf(hf: dict, *, dtype=None, source: str = CONFIG_FILE) -> ModelConfig:
    """A ModelConfig from an HF config.json dict of either convention (REMOTE_CODE or TRANSFORMERS, see
    `hf_convention`). param_dtype: `dtype` if given, else the checkpoint's own (`dtype` / `torch_dtype`), else
    float32. A `quantization_config` must be compressed-tensors INT4 (routed experts only, k2jax.quantize); it
    becomes `quantization: {experts: int4, ...}`.

    Raises ConfigError naming the key for: an unknown key, a key whose value k2jax cannot compute with (the _FIXED
    table, an unknown rope type, a quantization scheme other than INT4 experts), two spellings of one setting that
    disagree, and a math-changing key left out (no default is guessed for rms_norm_eps, rope_theta and the routing
    constants).
    """
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; expected one of {_MODEL_TYPES}")
    family, convention = _family(model_type), hf_convention(hf)
    fields = field_names() - {"name", "dtype", "param_dtype", "quantization"}
    unknown = sorted(k for k in hf if k not in fields and k not in _SPELLINGS and k not in _TRANSLATED
                     and k not in _FIXED and k not in _INERT)
    if unknown:
        raise ConfigError(f"{source}: unknown config.json key(s) {unknown}: k2jax cannot tell whether they change the "
                          "computation. Remove them if they do not (or report them so k2jax learns them).")
    for key, (value, why) in _FIXED.items():
        if key in hf and hf[key] != value:
            raise ConfigError(f"{source}: {key} = {hf[key]!r} is not supported: must be {value!r} ({why})")

    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # field -> the key it was read from
    for key, value in hf.items():
        field = _SPELLINGS.get(key, key)
        if field not in fields or key in _INERT:
            continue
        if field in out and out[field] != value:
            raise ConfigError(f"{source}: {spelled[field]} = {out[field]!r} and {key} = {value!r} are two spellings "
                              f"of {field} with different values")
        out[field], spelled[field] = value, key
    out["num_key_value_heads"] = out.get("num_attention_heads")  # MLA: one key / value per query head
    for key in _TOKEN_IDS:  # not Kimi's ids when a file leaves them out: they do not change the math
        out.setdefault(key, None)
    if isinstance(out["eos_token_id"], list):  # transformers allows several: generation settings, not math
        out["eos_token_id"] = out["eos_token_id"][0] if out["eos_token_id"] else None
    if out.get("num_experts") is None:
        out["num_experts"] = 0
    out.update(_rope_fields(hf, out, source, transformers_rules=(family, convention) == ("deepseek_v3",
                                                                                        TRANSFORMERS)))
    if family == "kimi_linear":
        out.update(_kimi_layer_fields(hf, out, source))
        # The remote code takes the routing weights from the bias-corrected scores (an aliasing quirk,
        # kimi_linear.md §5); transformers' KimiLinear from the plain sigmoid scores.
        out.setdefault("moe_router_weights_from_biased_scores", convention == REMOTE_CODE)
    else:
        out["kda_layers"] = out["full_attn_layers"] = None
        out.setdefault("mla_use_nope", False)
        out.setdefault("moe_router_weights_from_biased_scores", False)  # DeepSeek-V3 code: weights from plain scores
    if convention == TRANSFORMERS:
        for field, value in _NATIVE_FIXED[family].items():
            if field in out and out[field] != value:
                raise ConfigError(
                    f"{source}: {spelled.get(field, field)} = {out[field]!r}, but this config.json was written by "
                    f"transformers ({'/'.join(_NATIVE_KEYS[family])} present), whose {family} code ignores that key "
                    f"and computes with {value!r}; k2jax cannot tell which of the two trained these weights")
            out[field] = value
    _require(out, source, remote_kimi=family == "kimi_linear" and convention == REMOTE_CODE,
             rope=not out.get("mla_use_nope", True))
    for k, v in list(out.items()):
        if isinstance(v, list):
            out[k] = tuple(v)
    out["name"] = str(hf.get("_name_or_path") or model_type)
    stored = hf.get("dtype") or hf.get("torch_dtype")  # transformers keeps `dtype` when both are present
    if stored in ("float32", "bfloat16", "float16"):
        out["dtype"] = stored  # HF runs the model in the dtype it was saved in
    out["param_dtype"] = _dtype_name(dtype) if dtype is not None else out.get("dtype", "float32")
    if hf.get("quantization_config"):
        out["quantization"] = quantization_from_compressed_tensors(hf["quantization_config"], source)
    try:
        return ModelConfig(**out)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _require(out: dict, source: str, *, remote_kimi: bool = False, rope: bool = False) -> None:
    """ConfigError listing the _REQUIRED fields `out` lacks (experts: when num_experts > 0)."""
    need = list(_REQUIRED["always"]) + list(_REQUIRED["experts"] if out.get("num_experts") else ())
    need += list(_REQUIRED["remote_kimi"] if remote_kimi else ()) + list(_REQUIRED["rope"] if rope else ())
    missing = [f for f in need if f not in out]
    if missing:
        raise ConfigError(f"{source}: config.json does not set {missing}; k2jax does not guess these (their defaults "
                          "differ between the Kimi-Linear and DeepSeek-V3 codes and the released models)")


def _rope_fields(hf: dict, out: dict, source: str, transformers_rules: bool) -> dict:
    """rope_theta / rope_scaling from `rope_parameters` (transformers 5), or from `rope_scaling` read by
    transformers' DeepSeek-V3 (`transformers_rules`: it converts the old key with its own rules); a remote-code
    `rope_scaling` stays as it is (the field means the released code's rules)."""
    rp, rs = hf.get("rope_parameters"), hf.get("rope_scaling")
    if rp is not None and rs is not None:
        raise ConfigError(f"{source}: both rope_scaling = {rs!r} and rope_parameters = {rp!r} are set; "
                          "k2jax does not pick one")
    if rp is None and (rs is None or not transformers_rules):
        return {}
    theta, scaling = _rope_from_parameters(rp if rp is not None else rs, out.get("max_position_embeddings"), source)
    fields = {"rope_scaling": scaling}
    if theta is not None:
        if "rope_theta" in out and out["rope_theta"] != theta:
            raise ConfigError(f"{source}: rope_theta = {out['rope_theta']!r} and rope_parameters.rope_theta = "
                              f"{theta!r} differ")
        fields["rope_theta"] = theta
    return fields


def transformers_attention_factor(rp: dict, factor: float) -> float:
    """The YaRN cos/sin scale transformers computes for a `rope_parameters` dict: `attention_factor` if set, else
    m(f, mscale) / m(f, mscale_all_dim) when both are non-zero, else m(f, 1). (The released DeepSeek-V3 code uses
    m(f, mscale) / m(f, mscale_all_dim) with defaults 1 / 0 in every case: k2jax.rope.yarn_attention_factor.)"""
    if rp.get("attention_factor") is not None:
        return float(rp["attention_factor"])
    mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
    return float(yarn_get_mscale(factor))


def _rope_from_parameters(rp, max_positions, source: str) -> tuple[float | None, dict | None]:
    """(rope_theta, rope_scaling) computing what transformers 5 computes for `rope_parameters`: rope_type 'default'
    (other keys are unused there) or 'yarn', whose `factor` defaults to max_position_embeddings /
    original_max_position_embeddings, beta_fast / beta_slow to 32 / 1 (also when 0), and whose cos/sin scale
    follows `transformers_attention_factor` (stored as rope_scaling.attention_factor where k2jax's own rule
    differs). `truncate: false`, partial rotation and other rope types are refused."""
    where = f"{source}: rope_parameters"
    if not isinstance(rp, dict):
        raise ConfigError(f"{where} = {rp!r} must be a mapping")
    unknown = sorted(set(rp) - _ROPE_PARAMETER_KEYS)
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; known: {sorted(_ROPE_PARAMETER_KEYS)}")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if "type" in rp and "rope_type" in rp and rp["type"] != rp["rope_type"]:
        raise ConfigError(f"{where}: type = {rp['type']!r} and rope_type = {rp['rope_type']!r} differ")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}.partial_rotary_factor = {rp['partial_rotary_factor']!r} is not supported "
                          "(MLA rotates all qk_rope_head_dim channels)")
    theta = rp.get("rope_theta")
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"{where}.rope_type = {kind!r} is not supported: only 'default' and 'yarn'")
    if rp.get("truncate", True) is not True:
        raise ConfigError(f"{where}.truncate = {rp['truncate']!r} is not supported: k2jax's YaRN rounds the "
                          "correction range to whole channels (truncate: true, as DeepSeek-V3)")
    original = rp.get("original_max_position_embeddings", max_positions)
    if original is None:
        raise ConfigError(f"{where}: yarn needs original_max_position_embeddings (or max_position_embeddings)")
    factor = rp.get("factor")
    if factor is None:
        if max_positions is None:
            raise ConfigError(f"{where}: yarn without factor needs max_position_embeddings")
        factor = max_positions / original
    scaling = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
               "beta_fast": rp.get("beta_fast") or 32.0, "beta_slow": rp.get("beta_slow") or 1.0}
    for k in ("mscale", "mscale_all_dim"):
        if rp.get(k) is not None:
            scaling[k] = rp[k]
    attention_factor = transformers_attention_factor(rp, float(factor))
    if attention_factor != yarn_attention_factor(scaling):
        scaling["attention_factor"] = attention_factor
    return theta, scaling


def _kimi_layer_fields(hf: dict, out: dict, source: str) -> dict:
    """Kimi-Linear's layer schedule from `linear_attn_config` (remote code) and/or `layer_types` and
    `mlp_layer_types` (transformers 5); when a file has both, they must agree."""
    L = out.get("num_hidden_layers")
    if not isinstance(L, int) or L <= 0:
        raise ConfigError(f"{source}: num_hidden_layers = {L!r} must be a positive integer")
    fields: dict[str, Any] = {}
    lac = hf.get("linear_attn_config")
    if lac is not None:
        if not isinstance(lac, dict):
            raise ConfigError(f"{source}: linear_attn_config = {lac!r} must be a mapping")
        unknown = sorted(set(lac) - set(_LINEAR_ATTN_CONFIG))
        missing = sorted(set(_LINEAR_ATTN_CONFIG) - set(lac))
        if unknown or missing:
            raise ConfigError(f"{source}: linear_attn_config needs exactly the keys {sorted(_LINEAR_ATTN_CONFIG)} "
                              f"(unknown: {unknown}, missing: {missing})")
        for key, field in _LINEAR_ATTN_CONFIG.items():
            value = tuple(lac[key]) if isinstance(lac[key], list) else lac[key]
            if field in out and field not in ("kda_layers", "full_attn_layers") and out[field] != value:
                raise ConfigError(f"{source}: linear_attn_config.{key} = {value!r} but {field} is {out[field]!r}")
            fields[field] = value
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != L or any(t not in _LAYER_TYPES
                                                                              for t in layer_types):
            raise ConfigError(f"{source}: layer_types = {layer_types!r} must list one of {_LAYER_TYPES} for each of "
                              f"the num_hidden_layers={L} layers")
        kda = tuple(i + 1 for i, t in enumerate(layer_types) if t == "linear_attention")
        full = tuple(i + 1 for i, t in enumerate(layer_types) if t == "full_attention")
        if lac is not None and (sorted(fields["kda_layers"]), sorted(fields["full_attn_layers"])) != (list(kda),
                                                                                                        list(full)):
            raise ConfigError(f"{source}: layer_types = {layer_types} and linear_attn_config (kda_layers "
                              f"{list(fields['kda_layers'])}, full_attn_layers {list(fields['full_attn_layers'])}) "
                              "describe different layers")
        fields["kda_layers"], fields["full_attn_layers"] = kda, full
    if "kda_layers" not in fields:  # the remote code without linear_attn_config: every layer is MLA
        fields["kda_layers"], fields["full_attn_layers"] = (), tuple(range(1, L + 1))
    mlp_types = hf.get("mlp_layer_types")
    if mlp_types is not None:
        if not isinstance(mlp_types, list) or len(mlp_types) != L or any(t not in _MLP_LAYER_TYPES
                                                                          for t in mlp_types):
            raise ConfigError(f"{source}: mlp_layer_types = {mlp_types!r} must list one of {_MLP_LAYER_TYPES} for "
                              f"each of the num_hidden_layers={L} layers")
        sparse = [t == "sparse" for t in mlp_types]
        first, freq = moe_schedule(sparse)
        if first is None:
            raise ConfigError(f"{source}: mlp_layer_types = {mlp_types} has no k2jax equivalent (MoE layers are the "
                              "layers >= first_k_dense_replace whose index is a multiple of moe_layer_freq)")
        if "first_k_dense_replace" in out or "moe_layer_freq" in out:
            fk, f = out.get("first_k_dense_replace", first), out.get("moe_layer_freq", freq)
            if [i >= fk and i % f == 0 for i in range(L)] != sparse:
                raise ConfigError(f"{source}: mlp_layer_types = {mlp_types} and first_k_dense_replace = {fk}, "
                                  f"moe_layer_freq = {f} place the MoE layers differently")
        fields["first_k_dense_replace"], fields["moe_layer_freq"] = first, freq
    return fields


def moe_schedule(sparse: list[bool]) -> tuple[int | None, int | None]:
    """(first_k_dense_replace, moe_layer_freq) placing MoE exactly where `sparse` [L] is True (layer i is MoE iff
    i >= first_k_dense_replace and i % moe_layer_freq == 0), or (None, None) if no such pair exists."""
    L = len(sparse)
    if not any(sparse):
        return L, 1
    first = sparse.index(True)
    for freq in range(1, L + 1):
        if [i >= first and i % freq == 0 for i in range(L)] == list(sparse):
            return first, freq
    return None, None


# ---- ModelConfig -> config.json --------------------------------------------------------------------------------------
def hf_config_dict(config: ModelConfig, format: str = REMOTE_CODE) -> dict:
    """The HF config.json for `config`: Kimi-Linear when it has KDA layers (kda_layers not None), else DeepSeek-V3.

    format REMOTE_CODE: the released keys (model_type kimi_linear / kimi_k2, auto_map to the remote code). Fields
    that format cannot express (e.g. our `moe_router_weights_from_biased_scores: false` for Kimi-Linear) are added
    under their own names when they differ from what the format implies, so `config_from_hf(hf_config_dict(c))`
    gives back `c` (up to name and dtypes); the remote code ignores them.
    format TRANSFORMERS: transformers 5's native keys (model_type kimi_linear / deepseek_v3, no auto_map), which
    `transformers.AutoModelForCausalLM` loads into KimiLinearForCausalLM / DeepseekV3ForCausalLM. A field that
    changes the math and that transformers cannot express raises ValueError naming it (only the fields in
    _IMPLEMENTATION_FIELDS are added under their own names).
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {FORMATS}")
    c = config
    if format == TRANSFORMERS:
        c = _transformers_equivalent(c)
        hf = _transformers_kimi(c) if c.kda_layers is not None else _transformers_deepseek(c)
    else:
        hf = _remote_kimi(c) if c.kda_layers is not None else _remote_k2(c)
    if int4_experts(c):
        hf["quantization_config"] = compressed_tensors_config(c.quantization)
    back = config_from_hf(hf, source="<generated config.json>")
    for field in c.to_dict():
        # `quantization` is written as quantization_config (packed experts) or not at all (QAT is a training setting)
        if field in _RUNTIME_FIELDS or field == "quantization" or getattr(back, field) == getattr(c, field):
            continue
        if field == "rope_scaling" and _yarn_math(back.rope_scaling) == _yarn_math(c.rope_scaling):
            continue  # the same YaRN, spelled with its defaults filled in
        if format == TRANSFORMERS and field not in _IMPLEMENTATION_FIELDS:
            family = "KimiLinear" if c.kda_layers is not None else "DeepseekV3"
            raise ValueError(f"format='transformers': transformers' {family} cannot express {field} = "
                             f"{getattr(c, field)!r} (it computes with {getattr(back, field)!r}); save with "
                             "format='remote_code'")
        value = getattr(c, field)
        hf[field] = list(value) if isinstance(value, tuple) else value
    return hf


def _yarn_math(rope_scaling: dict | None) -> tuple | None:
    """What a rope_scaling dict computes with in k2jax.rope (absent or null keys take the DeepSeek-V3 defaults), for
    comparing two spellings of one YaRN."""
    if rope_scaling is None:
        return None
    rs = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 0.0} | {
        k: v for k, v in rope_scaling.items() if v is not None}
    return (float(rs["factor"]), int(rs["original_max_position_embeddings"]), float(rs["beta_fast"]),
            float(rs["beta_slow"]), float(rs["mscale_all_dim"]), yarn_attention_factor(rope_scaling))


def _common_keys(c: ModelConfig) -> dict:
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings, "initializer_range": c.initializer_range,
            "use_cache": True, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id, "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
            "qk_nope_head_dim": c.qk_nope_head_dim, "qk_rope_head_dim": c.qk_rope_head_dim,
            "v_head_dim": c.v_head_dim, "moe_intermediate_size": c.moe_intermediate_size,
            "routed_scaling_factor": c.routed_scaling_factor, "topk_group": c.topk_group}


def _remote_kimi(c: ModelConfig) -> dict:
    kda = sorted(c.kda_layers)
    full = sorted(c.full_attn_layers) if c.full_attn_layers is not None else \
        [i for i in range(1, c.num_hidden_layers + 1) if i not in set(kda)]
    return {"architectures": ["KimiLinearForCausalLM"], "auto_map": dict(_KIMI_LINEAR_AUTO_MAP),
            "model_type": "kimi_linear", **_common_keys(c), "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling, "first_k_dense_replace": c.first_k_dense_replace,
            "moe_layer_freq": c.moe_layer_freq, "num_nextn_predict_layers": 0,
            "head_dim": c.hidden_size // c.num_attention_heads,  # legacy field, unused by the model
            "model_max_length": c.max_position_embeddings, "dtype": c.param_dtype,
            "mla_use_nope": c.mla_use_nope, "num_experts": c.num_experts,
            "num_experts_per_token": c.num_experts_per_token, "num_shared_experts": c.num_shared_experts,
            "moe_router_activation_func": c.moe_router_activation_func, "moe_renormalize": c.moe_renormalize,
            "use_grouped_topk": c.use_grouped_topk, "num_expert_group": c.num_expert_group,
            "linear_attn_config": {"full_attn_layers": full, "kda_layers": kda, "head_dim": c.kda_head_dim,
                                   "num_heads": c.kda_num_heads, "short_conv_kernel_size": c.short_conv_kernel_size}}


def _remote_k2(c: ModelConfig) -> dict:
    return {"architectures": ["DeepseekV3ForCausalLM"], "auto_map": dict(_K2_AUTO_MAP), "model_type": "kimi_k2",
            **_common_keys(c), "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
            "first_k_dense_replace": c.first_k_dense_replace, "moe_layer_freq": c.moe_layer_freq,
            "num_nextn_predict_layers": 0, "max_position_embeddings": c.max_position_embeddings,
            "torch_dtype": c.param_dtype, "n_routed_experts": c.num_experts or None,
            "num_experts_per_tok": c.num_experts_per_token, "n_shared_experts": c.num_shared_experts,
            "n_group": c.num_expert_group, "norm_topk_prob": c.moe_renormalize,
            "scoring_func": c.moe_router_activation_func, "topk_method": "noaux_tc", "ep_size": 1,
            "attention_bias": False, "attention_dropout": 0.0}


def _transformers_equivalent(c: ModelConfig) -> ModelConfig:
    """`c` with the settings that cannot change the outputs put in the form transformers' classes imply: the MoE
    schedule as (first MoE layer, frequency), group-limited routing on when it selects every group anyway, RoPE
    settings at their defaults when MLA is NoPE, KDA settings at their defaults when there is no KDA layer."""
    sparse = [c.is_moe_layer(i) for i in range(c.num_hidden_layers)]
    first, freq = moe_schedule(sparse)
    if c.kda_layers is None and all(s == (i >= first) for i, s in enumerate(sparse)):
        freq = 1  # DeepseekV3 has no moe_layer_freq; this schedule needs none
    if first is not None:
        c = c.replace(first_k_dense_replace=first, moe_layer_freq=freq)
    if c.num_expert_group <= c.topk_group:
        c = c.replace(use_grouped_topk=True)  # every group is selected: the same routing
    defaults = ModelConfig()
    if c.mla_use_nope:
        c = c.replace(rope_theta=defaults.rope_theta, rope_scaling=None, rope_interleave=True)
    if not c.kda_layers:
        c = c.replace(kda_num_heads=defaults.kda_num_heads, kda_head_dim=defaults.kda_head_dim,
                      short_conv_kernel_size=defaults.short_conv_kernel_size)
    return c


def _transformers_kimi(c: ModelConfig) -> dict:
    if c.tie_word_embeddings:
        raise ValueError("format='transformers': transformers' KimiLinearForCausalLM does not tie lm_head to the "
                         "embedding (tie_word_embeddings: true); save with format='remote_code'")
    kda = set(c.kda_layers)
    return {"architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", **_common_keys(c),
            "model_max_length": c.max_position_embeddings, "dtype": c.param_dtype,
            "num_experts": c.num_experts, "num_experts_per_token": c.num_experts_per_token,
            "num_shared_experts": c.num_shared_experts, "num_expert_group": c.num_expert_group,
            "moe_renormalize": c.moe_renormalize, "attention_bias": False, "attention_dropout": 0.0,
            "layer_types": ["linear_attention" if i + 1 in kda else "full_attention"
                            for i in range(c.num_hidden_layers)],
            "mlp_layer_types": ["sparse" if c.is_moe_layer(i) else "dense" for i in range(c.num_hidden_layers)],
            "linear_num_heads": c.kda_num_heads, "linear_head_dim": c.kda_head_dim,
            "linear_conv_kernel_dim": c.short_conv_kernel_size}


def _transformers_deepseek(c: ModelConfig) -> dict:
    if c.rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    else:
        rs = c.rope_scaling
        rope = {"rope_type": "yarn", "rope_theta": c.rope_theta, "factor": float(rs["factor"]),
                "original_max_position_embeddings": rs["original_max_position_embeddings"]}
        # As stored; a 0 that transformers would replace by its default fails the round-trip check of the caller.
        rope.update({k: rs[k] for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")
                     if rs.get(k) is not None})
        ours = yarn_attention_factor(rs)
        if transformers_attention_factor(rope, rope["factor"]) != ours:
            rope["attention_factor"] = ours
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **_common_keys(c),
            "max_position_embeddings": c.max_position_embeddings, "dtype": c.param_dtype,
            "n_routed_experts": c.num_experts, "num_experts_per_tok": c.num_experts_per_token,
            "n_shared_experts": c.num_shared_experts, "n_group": c.num_expert_group,
            "norm_topk_prob": c.moe_renormalize, "first_k_dense_replace": c.first_k_dense_replace,
            "rope_parameters": rope, "rope_interleave": c.rope_interleave, "attention_bias": False,
            "attention_dropout": 0.0, "num_nextn_predict_layers": 0}


# ---- tensor name and layout map ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Naming:
    """How a checkpoint spells our modules' tensors.

    moe / dense: the module name of a MoE layer / a dense layer's MLP ('block_sparse_moe' or 'mlp');
    experts: our w1 / w3 / w2 -> the per-expert names; fused: transformers' in-memory layout (experts.gate_up_proj
    [E, 2I, hidden] and experts.down_proj [E, hidden, I], self_attn.conv1d [3D, 1, W], self_attn.forget_gate.*),
    loaded but never written.
    """

    moe: str
    dense: str
    experts: tuple[tuple[str, str], ...] = (("w1", "w1"), ("w3", "w3"), ("w2", "w2"))
    fused: bool = False


KIMI_LINEAR = Naming(moe="block_sparse_moe", dense="mlp")  # the released remote code
KIMI_LINEAR_TRANSFORMERS = Naming(moe="block_sparse_moe", dense="block_sparse_moe")  # transformers' save_pretrained
DEEPSEEK_V3 = Naming(moe="mlp", dense="mlp", experts=(("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")))
FUSED = Naming(moe="mlp", dense="mlp", fused=True)  # transformers' in-memory names, both families


def naming_for(config: ModelConfig, format: str = REMOTE_CODE) -> Naming:
    """The tensor naming `save_hf_checkpoint` writes for `config` in `format`."""
    if config.kda_layers is None:
        return DEEPSEEK_V3
    return KIMI_LINEAR_TRANSFORMERS if format == TRANSFORMERS else KIMI_LINEAR


def _stored_naming(hf: dict, stored: Iterable[str]) -> Naming:
    """The naming of a checkpoint's tensors: FUSED if it holds transformers' fused tensors; for Kimi-Linear, where
    the dense MLP lives (`mlp.` in the remote code, `block_sparse_moe.` as transformers saves it)."""
    names = list(stored)
    if any(n.endswith((".experts.gate_up_proj", ".self_attn.conv1d.weight")) or ".forget_gate." in n for n in names):
        return FUSED
    if _family(hf.get("model_type")) == "deepseek_v3":
        return DEEPSEEK_V3
    dense = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.(gate|up|down)_proj\.weight$")
    return KIMI_LINEAR_TRANSFORMERS if any(dense.match(n) for n in names) else KIMI_LINEAR


@dataclass(frozen=True)
class TensorMap:
    """One HF tensor (or one block of rows of it): its name, the parameter path it belongs to, how the layouts
    relate, and the HF tensor's full shape.

    kind: 'copy' (same layout), 'linear' (transpose), 'conv' ([W, D] <-> [D, 1, W]), 'a_log' ([H] <-> [1, 1, H, 1])
    or 'expert' (slice `expert` of a stacked [E, a, b] parameter, transposed: HF [b, a]); INT4 experts add
    'expert_packed' (our uint8 [E, K/2, N] <-> HF int32 [N, K/8]) and 'expert_shape' (HF int64 [N, K], checked).
    row0: where the block starts, in rows of the HF tensor seen as 2-D [rows, last dim] (the fused naming keeps
    several parameters in one tensor, e.g. expert e's w3 at rows e * 2I + I of gate_up_proj [E, 2I, hidden]).
    """

    hf_name: str
    path: tuple
    kind: str
    hf_shape: tuple[int, ...]
    expert: int | None = None
    row0: int = 0


def _entries(path: tuple, shape: tuple[int, ...], naming: Naming) -> list[TensorMap]:
    keys = [str(k) for k in path]
    leaf, mods = keys[-1], keys[:-1]
    if keys == ["embed_tokens"]:
        return [TensorMap("model.embed_tokens.weight", path, "copy", shape)]
    if keys == ["lm_head", "kernel"]:
        return [TensorMap("lm_head.weight", path, "linear", shape[::-1])]
    mods = [naming.moe if m == "block_sparse_moe" else naming.dense if m == "mlp" else m for m in mods]
    if naming.fused:
        fused = _fused_entries(path, shape, mods, leaf)
        if fused is not None:
            return fused
    base = ".".join(["model", *mods])
    if leaf == "kernel" and len(shape) == 2:
        return [TensorMap(f"{base}.weight", path, "linear", shape[::-1])]
    if leaf == "weight" and mods and mods[-1].endswith("_conv1d") and len(shape) == 2:
        return [TensorMap(f"{base}.weight", path, "conv", (shape[1], 1, shape[0]))]
    if leaf == "weight" and len(shape) == 1:
        return [TensorMap(f"{base}.weight", path, "copy", shape)]
    if leaf == "A_log" and len(shape) == 1:
        return [TensorMap(f"{base}.A_log", path, "a_log", (1, 1, shape[0], 1))]
    if leaf in ("dt_bias", "e_score_correction_bias") and len(shape) == 1:
        return [TensorMap(f"{base}.{leaf}", path, "copy", shape)]
    if leaf in ("w1", "w2", "w3") and mods and mods[-1] == "experts" and len(shape) == 3 and not naming.fused:
        name = dict(naming.experts)[leaf]
        return [TensorMap(f"{base}.{e}.{name}.weight", path, "expert", (shape[2], shape[1]), e)
                for e in range(shape[0])]
    if (m := re.fullmatch(r"(w[123])_(packed|scale)", leaf)) and mods and mods[-1] == "experts" and len(shape) == 3:
        if naming.fused:
            raise CheckpointError("INT4 experts cannot be read from transformers' fused expert tensors")
        return _int4_entries(base, path, shape, naming, m.group(1), m.group(2))
    raise CheckpointError(f"parameter {'.'.join(keys)} with shape {list(shape)} has no Hugging Face name mapping")


def _fused_entries(path: tuple, shape, mods: list[str], leaf: str) -> list[TensorMap] | None:
    """Entries in transformers' fused in-memory naming, or None where it names a tensor as the other namings do."""
    base = ".".join(["model", *mods])
    if mods and mods[-1] == "experts" and leaf in ("w1", "w3", "w2") and len(shape) == 3:
        E, a, b = shape  # w1 / w3: [E, hidden, I]; w2: [E, I, hidden]
        if leaf == "w2":  # down_proj [E, hidden, I]: expert e is rows e * hidden ... of the 2-D view
            return [TensorMap(f"{base}.down_proj", path, "expert", (E, b, a), e, e * b) for e in range(E)]
        half = 0 if leaf == "w1" else b  # gate_up_proj [E, 2I, hidden]: gate rows first, then up rows
        return [TensorMap(f"{base}.gate_up_proj", path, "expert", (E, 2 * b, a), e, e * 2 * b + half)
                for e in range(E)]
    if mods and mods[-1] in ("q_conv1d", "k_conv1d", "v_conv1d") and leaf == "weight" and len(shape) == 2:
        W, D = shape
        index = ("q_conv1d", "k_conv1d", "v_conv1d").index(mods[-1])
        return [TensorMap(".".join(["model", *mods[:-1], "conv1d.weight"]), path, "conv", (3 * D, 1, W),
                          row0=index * D)]
    if mods and mods[-1] == "self_attn" and leaf == "A_log":
        return [TensorMap(f"{base}.forget_gate.A_log", path, "a_log", (1, 1, shape[0], 1))]
    if mods and mods[-1] == "self_attn" and leaf == "dt_bias":
        return [TensorMap(f"{base}.forget_gate.dt_bias", path, "copy", shape)]
    if len(mods) >= 2 and mods[-2] == "self_attn" and mods[-1] in ("f_a_proj", "f_b_proj") and leaf == "kernel":
        return [TensorMap(".".join(["model", *mods[:-1], "forget_gate", mods[-1], "weight"]), path, "linear",
                          shape[::-1])]
    return None


def _int4_entries(base: str, path: tuple, shape, naming: Naming, weight: str, part: str) -> list[TensorMap]:
    """compressed-tensors names of INT4 experts: packed [E, K/2, N] -> `weight_packed` [N, K/8] and `weight_shape`
    [N, K] per expert; scale [E, K/g, N] -> `weight_scale` [N, K/g] (an ordinary transposed 'expert' slice)."""
    name = dict(naming.experts)[weight]
    E, rows, N = shape
    out = []
    for e in range(E):
        stem = f"{base}.{e}.{name}"
        if part == "scale":
            out.append(TensorMap(f"{stem}.weight_scale", path, "expert", (N, rows), e))
        else:
            out.append(TensorMap(f"{stem}.weight_packed", path, "expert_packed", (N, rows // 4), e))
            out.append(TensorMap(f"{stem}.weight_shape", path, "expert_shape", (2,), e))
    return out


def tensor_maps(flat_state, naming: Naming) -> list[TensorMap]:
    """The HF tensors of a model, in parameter order. `flat_state`: nnx.to_flat_state(...) of the model (abstract
    or concrete); `naming`: KIMI_LINEAR, KIMI_LINEAR_TRANSFORMERS, DEEPSEEK_V3 or FUSED (loading only)."""
    out = []
    for path, var in flat_state:
        out.extend(_entries(tuple(path), tuple(_shape_of(var)), naming))
    return out


def _shape_of(var) -> tuple[int, ...]:
    return tuple(var.get_value().shape)


def _dtype_of(var) -> np.dtype:
    return np.dtype(var.get_value().dtype)


def _ours_to_hf(tm: TensorMap, ours: np.ndarray) -> np.ndarray:
    """The HF tensor `tm` (contiguous, HF layout) cut from `ours`, the whole parameter in our layout."""
    if tm.row0:
        raise AssertionError(f"{tm.hf_name}: fused tensors are never written")
    if tm.kind == "copy":
        out = ours
    elif tm.kind == "linear":
        out = ours.T
    elif tm.kind == "conv":
        out = ours.T[:, None, :]
    elif tm.kind == "a_log":
        out = ours.reshape(tm.hf_shape)
    elif tm.kind == "expert":
        out = ours[tm.expert].T
    elif tm.kind == "expert_packed":
        out = packed_to_ct(ours[tm.expert])
    elif tm.kind == "expert_shape":
        out = np.array([ours.shape[2], 2 * ours.shape[1]], np.int64)
    else:
        raise AssertionError(tm.kind)
    return np.ascontiguousarray(out)


# ---- safetensors files ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lives: file, safetensors dtype code, shape and absolute byte range [begin, end)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(file: Path) -> dict[str, StoredTensor]:
    """Parse and validate one safetensors header (format: u64 little-endian header size, JSON header, data).

    Raises CheckpointError naming the file if it is not a safetensors file, is corrupt, or is truncated.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: not a safetensors file (only {size} bytes, no header length)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file (header of {n} bytes claimed, "
                                  f"file has {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for {name!r}: {info!r}") from None
        itemsize = _ITEMSIZE.get(code)
        if itemsize is None or b < 0 or e - b != math.prod(shape) * itemsize or any(d < 0 for d in shape):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for {name!r} (dtype {code}, shape "
                                  f"{list(shape)}, byte range [{b}, {e}))")
        if data_start + e > size:
            raise CheckpointError(f"{file}: truncated safetensors file: tensor {name!r} ends at byte "
                                  f"{data_start + e} but the file has only {size} bytes")
        out[name] = StoredTensor(file, code, shape, data_start + b, data_start + e)
    return out


def _refuse_pickle(paths: Iterable[Path], where: Path) -> None:
    pickles = sorted(p.name for p in paths if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{where}: refusing pickle-based weights {pickles}: k2jax never unpickles checkpoint files (unpickling "
            f"can run arbitrary code). Convert them to safetensors with a tool you trust, then load the folder.")


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and, for a sharded one, the index's weight_map."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): "
                                  f"{type(e).__name__}") from None
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in (".", "..")]
        if bad:
            raise CheckpointError(f"{index}: weight_map file names must be plain file names in the folder: {bad}")
        _refuse_pickle([Path(n) for n in names], index)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) {missing} listed in weight_map do not exist in {folder}")
        return [folder / n for n in names], weight_map
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single], None
    _refuse_pickle(folder.iterdir(), folder)
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (folder holds {found})")


def index_checkpoint(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of a checkpoint folder, from its safetensors headers (no tensor data is read).

    Raises CheckpointError listing every corrupt or truncated file and every index inconsistency at once.
    """
    files, weight_map = _weight_files(folder)
    problems, stored = [], {}
    for file in files:
        try:
            header = read_safetensors_header(file)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for name, st in header.items():
            if name in stored:
                problems.append(f"tensor {name!r} appears in both {stored[name].file.name} and {file.name}")
            stored[name] = st
    for name, fname in (weight_map or {}).items():
        if name in stored and stored[name].file.name != fname:
            problems.append(f"{INDEX_FILE} maps {name!r} to {fname} but it is stored in {stored[name].file.name}")
        elif name not in stored and (folder / fname) in files:
            problems.append(f"{INDEX_FILE} maps {name!r} to {fname} but that file does not contain it")
    if problems:
        raise CheckpointError(f"{folder}: cannot read the checkpoint:\n  " + "\n  ".join(problems))
    return stored


def _read_exact(handle, st: StoredTensor, offset: int, out: np.ndarray) -> None:
    """Fill contiguous `out` with the bytes of `st` starting `offset` bytes into its data."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    handle.seek(st.begin + offset)
    got = handle.readinto(view)
    if got != len(view):
        raise CheckpointError(f"{st.file}: truncated while reading a tensor ({got} of {len(view)} bytes at "
                              f"offset {st.begin + offset})")


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty with 64-byte alignment: XLA:CPU then adopts the buffer in device_put instead of copying it."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    buf = np.empty(n + _ALIGN, np.uint8)
    off = (-buf.ctypes.data) % _ALIGN
    return buf[off:off + n].view(dtype).reshape(shape)


def _read_into(handle, st: StoredTensor, tm: TensorMap, dest: np.ndarray) -> None:
    """Read HF tensor `st` (the block of it that `tm` names) into `dest` (the whole parameter, our layout), casting
    to dest's dtype.

    Transposed kinds stream blocks of HF rows (about _BLOCK_BYTES each) into columns of `dest`, so no full-size
    temporary is ever allocated and the strided copies stay cache-sized.
    """
    if tm.kind in ("expert_packed", "expert_shape"):
        _read_int4_expert(handle, st, tm, dest)
        return
    src_dtype = _NP_DTYPES[st.dtype]
    if tm.kind in ("linear", "expert"):
        target = dest if tm.kind == "linear" else dest[tm.expert]  # [in, out] = HF [out, in].T
        cols, rows = target.shape
        start = tm.row0 * cols * src_dtype.itemsize
        step = max(1, _BLOCK_BYTES // max(1, cols * src_dtype.itemsize))
        block = np.empty((min(step, rows), cols), src_dtype)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            _read_exact(handle, st, start + r0 * cols * src_dtype.itemsize, block[:n])
            target[:, r0:r0 + n] = block[:n].T
    elif tm.kind == "copy" and src_dtype == dest.dtype and dest.flags.c_contiguous:
        _read_exact(handle, st, 0, dest)
    elif tm.kind == "copy":
        flat = dest.reshape(-1)
        step = max(1, _BLOCK_BYTES // src_dtype.itemsize)
        block = np.empty(min(step, flat.size), src_dtype)
        for i in range(0, flat.size, step):
            n = min(step, flat.size - i)
            _read_exact(handle, st, i * src_dtype.itemsize, block[:n])
            flat[i:i + n] = block[:n]
    elif tm.kind == "conv":  # small: our [W, D] = HF rows [row0, row0 + D) of [rows, 1, W], transposed
        W, D = dest.shape
        raw = np.empty((D, W), src_dtype)
        _read_exact(handle, st, tm.row0 * W * src_dtype.itemsize, raw)
        dest[...] = raw.T
    elif tm.kind == "a_log":  # [1, 1, H, 1] -> [H]
        raw = np.empty(dest.shape, src_dtype)
        _read_exact(handle, st, 0, raw)
        dest[...] = raw
    else:
        raise AssertionError(tm.kind)


def _read_int4_expert(handle, st: StoredTensor, tm: TensorMap, dest: np.ndarray) -> None:
    """weight_packed: stream rows of int32 words as raw (little-endian) bytes into expert `tm.expert` of our packed
    uint8 [E, K/2, N], nibbles copied bit for bit (no dequantization). weight_shape: check it equals [N, K]."""
    if tm.kind == "expert_shape":
        raw = np.empty(2, _INT_SHAPE_DTYPES[st.dtype])
        _read_exact(handle, st, 0, raw)
        want = [dest.shape[2], 2 * dest.shape[1]]
        if raw.tolist() != want:
            raise CheckpointError(f"{st.file}: {tm.hf_name} = {raw.tolist()}, the model expects {want}")
        return
    rows, words = st.shape
    step = max(1, _BLOCK_BYTES // max(1, 4 * words))
    block = np.empty((min(step, rows), 4 * words), np.uint8)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        _read_exact(handle, st, r0 * 4 * words, block[:n])
        dest[tm.expert][:, r0:r0 + n] = ct_bytes_to_packed(block[:n])


def write_safetensors(file: Path, items: list[tuple[str, str, tuple[int, ...]]], produce: Callable[[str], Any],
                      metadata: dict[str, str] | None = None, on_bytes: Callable[[int], None] | None = None) -> int:
    """Stream tensors into a safetensors file without holding more than one at a time.

    items: (name, dtype code, shape) in file order; produce(name) -> np.ndarray of exactly that dtype and shape.
    Returns the number of data bytes written.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, code, shape in items:
        nbytes = math.prod(shape) * _ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, code, shape in items:
            arr = np.ascontiguousarray(produce(name))
            if arr.shape != tuple(shape) or _CODES.get(arr.dtype) != code:
                raise AssertionError(f"{name}: produced {arr.dtype}{list(arr.shape)}, declared {code}{list(shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            if on_bytes is not None:
                on_bytes(arr.nbytes)
    return offset


# ---- loading ---------------------------------------------------------------------------------------------------------
def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n      ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n      " + "\n      ".join(shown) + more


def _skipped_names(names: Iterable[str], config: ModelConfig, hf: dict) -> tuple[set[str], str | None]:
    """Tensors present in the checkpoint that the causal LM does not use, and a note saying why."""
    mtp = int(hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0)
    skipped, notes = set(), []
    if mtp > 0:
        pat = re.compile(r"model\.layers\.(\d+)\.")
        skipped |= {n for n in names if (m := pat.match(n)) and int(m.group(1)) >= config.num_hidden_layers}
        if skipped:
            notes.append(f"{len(skipped)} multi-token-prediction tensors (num_nextn_predict_layers={mtp}, layers >= "
                         f"{config.num_hidden_layers}): k2jax has no MTP head, so the model loads without them "
                         "(the causal LM's logits do not use them)")
    if config.tie_word_embeddings and "lm_head.weight" in names:
        skipped.add("lm_head.weight")
        notes.append("lm_head.weight (tie_word_embeddings: the embedding is used)")
    return skipped, ("skipping " + "; ".join(notes)) if notes else None


def _check_match(folder: Path, maps: list[TensorMap], stored: dict[str, StoredTensor], skipped: set[str]) -> None:
    expected = {tm.hf_name: tm for tm in maps}  # a fused tensor's blocks share its name and full shape
    missing = sorted(n for n in expected if n not in stored)
    unexpected = sorted(n for n in stored if n not in expected and n not in skipped)
    wrong_shape = sorted(f"{n}: checkpoint {list(stored[n].shape)}, model expects {list(tm.hf_shape)}"
                         for n, tm in expected.items() if n in stored and stored[n].shape != tm.hf_shape)
    bad_dtype = sorted(f"{n}: {stored[n].dtype} (expected {'/'.join(_allowed_codes(tm))})"
                       for n, tm in expected.items() if n in stored and stored[n].dtype not in _allowed_codes(tm))
    parts = [_listing(t, v) for t, v in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                         ("wrong shapes", wrong_shape), ("unsupported dtypes", bad_dtype)) if v]
    if any(n.endswith((".weight_packed", ".weight_scale")) for n in unexpected):
        parts.append("  note: k2jax loads INT4 (compressed-tensors) weights for the routed experts only, and only when "
                     "config.json's quantization_config says so; every other module must be unquantized")
    if parts:
        raise CheckpointError(f"{folder}: the checkpoint does not match the model its config.json describes:\n"
                              + "\n".join(parts))


def _allowed_codes(tm: TensorMap) -> tuple[str, ...]:
    if tm.kind == "expert_packed":
        return ("I32",)
    if tm.kind == "expert_shape":
        return tuple(_INT_SHAPE_DTYPES)
    return tuple(_NP_DTYPES)


def _place(host: np.ndarray, var, mesh):
    if mesh is None:
        return jax.device_put(host)
    names = logical_names(var) or (None,) * host.ndim
    sharding = jax.sharding.NamedSharding(mesh, logical_to_mesh_spec(names, mesh, host.shape))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The config.json of a checkpoint folder as a dict (CheckpointError if absent or not JSON)."""
    file = Path(folder) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON: {e}") from None


def load_hf_checkpoint(path: str | os.PathLike, dtype=None, mesh=None, *, progress: bool = False,
                       config_overrides: dict | None = None):
    """Load a Hugging Face Kimi-Linear or Kimi K2 / DeepSeek-V3 checkpoint folder into a KimiLinear.

    path: folder with config.json and model.safetensors or model.safetensors.index.json + shards.
    dtype: parameter dtype ('float32', 'bfloat16', 'float16'); default: the checkpoint's own dtype. A_log, dt_bias
        and router biases stay float32 as the model defines them.
    mesh: a jax.sharding.Mesh; each parameter is placed directly onto the NamedSharding its logical axis names
        give (k2jax.sharding.LOGICAL_AXIS_RULES). None: the default device.
    config_overrides: ModelConfig fields to change after reading config.json (e.g. {'kda_impl': 'chunk'}).
    Reads both conventions (k2jax.hf module docstring): the released remote-code config and names, and what
    transformers 5 writes (native keys; its saved names, or its fused in-memory names).
    Raises ConfigError / CheckpointError (both ValueError) before reading any tensor data if the config is
    unsupported (an unknown or math-changing key k2jax cannot honour), a file is corrupt or truncated, or tensors
    are missing, unexpected or mis-shaped (one error lists them all). Multi-token-prediction layers are not loaded:
    their tensors are skipped with a logged warning.
    """
    from k2jax.model import KimiLinear

    folder = Path(path)
    if folder.is_file():
        _refuse_pickle([folder], folder)
        raise CheckpointError(f"{folder}: expected a checkpoint folder (config.json + safetensors), got a file")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    hf = read_hf_config(folder)
    config = config_from_hf(hf, dtype=dtype, source=str(folder / CONFIG_FILE))
    if config_overrides:
        config = config.replace(**config_overrides)
    stored = index_checkpoint(folder)
    config = _with_stored_scale_dtype(config, stored)
    abstract = nnx.eval_shape(lambda: KimiLinear(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    maps = tensor_maps(flat, _stored_naming(hf, stored))
    skipped, note = _skipped_names(stored, config, hf)
    _check_match(folder, maps, stored, skipped)
    if note:
        log.warning("%s: %s", folder, note)
    values = _load_values(flat, maps, stored, mesh, progress)
    new_flat = [(p, v.replace(values[tuple(p)])) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _with_stored_scale_dtype(config: ModelConfig, stored: dict[str, StoredTensor]) -> ModelConfig:
    """INT4 experts keep the checkpoint's scale dtype (bf16 in K2 Thinking), so scales load exactly."""
    if not int4_experts(config):
        return config
    code = next((st.dtype for n, st in stored.items() if n.endswith(".weight_scale")), None)
    name = _NP_DTYPES[code].name if code in ("F16", "BF16", "F32") else None
    if name is None or name == config.quantization["scale_dtype"]:
        return config
    return config.replace(quantization={**config.quantization, "scale_dtype": name})


def _load_values(flat, maps: list[TensorMap], stored: dict[str, StoredTensor], mesh, progress: bool) -> dict:
    """Read, re-layout and place every parameter, one at a time, in on-disk order."""
    from tqdm.auto import tqdm

    by_path: dict[tuple, list[TensorMap]] = {}
    for tm in maps:
        by_path.setdefault(tm.path, []).append(tm)
    variables = {tuple(p): v for p, v in flat}
    files = sorted({st.file for st in stored.values()})
    file_rank = {f: i for i, f in enumerate(files)}

    def disk_order(path):
        tm = by_path[path][0]
        st = stored[tm.hf_name]
        return file_rank[st.file], st.begin, tm.row0

    pieces = Counter(tm.hf_name for tm in maps)  # a fused tensor is read in one piece per parameter block
    total = sum(stored[name].end - stored[name].begin for name in pieces)
    handles = {f: open(f, "rb") for f in files}
    values = {}
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
            for path in sorted(by_path, key=disk_order):
                var = variables[path]
                host = _aligned_empty(_shape_of(var), _dtype_of(var))
                for tm in by_path[path]:
                    st = stored[tm.hf_name]
                    _read_into(handles[st.file], st, tm, host)
                    bar.update((st.end - st.begin) // pieces[tm.hf_name])
                values[path] = _place(host, var, mesh)
                del host
    finally:
        for h in handles.values():
            h.close()
    return values


# ---- saving ----------------------------------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB' (decimal units, as HF) or '512MiB' (binary units)."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a positive size, got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB, 2GiB or an integer byte count")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size must be a positive size, got {size!r}")
    return n


def _plan_shards(maps: list[TensorMap], nbytes: dict[str, int], limit: int) -> list[list[TensorMap]]:
    """Consecutive groups of at most `limit` bytes (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for tm in maps:
        n = nbytes[tm.hf_name]
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(tm)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def _save_code(tm: TensorMap, var) -> str:
    return {"expert_packed": "I32", "expert_shape": "I64"}.get(tm.kind) or _CODES[_dtype_of(var)]


def save_hf_checkpoint(model, path: str | os.PathLike, max_shard_size: int | str = "5GB", *,
                       format: str = REMOTE_CODE, overwrite: bool = False, progress: bool = False) -> Path:
    """Write `model` as a Hugging Face checkpoint folder: config.json and safetensors in HF names and layouts.

    format: REMOTE_CODE ('remote_code', the default): the released format (Kimi-Linear's or Kimi K2's config keys
    and tensor names, auto_map to their remote code). TRANSFORMERS ('transformers'): what transformers 5 writes
    (native config keys, model_type kimi_linear or deepseek_v3), which `transformers.AutoModelForCausalLM
    .from_pretrained` loads with the same logits; ValueError (before writing anything) for a model transformers'
    classes cannot express (hf_config_dict). Routing weights from bias-corrected scores (Kimi-Linear's remote-code
    quirk) are such a setting unless every correction bias is zero, where both rules route identically.
    One shard -> model.safetensors; several -> model-0000i-of-0000n.safetensors + model.safetensors.index.json
    (weight_map, metadata.total_size). Tensors keep the parameters' dtypes. The folder is written under a temporary
    name next to `path` and renamed into place, so `path` never holds a partial checkpoint. An existing `path` is
    replaced only with overwrite=True. Arrays must be fully addressable from this process (single host).
    """
    from tqdm.auto import tqdm

    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError(f"save_hf_checkpoint: expected a KimiLinear model, got {type(model).__name__}")
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    limit = parse_size(max_shard_size)
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Variable)))
    # config.json states the dtype the tensors are stored in (the embedding's; A_log etc. stay float32).
    config = config.replace(param_dtype=jnp.dtype(model.embed_tokens.get_value().dtype).name)
    if format == TRANSFORMERS and config.moe_router_weights_from_biased_scores and _biases_are_zero(flat):
        config = config.replace(moe_router_weights_from_biased_scores=False)  # routes the same with zero biases
    hf_cfg = hf_config_dict(config, format)
    maps = tensor_maps(flat, naming_for(config, format))
    variables = {tuple(p): v for p, v in flat}
    codes = {tm.hf_name: _save_code(tm, variables[tm.path]) for tm in maps}
    nbytes = {tm.hf_name: math.prod(tm.hf_shape) * _ITEMSIZE[codes[tm.hf_name]] for tm in maps}
    shards = _plan_shards(maps, nbytes, limit)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    cache: dict[str, Any] = {}

    def host_value(p: tuple) -> np.ndarray:
        # Stacked experts yield E tensors in a row: keep the last parameter's host copy only.
        if cache.get("path") != p:
            value = variables[p].get_value()
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                raise ValueError("save_hf_checkpoint: parameters span several hosts; save with "
                                 "k2jax.checkpoint.save_params, then convert on one host")
            cache.clear()
            cache.update(path=p, value=np.asarray(jax.device_get(value)))
        return cache["value"]

    by_name = {tm.hf_name: tm for tm in maps}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True, desc="saving", disable=not progress) as bar:
            for fname, shard in zip(names, shards):
                write_safetensors(tmp / fname, [(tm.hf_name, codes[tm.hf_name], tm.hf_shape) for tm in shard],
                                  lambda n: _ours_to_hf(by_name[n], host_value(by_name[n].path)),
                                  on_bytes=bar.update)
        cache.clear()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())},
                     "weight_map": {tm.hf_name: fname for fname, shard in zip(names, shards) for tm in shard}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2) + "\n")
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _biases_are_zero(flat) -> bool:
    """Whether every router correction bias of a model (its flat state) is exactly zero."""
    return all(not np.any(np.asarray(jax.device_get(v.get_value()))) for p, v in flat
               if str(p[-1]) == "e_score_correction_bias")


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)

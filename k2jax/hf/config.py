"""config.json <-> ModelConfig for both conventions (REMOTE_CODE and TRANSFORMERS; the k2jax.hf docstring).

Every key of a config.json is mapped, known not to change the computation, or an error naming it (the key tables
below). `config_from_hf` reads either convention; `hf_config_dict` writes either.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from k2jax.config import ConfigError, ModelConfig
from k2jax.hf.compressed_tensors import compressed_tensors_config, quantization_from_compressed_tensors
from k2jax.layers.qat import int4_experts
from k2jax.layers.rope import yarn_attention_factor, yarn_get_mscale

CONFIG_FILE = "config.json"

REMOTE_CODE = "remote_code"  # the released config keys and tensor names (the checkpoints' own modeling code)
TRANSFORMERS = "transformers"  # transformers 5's native classes
FORMATS = (REMOTE_CODE, TRANSFORMERS)

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
                          "scan_layers", "remat", "context_layout", "moe_bias_update_rate", "initializer_range")


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
    "quantization_config": "quantization: compressed-tensors INT4 routed experts only (k2jax.hf.compressed_tensors)",
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


def model_family(model_type: str) -> str:
    """'kimi_linear' for a Kimi-Linear model_type, else 'deepseek_v3' (deepseek_v3 and kimi_k2 share the code)."""
    return "kimi_linear" if model_type == "kimi_linear" else "deepseek_v3"


def config_from_hf(hf: dict, *, dtype=None, source: str = CONFIG_FILE) -> ModelConfig:
    """A ModelConfig from an HF config.json dict of either convention (REMOTE_CODE or TRANSFORMERS, see
    `hf_convention`). param_dtype: `dtype` if given, else the checkpoint's own (`dtype` / `torch_dtype`), else
    float32. A `quantization_config` must be compressed-tensors INT4 (routed experts only,
    k2jax.hf.compressed_tensors); it becomes `quantization: {experts: int4, ...}`.

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
    family, convention = model_family(model_type), hf_convention(hf)
    fields = ModelConfig.field_names() - {"name", "dtype", "param_dtype", "quantization"}
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
        # The remote code takes the routing weights from the bias-corrected scores (KimiMoEGate adds the correction
        # bias in place to the tensor it later gathers the weights from); transformers' KimiLinear from the plain
        # sigmoid scores.
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
    m(f, mscale) / m(f, mscale_all_dim) with defaults 1 / 0 in every case: k2jax.layers.rope.yarn_attention_factor.)"""
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
    """What a rope_scaling dict computes with in k2jax.layers.rope (absent or null keys take the DeepSeek-V3
    defaults), for comparing two spellings of one YaRN."""
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

"""Model configuration: one frozen dataclass, validated field by field on load.

The field names follow the Hugging Face Kimi-Linear `config.json` where one exists, so that a reader can compare
the two side by side. `load_config` accepts a `configs/` name, a YAML file of these fields, or an HF
`config.json` (Kimi-Linear, DeepSeek-V3 or Kimi-K2; both the released remote-code keys and transformers 5's native
keys), which `k2jax.hf.config_from_hf` translates.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(os.environ.get("K2JAX_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))

_DTYPES = ("float32", "bfloat16", "float16")
# `attention_factor` (transformers' name) is the cos/sin scale when given; without it YaRN derives the scale from
# mscale / mscale_all_dim as the released DeepSeek-V3 code does (k2jax.layers.rope).
_ROPE_SCALING_KEYS = {
    "type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim", "attention_factor",
}


class ConfigError(ValueError):
    """A configuration field has a wrong or inconsistent value."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter that changes the math of Kimi Linear / Kimi K2, with the released 48B-A3B values as defaults."""

    name: str = "kimi_linear"
    # Widths and vocabulary.
    vocab_size: int = 163840
    hidden_size: int = 2304
    intermediate_size: int = 9216  # dense SwiGLU layers (layer index < first_k_dense_replace)
    num_hidden_layers: int = 27
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # MLA.
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
    mla_latent_norm_eps: float = 1e-6  # HF KimiRMSNorm default for kv_a_layernorm (and q_a_layernorm in K2)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    # RoPE channel pairs of q_pe / k_pe: (2j, 2j+1) as the released DeepSeek-V3 / K2 weights (True), or (j, j + P/2)
    # (transformers' DeepSeek-V3 with `rope_interleave: false`). The rotated output is in half layout either way.
    rope_interleave: bool = True
    max_position_embeddings: int = 1048576
    # KDA. Layer lists are 1-based, as in HF `linear_attn_config`; None means "no KDA layers" (all MLA).
    kda_layers: tuple[int, ...] | None = (1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26)
    full_attn_layers: tuple[int, ...] | None = (4, 8, 12, 16, 20, 24, 27)
    kda_num_heads: int = 32
    kda_head_dim: int = 128
    short_conv_kernel_size: int = 4
    # MoE.
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 1024
    moe_router_activation_func: str = "sigmoid"
    moe_renormalize: bool = True
    routed_scaling_factor: float = 2.446
    use_grouped_topk: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    moe_router_weights_from_biased_scores: bool = True  # HF in-place aliasing quirk; False = vLLM / DeepSeek-V3
    moe_bias_update_rate: float = 1e-3  # aux-loss-free balancing step (DeepSeek-V3 gamma)
    # Special tokens (null = none; transformers writes pad_token_id: null).
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163586
    pad_token_id: int | None = 163839
    # Numerics and implementation choices.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls; states, gates, softmax, router, norms stay fp32
    kda_impl: str = "auto"  # "auto" | "chunk" | "pallas" | "reference"
    kda_chunk_size: int = 64
    moe_impl: str = "auto"  # "auto" | "ragged" | "dense"
    # Expert parallelism (k2jax.layers.expert_parallel, used when a mesh with expert axis > 1 is set).
    moe_ep_impl: str = "auto"  # "auto" (allgather on CPU, ragged_a2a elsewhere) | "allgather" | "ragged_a2a"
    moe_capacity_factor: float | None = None  # None = dropless; c = each device keeps c x its balanced rows
    # Layer stacking: scan over repeats of the layer pattern (compile time O(period)).
    scan_layers: bool = False
    # Per-layer rematerialisation (jax.checkpoint of each layer): "none" | "full" (save only the layer input) |
    # "dots" (save matmul outputs) | "dots_no_batch" (save matmul outputs without batch dims).
    remat: str = "none"
    # Routed-expert quantization (k2jax.quantize): None, or {experts: None | 'int4', group_size: 32,
    # scale_dtype: 'bfloat16', qat: false}; missing keys take these defaults.
    quantization: dict | None = None

    def __post_init__(self):
        for f in ("kda_layers", "full_attn_layers"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, f, tuple(v))
        object.__setattr__(self, "quantization", _quantization_with_defaults(self.quantization))
        _validate(self)

    # ---- derived structure -------------------------------------------------------------------------------------
    @property
    def layer_types(self) -> tuple[str, ...]:
        """'kda' or 'mla' for each 0-based layer index (HF lists are 1-based)."""
        kda = set(self.kda_layers or ())
        return tuple("kda" if (i + 1) in kda else "mla" for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek/Kimi rule: MoE from `first_k_dense_replace` on, every `moe_layer_freq`-th layer."""
        return (
            self.num_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def use_rope(self) -> bool:
        return not self.mla_use_nope

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied and validated (unknown names are rejected)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(field_names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for f in ("kda_layers", "full_attn_layers"):
            if d[f] is not None:
                d[f] = list(d[f])
        return d


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig)}


# ---- validation ------------------------------------------------------------------------------------------------
def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config field `{field}` = {value!r} is invalid: {allowed}")


def _validate(c: ModelConfig) -> None:
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    positive_ints = [
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "kda_num_heads", "kda_head_dim",
        "short_conv_kernel_size", "moe_layer_freq", "kda_chunk_size", "max_position_embeddings",
    ]
    for f in positive_ints:
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            _fail(f, v, "must be a positive integer")
    nonneg_ints = ["intermediate_size", "qk_rope_head_dim", "num_experts", "num_experts_per_token",
                   "num_shared_experts", "moe_intermediate_size", "first_k_dense_replace"]
    for f in nonneg_ints:
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            _fail(f, v, "must be a non-negative integer")
    for f in ("rms_norm_eps", "mla_latent_norm_eps", "rope_theta", "initializer_range"):
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            _fail(f, v, "must be a positive number")
    for f in ("routed_scaling_factor",):
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            _fail(f, v, "must be a positive number")
    if not isinstance(c.moe_bias_update_rate, (int, float)) or c.moe_bias_update_rate < 0:
        _fail("moe_bias_update_rate", c.moe_bias_update_rate, "must be a non-negative number")
    for f in ("tie_word_embeddings", "mla_use_nope", "moe_renormalize", "use_grouped_topk",
              "moe_router_weights_from_biased_scores", "rope_interleave"):
        if not isinstance(getattr(c, f), bool):
            _fail(f, getattr(c, f), "must be true or false")
    for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(c, f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < c.vocab_size):
            _fail(f, v, f"must be null or a token id in [0, vocab_size={c.vocab_size})")
    for f in ("param_dtype", "dtype"):
        if getattr(c, f) not in _DTYPES:
            _fail(f, getattr(c, f), f"must be one of {_DTYPES}")
    if c.kda_impl not in ("auto", "chunk", "pallas", "reference"):
        _fail("kda_impl", c.kda_impl, "must be one of 'auto', 'chunk', 'pallas', 'reference'")
    if c.moe_impl not in ("auto", "ragged", "dense"):
        _fail("moe_impl", c.moe_impl, "must be one of 'auto', 'ragged', 'dense'")
    if c.moe_ep_impl not in ("auto", "allgather", "ragged_a2a"):
        _fail("moe_ep_impl", c.moe_ep_impl, "must be one of 'auto', 'allgather', 'ragged_a2a'")
    cf = c.moe_capacity_factor
    if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0):
        _fail("moe_capacity_factor", cf, "must be null (dropless) or a positive number")
    if not isinstance(c.scan_layers, bool):
        _fail("scan_layers", c.scan_layers, "must be true or false")
    if c.remat not in ("none", "full", "dots", "dots_no_batch"):
        _fail("remat", c.remat, "must be one of 'none', 'full', 'dots', 'dots_no_batch'")
    del types

    # MLA.
    if c.num_key_value_heads != c.num_attention_heads:
        _fail("num_key_value_heads", c.num_key_value_heads,
              f"MLA has one key/value head per query head: must equal num_attention_heads={c.num_attention_heads}")
    if c.q_lora_rank is not None and (isinstance(c.q_lora_rank, bool) or not isinstance(c.q_lora_rank, int)
                                      or c.q_lora_rank <= 0):
        _fail("q_lora_rank", c.q_lora_rank, "must be null (plain q_proj) or a positive integer")
    if c.use_rope and c.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", c.qk_rope_head_dim, "must be even when RoPE is used (mla_use_nope: false)")
    if c.rope_scaling is not None:
        if not isinstance(c.rope_scaling, dict):
            _fail("rope_scaling", c.rope_scaling, "must be null or a mapping with a `type`")
        unknown = set(c.rope_scaling) - _ROPE_SCALING_KEYS
        if unknown:
            _fail("rope_scaling", c.rope_scaling, f"unknown keys {sorted(unknown)}; allowed {sorted(_ROPE_SCALING_KEYS)}")
        kind = c.rope_scaling.get("type", c.rope_scaling.get("rope_type"))
        if kind != "yarn":
            _fail("rope_scaling.type", kind, "only 'yarn' scaling is implemented (or rope_scaling: null)")
        if not float(c.rope_scaling.get("factor", 0)) >= 1:
            _fail("rope_scaling.factor", c.rope_scaling.get("factor"), "must be a number >= 1")
        if "original_max_position_embeddings" not in c.rope_scaling:
            _fail("rope_scaling", c.rope_scaling, "yarn needs original_max_position_embeddings")
        af = c.rope_scaling.get("attention_factor")
        if af is not None and (isinstance(af, bool) or not isinstance(af, (int, float)) or not af > 0):
            _fail("rope_scaling.attention_factor", af, "must be null or a positive number (the cos/sin scale)")

    # Layer schedule (1-based lists).
    L = c.num_hidden_layers
    for f in ("kda_layers", "full_attn_layers"):
        v = getattr(c, f)
        if v is None:
            continue
        bad = [i for i in v if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= L]
        if bad:
            _fail(f, list(v), f"layer numbers are 1-based and must lie in [1, num_hidden_layers={L}]; bad: {bad}")
        if len(set(v)) != len(v):
            _fail(f, list(v), "contains a layer more than once")
    if c.kda_layers is not None and c.full_attn_layers is not None:
        both = sorted(set(c.kda_layers) & set(c.full_attn_layers))
        if both:
            _fail("kda_layers", list(c.kda_layers), f"layers {both} are also in full_attn_layers")
        missing = sorted(set(range(1, L + 1)) - set(c.kda_layers) - set(c.full_attn_layers))
        if missing:
            _fail("full_attn_layers", list(c.full_attn_layers),
                  f"layers {missing} are in neither kda_layers nor full_attn_layers")

    # MoE.
    if c.num_experts > 0:
        if c.moe_intermediate_size <= 0:
            _fail("moe_intermediate_size", c.moe_intermediate_size, "must be positive when num_experts > 0")
        if not 1 <= c.num_experts_per_token <= c.num_experts:
            _fail("num_experts_per_token", c.num_experts_per_token,
                  f"must lie in [1, num_experts={c.num_experts}]")
        if c.moe_router_activation_func not in ("sigmoid", "softmax"):
            _fail("moe_router_activation_func", c.moe_router_activation_func, "must be 'sigmoid' or 'softmax'")
        if c.num_expert_group < 1 or c.num_experts % c.num_expert_group:
            _fail("num_expert_group", c.num_expert_group, f"must be >= 1 and divide num_experts={c.num_experts}")
        if not 1 <= c.topk_group <= c.num_expert_group:
            _fail("topk_group", c.topk_group, f"must lie in [1, num_expert_group={c.num_expert_group}]")
        per_group = c.num_experts // c.num_expert_group
        if c.use_grouped_topk and c.num_experts_per_token > c.topk_group * per_group:
            _fail("num_experts_per_token", c.num_experts_per_token,
                  f"exceeds the experts in the selected groups (topk_group * experts per group = "
                  f"{c.topk_group * per_group})")
        if c.use_grouped_topk and per_group < 2 and c.num_expert_group > 1:
            _fail("num_expert_group", c.num_expert_group, "group scores sum the top-2 experts: groups need >= 2 experts")
    _validate_quantization(c)
    if c.first_k_dense_replace < L and c.num_experts == 0 and c.intermediate_size <= 0:
        _fail("intermediate_size", c.intermediate_size, "must be positive")
    if c.first_k_dense_replace > 0 and c.intermediate_size <= 0:
        _fail("intermediate_size", c.intermediate_size, "must be positive when there are dense layers")


_QUANT_DEFAULTS = {"experts": None, "group_size": 32, "scale_dtype": "bfloat16", "qat": False}


def _quantization_with_defaults(q: Any) -> Any:
    """`quantization` with its missing keys filled in (anything that is not a mapping is left to _validate)."""
    if not isinstance(q, dict):
        return q
    return {**_QUANT_DEFAULTS, **q}


def _validate_quantization(c: ModelConfig) -> None:
    q = c.quantization
    if q is None:
        return
    if not isinstance(q, dict):
        _fail("quantization", q, "must be null or a mapping with keys experts, group_size, scale_dtype, qat")
    unknown = sorted(set(q) - set(_QUANT_DEFAULTS))
    if unknown:
        _fail("quantization", q, f"unknown keys {unknown}; allowed {sorted(_QUANT_DEFAULTS)}")
    if q["experts"] not in (None, "int4"):
        _fail("quantization.experts", q["experts"], "must be null (float experts) or 'int4'")
    g = q["group_size"]
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 2:
        _fail("quantization.group_size", g, "must be a positive even integer (two 4-bit values per byte)")
    for f in ("hidden_size", "moe_intermediate_size"):
        if getattr(c, f) % g:
            _fail("quantization.group_size", g, f"must divide {f}={getattr(c, f)} (the experts' input dims)")
    if q["scale_dtype"] not in _DTYPES:
        _fail("quantization.scale_dtype", q["scale_dtype"], f"must be one of {_DTYPES}")
    if not isinstance(q["qat"], bool):
        _fail("quantization.qat", q["qat"], "must be true or false")
    if q["qat"] and q["experts"] is not None:
        _fail("quantization.qat", q["qat"], "trains float experts with fake quantization: needs experts: null "
              "(pack them afterwards with k2jax.quantize.quantize_model_experts)")
    if (q["experts"] is not None or q["qat"]) and c.num_experts == 0:
        _fail("quantization.experts", q["experts"], "quantizes routed experts, but num_experts is 0")


# ---- loading ---------------------------------------------------------------------------------------------------
def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def from_dict(d: dict, *, source: str = "<dict>") -> ModelConfig:
    """Build a ModelConfig from a mapping of its own field names (as in configs/*.yaml)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields, got {type(d).__name__}")
    unknown = sorted(set(d) - field_names())
    if unknown:
        raise ConfigError(f"{source}: unknown config field(s) {unknown}; known fields: {sorted(field_names())}")
    try:
        return ModelConfig(**d)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """Load a config: a `configs/` name ("tiny"), a YAML path, or an HF `config.json` (or a folder holding one),
    translated by `k2jax.hf.config_from_hf` (its `quantization_config` included); then apply `overrides`.

    Raises ConfigError naming the field, the value and what is allowed.
    """
    p = Path(name_or_path)
    if not p.exists():
        candidate = CONFIG_DIR / f"{name_or_path}.yaml"
        if not candidate.exists():
            raise ConfigError(f"no config named {str(name_or_path)!r}: not a file, and not one of {available_configs()}")
        p = candidate
    if p.is_dir():
        p = p / "config.json"
        if not p.exists():
            raise ConfigError(f"{name_or_path}: a folder without config.json")
    text = p.read_text()
    if p.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON: {e}") from None
        # Imported here because k2jax.hf imports this module (and jax); YAML configs never need it.
        from k2jax.hf import config_from_hf

        cfg = config_from_hf(d, source=str(p))
    else:
        try:
            d = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if isinstance(d, dict):
            d.pop("train", None)  # a run config's training section (k2jax.training.config), not a model field
        d.setdefault("name", p.stem)
        cfg = from_dict(d, source=str(p))
    return cfg.replace(**overrides) if overrides else cfg

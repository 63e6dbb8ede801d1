"""The one configuration system: declarative, validated configs (pydantic) and the YAML / `key=value` parser that
train.py, serve.py and the dry run share; and ModelConfig, every hyper-parameter that changes the model's math.

A config is a `Config` subclass whose fields state their constraint in their type, next to the field:

    hidden_size: PositiveInt = 2304              # strict int > 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    moe_capacity_factor: Annotated[PositiveNumber | None, Allowed("null (dropless) or a positive number")] = None

Types are strict (no bool for an int, no "3" for an int); a numeric string for a float field is read as the number
(PyYAML reads `1e-3` as a string). Rules between fields are short `model_validator`s calling `cls.fail`. Any bad
value raises ConfigError naming the field, the value and what is allowed ("config field `hidden_size` = 0 is
invalid: must be a positive integer"), an unknown name lists the known ones; nothing is half-applied.

Loading files (a configs/ name, a YAML file, an HF config.json) is k2jax.config_files; the field names of
ModelConfig follow the Hugging Face Kimi-Linear `config.json` where one exists.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Sequence, Union

import pydantic
import yaml
from pydantic import BeforeValidator, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration field has a wrong or inconsistent value."""


# ---- field constraints ---------------------------------------------------------------------------------------------
class Allowed:
    """Annotation marker: how an error message states what a field allows ("must be <text>")."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Allowed({self.text!r})"


def _yaml_number(value: Any) -> Any:
    """PyYAML reads `1e-3` (no dot) as a string: a numeric string for a float field is the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Number = Annotated[float, BeforeValidator(_yaml_number)]  # strict: an int is accepted, a bool is not
PositiveInt = Annotated[int, Field(gt=0), Allowed("a positive integer")]
NonNegativeInt = Annotated[int, Field(ge=0), Allowed("a non-negative integer")]
PositiveNumber = Annotated[Number, Field(gt=0), Allowed("a positive number")]
NonNegativeNumber = Annotated[Number, Field(ge=0), Allowed("a non-negative number")]
UnitInterval = Annotated[Number, Field(ge=0, le=1), Allowed("a number in [0, 1]")]
NonEmptyStr = Annotated[str, Field(min_length=1), Allowed("a non-empty string")]
DTYPES = ("float32", "bfloat16", "float16")
DType = Literal["float32", "bfloat16", "float16"]


def describe(annotation: Any) -> str:
    """What a type annotation allows, in words: PositiveInt -> 'a positive integer', X | None -> 'null or ...'."""
    if typing.get_origin(annotation) is Annotated:
        marks = [m for m in annotation.__metadata__ if isinstance(m, Allowed)]
        return marks[-1].text if marks else describe(typing.get_args(annotation)[0])
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        text = " or ".join(describe(a) for a in others)
        return f"null or {text}" if len(others) < len(args) else text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, Config):
        return f"a mapping of {annotation.section} fields"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             tuple: "a list", list: "a list"}
    return names.get(origin or annotation, str(annotation))


# ---- the base class ------------------------------------------------------------------------------------------------
class Config(pydantic.BaseModel):
    """Base of k2jax's configs: frozen (unless a subclass says otherwise), strict, unknown names rejected.

    `replace(**changes)` returns a validated copy; `to_dict()` its JSON-able fields; `from_dict(d, source=...)`
    builds one from a mapping and names `source` in errors. A field whose type is a Config accepts a mapping of
    that config's fields. Errors are ConfigError (see the module docstring); `section` names the kind of field in
    them ("config field `x`", "train field `x`").
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", strict=True)
    section: ClassVar[str] = "config"

    def __init__(self, **values: Any):
        for name, value in values.items():  # nested configs validate (and word their errors) themselves
            nested = self._nested_config(name)
            if nested is not None and isinstance(value, Mapping):
                values[name] = nested.from_dict(dict(value), source=f"{self.section}.{name}")
        try:
            super().__init__(**values)
        except pydantic.ValidationError as e:
            raise self._config_error(e, values) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except pydantic.ValidationError as e:
            raise self._config_error(e, {name: value}) from None

    @classmethod
    def _nested_config(cls, name: str) -> type[Config] | None:
        field = cls.model_fields.get(name)
        kind = field.annotation if field is not None else None
        return kind if isinstance(kind, type) and issubclass(kind, Config) else None

    @classmethod
    def field_names(cls) -> set[str]:
        return set(cls.model_fields)

    @classmethod
    def allowed(cls, name: str) -> str:
        """What field `name` allows, from its annotation (its own `Allowed` marker first)."""
        field = cls.model_fields[name]
        marks = [m for m in field.metadata if isinstance(m, Allowed)]
        if marks:
            return marks[-1].text
        return describe(field.annotation)

    @classmethod
    def fail(cls, name: str, value: Any, allowed: str):
        """Raise the ConfigError of field `name` (used by the cross-field rules)."""
        raise ConfigError(f"{cls.section} field `{name}` = {value!r} is invalid: {allowed}")

    @classmethod
    def _config_error(cls, error: pydantic.ValidationError, values: dict) -> ConfigError:
        lines, unknown = [], []
        for item in error.errors():
            cause = (item.get("ctx") or {}).get("error")
            if isinstance(cause, ConfigError):  # a cross-field rule, or a nested config: already worded
                return cause
            name = item["loc"][0] if item["loc"] else None
            if item["type"] == "extra_forbidden":
                unknown.append(name)
            elif item["type"] == "frozen_instance":
                lines.append(f"{cls.__name__} is frozen: use .replace({name}=...) for a changed copy")
            elif name in cls.model_fields and f"`{name}`" not in "".join(lines):
                lines.append(f"{cls.section} field `{name}` = {values.get(name)!r} is invalid: must be "
                             f"{cls.allowed(name)}")
        if unknown:
            lines.insert(0, f"unknown {cls.section} field(s) {sorted(unknown)}; known fields: "
                            f"{sorted(cls.field_names())}")
        return ConfigError("\n".join(lines) or str(error))

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "<dict>"):
        """A config from a mapping of its own field names; errors start with `source`."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of {cls.section} fields, got {type(d).__name__}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def field_values(self) -> dict[str, Any]:
        """{field: value} (shallow: nested configs stay configs)."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def replace(self, **changes: Any):
        """A copy with `changes` applied and validated (unknown names are rejected)."""
        return type(self)(**{**self.field_values(), **changes})

    def with_overrides(self, changes: Mapping[str, Any]):
        """A copy with parsed overrides applied (`parse_overrides`; 'field.key' sets one key of a mapping)."""
        return self.replace(**apply_overrides(self.field_values(), changes)) if changes else self

    def to_dict(self) -> dict:
        """The fields as JSON-able values (tuples become lists, nested configs mappings)."""
        return self.model_dump(mode="json")


# ---- YAML files and key=value overrides ----------------------------------------------------------------------------
def read_yaml(path: Path) -> dict:
    """The mapping a YAML config file holds; ConfigError naming the file when it is unreadable or not a mapping."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(d).__name__}")
    return d


def parse_overrides(items: Sequence[str], sections: Mapping[str, type[Config]]) -> dict[str, dict[str, Any]]:
    """`key=value` strings -> {section: {key: value}} for the configs in `sections` ({'model': ModelConfig, ...}).

    key: `section.field`, a bare `field` when only one section has it, or `section.field.key` (also bare) to set
    one key of a mapping field (e.g. train.mesh.data=2). Values are YAML (`null`, `true`, `1e-3`, `[1, 2]`,
    `{data: 2}`); an empty value is null. Raises ConfigError for a malformed item or an unknown key (listing the
    known fields); values are checked when applied (`apply_overrides`, Config.with_overrides).
    """
    out: dict[str, dict[str, Any]] = {s: {} for s in sections}
    example = next(iter(sections))
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. {example}.<field>=3)")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from None
        head, _, rest = key.partition(".")
        if head in sections and rest:
            section, name = head, rest
            if name.split(".")[0] not in sections[section].model_fields:
                raise ConfigError(f"unknown override key {key!r}: no {section} field {name!r}; known {section} "
                                  f"fields: {sorted(sections[section].model_fields)}")
        else:
            name = key
            owners = [s for s, cls in sections.items() if name.split(".")[0] in cls.model_fields]
            if len(owners) > 1:
                raise ConfigError(f"override {key!r} names a field of each of {owners}: write "
                                  + " or ".join(f"{s}.{name}" for s in owners))
            if not owners:
                raise ConfigError(f"unknown override key {key!r}; use " + " or ".join(f"{s}.<field>" for s in sections)
                                  + "; known fields: " + "; ".join(f"{s}: {sorted(cls.model_fields)}"
                                                                   for s, cls in sections.items()))
            section = owners[0]
        out[section][name] = value
    return out


def apply_overrides(values: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`values` (field -> value) with parsed overrides applied: 'field' replaces a value, 'field.key' (any depth)
    sets one key of a mapping field (a copy; a nested config counts as the mapping of its fields)."""
    out = dict(values)
    for key, value in changes.items():
        name, *path = key.split(".")
        if not path:
            out[name] = value
            continue
        out[name] = _set_key(out.get(name), path, value, key)
    return out


def _set_key(mapping: Any, path: list[str], value: Any, key: str) -> dict:
    if isinstance(mapping, Config):
        mapping = mapping.field_values()
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"override {key!r}: `{key.rsplit('.', len(path))[0]}` = {mapping!r} is not a mapping")
    mapping = dict(mapping)
    mapping[path[0]] = value if len(path) == 1 else _set_key(mapping.get(path[0]), path[1:], value, key)
    return mapping


# ---- the model ------------------------------------------------------------------------------------------------------
# `attention_factor` (transformers' name) is the cos/sin scale when given; without it YaRN derives the scale from
# mscale / mscale_all_dim as the released DeepSeek-V3 code does (k2jax.layers.rope).
_ROPE_SCALING_KEYS = {
    "type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim", "attention_factor",
}
_QUANT_DEFAULTS = {"experts": None, "group_size": 32, "scale_dtype": "bfloat16", "qat": False}


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


LayerNumbers = Annotated[tuple[int, ...] | None, BeforeValidator(_as_tuple),
                         Allowed("null or a list of 1-based layer numbers")]


class ModelConfig(Config):
    """Every hyper-parameter that changes the math of Kimi Linear / Kimi K2, with the released 48B-A3B values as
    defaults."""

    name: str = "kimi_linear"
    # Widths and vocabulary.
    vocab_size: PositiveInt = 163840
    hidden_size: PositiveInt = 2304
    intermediate_size: NonNegativeInt = 9216  # dense SwiGLU layers (layer index < first_k_dense_replace)
    num_hidden_layers: PositiveInt = 27
    rms_norm_eps: PositiveNumber = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: PositiveNumber = 0.02
    # MLA.
    num_attention_heads: PositiveInt = 32
    num_key_value_heads: PositiveInt = 32  # MLA: equal to num_attention_heads
    q_lora_rank: Annotated[PositiveInt | None, Allowed("null (plain q_proj) or a positive integer")] = None
    kv_lora_rank: PositiveInt = 512
    qk_nope_head_dim: PositiveInt = 128
    qk_rope_head_dim: NonNegativeInt = 64  # even when RoPE is used
    v_head_dim: PositiveInt = 128
    mla_use_nope: bool = True
    mla_latent_norm_eps: PositiveNumber = 1e-6  # HF KimiRMSNorm default for kv_a_layernorm (and q_a_layernorm in K2)
    rope_theta: PositiveNumber = 10000.0
    rope_scaling: Annotated[dict | None, Allowed("null or a mapping with a `type`")] = None  # YaRN only
    # RoPE channel pairs of q_pe / k_pe: (2j, 2j+1) as the released DeepSeek-V3 / K2 weights (True), or (j, j + P/2)
    # (transformers' DeepSeek-V3 with `rope_interleave: false`). The rotated output is in half layout either way.
    rope_interleave: bool = True
    max_position_embeddings: PositiveInt = 1048576
    # KDA. Layer lists are 1-based, as in HF `linear_attn_config`; None means "no KDA layers" (all MLA). Together
    # they list every layer once.
    kda_layers: LayerNumbers = (1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26)
    full_attn_layers: LayerNumbers = (4, 8, 12, 16, 20, 24, 27)
    kda_num_heads: PositiveInt = 32
    kda_head_dim: PositiveInt = 128
    short_conv_kernel_size: PositiveInt = 4
    # MoE (the group rules apply when num_experts > 0).
    num_experts: NonNegativeInt = 256
    num_experts_per_token: NonNegativeInt = 8
    num_shared_experts: NonNegativeInt = 1
    moe_intermediate_size: NonNegativeInt = 1024
    moe_router_activation_func: Literal["sigmoid", "softmax"] = "sigmoid"
    moe_renormalize: bool = True
    routed_scaling_factor: PositiveNumber = 2.446
    use_grouped_topk: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: NonNegativeInt = 1
    moe_layer_freq: PositiveInt = 1
    moe_router_weights_from_biased_scores: bool = True  # HF in-place aliasing quirk; False = vLLM / DeepSeek-V3
    moe_bias_update_rate: NonNegativeNumber = 1e-3  # aux-loss-free balancing step (DeepSeek-V3 gamma)
    # Special tokens (null = none; transformers writes pad_token_id: null).
    bos_token_id: Annotated[NonNegativeInt | None, Allowed("null or a token id in [0, vocab_size)")] = 163584
    eos_token_id: Annotated[NonNegativeInt | None, Allowed("null or a token id in [0, vocab_size)")] = 163586
    pad_token_id: Annotated[NonNegativeInt | None, Allowed("null or a token id in [0, vocab_size)")] = 163839
    # Numerics and implementation choices.
    param_dtype: DType = "float32"
    dtype: DType = "float32"  # compute dtype of activations and matmuls; states, gates, softmax, router, norms fp32
    kda_impl: Literal["auto", "chunk", "pallas", "reference"] = "auto"
    kda_chunk_size: PositiveInt = 64
    moe_impl: Literal["auto", "ragged", "dense"] = "auto"
    # Expert parallelism (k2jax.layers.expert_parallel, used when a mesh with expert axis > 1 is set): "auto" is
    # allgather on CPU, ragged_a2a elsewhere.
    moe_ep_impl: Literal["auto", "allgather", "ragged_a2a"] = "auto"
    # None = dropless; c = each device keeps c x its balanced rows.
    moe_capacity_factor: Annotated[PositiveNumber | None, Allowed("null (dropless) or a positive number")] = None
    # Layer stacking: scan over repeats of the layer pattern (compile time O(period)).
    scan_layers: bool = False
    # Per-layer rematerialisation (jax.checkpoint of each layer): "none" | "full" (save only the layer input) |
    # "dots" (save matmul outputs) | "dots_no_batch" (save matmul outputs without batch dims).
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # Context parallelism (a mesh with `context` > 1, k2jax.layers.context_parallel): how the sequence is laid out
    # over the context shards inside the model. "zigzag" (2n pieces, shard i holds pieces i and 2n-1-i: equal
    # causal-attention work per shard) or "contiguous" (shard i holds the i-th n-th). Inputs and outputs are always
    # in natural order; the model permutes its hidden states on entry and exit.
    context_layout: Literal["zigzag", "contiguous"] = "zigzag"
    # Routed-expert quantization (k2jax.quantize): None, or {experts: None | 'int4', group_size: 32,
    # scale_dtype: 'bfloat16', qat: false}; missing keys take these defaults.
    quantization: Annotated[dict | None, Allowed("null or a mapping with keys experts, group_size, scale_dtype, "
                                                 "qat")] = None

    @field_validator("quantization", mode="before")
    @classmethod
    def _quantization_defaults(cls, q: Any) -> Any:
        return {**_QUANT_DEFAULTS, **q} if isinstance(q, dict) else q

    # ---- rules between fields ------------------------------------------------------------------------------------
    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        self._check_attention()
        self._check_layer_schedule()
        self._check_moe()
        self._check_quantization()
        for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, f) is not None and getattr(self, f) >= self.vocab_size:
                self.fail(f, getattr(self, f), f"must be null or a token id in [0, vocab_size={self.vocab_size})")
        return self

    def _check_attention(self) -> None:
        if self.num_key_value_heads != self.num_attention_heads:
            self.fail("num_key_value_heads", self.num_key_value_heads, f"MLA has one key/value head per query "
                      f"head: must equal num_attention_heads={self.num_attention_heads}")
        if self.use_rope and self.qk_rope_head_dim % 2:
            self.fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be even when RoPE is used (mla_use_nope: "
                                                                 "false)")
        rs = self.rope_scaling
        if rs is None:
            return
        unknown = set(rs) - _ROPE_SCALING_KEYS
        if unknown:
            self.fail("rope_scaling", rs, f"unknown keys {sorted(unknown)}; allowed {sorted(_ROPE_SCALING_KEYS)}")
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            self.fail("rope_scaling.type", kind, "only 'yarn' scaling is implemented (or rope_scaling: null)")
        factor = rs.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
            self.fail("rope_scaling.factor", factor, "must be a number >= 1")
        if "original_max_position_embeddings" not in rs:
            self.fail("rope_scaling", rs, "yarn needs original_max_position_embeddings")
        af = rs.get("attention_factor")
        if af is not None and (isinstance(af, bool) or not isinstance(af, (int, float)) or not af > 0):
            self.fail("rope_scaling.attention_factor", af, "must be null or a positive number (the cos/sin scale)")

    def _check_layer_schedule(self) -> None:
        L, kda, full = self.num_hidden_layers, self.kda_layers, self.full_attn_layers
        for f, v in (("kda_layers", kda), ("full_attn_layers", full)):
            bad = [i for i in v or () if not 1 <= i <= L]
            if bad:
                self.fail(f, list(v), f"layer numbers are 1-based and must lie in [1, num_hidden_layers={L}]; bad: "
                                      f"{bad}")
            if v is not None and len(set(v)) != len(v):
                self.fail(f, list(v), "contains a layer more than once")
        if kda is not None and full is not None:
            both = sorted(set(kda) & set(full))
            if both:
                self.fail("kda_layers", list(kda), f"layers {both} are also in full_attn_layers")
            missing = sorted(set(range(1, L + 1)) - set(kda) - set(full))
            if missing:
                self.fail("full_attn_layers", list(full), f"layers {missing} are in neither kda_layers nor "
                                                          f"full_attn_layers")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            self.fail("intermediate_size", self.intermediate_size, "must be positive when there are dense layers")

    def _check_moe(self) -> None:
        E, k, groups = self.num_experts, self.num_experts_per_token, self.num_expert_group
        if E == 0:
            if self.first_k_dense_replace < self.num_hidden_layers and self.intermediate_size <= 0:
                self.fail("intermediate_size", self.intermediate_size, "must be positive")
            return
        if self.moe_intermediate_size <= 0:
            self.fail("moe_intermediate_size", self.moe_intermediate_size, "must be positive when num_experts > 0")
        if not 1 <= k <= E:
            self.fail("num_experts_per_token", k, f"must lie in [1, num_experts={E}]")
        if groups < 1 or E % groups:
            self.fail("num_expert_group", groups, f"must be >= 1 and divide num_experts={E}")
        if not 1 <= self.topk_group <= groups:
            self.fail("topk_group", self.topk_group, f"must lie in [1, num_expert_group={groups}]")
        per_group = E // groups
        if self.use_grouped_topk and k > self.topk_group * per_group:
            self.fail("num_experts_per_token", k, f"exceeds the experts in the selected groups (topk_group * "
                                                  f"experts per group = {self.topk_group * per_group})")
        if self.use_grouped_topk and per_group < 2 and groups > 1:
            self.fail("num_expert_group", groups, "group scores sum the top-2 experts: groups need >= 2 experts")

    def _check_quantization(self) -> None:
        q = self.quantization
        if q is None:
            return
        unknown = sorted(set(q) - set(_QUANT_DEFAULTS))
        if unknown:
            self.fail("quantization", q, f"unknown keys {unknown}; allowed {sorted(_QUANT_DEFAULTS)}")
        if q["experts"] not in (None, "int4"):
            self.fail("quantization.experts", q["experts"], "must be null (float experts) or 'int4'")
        g = q["group_size"]
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 2:
            self.fail("quantization.group_size", g, "must be a positive even integer (two 4-bit values per byte)")
        for f in ("hidden_size", "moe_intermediate_size"):
            if getattr(self, f) % g:
                self.fail("quantization.group_size", g, f"must divide {f}={getattr(self, f)} (the experts' input "
                                                        f"dims)")
        if q["scale_dtype"] not in DTYPES:
            self.fail("quantization.scale_dtype", q["scale_dtype"], f"must be one of {DTYPES}")
        if not isinstance(q["qat"], bool):
            self.fail("quantization.qat", q["qat"], "must be true or false")
        if q["qat"] and q["experts"] is not None:
            self.fail("quantization.qat", q["qat"], "trains float experts with fake quantization: needs experts: "
                      "null (pack them afterwards with k2jax.quantize.quantize_model_experts)")
        if (q["experts"] is not None or q["qat"]) and self.num_experts == 0:
            self.fail("quantization.experts", q["experts"], "quantizes routed experts, but num_experts is 0")

    # ---- derived structure -----------------------------------------------------------------------------------------
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

"""Hugging Face interop: load and save Kimi-Linear and Kimi K2 / DeepSeek-V3 checkpoints (config.json + safetensors).

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

Two naming schemes: Kimi-Linear (`model_type` kimi_linear) keeps the MoE under `block_sparse_moe.` with experts
`w1/w2/w3`; Kimi K2 / DeepSeek-V3 (`kimi_k2`, `deepseek_v3`) puts it under `mlp.` with experts
`gate_proj/down_proj/up_proj`. Loading picks the scheme from `model_type`; saving writes Kimi-Linear format when the
config has a `linear_attn_config` (kda_layers is not None) and DeepSeek-V3 / K2 format otherwise.

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
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from k2jax.config import ConfigError, ModelConfig, from_hf_dict
from k2jax.quantize import (compressed_tensors_config, ct_bytes_to_packed, int4_experts, packed_to_ct,
                            quantization_from_compressed_tensors)
from k2jax.sharding import logical_names, logical_to_mesh_spec

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

KIMI_LINEAR = "kimi_linear"
DEEPSEEK_V3 = "deepseek_v3"  # also Kimi K2 (model_type kimi_k2), which uses the DeepSeek-V3 code and names

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
_DSV3_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# Config fields that only choose an implementation or a runtime dtype: never written into config.json.
_RUNTIME_FIELDS = ("name", "param_dtype", "dtype")


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be loaded (missing, corrupt, mismatched or unsupported)."""


# ---- config.json <-> ModelConfig ----------------------------------------------------------------------------------
def _dtype_name(dtype) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"dtype {dtype!r} is not a dtype; use 'float32', 'bfloat16' or 'float16'") from None
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r} is not supported for parameters; use 'float32', 'bfloat16' or 'float16'")
    return name


def naming_scheme(hf: dict) -> str:
    """KIMI_LINEAR or DEEPSEEK_V3: which tensor names a checkpoint with this config.json uses."""
    return KIMI_LINEAR if hf.get("model_type") == "kimi_linear" else DEEPSEEK_V3


def config_from_hf(hf: dict, *, dtype=None, source: str = CONFIG_FILE) -> ModelConfig:
    """A ModelConfig from an HF config.json dict. param_dtype: `dtype` if given, else the checkpoint's own
    (`dtype` / `torch_dtype`), else float32. A `quantization_config` must be compressed-tensors INT4 (routed
    experts only, k2jax.quantize); it becomes `quantization: {experts: int4, ...}`. Other schemes are refused."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    quantization = None
    if hf.get("quantization_config"):
        quantization = quantization_from_compressed_tensors(hf["quantization_config"], source)
    if hf.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias: true is not supported (k2jax's MLA projections have no bias)")
    config = from_hf_dict(hf, source=source)
    if dtype is not None:
        param_dtype = _dtype_name(dtype)
    else:
        stored = hf.get("torch_dtype") or hf.get("dtype")
        param_dtype = stored if stored in ("float32", "bfloat16", "float16") else "float32"
    if quantization is not None:
        try:
            config = config.replace(quantization=quantization)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return config.replace(param_dtype=param_dtype)


def hf_config_dict(config: ModelConfig) -> dict:
    """The HF config.json for `config`: Kimi-Linear format when it has KDA layers, else Kimi K2 / DeepSeek-V3.

    Fields that format cannot express (e.g. our `moe_router_weights_from_biased_scores`) are added under their own
    names when they differ from what the format implies, so `config_from_hf(hf_config_dict(c))` gives back `c`
    (up to name and dtypes); transformers keeps unknown keys and ignores them.
    """
    c = config
    common = {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_word_embeddings,
        "initializer_range": c.initializer_range, "use_cache": True, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id, "q_lora_rank": c.q_lora_rank,
        "kv_lora_rank": c.kv_lora_rank, "qk_nope_head_dim": c.qk_nope_head_dim,
        "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim, "moe_intermediate_size":
        c.moe_intermediate_size, "routed_scaling_factor": c.routed_scaling_factor, "topk_group": c.topk_group,
        "first_k_dense_replace": c.first_k_dense_replace, "moe_layer_freq": c.moe_layer_freq,
        "num_nextn_predict_layers": 0,
    }
    if c.kda_layers is not None:
        kda = sorted(c.kda_layers)
        full = sorted(c.full_attn_layers) if c.full_attn_layers is not None else \
            [i for i in range(1, c.num_hidden_layers + 1) if i not in set(kda)]
        hf = {"architectures": ["KimiLinearForCausalLM"], "auto_map": dict(_KIMI_LINEAR_AUTO_MAP),
              "model_type": "kimi_linear", **common,
              "head_dim": c.hidden_size // c.num_attention_heads,  # legacy field, unused by the model
              "model_max_length": c.max_position_embeddings, "dtype": c.param_dtype,
              "mla_use_nope": c.mla_use_nope, "num_experts": c.num_experts,
              "num_experts_per_token": c.num_experts_per_token, "num_shared_experts": c.num_shared_experts,
              "moe_router_activation_func": c.moe_router_activation_func, "moe_renormalize": c.moe_renormalize,
              "use_grouped_topk": c.use_grouped_topk, "num_expert_group": c.num_expert_group,
              "linear_attn_config": {"full_attn_layers": full, "kda_layers": kda, "head_dim": c.kda_head_dim,
                                     "num_heads": c.kda_num_heads,
                                     "short_conv_kernel_size": c.short_conv_kernel_size}}
    else:
        hf = {"architectures": ["DeepseekV3ForCausalLM"], "auto_map": dict(_K2_AUTO_MAP), "model_type": "kimi_k2",
              **common, "max_position_embeddings": c.max_position_embeddings, "torch_dtype": c.param_dtype,
              "n_routed_experts": c.num_experts or None, "num_experts_per_tok": c.num_experts_per_token,
              "n_shared_experts": c.num_shared_experts, "n_group": c.num_expert_group,
              "norm_topk_prob": c.moe_renormalize, "scoring_func": c.moe_router_activation_func,
              "topk_method": "noaux_tc", "ep_size": 1, "attention_bias": False, "attention_dropout": 0.0}
    if int4_experts(c):
        hf["quantization_config"] = compressed_tensors_config(c.quantization)
    back = from_hf_dict(hf, source="<generated config.json>")
    for field in c.to_dict():
        # `quantization` is written as quantization_config (packed experts) or not at all (QAT is a training setting)
        if field not in _RUNTIME_FIELDS and field != "quantization" and getattr(back, field) != getattr(c, field):
            value = getattr(c, field)
            hf[field] = list(value) if isinstance(value, tuple) else value
    return hf


# ---- tensor name and layout map ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorMap:
    """One HF tensor: its name, the parameter path it belongs to, how the layouts relate, and its HF shape.

    kind: 'copy' (same layout), 'linear' (transpose), 'conv' ([W, D] <-> [D, 1, W]), 'a_log' ([H] <-> [1, 1, H, 1])
    or 'expert' (slice `expert` of a stacked [E, a, b] parameter, transposed: HF [b, a]); INT4 experts add
    'expert_packed' (our uint8 [E, K/2, N] <-> HF int32 [N, K/8]) and 'expert_shape' (HF int64 [N, K], checked).
    """

    hf_name: str
    path: tuple
    kind: str
    hf_shape: tuple[int, ...]
    expert: int | None = None


def _entries(path: tuple, shape: tuple[int, ...], scheme: str) -> list[TensorMap]:
    keys = [str(k) for k in path]
    leaf, mods = keys[-1], keys[:-1]
    if keys == ["embed_tokens"]:
        return [TensorMap("model.embed_tokens.weight", path, "copy", shape)]
    if keys == ["lm_head", "kernel"]:
        return [TensorMap("lm_head.weight", path, "linear", shape[::-1])]
    if scheme == DEEPSEEK_V3:
        mods = ["mlp" if m == "block_sparse_moe" else m for m in mods]
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
    if leaf in ("w1", "w2", "w3") and mods and mods[-1] == "experts" and len(shape) == 3:
        name = _DSV3_EXPERT_NAMES[leaf] if scheme == DEEPSEEK_V3 else leaf
        return [TensorMap(f"{base}.{e}.{name}.weight", path, "expert", (shape[2], shape[1]), e)
                for e in range(shape[0])]
    if (m := re.fullmatch(r"(w[123])_(packed|scale)", leaf)) and mods and mods[-1] == "experts" and len(shape) == 3:
        return _int4_entries(base, path, shape, scheme, m.group(1), m.group(2))
    raise CheckpointError(f"parameter {'.'.join(keys)} with shape {list(shape)} has no Hugging Face name mapping")


def _int4_entries(base: str, path: tuple, shape, scheme: str, weight: str, part: str) -> list[TensorMap]:
    """compressed-tensors names of INT4 experts: packed [E, K/2, N] -> `weight_packed` [N, K/8] and `weight_shape`
    [N, K] per expert; scale [E, K/g, N] -> `weight_scale` [N, K/g] (an ordinary transposed 'expert' slice)."""
    name = _DSV3_EXPERT_NAMES[weight] if scheme == DEEPSEEK_V3 else weight
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


def tensor_maps(flat_state, scheme: str) -> list[TensorMap]:
    """The HF tensors of a model, in parameter order. `flat_state`: nnx.to_flat_state(...) of the model (abstract
    or concrete); `scheme`: KIMI_LINEAR or DEEPSEEK_V3."""
    out = []
    for path, var in flat_state:
        out.extend(_entries(tuple(path), tuple(_shape_of(var)), scheme))
    return out


def _shape_of(var) -> tuple[int, ...]:
    return tuple(var.get_value().shape)


def _dtype_of(var) -> np.dtype:
    return np.dtype(var.get_value().dtype)


def _hf_to_ours(tm: TensorMap, raw: np.ndarray, dest: np.ndarray) -> None:
    """Write HF tensor `raw` into `dest` (the whole parameter buffer, our layout), casting to dest's dtype."""
    if tm.kind == "copy":
        dest[...] = raw
    elif tm.kind == "linear":
        dest[...] = raw.T
    elif tm.kind == "conv":
        dest[...] = raw[:, 0, :].T
    elif tm.kind == "a_log":
        dest[...] = raw.reshape(dest.shape)
    elif tm.kind == "expert":
        dest[tm.expert] = raw.T
    else:
        raise AssertionError(tm.kind)


def _ours_to_hf(tm: TensorMap, ours: np.ndarray) -> np.ndarray:
    """The HF tensor `tm` (contiguous, HF layout) cut from `ours`, the whole parameter in our layout."""
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
    """Read HF tensor `st` into `dest` (the whole parameter, our layout), casting to dest's dtype.

    Transposed kinds stream blocks of HF rows (about _BLOCK_BYTES each) into columns of `dest`, so no full-size
    temporary is ever allocated and the strided copies stay cache-sized.
    """
    if tm.kind in ("expert_packed", "expert_shape"):
        _read_int4_expert(handle, st, tm, dest)
        return
    src_dtype = _NP_DTYPES[st.dtype]
    if tm.kind in ("linear", "expert"):
        target = dest if tm.kind == "linear" else dest[tm.expert]  # [in, out] = HF [out, in].T
        rows, cols = st.shape
        step = max(1, _BLOCK_BYTES // max(1, cols * src_dtype.itemsize))
        block = np.empty((min(step, rows), cols), src_dtype)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            _read_exact(handle, st, r0 * cols * src_dtype.itemsize, block[:n])
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
    else:  # conv and a_log: small tensors
        raw = np.empty(st.shape, src_dtype)
        _read_exact(handle, st, 0, raw)
        _hf_to_ours(tm, raw, dest)


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
    mtp = int(hf.get("num_nextn_predict_layers") or 0)
    skipped, notes = set(), []
    if mtp > 0:
        pat = re.compile(r"model\.layers\.(\d+)\.")
        skipped |= {n for n in names if (m := pat.match(n)) and int(m.group(1)) >= config.num_hidden_layers}
        notes.append(f"{len(skipped)} multi-token-prediction tensors (num_nextn_predict_layers={mtp}, layers >= "
                     f"{config.num_hidden_layers}): k2jax does not implement MTP heads")
    if config.tie_word_embeddings and "lm_head.weight" in names:
        skipped.add("lm_head.weight")
        notes.append("lm_head.weight (tie_word_embeddings: the embedding is used)")
    return skipped, ("skipping " + "; ".join(notes)) if notes else None


def _check_match(folder: Path, maps: list[TensorMap], stored: dict[str, StoredTensor], skipped: set[str]) -> None:
    expected = {tm.hf_name: tm for tm in maps}
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
    Raises ConfigError / CheckpointError (both ValueError) before reading any tensor data if the config is
    unsupported, a file is corrupt or truncated, or tensors are missing, unexpected or mis-shaped (one error lists
    them all). Multi-token-prediction layers are skipped with a logged note.
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
    maps = tensor_maps(flat, naming_scheme(hf))
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
        st = stored[by_path[path][0].hf_name]
        return file_rank[st.file], st.begin

    total = sum(stored[tm.hf_name].end - stored[tm.hf_name].begin for tm in maps)
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
                    bar.update(st.end - st.begin)
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
                       overwrite: bool = False, progress: bool = False) -> Path:
    """Write `model` as a Hugging Face checkpoint folder: config.json and safetensors in HF names and layouts.

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
    hf_cfg = hf_config_dict(config.replace(param_dtype=jnp.dtype(model.embed_tokens.get_value().dtype).name))
    maps = tensor_maps(flat, KIMI_LINEAR if config.kda_layers is not None else DEEPSEEK_V3)
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

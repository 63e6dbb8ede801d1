"""Saving a KimiLinear as an HF checkpoint folder (either convention), written atomically."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from k2jax.config import ModelConfig
from k2jax.hf.compressed_tensors import packed_to_ct
from k2jax.hf.config import CONFIG_FILE, REMOTE_CODE, TRANSFORMERS, hf_config_dict
from k2jax.hf.names import TensorMap, naming_for, tensor_maps, variable_dtype
from k2jax.hf.safetensors import DTYPE_CODES, INDEX_FILE, ITEMSIZE, SINGLE_FILE, write_safetensors


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


def plan_shards(maps: list[TensorMap], nbytes: dict[str, int], limit: int) -> list[list[TensorMap]]:
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
    return {"expert_packed": "I32", "expert_shape": "I64"}.get(tm.kind) or DTYPE_CODES[variable_dtype(var)]


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
    nbytes = {tm.hf_name: math.prod(tm.hf_shape) * ITEMSIZE[codes[tm.hf_name]] for tm in maps}
    shards = plan_shards(maps, nbytes, limit)
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

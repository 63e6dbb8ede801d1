"""Loading an HF checkpoint folder into a KimiLinear: config, tensor checks, streamed re-layout and placement.

Each model parameter is assembled in one 64-byte-aligned buffer in our layout, streaming 1 MiB blocks of HF rows into
it (transposes and dtype casts included); routed experts fill one preallocated [E, ...] buffer. On CPU, XLA adopts
such an aligned buffer in `device_put` without copying, so loading peaks at about the model size.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from k2jax.config import ModelConfig
from k2jax.hf.compressed_tensors import ct_bytes_to_packed
from k2jax.hf.config import CONFIG_FILE, config_from_hf
from k2jax.hf.names import TensorMap, stored_naming, tensor_maps, variable_dtype, variable_shape
from k2jax.hf.safetensors import (
    INT_SHAPE_DTYPES,
    NP_DTYPES,
    CheckpointError,
    StoredTensor,
    aligned_empty,
    index_checkpoint,
    read_exact,
    refuse_pickle,
)
from k2jax.layers.qat import int4_experts
from k2jax.model import KimiLinear
from k2jax.sharding import logical_names, logical_to_mesh_spec

log = logging.getLogger(__name__)

_MAX_LISTED = 20  # names shown per category in a mismatch error
_BLOCK_BYTES = 2**20  # read granularity of transposed and cast tensors (cache-sized strided copies)


def _read_into(handle, st: StoredTensor, tm: TensorMap, dest: np.ndarray) -> None:
    """Read HF tensor `st` (the block of it that `tm` names) into `dest` (the whole parameter, our layout), casting
    to dest's dtype.

    Transposed kinds stream blocks of HF rows (about _BLOCK_BYTES each) into columns of `dest`, so no full-size
    temporary is ever allocated and the strided copies stay cache-sized.
    """
    if tm.kind in ("expert_packed", "expert_shape"):
        _read_int4_expert(handle, st, tm, dest)
        return
    src_dtype = NP_DTYPES[st.dtype]
    if tm.kind in ("linear", "expert"):
        target = dest if tm.kind == "linear" else dest[tm.expert]  # [in, out] = HF [out, in].T
        cols, rows = target.shape
        start = tm.row0 * cols * src_dtype.itemsize
        step = max(1, _BLOCK_BYTES // max(1, cols * src_dtype.itemsize))
        block = np.empty((min(step, rows), cols), src_dtype)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            read_exact(handle, st, start + r0 * cols * src_dtype.itemsize, block[:n])
            target[:, r0:r0 + n] = block[:n].T
    elif tm.kind == "copy" and src_dtype == dest.dtype and dest.flags.c_contiguous:
        read_exact(handle, st, 0, dest)
    elif tm.kind == "copy":
        flat = dest.reshape(-1)
        step = max(1, _BLOCK_BYTES // src_dtype.itemsize)
        block = np.empty(min(step, flat.size), src_dtype)
        for i in range(0, flat.size, step):
            n = min(step, flat.size - i)
            read_exact(handle, st, i * src_dtype.itemsize, block[:n])
            flat[i:i + n] = block[:n]
    elif tm.kind == "conv":  # small: our [W, D] = HF rows [row0, row0 + D) of [rows, 1, W], transposed
        W, D = dest.shape
        raw = np.empty((D, W), src_dtype)
        read_exact(handle, st, tm.row0 * W * src_dtype.itemsize, raw)
        dest[...] = raw.T
    elif tm.kind == "a_log":  # [1, 1, H, 1] -> [H]
        raw = np.empty(dest.shape, src_dtype)
        read_exact(handle, st, 0, raw)
        dest[...] = raw
    else:
        raise AssertionError(tm.kind)


def _read_int4_expert(handle, st: StoredTensor, tm: TensorMap, dest: np.ndarray) -> None:
    """weight_packed: stream rows of int32 words as raw (little-endian) bytes into expert `tm.expert` of our packed
    uint8 [E, K/2, N], nibbles copied bit for bit (no dequantization). weight_shape: check it equals [N, K]."""
    if tm.kind == "expert_shape":
        raw = np.empty(2, INT_SHAPE_DTYPES[st.dtype])
        read_exact(handle, st, 0, raw)
        want = [dest.shape[2], 2 * dest.shape[1]]
        if raw.tolist() != want:
            raise CheckpointError(f"{st.file}: {tm.hf_name} = {raw.tolist()}, the model expects {want}")
        return
    rows, words = st.shape
    step = max(1, _BLOCK_BYTES // max(1, 4 * words))
    block = np.empty((min(step, rows), 4 * words), np.uint8)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        read_exact(handle, st, r0 * 4 * words, block[:n])
        dest[tm.expert][:, r0:r0 + n] = ct_bytes_to_packed(block[:n])


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
        return tuple(INT_SHAPE_DTYPES)
    return tuple(NP_DTYPES)


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
    folder = Path(path)
    if folder.is_file():
        refuse_pickle([folder], folder)
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
    maps = tensor_maps(flat, stored_naming(hf, stored))
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
    name = NP_DTYPES[code].name if code in ("F16", "BF16", "F32") else None
    if name is None or name == config.quantization["scale_dtype"]:
        return config
    return config.replace(quantization={**config.quantization, "scale_dtype": name})


def _load_values(flat, maps: list[TensorMap], stored: dict[str, StoredTensor], mesh, progress: bool) -> dict:
    """Read, re-layout and place every parameter, one at a time, in on-disk order."""

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
                host = aligned_empty(variable_shape(var), variable_dtype(var))
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

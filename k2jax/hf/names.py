"""HF tensor names and layouts of our parameters: the namings (`Naming`) and one `TensorMap` per HF tensor."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from k2jax.config import ModelConfig
from k2jax.hf.config import REMOTE_CODE, TRANSFORMERS, model_family
from k2jax.hf.safetensors import CheckpointError


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


def stored_naming(hf: dict, stored: Iterable[str]) -> Naming:
    """The naming of a checkpoint's tensors: FUSED if it holds transformers' fused tensors; for Kimi-Linear, where
    the dense MLP lives (`mlp.` in the remote code, `block_sparse_moe.` as transformers saves it)."""
    names = list(stored)
    if any(n.endswith((".experts.gate_up_proj", ".self_attn.conv1d.weight")) or ".forget_gate." in n for n in names):
        return FUSED
    if model_family(hf.get("model_type")) == "deepseek_v3":
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
        out.extend(_entries(tuple(path), tuple(variable_shape(var)), naming))
    return out


def variable_shape(var) -> tuple[int, ...]:
    """The shape of an nnx Variable's value (abstract or concrete)."""
    return tuple(var.get_value().shape)


def variable_dtype(var) -> np.dtype:
    """The numpy dtype of an nnx Variable's value (abstract or concrete)."""
    return np.dtype(var.get_value().dtype)

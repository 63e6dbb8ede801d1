"""Safetensors files without a memory map: header parsing and validation, checkpoint folder indexing, exact reads at
byte offsets into aligned buffers, and a streaming writer (one tensor in memory at a time).

The format is a u64 little-endian header size, a JSON header and raw little-endian data. Pickle-based weights
(`.bin`, `.pt`, ...) are refused, never unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Every safetensors dtype code and its element size; only the floating ones can be loaded.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
NP_DTYPES = {"F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
             "F64": np.dtype(np.float64)}
DTYPE_CODES = {v: k for k, v in NP_DTYPES.items()}
DTYPE_CODES.update({np.dtype("<i4"): "I32", np.dtype("<i8"): "I64"})  # INT4 experts' weight_packed and weight_shape
INT_SHAPE_DTYPES = {"I64": np.dtype("<i8"), "I32": np.dtype("<i4")}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
_ALIGN = 64


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be loaded (missing, corrupt, mismatched or unsupported)."""


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
        itemsize = ITEMSIZE.get(code)
        if itemsize is None or b < 0 or e - b != math.prod(shape) * itemsize or any(d < 0 for d in shape):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for {name!r} (dtype {code}, shape "
                                  f"{list(shape)}, byte range [{b}, {e}))")
        if data_start + e > size:
            raise CheckpointError(f"{file}: truncated safetensors file: tensor {name!r} ends at byte "
                                  f"{data_start + e} but the file has only {size} bytes")
        out[name] = StoredTensor(file, code, shape, data_start + b, data_start + e)
    return out


def refuse_pickle(paths: Iterable[Path], where: Path) -> None:
    """CheckpointError (naming `where`) if any of `paths` is a pickle-based weight file (.bin, .pt, ...)."""
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
        refuse_pickle([Path(n) for n in names], index)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) {missing} listed in weight_map do not exist in {folder}")
        return [folder / n for n in names], weight_map
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single], None
    refuse_pickle(folder.iterdir(), folder)
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


def read_exact(handle, st: StoredTensor, offset: int, out: np.ndarray) -> None:
    """Fill contiguous `out` with the bytes of `st` starting `offset` bytes into its data."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    handle.seek(st.begin + offset)
    got = handle.readinto(view)
    if got != len(view):
        raise CheckpointError(f"{st.file}: truncated while reading a tensor ({got} of {len(view)} bytes at "
                              f"offset {st.begin + offset})")


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty with 64-byte alignment: XLA:CPU then adopts the buffer in device_put instead of copying it."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    buf = np.empty(n + _ALIGN, np.uint8)
    off = (-buf.ctypes.data) % _ALIGN
    return buf[off:off + n].view(dtype).reshape(shape)


def write_safetensors(file: Path, items: list[tuple[str, str, tuple[int, ...]]], produce: Callable[[str], Any],
                      metadata: dict[str, str] | None = None, on_bytes: Callable[[int], None] | None = None) -> int:
    """Stream tensors into a safetensors file without holding more than one at a time.

    items: (name, dtype code, shape) in file order; produce(name) -> np.ndarray of exactly that dtype and shape.
    Returns the number of data bytes written.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, code, shape in items:
        nbytes = math.prod(shape) * ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, code, shape in items:
            arr = np.ascontiguousarray(produce(name))
            if arr.shape != tuple(shape) or DTYPE_CODES.get(arr.dtype) != code:
                raise AssertionError(f"{name}: produced {arr.dtype}{list(arr.shape)}, declared {code}{list(shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            if on_bytes is not None:
                on_bytes(arr.nbytes)
    return offset

"""Training data: the embedded MQAR recall task and a grain pipeline for the user's text corpora.

Every source yields batches as dicts of numpy arrays, one host's share of the global batch:
    tokens       int32 [B_local, T]   model input
    targets      int32 [B_local, T]   token to predict at each position
    loss_mask    float32 [B_local, T] 1 where the loss (and accuracy) counts
    segment_ids  int32 [B_local, T]   packed documents (1, 2, ... per row; 0 = padding); absent for MQAR, whose
                                      rows are one sequence each
and expose `get_state() -> dict` / `set_state(dict)` so that a checkpoint records the position in the stream.

Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), as generated here for a row of length T with
n key-value pairs over a vocabulary of V ids:
    ids 0..3 are reserved (0 = padding, 1 = filler); keys are drawn from [4, 4 + (V - 4) // 2), values from the
    rest.
    positions 0 .. 2n-1:  k_1 v_1 k_2 v_2 ... k_n v_n   (n distinct keys, values drawn with replacement)
    positions 2n .. T-1:  (T - 2n) // 2 two-token slots; n of them, chosen at random, hold a query "k_i v_i"
                          (every key queried once, in random order); the others hold the filler token (Zoology's
                          original layout), or with `random_fill` two random value tokens (a harder variant).
The loss and the accuracy count only the answers: at each query key the target is its value. Answering needs
recall of a binding seen up to T tokens earlier; random guessing scores about 2 / V.
Row r of step s is a pure function of (seed, s, r): the stream is resumable from the step alone, and the host
with index p of P generates rows [p B / P, (p + 1) B / P) of each global batch.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import threading
from pathlib import Path
from typing import Sequence

import grain
import numpy as np
import pyarrow.parquet as pq

MQAR_RESERVED = 4
MQAR_FILL = 1
_EVAL_STREAM = 1 << 30  # eval rows come from step numbers training never reaches


@dataclasses.dataclass(frozen=True)
class MQARTask:
    """Shape of the MQAR task: sequence length T, n key-value pairs, vocabulary size V.

    With `min_kv_pairs` set, each training row draws its own n uniformly from [min_kv_pairs, num_kv_pairs] (a
    mixture of easy and hard rows, which lets the recall circuit form sooner); evaluation always uses
    num_kv_pairs.
    """

    seq_len: int = 256
    num_kv_pairs: int = 32
    vocab_size: int = 512
    min_kv_pairs: int | None = None
    random_fill: bool = False

    def __post_init__(self):
        T, n, V = self.seq_len, self.num_kv_pairs, self.vocab_size
        if n < 1 or T < 2:
            raise ValueError(f"MQAR: need num_kv_pairs >= 1 and seq_len >= 2, got n={n}, T={T}")
        if (T - 2 * n) // 2 < n:
            raise ValueError(f"MQAR: seq_len={T} is too short for {n} pairs and {n} queries (needs >= {4 * n})")
        if (V - MQAR_RESERVED) // 2 < n:
            raise ValueError(f"MQAR: vocab_size={V} has fewer than num_kv_pairs={n} keys "
                             f"(keys are (V - {MQAR_RESERVED}) // 2 ids)")
        if self.min_kv_pairs is not None and not 1 <= self.min_kv_pairs <= n:
            raise ValueError(f"MQAR: min_kv_pairs={self.min_kv_pairs} must lie in [1, num_kv_pairs={n}]")

    @property
    def key_range(self) -> tuple[int, int]:
        return MQAR_RESERVED, MQAR_RESERVED + (self.vocab_size - MQAR_RESERVED) // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return self.key_range[1], self.vocab_size


def _row_rng(seed: int, step: int, row: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, row])


def mqar_row(task: MQARTask, seed: int, step: int, row: int, *, fixed_n: bool = False
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One MQAR row: (tokens int32 [T], targets int32 [T], loss_mask float32 [T]), a pure function of its args.
    The row holds num_kv_pairs pairs, or a random number from [min_kv_pairs, num_kv_pairs] unless `fixed_n`."""
    T = task.seq_len
    rng = _row_rng(seed, step, row)
    n = task.num_kv_pairs
    if task.min_kv_pairs is not None and not fixed_n:
        n = int(rng.integers(task.min_kv_pairs, n + 1))
    (k0, k1), (v0, v1) = task.key_range, task.value_range
    keys = k0 + rng.permutation(k1 - k0)[:n]
    values = rng.integers(v0, v1, n)
    seq = rng.integers(v0, v1, T) if task.random_fill else np.full(T, MQAR_FILL)
    seq[0:2 * n:2], seq[1:2 * n:2] = keys, values
    n_slots = (T - 2 * n) // 2
    slots = np.sort(rng.permutation(n_slots)[:n])
    order = rng.permutation(n)
    qpos = 2 * n + 2 * slots
    seq[qpos], seq[qpos + 1] = keys[order], values[order]
    targets = np.zeros(T, np.int32)
    targets[:-1] = seq[1:]
    mask = np.zeros(T, np.float32)
    mask[qpos] = 1.0
    return seq.astype(np.int32), targets, mask


def mqar_batch(task: MQARTask, seed: int, step: int, rows: range, *, fixed_n: bool = False
               ) -> dict[str, np.ndarray]:
    """Rows `rows` of global batch `step` as a batch dict (see the module docstring)."""
    parts = [mqar_row(task, seed, step, r, fixed_n=fixed_n) for r in rows]
    tokens, targets, mask = (np.stack(x) for x in zip(*parts))
    return {"tokens": tokens, "targets": targets, "loss_mask": mask}


def host_rows(global_batch: int, process_index: int, process_count: int) -> range:
    """The rows of a global batch that host `process_index` of `process_count` loads."""
    if global_batch % process_count:
        raise ValueError(f"global batch size {global_batch} is not divisible by the {process_count} processes")
    per = global_batch // process_count
    return range(process_index * per, (process_index + 1) * per)


class MQARSource:
    """Resumable stream of MQAR batches for one host. State: {'step': next global batch index}."""

    def __init__(self, task: MQARTask, global_batch: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        self.task, self.seed = task, seed
        self.rows = host_rows(global_batch, process_index, process_count)
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = mqar_batch(self.task, self.seed, self.step, self.rows)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"kind": "mqar", "step": self.step}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "mqar":
            raise ValueError(f"MQARSource: cannot resume from a data state of kind {state.get('kind')!r}")
        self.step = int(state["step"])

    def eval_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
        """Held-out batches (this host's rows), the same at every call."""
        return [mqar_batch(self.task, self.seed, _EVAL_STREAM + i, self.rows, fixed_n=True)
                for i in range(num_batches)]


# ---- text corpora ----------------------------------------------------------------------------------------------------
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def resolve_data_files(spec: str) -> list[Path]:
    """Files named by `spec`: comma-separated paths, globs or folders (searched recursively for .txt, .jsonl and
    .parquet files). Raises ValueError for a name that matches nothing or a file of another type."""
    files: list[Path] = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        p = Path(part)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"data folder {part!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
        elif any(c in part for c in "*?["):
            found = sorted(Path(f) for f in globlib.glob(part, recursive=True) if Path(f).is_file())
            if not found:
                raise ValueError(f"data pattern {part!r} matches no file")
        elif p.is_file():
            found = [p]
        else:
            raise ValueError(f"data file {part!r} does not exist")
        for f in found:
            if f.suffix not in TEXT_SUFFIXES:
                raise ValueError(f"data file {str(f)!r}: unsupported type {f.suffix!r}; expected one of "
                                 f"{TEXT_SUFFIXES}")
        files += found
    if not files:
        raise ValueError(f"no data files in {spec!r}")
    return files


def _line_offsets(path: Path, chunk: int = 1 << 26) -> np.ndarray:
    """[n, 2] byte spans (start, stop) of the non-empty lines of a file (line break included), found by scanning
    it in chunks (memory stays O(chunk + lines) for any file size)."""
    size = path.stat().st_size
    if size == 0:
        return np.zeros((0, 2), np.int64)
    data = np.memmap(path, np.uint8, mode="r")
    ends = [np.flatnonzero(data[o:o + chunk] == ord("\n")) + (o + 1) for o in range(0, size, chunk)]
    bounds = np.concatenate([[0], *ends])
    if bounds[-1] != size:
        bounds = np.append(bounds, size)
    spans = np.stack([bounds[:-1], bounds[1:]], axis=1).astype(np.int64)
    newline = np.asarray(data[spans[:, 1] - 1] == ord("\n"))
    return spans[(spans[:, 1] - spans[:, 0] - newline) > 0]


class _LineFile:
    """Random access to the lines of a .txt (one document per line) or .jsonl (one object per line) file."""

    def __init__(self, path: Path, text_field: str):
        self.path, self.text_field = path, text_field
        self.spans = _line_offsets(path)
        self.is_json = path.suffix == ".jsonl"

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> str:
        start, stop = self.spans[i]
        with open(self.path, "rb") as f:
            f.seek(int(start))
            raw = f.read(int(stop - start))
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not self.is_json:
            return line
        return _json_text(json.loads(line), self.text_field, self.path, i)


def _json_text(obj, field: str, path: Path, i: int) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise ValueError(f"{path}: record {i} has no string field {field!r} (set train.text_field)")
    return obj[field]


class _ParquetFile:
    """Random access to the `text_field` column of a parquet file, one row group in memory at a time."""

    def __init__(self, path: Path, text_field: str):
        self.path, self.text_field = path, text_field
        self.file = pq.ParquetFile(path)
        if text_field not in self.file.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {self.file.schema_arrow.names}); "
                             f"set train.text_field")
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cached: tuple[int, list] | None = None
        # grain reads from several prefetch threads; one pyarrow ParquetFile read at a time (concurrent
        # read_row_group calls on one file segfaulted under Python 3.12).
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> str:
        g = int(np.searchsorted(self.starts, i, side="right") - 1)
        with self._lock:
            if self._cached is None or self._cached[0] != g:
                column = self.file.read_row_group(g, columns=[self.text_field]).column(0)
                self._cached = (g, column.to_pylist())
            return self._cached[1][i - int(self.starts[g])] or ""


def _open_file(path: Path, text_field: str):
    """Open one corpus file and read its first record, so that unreadable data fails before any compilation."""
    try:
        f = _ParquetFile(path, text_field) if path.suffix == ".parquet" else _LineFile(path, text_field)
        if len(f) == 0:
            raise ValueError("it holds no documents")
        f[0]
    except ValueError as e:
        raise ValueError(f"data file {str(path)!r} is unreadable: {e}") from None
    except Exception as e:  # noqa: BLE001 - pyarrow, OS and JSON errors all mean the same thing to the user
        raise ValueError(f"data file {str(path)!r} is unreadable: {type(e).__name__}: {e}") from None
    return f


class TextDocuments:
    """All documents of several files as one random-access sequence of strings (grain's data source protocol)."""

    def __init__(self, files: Sequence[Path], text_field: str = "text"):
        self.files = [_open_file(Path(p), text_field) for p in files]
        self.starts = np.concatenate([[0], np.cumsum([len(f) for f in self.files])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> str:
        i = int(i)
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        return self.files[k][i - int(self.starts[k])]


class TextSource:
    """Packed language-modelling batches from text files, read and tokenised by a grain pipeline.

    Each host reads every `process_count`-th document (from its `process_index`), shuffled per epoch with `seed`,
    tokenised as [bos] + text + [eos], concatenated and split into rows of `seq_len` tokens; `segment_ids` number
    the documents within a row (from 1), and the loss skips each document's last token and the row's last position
    (their next token is not part of the same document or row). State: grain's iterator state.
    """

    def __init__(self, spec: str, tokenizer, seq_len: int, global_batch: int, *, text_field: str = "text",
                 seed: int = 0, process_index: int = 0, process_count: int = 1, shuffle: bool = True):

        docs = TextDocuments(resolve_data_files(spec), text_field)
        rows = host_rows(global_batch, process_index, process_count)
        if len(docs) < process_count:
            raise ValueError(f"data {spec!r}: {len(docs)} documents cannot be split over {process_count} hosts")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        ds = grain.MapDataset.source(docs)[process_index::process_count]
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat().map(self._tokenize)
        packed = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(),
                                                               length_struct={"tokens": seq_len})
        self._dataset = packed.batch(len(rows), drop_remainder=True)
        self._iter = iter(self._dataset)

    def _tokenize(self, text: str) -> dict:
        ids = self.tokenizer.encode(text)
        head = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        tail = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        return {"tokens": np.asarray(head + ids + tail, np.int32)}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self._iter)
        tokens, seg = b["tokens"].astype(np.int32), b["tokens_segment_ids"].astype(np.int32)
        targets = np.zeros_like(tokens)
        targets[:, :-1] = tokens[:, 1:]
        mask = np.zeros(tokens.shape, np.float32)
        mask[:, :-1] = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)
        return {"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": seg}

    def get_state(self) -> dict:
        return {"kind": "text", "grain": self._iter.get_state()}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "text":
            raise ValueError(f"TextSource: cannot resume from a data state of kind {state.get('kind')!r}")
        self._iter.set_state(_tuples(state["grain"]))


def _tuples(state):
    """JSON turns grain's tuples into lists; give them back."""
    if isinstance(state, dict):
        return {k: _tuples(v) for k, v in state.items()}
    if isinstance(state, list):
        return tuple(_tuples(v) for v in state)
    return state

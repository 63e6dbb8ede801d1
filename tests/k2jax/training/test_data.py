"""Training data: the MQAR generator (checked against the task's definition, row by row) and the grain text
pipeline (checked against a plain tokenise-concatenate-split of the documents)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2jax.tokenizer import ByteTokenizer
from k2jax.training import data


# ---- MQAR ------------------------------------------------------------------------------------------------------------
def _check_mqar_row(task, tokens, targets, mask, n):
    """The row against the definition in k2jax/training/data.py, by a plain scan of the tokens."""
    T = task.seq_len
    (k0, k1), (v0, v1) = task.key_range, task.value_range
    assert tokens.shape == targets.shape == mask.shape == (T,)
    context = {int(tokens[2 * i]): int(tokens[2 * i + 1]) for i in range(n)}
    assert len(context) == n, "keys must be distinct"
    assert all(k0 <= k < k1 for k in context) and all(v0 <= v < v1 for v in context.values())
    queries = np.flatnonzero(mask)
    assert len(queries) == n and set(mask.tolist()) <= {0.0, 1.0}
    assert all(q >= 2 * n and (q - 2 * n) % 2 == 0 for q in queries)
    assert sorted(int(tokens[q]) for q in queries) == sorted(context), "every key is queried once"
    for q in queries:
        assert targets[q] == context[int(tokens[q])] == tokens[q + 1]
    np.testing.assert_array_equal(targets[:-1], tokens[1:])
    # Outside the pairs and the queries: the filler, or value-range noise; never a key.
    others = np.ones(T, bool)
    others[:2 * n] = False
    others[queries] = others[queries + 1] = False
    if task.random_fill:
        assert np.all((tokens[others] >= v0) & (tokens[others] < v1))
    else:
        assert np.all(tokens[others] == data.MQAR_FILL)


@pytest.mark.parametrize("T, n, V, noise", [(256, 32, 512, False), (16, 4, 16, True), (64, 1, 40, False),
                                            (64, 8, 64, True)])
def test_mqar_rows_follow_the_definition(T, n, V, noise):
    task = data.MQARTask(T, n, V, random_fill=noise)
    for row in range(3):
        _check_mqar_row(task, *data.mqar_row(task, seed=1, step=5, row=row), n)


def test_mqar_is_deterministic_and_keyed_by_seed_step_row():
    task = data.MQARTask(64, 8, 128)
    a = data.mqar_row(task, 0, 3, 1)
    np.testing.assert_array_equal(a[0], data.mqar_row(task, 0, 3, 1)[0])
    for other in [(1, 3, 1), (0, 4, 1), (0, 3, 2)]:
        assert not np.array_equal(a[0], data.mqar_row(task, *other)[0])


def test_mqar_varying_pairs_for_training_fixed_for_eval():
    task = data.MQARTask(64, 8, 128, min_kv_pairs=2)
    counts = {int(data.mqar_row(task, 0, s, 0)[2].sum()) for s in range(40)}
    assert len(counts) > 3 and min(counts) >= 2 and max(counts) <= 8
    for s in range(5):
        tokens, targets, mask = data.mqar_row(task, 0, s, 0, fixed_n=True)
        _check_mqar_row(task, tokens, targets, mask, 8)
    src = data.MQARSource(task, 4, seed=0)
    assert all(b["loss_mask"].sum() == 4 * 8 for b in src.eval_batches(2))


def test_mqar_source_hosts_split_the_global_batch_and_resume_by_step():
    task = data.MQARTask(32, 4, 64)
    whole = data.MQARSource(task, 6, seed=2)
    halves = [data.MQARSource(task, 6, seed=2, process_index=p, process_count=2) for p in range(2)]
    for _ in range(2):
        b = next(whole)
        parts = [next(h) for h in halves]
        for k in b:
            np.testing.assert_array_equal(b[k], np.concatenate([p[k] for p in parts]))
    resumed = data.MQARSource(task, 6, seed=2)
    resumed.set_state(whole.get_state())
    np.testing.assert_array_equal(next(resumed)["tokens"], next(whole)["tokens"])
    with pytest.raises(ValueError, match="divisible"):
        data.MQARSource(task, 5, process_index=0, process_count=2)


@pytest.mark.parametrize("kw, match", [(dict(seq_len=15, num_kv_pairs=4, vocab_size=64), "too short"),
                                       (dict(seq_len=64, num_kv_pairs=8, vocab_size=16), "fewer than"),
                                       (dict(seq_len=64, num_kv_pairs=8, vocab_size=64, min_kv_pairs=9), "min_kv")])
def test_mqar_task_rejects_impossible_shapes(kw, match):
    with pytest.raises(ValueError, match=match):
        data.MQARTask(**kw)


# ---- text ------------------------------------------------------------------------------------------------------------
DOCS = ["hello world", "a", "the quick brown fox", "jumps over", "the lazy dog!", "é ü"]


def _write_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(DOCS[:2]) + "\n\n")  # a blank line is no document
    with open(tmp_path / "b.jsonl", "w") as f:
        for d in DOCS[2:4]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")

    pq.write_table(pa.table({"text": DOCS[4:]}), tmp_path / "c.parquet", row_group_size=1)
    return f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'},{tmp_path}/*.parquet"


def _expected_rows(docs, T, rows):
    """Plain packing: [bos] + bytes + [eos] per document, concatenated, cut into rows of T; segment ids per row."""
    tok = ByteTokenizer()
    stream, seg_of = [], []
    for i, d in enumerate(docs):
        ids = [tok.bos_id] + tok.encode(d) + [tok.eos_id]
        stream += ids
        seg_of += [i] * len(ids)
    out = []
    for r in range(rows):
        toks, owner = stream[r * T:(r + 1) * T], seg_of[r * T:(r + 1) * T]
        seg = np.cumsum([1] + [int(owner[j] != owner[j - 1]) for j in range(1, T)])
        out.append((np.array(toks), seg))
    return out


def test_text_pipeline_reads_txt_jsonl_parquet_and_packs_with_segments(tmp_path):
    spec = _write_corpus(tmp_path)
    T = 16
    src = data.TextSource(spec, ByteTokenizer(), T, 2, shuffle=False)
    expected = _expected_rows(DOCS, T, 4)
    for b in range(2):
        batch = next(src)
        for r in range(2):
            toks, seg = expected[2 * b + r]
            np.testing.assert_array_equal(batch["tokens"][r], toks)
            np.testing.assert_array_equal(batch["segment_ids"][r], seg)
            same = np.append(seg[:-1] == seg[1:], False)
            np.testing.assert_array_equal(batch["loss_mask"][r], same.astype(np.float32))
            np.testing.assert_array_equal(batch["targets"][r][:-1], toks[1:])


def test_text_pipeline_resumes_and_splits_documents_over_hosts(tmp_path):
    spec = _write_corpus(tmp_path)
    src = data.TextSource(spec, ByteTokenizer(), 8, 2, seed=3)
    next(src)
    state = json.loads(json.dumps(src.get_state()))  # as stored in a checkpoint
    after = next(src)
    again = data.TextSource(spec, ByteTokenizer(), 8, 2, seed=3)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["tokens"], after["tokens"])
    host1 = data.TextSource(spec, ByteTokenizer(), 16, 2, process_index=1, process_count=2, shuffle=False)
    np.testing.assert_array_equal(next(host1)["tokens"][0], _expected_rows(DOCS[1::2], 16, 1)[0][0])


def test_unreadable_data_fails_with_the_file_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.resolve_data_files(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported type"):
        data.resolve_data_files(str(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl.*text"):
        data.TextDocuments([tmp_path / "bad.jsonl"])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match="broken.parquet.*unreadable"):
        data.TextDocuments([tmp_path / "broken.parquet"])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt.*no documents"):
        data.TextDocuments([tmp_path / "empty.txt"])
    with pytest.raises(ValueError, match="matches no file"):
        data.resolve_data_files(str(tmp_path / "*.none"))

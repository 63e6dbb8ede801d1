"""Attention ops against the plain softmax reference: blocked XLA form, splash and Triton kernels (interpreted on
CPU), the dispatch, its TPU/GPU lowering, O(T) memory and block skipping.

Tolerances are error ratios ||ref - x|| / ||ref||: float32 1e-5 (o, max_logit) and 1e-4 (gradients); bfloat16
inputs 5e-3 (o) and 8e-3 (gradients), fla's bounds, against the float32 reference on the same rounded inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import (
    attention,
    attention_blocked,
    attention_max_logit,
    attention_reference,
    attention_splash,
    attention_triton,
    decompressed_latent_attention,
    expanded_pays_off,
    latent_attention,
    latent_attention_rows,
    merge_attention,
    visited_blocks,
)
from pallas_kernels.attention.blocked import (
    BLOCK_SCORE_ELEMS,
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    MIN_AUTO_BLOCK,
    default_blocks,
)
from tests.conftest import error_ratio
from tests.pallas_kernels.lowering import count_pallas_kernels, jit_fast_compile


def make_inputs(B, T, S, H, Hkv, Dk, Dv, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, Dk))
    k = jax.random.normal(ks[1], (B, S, Hkv, Dk))
    v = jax.random.normal(ks[2], (B, S, Hkv, Dv))
    do = jax.random.normal(ks[3], (B, T, H, Dv))
    return tuple(x.astype(dtype) for x in (q, k, v, do))


def segments(lengths_per_row):
    """int32 [B, sum(lengths)] from rows of (segment id, length) runs."""
    return jnp.array([sum(([sid] * n for sid, n in row), []) for row in lengths_per_row], jnp.int32)


def outputs_and_grads(fn, q, k, v, do, **kw):
    """(o, max_logit, (dq, dk, dv)) of fn with the cotangent do, jitted."""
    @jit_fast_compile
    def run(q, k, v, do):
        (o, mx), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, return_max_logit=True, **kw), q, k, v)
        return o, mx, vjp((do.astype(o.dtype), jnp.zeros_like(mx)))
    return run(q, k, v, do)


def check(fn, q, k, v, do, tol_o, tol_grads, **kw):
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    o_ref, mx_ref, g_ref = outputs_and_grads(attention_reference, f32(q), f32(k), f32(v), f32(do), **kw)
    o, mx, g = outputs_and_grads(fn, q, k, v, do, **kw)
    assert o.dtype == v.dtype and o.shape == o_ref.shape
    assert error_ratio(o_ref, o) < tol_o
    finite = np.isfinite(np.asarray(mx_ref))
    assert np.array_equal(finite, np.isfinite(np.asarray(mx)))
    assert error_ratio(np.asarray(mx_ref)[finite], np.asarray(mx)[finite]) < 1e-5
    for name, a, b in zip(("dq", "dk", "dv"), g_ref, g):
        assert b.dtype == q.dtype and np.isfinite(np.asarray(b, np.float32)).all(), name
        assert error_ratio(a, b) < tol_grads, name


# Row 0: leading padding, two segments, a padding gap; row 1: one segment then trailing padding.
Q_SEG = segments([[(0, 3), (1, 20), (2, 11), (0, 2), (2, 1)], [(5, 30), (0, 7)]])  # T = 37
# Keys of a cache continued by those queries (q_offset 16): S = 53 = 16 cached + 37.
KV_SEG = segments([[(1, 10), (0, 3), (1, 23), (2, 17)], [(5, 46), (0, 7)]])

CASES = {
    # expanded MLA: Hkv == H, Dk != Dv, causal self-attention over packed segments with padding
    "expanded_segments": dict(shape=(2, 37, 37, 4, 4, 24, 16), kw=dict(q_segment_ids=Q_SEG)),
    # absorbed MLA: multi-query (Hkv = 1), a query chunk continuing a cache (S > T, q_offset > 0), kv segments
    "absorbed_cache": dict(shape=(2, 37, 53, 4, 1, 40, 32),
                           kw=dict(q_segment_ids=Q_SEG, kv_segment_ids=KV_SEG, q_offset=16)),
    # grouped heads, non-causal, no segments
    "grouped_noncausal": dict(shape=(1, 29, 45, 4, 2, 16, 24), kw=dict(causal=False)),
    # a per-row offset (traced), causal: rows continue caches of different lengths; with blocks 16 / 8 the last
    # positions of the query blocks (40, 56) are key-block starts, the edge of the causal loop bounds
    "per_row_offset": dict(shape=(2, 21, 50, 2, 1, 16, 16), kw=dict(q_offset=jnp.array([25, 1]))),
    # one decode token per row after caches of 49 and 30 keys (absorbed form)
    "decode": dict(shape=(2, 1, 50, 4, 1, 40, 32), kw=dict(q_offset=jnp.array([49, 30]))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blocked_float32_matches_reference(case):
    B, T, S, H, Hkv, Dk, Dv = CASES[case]["shape"]
    blocked = lambda *a, **kw: attention_blocked(*a, block_q=16, block_k=8, **kw)  # noqa: E731
    check(blocked, *make_inputs(B, T, S, H, Hkv, Dk, Dv), 1e-5, 1e-4, **CASES[case]["kw"])


def test_blocked_bfloat16_matches_reference():
    q, k, v, do = make_inputs(2, 37, 53, 4, 1, 40, 32, dtype=jnp.bfloat16)
    check(lambda *a, **kw: attention_blocked(*a, block_q=16, block_k=16, **kw), q, k, v, do, 5e-3, 8e-3,
          **CASES["absorbed_cache"]["kw"])


def test_default_blocks_follow_the_batch_and_lengths():
    """Wide batches of short rows get small blocks (down to 64), one long row keeps large ones; never above the
    defaults nor (rounded to 8) above T and S; and a block pair holds at most BLOCK_SCORE_ELEMS scores unless both
    blocks are at the floor."""
    assert default_blocks(32, 4, 256, 256) == (64, 64)       # the default training step
    assert default_blocks(1, 4, 4096, 4096) == (256, 256)
    assert default_blocks(1, 1, 65536, 65536) == (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)
    assert default_blocks(2, 4, 5, 37) == (5, 40)
    assert default_blocks(512, 64, 4096, 4096) == (MIN_AUTO_BLOCK, MIN_AUTO_BLOCK)
    for B, H, T, S in [(8, 4, 1024, 1024), (4, 32, 2048, 6000), (3, 7, 300, 900), (1, 4, 1, 50000)]:
        bq, bk = default_blocks(B, H, T, S)
        assert bq <= min(DEFAULT_BLOCK_Q, -(-T // 8) * 8) and bk <= min(DEFAULT_BLOCK_K, -(-S // 8) * 8)
        assert B * H * bq * bk <= BLOCK_SCORE_ELEMS or (bq, bk) == (MIN_AUTO_BLOCK, MIN_AUTO_BLOCK)


def test_blocked_default_blocks_match_reference():
    """Without block sizes the blocked form takes `default_blocks` (here 64 x 64 over T = 150: three query and key
    blocks, the last partial) and matches the reference, segments and a causal offset included."""
    B, T, H = 8, 150, 8
    assert default_blocks(B, H, T, T) == (64, 64)
    q_seg = jnp.where(jnp.arange(T) < 70, 1, 2)[None].repeat(B, 0).at[:, -5:].set(0)
    check(attention_blocked, *make_inputs(B, T, T, H, 2, 24, 16), 1e-5, 1e-4, q_segment_ids=q_seg)


def test_auto_on_cpu_is_the_blocked_form():
    q, k, v, do = make_inputs(2, 37, 37, 4, 4, 24, 16)
    check(attention, q, k, v, do, 1e-5, 1e-4, q_segment_ids=Q_SEG)
    text = jax.jit(lambda q, k, v: attention(q, k, v, q_segment_ids=Q_SEG)).lower(q, k, v).as_text()
    assert "custom_call" not in text


def test_padding_rows_give_zero_and_no_nan():
    """Padding queries, and a query whose segment has no key at or before it, output 0; gradients stay finite
    and padding keys get none."""
    q, k, v, do = make_inputs(1, 12, 12, 2, 1, 8, 8)
    q_seg = segments([[(0, 2), (3, 4), (4, 4), (0, 2)]])
    kv_seg = segments([[(3, 6), (0, 2), (4, 4)]])  # segment 4's keys start at 8: query 6, 7 (segment 4) see none
    for fn in (attention_reference, attention_blocked):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg), q, k, v)
        dq, dk, dv = vjp(do)
        dead = np.array([1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1], bool)
        assert np.all(np.asarray(o)[0, dead] == 0) and np.all(np.abs(np.asarray(o)[0, ~dead]) > 0)
        assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))
        assert np.all(np.asarray(dq)[0, dead] == 0)
        assert np.all(np.asarray(dk)[0, 6:8] == 0) and np.all(np.asarray(dv)[0, 6:8] == 0)


def test_block_skipping_follows_causality_and_segments():
    """Packed causal documents visit a block-diagonal band; every visible pair lies in a visited block."""
    T, bq, bk = 64, 8, 16
    seg = segments([[(1, 20), (2, 30), (3, 14)]])
    q_pos = jnp.arange(T, dtype=jnp.int32).reshape(T // bq, 1, bq)  # chunk-major [nq, B, bq]
    q_seg, k_seg = seg.reshape(T // bq, 1, bq), seg.reshape(T // bk, 1, bk)
    visit = np.asarray(visited_blocks(q_pos, q_seg, k_seg, causal=True))
    pos = np.arange(T)
    ids = np.asarray(seg)[0]
    visible = (ids[:, None] == ids[None, :]) & (pos[None, :] <= pos[:, None])
    needed = visible.reshape(T // bq, bq, T // bk, bk).any(axis=(1, 3))
    assert np.array_equal(visit, needed)  # exact here: segment ranges of these blocks overlap only where needed
    causal_only = sum(min((bq * i + bq - 1) // bk + 1, T // bk) for i in range(T // bq))
    assert visit.sum() == 13 and causal_only == 20
    both_ways = np.asarray(visited_blocks(q_pos, q_seg, k_seg, causal=False))
    assert both_ways.sum() > visit.sum() and not both_ways[0, 3] and not both_ways[7, 0]


def test_memory_is_linear_in_sequence_length():
    """XLA's own temp-buffer estimate of forward + backward at T = 4096 (one head): the reference holds [T, T]
    float32 score matrices, the blocked form a few blocks."""
    T = 4096
    spec = lambda d: jax.ShapeDtypeStruct((1, T, 1, d), jnp.float32)  # noqa: E731
    seg = jax.ShapeDtypeStruct((1, T), jnp.int32)

    def temp_bytes(fn):
        def fwd_bwd(q, k, v, s):
            return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, q_segment_ids=s)), (0, 1, 2))(q, k, v)
        compiled = jax.jit(fwd_bwd).lower(spec(48), spec(48), spec(32), seg).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = T * T * 4
    assert temp_bytes(attention_reference) >= scores
    assert temp_bytes(attention_blocked) < scores / 8


def test_max_logit_pass_alone():
    q, k, v, _ = make_inputs(2, 37, 53, 4, 1, 40, 32)
    kw = CASES["absorbed_cache"]["kw"]
    _, ref = attention_reference(q, k, v, return_max_logit=True, **kw)
    got = attention_max_logit(q, k, block_q=16, block_k=8, **kw)
    assert got.shape == (2, 4) and error_ratio(ref, got) < 1e-6


@pytest.mark.parametrize("case", ["absorbed_cache", "decode"])
def test_lse_matches_reference_and_has_gradients(case):
    """return_lse: the blocked form's log-sum-exp equals the reference's (-inf exactly where a query sees no key),
    and a loss that uses it (as merging partial attentions does) has the reference's gradients."""
    B, T, S, H, Hkv, Dk, Dv = CASES[case]["shape"]
    q, k, v, do = make_inputs(B, T, S, H, Hkv, Dk, Dv, seed=3)
    w = jax.random.normal(jax.random.key(4), (B, T, H))
    kw = CASES[case]["kw"]

    def run(fn):
        def loss(q, k, v):
            o, lse = fn(q, k, v, return_lse=True, **kw)
            return jnp.sum(o * do) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * w, 0.0)), lse
        (_, lse), g = jit_fast_compile(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
        return lse, g

    lse_ref, g_ref = run(attention_reference)
    lse, g = run(lambda *a, **k: attention_blocked(*a, block_q=16, block_k=8, **k))
    assert lse.shape == (B, T, H) and lse.dtype == jnp.float32
    finite = np.isfinite(np.asarray(lse_ref))
    assert np.array_equal(finite, np.isfinite(np.asarray(lse)))
    assert error_ratio(np.asarray(lse_ref)[finite], np.asarray(lse)[finite]) < 1e-6
    if case == "absorbed_cache":
        assert not finite.all()  # padding queries see nothing
    for name, a, b in zip(("dq", "dk", "dv"), g_ref, g):
        assert error_ratio(a, b) < 1e-4, name
    # "auto" gives the same (the XLA form on every platform when lse is asked for).
    o_auto, lse_auto = attention(q, k, v, return_lse=True, **kw)
    assert error_ratio(np.asarray(lse)[finite], np.asarray(lse_auto)[finite]) < 1e-6


def test_merging_two_partial_attentions_equals_one():
    """Attention over keys [0, S) equals the merge of attention over [0, 20) and over [20, S) by their
    log-sum-exps, including rows that see nothing in one part or in both."""
    q, k, v, _ = make_inputs(2, 9, 33, 4, 1, 16, 8, seed=5)
    q_seg = jnp.array([[1] * 7 + [0] * 2, [2] * 9], jnp.int32)
    kv_seg = jnp.array([[1] * 12 + [0] * 8 + [1] * 13, [3] * 20 + [2] * 13], jnp.int32)
    kw = dict(causal=False, q_segment_ids=q_seg)
    whole = attention_reference(q, k, v, kv_segment_ids=kv_seg, **kw)
    o1, lse1 = attention_blocked(q, k[:, :20], v[:, :20], kv_segment_ids=kv_seg[:, :20], return_lse=True, **kw)
    o2, lse2 = attention_blocked(q, k[:, 20:], v[:, 20:], kv_segment_ids=kv_seg[:, 20:], return_lse=True, **kw)
    assert not np.isfinite(np.asarray(lse1)[1]).any()  # row 1's segment 2 has no key in the first part
    o, lse = merge_attention(o1, lse1, o2, lse2)
    assert error_ratio(whole, o) < 1e-6
    np.testing.assert_array_equal(np.asarray(o)[0, 7:], 0.0)
    _, lse_whole = attention_reference(q, k, v, kv_segment_ids=kv_seg, return_lse=True, **kw)
    finite = np.isfinite(np.asarray(lse_whole))
    assert np.array_equal(finite, np.isfinite(np.asarray(lse)))
    assert error_ratio(np.asarray(lse_whole)[finite], np.asarray(lse)[finite]) < 1e-6


def latent_reference(q_lat, q_pe, ckv, kpe, lengths, scale, q_mask):
    """The absorbed form in float64 numpy, from the formula: scores over [c | k_pe], values c."""
    q_lat, q_pe, ckv, kpe = (np.asarray(a, np.float64) for a in (q_lat, q_pe, ckv, kpe))
    B, T, H, R = q_lat.shape
    o, lse = np.zeros((B, T, H, R)), np.full((B, T, H), -np.inf)
    for b in range(B):
        n = int(lengths[b])
        for t in range(T):
            if n == 0 or not q_mask[b, t]:
                continue
            s = (q_lat[b, t] @ ckv[b, :n].T + q_pe[b, t] @ kpe[b, :n].T) * scale  # [H, n]
            mx = s.max(-1, keepdims=True)
            e = np.exp(s - mx)
            o[b, t] = (e / e.sum(-1, keepdims=True)) @ ckv[b, :n]
            lse[b, t] = np.log(e.sum(-1)) + mx[:, 0]
    return o, lse


def latent_inputs(ks, B, T, H, R, P, N, S, dtype):
    """Random queries and a latent cache from keys ks[0..3]: q_lat [B, T, H, R], q_pe [B, T, H, P], ckv [N, S, R],
    kpe [N, S, P], in dtype."""
    return (jax.random.normal(ks[0], (B, T, H, R)).astype(dtype), jax.random.normal(ks[1], (B, T, H, P)).astype(dtype),
            jax.random.normal(ks[2], (N, S, R)).astype(dtype), jax.random.normal(ks[3], (N, S, P)).astype(dtype))


def assert_matches_latent_reference(o, lse, ref_o, ref_lse, tol, *, empty_row: int, masked_from: int):
    """o and lse equal the reference's within `tol` (error ratio); the row of length 0 (`empty_row`) and row 0's
    queries from `masked_from` on see no key: lse -inf and o 0 there. Returns where the reference's lse is finite."""
    assert error_ratio(ref_o, o) < tol
    finite = np.isfinite(ref_lse)
    assert np.array_equal(finite, np.isfinite(np.asarray(lse)))
    assert not finite[empty_row].any() and not finite[0, masked_from:].any()
    assert error_ratio(ref_lse[finite], np.asarray(lse)[finite]) < tol
    np.testing.assert_array_equal(np.asarray(o, np.float32)[empty_row], 0.0)
    return finite


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_latent_attention_matches_reference(dtype):
    """Query blocks of 2 over T = 5 (the last padded), key blocks of 8 over S = 37 (the last read from S - 8, its
    overlap not counted twice), rows with cached lengths 37, 20 and 0, queries that do not continue the cache."""
    ks = jax.random.split(jax.random.key(6), 4)
    B, T, H, R, P, S = 3, 5, 4, 16, 8, 37
    q_lat, q_pe, ckv, kpe = latent_inputs(ks, B, T, H, R, P, B, S, dtype)
    lengths = jnp.array([37, 20, 0], jnp.int32)
    q_mask = jnp.ones((B, T), bool).at[0, 3:].set(False)
    run = jit_fast_compile(lambda *a: latent_attention(*a, scale=0.2, q_mask=q_mask, block_q=2, block_k=8))
    o, lse = run(q_lat, q_pe, ckv, kpe, lengths)
    ref_o, ref_lse = latent_reference(q_lat, q_pe, ckv, kpe, lengths, 0.2, np.asarray(q_mask))
    assert o.dtype == dtype and lse.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert_matches_latent_reference(o, lse, ref_o, ref_lse, tol, empty_row=2, masked_from=3)


def test_latent_attention_gradients_and_blocks_past_the_lengths():
    """Plain autodiff through the block scan equals autodiff of the materialised form; a view padded far beyond
    the cached lengths gives the same result (its blocks are skipped)."""
    ks = jax.random.split(jax.random.key(7), 5)
    B, T, H, R, P, S = 2, 3, 2, 8, 4, 24
    args = [jax.random.normal(k, shape) for k, shape in
            zip(ks, ((B, T, H, R), (B, T, H, P), (B, S, R), (B, S, P)))]
    lengths = jnp.array([24, 9], jnp.int32)
    w = jax.random.normal(ks[4], (B, T, H, R))

    def materialised(q_lat, q_pe, ckv, kpe):
        s = (jnp.einsum("bthr,bsr->bths", q_lat, ckv) + jnp.einsum("bthp,bsp->bths", q_pe, kpe)) * 0.3
        s = jnp.where(jnp.arange(S)[None, None, None] < lengths[:, None, None, None], s, -jnp.inf)
        return jnp.einsum("bths,bsr->bthr", jax.nn.softmax(s, -1), ckv), jax.nn.logsumexp(s, -1)

    def loss(fn):
        def f(*a):
            o, lse = fn(*a)
            return jnp.sum(o * w) + jnp.sum(lse)
        return jax.jit(jax.grad(f, (0, 1, 2, 3)))(*args)

    blocked = lambda *a: latent_attention(*a, lengths, scale=0.3, block_q=2, block_k=5)  # noqa: E731
    for a, b in zip(loss(materialised), loss(blocked)):
        assert error_ratio(a, b) < 1e-5
    padded = [jnp.pad(a, ((0, 0), (0, 1000), (0, 0))) for a in args[2:]]
    o, lse = latent_attention(*args[:2], *args[2:], lengths, scale=0.3, block_k=5)
    o2, lse2 = latent_attention(*args[:2], *padded, lengths, scale=0.3, block_k=5)
    assert error_ratio(o, o2) < 1e-6 and error_ratio(lse, lse2) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decompressed_latent_attention_equals_the_absorbed_form(dtype):
    """The expanded form over a latent cache (blocks of 16 cached keys up-projected per head, the last block read
    from S - 16, blocks past the longest length skipped) equals latent_attention followed by W_UV: rows with
    cached lengths 37, 20 and 0, queries that do not continue the cache, a view padded far past the lengths."""
    ks = jax.random.split(jax.random.key(8), 6)
    B, T, H, n, P, R, dv, S = 3, 6, 4, 8, 4, 16, 12, 37
    q_nope = jax.random.normal(ks[0], (B, T, H, n)).astype(dtype)
    q_pe = jax.random.normal(ks[1], (B, T, H, P)).astype(dtype)
    ckv = jax.random.normal(ks[2], (B, S, R)).astype(dtype)
    kpe = jax.random.normal(ks[3], (B, S, P)).astype(dtype)
    w_uk = (jax.random.normal(ks[4], (H, n, R)) / 4).astype(dtype)
    w_uv = (jax.random.normal(ks[5], (H, R, dv)) / 4).astype(dtype)
    lengths = jnp.array([37, 20, 0], jnp.int32)
    q_mask = jnp.ones((B, T), bool).at[0, 4:].set(False)
    q_lat = jnp.einsum("bthn,hnr->bthr", q_nope.astype(jnp.float32), w_uk.astype(jnp.float32))
    ref_lat, ref_lse = latent_reference(q_lat, q_pe, ckv, kpe, lengths, 0.3, np.asarray(q_mask))
    ref_o = np.einsum("bthr,hrv->bthv", ref_lat, np.asarray(w_uv, np.float32))
    run = jit_fast_compile(lambda *a: decompressed_latent_attention(*a, w_uk, w_uv, scale=0.3, q_mask=q_mask,
                                                                    decompress_block=16, block_q=4, block_k=8))
    o, lse = run(q_nope, q_pe, ckv, kpe, lengths)
    assert o.shape == (B, T, H, dv) and o.dtype == dtype and lse.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    finite = assert_matches_latent_reference(o, lse, ref_o, ref_lse, tol, empty_row=2, masked_from=4)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 300), (0, 0)))  # noqa: E731
    o2, lse2 = run(q_nope, q_pe, pad(ckv), pad(kpe), lengths)
    assert error_ratio(o, o2) < tol and np.array_equal(np.isfinite(lse2), finite)
    # Rows of a 5-sequence cache read in place (cache_rows) equal the gathered view.
    rows = jnp.array([4, 1, 2], jnp.int32)
    big = lambda x: jnp.zeros((5,) + x.shape[1:], x.dtype).at[rows].set(x)  # noqa: E731
    o3, lse3 = jit_fast_compile(lambda *a: decompressed_latent_attention(
        *a, w_uk, w_uv, scale=0.3, q_mask=q_mask, cache_rows=rows, decompress_block=16, block_q=4, block_k=8))(
        q_nope, q_pe, big(ckv), big(kpe), lengths)
    assert error_ratio(o, o3) < 1e-6 and error_ratio(lse[finite], lse3[finite]) < 1e-6


def test_expanded_pays_off_at_kimi_linear_sizes():
    """At the 48B model's MLA sizes the expanded form is cheaper from 171 queries on (decode stays absorbed); when
    2R <= n + d_v (the tiny test configs) it never is."""
    kimi = dict(heads=32, nope_dim=128, rope_dim=64, v_dim=128, kv_lora_rank=512)
    assert [expanded_pays_off(t, **kimi) for t in (1, 170, 171, 8192)] == [False, False, True, True]
    assert not expanded_pays_off(8192, heads=2, nope_dim=16, rope_dim=8, v_dim=16, kv_lora_rank=16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_latent_attention_rows_reads_each_row_in_place_up_to_its_length(dtype):
    """The serving form over a slot cache of N = 5 sequences: rows mapped to slots 4, 0, 2 with lengths 37, 0, 20,
    one row's last queries masked, blocks of 2 queries and 8 keys (the last key block read from S - 8), garbage past
    every length. Equals the reference on the gathered rows and `latent_attention` on them; a row of length 0
    outputs zeros and lse -inf."""
    ks = jax.random.split(jax.random.key(8), 4)
    B, T, H, R, P, N, S = 3, 5, 4, 16, 8, 5, 37
    q_lat, q_pe, ckv, kpe = latent_inputs(ks, B, T, H, R, P, N, S, dtype)
    rows, lengths = jnp.array([4, 0, 2], jnp.int32), jnp.array([37, 0, 20], jnp.int32)
    # Whatever lies past a row's length never counts: a second cache with other garbage there.
    live = jnp.arange(S)[None, :, None] < jnp.zeros(N, jnp.int32).at[rows].set(lengths)[:, None, None]
    ckv2, kpe2 = jnp.where(live, ckv, 7 * ckv + 5), jnp.where(live, kpe, -3 * kpe)
    q_mask = jnp.ones((B, T), bool).at[0, 3:].set(False)
    run = jit_fast_compile(lambda *a: latent_attention_rows(*a, scale=0.2, q_mask=q_mask, cache_rows=rows,
                                                            block_q=2, block_k=8))
    o, lse = run(q_lat, q_pe, ckv, kpe, lengths)
    ref_o, ref_lse = latent_reference(q_lat, q_pe, ckv[rows], kpe[rows], lengths, 0.2, np.asarray(q_mask))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert o.dtype == dtype and lse.dtype == jnp.float32 and o.shape == (B, T, H, R)
    finite = assert_matches_latent_reference(o, lse, ref_o, ref_lse, tol, empty_row=1, masked_from=3)
    o2, lse2 = run(q_lat, q_pe, ckv2, kpe2, lengths)
    np.testing.assert_array_equal(np.asarray(o2, np.float32), np.asarray(o, np.float32))
    np.testing.assert_array_equal(np.asarray(lse2), np.asarray(lse))
    # The same blocks as the gathered-view form, so the same numbers up to summation order.
    o3, lse3 = latent_attention(q_lat, q_pe, ckv[rows], kpe[rows], lengths, scale=0.2, q_mask=q_mask, block_q=2,
                                block_k=8)
    assert error_ratio(o3, o) < tol and error_ratio(np.asarray(lse3)[finite], np.asarray(lse)[finite]) < tol
    with pytest.raises(ValueError, match="cache_rows must be int"):
        latent_attention_rows(q_lat, q_pe, ckv, kpe, lengths, scale=0.2, cache_rows=rows[:2])
    with pytest.raises(ValueError, match=r"ckv must be \[B=3"):
        latent_attention_rows(q_lat, q_pe, ckv, kpe, lengths, scale=0.2)  # N = 5 slots need cache_rows


@pytest.mark.parametrize("kernel", ["splash", "triton"])
def test_interpreted_kernels_match_reference(kernel):
    """The kernel wrappers (scale, padding to blocks, segment ids, zeroed padding rows, v padding) on CPU."""
    if kernel == "splash":  # absorbed MLA continuing a cache: splash's MQA form with a static causal offset
        fn, args, kw = attention_splash, make_inputs(2, 37, 53, 4, 1, 40, 32), CASES["absorbed_cache"]["kw"]
    else:  # expanded MLA self-attention over packed segments: Dv < Dk is padded for the kernel
        fn, args, kw = attention_triton, make_inputs(2, 37, 37, 4, 4, 24, 16), CASES["expanded_segments"]["kw"]
    q, k, v, do = args
    o_ref, vjp_ref = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kw), q, k, v)
    o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    assert error_ratio(o_ref, o) < 1e-5
    for a, b in zip(vjp_ref(do), vjp(do)):
        assert error_ratio(a, b) < 1e-4


def _specs(B, T, S, H, Hkv, Dk, Dv):
    s = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    return s(B, T, H, Dk), s(B, S, Hkv, Dk), s(B, S, Hkv, Dv), s(B, T, dt=jnp.int32), s(B, S, dt=jnp.int32)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_auto_lowers_to_the_kernels(platform):
    """Expanded MLA self-attention (H = Hkv, Dk 192, Dv 128, one segment array) lowers to splash on TPU (forward;
    fused backward) and to Triton on GPU (forward; backward preprocess + kernel). Absorbed MLA (Hkv = 1, 576 / 512)
    continuing a cache lowers to splash on TPU and falls back to the XLA form on GPU; a traced offset falls back on
    both. max_logit, requested throughout, never changes the choice."""
    def fwd_bwd(q_offset):
        def run(q, k, v, q_seg, kv_seg=None):
            def loss(q, k, v):
                o, mx = attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=q_offset,
                                  return_max_logit=True)
                return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(mx), mx, 0.0))
            return jax.grad(loss, (0, 1, 2))(q, k, v)
        return run

    def fwd(q, k, v, q_seg):
        return attention(q, k, v, q_segment_ids=q_seg)

    expanded = _specs(1, 200, 200, 4, 4, 192, 128)[:4]
    kernels = {"tpu": (1, 2), "cuda": (1, 3)}[platform]
    assert count_pallas_kernels(fwd, expanded, platform) == kernels[0]
    assert count_pallas_kernels(fwd_bwd(0), expanded, platform) == kernels[1]
    absorbed = _specs(1, 64, 200, 4, 1, 576, 512)
    assert count_pallas_kernels(fwd_bwd(136), absorbed, platform) == {"tpu": 2, "cuda": 0}[platform]
    assert count_pallas_kernels(fwd_bwd(jnp.array([136])), absorbed, platform) == 0


def test_bad_arguments_raise():
    q, k, v, _ = make_inputs(1, 8, 8, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="Hkv=3 must divide"):
        attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="kv_segment_ids was given without q_segment_ids"):
        attention(q, k, v, kv_segment_ids=jnp.ones((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="kv_segment_ids is required"):
        attention(q, k[:, :5], v[:, :5], q_segment_ids=jnp.ones((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="q_offset must be an int"):
        attention(q, k, v, q_offset=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        attention_blocked(q, k, v, block_k=0)
    with pytest.raises(ValueError, match="q_offset must be a Python int >= 0"):
        attention_splash(q, k, v, q_offset=jnp.array(2))
    with pytest.raises(ValueError, match="attention_triton: needs self-attention with equal head counts"):
        attention_triton(q, k, v)
    with pytest.raises(ValueError, match="v must be"):
        attention_reference(q, k, v[:, :7])
    with pytest.raises(ValueError, match="cannot return the log-sum-exp"):
        attention(q, k, v, impl="splash", return_lse=True)
    lat = jnp.zeros((1, 8, 4, 16)), jnp.zeros((1, 8, 4, 4))
    with pytest.raises(ValueError, match="ckv must be"):
        latent_attention(*lat, jnp.zeros((1, 5, 8)), jnp.zeros((1, 5, 4)), jnp.ones(1, jnp.int32), scale=1.0)
    with pytest.raises(ValueError, match="kv_lengths must be"):
        latent_attention(*lat, jnp.zeros((1, 5, 16)), jnp.zeros((1, 5, 4)), jnp.ones(2, jnp.int32), scale=1.0)
    with pytest.raises(ValueError, match="q_mask must be"):
        latent_attention(*lat, jnp.zeros((1, 5, 16)), jnp.zeros((1, 5, 4)), jnp.ones(1, jnp.int32), scale=1.0,
                         q_mask=jnp.ones((1, 8), jnp.int32))


def _paged(ckv, kpe, lengths, page_size, num_pages, seed, shared=None):
    """The rows of a contiguous cache (ckv [B, S, R], kpe [B, S, P]) scattered over a shuffled pool [2, num_pages,
    page_size, R + P] (MLA layer 1 holds them, layer 0 garbage; free pages hold NaN), each row's pages out of order
    and not contiguous; `shared`: (row a, row b, logical pages k) make row b's first k pages row a's (the rows must
    agree there). Returns (pool, page_table int32 [B, max_pages], -1 past each row's pages)."""
    B, S, R = ckv.shape
    M = -(-S // page_size)
    rng = np.random.default_rng(seed)
    order = iter(rng.permutation(num_pages).tolist())
    pool = np.full((2, num_pages, page_size, R + kpe.shape[-1]), np.nan, np.float32)
    pool[0] = rng.normal(size=pool.shape[1:])
    table = np.full((B, M), -1, np.int32)
    data = np.concatenate([np.asarray(ckv, np.float32), np.asarray(kpe, np.float32)], -1)
    data = np.pad(data, ((0, 0), (0, M * page_size - S), (0, 0)))
    for b in range(B):
        for j in range(-(-int(lengths[b]) // page_size)):
            if shared is not None and b == shared[1] and j < shared[2]:
                table[b, j] = table[shared[0], j]
                continue
            table[b, j] = next(order)
            pool[1, table[b, j]] = data[b, j * page_size:(j + 1) * page_size]
            pool[1, table[b, j], max(0, int(lengths[b]) - j * page_size):] = np.nan  # stale past the length
    return jnp.asarray(pool, ckv.dtype), jnp.asarray(table)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_latent_attention_rows_reads_a_paged_pool_through_the_page_table(dtype):
    """The serving form over a paged pool: rows of lengths 37, 0, 20 and 21 (not multiples of the 8-token page;
    a length-0 row) whose pages are shuffled, out of order and not contiguous, rows 3 and 2 sharing their first two
    pages, NaN in every free page and past every length. Equals the contiguous read bit for bit in structure
    (same blocks: tolerance of summation order only), and the expanded form reads the pool too."""
    ks = jax.random.split(jax.random.key(9), 6)
    B, T, H, R, P, S, ps = 4, 5, 4, 16, 8, 40, 8
    q_lat, q_pe, ckv, kpe = latent_inputs(ks, B, T, H, R, P, B, S, dtype)
    ckv, kpe = ckv.at[3, :16].set(ckv[2, :16]), kpe.at[3, :16].set(kpe[2, :16])  # rows 2 and 3 share 16 tokens
    lengths = jnp.array([37, 0, 20, 21], jnp.int32)
    q_mask = jnp.ones((B, T), bool).at[0, 3:].set(False)
    pool, table = _paged(ckv, kpe, lengths, ps, 24, seed=1, shared=(2, 3, 2))
    assert int(table[3, 0]) == int(table[2, 0]) and int(table[3, 1]) == int(table[2, 1])
    kw = dict(scale=0.2, q_mask=q_mask, block_q=2, block_k=16)
    o, lse = jit_fast_compile(lambda *a: latent_attention_rows(*a, **kw))(q_lat, q_pe, ckv, kpe, lengths)
    o_p, lse_p = jit_fast_compile(lambda ql, qp, pool, t, n: latent_attention_rows(
        ql, qp, pool, None, n, page_table=t, layer=1, **kw))(q_lat, q_pe, pool, table, lengths)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    finite = np.isfinite(np.asarray(lse))
    assert np.isfinite(np.asarray(o_p, np.float32)).all() and np.array_equal(finite, np.isfinite(np.asarray(lse_p)))
    assert error_ratio(o, o_p) < tol and error_ratio(np.asarray(lse)[finite], np.asarray(lse_p)[finite]) < tol
    np.testing.assert_array_equal(np.asarray(o_p, np.float32)[1], 0.0)
    # A block size that is not a multiple of the page is rounded down to whole pages (12 -> 8): same result.
    o_p2, _ = jit_fast_compile(lambda ql, qp, pool, t, n: latent_attention_rows(
        ql, qp, pool, None, n, page_table=t, layer=1, scale=0.2, q_mask=q_mask, block_q=2, block_k=12))(
        q_lat, q_pe, pool, table, lengths)
    assert error_ratio(o, o_p2) < tol
    # The expanded form (decompress blocks of 16 keys = 2 pages) reads the same pool.
    w_uk = (jax.random.normal(ks[4], (H, 8, R)) / 4).astype(dtype)
    w_uv = (jax.random.normal(ks[5], (H, R, 12)) / 4).astype(dtype)
    q_nope = jax.random.normal(ks[0], (B, T, H, 8)).astype(dtype)
    dk = dict(scale=0.3, q_mask=q_mask, decompress_block=16, block_q=4, block_k=8)
    e, _ = jit_fast_compile(lambda *a: decompressed_latent_attention(*a, w_uk, w_uv, **dk))(
        q_nope, q_pe, ckv, kpe, lengths)
    e_p, _ = jit_fast_compile(lambda qn, qp, pool, t, n: decompressed_latent_attention(
        qn, qp, pool, None, n, w_uk, w_uv, page_table=t, layer=1, **dk))(q_nope, q_pe, pool, table, lengths)
    assert np.isfinite(np.asarray(e_p, np.float32)).all() and error_ratio(e, e_p) < tol
    with pytest.raises(ValueError, match="page_table must be int"):
        latent_attention_rows(q_lat, q_pe, pool, None, lengths, page_table=table[:2], layer=1, scale=0.2)
    with pytest.raises(ValueError, match="needs layer"):
        latent_attention_rows(q_lat, q_pe, pool, None, lengths, page_table=table, scale=0.2)
    with pytest.raises(ValueError, match="page pool"):
        latent_attention_rows(q_lat, q_pe, pool, kpe, lengths, page_table=table, layer=1, scale=0.2)

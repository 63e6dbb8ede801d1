"""The paged MLA latent pool: gather / scatter against a dense slot cache, copy-on-write of shared partial pages,
refcounts, exhaustion, and one compilation per shape whatever the page tables hold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import load_config
from k2jax.serving import page_pool as pp
from k2jax.serving.cache import cache_bytes_per_sequence
from k2jax.serving.page_pool import NO_PAGE, PageAllocator, PagePoolExhausted, PageTables

PS = 4  # tokens per page
B, MAX_LEN = 3, 24


def _config(dtype="float32"):
    # Two MLA layers (the pool's leading dim), one KDA layer.
    return load_config("tiny", num_hidden_layers=3, kda_layers=(2,), full_attn_layers=(1, 3), dtype=dtype)


class Jitted:
    """scatter (pool donated), gather (all layers and one layer) and copy, each counting its compilations."""

    def __init__(self):
        self.compiles = 0

        def counted(fn):
            def run(*args, **kwargs):
                self.compiles += 1
                return fn(*args, **kwargs)
            return run

        self.scatter = jax.jit(counted(pp.scatter_pages), donate_argnums=(0,))
        self.gather = jax.jit(counted(pp.gather_pages), static_argnames=("kv_len", "layer"))
        self.copy = jax.jit(counted(pp.copy_pages), donate_argnums=(0,))


def test_sizes_follow_the_config():
    cfg = _config("bfloat16")
    pool = pp.init_latent_pages(cfg, 5, PS)
    assert pool.shape == (2, 5, PS, cfg.kv_lora_rank + cfg.qk_rope_head_dim) and pool.dtype == jnp.bfloat16
    assert pp.page_bytes(cfg, PS) == pool.nbytes // 5
    # Per token, the pool stores exactly what the dense slot cache stores for the MLA layers.
    kda_only = cache_bytes_per_sequence(cfg, 0)
    assert pp.page_bytes(cfg, PS) == cache_bytes_per_sequence(cfg, PS) - kda_only
    with pytest.raises(ValueError, match="no MLA layer"):
        pp.init_latent_pages(load_config("tiny", num_hidden_layers=1, kda_layers=(1,), full_attn_layers=()), 4, PS)


def test_gather_scatter_equal_a_dense_cache_through_shuffled_pages():
    """Rows grow by prefill chunks and decode steps, their pages drawn in shuffled order from one pool; every
    gather equals the dense [B, max_len] cache holding the same writes, zero past each row's length, and a page
    table entry NO_PAGE drops the write. Shapes stay fixed, so each program compiles once."""
    cfg, rng, j = _config(), np.random.default_rng(0), Jitted()
    L, D = 2, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    pool = pp.init_latent_pages(cfg, 32, PS)
    # A pool that held other data: stale values must never show through a gather.
    pool = pool + jnp.asarray(rng.standard_normal(pool.shape), pool.dtype)
    dense = np.zeros((L, B, MAX_LEN, D), np.float32)
    free = list(rng.permutation(32))
    table = np.full((B, MAX_LEN // PS), NO_PAGE, np.int32)
    lengths = np.zeros(B, np.int32)
    T = 5
    for step in range(8):
        grow = rng.integers(1, T + 1, B) if step % 2 == 0 else np.ones(B, np.int64)  # a chunk, then a decode step
        grow = np.minimum(grow, MAX_LEN - lengths)
        positions = lengths[:, None] + np.arange(T)[None, :]
        valid = np.arange(T)[None, :] < grow[:, None]
        for b in range(B):  # give each row the pages its new positions need
            for logical in range(pp.pages_for(lengths[b] + grow[b], PS)):
                if table[b, logical] == NO_PAGE:
                    table[b, logical] = free.pop()
        entries = rng.standard_normal((L, B, T, D)).astype(np.float32)
        pool = j.scatter(pool, table, positions.astype(np.int32), entries, valid)
        for b in range(B):
            n = int(grow[b])
            dense[:, b, lengths[b]:lengths[b] + n] = entries[:, b, :n]
        lengths = lengths + grow.astype(np.int32)
        for kv_len in (8, MAX_LEN):
            got = np.asarray(j.gather(pool, table, lengths, kv_len=kv_len))
            want = dense[:, :, :kv_len] * (np.arange(kv_len)[None, :] < lengths[:, None])[None, :, :, None]
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(np.asarray(j.gather(pool, table, lengths, kv_len=kv_len, layer=1)), want[1])
    assert j.compiles == 1 + 2 * 2  # one scatter, gathers for two kv_len x {all layers, one layer}
    # A write to a logical page the row does not have is dropped, not sent to some other page.
    before = np.asarray(pool)
    row = np.full((B, MAX_LEN // PS), NO_PAGE, np.int32)
    pool = j.scatter(pool, row, np.zeros((B, T), np.int32), np.ones((L, B, T, D), np.float32), np.ones((B, T), bool))
    np.testing.assert_array_equal(np.asarray(pool), before)
    assert j.compiles == 5


def test_gather_and_scatter_reject_bad_shapes():
    cfg = _config()
    pool = pp.init_latent_pages(cfg, 8, PS)
    table = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match="kv_len=16 needs 4 pages"):
        pp.gather_pages(pool, table, np.ones(2, np.int32), 16)
    with pytest.raises(ValueError, match="layer=2"):
        pp.gather_pages(pool, table, np.ones(2, np.int32), 8, layer=2)
    with pytest.raises(ValueError, match="entries must be"):
        pp.scatter_pages(pool, table, np.zeros((2, 1), np.int32), np.zeros((2, 2, 2, 24)), np.ones((2, 1), bool))


def test_allocator_refcounts_exhaustion_and_bad_ids():
    a = PageAllocator(4, PS)
    p = a.alloc(3)
    assert p == [0, 1, 2] and a.num_free == 1 and a.num_used == 3
    a.incref([0, 0, 1])
    assert [a.refcount(i) for i in range(4)] == [3, 2, 1, 0]
    with pytest.raises(PagePoolExhausted, match="1 free pages of 4, 2 were requested"):
        a.alloc(2)
    assert a.num_free == 1  # nothing was taken
    assert a.decref([2]) == [2] and a.decref([0, 0]) == [] and a.decref([0, 1, 1]) == [0, 1]
    assert a.num_free == 4
    with pytest.raises(ValueError, match="would drop below zero"):
        a.decref([3])
    with pytest.raises(ValueError, match="are free"):
        a.incref([1])
    with pytest.raises(ValueError, match=r"page id 9 is invalid: must be an integer in \[0, num_pages=4\)"):
        a.decref([9])
    with pytest.raises(ValueError, match="positive"):
        PageAllocator(0, PS)


def test_page_tables_grow_release_and_stay_atomic_when_the_pool_runs_out():
    a = PageAllocator(5, PS)
    t = PageTables(a, 2, MAX_LEN)
    assert t.reserve(0, 9) == [0, 1, 2] and t.num_tokens(0) == 9
    np.testing.assert_array_equal(t.table[0], [0, 1, 2, -1, -1, -1])
    with pytest.raises(PagePoolExhausted):
        t.reserve(1, 12)  # needs 3, 2 are free
    assert a.num_free == 2 and t.pages(1) == [] and (t.table[1] == NO_PAGE).all()
    assert t.reserve(0, 12) == [] and t.num_tokens(0) == 12  # the last page fills up, no new page
    assert sorted(t.release(0)) == [0, 1, 2] and a.num_free == 5 and (t.table[0] == NO_PAGE).all()
    with pytest.raises(ValueError, match="exceed max_len"):
        t.reserve(0, MAX_LEN + 1)


def test_a_shared_partial_page_is_appended_in_place_once_then_copied():
    """Sequence A (10 tokens: its last page holds 2) ends and leaves its pages to a holder (the prefix cache).
    B resumes at 10: nobody wrote past 10 in that page, so B appends in place with no copy. C resumes at 10 too:
    B owns the page's tail, so C gets a private copy. The holder's 10 tokens are never changed, and B and C each
    read their own continuation."""
    cfg, j = _config(), Jitted()
    L, D = 2, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    a = PageAllocator(8, PS)
    t = PageTables(a, 3, MAX_LEN)
    pool = pp.init_latent_pages(cfg, 8, PS)

    def write(pool, slot, start, n, value):
        t.reserve(slot, start + n)
        table = t.table[slot:slot + 1]
        pos = (start + np.arange(n, dtype=np.int32))[None]
        ent = np.full((L, 1, n, D), value, np.float32) + np.arange(n, dtype=np.float32)[None, None, :, None]
        return j.scatter(pool, table, pos, ent, np.ones((1, n), bool))

    def read(pool, pages, n):
        table = np.array([pages + [NO_PAGE] * (MAX_LEN // PS - len(pages))], np.int32)
        return np.asarray(j.gather(pool, table, np.array([n], np.int32), kv_len=MAX_LEN))[:, 0, :n, 0]

    pool = write(pool, 0, 0, 10, 100.0)
    held = t.pages(0)
    a.incref(held)  # the prefix cache's references
    t.release(0)
    assert a.refcount(held[-1]) == 1
    assert t.attach(1, held, 10) == []  # in place
    assert t.pages(1) == held and a.refcount(held[-1]) == 2
    pool = write(pool, 1, 10, 5, 200.0)
    copies = t.attach(2, held, 10)
    assert len(copies) == 1 and copies[0][0] == held[-1]
    src, dst = copies[0]
    assert t.pages(2)[:-1] == held[:-1] and t.pages(2)[-1] == dst and a.refcount(dst) == 1
    pool = j.copy(pool, np.array([src, -1], np.int32), np.array([dst, -1], np.int32))  # padded with a skipped pair
    pool = write(pool, 2, 10, 3, 300.0)
    np.testing.assert_array_equal(read(pool, held, 10), np.broadcast_to(100.0 + np.arange(10), (L, 10)))
    np.testing.assert_array_equal(read(pool, t.pages(1), 15)[:, 10:], np.broadcast_to(200.0 + np.arange(5), (L, 5)))
    np.testing.assert_array_equal(read(pool, t.pages(2), 13)[:, :10], read(pool, held, 10))
    np.testing.assert_array_equal(read(pool, t.pages(2), 13)[:, 10:], np.broadcast_to(300.0 + np.arange(3), (L, 3)))
    # B ends at 15, its tail released there; a sequence resuming at 15 from B's pages appends in place again.
    b_pages = t.pages(1)
    a.incref(b_pages)
    t.release(1)
    assert t.attach(0, b_pages, 15) == []
    # An attach that needs a copy when no page is free takes nothing.
    t.release(0)
    t.reserve(1, PS * a.num_free)
    refs = [a.refcount(p) for p in range(8)]
    with pytest.raises(PagePoolExhausted):
        t.attach(0, held, 10)
    assert t.pages(0) == [] and [a.refcount(p) for p in range(8)] == refs


def test_claim_and_release_tail_check_ownership():
    a = PageAllocator(2, PS)
    (p,) = a.alloc(1)
    assert not a.claim_tail(p, 2)  # a fresh page's tail belongs to whoever allocated it
    a.release_tail(p, 2)
    with pytest.raises(ValueError, match="the tail of page 0 is not owned"):
        a.release_tail(p, 2)
    assert a.claim_tail(p, 2) and not a.claim_tail(p, 2)
    a.decref([p])
    with pytest.raises(ValueError, match="is free"):
        a.claim_tail(p, 1)

"""The prefix cache wired into the engine: greedy outputs identical with the cache on and off for conversations
that continue, branch, are evicted and run concurrently (f32 and bf16, the hybrid KDA + MLA config), the cached
token counts, snapshots inside long prefills, no compilation after warm-up; sessions sharing a prefix hold its
pages once, and a pool too small for every request at once preempts and recomputes exactly."""

import functools

import numpy as np
import pytest
from flax import nnx

from k2jax import KimiLinear, load_config
from k2jax.serving.prefix_store import PrefixStore
from k2jax.serving.scheduler import Engine, SamplingParams
from k2jax.serving.state_store import snapshot_bytes
from k2jax.sharding import make_mesh, shard_model
from k2jax.tokenizer import ByteTokenizer

MAX_LEN = 64
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def hybrid_config(dtype):
    """The serving tests' 2-layer hybrid (KDA layer 1, MLA layer 2, MoE) in `dtype`."""
    return load_config("tiny", vocab_size=264, num_hidden_layers=2, kda_layers=(1,), full_attn_layers=(2,),
                       dtype=dtype)


def make_engine(model, prefix_cache_bytes, **kw):
    """4 slots, context 64, buckets 16 / 32 / 64, pieces of at most 32 tokens, the byte tokenizer."""
    opts = dict(num_slots=4, max_len=MAX_LEN, min_bucket=16, max_prefill_batch=2, max_prefill_tokens=32,
                prefix_cache_bytes=prefix_cache_bytes, prefix_page_size=8, snapshot_every=1024)
    return Engine(model, ByteTokenizer(), **{**opts, **kw})


def _tokens(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(8, 264, n)]


@functools.cache
def engine_pair(dtype):
    """(cache on, cache off) engines over one model; the tests share them (compiling is most of their cost)."""
    model = KimiLinear(hybrid_config(dtype), rngs=nnx.Rngs(0))
    on, off = make_engine(model, 1 << 20), make_engine(model, 0)
    on.warmup()
    return on, off


@pytest.fixture(params=["float32", "bfloat16"])
def engines(request):
    return engine_pair(request.param)


def _run(engine, prompts):
    return [(c.token_ids, c.cached_tokens) for c in engine.generate(prompts, GREEDY)]


def test_conversations_continue_branch_and_run_concurrently(engines):
    on, off = engines
    compiles = (on.runner.compile_count, on.prefix.compile_count, on.prefix.snapshots.compile_count)
    system = _tokens(0, 20)

    # A conversation: turn 2 extends turn 1 and its generation; it resumes where turn 1 ended.
    turn1 = system + _tokens(1, 5)
    (gen1, cached1), = _run(on, [turn1])
    assert cached1 == 0 and (gen1, 0) == _run(off, [turn1])[0]
    turn2 = turn1 + gen1 + _tokens(2, 7)
    (gen2, cached2), = _run(on, [turn2])
    assert cached2 == len(turn1) + len(gen1) - 1  # everything turn 1 fed through the model
    assert gen2 == _run(off, [turn2])[0][0]

    # A branch from inside turn 1's prompt: no snapshot there yet, so it prefills from scratch but stops to
    # snapshot where it leaves the cached path; the next branch from that point resumes there.
    branch_a = system + _tokens(3, 9)
    (gen_a, cached_a), = _run(on, [branch_a])
    assert cached_a == 0 and gen_a == _run(off, [branch_a])[0][0]
    branch_b = system + _tokens(4, 11)
    (gen_b, cached_b), = _run(on, [branch_b])
    assert cached_b == len(system) and gen_b == _run(off, [branch_b])[0][0]

    # Concurrent requests on one prefix (and the turn-2 history), admitted in one step.
    prompts = [system + _tokens(10 + i, 6 + i) for i in range(3)] + [turn2 + gen2 + _tokens(20, 4)]
    got = _run(on, prompts)
    want = _run(off, prompts)
    assert [g for g, _ in got] == [w for w, _ in want]
    assert [c for _, c in got] == [len(system)] * 3 + [len(turn2) + len(gen2) - 1]

    stats = on.prefix_stats()
    assert stats["hits"] >= 5 and stats["cached_tokens"] >= cached2 + 3 * len(system)
    assert 0 < stats["bytes_in_use"] <= stats["budget_bytes"]
    on.prefix.tree.check_consistency()
    assert (on.runner.compile_count, on.prefix.compile_count, on.prefix.snapshots.compile_count) == compiles


def test_eviction_under_a_tiny_budget_recomputes_exactly():
    """A budget of about one sequence: conversations evict each other, every output still equals the cache-off
    one, and the bytes in use stay within the budget."""
    on, off = engine_pair("float32")
    budget = 5 * on.prefix.page_bytes + on.prefix.snapshots.nbytes_per_snapshot  # 40 tokens and one snapshot
    on.prefix.tree.clear()  # the two stores share the runner's pool: only one may hold pages
    roomy, on.prefix = on.prefix, PrefixStore(on.runner, budget)
    try:
        _conversations_round_robin(on, off, budget)
    finally:
        on.prefix.tree.clear()
        on.prefix = roomy


def _conversations_round_robin(on, off, budget):
    histories = {k: _tokens(100 + k, 12) for k in range(3)}
    for turn in range(3):
        for k in range(3):  # round robin: each conversation's turn evicts the others' prefixes
            (gen, _), = _run(on, [histories[k]])
            assert gen == _run(off, [histories[k]])[0][0], (turn, k)
            histories[k] = histories[k] + gen + _tokens(200 + 10 * turn + k, 3)
            assert on.prefix_stats()["bytes_in_use"] <= budget
            on.prefix.tree.check_consistency()
    stats = on.prefix_stats()
    assert stats["evicted_nodes"] > 0 and stats["misses"] > 3  # later turns were recomputed


def test_long_prefills_snapshot_every_n_tokens():
    """A prompt prefilled in pieces caches its prefix every snapshot_every tokens, so a second prompt sharing
    the first 36 tokens resumes at 32 (the last multiple of 16 within the shared part) and matches the cache-off
    output."""
    on, off = engine_pair("float32")
    on.snapshot_every = 16
    try:
        _shared_long_prefix(on, off)
    finally:
        on.snapshot_every = 1024


def _shared_long_prefix(on, off):
    shared = _tokens(300, 36)
    first, second = shared + _tokens(301, 10), shared + _tokens(302, 8)
    (gen, cached), = _run(on, [first])
    assert cached == 0 and gen == _run(off, [first])[0][0]
    (gen, cached), = _run(on, [second])
    assert cached == 32 and gen == _run(off, [second])[0][0]


def test_prefix_cache_settings_are_checked():
    model = KimiLinear(hybrid_config("float32"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="prefix_cache_bytes=-1 must be >= 0"):
        make_engine(model, -1)
    with pytest.raises(ValueError, match="snapshot_every=0"):
        make_engine(model, 1 << 20, snapshot_every=0)


def test_an_all_mla_model_resumes_anywhere_without_snapshots():
    """Kimi K2's case (every layer MLA): no snapshot store; a request resumes at any cached token count, even
    inside a cached edge, and greedy outputs equal the cache-off ones."""
    cfg = load_config("tiny", vocab_size=264, num_hidden_layers=1, kda_layers=(), full_attn_layers=(1,))
    model = KimiLinear(cfg, rngs=nnx.Rngs(3))
    on, off = make_engine(model, 1 << 20), make_engine(model, 0)
    assert on.prefix.snapshots is None and not on.prefix.hybrid
    turn1 = _tokens(400, 20)
    (gen1, cached1), = _run(on, [turn1])
    turn2 = turn1 + gen1 + _tokens(401, 5)
    branch = turn1[:13] + _tokens(402, 6)  # leaves the cached path mid-edge: resumes at 13 all the same
    got = _run(on, [turn2]) + _run(on, [branch])
    assert cached1 == 0 and [c for _, c in got] == [len(turn1) + len(gen1) - 1, 13]
    assert [g for g, _ in got] == [w for w, _ in _run(off, [turn2]) + _run(off, [branch])]
    assert gen1 == _run(off, [turn1])[0][0]


def test_a_sharded_engine_resumes_with_the_cache_sharded_as_before():
    """On a mesh (8 CPU devices: data 2 x expert 2 x tensor 2) a resumed conversation equals the single-device,
    cache-off output, and the slot cache keeps its sharding through the prefix copies."""
    _, off = engine_pair("float32")
    mesh = make_mesh({"data": -1, "expert": 2, "tensor": 2})
    model = shard_model(KimiLinear(hybrid_config("float32"), rngs=nnx.Rngs(0)), mesh)
    on = make_engine(model, 1 << 20, mesh=mesh)
    spec = on.runner.cache.layers[0].recurrent.sharding.spec
    turn1 = _tokens(500, 20)
    (gen1, _), = _run(on, [turn1])
    turn2 = turn1 + gen1 + _tokens(501, 5)
    (gen2, cached2), = _run(on, [turn2])
    assert cached2 == len(turn1) + len(gen1) - 1
    assert [gen1, gen2] == [_run(off, [turn1])[0][0], _run(off, [turn2])[0][0]]
    assert on.runner.cache.layers[0].recurrent.sharding.spec == spec and spec[1] == "tensor"


def _step_until(engine, done, limit=200):
    for _ in range(limit):
        if done():
            return
        engine.step()
    raise AssertionError("the engine did not get there")


def test_sessions_sharing_a_system_prompt_hold_its_pages_once(engines):
    """4 concurrent sessions (every slot) on one cached 40-token system prompt (5 pages of 8): while they decode,
    every slot's first 5 page-table entries are the same physical pages, which the tree holds too, so the live
    slots hold 5 + their own pages instead of 4 x 5 + theirs; outputs equal the cache-off ones; at the end only
    the tree's pages are in use."""
    on, off = engines
    system = _tokens(600, 40)
    for k in range(2):  # the second request stops to snapshot at 40, where it leaves the first one's path
        _run(on, [system + _tokens(601 + k, 3)])
    prompts = [system + _tokens(610 + i, 4 + i) for i in range(4)]
    reqs = [on.submit(p, GREEDY) for p in prompts]
    _step_until(on, lambda: all(r.decoding for r in reqs))
    tables = [on.runner.tables.pages(r.slot) for r in reqs]
    shared = tables[0][:5]
    assert all(t[:5] == shared for t in tables) and len({t[5] for t in tables}) == 4
    assert set(shared) <= on.prefix.tree_pages()
    pool = on.pool_stats()
    own = sum(len(t) - 5 for t in tables)
    assert pool["pages_slots"] == 5 + own and pool["pages_shared"] >= 5
    assert pool["pages_free"] == pool["pages_total"] - len(on.prefix.tree_pages() | {p for t in tables for p in t})
    _step_until(on, lambda: all(r.finished for r in reqs))
    assert [r.completion().token_ids for r in reqs] == [g for g, _ in _run(off, prompts)]
    assert [r.completion().cached_tokens for r in reqs] == [40] * 4
    pool = on.pool_stats()
    assert pool["pages_slots"] == 0 and pool["pages_total"] - pool["pages_free"] == pool["pages_tree"]
    on.prefix.tree.check_consistency()


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_a_full_pool_preempts_the_latest_request_and_recomputes_it_exactly(prefix_cache):
    """A pool of one context (8 pages of 8 tokens) for 3 requests of 20-odd prompt + 26 generated tokens: growing
    slots run out of pages, the most recently admitted request is preempted, requeued at the front and
    recomputed from its prompt + generated tokens. Greedy and seeded outputs equal an engine with room for all,
    with the prefix cache off and on (a budget of the minimum 5 snapshots and 2 pages: cached prefixes are
    evicted first)."""
    _, roomy = engine_pair("float32")
    model = KimiLinear(hybrid_config("float32"), rngs=nnx.Rngs(0))
    page = roomy.pool_stats()["page_bytes"]
    budget = 5 * snapshot_bytes(model.config) + 2 * page if prefix_cache else 0
    small = make_engine(model, budget, kv_cache_bytes=8 * page)
    assert small.pool_stats()["pages_total"] == (10 if prefix_cache else 8)
    prompts = [_tokens(700 + i, 20 + i) for i in range(3)]
    params = [SamplingParams(max_tokens=26, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=26, temperature=1.0, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=26, temperature=0.8, top_k=20, seed=11, ignore_eos=True)]
    streamed = {i: [] for i in range(3)}
    reqs = [small.submit(p, sp, callback=lambda ev, i=i: streamed[i].extend(ev.token_ids))
            for i, (p, sp) in enumerate(zip(prompts, params))]
    _step_until(small, lambda: all(r.finished for r in reqs))
    got = [r.completion().token_ids for r in reqs]
    assert small.stats["preempted"] > 0
    assert [streamed[i] for i in range(3)] == got  # a recomputed request streams no token twice
    assert got == [c.token_ids for c in roomy.generate(prompts, params)]
    pool = small.pool_stats()
    assert pool["pages_slots"] == 0 and pool["preempted"] == small.stats["preempted"]
    with pytest.raises(ValueError, match="less than one context"):
        make_engine(model, 0, kv_cache_bytes=7 * roomy.pool_stats()["page_bytes"])

"""KDA state snapshots: copies that later steps never change, restored into any slot (or reset to zeros), a decode
from a restored slot equal to one from the original, bounded capacity, and one compilation per row bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax import KimiLinear, load_config
from k2jax.layers.kda import KDAState
from k2jax.serving import cache as kvcache
from k2jax.serving import runner
from k2jax.serving.state_store import NO_SNAPSHOT, SnapshotStore, SnapshotStoreFull, snapshot_bytes
from k2jax.sharding import make_mesh
from tests.conftest import error_ratio

SLOTS = 3


def _kda(cache):
    return tuple(layer for layer in cache.layers if isinstance(layer, KDAState))


def _random_states(cfg, seed):
    rng = np.random.default_rng(seed)
    return tuple(KDAState(*(jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in layer))
                 for layer in _kda(kvcache.init_cache(cfg, SLOTS, 8)))


def _rows(states, i):
    return [np.asarray(a[i]) for layer in states for a in layer]


def test_save_restore_copy_semantics_capacity_and_compiles():
    cfg = load_config("tiny")  # 3 KDA layers, 1 MLA
    store = SnapshotStore(cfg, 3)
    assert store.nbytes_per_snapshot == snapshot_bytes(cfg) == sum(a.nbytes for a in jax.tree.leaves(store.states)) // 3
    states = _random_states(cfg, 0)
    slot2, slot0 = _rows(states, 2), _rows(states, 0)
    h = store.save(states, [2, 0])
    assert h == [0, 1] and store.num_used == 2 and store.bytes_in_use == 2 * store.nbytes_per_snapshot
    # The slots move on (new states everywhere); the snapshots keep the old ones.
    states = _random_states(cfg, 1)
    states = store.restore(states, [1, 2, 0], [h[0], h[1], NO_SNAPSHOT])
    for got, want in zip(_rows(states, 1), slot2):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_rows(states, 2), slot0):
        np.testing.assert_array_equal(got, want)
    assert all((r == 0).all() for r in _rows(states, 0))  # NO_SNAPSHOT: a fresh start
    h2 = store.save(states, [1])
    compiles = store.compile_count
    # Other slots, handles and row counts in the row buckets already compiled (3 and 4 rows pad to 4): no new program.
    store.restore(_random_states(cfg, 2), [0, 2, 1], [h2[0], h[0], h[1]])
    store.restore(_random_states(cfg, 3), [2, 1, 0, 1], [h[1], NO_SNAPSHOT, h2[0], h[0]])
    assert store.compile_count == compiles
    with pytest.raises(SnapshotStoreFull, match="0 free buffers of 3, 1 were requested"):
        store.save(states, [0])
    store.free([h[1]])
    with pytest.raises(ValueError, match="not live"):
        store.restore(states, [0], [h[1]])
    with pytest.raises(ValueError, match="not live"):
        store.free([h[1]])
    assert store.num_free == 1
    with pytest.raises(ValueError, match="capacity=0"):
        SnapshotStore(cfg, 0)


def test_decoding_from_a_restored_slot_equals_decoding_from_the_original():
    """Prefill a prompt, snapshot its KDA state, decode on in that slot; a second slot restored from the snapshot
    and fed the same tokens produces the same logits (an all-KDA model: the state is the whole cache)."""
    cfg = load_config("tiny", vocab_size=264, num_hidden_layers=1, kda_layers=(1,), full_attn_layers=())
    model = KimiLinear(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    table = kvcache.identity_page_table(SLOTS, 16, 16)  # unused: no MLA layer
    prefill = jax.jit(lambda st, c, t, n, s: runner.prefill(nnx.merge(graphdef, st), c, table, t, n, s))
    decode = jax.jit(lambda st, c, t, a: runner.decode(nnx.merge(graphdef, st), c, table, t, a))
    cache = kvcache.init_cache(cfg, SLOTS, 16)
    prompt = np.random.default_rng(0).integers(3, 264, 16).astype(np.int32)
    cache, _ = prefill(state, cache, prompt[None], np.array([11], np.int32), np.array([0], np.int32))
    store = SnapshotStore(cfg, 2)
    (h,) = store.save(_kda(cache), [0])
    follow = [int(t) for t in prompt[11:16]]
    original = []
    for t in follow:
        cache, logits = decode(state, cache, np.array([t, 0, 0], np.int32), np.array([True, False, False]))
        original.append(np.asarray(logits[0]))
    kda = store.restore(_kda(cache), [2], [h])
    cache = kvcache.DecodeCache(kda, cache.lengths, cache.pool)
    for t, want in zip(follow, original):
        cache, logits = decode(state, cache, np.array([0, 0, t], np.int32), np.array([False, False, True]))
        assert error_ratio(want, logits[2]) < 1e-6
        assert int(np.argmax(logits[2])) == int(np.argmax(want))


def test_store_on_a_mesh_keeps_heads_sharded():
    cfg = load_config("tiny")
    mesh = make_mesh({"tensor": 2})
    store = SnapshotStore(cfg, 4, mesh=mesh)
    assert store.states[0].recurrent.sharding.spec[1] == "tensor"
    states = _random_states(cfg, 0)
    (h,) = store.save(states, [1])
    assert store.states[0].recurrent.sharding.spec[1] == "tensor"
    out = store.restore(states, [0], [h])
    for got, want in zip(_rows(out, 0), _rows(_random_states(cfg, 0), 1)):
        np.testing.assert_array_equal(got, want)

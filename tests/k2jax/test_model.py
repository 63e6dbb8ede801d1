"""Whole-model properties: causality, packing, gradients, jit in f32/bf16, exact parameter counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax.layers.mla
from k2jax import KimiLinear, load_config
from k2jax.layers.kda import KDAState
from k2jax.layers.mla import MLACache
from k2jax.model import count_params, empty_cache, segment_positions
from tests.conftest import error_ratio


@pytest.fixture(scope="module")
def tiny_model():
    cfg = load_config("tiny")
    return cfg, KimiLinear(cfg, rngs=nnx.Rngs(0))


def _forward(model, tokens, segment_ids=None):
    return nnx.jit(lambda m, t, s: m(t, s))(model, tokens, segment_ids)


def test_layer_schedule_follows_one_based_lists():
    cfg = load_config("kimi_linear_48b_a3b")
    mla = [i for i, t in enumerate(cfg.layer_types) if t == "mla"]
    assert mla == [3, 7, 11, 15, 19, 23, 26]
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]


def test_causality(tiny_model):
    cfg, model = tiny_model
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, cfg.vocab_size)
    t = 23
    changed = tokens.at[:, t].set((tokens[:, t] + 7) % cfg.vocab_size)
    a, b = _forward(model, tokens), _forward(model, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
    assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-4  # the change is seen from t on


def test_packed_segments_equal_separate_sequences(tiny_model):
    cfg, model = tiny_model
    lengths = [11, 20, 7]
    key = jax.random.key(1)
    seqs = [jax.random.randint(jax.random.fold_in(key, i), (1, n), 0, cfg.vocab_size) for i, n in enumerate(lengths)]
    pad = 5
    packed = jnp.concatenate(seqs + [jnp.zeros((1, pad), jnp.int32)], axis=1)
    seg = jnp.concatenate([jnp.full((1, n), i + 1, jnp.int32) for i, n in enumerate(lengths)]
                          + [jnp.zeros((1, pad), jnp.int32)], axis=1)
    out = _forward(model, packed, seg)
    start = 0
    for s, n in zip(seqs, lengths):
        alone = _forward(model, s)
        assert error_ratio(alone, out[:, start:start + n]) < 1e-5
        start += n


def test_left_padding_equals_unpadded(tiny_model):
    cfg, model = tiny_model
    tokens = jax.random.randint(jax.random.key(2), (1, 30), 0, cfg.vocab_size)
    padded = jnp.concatenate([jnp.full((1, 9), cfg.pad_token_id), tokens], axis=1)
    seg = jnp.concatenate([jnp.zeros((1, 9), jnp.int32), jnp.ones((1, 30), jnp.int32)], axis=1)
    assert error_ratio(_forward(model, tokens), _forward(model, padded, seg)[:, 9:]) < 1e-5


def test_segment_positions_count_real_tokens_per_segment():
    seg = jnp.array([[0, 0, 1, 1, 1, 2, 2, 0, 2, 3]])
    pos = np.asarray(segment_positions(seg))[0]
    real = np.asarray(seg)[0] != 0
    np.testing.assert_array_equal(pos[real], [0, 1, 2, 0, 1, 2, 0])


def test_gradients_finite_and_nonzero(tiny_model):
    cfg, model = tiny_model
    tokens = jax.random.randint(jax.random.key(3), (2, 33), 0, cfg.vocab_size)

    def loss_fn(m):
        logits = m(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) >= 0.9 * len(leaves)


def test_flash_mla_equals_materialised_attention_at_2048(monkeypatch):
    """The default config's widths (one MLA layer: its dense MLP, norms and lm_head around it) at T = 2,048 with two
    packed segments: logits and every parameter's gradient with MLA on the blocked attention op (O(T) memory)
    equal those with the plain softmax that builds the [B, H, T, T] scores (attention impl "reference", the
    layer's previous math), within 1e-5 / 1e-4 relative."""
    cfg = load_config("default", num_hidden_layers=1, kda_layers=None, full_attn_layers=None)
    model = KimiLinear(cfg, rngs=nnx.Rngs(0))
    T = 2048
    tokens = jax.random.randint(jax.random.key(5), (1, T + 1), 0, cfg.vocab_size)
    seg = jnp.asarray([[1] * 1200 + [2] * (T - 1200)], jnp.int32)

    def logits_and_grads():
        def loss_fn(m):
            logits = m(tokens[:, :-1], seg)
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean(), logits
        (_, logits), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
        return logits, jax.tree.leaves(grads)

    logits, grads = logits_and_grads()
    monkeypatch.setattr(k2jax.layers.mla, "attention",
                        functools.partial(k2jax.layers.mla.attention, impl="reference"))
    ref_logits, ref_grads = logits_and_grads()
    assert error_ratio(ref_logits, logits) < 1e-5
    assert len(grads) == len(ref_grads)
    for ref, got in zip(ref_grads, grads):
        assert error_ratio(ref, got) < 1e-4


def test_jit_bf16_runs_and_tracks_float32(tiny_model):
    cfg, model32 = tiny_model
    cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    # The same weights as the float32 model, cast to the bf16 model's parameter dtypes.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: KimiLinear(cfg16, rngs=nnx.Rngs(0))))
    state32 = nnx.state(model32)
    model16 = nnx.merge(graphdef, jax.tree.map(lambda a, x: x.astype(a.dtype), abstract, state32))
    tokens = jax.random.randint(jax.random.key(4), (2, 40), 0, cfg.vocab_size)
    out16 = _forward(model16, tokens)
    assert out16.dtype == jnp.float32 and bool(jnp.isfinite(out16).all())
    assert error_ratio(_forward(model32, tokens), out16) < 5e-2


def test_return_aux_reports_expert_load(tiny_model):
    cfg, model = tiny_model
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, cfg.vocab_size)
    seg = jnp.ones((2, 16), jnp.int32).at[0, :4].set(0)
    _, aux = nnx.jit(lambda m, t, s: m(t, s, return_aux=True))(model, tokens, seg)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert aux["expert_load"].shape == (n_moe, cfg.num_experts)
    # Every real token fills num_experts_per_token slots in every MoE layer; padding fills none.
    np.testing.assert_allclose(np.asarray(aux["expert_load"].sum(-1)), (32 - 4) * cfg.num_experts_per_token)


def test_kimi_linear_48b_parameter_count_is_exact():
    counts = count_params(load_config("kimi_linear_48b_a3b"))
    assert counts["total"] == 49_122_681_728


def test_kimi_k2_parameter_counts():
    counts = count_params(load_config("kimi_k2"))
    # Kimi K2: "1T total, 32B activated" (model card).
    assert 1.02e12 < counts["total"] < 1.04e12
    assert 3.1e10 < counts["active"] < 3.4e10


def test_bad_inputs_fail_at_the_boundary(tiny_model):
    cfg, model = tiny_model
    with pytest.raises(ValueError, match="tokens must be"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="vocab_size"):
        model(jnp.full((1, 4), cfg.vocab_size, jnp.int32))
    with pytest.raises(ValueError, match="segment_ids shape"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))


# ---- the same call with a cache: prefill, chunked prefill, decode ---------------------------------------------
_cached_call = nnx.jit(lambda m, t, s, c: m(t, s, cache=c))


def store(cache, updates):
    """The caches after a call: each KDA layer's new state; each MLA layer's latents appended to its view (what
    k2jax.serving.cache does in its slots)."""
    out = []
    for c, u in zip(cache, updates):
        if isinstance(c, KDAState):
            out.append(u)
        else:
            out.append(MLACache(jnp.concatenate([c.ckv, u.ckv], 1), jnp.concatenate([c.kpe, u.kpe], 1),
                                c.lengths + u.ckv.shape[1]))
    return tuple(out)


def run_in_pieces(model, tokens, cuts, segment_ids=None):
    """logits [B, T, V] of tokens [B, T] run as pieces [0, cuts[0]), [cuts[0], cuts[1]), ..., each one a call
    continuing the caches the earlier pieces left (the first from `empty_cache`)."""
    cache = empty_cache(model.config, tokens.shape[0])
    outs = []
    bounds = [0] + list(cuts) + [tokens.shape[1]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        seg = None if segment_ids is None else segment_ids[:, lo:hi]
        logits, updates = _cached_call(model, tokens[:, lo:hi], seg, cache)
        outs.append(logits)
        cache = store(cache, updates)
    return jnp.concatenate(outs, axis=1)


CACHE_CONFIGS = {
    "nope": dict(),  # 3 KDA layers (chunk 16) + 1 NoPE MLA
    "rope": dict(mla_use_nope=False, q_lora_rank=16, kda_layers=(1, 3), full_attn_layers=(2, 4)),
}


@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_pieces_continuing_the_cache_equal_one_pass(name):
    """Prefill from empty caches, pieces that end mid KDA chunk and on chunk boundaries, and one-token decode
    steps: all the model's one call with a cache, equal to the call without one."""
    cfg = load_config("tiny", **CACHE_CONFIGS[name])
    model = KimiLinear(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(7), (2, 40), 0, cfg.vocab_size)
    ref = _forward(model, tokens)
    for cuts in ([7, 16, 37, 38, 39], [32]):
        assert error_ratio(ref, run_in_pieces(model, tokens, cuts)) < 1e-5, cuts


def test_cached_call_returns_updates_and_logits_at():
    cfg = load_config("tiny")
    model = KimiLinear(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(8), (2, 12), 0, cfg.vocab_size)
    lengths = jnp.asarray([12, 5], jnp.int32)
    seg = (jnp.arange(12)[None] < lengths[:, None]).astype(jnp.int32)  # right-padded prompts
    logits, updates = model(tokens, seg, cache=empty_cache(cfg, 2), logits_at=lengths - 1)
    assert logits.shape == (2, cfg.vocab_size)
    full = _forward(model, tokens, seg)
    assert error_ratio(full[jnp.arange(2), lengths - 1], logits) < 1e-6
    kinds = [type(u).__name__ for u in updates]
    assert kinds == ["KDAState", "KDAState", "KDAState", "MLALatents"]
    assert updates[3].ckv.shape == (2, 12, cfg.kv_lora_rank)
    # The KDA state of the short row is the one after its 5th token.
    _, alone = model(tokens[1:, :5], cache=empty_cache(cfg, 1))
    assert error_ratio(alone[0].recurrent[0], updates[0].recurrent[1]) < 1e-6
    logits, _, aux = model(tokens, seg, cache=empty_cache(cfg, 2), return_aux=True)
    assert logits.shape == (2, 12, cfg.vocab_size) and aux["expert_load"].shape[-1] == cfg.num_experts


def test_bad_caches_fail_at_the_boundary(tiny_model):
    cfg, model = tiny_model
    tokens = jnp.zeros((2, 4), jnp.int32)
    cache = empty_cache(cfg, 2)
    with pytest.raises(ValueError, match="4 per-layer caches"):
        model(tokens, cache=cache[:3])
    with pytest.raises(ValueError, match=r"cache\[3\] of MLA layer 3 must be an MLACache"):
        model(tokens, cache=cache[:3] + (cache[0],))
    with pytest.raises(ValueError, match="logits_at"):
        model(tokens, cache=cache, logits_at=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="positions shape"):
        model(tokens, positions=jnp.zeros((2, 5), jnp.int32))

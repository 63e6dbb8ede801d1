"""The serving engine: continuous batching, stop rules, no recompilation after warm-up, model loading, a mesh."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax import KimiLinear, load_config
from k2jax.engine import Engine, SamplingParams, load_model, make_mesh, shard_model
from k2jax.tokenizer import ByteTokenizer

MAX_LEN = 32


def serving_config(**overrides):
    """A 2-layer hybrid (KDA + NoPE MLA, dense layer 0 + MoE layer 1) whose vocabulary covers the byte tokenizer.
    Shared with test_server so that both files hit the same compiled programs in the persistent cache."""
    base = dict(vocab_size=264, num_hidden_layers=2, kda_layers=(1,), full_attn_layers=(2,))
    return load_config("tiny", **{**base, **overrides})


def tiny_engine(model=None, **kw):
    """Engine over the serving config: 4 slots, context 32, buckets 16 and 32, prefill rows 1 and 2 (16 tokens)."""
    model = model if model is not None else KimiLinear(serving_config(), rngs=nnx.Rngs(0))
    opts = dict(num_slots=4, max_len=MAX_LEN, min_bucket=16, max_prefill_batch=2, max_prefill_tokens=32)
    return Engine(model, ByteTokenizer(), **{**opts, **kw})


@pytest.fixture(scope="module")
def engine():
    eng = tiny_engine()
    eng.warmup()
    return eng


def _prompt(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(8, 264, n)]


def _full_logits_fn(model):
    """Full forward of one right-padded row of MAX_LEN tokens (causal, so position t sees tokens <= t only)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])
    return lambda ids: np.asarray(f(state, jnp.asarray([list(ids) + [0] * (MAX_LEN - len(ids))], jnp.int32)))


def test_buckets_and_prefill_shapes(engine):
    assert engine.buckets == [16, 32]
    assert engine._prefill_shapes() == [(1, 16), (2, 16), (1, 32)]


def test_greedy_equals_full_forward_argmax_each_step(engine):
    model = nnx.merge(engine.graphdef, engine.params)
    full = _full_logits_fn(model)
    prompt = _prompt(1, 9)
    out = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True, logprobs=0))[0]
    seq = list(prompt)
    for i, tok in enumerate(out.token_ids):
        logits = full(seq)[len(seq) - 1]
        assert tok == int(np.argmax(logits)), f"step {i}"
        ref_lp = float(jax.nn.log_softmax(logits)[tok])
        assert abs(out.logprobs[i].logprob - ref_lp) < 1e-4
        seq.append(tok)
    assert out.finish_reason == "length" and len(out.token_ids) == 12


def test_output_independent_of_batch_and_no_recompilation(engine):
    c0 = engine.compile_count
    sampled = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=7, ignore_eos=True,
                             logprobs=2)
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    reqs = [(_prompt(2, 5), sampled), (_prompt(3, 20), greedy), (_prompt(4, 3), sampled),
            (_prompt(5, 14), SamplingParams(max_tokens=9, temperature=1.3, seed=1, ignore_eos=True)),
            (_prompt(6, 17), greedy), (_prompt(7, 1), SamplingParams(max_tokens=4, top_p=0.5, temperature=1.0,
                                                                     seed=3, ignore_eos=True))]
    alone = [engine.generate([p], sp)[0] for p, sp in reqs]
    # Together: 6 requests on 4 slots, two arriving while others decode (continuous batching, slot reuse).
    handles = [engine.submit(p, sp) for p, sp in reqs[:4]]
    engine.step()
    engine.step()
    handles += [engine.submit(p, sp) for p, sp in reqs[4:]]
    while engine.has_work:
        engine.step()
    for a, h in zip(alone, handles):
        b = h.wait(0)
        assert b.token_ids == a.token_ids
        if a.logprobs is not None:
            np.testing.assert_allclose([x.logprob for x in b.logprobs], [x.logprob for x in a.logprobs], atol=1e-4)
    assert engine.compile_count == c0, "a request after warm-up triggered a compilation"
    assert all(s is None for s in engine.slots)


def test_stop_token_stop_string_and_max_tokens(engine):
    tok = ByteTokenizer()
    prompt = _prompt(8, 6)
    ref = engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    # A stop token id: generation ends at its first occurrence; the id is returned, its text is not.
    j = 3
    first = ref.index(ref[j])
    out = engine.generate([prompt], SamplingParams(max_tokens=10, stop_token_ids=[ref[j]], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[:first + 1]
    assert out.text == tok.decode(ref[:first])
    # EOS from the engine's eos set.
    eng_eos = engine.eos_token_ids
    engine.eos_token_ids = frozenset({ref[j]})
    try:
        out = engine.generate([prompt], SamplingParams(max_tokens=10))[0]
    finally:
        engine.eos_token_ids = eng_eos
    assert out.finish_reason == "stop" and out.token_ids == ref[:first + 1]
    # A stop string: the text ends before it; streamed deltas add up to the final text.
    k = next(i for i, t in enumerate(ref) if 8 + 33 <= t <= 8 + 126)  # a printable ASCII byte
    stop = chr(ref[k] - 8)
    full_text = tok.decode(ref[:k + 1])
    events = []
    h = engine.submit(prompt, SamplingParams(max_tokens=10, stop=[stop], ignore_eos=True), callback=events.append)
    while engine.has_work:
        engine.step()
    out = h.wait(0)
    assert out.finish_reason == "stop" and out.text == full_text[:full_text.find(stop)]
    assert "".join(e.text for e in events) == out.text and events[-1].finished
    # max_tokens.
    out = engine.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.token_ids == ref[:3]


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "empty"),
    ([9] * MAX_LEN, SamplingParams(max_tokens=1), "prompt has 32 tokens"),
    ([9] * 10, SamplingParams(max_tokens=23), "exceed the context"),
    ([9] * 10, SamplingParams(max_tokens=-1), "max_tokens"),
    ([9] * 10, SamplingParams(max_tokens=10 ** 12), "exceed the context"),
    ([9, 264], SamplingParams(), "vocab_size"),
    ([9], SamplingParams(top_p=0.0), "top_p"),
    ([9], SamplingParams(temperature=-1.0), "temperature"),
    ([9], SamplingParams(logprobs=6), "logprobs"),
])
def test_invalid_requests_are_rejected(engine, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        engine.submit(prompt, params)
    assert not engine.has_work


def test_background_thread_abort_and_reuse(engine):
    engine.start()
    try:
        got_first = threading.Event()
        h = engine.submit(_prompt(9, 4), SamplingParams(max_tokens=27, ignore_eos=True),
                          callback=lambda ev: got_first.set())
        assert got_first.wait(30)
        engine.abort(h)
        assert h.wait(30).finish_reason in ("abort", "length")
        outs = engine.generate([_prompt(10, 5)] * 5, SamplingParams(max_tokens=3, ignore_eos=True), timeout=60)
        assert [len(o.token_ids) for o in outs] == [3] * 5 and len({tuple(o.token_ids) for o in outs}) == 1
    finally:
        engine.shutdown()
    assert all(s is None for s in engine.slots)


def test_mesh_serving_matches_single_device(engine):
    mesh = make_mesh(tensor=2, expert=2)  # 8 CPU devices: data 2 x expert 2 x tensor 2
    model = shard_model(KimiLinear(serving_config(), rngs=nnx.Rngs(0)), mesh)
    sharded = tiny_engine(model, mesh=mesh)
    assert sharded.cache.layers[0].recurrent.sharding.spec[1] == "tensor"
    prompts = [_prompt(11, 10), _prompt(12, 7)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    assert [o.token_ids for o in sharded.generate(prompts, params)] == \
        [o.token_ids for o in engine.generate(prompts, params)]


def test_int4_experts_engine_matches_its_model():
    eng = tiny_engine(int4_experts=True)
    assert eng.config.quantization["experts"] == "int4"
    assert not any("w1" == str(p[-1]) for p, _ in nnx.to_flat_state(eng.params))  # float experts not kept
    full = _full_logits_fn(nnx.merge(eng.graphdef, eng.params))
    prompt = _prompt(13, 6)
    out = eng.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    seq = list(prompt)
    for tok in out.token_ids:
        assert tok == int(np.argmax(full(seq)[len(seq) - 1]))
        seq.append(tok)


def test_load_model_from_orbax_and_hf(engine, tmp_path):
    from k2jax.checkpoint import save_params
    from k2jax.hf import save_hf_checkpoint

    model = nnx.merge(engine.graphdef, engine.params)
    save_params(model, tmp_path / "orbax")
    save_hf_checkpoint(model, tmp_path / "hf")
    ref = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path in (tmp_path / "orbax", tmp_path / "hf"):
        loaded = nnx.to_flat_state(nnx.state(load_model(path), nnx.Param))
        assert [p for p, _ in loaded] == [p for p, _ in ref]
        for (_, a), (_, b) in zip(ref, loaded):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    with pytest.raises(ValueError, match="neither"):
        load_model(tmp_path)

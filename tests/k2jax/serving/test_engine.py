"""The serving engine: continuous batching, stop rules, no recompilation after warm-up, model loading, a mesh, and
failures that stay with the request that caused them."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax import KimiLinear, load_config
from k2jax.checkpoint import save_params
from k2jax.hf import save_hf_checkpoint
from k2jax.serving.loading import load_model
from k2jax.serving.page_pool import PagePoolExhausted
from k2jax.serving.runner import ModelRunner
from k2jax.serving.scheduler import Engine, EngineStoppedError, SamplingParams
from k2jax.sharding import make_mesh, shard_model
from k2jax.tokenizer import ByteTokenizer

MAX_LEN = 32


def serving_config(**overrides):
    """A 2-layer hybrid (KDA + NoPE MLA, dense layer 0 + MoE layer 1) whose vocabulary covers the byte tokenizer.
    Shared with test_server so that both files hit the same compiled programs in the persistent cache."""
    base = dict(vocab_size=264, num_hidden_layers=2, kda_layers=(1,), full_attn_layers=(2,))
    return load_config("tiny", **{**base, **overrides})


def tiny_engine(model=None, with_tokenizer=True, **kw):
    """Engine over the serving config: 4 slots, context 32, buckets 16 and 32, prefill rows 1 and 2 (16 tokens),
    the byte tokenizer unless with_tokenizer is False."""
    model = model if model is not None else KimiLinear(serving_config(), rngs=nnx.Rngs(0))
    opts = dict(num_slots=4, max_len=MAX_LEN, min_bucket=16, max_prefill_batch=2, max_prefill_tokens=32)
    return Engine(model, ByteTokenizer() if with_tokenizer else None, **{**opts, **kw})


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
    assert engine.runner.buckets == [16, 32]
    assert engine.runner.prefill_shapes() == [(1, 16), (2, 16), (1, 32)]


def test_warmup_programs_do_not_grow_with_the_context():
    """Decode steps and continuing pieces read the slot cache in place, each slot up to its own length, so the
    runner compiles one decode program and one continuing program per piece length whatever max_len is (not one
    per kv length bucket: 2 buckets at max_len 32, 5 at 256)."""
    counts = []
    for max_len in (32, 256):
        eng = tiny_engine(with_tokenizer=False, max_len=max_len, max_prefill_tokens=16, prefix_cache_bytes=2 ** 20)
        assert eng.runner.continue_lengths() == [16] and eng.runner.prefill_shapes() == [(1, 16)]
        eng.runner.warmup()
        counts.append(eng.runner.compile_count)
    assert counts[0] == counts[1], counts


def test_greedy_equals_full_forward_argmax_each_step(engine):
    model = nnx.merge(engine.runner.graphdef, engine.runner.params)
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
    c0 = engine.runner.compile_count
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
    assert engine.runner.compile_count == c0, "a request after warm-up triggered a compilation"
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


def test_long_prompts_are_prefilled_in_pieces_between_decode_steps(engine):
    """With max_prefill_tokens 16 a prompt of 17-26 tokens takes its slot with a first piece of 16 and is finished
    by a second piece in the next step, while a request already decoding gets a token in each of those steps.
    Greedy generations equal one-shot prefill's, and nothing compiles after warm-up."""
    chunked = tiny_engine(max_prefill_tokens=16)
    assert chunked.runner.piece_len == 16 and chunked.runner.continue_lengths() == [16]
    chunked.warmup()
    c0 = chunked.runner.compile_count
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [_prompt(20, 26), _prompt(21, 17), _prompt(22, 5), _prompt(23, 16)]
    ref = [o.token_ids for o in engine.generate(prompts, greedy)]

    running = chunked.submit(_prompt(24, 5), SamplingParams(max_tokens=12, ignore_eos=True))
    chunked.step()
    n0 = len(running.token_ids)
    long = chunked.submit(prompts[0], greedy)
    chunked.step()  # admits the long prompt's first piece; the running request decodes
    assert long.prefilled == 16 and long.token_ids == [] and len(running.token_ids) == n0 + 1
    chunked.step()  # the second piece samples the first token, then both decode (as an admission does)
    assert long.prefilled == 26 and len(long.token_ids) == 2 and len(running.token_ids) == n0 + 2
    while chunked.has_work:
        chunked.step()
    assert long.wait(0).token_ids == ref[0]
    assert [o.token_ids for o in chunked.generate(prompts, greedy)] == ref  # two long prompts at once
    assert chunked.runner.compile_count == c0, "a prompt in pieces compiled after warm-up"
    with pytest.raises(ValueError, match="piece_len=16"):
        chunked.runner.prefill([[9] * 17], [0], [0.0], [0], [1.0], [0])
    with pytest.raises(ValueError, match="holds exactly start=3"):
        chunked.runner.prefill([[9] * 4], [0], [0.0], [0], [1.0], [0], start=3)


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
    ([9], SamplingParams(top_k=-1), "top_k"),
    ([9], SamplingParams(top_k=2.5), "top_k"),
    ([9], SamplingParams(temperature=float("nan")), "temperature"),
    ([9], SamplingParams(top_p=float("nan")), "top_p"),
    ([9], SamplingParams(seed="7"), "seed"),
    ([9], SamplingParams(stop=["x"] * 17), "stop"),
    ([9], SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
    ([9], SamplingParams(stop_token_ids=list(range(257))), "stop_token_ids"),
])
def test_invalid_requests_are_rejected(engine, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        engine.submit(prompt, params)
    assert not engine.has_work


def test_background_thread_abort_and_reuse(engine):
    engine.start()
    try:
        got_first, aborted = threading.Event(), threading.Event()

        def hold_after_first_token(ev):
            # The engine thread waits here until the test has asked for the abort: it cannot run to max_tokens
            # first, so a do-nothing abort fails the assertions below.
            got_first.set()
            aborted.wait(30)

        h = engine.submit(_prompt(9, 4), SamplingParams(max_tokens=27, ignore_eos=True),
                          callback=hold_after_first_token)
        assert got_first.wait(30)
        engine.abort(h)
        aborted.set()
        out = h.wait(30)
        assert out.finish_reason == "abort" and 1 <= len(out.token_ids) <= 3
        outs = engine.generate([_prompt(10, 5)] * 5, SamplingParams(max_tokens=3, ignore_eos=True), timeout=60)
        assert [len(o.token_ids) for o in outs] == [3] * 5 and len({tuple(o.token_ids) for o in outs}) == 1
    finally:
        engine.shutdown()
    assert all(s is None for s in engine.slots)


def test_mesh_serving_matches_single_device(engine):
    mesh = make_mesh({"data": -1, "expert": 2, "tensor": 2})  # 8 CPU devices: data 2 x expert 2 x tensor 2
    model = shard_model(KimiLinear(serving_config(), rngs=nnx.Rngs(0)), mesh)
    sharded = tiny_engine(model, mesh=mesh)
    assert sharded.runner.cache.layers[0].recurrent.sharding.spec[1] == "tensor"
    prompts = [_prompt(11, 10), _prompt(12, 7)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    assert [o.token_ids for o in sharded.generate(prompts, params)] == \
        [o.token_ids for o in engine.generate(prompts, params)]


def test_int4_experts_engine_matches_its_model():
    eng = tiny_engine(int4_experts=True)
    assert eng.config.quantization["experts"] == "int4"
    assert not any("w1" == str(p[-1]) for p, _ in nnx.to_flat_state(eng.runner.params))  # float experts not kept
    full = _full_logits_fn(nnx.merge(eng.runner.graphdef, eng.runner.params))
    prompt = _prompt(13, 6)
    out = eng.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    seq = list(prompt)
    for tok in out.token_ids:
        assert tok == int(np.argmax(full(seq)[len(seq) - 1]))
        seq.append(tok)


def test_load_model_from_orbax_and_hf(engine, tmp_path):
    model = nnx.merge(engine.runner.graphdef, engine.runner.params)
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


def test_ids_the_tokenizer_cannot_decode_are_never_sampled():
    """A model vocabulary padded beyond the tokenizer's (512 ids, the byte tokenizer decodes 264): greedy, sampled
    and logprob alternatives never name an id >= 264; greedy is the argmax over [0, 264) and logprobs are the
    model's distribution renormalised over those ids. The mask costs no compile per request."""
    model = KimiLinear(serving_config(vocab_size=512), rngs=nnx.Rngs(0))
    kernel = model.lm_head.kernel  # [hidden, vocab]
    kernel[...] = kernel[...].at[:, 264:].multiply(30.0)  # the undecodable ids become the model's favourites
    full = _full_logits_fn(model)
    prompt = _prompt(14, 5)
    assert int(np.argmax(full(prompt)[len(prompt) - 1])) >= 264  # unmasked, greedy would pick one at once
    assert tiny_engine(model, with_tokenizer=False).vocab_limit == 512  # no tokenizer: nothing to mask

    eng = tiny_engine(model)
    assert eng.vocab_limit == 264
    greedy = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=5)
    out = eng.generate([prompt], greedy)[0]
    assert out.finish_reason == "length", out.error
    seq = list(prompt)
    for tok, lp in zip(out.token_ids, out.logprobs):
        logits = full(seq)[len(seq) - 1]
        assert tok == int(np.argmax(logits[:264]))
        ref = np.asarray(jax.nn.log_softmax(logits[:264]))
        assert abs(lp.logprob - ref[tok]) < 1e-4
        assert [i for i, _ in lp.top] == list(np.argsort(-ref, kind="stable")[:5])
        seq.append(tok)
    c0 = eng.runner.compile_count
    sampled = [SamplingParams(max_tokens=6, temperature=t, top_k=k, seed=s, ignore_eos=True, logprobs=5)
               for t, k, s in ((1.0, 0, 1), (2.0, 400, 2), (0.7, 50, 3))]
    outs = [eng.generate([prompt], sp)[0] for sp in sampled]  # one at a time: the shapes compiled above
    assert eng.runner.compile_count == c0, "the vocabulary mask recompiled per request"
    for o in outs:
        assert o.finish_reason == "length", o.error
        assert all(t < 264 for t in o.token_ids)
        assert all(i < 264 for lp in o.logprobs for i, _ in lp.top) and all(len(lp.top) == 5 for lp in o.logprobs)
        assert eng.tokenizer.decode(o.token_ids) == o.text


def test_huge_top_k_is_clamped_and_breaks_nobody(engine):
    """top_k beyond the vocabulary (even beyond int32) means every id: same output as top_k 0, and it does not
    break the admission of the requests around it."""
    sampled = SamplingParams(max_tokens=5, temperature=1.0, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    ref_sampled = engine.generate([_prompt(15, 4)], sampled)[0].token_ids
    ref_greedy = engine.generate([_prompt(16, 6)], greedy)[0].token_ids
    running = engine.submit(_prompt(16, 6), greedy)
    engine.step()
    huge = [engine.submit(_prompt(15, 4), dataclasses.replace(sampled, top_k=k)) for k in (2 ** 31, 10 ** 30)]
    while engine.has_work:
        engine.step()
    assert running.wait(0).token_ids == ref_greedy
    assert [h.wait(0).token_ids for h in huge] == [ref_sampled, ref_sampled]


def test_a_failing_prefill_fails_only_its_requests(engine, monkeypatch):
    """A prefill call that raises fails the requests it was admitting, and only them: a request already decoding
    carries on unchanged, nothing hangs, and the next requests are served."""
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    ref = engine.generate([_prompt(17, 5)], greedy)[0].token_ids
    real = engine.runner.prefill
    poison = 263

    def prefill(prompts, *args):
        if any(poison in p for p in prompts):
            raise RuntimeError("injected prefill failure")
        return real(prompts, *args)

    monkeypatch.setattr(engine.runner, "prefill", prefill)
    running = engine.submit(_prompt(17, 5), greedy)
    engine.step()
    bad = engine.submit([poison, 9, 10], greedy)
    engine.step()
    assert bad.wait(0).finish_reason == "error" and "injected prefill failure" in bad.wait(0).error
    later = engine.submit(_prompt(17, 5), greedy)
    while engine.has_work:
        engine.step()
    assert running.wait(0).token_ids == ref and later.wait(0).token_ids == ref
    assert engine.num_unfinished == 0 and engine.num_waiting == 0


def test_a_failing_decode_fails_its_requests_and_the_engine_recovers(engine, monkeypatch):
    """A decode call that raises fails the requests it was decoding (every active one); if it consumed the
    donated cache, a fresh one replaces it and the next requests get the same output as before."""
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    ref = engine.generate([_prompt(18, 7)], greedy)[0].token_ids
    real = engine.runner.decode

    def decode_once_broken(*args, **kwargs):
        monkeypatch.setattr(engine.runner, "decode", real)
        for leaf in jax.tree.leaves(engine.runner.cache):  # as a call that failed after taking the donated cache
            leaf.delete()
        raise RuntimeError("injected decode failure")

    monkeypatch.setattr(engine.runner, "decode", decode_once_broken)
    hs = [engine.submit(_prompt(18, 7), greedy) for _ in range(2)]
    while engine.has_work:
        engine.step()
    assert all(h.wait(0).finish_reason == "error" and "injected decode failure" in h.wait(0).error for h in hs)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(engine.runner.cache))
    assert engine.generate([_prompt(18, 7)] * 2, greedy)[1].token_ids == ref


def test_a_dead_engine_thread_finishes_every_request_with_its_error():
    """If the engine thread dies, no request waits forever: pending ones finish with the reason, `error` says it,
    and submit refuses new ones."""
    eng = tiny_engine()  # never steps for real: nothing is compiled

    class Fatal(BaseException):
        pass

    def step():
        raise Fatal("injected")

    eng.step = step
    eng.start()
    try:
        h = eng.submit([9, 10], SamplingParams(max_tokens=3))
        out = h.wait(30)
        assert out.finish_reason == "error" and "Fatal: injected" in out.error
        assert not eng.running and "Fatal: injected" in eng.error
        with pytest.raises(EngineStoppedError, match="injected"):
            eng.submit([9, 10], SamplingParams(max_tokens=3))
        assert eng.num_unfinished == 0
    finally:
        eng.shutdown()


def test_the_runner_takes_pages_as_slots_grow_and_refuses_what_the_pool_lacks():
    """Pages follow the tokens: a slot holds ceil(length / page_size) pages, a decode step needs a page only where
    a slot crosses a page boundary, a step the pool cannot hold raises PagePoolExhausted before changing anything
    (no compile happens: the check precedes the call), and releasing a slot returns its pages."""
    runner = ModelRunner(KimiLinear(serving_config(), rngs=nnx.Rngs(0)), num_slots=2, max_len=MAX_LEN, page_size=8,
                         num_pages=4)
    runner.tables.reserve(0, 20)
    runner.lengths[0] = 20
    assert len(runner.tables.pages(0)) == 3 and runner.allocator.num_free == 1
    assert runner.pages_needed(decode=np.array([True, False])) == 0  # position 20 lies in page 2
    runner.lengths[0] = 24
    assert runner.pages_needed(decode=np.array([True, False])) == 1
    assert runner.pages_needed(prefill=[(1, 0, 9)]) == 2 and runner.pages_needed(prefill=[(0, 24, 8)]) == 1
    sampling = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.uint32))
    with pytest.raises(PagePoolExhausted, match="needs 2 fresh pages of 8 tokens and the pool has 1 free of 4"):
        runner.prefill([_prompt(0, 9)], [1], *sampling)
    assert runner.tables.pages(1) == [] and runner.allocator.num_free == 1 and runner.compile_count == 0
    held = runner.tables.pages(0)
    assert sorted(runner.release(0)) == sorted(held) and runner.allocator.num_free == 4
    assert runner.lengths[0] == 0 and (runner.tables.table[0] == -1).all()
    with pytest.raises(ValueError, match="num_pages=3 cannot hold one full sequence"):
        ModelRunner(KimiLinear(serving_config(), rngs=nnx.Rngs(0)), num_slots=2, max_len=MAX_LEN, page_size=8,
                    num_pages=3)

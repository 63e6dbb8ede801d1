"""Prefill + decode over the slot cache (MLA latents in a paged pool, read through a page table) against the full
forward, INT4 experts, cache sizes, and sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax import KimiLinear, load_config
from k2jax.layers.kda import KDAState
from k2jax.quantize import quantize_model_experts
from k2jax.serving import cache as kvcache
from k2jax.serving.page_pool import copy_pages
from k2jax.serving.runner import decode, prefill
from k2jax.serving.sampling import row_keys, sample
from pallas_kernels.int4 import dequantize_int4
from tests.conftest import error_ratio

SLOTS, MAX_LEN, BUCKET, PS = 3, 32, 16, 8
M = MAX_LEN // PS  # pages per slot
CONFIGS = {
    # KDA + NoPE MLA, dense layer 0 and a MoE layer 1.
    "hybrid": dict(num_hidden_layers=2, kda_layers=(1,), full_attn_layers=(2,)),
    # Kimi K2 style: every layer MLA with RoPE and a q LoRA.
    "all_mla": dict(num_hidden_layers=2, kda_layers=None, full_attn_layers=None, mla_use_nope=False,
                    q_lora_rank=16),
}


def scrambled_table(seed=0):
    """A page table over the default pool (SLOTS x M pages) whose slots' pages are shuffled: neither contiguous nor
    in order."""
    return np.random.default_rng(seed).permutation(SLOTS * M).astype(np.int32).reshape(SLOTS, M)


class Runner:
    """Jitted prefill / decode of `model` over the slots' pages `table` (default: scrambled), and the full forward
    of one right-padded MAX_LEN row of `reference` (default: the same model)."""

    def __init__(self, model, reference=None, table=None):
        self.model = model
        self.table = scrambled_table() if table is None else table
        graphdef, self.state = nnx.split(model)
        ref_def, self.ref_state = nnx.split(reference or model)
        m = lambda st: nnx.merge(graphdef, st)  # noqa: E731
        self._prefill = jax.jit(lambda st, c, pt, t, n, s: prefill(m(st), c, pt, t, n, s))
        self._decode = jax.jit(lambda st, c, pt, t, a: decode(m(st), c, pt, t, a))
        self._full = jax.jit(lambda st, t: nnx.merge(ref_def, st)(t)[0])
        self._piece = jax.jit(lambda st, c, pt, t, n, s, p: prefill(m(st), c, pt, t, n, s, p))
        self._fresh_piece = jax.jit(lambda st, c, pt, t, n, s: prefill(m(st), c, pt, t, n, s))

    def init(self):
        return kvcache.init_cache(self.model.config, SLOTS, MAX_LEN, page_size=PS)

    def prefill(self, cache, rows, slots):
        toks = np.zeros((len(rows), BUCKET if max(map(len, rows)) <= BUCKET else MAX_LEN), np.int32)
        for i, r in enumerate(rows):
            toks[i, :len(r)] = r
        return self._prefill(self.state, cache, self.table, toks, np.array([len(r) for r in rows], np.int32),
                             np.array(slots, np.int32))

    def prefill_piece(self, cache, tokens, lengths, slots, starts):
        if int(np.max(starts)) == 0:
            return self._fresh_piece(self.state, cache, self.table, tokens, lengths, slots)
        return self._piece(self.state, cache, self.table, tokens, lengths, slots, starts)

    def decode(self, cache, tokens, active):
        return self._decode(self.state, cache, self.table, np.array(tokens, np.int32), np.array(active))

    def slot_state(self, cache, slot):
        """What `slot` holds: its KDA states and its pages of the pool (numpy)."""
        kda = [np.asarray(a)[slot] for lc in cache.layers if lc is not None for a in lc]
        return kda + [np.asarray(cache.pool)[:, self.table[slot]]]

    def full_last(self, ids):
        """Reference logits [vocab] at the last of `ids` (causal: the right padding after it is never seen)."""
        row = np.zeros((1, MAX_LEN), np.int32)
        row[0, :len(ids)] = ids
        return np.asarray(self._full(self.ref_state, row))[len(ids) - 1]


def _config(name):
    return load_config("tiny", vocab_size=264, **CONFIGS[name])


@pytest.fixture(scope="module", params=list(CONFIGS))
def runner(request):
    return Runner(KimiLinear(_config(request.param), rngs=nnx.Rngs(0)))


def _prompt(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 264, n)]


def _generate_and_check(r, cache, seqs, slot_of, steps, *, tol=1e-5):
    """Greedy decode `steps` tokens for the sequences in `seqs` (lists, extended in place), checking each step's
    logits and token against the full forward recomputed on the whole sequence so far."""
    active = [s in slot_of.values() for s in range(SLOTS)]
    for _ in range(steps):
        tokens = [0] * SLOTS
        for i, s in slot_of.items():
            tokens[s] = seqs[i][-1]
        cache, logits = r.decode(cache, tokens, active)
        for i, s in slot_of.items():
            ref = r.full_last(seqs[i])
            assert error_ratio(ref, logits[s]) < tol
            assert int(np.argmax(logits[s])) == int(np.argmax(ref))
            seqs[i].append(int(np.argmax(ref)))
    return cache


def test_prefill_then_greedy_decode_equals_full_forward(runner):
    r = runner
    cache = r.init()
    empty = r.slot_state(cache, 1)
    prompts = [_prompt(0, 11), _prompt(1, 5)]
    cache, logits = r.prefill(cache, prompts, slots=[2, 0])
    for i, p in enumerate(prompts):
        assert error_ratio(r.full_last(p), logits[i]) < 1e-5
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5, 0, 11])
    seqs = [p + [int(np.argmax(logits[i]))] for i, p in enumerate(prompts)]
    cache = _generate_and_check(r, cache, seqs, {0: 2, 1: 0}, steps=8)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5 + 8, 0, 11 + 8])
    # The inactive slot 1 was never touched.
    for a, b in zip(empty, r.slot_state(cache, 1)):
        np.testing.assert_array_equal(b, a)
    # Reusing slot 2 for a new, shorter prompt starts from a clean state; a padding row (length 0) aimed at the
    # unused slot 1 leaves it untouched.
    new = _prompt(2, 3)
    cache, logits = r.prefill(cache, [new, []], slots=[2, 1])
    assert error_ratio(r.full_last(new), logits[0]) < 1e-5
    np.testing.assert_array_equal(np.asarray(cache.lengths), [13, 0, 3])
    for a, b in zip(empty, r.slot_state(cache, 1)):
        np.testing.assert_array_equal(b, a)
    _generate_and_check(r, cache, [new + [int(np.argmax(logits[0]))], seqs[1]], {0: 2, 1: 0}, steps=3)


def test_decode_beside_an_inactive_slot_holding_a_sequence_equals_full_forward(runner):
    """An inactive slot that still holds a longer sequence is read as empty (its row costs nothing) and left
    unchanged; the active slot, over a partly filled cache, decodes as the full forward."""
    r = runner
    cache = r.init()
    prompts = [_prompt(8, 4), _prompt(9, 20)]
    cache, logits = r.prefill(cache, prompts, slots=[1, 0])
    stale = r.slot_state(cache, 0)
    cache = _generate_and_check(r, cache, [prompts[0] + [int(np.argmax(logits[0]))]], {0: 1}, steps=3)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [20, 7, 0])
    for a, b in zip(stale, r.slot_state(cache, 0)):
        np.testing.assert_array_equal(b, a)


def _prefill_pieces(r, cache, prompt, slot, cuts):
    """Prefill `prompt` into `slot` as pieces split at `cuts`, each right-padded to BUCKET and continuing the slot
    (the first fresh). Returns (cache, logits [vocab] after the last piece)."""
    bounds = [0] + list(cuts) + [len(prompt)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        toks = np.zeros((1, BUCKET), np.int32)
        toks[0, :hi - lo] = prompt[lo:hi]
        cache, logits = r.prefill_piece(cache, toks, np.array([hi - lo], np.int32), np.array([slot], np.int32),
                                        np.array([lo], np.int32))
    return cache, logits[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_in_pieces_equals_one_shot(runner, dtype):
    """Pieces continuing the slot's cache (KDA states, MLA latents) that end mid KDA chunk (16 tokens), mid length
    bucket and on both: the same logits as one-shot prefill (NoPE hybrid and RoPE all-MLA configs), then the same
    greedy decode."""
    r = runner if dtype == "float32" else Runner(KimiLinear(
        runner.model.config.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0)))
    prompt = _prompt(7, 29)
    one_cache, one = r.prefill(r.init(), [prompt], slots=[1])
    for cuts in ([5, 16], [16], [3, 11, 27]):
        cache, logits = _prefill_pieces(r, r.init(), prompt, 1, cuts)
        np.testing.assert_array_equal(np.asarray(cache.lengths), [0, 29, 0])
        assert error_ratio(one[0], logits) < (1e-5 if dtype == "float32" else 1e-2), cuts
        if dtype == "float32":
            assert error_ratio(r.full_last(prompt), logits) < 1e-5
            _generate_and_check(r, cache, [prompt + [int(np.argmax(logits))]], {0: 1}, steps=2)
        else:  # bf16: the same greedy tokens as one-shot prefill
            tok = int(np.argmax(logits))
            assert tok == int(np.argmax(one[0]))
            a = r.decode(cache, [0, tok, 0], [False, True, False])[1][1]
            b = r.decode(one_cache, [0, tok, 0], [False, True, False])[1][1]
            assert error_ratio(b, a) < 1e-2 and int(np.argmax(a)) == int(np.argmax(b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slots_sharing_pages_branch_from_one_point_mid_page(runner, dtype):
    """Two slots share a prefix through the pool: slot 0 prefills 13 tokens (ending mid page 1); slot 1 takes its
    state (KDA copied, MLA: the full page 0 SHARED, the partial page 1 copied into its own page: copy-on-write),
    then both continue with different suffixes from one page table where pages are shuffled. Each equals the full
    forward of its own sequence (f32; bf16: the same greedy tokens as a slot that prefilled alone), and slot 0's
    writes into its page 1 past the branch never reach slot 1."""
    r = runner if dtype == "float32" else Runner(KimiLinear(
        runner.model.config.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0)))
    table = np.array([[5, 2, 9, 0], [5, 7, 3, 11], [1, 4, 6, 8]], np.int32)
    r = Runner(r.model, table=table)
    base, a_tail, b_tail = _prompt(20, 13), _prompt(21, 16), _prompt(22, 10)
    cache, _ = _prefill_pieces(r, r.init(), base, 0, [])
    kda = tuple(None if lc is None else KDAState(*(a.at[1].set(a[0]) for a in lc)) for lc in cache.layers)
    pool = copy_pages(cache.pool, jnp.array([2], jnp.int32), jnp.array([7], jnp.int32))
    cache = kvcache.DecodeCache(kda, cache.lengths.at[1].set(13), pool)
    outs = []
    for slot, tail in ((0, a_tail), (1, b_tail)):
        toks = np.zeros((1, BUCKET), np.int32)
        toks[0, :len(tail)] = tail
        cache, logits = r.prefill_piece(cache, toks, np.array([len(tail)], np.int32), np.array([slot], np.int32),
                                        np.array([13], np.int32))
        outs.append(logits[0])
    np.testing.assert_array_equal(np.asarray(cache.lengths), [29, 23, 0])
    seqs = [base + a_tail, base + b_tail]
    if dtype == "float32":
        for seq, logits in zip(seqs, outs):
            assert error_ratio(r.full_last(seq), logits) < 1e-5
        _generate_and_check(r, cache, [q + [int(np.argmax(o))] for q, o in zip(seqs, outs)], {0: 0, 1: 1}, steps=3)
    else:  # each branch as a slot that prefilled its whole sequence alone
        for seq, logits in zip(seqs, outs):
            _, alone = r.prefill(r.init(), [seq], slots=[2])
            assert int(np.argmax(logits)) == int(np.argmax(alone[0])) and error_ratio(alone[0], logits) < 1e-2


def test_int4_experts_match_the_dequantized_model():
    model = KimiLinear(_config("hybrid"), rngs=nnx.Rngs(0))
    qmodel = quantize_model_experts(model)
    experts = qmodel.layers[1].block_sparse_moe.experts
    # The reference: the float model with its experts replaced by the dequantized INT4 values.
    deq = KimiLinear(_config("hybrid"), rngs=nnx.Rngs(0))
    for name in ("w1", "w3", "w2"):
        w = getattr(deq.layers[1].block_sparse_moe.experts, name)
        q = dequantize_int4(experts.int4(name)).astype(jnp.float32)
        assert error_ratio(w[...], q) > 1e-3  # really quantized
        w[...] = q
    r = Runner(qmodel, reference=deq)
    cache = r.init()
    prompt = _prompt(4, 9)
    cache, logits = r.prefill(cache, [prompt], slots=[1])
    assert error_ratio(r.full_last(prompt), logits[0]) < 1e-5
    _generate_and_check(r, cache, [prompt + [int(np.argmax(logits[0]))]], {0: 1}, steps=3)


def test_bfloat16_prefill_and_decode_run_on_cpu():
    model = KimiLinear(_config("hybrid").replace(param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(0))
    r = Runner(model)
    cache = r.init()
    assert cache.pool.dtype == jnp.bfloat16 and cache.layers[0].recurrent.dtype == jnp.float32
    prompt = _prompt(5, 7)
    cache, logits = r.prefill(cache, [prompt], slots=[0])
    assert error_ratio(r.full_last(prompt), logits[0]) < 2e-2
    tok = int(np.argmax(logits[0]))
    cache, logits = r.decode(cache, [tok, 0, 0], [True, False, False])
    assert error_ratio(r.full_last(prompt + [tok]), logits[0]) < 2e-2


def test_bad_shapes_are_rejected():
    cfg = _config("hybrid")
    model = KimiLinear(cfg, rngs=nnx.Rngs(0))
    cache = kvcache.init_cache(cfg, 2, 8, page_size=4)
    table = kvcache.identity_page_table(2, 8, 4)
    with pytest.raises(ValueError, match="exceeds a slot's 2 pages of 4 tokens"):
        prefill(model, cache, table, jnp.zeros((1, 16), jnp.int32), jnp.ones(1, jnp.int32), jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="distinct"):
        prefill(model, cache, table, jnp.zeros((2, 8), jnp.int32), jnp.ones(2, jnp.int32), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match=r"page_table must be int \[num_slots=2"):
        decode(model, cache, table[:1], jnp.zeros(2, jnp.int32), jnp.ones(2, bool))
    with pytest.raises(ValueError, match="active"):
        decode(model, cache, table, jnp.zeros(2, jnp.int32), jnp.ones(3, bool))


# ---- cache sizes -----------------------------------------------------------------------------------------------------
def _slot_bytes(config, max_len):
    abstract = jax.eval_shape(lambda: kvcache.init_cache(config, 1, max_len))
    return sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves((abstract.layers, abstract.pool)))


def test_cache_bytes_formula_matches_allocation_and_the_published_saving():
    tiny = load_config("tiny", vocab_size=264)
    for L in (16, 1008):  # whole pages of 16
        assert kvcache.cache_bytes_per_sequence(tiny, L) == _slot_bytes(tiny, L)
    hybrid = load_config("kimi_linear_48b_a3b")
    all_mla = hybrid.replace(kda_layers=None, full_attn_layers=None)
    assert (hybrid.layer_types.count("kda"), all_mla.layer_types.count("mla")) == (20, 27)
    L = hybrid.max_position_embeddings
    assert kvcache.cache_bytes_per_sequence(hybrid, L) == _slot_bytes(hybrid, L)
    # Per token: 7 vs 27 latent layers of (512 + 64) bf16 values; the KDA states are a constant 20 x ~2 MiB.
    per_token = (kvcache.cache_bytes_per_sequence(all_mla, 2 * L) - kvcache.cache_bytes_per_sequence(all_mla, L)) / L
    assert per_token == 27 * 576 * 2
    saving = 1 - kvcache.cache_bytes_per_sequence(hybrid, L) / kvcache.cache_bytes_per_sequence(all_mla, L)
    assert 0.73 < saving < 1 - 7 / 27  # "up to 75% less cache at long context"


def test_kda_state_zeros_shape_matches_cache():
    cfg = load_config("tiny", vocab_size=264)
    cache = kvcache.init_cache(cfg, 3, 8)
    ref = KDAState.zeros(3, cfg)
    for a, b in zip(cache.layers[0], ref):
        assert a.shape == b.shape and a.dtype == b.dtype
    names = kvcache.cache_logical_names(cache)
    assert names.layers[0].recurrent == ("batch", "heads", None, None) and names.lengths == ("batch",)
    assert names.pool == (None,) * 4  # replicated: any slot reads any page


# ---- sampling --------------------------------------------------------------------------------------------------------
def _truncated_probs(logits, t, k, p):
    """Plain numpy: the distribution sampling should draw from (temperature, top-k, then top-p on the rest)."""
    z = logits / t
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[:k if k else len(z)]] = True
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    sp = probs[order]
    before = np.cumsum(sp) - sp
    kept = order[(before < p) | (np.arange(len(z)) == 0)]
    out = np.zeros(len(z))
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.mark.parametrize("t, k, p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (1.0, 4, 0.8)])
def test_sampling_follows_the_truncated_distribution(t, k, p):
    V, N = 8, 4000
    logits = np.asarray(jax.random.normal(jax.random.key(0), (V,)) * 1.5, np.float64)
    want = _truncated_probs(logits, t, k, p)
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, V))
    out = jax.jit(sample)(rows, jnp.full(N, t, jnp.float32), jnp.full(N, k, jnp.int32), jnp.full(N, p, jnp.float32),
                          row_keys(jnp.arange(N, dtype=jnp.uint32), jnp.zeros(N, jnp.int32)))
    freq = np.bincount(np.asarray(out.tokens), minlength=V) / N
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
    assert np.abs(freq - want).max() < 0.03  # ~4 standard errors at N = 4000


def test_greedy_logprobs_and_per_row_seeds():
    V = 16
    sample_ = jax.jit(sample)
    logits = jax.random.normal(jax.random.key(1), (4, V))
    zeros, ones = jnp.zeros(4), jnp.ones(4)
    keys = row_keys(jnp.array([5, 5, 9, 5], jnp.uint32), jnp.array([0, 0, 0, 1]))
    greedy = sample_(logits, zeros, jnp.zeros(4, jnp.int32), ones, keys)
    np.testing.assert_array_equal(greedy.tokens, np.argmax(logits, -1))
    np.testing.assert_array_equal(sample_(logits, zeros, jnp.zeros(4, jnp.int32), ones, keys,
                                         all_greedy=jnp.bool_(True)).tokens, np.argmax(logits, -1))
    logp = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(greedy.logprob, logp.max(-1), atol=1e-6)
    np.testing.assert_allclose(greedy.top_logprobs, -np.sort(-logp, -1)[:, :5], atol=1e-6)
    # A row's sample depends only on its own logits, seed and counter, not on its position or neighbours.
    same = jnp.broadcast_to(logits[0], (4, V))
    a = sample_(same, ones, jnp.zeros(4, jnp.int32), ones, keys).tokens
    b = sample_(same[::-1], ones, jnp.zeros(4, jnp.int32), ones, keys[::-1]).tokens[::-1]
    np.testing.assert_array_equal(a, b)
    many = sample_(jnp.broadcast_to(logits[0], (64, V)), jnp.ones(64), jnp.zeros(64, jnp.int32), jnp.ones(64),
                  row_keys(jnp.full(64, 5, jnp.uint32), jnp.arange(64))).tokens
    assert len(set(np.asarray(many).tolist())) > 3  # counters give fresh randomness per token

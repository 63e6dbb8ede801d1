"""kda_chunk (and the dispatch / decode step) against kda_reference, the per-token recurrence.

Tolerances are error ratios ||ref - x|| / ||ref||. Inputs look like the layer's: q, k L2-normalised per head,
g = -softplus(.) log-decays, beta in (0, 1), a nonzero initial state, and K != V.
Compile time dominates on CPU: most tests use B=2, H=2, K=16, V=8 and lengths that pad to 1, 2 or 4 chunks of 64,
so eager calls reuse kda_chunk's compiled scan.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kda import chunk as chunk_module
from pallas_kernels.kda import kda, kda_chunk, kda_reference, kda_step
from tests.conftest import error_ratio

B, H, K, V = 2, 2, 16, 8
ARG_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(seed, T, B=B, h=H, k_dim=K, v_dim=V, dtype=jnp.float32):
    """(q, k, v, g, beta, initial_state), plus cotangents (do, ds) for gradient checks (numpy-made: no compiles)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(normal(B, T, h, k_dim)), unit(normal(B, T, h, k_dim))
    v = normal(B, T, h, v_dim)
    g = -np.logaddexp(0.0, normal(B, T, h, k_dim) - 1.0)  # -softplus
    beta = 1.0 / (1.0 + np.exp(-normal(B, T, h)))
    s0 = normal(B, h, k_dim, v_dim)
    cot = (jnp.asarray(normal(B, T, h, v_dim)), jnp.asarray(normal(B, h, k_dim, v_dim)))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, g, beta)) + (jnp.asarray(s0),), cot


def value_and_grads(fn, args, cot, segment_ids=None, chunk_size=None):
    """(o, final_state, grads wrt q, k, v, g, beta, initial_state) under the cotangent cot = (do, ds)."""
    kw = {} if chunk_size is None else {"chunk_size": chunk_size}

    def f(q, k, v, g, beta, s0):
        return fn(q, k, v, g, beta, initial_state=s0, output_final_state=True, segment_ids=segment_ids, **kw)

    (o, s), vjp = jax.vjp(f, *args)
    return o, s, vjp(cot)


# The reference is jitted whole; kda_chunk is called eagerly (its stages are jitted inside, so lengths that pad to
# the same chunk count share one compiled program).
ref_value_and_grads = jax.jit(lambda args, cot, seg=None: value_and_grads(kda_reference, args, cot, seg))


@jax.jit
def reference(q, k, v, g, beta, s0=None, seg=None):
    return kda_reference(q, k, v, g, beta, initial_state=s0, output_final_state=True, segment_ids=seg)


def assert_close(ref, got, tol, what=""):
    r = error_ratio(ref, got)
    assert r <= tol, f"{what}: error ratio {r:.3g} > {tol:g}"


def assert_all_close(ref, got, tol_value, tol_grad):
    o_r, s_r, g_r = ref
    o_c, s_c, g_c = got
    assert_close(o_r, o_c, tol_value, "o")
    assert_close(s_r, s_c, tol_value, "final state")
    for name, a, b in zip(ARG_NAMES, g_r, g_c):
        assert_close(a, b, tol_grad, f"d{name}")


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_chunk_matches_reference_values_and_grads(T):
    args, cot = make_inputs(T, T=T)
    ref = ref_value_and_grads(args, cot)
    got = value_and_grads(kda_chunk, args, cot, chunk_size=64)
    assert got[0].shape == (B, T, H, V) and got[0].dtype == jnp.float32 and got[1].dtype == jnp.float32
    assert_all_close(ref, got, 1e-5, 1e-4)


@pytest.mark.parametrize("chunk_size", [16, 48, 128])
def test_other_chunk_sizes(chunk_size):
    args, _ = make_inputs(7, T=100)
    o_r, s_r = reference(*args)
    o_c, s_c = kda_chunk(*args[:5], initial_state=args[5], output_final_state=True, chunk_size=chunk_size)
    assert_close(o_r, o_c, 1e-5, "o")
    assert_close(s_r, s_c, 1e-5, "final state")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    args, _ = make_inputs(3, T=130, dtype=dtype)
    s0 = args[5].astype(dtype)
    o_r, s_r = reference(*args[:5], s0)
    o_c, s_c = kda_chunk(*args[:5], initial_state=s0, output_final_state=True)
    assert o_c.dtype == dtype and s_c.dtype == jnp.float32
    assert_close(o_r.astype(jnp.float32), o_c.astype(jnp.float32), 5e-3, "o")
    assert_close(s_r, s_c, 5e-3, "final state")


def test_no_initial_state_and_no_final_state():
    args, _ = make_inputs(5, T=150)
    o_r, _ = reference(*args[:5])
    o_c, s_c = kda_chunk(*args[:5])
    assert s_c is None
    assert_close(o_r, o_c, 1e-5, "o")


def _segments_row(T, spans):
    seg = np.zeros((T,), np.int32)
    for start, stop, sid in spans:
        seg[start:stop] = sid
    return seg


def test_packed_segments_equal_separate_runs():
    # Row 0: boundaries at 37 and 90 (not chunk edges), the middle segment crosses the chunk edge at 64, and the
    # last one reuses the first id (a change of id restarts, not the value). Row 1: boundary at the edge 64.
    T = 150
    rows = [[(0, 37, 5), (37, 90, 2), (90, 150, 5)], [(0, 64, 1), (64, 150, 3)]]
    args, _ = make_inputs(11, T=T)
    seg = jnp.asarray(np.stack([_segments_row(T, spans) for spans in rows]))
    o, s = kda_chunk(*args[:5], initial_state=args[5], output_final_state=True, segment_ids=seg)
    # The separate runs, batched: each segment left-aligned in its own row and zero-padded at the end (zero
    # q, k, v, beta, g tokens leave the plain recurrence's state unchanged), no segment ids.
    pieces = [(b, i, a, e) for b, spans in enumerate(rows) for i, (a, e, _) in enumerate(spans)]
    sep = [jnp.stack([jnp.pad(x[b, a:e], [(0, T - (e - a))] + [(0, 0)] * (x.ndim - 2)) for b, _, a, e in pieces])
           for x in args[:5]]
    s0 = jnp.stack([args[5][b] if i == 0 else jnp.zeros_like(args[5][b]) for b, i, _, _ in pieces])
    o_sep, s_sep = reference(*sep, s0)  # the first segment continues initial_state, the others restart
    for n, (b, i, a, e) in enumerate(pieces):
        assert_close(o_sep[n, : e - a], o[b, a:e], 1e-5, f"o of row {b} segment {i}")
        if e == T:
            assert_close(s_sep[n], s[b], 1e-5, f"row {b} final state = its last segment's state")


def test_padding_is_transparent_and_zero():
    T, pad = 130, 23
    args, _ = make_inputs(13, T=T)
    o_plain, s_plain = reference(*args)
    # Left padding plus a run of padding inside the sequence, with junk (3.0, even for g) under the padding.
    inner = slice(pad + 60, pad + 70)
    padded = []
    for x in args[:5]:
        x = jnp.concatenate([jnp.full((B, pad) + x.shape[2:], 3.0, x.dtype), x], axis=1)
        padded.append(jnp.concatenate([x[:, : inner.start], jnp.full_like(x[:, inner], 3.0), x[:, inner.start:]], 1))
    seg = np.full((B, pad + T + 10), 4, np.int32)
    seg[:, :pad] = 0
    seg[:, inner] = 0
    o, s = kda_chunk(*padded, initial_state=args[5], output_final_state=True, segment_ids=jnp.asarray(seg))
    real = seg[0] != 0
    assert np.all(np.asarray(o)[:, ~real] == 0.0), "padding outputs must be exactly zero"
    assert_close(o_plain, o[:, real], 1e-5, "o of the real tokens")
    assert_close(s_plain, s, 1e-5, "final state")


def test_segments_and_padding_grads_match_reference():
    T = 140
    args, cot = make_inputs(17, T=T)
    seg = np.stack([_segments_row(T, [(0, 30, 1), (30, 75, 2), (80, 140, 3)]),  # pad 75..79
                    _segments_row(T, [(20, 100, 7), (100, 140, 9)])])  # left padding
    seg = jnp.asarray(seg)
    ref = ref_value_and_grads(args, cot, seg)
    got = value_and_grads(kda_chunk, args, cot, segment_ids=seg, chunk_size=64)
    assert_all_close(ref, got, 1e-5, 1e-4)


def test_prefill_then_continue_equals_one_pass():
    T1, T2 = 150, 50
    args, _ = make_inputs(19, T=T1 + T2)
    o_all, s_all = kda_chunk(*args[:5], initial_state=args[5], output_final_state=True)
    o1, s1 = kda_chunk(*[x[:, :T1] for x in args[:5]], initial_state=args[5], output_final_state=True)
    o2, s2 = kda_chunk(*[x[:, T1:] for x in args[:5]], initial_state=s1, output_final_state=True)
    assert_close(o_all, jnp.concatenate([o1, o2], axis=1), 1e-5, "o")
    assert_close(s_all, s2, 1e-5, "final state")


def test_decode_step_loop_matches_reference():
    T = 12
    args, _ = make_inputs(23, T=T)
    o_ref, s_ref = reference(*args)

    @jax.jit
    def decode(q, k, v, g, beta, state):
        outs = []
        for t in range(T):
            o_t, state = kda_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
            outs.append(o_t)
        return jnp.stack(outs, axis=1), state

    o, state = decode(*args)
    assert state.dtype == jnp.float32
    assert_close(o_ref, o, 1e-5, "o")
    assert_close(s_ref, state, 1e-5, "state")


def test_strong_gates_stay_finite_and_match():
    # g = -20 on every channel for 140 tokens: chunk-local cumulative gates reach -1280 (exp overflows at +88).
    T = 200
    args, cot = make_inputs(29, T=T)
    q, k, v, g, beta, s0 = args
    g = g.at[:, 10:150].set(-20.0 + 0.1 * g[:, 10:150])
    g = g.at[:, 160:, :, : K // 2].add(-20.0)  # half the channels collapse, the other half keep memory
    seg = jnp.asarray(np.stack([_segments_row(T, [(0, 100, 1), (100, 200, 2)])] * B))
    for segment_ids in (None, seg):
        ref = ref_value_and_grads((q, k, v, g, beta, s0), cot, segment_ids)
        got = value_and_grads(kda_chunk, (q, k, v, g, beta, s0), cot, segment_ids=segment_ids, chunk_size=64)
        for x in jax.tree.leaves(got):
            assert bool(jnp.all(jnp.isfinite(x))), "non-finite value or gradient"
        # Cumulative gates of -1300 leave ~1e-4 absolute error in f32 exponent differences: looser tolerances.
        assert_all_close(ref, got, 5e-5, 5e-4)


def test_dispatch_routes_to_implementations():
    args, _ = make_inputs(31, T=40)
    kw = dict(initial_state=args[5], output_final_state=True)
    chunk = kda_chunk(*args[:5], **kw)
    ref = kda_reference(*args[:5], **kw)
    for impl, expected in (("auto", chunk), ("chunk", chunk), ("reference", ref)):
        got = kda(*args[:5], impl=impl, **kw)
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=impl)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=jnp.zeros((1, 8, H))), "q must be"),
        (dict(v=jnp.zeros((1, 8, H + 1, V))), "v must be"),
        (dict(beta=jnp.zeros((1, 8))), "beta must be"),
        (dict(g=jnp.zeros((1, 8, H, K + 1))), "g .*must have"),
        (dict(initial_state=jnp.zeros((1, H, V, K))), "initial_state must be"),
        (dict(segment_ids=jnp.ones((1, 8), jnp.float32)), "segment_ids must be an integer"),
        (dict(segment_ids=jnp.ones((1, 9), jnp.int32)), "segment_ids must be"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=24), "chunk_size must be a positive multiple of 16"),
        (dict(chunk_size=64.0), "chunk_size"),
        (dict(impl="pallas_typo"), "impl must be one of"),
    ],
)
def test_bad_inputs_raise(change, match):
    args, _ = make_inputs(0, T=8, B=1)
    kw = dict(zip(ARG_NAMES, args))
    kw.update(change)
    impl = kw.pop("impl", "chunk")
    q, k, v, g, beta = (kw.pop(n) for n in ARG_NAMES[:5])
    with pytest.raises(ValueError, match=match):
        kda(q, k, v, g, beta, impl=impl, **kw)


@pytest.mark.parametrize("chunk_size, segmented", [(16, True), (48, False)])
def test_chunk_sizes_values_and_grads(chunk_size, segmented):
    # 16: one 16-row block (no level-A term); 48: a chunk that is not a power of two.
    T = 100
    args, cot = make_inputs(37, T=T)
    seg = jnp.asarray(np.stack([_segments_row(T, [(0, 41, 1), (44, 100, 2)]), _segments_row(T, [(3, 100, 5)])]))
    seg = seg if segmented else None
    ref = ref_value_and_grads(args, cot, seg)
    got = value_and_grads(kda_chunk, args, cot, segment_ids=seg, chunk_size=chunk_size)
    assert_all_close(ref, got, 1e-5, 1e-4)


def test_one_sequence_one_head_grads():
    # B = H = 1: every batch dim of the working arrays is 1 (XLA:CPU once crashed on size-1 batch dims).
    args, cot = make_inputs(41, T=70, B=1, h=1)
    assert_all_close(ref_value_and_grads(args, cot), value_and_grads(kda_chunk, args, cot), 1e-5, 1e-4)


def test_group_size_rule():
    # A sequence whose arrays fit in WHOLE_ELEMS runs as one group (e.g. the default training batch: 4 chunks of
    # B*H*C*K = 32*4*64*32 elements); longer ones in power-of-two groups within GROUP_ELEMS.
    assert chunk_module.group_chunks(4, 32 * 4 * 64 * 32) == 4
    assert chunk_module.group_chunks(3, 1000) == 3
    assert chunk_module.group_chunks(5, 32 * 4 * 64 * 32) == 1
    assert chunk_module.group_chunks(128, 4 * 64 * 128) == 2   # B=1, H=4, K=V=128, T=8192


def test_many_groups_with_segments_across_group_edges(monkeypatch):
    # Small groups (2 chunks of 16 per scan step, 4 steps) so the state, segments and gradients cross steps.
    monkeypatch.setattr(chunk_module, "GROUP_ELEMS", 2 * B * H * 16 * K)
    monkeypatch.setattr(chunk_module, "WHOLE_ELEMS", 0)
    T = 120
    assert chunk_module.group_chunks(-(-T // 16), B * H * 16 * K) == 2
    args, cot = make_inputs(43, T=T)
    seg = jnp.asarray(np.stack([_segments_row(T, [(0, 31, 1), (33, 70, 2), (70, 120, 1)]),
                                _segments_row(T, [(5, 64, 3), (64, 96, 4), (96, 118, 3)])]))
    ref = ref_value_and_grads(args, cot, seg)
    got = value_and_grads(kda_chunk, args, cot, segment_ids=seg, chunk_size=16)
    assert_all_close(ref, got, 1e-5, 1e-4)


def test_bfloat16_grads_within_fla_bounds():
    args, (do, ds) = make_inputs(47, T=90, dtype=jnp.bfloat16)
    cot = (do.astype(jnp.bfloat16), ds)
    ref = ref_value_and_grads(args, cot)
    o, s, grads = value_and_grads(kda_chunk, args, cot)
    assert o.dtype == jnp.bfloat16 and all(g.dtype == a.dtype for g, a in zip(grads, args))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    assert_close(f32(ref[0]), f32(o), 5e-3, "o")
    tols = dict(q=8e-3, k=8e-3, v=8e-3, initial_state=8e-3, g=2e-2, beta=2e-2)
    for name, r, x in zip(ARG_NAMES, ref[2], grads):
        assert_close(f32(r), f32(x), tols[name], f"d{name}")


def test_extreme_gates_inside_diagonal_blocks():
    # Gates far below the -20 clamp of the 8-row diagonal blocks (-1000), exactly at it, just above it, and runs
    # of strong decay that end inside a block: values and gradients stay finite and match the recurrence.
    T = 64
    args, cot = make_inputs(53, T=T)
    q, k, v, g, beta, s0 = args
    g = g.at[:, 3].set(-1000.0).at[:, 9].set(-20.0).at[:, 10].set(-19.5).at[:, 20:29].set(-30.0)
    g = g.at[:, 40:, :, : K // 2].set(-60.0)
    ref = ref_value_and_grads((q, k, v, g, beta, s0), cot)
    got = value_and_grads(kda_chunk, (q, k, v, g, beta, s0), cot, chunk_size=64)
    for x in jax.tree.leaves(got):
        assert bool(jnp.all(jnp.isfinite(x))), "non-finite value or gradient"
    # Chunk-local cumulative gates near -2000 carry ~1e-4 absolute float32 error into every exponent difference:
    # the tolerances of test_strong_gates_stay_finite_and_match (measured here: o 1.0e-5, grads <= 4.9e-5).
    assert_all_close(ref, got, 5e-5, 5e-4)


def test_outputs_before_a_changed_token_are_bitwise_unchanged():
    # Causality to the last bit (the model's causality test compares logits exactly): changing token t, in the
    # middle of an 8-row diagonal block, must not move any earlier output even by rounding.
    T, t = 64, 21
    args, _ = make_inputs(59, T=T)
    changed = [x.at[:, t].set(x[:, t] * 0.5 - 0.25) for x in args[:5]]
    o1, _ = kda_chunk(*args[:5], initial_state=args[5], output_final_state=True)
    o2, _ = kda_chunk(*changed, initial_state=args[5], output_final_state=True)
    np.testing.assert_array_equal(np.asarray(o1[:, :t]), np.asarray(o2[:, :t]))
    assert float(jnp.abs(o1[:, t:] - o2[:, t:]).max()) > 1e-3

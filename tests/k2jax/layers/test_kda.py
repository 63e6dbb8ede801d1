"""ShortConv and the KDA layer against plain float64 numpy implementations written from kimi_linear.md section 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.layers.kda import KDAState, KimiDeltaAttention
from k2jax.layers.short_conv import ShortConv
from tests.conftest import error_ratio

CFG = k2jax.load_config("tiny")  # hidden 64, H=2, K=16, W=4, chunk 16
H, K, W, HID = CFG.kda_num_heads, CFG.kda_head_dim, CFG.short_conv_kernel_size, CFG.hidden_size


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _rand(seed, *shape, scale=1.0):
    """Normal samples that are exactly representable in float32 (so state copies compare exactly)."""
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32).astype(np.float64)


def _silu(x):
    return x / (1.0 + np.exp(-x))


# ---- plain ShortConv: HF formula, HF weight layout, segment semantics spelled out ------------------------------
def _hf_conv_weight(conv):
    """Our [W, C] weight in HF's Conv1d layout [C, 1, W]."""
    return _f64(conv.weight[...]).T[:, None, :]


def conv_np(x, w_hf, seg=None, state=None):
    """y_t[c] = SiLU(sum_i w_hf[c,0,i] x_{t-W+1+i}[c]) over the row's real tokens, per run of equal segment ids
    (padding id 0 skipped); the first run's left context is `state`, later runs start from zeros.
    Returns (y [B,T,C], context after the last real token [B,W-1,C])."""
    B, T, C = x.shape
    Wk = w_hf.shape[-1]
    y = np.zeros((B, T, C))
    new_state = np.zeros((B, Wk - 1, C))
    for b in range(B):
        ids = np.ones(T, int) if seg is None else np.asarray(seg[b])
        runs = []
        for t in range(T):
            if ids[t] == 0:
                continue
            if runs and ids[runs[-1][-1]] == ids[t]:
                runs[-1].append(t)
            else:
                runs.append([t])
        ctx0 = np.zeros((Wk - 1, C)) if state is None else state[b]
        new_state[b] = ctx0
        for r, run in enumerate(runs):
            xs = np.concatenate([ctx0 if r == 0 else np.zeros((Wk - 1, C)), x[b, run]], axis=0)
            for n, t in enumerate(run):
                window = xs[n:n + Wk]  # oldest first; window[Wk-1] is token t
                y[b, t] = _silu(np.einsum("ci,ic->c", w_hf[:, 0, :], window))
            new_state[b] = xs[len(xs) - (Wk - 1):]
    return y, new_state


def _conv(C=8, seed=0):
    return ShortConv(C, W, rngs=nnx.Rngs(seed))


def test_short_conv_matches_hf_formula():
    conv = _conv()
    assert conv.weight[...].shape == (W, 8)
    assert conv.weight.get_metadata()["out_sharding"] == ("conv", "heads")
    x = _rand(0, 2, 9, 8)
    y, st = conv(jnp.asarray(x, jnp.float32))
    ref, ref_st = conv_np(x, _hf_conv_weight(conv))
    assert error_ratio(ref, y) <= 1e-6
    np.testing.assert_allclose(_f64(st), x[:, -(W - 1):], rtol=0, atol=0)
    assert error_ratio(ref_st, st) == 0.0


def test_short_conv_segments_and_padding_do_not_leak():
    conv = _conv(seed=1)
    x = _rand(1, 3, 12, 8)
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3],
                    [0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0],       # left and right padding
                    [5, 5, 0, 0, 5, 5, 6, 6, 0, 6, 0, 0]])      # padding inside segments is skipped
    state = _rand(11, 3, W - 1, 8)
    y, st = conv(jnp.asarray(x, jnp.float32), jnp.asarray(seg, jnp.int32), jnp.asarray(state, jnp.float32))
    ref, ref_st = conv_np(x, _hf_conv_weight(conv), seg, state)
    assert error_ratio(ref, y) <= 1e-6
    assert np.all(_f64(y)[seg == 0] == 0.0)
    assert error_ratio(ref_st, st) == 0.0
    # Row 0, segment 2: only 2 tokens, so its context is [0, x5, x6] (no leak from segment 1, no old state).
    np.testing.assert_array_equal(_f64(st)[0], ref_st[0])
    # Segment 2 of row 0 equals a fresh run on its own tokens.
    alone, _ = conv(jnp.asarray(x[:1, 5:7], jnp.float32))
    np.testing.assert_allclose(_f64(y)[0, 5:7], _f64(alone)[0], rtol=1e-6, atol=1e-7)


def test_short_conv_all_padding_row_keeps_state():
    conv = _conv(seed=2)
    state = _rand(2, 1, W - 1, 8)
    x = _rand(3, 1, 5, 8)
    y, st = conv(jnp.asarray(x, jnp.float32), jnp.zeros((1, 5), jnp.int32), jnp.asarray(state, jnp.float32))
    assert np.all(_f64(y) == 0.0)
    np.testing.assert_array_equal(_f64(st), state)


@pytest.mark.parametrize("kernel_size", [1, 2, 5])
def test_short_conv_other_kernel_sizes(kernel_size):
    conv = ShortConv(6, kernel_size, rngs=nnx.Rngs(4))
    x, state = _rand(5, 2, 7, 6), _rand(6, 2, kernel_size - 1, 6)
    seg = np.array([[0, 1, 1, 0, 2, 2, 2], [3, 3, 3, 3, 3, 0, 0]])
    y, st = conv(jnp.asarray(x, jnp.float32), jnp.asarray(seg, jnp.int32), jnp.asarray(state, jnp.float32))
    ref, ref_st = conv_np(x, _hf_conv_weight(conv), seg, state)
    assert error_ratio(ref, y) <= 1e-6
    assert st.shape == (2, kernel_size - 1, 6) and error_ratio(ref_st, st) == 0.0


@pytest.mark.parametrize("t1", [1, 2, 6])
def test_short_conv_continuation_equals_one_pass(t1):
    conv = _conv(seed=3)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 9, 8)), jnp.float32)
    y, st = conv(x)
    y1, st1 = conv(x[:, :t1])
    y2, st2 = conv(x[:, t1:], conv_state=st1)
    np.testing.assert_allclose(_f64(jnp.concatenate([y1, y2], 1)), _f64(y), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(_f64(st2), _f64(st))
    # Step loop from the prefix state.
    s, ys = st1, []
    for t in range(t1, 9):
        yt, s = conv.step(x[:, t], s)
        ys.append(yt)
    np.testing.assert_allclose(_f64(jnp.stack(ys, 1)), _f64(y[:, t1:]), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(_f64(s), _f64(st))


def test_short_conv_bad_input():
    conv = _conv()
    with pytest.raises(ValueError, match="C=8"):
        conv(jnp.zeros((2, 5, 7)))
    with pytest.raises(ValueError, match="segment_ids"):
        conv(jnp.zeros((2, 5, 8)), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="conv_state"):
        conv(jnp.zeros((2, 5, 8)), None, jnp.zeros((2, W, 8)))
    with pytest.raises(ValueError, match="conv_state"):
        conv.step(jnp.zeros((2, 8)), jnp.zeros((1, W - 1, 8)))


# ---- plain KDA layer -------------------------------------------------------------------------------------------
def _layer(cfg=CFG, seed=0):
    """A layer with parameters large enough that every term matters (the default init is near-degenerate)."""
    layer = KimiDeltaAttention(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 100)
    gains = {"f_b_proj": 0.3}
    for name in ("q_proj", "k_proj", "v_proj", "f_a_proj", "f_b_proj", "b_proj", "g_a_proj", "g_b_proj", "o_proj"):
        kern = getattr(layer, name).kernel
        fan_in = kern[...].shape[0]
        kern[...] = jnp.asarray(rng.normal(size=kern[...].shape) * gains.get(name, 1.0) / np.sqrt(fan_in),
                                kern[...].dtype)
    layer.o_norm.weight[...] = jnp.asarray(1.0 + 0.3 * rng.normal(size=K), layer.o_norm.weight[...].dtype)
    return layer


def _params64(layer):
    p = {n: _f64(getattr(layer, n).kernel[...]) for n in
         ("q_proj", "k_proj", "v_proj", "f_a_proj", "f_b_proj", "b_proj", "g_a_proj", "g_b_proj", "o_proj")}
    p.update(A_log=_f64(layer.A_log[...]), dt_bias=_f64(layer.dt_bias[...]), o_norm=_f64(layer.o_norm.weight[...]),
             conv=[_hf_conv_weight(c) for c in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)])
    return p


def kda_layer_np(p, x, state=None, eps=CFG.rms_norm_eps):
    """Steps 1-8 of kimi_linear.md section 1, token by token in float64. x: [B, T, hidden].
    state: (conv_q, conv_k, conv_v, S) numpy or None. Returns (y, (conv_q, conv_k, conv_v, S))."""
    B, T, _ = x.shape
    convs = [None] * 3 if state is None else list(state[:3])
    outs = [conv_np(x @ p[n], w, None, c) for n, w, c in zip(("q_proj", "k_proj", "v_proj"), p["conv"], convs)]
    (q, cq), (k, ck), (v, cv) = outs
    q, k, v = (a.reshape(B, T, H, K) for a in (q, k, v))
    f = (x @ p["f_a_proj"] @ p["f_b_proj"]).reshape(B, T, H, K) + p["dt_bias"].reshape(H, K)
    softplus = np.where(f > 20, f, np.log1p(np.exp(np.minimum(f, 20))))  # torch threshold-20 softplus
    g = -np.exp(p["A_log"])[:, None] * softplus
    beta = 1.0 / (1.0 + np.exp(-(x @ p["b_proj"])))
    z = (x @ p["g_a_proj"] @ p["g_b_proj"]).reshape(B, T, H, K)
    S = np.zeros((B, H, K, K)) if state is None else np.array(state[3], np.float64)
    o = np.zeros((B, T, H, K))
    for b in range(B):
        for t in range(T):
            for h in range(H):
                qh = q[b, t, h] / np.sqrt(np.sum(q[b, t, h] ** 2) + 1e-6)
                kh = k[b, t, h] / np.sqrt(np.sum(k[b, t, h] ** 2) + 1e-6)
                Sd = np.exp(g[b, t, h])[:, None] * S[b, h]
                S[b, h] = Sd + beta[b, t, h] * np.outer(kh, v[b, t, h] - Sd.T @ kh)
                o[b, t, h] = S[b, h].T @ (qh * K ** -0.5)
    on = o / np.sqrt(np.mean(o ** 2, -1, keepdims=True) + eps) * p["o_norm"] / (1.0 + np.exp(-z))
    return on.reshape(B, T, H * K) @ p["o_proj"], (cq, ck, cv, S)


def _x(B, T, seed=0):
    return np.random.default_rng(seed).normal(size=(B, T, HID))


# One compiled program per input structure keeps the file fast (eager flax compiles every op separately).
_fwd = nnx.jit(lambda m, x, seg, st: m(x, segment_ids=seg, cache=st))

@nnx.jit
def _step(m, xt, st):
    """One decode token per row (x_t [B, hidden]) through the layer's call with a cache."""
    y, st = m(xt[:, None], cache=st)
    return y[:, 0], st


def fwd(layer, x, seg=None, state=None):
    """(y, new_state) of a jitted layer call with a cache (zero states when `state` is None)."""
    state = KDAState.zeros(x.shape[0], layer.config) if state is None else state
    return _fwd(layer, jnp.asarray(x, jnp.float32), None if seg is None else jnp.asarray(seg, jnp.int32), state)


@pytest.fixture(scope="module")
def layer():
    # The per-token reference op compiles fast; the chunked op ("auto") is covered below, and its equivalence to
    # the reference (segments included) is the kernel tests' job.
    return _layer(CFG.replace(kda_impl="reference"), seed=3)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_kda_layer_matches_plain_implementation(impl):
    layer = _layer(CFG.replace(kda_impl=impl))
    x = _x(2, 21, seed=1)
    y, st = fwd(layer, x)
    ref, ref_st = kda_layer_np(_params64(layer), x)
    assert y.shape == (2, 21, HID) and y.dtype == jnp.float32
    assert error_ratio(ref, y) <= 1e-5
    for a, b in zip(ref_st, st):
        assert error_ratio(a, b) <= 1e-5
    assert st.recurrent.dtype == jnp.float32 and st.recurrent.shape == (2, H, K, K)
    # The same rows left-padded (row 0) and right-padded (row 1) through the segment path.
    pad = np.random.default_rng(2).normal(size=(2, 3, HID))
    xp = np.stack([np.concatenate([pad[0], x[0]]), np.concatenate([x[1], pad[1]])])
    seg = np.array([[0] * 3 + [1] * 21, [7] * 21 + [0] * 3])
    yp, stp = fwd(layer, xp, seg)
    assert error_ratio(ref[0], yp[0, 3:]) <= 1e-5 and error_ratio(ref[1], yp[1, :21]) <= 1e-5
    assert error_ratio(ref_st[3], stp.recurrent) <= 1e-5


def test_kda_layer_from_state_matches_plain_implementation(layer):
    rng = np.random.default_rng(5)
    state = KDAState(*(jnp.asarray(rng.normal(size=(2, W - 1, H * K)), jnp.float32) for _ in range(3)),
                     jnp.asarray(rng.normal(size=(2, H, K, K)) * 0.3, jnp.float32))
    x = _x(2, 6, seed=2)
    y, _ = fwd(layer, x, state=state)
    ref, _ = kda_layer_np(_params64(layer), x, tuple(_f64(s) for s in state))
    assert error_ratio(ref, y) <= 1e-5


def test_kda_layer_parameters_follow_hf_names_and_init():
    layer = KimiDeltaAttention(CFG, rngs=nnx.Rngs(0))
    shapes = {n: getattr(layer, n).kernel[...].shape for n in
              ("q_proj", "k_proj", "v_proj", "f_a_proj", "f_b_proj", "b_proj", "g_a_proj", "g_b_proj", "o_proj")}
    assert shapes == {"q_proj": (HID, H * K), "k_proj": (HID, H * K), "v_proj": (HID, H * K),
                      "f_a_proj": (HID, K), "f_b_proj": (K, H * K), "b_proj": (HID, H),
                      "g_a_proj": (HID, K), "g_b_proj": (K, H * K), "o_proj": (H * K, HID)}
    assert layer.q_conv1d.weight[...].shape == (W, H * K)
    assert layer.A_log[...].shape == (H,) and layer.A_log[...].dtype == jnp.float32
    assert layer.dt_bias[...].shape == (H * K,) and layer.dt_bias[...].dtype == jnp.float32
    assert layer.o_norm.weight[...].shape == (K,)
    A = np.exp(_f64(layer.A_log[...]))
    assert np.all((A >= 1.0) & (A <= 16.0))
    dt = np.log1p(np.exp(_f64(layer.dt_bias[...])))
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
    assert layer.A_log.get_metadata()["out_sharding"] == ("heads",)


def test_softplus_matches_torch_threshold_form():
    x = np.linspace(-30.0, 100.0, 20001, dtype=np.float32)
    ours = np.asarray(jax.nn.softplus(jnp.asarray(x)))
    torch_form = np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))).astype(np.float32)
    np.testing.assert_array_equal(ours[x > 20], x[x > 20])  # identity above the threshold, exactly
    np.testing.assert_allclose(ours, torch_form, rtol=3e-7, atol=0)
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda a: jax.nn.softplus(a).sum())(jnp.asarray(x)))))


def test_kda_layer_bf16_under_jit(layer):
    layer32 = layer
    cfg16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    layer16 = KimiDeltaAttention(cfg16, rngs=nnx.Rngs(0))
    nnx.update(layer16, jax.tree.map(lambda a, b: a.astype(b.dtype), nnx.state(layer32, nnx.Param),
                                     nnx.state(layer16, nnx.Param)))
    x = _x(2, 19, seed=3)
    seg = np.array([[0, 0] + [1] * 10 + [2] * 7, [3] * 19], np.int32)
    graphdef, params = nnx.split(layer16)

    @jax.jit
    def run(params, x, seg):
        m = nnx.merge(graphdef, params)
        y, st = m(x, segment_ids=seg, cache=KDAState.zeros(x.shape[0], cfg16))
        yt, st2 = m(x[:, -1:], cache=st)
        yt = yt[:, 0]
        return y, st, yt, st2

    y, st, yt, st2 = run(params, jnp.asarray(x, jnp.bfloat16), jnp.asarray(seg))
    assert y.dtype == jnp.bfloat16 and yt.dtype == jnp.bfloat16
    assert st.conv_q.dtype == jnp.bfloat16 and st.recurrent.dtype == jnp.float32
    y32, st32 = fwd(layer32, x, seg)
    yt32, _ = _step(layer32, jnp.asarray(x[:, -1], jnp.float32), st32)
    # bf16 weights, activations, q/k/v and output; gates and states stay float32. Measured 8.6e-3 (y),
    # 6.3e-3 (recurrent state), 7.5e-3 (step).
    assert error_ratio(y32, y) <= 3e-2
    assert error_ratio(st32.recurrent, st.recurrent) <= 3e-2
    assert error_ratio(yt32, yt) <= 3e-2


@pytest.mark.parametrize("t1", [2, 7])
def test_kda_layer_prefill_then_continue_equals_one_pass(layer, t1):
    x = jnp.asarray(_x(2, 13, seed=4), jnp.float32)
    y, st = fwd(layer, x)
    y1, st1 = fwd(layer, x[:, :t1])
    y2, st2 = fwd(layer, x[:, t1:], state=st1)
    assert error_ratio(y, jnp.concatenate([y1, y2], 1)) <= 1e-6
    for a, b in zip(st, st2):
        assert error_ratio(a, b) <= 1e-6


def test_kda_layer_step_loop_equals_full_pass(layer):
    x = jnp.asarray(_x(2, 10, seed=5), jnp.float32)
    y, st = fwd(layer, x)
    _, s = fwd(layer, x[:, :4])
    ys = []
    for t in range(4, 10):
        yt, s = _step(layer, x[:, t], s)
        ys.append(yt)
    assert error_ratio(y[:, 4:], jnp.stack(ys, 1)) <= 1e-6
    for a, b in zip(st, s):
        assert error_ratio(a, b) <= 1e-6
    # Decoding from an empty cache equals the sequence pass too.
    y0, _ = _step(layer, x[:, 0], KDAState.zeros(2, CFG))
    assert error_ratio(y[:, 0], y0) <= 1e-6


def test_kda_layer_packed_segments_equal_separate_runs(layer):
    # Each packed segment is compared with the plain implementation run on that segment alone.
    p = _params64(layer)
    x = _x(2, 16, seed=6)
    seg = np.array([[1] * 5 + [2] * 7 + [3] * 2 + [0] * 2, [4] * 16])
    y, st = fwd(layer, x, seg)
    for lo, hi in ((0, 5), (5, 12), (12, 14)):
        ref, ref_st = kda_layer_np(p, x[:1, lo:hi])
        assert error_ratio(ref[0], y[0, lo:hi]) <= 1e-5, (lo, hi)
    assert np.all(_f64(y)[0, 14:] == 0.0)  # padding: zero KDA output, o_proj of zero
    # The returned state belongs to the row's last real segment (tokens 12..13), as if it had run alone.
    for a, b in zip(ref_st, st):
        assert error_ratio(a[0], b[0]) <= 1e-5
    ref1, ref1_st = kda_layer_np(p, x[1:])
    assert error_ratio(ref1, y[1:]) <= 1e-5
    for a, b in zip(ref1_st, st):
        assert error_ratio(a[0], b[1]) <= 1e-5


def test_kda_layer_left_padding_equals_unpadded(layer):
    # Row 0 left-padded, row 1 right-padded, with and without a carried state: equal to the unpadded rows.
    p = _params64(layer)
    rng = np.random.default_rng(7)
    state = KDAState(*(jnp.asarray(rng.normal(size=(2, W - 1, H * K)), jnp.float32) for _ in range(3)),
                     jnp.asarray(rng.normal(size=(2, H, K, K)) * 0.3, jnp.float32))
    x, junk, pad = _x(2, 9, seed=8), _x(2, 4, seed=9), 4
    xp = np.stack([np.concatenate([junk[0], x[0]]), np.concatenate([x[1], junk[1]])])
    seg = np.array([[0] * pad + [1] * 9, [1] * 9 + [0] * pad])
    for s in (None, state):
        ref, ref_st = kda_layer_np(p, x, None if s is None else tuple(_f64(a) for a in s))
        yp, stp = fwd(layer, xp, seg, state=s)
        assert error_ratio(ref[0], yp[0, pad:]) <= 1e-5
        assert error_ratio(ref[1], yp[1, :9]) <= 1e-5
        for a, b in zip(ref_st, stp):
            assert error_ratio(a, b) <= 1e-5


def test_kda_layer_gradients_finite(layer):
    x = jnp.asarray(_x(2, 11, seed=11), jnp.float32)
    seg = jnp.asarray([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2], [1] * 11], jnp.int32)

    def loss(m, x):
        return jnp.sum(m(x, segment_ids=seg)[0] ** 2)

    grads, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 15
    for g in leaves:
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
    assert np.all(np.isfinite(np.asarray(gx)))
    assert np.all(np.asarray(gx)[0, :2] == 0.0)  # padding tokens do not influence anything


def test_kda_layer_bad_input():
    layer = KimiDeltaAttention(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden_size=64"):
        layer(jnp.zeros((2, 5, 63)))
    with pytest.raises(ValueError, match="hidden_size=64"):
        layer(jnp.zeros((5, 64)))
    with pytest.raises(ValueError, match="segment_ids"):
        layer(jnp.zeros((2, 5, 64)), segment_ids=jnp.ones((2, 6), jnp.int32))
    with pytest.raises(ValueError, match="cache.recurrent"):
        bad = KDAState.zeros(2, CFG)._replace(recurrent=jnp.zeros((2, H, K, K + 1)))
        layer(jnp.zeros((2, 5, 64)), cache=bad)
    with pytest.raises(ValueError, match="hidden_size=64"):
        layer(jnp.zeros((2, 64)), cache=KDAState.zeros(2, CFG))  # one decode token is [B, 1, hidden]
    with pytest.raises(ValueError, match="cache.conv_q"):
        layer(jnp.zeros((3, 1, 64)), cache=KDAState.zeros(2, CFG))
    with pytest.raises(ValueError, match="KDAState"):
        layer(jnp.zeros((2, 1, 64)), cache=(1, 2, 3, 4))

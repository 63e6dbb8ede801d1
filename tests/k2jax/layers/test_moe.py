"""MoE router and experts against plain per-token loops written from kimi_linear.md section 5 (numpy, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels.moe.blocked as moe_blocked
from k2jax import load_config
from k2jax.layers import moe as M
from k2jax.sharding import logical_names
from pallas_kernels.moe import blocked_grouped_matmul, xla_ragged_dot
from tests.conftest import error_ratio

TINY = load_config("tiny")  # 8 experts, top-2, 4 groups of 2, topk_group 2, 1 shared expert, hidden 64, I 32


# ---- plain references --------------------------------------------------------------------------------------------
def ref_route_token(cfg, x, kernel, bias):
    """One token, straight from section 5 (HF KimiMoEGate). Returns ({expert: weight}, p)."""
    logits = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    if cfg.moe_router_activation_func == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-logits))
    else:
        p = np.exp(logits - logits.max())
        p = p / p.sum()
    biased = p + np.asarray(bias, np.float64)
    E, G = cfg.num_experts, cfg.num_expert_group
    choice = biased.copy()
    if cfg.use_grouped_topk and G > cfg.topk_group:
        per = E // G
        group_score = [sum(sorted(biased[g * per:(g + 1) * per])[-2:]) for g in range(G)]
        kept = sorted(range(G), key=lambda g: (-group_score[g], g))[:cfg.topk_group]
        for e in range(E):
            if e // per not in kept:
                choice[e] = 0.0  # HF masks dropped groups with 0.0
    chosen = sorted(range(E), key=lambda e: (-choice[e], e))[:cfg.num_experts_per_token]
    src = biased if cfg.moe_router_weights_from_biased_scores else p
    w = np.array([src[e] for e in chosen])
    if cfg.num_experts_per_token > 1 and cfg.moe_renormalize:
        w = w / (w.sum() + 1e-20)
    w = w * cfg.routed_scaling_factor
    return dict(zip(chosen, w)), p


def silu(v):
    return v / (1.0 + np.exp(-v))


def ref_moe(cfg, model, x, token_mask=None):
    """Per-token loop over the selected experts in float64 -> (y [B, T, D], expert_load [E])."""
    f64 = lambda v: np.asarray(v[...], np.float64)
    kernel, bias = f64(model.gate.kernel), f64(model.gate.e_score_correction_bias)
    w1, w3, w2 = f64(model.experts.w1), f64(model.experts.w3), f64(model.experts.w2)
    xs = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size)
    mask = np.ones(len(xs), bool) if token_mask is None else np.asarray(token_mask).reshape(-1)
    y = np.zeros_like(xs)
    load = np.zeros(cfg.num_experts)
    for n, xt in enumerate(xs):
        sel, _ = ref_route_token(cfg, xt, kernel, bias)
        for e, w in sel.items():
            y[n] += w * (silu(xt @ w1[e]) * (xt @ w3[e])) @ w2[e]
            load[e] += mask[n]
        if model.shared_experts is not None:
            s = model.shared_experts
            y[n] += (silu(xt @ f64(s.gate_proj.kernel)) * (xt @ f64(s.up_proj.kernel))) @ f64(s.down_proj.kernel)
    return y.reshape(np.shape(x)), load


def route_as_dicts(idx, w):
    return [dict(zip(map(int, i), map(float, ww))) for i, ww in zip(np.asarray(idx), np.asarray(w))]


def assert_same_routing(cfg, x, kernel, bias, rtol=1e-5):
    idx, w = M.route(cfg, jnp.asarray(x, jnp.float32), jnp.asarray(kernel), jnp.asarray(bias))
    assert idx.dtype == jnp.int32 and w.dtype == jnp.float32 and idx.shape == (len(x), cfg.num_experts_per_token)
    for got, xt in zip(route_as_dicts(idx, w), np.asarray(x)):
        want, _ = ref_route_token(cfg, xt, kernel, bias)
        assert set(got) == set(want)
        np.testing.assert_allclose([got[e] for e in want], list(want.values()), rtol=rtol, atol=1e-6)
    return idx, w


def make_moe(cfg=TINY, seed=0, **overrides):
    return M.MoE(cfg.replace(**overrides) if overrides else cfg, rngs=nnx.Rngs(seed))


def rand(shape, seed, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


# ---- routing -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    {},
    {"moe_router_weights_from_biased_scores": False},
    {"moe_renormalize": False, "routed_scaling_factor": 1.0},
    {"use_grouped_topk": False},
    {"moe_router_activation_func": "softmax", "num_experts_per_token": 3},
    {"num_experts_per_token": 1},  # HF renormalises only when k > 1
])
def test_route_matches_per_token_loop(overrides):
    cfg = TINY.replace(**overrides)
    x = rand((40, cfg.hidden_size), 1)
    kernel = rand((cfg.hidden_size, cfg.num_experts), 2, 0.3)
    bias = rand((cfg.num_experts,), 3, 0.2)
    assert_same_routing(cfg, x, kernel, bias)


def _token_with_probs(cfg, p):
    """A one-token input and kernel whose sigmoid router probabilities are exactly `p` (up to fp32)."""
    x = np.zeros((1, cfg.hidden_size), np.float32)
    x[0, 0] = 1.0
    kernel = np.zeros((cfg.hidden_size, cfg.num_experts), np.float32)
    kernel[0] = np.log(np.asarray(p) / (1.0 - np.asarray(p)))
    return x, kernel


def test_group_limit_changes_selection():
    # Groups {0,1} {2,3} {4,5} {6,7}; top-2 sums 1.0, 1.2, 1.1, 0.2: groups 1 and 2 are kept, so expert 0 (the
    # largest single score) is out, and plain top-2 would have picked it.
    x, kernel = _token_with_probs(TINY, [0.9, 0.1, 0.6, 0.6, 0.55, 0.55, 0.1, 0.1])
    bias = np.zeros(8, np.float32)
    idx, _ = assert_same_routing(TINY, x, kernel, bias)
    assert sorted(np.asarray(idx)[0]) == [2, 3]
    idx_plain, _ = M.route(TINY.replace(use_grouped_topk=False), jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias))
    assert 0 in np.asarray(idx_plain)[0]


def test_top_experts_in_one_group():
    x, kernel = _token_with_probs(TINY, [0.2, 0.1, 0.3, 0.1, 0.9, 0.85, 0.2, 0.1])
    idx, w = assert_same_routing(TINY, x, kernel, np.zeros(8, np.float32))
    assert list(np.asarray(idx)[0]) == [4, 5]  # slots in decreasing score order
    np.testing.assert_allclose(np.asarray(w)[0], np.array([0.9, 0.85]) / 1.75 * TINY.routed_scaling_factor, rtol=1e-5)


def test_bias_changes_selection_and_weight_source():
    x, kernel = _token_with_probs(TINY, [0.9, 0.8, 0.3, 0.2, 0.1, 0.4, 0.1, 0.1])
    bias = np.zeros(8, np.float32)
    idx, _ = assert_same_routing(TINY, x, kernel, bias)
    assert sorted(np.asarray(idx)[0]) == [0, 1]
    bias[5] = 0.6  # expert 5: 0.4 + 0.6 = 1.0 beats expert 1 (0.8); group {4,5} sums to 1.1 > group {2,3}
    for biased_weights in (True, False):
        cfg = TINY.replace(moe_router_weights_from_biased_scores=biased_weights)
        idx, w = assert_same_routing(cfg, x, kernel, bias)
        assert sorted(np.asarray(idx)[0]) == [0, 5]
        src = np.array([0.9, 1.0]) if biased_weights else np.array([0.9, 0.4])
        got = route_as_dicts(idx, w)[0]
        np.testing.assert_allclose([got[0], got[5]], src / src.sum() * cfg.routed_scaling_factor, rtol=1e-5)


def test_dropped_groups_masked_to_zero_like_hf():
    # With a negative bias the kept experts' biased scores are < 0, so a masked expert (0.0) outranks them:
    # this is what the released HF code does, and the port keeps it.
    x, kernel = _token_with_probs(TINY, [0.5] * 8)
    bias = np.array([-0.9, -0.9, -0.6, -0.6, -0.7, -0.7, -0.8, -0.8], np.float32)
    idx, _ = assert_same_routing(TINY, x, kernel, bias)
    assert 0 in np.asarray(idx)[0]  # expert 0 sits in a dropped group yet wins with its masked 0.0


def test_route_rejects_bad_shapes():
    k = jnp.zeros((TINY.hidden_size, TINY.num_experts))
    b = jnp.zeros((TINY.num_experts,))
    with pytest.raises(ValueError, match="x must be"):
        M.route(TINY, jnp.zeros((4, TINY.hidden_size + 1)), k, b)
    with pytest.raises(ValueError, match="gate_kernel"):
        M.route(TINY, jnp.zeros((4, TINY.hidden_size)), k.T, b)
    with pytest.raises(ValueError, match="bias"):
        M.route(TINY, jnp.zeros((4, TINY.hidden_size)), k, b[:3])


# ---- experts -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["dense", "ragged", "auto"])
def test_moe_matches_per_token_loop(impl):
    model = make_moe(moe_impl=impl)
    model.gate.kernel[...] = jnp.asarray(rand(model.gate.kernel.shape, 5, 0.3))
    model.gate.e_score_correction_bias[...] = jnp.asarray(rand((8,), 6, 0.1))
    x = rand((2, 12, TINY.hidden_size), 7)
    mask = np.ones((2, 12), bool)
    mask[1, 9:] = False
    y, aux = model(jnp.asarray(x), token_mask=jnp.asarray(mask))
    y_ref, load_ref = ref_moe(model.config, model, x, mask)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert error_ratio(y_ref, y) <= 1e-5
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), load_ref)
    assert float(aux["expert_load"].sum()) == mask.sum() * TINY.num_experts_per_token
    assert int(aux["dropped_tokens"]) == 0


def test_empty_and_full_experts():
    # Bias +1 on expert 0 and +0.5 on expert 1: every token picks experts {0, 1}; experts 2..7 get nothing.
    for impl in ("dense", "ragged"):
        model = make_moe(moe_impl=impl)
        model.gate.e_score_correction_bias[...] = jnp.array([1.0, 0.5, 0, 0, 0, 0, 0, 0])
        x = rand((2, 5, TINY.hidden_size), 8)
        y, aux = model(jnp.asarray(x))
        y_ref, load_ref = ref_moe(model.config, model, x)
        np.testing.assert_array_equal(np.asarray(aux["expert_load"]), [10, 10, 0, 0, 0, 0, 0, 0])
        np.testing.assert_array_equal(load_ref, [10, 10, 0, 0, 0, 0, 0, 0])
        assert error_ratio(y_ref, y) <= 1e-5


@pytest.mark.parametrize("gather_max_bytes", [0, 1 << 40], ids=["scan", "batched"])
@pytest.mark.parametrize("sizes", [[0, 37, 0, 0], [9, 0, 20, 8], [0, 0, 0, 37]])
def test_blocked_grouped_matmul_matches_ragged_dot(sizes, gather_max_bytes, monkeypatch):
    # both forms of the per-block product: the scan (large weights) and one batched matmul (small ones)
    monkeypatch.setattr(moe_blocked, "GATHER_MAX_BYTES", gather_max_bytes)
    x = jnp.asarray(rand((37, 24), 9))
    w = jnp.asarray(rand((4, 24, 16), 10))
    gs = jnp.asarray(sizes, jnp.int32)
    want = np.concatenate([np.asarray(x[s:s + n], np.float64) @ np.asarray(w[g], np.float64)
                           for g, (s, n) in enumerate(zip(np.cumsum([0] + sizes[:-1]), sizes))])
    got = jax.jit(lambda x, w: blocked_grouped_matmul(x, w, gs))(x, w)  # a fresh trace for each form
    assert error_ratio(want, got) <= 1e-6
    assert error_ratio(want, xla_ragged_dot(x, w, gs)) <= 1e-6
    # The custom VJP against autodiff of lax.ragged_dot.
    r = jnp.asarray(rand((37, 16), 18))
    loss = lambda gmm: jax.grad(lambda x, w: jnp.sum(gmm(x, w, gs) * r), argnums=(0, 1))(x, w)
    for got, ref in zip(jax.jit(lambda: loss(blocked_grouped_matmul))(), loss(xla_ragged_dot)):
        assert error_ratio(ref, got) <= 1e-6


def test_blocked_grouped_matmul_form_follows_the_block_weights_size(monkeypatch):
    # Within GATHER_MAX_BYTES (nb x K x N float32) the forward and the backward's dx and dw are batched matmuls;
    # beyond it, scans (one weight slab, or G blocks, at a time).
    x, w = jnp.asarray(rand((64, 16), 14)), jnp.asarray(rand((4, 16, 8), 15))
    gs = jnp.asarray([10, 30, 0, 24], jnp.int32)

    def loops():  # while loops of the compiled forward + backward, searchsorted's included (a fresh trace each call)
        step = jax.grad(lambda x, w: jnp.sum(blocked_grouped_matmul(x, w, gs) ** 2), argnums=(0, 1))
        return jax.jit(step).lower(x, w).compile().as_text().count(" while(")

    batched = loops()
    monkeypatch.setattr(moe_blocked, "GATHER_MAX_BYTES", 0)
    assert loops() >= batched + 3  # the forward's, dx's and dw's scans


def test_blocked_grouped_matmul_weight_grad_memory(monkeypatch):
    # Beyond GATHER_MAX_BYTES the backward must not hold one [K, N] float32 product per block at once (at 48B on
    # XLA:CPU that was 1,312 blocks x 9 MiB per matmul): its temp buffers stay under nb * K * N * 4 bytes here
    # (nb = 11; the batched per-block product alone was that much, its temp 24 MB in all), and
    # dw still matches ragged_dot's with more blocks than groups (a scan over chunks plus a remainder).
    M, G, K, N = 256, 3, 512, 512
    monkeypatch.setattr(moe_blocked, "GATHER_MAX_BYTES", 11 * K * N * 4 - 1)  # just below these blocks' 11.5 MB
    x, w = jnp.asarray(rand((M, K), 11)), jnp.asarray(rand((G, K, N), 12))
    gs = jnp.asarray([100, 0, 156], jnp.int32)
    r = jnp.asarray(rand((M, N), 13))
    grad = lambda gmm: jax.grad(lambda x, w: jnp.sum(gmm(x, w, gs) * r), argnums=(0, 1))
    compiled = jax.jit(grad(blocked_grouped_matmul)).lower(x, w).compile()
    nb = -(-(M + G * (32 - 1)) // 32)  # b = 32 for these sizes (_block_layout)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < nb * K * N * 4, (temp, nb)
    for got, ref in zip(compiled(x, w), grad(xla_ragged_dot)(x, w)):
        assert error_ratio(ref, got) <= 1e-6


def _grads(model, x, r):
    def loss(m, x):
        y, _ = m(x)
        return jnp.sum(y.astype(jnp.float32) * r)
    return nnx.grad(loss, argnums=(0, 1))(model, x)


@pytest.mark.parametrize("impl", ["ragged", "auto"])
def test_sorted_paths_equal_dense_values_and_gradients(impl):
    dense, ragged = make_moe(moe_impl="dense", seed=3), make_moe(moe_impl=impl, seed=3)
    x = jnp.asarray(rand((2, 10, TINY.hidden_size), 11))
    r = jnp.asarray(rand((2, 10, TINY.hidden_size), 12))
    assert error_ratio(dense(x)[0], ragged(x)[0]) <= 1e-6
    gd, gr = _grads(dense, x, r), _grads(ragged, x, r)
    ld, lr = jax.tree.leaves(gd), jax.tree.leaves(gr)
    assert len(ld) == len(lr) == 8  # router kernel, w1, w3, w2, 3 shared-expert kernels, and d/dx
    for a, b in zip(ld, lr):
        assert np.all(np.isfinite(np.asarray(a))) and np.all(np.isfinite(np.asarray(b)))
        assert error_ratio(a, b) <= 1e-4
    # The router kernel gets a gradient through the combine weights, and every expert weight that saw a token does.
    g_params = gd[0]
    assert float(jnp.abs(g_params["gate"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(g_params["experts"]["w2"][...]).max()) > 0


def test_auto_with_many_tokens_equals_dense():
    # 40 tokens x 2 slots / 8 experts = 10 rows per expert; 80 tokens = 20: both sides of the CPU 'auto' threshold.
    dense, auto = make_moe(moe_impl="dense", seed=5), make_moe(moe_impl="auto", seed=5)
    run = nnx.jit(lambda m, x: m(x)[0])
    for tokens in (40, 80):
        x = jnp.asarray(rand((1, tokens, TINY.hidden_size), 17))
        assert error_ratio(run(dense, x), run(auto, x)) <= 1e-6


def test_grouped_matmul_chosen_when_lowering():
    # 'ragged' lowers to ragged_dot for TPU/GPU and to the blocked scan (no ragged_dot) for CPU, from one trace.
    model = make_moe(moe_impl="ragged")
    graph, state = nnx.split(model)
    traced = jax.jit(lambda st, x: nnx.merge(graph, st)(x)[0]).trace(state, jnp.ones((1, 8, TINY.hidden_size)))
    for platform, has_ragged_dot in (("cpu", False), ("tpu", True), ("cuda", True)):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert ("ragged_dot" in text) == has_ragged_dot, platform


def test_bf16_under_jit_close_to_f32():
    x = jnp.asarray(rand((2, 16, TINY.hidden_size), 13))
    r = jnp.asarray(rand((2, 16, TINY.hidden_size), 14))
    y32, _ = make_moe(seed=4, moe_impl="dense")(x)
    for impl in ("dense", "ragged"):
        model = make_moe(seed=4, moe_impl=impl, dtype="bfloat16")
        y, aux = nnx.jit(lambda m, x: m(x))(model, x)
        assert y.dtype == jnp.bfloat16
        assert error_ratio(y32, y) <= 2e-2
        g = nnx.jit(_grads)(model, x, r)
        assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in jax.tree.leaves(g))


def test_no_shared_experts():
    model = make_moe(num_shared_experts=0)
    assert model.shared_experts is None
    x = rand((1, 6, TINY.hidden_size), 15)
    y, _ = model(jnp.asarray(x))
    assert error_ratio(ref_moe(model.config, model, x)[0], y) <= 1e-5


def test_parameter_layout():
    model = make_moe()
    E, D, I = 8, TINY.hidden_size, TINY.moe_intermediate_size
    ex = model.experts
    assert ex.w1.shape == ex.w3.shape == (E, D, I) and ex.w2.shape == (E, I, D)
    assert logical_names(ex.w1) == logical_names(ex.w3) == ("expert", "expert_embed", "expert_mlp")
    assert logical_names(ex.w2) == ("expert", "expert_mlp", "expert_embed")
    assert model.gate.kernel.shape == (D, E) and logical_names(model.gate.kernel) == ("embed", None)
    assert isinstance(model.gate.e_score_correction_bias, M.RouterBias)
    assert model.gate.e_score_correction_bias[...].dtype == jnp.float32
    params = nnx.state(model, nnx.Param)
    assert "e_score_correction_bias" not in params["gate"]  # the optimizer (nnx.Param) never touches it
    assert model.shared_experts.gate_proj.kernel.shape == (D, I * TINY.num_shared_experts)


def test_moe_rejects_bad_shapes():
    model = make_moe()
    with pytest.raises(ValueError, match="x must be"):
        model(jnp.zeros((4, TINY.hidden_size)))
    with pytest.raises(ValueError, match="x must be"):
        model(jnp.zeros((1, 4, TINY.hidden_size + 1)))
    with pytest.raises(ValueError, match="token_mask"):
        model(jnp.zeros((1, 4, TINY.hidden_size)), token_mask=jnp.ones((4,), bool))


# ---- balancing ---------------------------------------------------------------------------------------------------
def test_router_probs_mean_over_real_tokens():
    model = make_moe()
    x = rand((1, 6, TINY.hidden_size), 16)
    mask = np.array([[True, True, False, True, False, False]])
    _, aux = model(jnp.asarray(x), token_mask=jnp.asarray(mask))
    kernel = np.asarray(model.gate.kernel[...])
    ps = [ref_route_token(TINY, xt, kernel, np.zeros(8))[1] for xt in x[0][mask[0]]]
    want = np.mean([p / p.sum() for p in ps], axis=0)
    np.testing.assert_allclose(np.asarray(aux["router_probs_mean"]), want, rtol=1e-5)


def test_update_router_bias_direction():
    bias = jnp.array([0.1, 0.0, -0.2, 0.0])
    new = M.update_router_bias(bias, jnp.array([6.0, 0.0, 1.0, 1.0]), 1e-3)  # mean load 2
    np.testing.assert_allclose(np.asarray(new), [0.1 - 1e-3, 1e-3, -0.2 + 1e-3, 1e-3], rtol=1e-6)
    same = M.update_router_bias(bias, jnp.full((4,), 3.0), 1e-3)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(bias))
    with pytest.raises(ValueError, match="num_experts"):
        M.update_router_bias(bias, jnp.ones((5,)), 1e-3)


def test_load_balance_loss():
    uniform = M.load_balance_loss(jnp.full((4,), 0.25), jnp.full((4,), 5.0))
    np.testing.assert_allclose(float(uniform), 1.0, rtol=1e-6)
    skewed = M.load_balance_loss(jnp.array([0.7, 0.1, 0.1, 0.1]), jnp.array([14.0, 2.0, 2.0, 2.0]))
    np.testing.assert_allclose(float(skewed), 4 * (0.7 * 0.7 + 3 * 0.1 * 0.1), rtol=1e-6)

"""Expert parallelism: the shard_map dispatch (all-gather and ragged all-to-all schemes) against a plain numpy
MoE, gradients against one device, capacity drops against a numpy model of each scheme's keep order, the
ragged_all_to_all emulation against the documented example, and TPU/GPU lowering of the real collective."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from k2jax import load_config
from k2jax.config import ConfigError
from k2jax.layers.expert_parallel import capacity, ragged_all_to_all_emulated, routed_experts
from k2jax.layers.moe import MoE, route
from k2jax.sharding import make_mesh
from tests.conftest import error_ratio


def _layer(**overrides):
    cfg = load_config("tiny", **overrides)  # 8 experts, top-2 of 4 groups, one shared expert
    return cfg, MoE(cfg, rngs=nnx.Rngs(1))


def _np_moe(cfg, moe, x, keep=None):
    """Plain MoE in float64: y_t = sum_j w_tj * SwiGLU_{e_tj}(x_t) + shared(x_t); `keep` [N, k] bool drops pairs."""
    xf = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size)
    idx, w = (np.asarray(a) for a in route(cfg, jnp.asarray(xf, jnp.float32), moe.gate.kernel[...],
                                           moe.gate.e_score_correction_bias[...]))
    w1, w3, w2 = (np.asarray(getattr(moe.experts, n)[...], np.float64) for n in ("w1", "w3", "w2"))
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    y = np.zeros_like(xf)
    for t in range(xf.shape[0]):
        for j in range(idx.shape[1]):
            if keep is None or keep[t, j]:
                e = idx[t, j]
                y[t] += w[t, j] * (silu(xf[t] @ w1[e]) * (xf[t] @ w3[e])) @ w2[e]
    s = moe.shared_experts
    g, u, d = (np.asarray(getattr(s, n).kernel[...], np.float64) for n in ("gate_proj", "up_proj", "down_proj"))
    y += (silu(xf @ g) * (xf @ u)) @ d
    return y.reshape(x.shape), idx


def _run(moe, x, mesh):
    graphdef, state = nnx.split(moe)

    def loss(st, x):
        y, aux = nnx.merge(graphdef, st)(x)
        return jnp.sum(jnp.sin(y)), (y, aux["dropped_tokens"])

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        return fn(state, x)
    with jax.set_mesh(mesh):
        return fn(state, x)


@pytest.fixture(scope="module")
def one_device():
    cfg, moe = _layer()
    x = jax.random.normal(jax.random.key(2), (4, 8, cfg.hidden_size), jnp.float32)
    return x, _run(moe, x, None)


@pytest.mark.parametrize("impl", ["allgather", "ragged_a2a"])
@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (1, 2, 2, 2)])
def test_dropless_ep_matches_plain_moe_and_one_device_grads(one_device, impl, shape):
    x, ((_, (y0, _)), (g0, gx0)) = one_device
    cfg, moe = _layer(moe_ep_impl=impl)
    (_, (y, dropped)), (g, gx) = _run(moe, x, make_mesh(shape))
    ref, _ = _np_moe(cfg, moe, x)
    assert error_ratio(ref, y) < 1e-5 and int(dropped) == 0
    assert error_ratio(gx0, gx) < 1e-5
    flat0 = dict(nnx.to_flat_state(g0))
    for path, v in nnx.to_flat_state(g):
        assert error_ratio(flat0[path].get_value(), v.get_value()) < 1e-5, path


def test_tokens_not_divisible_by_the_expert_axis_stay_replicated():
    cfg, moe = _layer()
    x = jax.random.normal(jax.random.key(3), (1, 5, cfg.hidden_size), jnp.float32)  # 5 tokens over 8 devices
    (_, (y, dropped)), _ = _run(moe, x, make_mesh((1, 1, 8, 1)))
    ref, _ = _np_moe(cfg, moe, x)
    assert error_ratio(ref, y) < 1e-5 and int(dropped) == 0


def _kept_pairs(idx, ep, n, cap, scheme):
    """Which (token, slot) pairs each scheme keeps: the first `cap` rows, per device, in its arrival order.
    all-gather: (local expert, token, slot); ragged: (source device, expert, token, slot)."""
    N, k = idx.shape
    G = 8 // ep
    keep = np.zeros((N, k), bool)
    pairs = [(t, j) for t in range(N) for j in range(k)]
    for d in range(ep):
        mine = [(t, j) for t, j in pairs if idx[t, j] // G == d]
        if scheme == "allgather":
            mine.sort(key=lambda p: (idx[p], p))
        else:
            mine.sort(key=lambda p: (p[0] // n, idx[p], p))
        for p in mine[:cap]:
            keep[p] = True
    return keep


@pytest.mark.parametrize("impl", ["allgather", "ragged_a2a"])
def test_capacity_drops_are_counted_and_contribute_nothing(impl):
    cfg, moe = _layer(moe_ep_impl=impl, moe_capacity_factor=0.75)
    x = jax.random.normal(jax.random.key(4), (4, 8, cfg.hidden_size), jnp.float32)
    ep, n = 4, 8  # mesh (1, 1, 4, 1): 2 experts and 8 tokens per device
    cap = capacity(cfg, n * ep, ep)
    assert cap == math.ceil(0.75 * n * ep * cfg.num_experts_per_token / ep) == 12
    (_, (y, dropped)), _ = _run(moe, x, make_mesh((1, 1, ep, 1)))
    _, idx = _np_moe(cfg, moe, x)
    keep = _kept_pairs(idx, ep, n, cap, impl)
    assert int(dropped) == (~keep).sum() > 0
    ref, _ = _np_moe(cfg, moe, x, keep)
    assert error_ratio(ref, y) < 1e-5


def test_ragged_all_to_all_emulation_follows_the_documented_example():
    mesh = make_mesh((1, 1, 2, 1))
    args = [np.array(a, np.int32) for a in ([1, 2, 2, 3, 4, 0], [0] * 8, [0, 1, 0, 1], [1, 2, 1, 1], [0, 0, 1, 2],
                                             [1, 1, 2, 1])]
    fn = jax.shard_map(lambda *a: ragged_all_to_all_emulated(*a, axis_name="expert"), mesh=mesh,
                       in_specs=P("expert"), out_specs=P("expert"))
    out = np.asarray(fn(*args)).reshape(2, 4)
    np.testing.assert_array_equal(out, [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_ragged_path_lowers_with_the_real_collective(platform):
    cfg, moe = _layer(moe_ep_impl="auto")
    graphdef, state = nnx.split(moe)
    x = jax.ShapeDtypeStruct((4, 8, cfg.hidden_size), jnp.float32)
    grad = jax.grad(lambda st, x: jnp.sum(nnx.merge(graphdef, st)(x)[0]))
    with jax.set_mesh(make_mesh((1, 2, 2, 2))):
        text = jax.jit(grad).trace(state, x).lower(lowering_platforms=(platform,)).as_text()
    assert text.count("ragged_all_to_all") >= 4  # tokens and expert ids out, results back, and their transposes


def test_bad_settings_raise():
    cfg, moe = _layer()
    x = jnp.ones((1, 6, cfg.hidden_size))
    with pytest.raises(ValueError, match="not divisible by the expert mesh axis"):
        with jax.set_mesh(make_mesh((1, 1, 3, 1))):
            moe(x)
    with pytest.raises(ConfigError, match="moe_ep_impl"):
        load_config("tiny", moe_ep_impl="a2a")
    with pytest.raises(ConfigError, match="moe_capacity_factor"):
        load_config("tiny", moe_capacity_factor=0)
    w = jnp.ones((8, 4, 2))
    with pytest.raises(ValueError, match="not divisible"):
        routed_experts(cfg, jnp.ones((6, 4)), jnp.zeros((6, 2), jnp.int32), jnp.ones((6, 2)), w, w,
                       jnp.ones((8, 2, 4)), jnp.float32, mesh=make_mesh((1, 1, 3, 1)))

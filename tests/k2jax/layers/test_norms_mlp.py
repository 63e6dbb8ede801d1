"""RMSNorm, GatedRMSNorm, l2_normalize and SwiGLU against plain float64 numpy formulas; Linear's dot_f32 against
autodiff of the plain dot, and the switch (cpu_paths_off) that selects the plain one."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from k2jax import KimiLinear, load_config
from k2jax.layers.linear import PROJECTION_NAME, Linear, cpu_path, cpu_paths_off, dot_f32
from k2jax.layers.mlp import SwiGLU
from k2jax.layers.norms import GatedRMSNorm, RMSNorm, l2_normalize
from tests.conftest import error_ratio

BF16 = ml_dtypes.bfloat16


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _rms_np(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _set(var, value):
    var[...] = jnp.asarray(value, var[...].dtype)


# ---- RMSNorm ---------------------------------------------------------------------------------------------------
def test_rmsnorm_float32_matches_formula():
    x = np.random.default_rng(0).normal(size=(3, 5, 48)) * 3.0
    w = 1.0 + 0.3 * np.random.default_rng(1).normal(size=48)
    norm = RMSNorm(48, eps=1e-5, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_np(norm.weight[...]), np.ones(48))  # init ones
    assert norm.weight.get_metadata()["out_sharding"] == ("norm",)
    _set(norm.weight, w)
    y = norm(jnp.asarray(x, jnp.float32))
    assert y.dtype == jnp.float32
    assert error_ratio(_rms_np(x, 1e-5) * w, y) <= 1e-6


def test_rmsnorm_bf16_rounds_before_the_weight():
    # HF: weight * (x * rsqrt(...)).to(bf16). Rounding after the weight instead gives different bf16 values in a
    # large fraction of elements; the test checks ours agrees with the HF order and not with the other one.
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(8, 256)) * 4.0).astype(BF16)
    w = (1.0 + 0.7 * rng.normal(size=256)).astype(BF16)
    norm = RMSNorm(256, eps=1e-5, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    _set(norm.weight, w)
    y = np.asarray(norm(jnp.asarray(x)))
    assert y.dtype == BF16
    n = _rms_np(x.astype(np.float64), 1e-5)
    hf_order = (n.astype(BF16).astype(np.float64) * w.astype(np.float64)).astype(BF16)
    other_order = (n * w.astype(np.float64)).astype(BF16)
    mismatch_hf = np.mean(y != hf_order)
    mismatch_other = np.mean(y != other_order)
    assert mismatch_hf <= 0.01, mismatch_hf  # float32 vs float64 statistics may flip a rare rounding
    assert mismatch_other >= 0.1, mismatch_other
    assert np.mean(hf_order != other_order) >= 0.1  # the two orders really differ on this data


def test_rmsnorm_rejects_wrong_width():
    with pytest.raises(ValueError, match="last dim"):
        RMSNorm(8, eps=1e-5, rngs=nnx.Rngs(0))(jnp.zeros((2, 7)))


# ---- GatedRMSNorm ----------------------------------------------------------------------------------------------
def test_gated_rmsnorm_matches_formula_per_head():
    rng = np.random.default_rng(3)
    # Heads with very different scales: the RMS must be taken per head (last axis), not over all heads.
    o = rng.normal(size=(2, 3, 4, 16)) * np.array([0.01, 1.0, 10.0, 100.0])[:, None]
    z = rng.normal(size=(2, 3, 4, 16)) * 2.0
    w = 1.0 + 0.5 * rng.normal(size=16)
    norm = GatedRMSNorm(16, eps=1e-5, rngs=nnx.Rngs(0))
    _set(norm.weight, w)
    y = norm(jnp.asarray(o, jnp.float32), jnp.asarray(z, jnp.float32))
    ref = _rms_np(o, 1e-5) * w / (1.0 + np.exp(-z))
    assert y.dtype == jnp.float32
    assert error_ratio(ref, y) <= 1e-6
    # each head individually (the small-scale head would be swamped in a whole-vector error ratio)
    for h in range(4):
        assert error_ratio(ref[:, :, h], np.asarray(y)[:, :, h]) <= 1e-6


def test_gated_rmsnorm_bf16_returns_o_dtype():
    rng = np.random.default_rng(4)
    o = rng.normal(size=(5, 32)).astype(BF16)
    z = rng.normal(size=(5, 32)).astype(BF16)
    norm = GatedRMSNorm(32, eps=1e-5, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    y = jax.jit(norm.__call__)(jnp.asarray(o), jnp.asarray(z))
    assert y.dtype == jnp.bfloat16
    ref = _rms_np(o.astype(np.float64), 1e-5) / (1.0 + np.exp(-z.astype(np.float64)))
    assert error_ratio(ref, y) <= 4e-3  # one bf16 rounding of the output


def test_gated_rmsnorm_rejects_mismatched_gate():
    norm = GatedRMSNorm(8, eps=1e-5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="o and z"):
        norm(jnp.zeros((2, 8)), jnp.zeros((2, 4)))


# ---- l2_normalize ----------------------------------------------------------------------------------------------
def test_l2_normalize_matches_formula_with_eps_inside_sqrt():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4, 16))
    x[0, 0] *= 1e-4  # tiny vector: eps inside the sqrt gives norm << 1, unlike x / (||x|| + eps) or x / ||x||
    y = l2_normalize(jnp.asarray(x, jnp.float32))
    ref = x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)
    assert error_ratio(ref, y) <= 1e-6
    assert error_ratio(ref[0, 0], np.asarray(y)[0, 0]) <= 1e-6
    assert np.linalg.norm(np.asarray(y)[0, 0]) < 0.5
    yb = l2_normalize(jnp.asarray(x, jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16
    assert error_ratio(ref, yb) <= 8e-3


# ---- SwiGLU ----------------------------------------------------------------------------------------------------
def _swiglu_np(mlp, x):
    g = x @ _np(mlp.gate_proj.kernel[...])
    u = x @ _np(mlp.up_proj.kernel[...])
    return (g / (1.0 + np.exp(-g)) * u) @ _np(mlp.down_proj.kernel[...])


def test_swiglu_float32_matches_formula():
    mlp = SwiGLU(32, 48, rngs=nnx.Rngs(0), std=0.2)
    x = np.random.default_rng(6).normal(size=(2, 5, 32))
    y = mlp(jnp.asarray(x, jnp.float32))
    assert y.shape == (2, 5, 32) and y.dtype == jnp.float32
    assert error_ratio(_swiglu_np(mlp, x), y) <= 1e-6
    names = {n: getattr(mlp, n).kernel.get_metadata()["out_sharding"] for n in ("gate_proj", "up_proj", "down_proj")}
    assert names == {"gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed")}
    assert mlp.gate_proj.kernel[...].shape == (32, 48) and mlp.down_proj.kernel[...].shape == (48, 32)


def test_swiglu_bf16_under_jit():
    mlp = SwiGLU(32, 48, rngs=nnx.Rngs(0), std=0.2, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    x = np.random.default_rng(7).normal(size=(2, 5, 32))
    y = nnx.jit(lambda m, a: m(a))(mlp, jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert error_ratio(_swiglu_np(mlp, x), y) <= 2e-2  # bf16 inputs, kernels and intermediates


def test_swiglu_rejects_wrong_hidden_size():
    with pytest.raises(ValueError, match="hidden_size=32"):
        SwiGLU(32, 48, rngs=nnx.Rngs(0))(jnp.zeros((2, 31)))


# ---- Linear's product ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 4e-3)])
def test_dot_f32_gradients_match_autodiff_of_the_plain_dot(dtype, rtol):
    # dot_f32's backward (weight gradient from the saved x^T) against autodiff of the plain dot: equal up to f32
    # summation order (f32), and within bf16 rounding of the gradients (bf16: ours keeps dy in f32 for dx),
    # behind an elementwise op, for 3-D inputs.
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 40, 24)).astype(dtype)
    w = (0.2 * jax.random.normal(kw, (24, 56))).astype(dtype)
    ct = jax.random.normal(kc, (3, 40, 56))

    def loss(dot):
        return lambda x, w: jnp.sum(jax.nn.silu(dot(x, w)).astype(dtype).astype(jnp.float32) * ct)

    plain = jax.jit(jax.value_and_grad(loss(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)),
                                       argnums=(0, 1)))(x, w)
    ours = jax.jit(jax.value_and_grad(loss(dot_f32), argnums=(0, 1)))(x, w)
    assert float(ours[0]) == float(plain[0])  # the forward is the plain dot
    for a, b in zip(plain[1], ours[1]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert error_ratio(a, b) < rtol


@pytest.mark.parametrize("remat", ["dots", "dots_no_batch"])
def test_remat_dot_policies_still_save_the_projections(remat, capsys):
    # dot_f32's dot is inside a custom VJP, invisible to the dot policies: the model's policies save the Linear
    # outputs by name instead, so remat='dots' keeps saving every projection.
    cfg = load_config("tiny").replace(num_hidden_layers=1, kda_layers=[1], full_attn_layers=[], remat=remat)
    graphdef, state = nnx.split(KimiLinear(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.ones((1, 16), jnp.int32)
    print_saved_residuals(lambda s, t: jnp.sum(nnx.merge(graphdef, s)(t)), state, tokens)
    saved = capsys.readouterr().out
    # 12 projections in the layer (KDA 9, dense MLP 3); an output the backward never reads (o_proj's) is not saved
    assert saved.count(f"named '{PROJECTION_NAME}'") == 11


# ---- the switch of the CPU-only backwards (bench/train_ab.py's A/B) ------------------------------------------------
def test_cpu_paths_off_selects_the_plain_dot():
    # Linear traced inside cpu_paths_off("linear") is autodiff's plain dot (no dot_f32 custom VJP), outside it
    # dot_f32; the switch is restored after the block, and both give the same gradients.
    lin = Linear(24, 40, names=("embed", "mlp"), rngs=nnx.Rngs(0), std=0.2)
    graphdef, params = nnx.split(lin)
    x = jax.random.normal(jax.random.key(1), (3, 5, 24))

    def loss(p, x):
        return jnp.sum(jax.nn.silu(nnx.merge(graphdef, p)(x)))

    ours = jax.value_and_grad(loss, argnums=(0, 1))
    assert cpu_path("linear") and "bwd=_dot_f32_bwd" in str(jax.make_jaxpr(ours)(params, x))
    with cpu_paths_off("linear"):
        assert not cpu_path("linear")
        plain = jax.value_and_grad(loss, argnums=(0, 1))  # a new function: traced inside the block
        assert "bwd=_dot_f32_bwd" not in str(jax.make_jaxpr(plain)(params, x))
        plain = jax.jit(plain)(params, x)
    assert cpu_path("linear")
    ours = jax.jit(ours)(params, x)
    assert float(ours[0]) == float(plain[0])
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(ours[1])):
        assert error_ratio(a, b) < 1e-6


def test_cpu_paths_reject_unknown_names():
    with pytest.raises(ValueError, match="must be among"):
        with cpu_paths_off("linear", "norms"):
            pass
    with pytest.raises(ValueError, match="must be one of"):
        cpu_path("conv")

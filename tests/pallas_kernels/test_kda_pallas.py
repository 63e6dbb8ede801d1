"""Pallas KDA kernels (interpret mode on CPU) against the per-token recurrence, plus TPU/GPU lowering.

Tolerances are error ratios ||ref - x|| / ||ref||: float32 inputs 1e-5 (o, final state) and 1e-4 (gradients);
bfloat16 inputs 5e-3 (o, state), 8e-3 (dq, dk, dv, dh0) and 2e-2 (dg, dbeta), fla's `test_chunk` bounds.
The reference runs float32 math on the same (rounded) inputs.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kda.pallas import chunk_masks, kda_pallas, segment_numbers
from pallas_kernels.kda.pallas_bwd import kda_bwd_call
from pallas_kernels.kda.pallas_fwd import TRITON_BLOCK_V, kda_fwd_call
from pallas_kernels.kda.pallas_step import kda_step_pallas
from pallas_kernels.kda.reference import kda_reference, kda_step_reference
from tests.conftest import error_ratio
from tests.pallas_kernels.lowering import count_pallas_kernels, jit_fast_compile, kda_sequence_specs

# Compile time dominates these tests (the interpreted kernels become large XLA programs); the XLA backend
# optimisation level does not change what is computed.


def make_inputs(B, T, H, K, V, dtype=jnp.float32, seed=0):
    """L2-normalised q, k (as the layer gives them); gates mostly in [-1, 0] with a few channels down to -20."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, T, H, K)))
    k = unit(jax.random.normal(ks[1], (B, T, H, K)))
    v = jax.random.normal(ks[2], (B, T, H, V))
    strong = jax.random.bernoulli(ks[3], 0.1, (B, T, H, K))
    g = jnp.where(strong, -20.0 * jax.random.uniform(ks[4], (B, T, H, K)), -jax.random.uniform(ks[5], (B, T, H, K)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[6], (B, T, H)))
    h0 = jax.random.normal(ks[7], (B, H, K, V))
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta)) + (h0,)


def packed_segments(T):
    """Row 0: a boundary inside a chunk, padding inside a segment and between segments, trailing padding.
    Row 1: leading padding (the first real segment must still start from initial_state), then two segments."""
    r0 = [1] * 9 + [0] * 3 + [1] * 2 + [4] * 7 + [0] * 2 + [5] * (T - 23)
    r0[-2:] = [0, 0]
    r1 = [0] * 5 + [3] * 12 + [2] * (T - 17)
    return jnp.array([r0, r1], jnp.int32)


def outputs_and_grads(fn, args, seed=1, **kw):
    """(o, final_state) and the gradients w.r.t. q, k, v, g, beta, initial_state of a random projection."""
    def f(q, k, v, g, beta, h0):
        return fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)

    (o, ht), vjp = jax.vjp(f, *args)
    ko, kt = jax.random.split(jax.random.PRNGKey(seed))
    cts = (jax.random.normal(ko, o.shape).astype(o.dtype), jax.random.normal(kt, ht.shape))
    return (o, ht), vjp(cts)


GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def check_against_reference(args, tol_out, tol_grads, *, segment_ids=None, chunk_size):
    ours = jit_fast_compile(functools.partial(outputs_and_grads, kda_pallas, segment_ids=segment_ids,
                                              chunk_size=chunk_size))
    ref = jit_fast_compile(functools.partial(outputs_and_grads, kda_reference, segment_ids=segment_ids))
    (o, ht), grads = ours(args)
    (ro, rt), rgrads = ref(args)
    assert o.dtype == args[2].dtype and o.shape == ro.shape and ht.dtype == jnp.float32
    assert error_ratio(ro, o) <= tol_out, error_ratio(ro, o)
    assert error_ratio(rt, ht) <= tol_out, error_ratio(rt, ht)
    for name, r, x in zip(GRAD_NAMES, rgrads, grads):
        assert x.dtype == r.dtype and np.isfinite(np.asarray(x, np.float32)).all(), name
        tol = tol_grads[name] if isinstance(tol_grads, dict) else tol_grads
        assert error_ratio(r, x) <= tol, (name, error_ratio(r, x))


@pytest.mark.parametrize("T, K, V, chunk_size, segmented", [
    (37, 16, 32, 16, True),     # T not a multiple of the chunk, packed segments, K != V
    (70, 32, 16, 32, False),    # plain sequences
    (130, 16, 16, 64, True),    # the production chunk size
])
def test_float32_matches_reference(T, K, V, chunk_size, segmented):
    args = make_inputs(2, T, 2, K, V)
    seg = packed_segments(T) if segmented else None
    check_against_reference(args, 1e-5, 1e-4, segment_ids=seg, chunk_size=chunk_size)


def test_bfloat16_matches_reference():
    args = make_inputs(2, 45, 2, 32, 16, dtype=jnp.bfloat16, seed=3)
    tols = dict(dq=8e-3, dk=8e-3, dv=8e-3, dh0=8e-3, dg=2e-2, dbeta=2e-2)
    check_against_reference(args, 5e-3, tols, segment_ids=packed_segments(45), chunk_size=32)


def test_padding_is_inert_and_final_state_optional():
    """Row 0 is the sequence left-padded by 11 tokens, row 1 the same sequence right-padded: identical outputs
    (zeros at the padding) and final states, as if there were no padding."""
    q, k, v, g, beta, h0 = make_inputs(1, 21, 1, 16, 16, seed=5)
    junk = lambda x: jnp.full((1, 11) + x.shape[2:], 7.0, x.dtype)
    both = lambda x: jnp.concatenate([jnp.concatenate([junk(x), x], 1), jnp.concatenate([x, junk(x)], 1)], 0)
    seg = jnp.array([[0] * 11 + [1] * 21, [2] * 21 + [0] * 11])
    run = jit_fast_compile(functools.partial(kda_pallas, chunk_size=16, output_final_state=True))
    o, s = run(*(both(x) for x in (q, k, v, g, beta)), initial_state=jnp.concatenate([h0, h0]), segment_ids=seg)
    assert np.all(np.asarray(o[0, :11]) == 0) and np.all(np.asarray(o[1, 21:]) == 0)
    assert error_ratio(o[1, :21], o[0, 11:]) <= 1e-6 and error_ratio(s[1], s[0]) <= 1e-6
    ro, rs = kda_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert error_ratio(ro[0], o[1, :21]) <= 1e-5 and error_ratio(rs[0], s[1]) <= 1e-5
    shapes = jax.eval_shape(functools.partial(kda_pallas, chunk_size=16), q, k, v, g, beta)
    assert shapes[1] is None


def test_gpu_loop_driver_matches_grid_driver():
    """The Triton driver (chunk loop inside the kernel) computes what the TPU/interpret grid driver computes."""
    q, k, v, g, beta, h0 = make_inputs(2, 48, 1, 16, 32, seed=7)
    C = 16
    sid, _ = segment_numbers(packed_segments(48), 2, 48)
    sid, cm, em = chunk_masks(sid, C)
    tr = lambda x: jnp.swapaxes(x, 1, 2)
    prepared = (tr(q), tr(k), tr(v), tr(g), tr(beta[..., None]), sid, cm, em)
    do = jax.random.normal(jax.random.PRNGKey(8), (2, 1, 48, 32))
    dht = jax.random.normal(jax.random.PRNGKey(9), h0.shape)

    @functools.partial(jit_fast_compile, static_argnums=0)
    def run(backend):
        o, ht, h = kda_fwd_call(*prepared, h0, scale=0.25, chunk_size=C, save_states=True, h_dtype=jnp.float32,
                                backend=backend)
        return (o, ht, h) + tuple(kda_bwd_call(*prepared, h, do, dht, scale=0.25, chunk_size=C, backend=backend))

    for a, b in zip(run("interpret"), run("interpret_loop")):
        assert error_ratio(a, b) <= 1e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_step_matches_reference(dtype):
    q, k, v, g, beta, _ = (x[:, 0] for x in make_inputs(2, 1, 3, 16, 32, seed=11))
    state = jax.random.normal(jax.random.PRNGKey(12), (2, 3, 16, 32))
    args = tuple(x.astype(dtype) for x in (q, k, v, g, beta))
    o, s = jax.jit(kda_step_pallas)(*args, state)
    ro, rs = jax.jit(kda_step_reference)(*args, state)
    assert o.dtype == dtype and s.dtype == jnp.float32
    assert error_ratio(ro, o) <= (1e-6 if dtype == jnp.float32 else 4e-3)
    assert error_ratio(rs, s) <= 1e-6
    # sizes that are not powers of two are padded internally
    odd = (q[..., :12], k[..., :12], v[..., :20], g[..., :12], beta, state[:, :, :12, :20])
    o2, s2 = jax.jit(kda_step_pallas)(*odd)
    ro2, rs2 = jax.jit(kda_step_reference)(*odd)
    assert error_ratio(ro2, o2) <= 1e-6 and error_ratio(rs2, s2) <= 1e-6


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape, chunk_size", [((1, 40, 2, 16, 32), 16), ((2, 256, 2, 128, 128), 64)])
def test_lowering_for_tpu_and_gpu(platform, dtype, shape, chunk_size):
    """Forward (1 kernel), forward+backward (2 kernels) and decode (1 kernel) lower to Mosaic TPU / Triton."""
    B, T, H, K, V = shape

    def fwd(q, k, v, g, beta, h0, seg):
        return kda_pallas(q, k, v, g, beta, initial_state=h0, output_final_state=True, segment_ids=seg,
                          chunk_size=chunk_size)

    def fwd_bwd(q, k, v, g, beta, h0, seg):
        out, vjp = jax.vjp(lambda *a: fwd(*a, seg), q, k, v, g, beta, h0)
        return vjp(out)

    specs = kda_sequence_specs(B, T, H, K, V, dtype)
    assert count_pallas_kernels(fwd, specs, platform) == 1
    assert count_pallas_kernels(fwd_bwd, specs, platform) == 2
    step_specs = tuple(jax.ShapeDtypeStruct((B, H) + x.shape[3:], x.dtype) for x in specs[:5]) + (specs[5],)
    assert count_pallas_kernels(kda_step_pallas, step_specs, platform) == 1


def test_bad_arguments_raise():
    q, k, v, g, beta, h0 = make_inputs(1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        kda_pallas(q, k, v, g, beta, chunk_size=48)
    with pytest.raises(ValueError, match="interpret"):
        kda_pallas(q, k, v, g, beta, interpret="yes")
    with pytest.raises(ValueError, match="beta"):
        kda_pallas(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match="state"):
        kda_step_pallas(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0[:, :, :8])


def _prepared(args, C, segment_ids=None):
    """kda_pallas's kernel layout of make_inputs' (q, k, v, g, beta): [B, H, T, d], segment data [B, T, 1]."""
    q, k, v, g, beta = args[:5]
    B, T = q.shape[:2]
    sid, _ = segment_numbers(segment_ids, B, T)
    sid, cm, em = chunk_masks(sid, C)
    tr = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    return (tr(q), tr(k), tr(v), tr(g), tr(beta[..., None]), sid, cm, em)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_driver_value_blocks_at_released_head_size(dtype):
    """K = V = 128 (Kimi-Linear's heads) through the Triton driver (interpreted), the state split into value blocks
    of 32 columns: outputs, final state and all gradients match the per-token recurrence (fla's bounds for bf16)."""
    B, T, H, K, V, C = 1, 32, 1, 128, 128, 16
    args = make_inputs(B, T, H, K, V, dtype=dtype, seed=13)
    prepared = _prepared(args, C)
    h0 = args[5]
    ko, kt = jax.random.split(jax.random.PRNGKey(14))
    do = jax.random.normal(ko, (B, T, H, V)).astype(dtype)
    dht = jax.random.normal(kt, h0.shape)
    scale = K ** -0.5

    @jit_fast_compile
    def run(prepared, h0, do, dht):
        o, ht, h = kda_fwd_call(*prepared, h0, scale=scale, chunk_size=C, save_states=True,
                                h_dtype=jnp.float32 if dtype == jnp.float32 else jnp.bfloat16,
                                backend="interpret_loop", block_v=32)
        grads = kda_bwd_call(*prepared, h, jnp.swapaxes(do, 1, 2), dht, scale=scale, chunk_size=C,
                             backend="interpret_loop", block_v=32)
        return (jnp.swapaxes(o, 1, 2), ht), grads

    (o, ht), (dq, dk, dv, dg, db, dh0) = run(prepared, h0, do, dht)
    (ro, rt), vjp = jax.vjp(lambda *a: kda_reference(*a[:5], initial_state=a[5], output_final_state=True), *args)
    rgrads = vjp((do, dht))
    tr = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    grads = (tr(dq), tr(dk), tr(dv), tr(dg), tr(db)[..., 0], dh0)
    f32 = dtype == jnp.float32
    assert error_ratio(ro, o) <= (1e-5 if f32 else 5e-3) and error_ratio(rt, ht) <= (1e-5 if f32 else 5e-3)
    tols = dict(dq=8e-3, dk=8e-3, dv=8e-3, dh0=8e-3, dg=2e-2, dbeta=2e-2)
    for name, r, x in zip(GRAD_NAMES, rgrads, grads):
        assert x.dtype == r.dtype, name
        assert error_ratio(r, x) <= (1e-4 if f32 else tols[name]), (name, error_ratio(r, x))


def test_gpu_driver_blocks_values_and_uses_bf16_operands():
    """Lowered for cuda at K = V = 128: one program per (batch, head, value block of TRITON_BLOCK_V), for the
    forward and the backward kernel; bf16 inputs give bf16 matmul operands inside the kernels, f32 inputs none."""
    B, T, H, K, V = 2, 256, 2, 128, 128

    def fwd_bwd(q, k, v, g, beta, h0, seg):
        out, vjp = jax.vjp(lambda *a: kda_pallas(*a, initial_state=h0, output_final_state=True, segment_ids=seg,
                                                 chunk_size=64), q, k, v, g, beta)
        return vjp(out)

    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=gpu)
    for dtype in (jnp.float32, jnp.bfloat16):
        specs = kda_sequence_specs(B, T, H, K, V, dtype)
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(fwd_bwd).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
        grids = re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32", text)
        assert grids == [(str(B), str(H), str(V // TRITON_BLOCK_V))] * 2, grids
        kernel_dots = [e for e in _pallas_jaxpr_eqns(jax.make_jaxpr(fwd_bwd)(*specs).jaxpr)
                       if e.primitive.name == "dot_general"]
        bf16_dots = [e for e in kernel_dots if e.invars[0].aval.dtype == jnp.bfloat16]
        assert kernel_dots and (len(bf16_dots) > 0) == (dtype == jnp.bfloat16), (dtype, len(bf16_dots))
        assert all(e.params["preferred_element_type"] == jnp.float32 for e in kernel_dots)


def _pallas_jaxpr_eqns(jaxpr):
    """Every equation inside the pallas_call kernels of a jaxpr (recursing through sub-jaxprs)."""
    out = []
    for eqn in jaxpr.eqns:
        params = [p for v in eqn.params.values() for p in (v if isinstance(v, (tuple, list)) else (v,))]
        for sub in params:
            sub = getattr(sub, "jaxpr", sub)          # ClosedJaxpr -> Jaxpr
            if not hasattr(sub, "eqns"):
                continue
            if eqn.primitive.name == "pallas_call":
                out += list(sub.eqns)
            out += _pallas_jaxpr_eqns(sub)
    return out

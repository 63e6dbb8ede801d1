"""`kda(impl="auto")` and `kda_step(impl="auto")`: Pallas when lowered for TPU/GPU, XLA when run on CPU."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.kda import kda, kda_reference, kda_step, kda_step_reference
from tests.conftest import error_ratio
from tests.pallas_kernels.lowering import count_pallas_kernels, kda_sequence_specs


def _inputs(B=1, T=40, H=2, K=16, V=32):
    ks = jax.random.split(jax.random.key(0), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return (unit(jax.random.normal(ks[0], (B, T, H, K))), unit(jax.random.normal(ks[1], (B, T, H, K))),
            jax.random.normal(ks[2], (B, T, H, V)), -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K))),
            jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))), 0.1 * jax.random.normal(ks[5], (B, H, K, V)))


def test_auto_runs_the_xla_path_on_cpu_and_matches_reference():
    q, k, v, g, beta, s0 = _inputs()
    seg = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 20), jnp.int32), jnp.full((1, 17), 2)], 1)
    run = jax.jit(lambda *a: kda(*a[:5], initial_state=a[5], segment_ids=a[6], output_final_state=True,
                                 chunk_size=16))
    o, s = run(q, k, v, g, beta, s0, seg)
    o_ref, s_ref = kda_reference(q, k, v, g, beta, initial_state=s0, segment_ids=seg, output_final_state=True)
    assert error_ratio(o_ref, o) < 1e-5 and error_ratio(s_ref, s) < 1e-5
    text = jax.jit(lambda *a: kda(*a[:5], initial_state=a[5], chunk_size=16)).lower(q, k, v, g, beta, s0).as_text()
    assert "tpu_custom_call" not in text and "triton" not in text


def test_auto_step_matches_reference():
    q, k, v, g, beta, s0 = _inputs()
    q, k, v, g, beta = (x[:, 0] for x in (q, k, v, g, beta))
    o, s = jax.jit(kda_step)(q, k, v, g, beta, s0)
    o_ref, s_ref = kda_step_reference(q, k, v, g, beta, s0)
    assert error_ratio(o_ref, o) < 1e-6 and error_ratio(s_ref, s) < 1e-6


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_auto_lowers_to_the_pallas_kernels(platform):
    specs = kda_sequence_specs(1, 40, 2, 16, 32, jnp.bfloat16)

    def loss(q, k, v, g, beta, h0, seg):
        o, s = kda(q, k, v, g, beta, initial_state=h0, segment_ids=seg, output_final_state=True, chunk_size=16)
        return o.astype(jnp.float32).sum() + s.sum()

    def fwd_bwd(q, k, v, g, beta, h0, seg):
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, g, beta, h0, seg)

    assert count_pallas_kernels(fwd_bwd, specs, platform) == 2  # the forward and the fused backward kernel
    step_specs = tuple(jax.ShapeDtypeStruct((1, 2) + x.shape[3:], x.dtype) for x in specs[:5]) + (specs[5],)
    assert count_pallas_kernels(kda_step, step_specs, platform) == 1


def test_unknown_impl_is_rejected():
    q, k, v, g, beta, s0 = _inputs()
    with pytest.raises(ValueError, match="impl"):
        kda(q, k, v, g, beta, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0, impl="chunk")

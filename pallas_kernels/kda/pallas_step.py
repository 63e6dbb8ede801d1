"""`kda_step_pallas`: one KDA decode token for a batch, as a Pallas kernel that updates the state in place.

Per (batch, head) program, with S [K, V] float32:
    S' = Diag(exp(g)) S;  S_new = S' + k (beta (v - S'^T k))^T;  o = S_new^T (scale q).
The state input is aliased to the new-state output (`input_output_aliases`), so under `jax.jit` with the state
donated the update happens in the same buffer. The kernel uses only 2-D elementwise ops and reductions (no
matmul: a single token is a matrix-vector product) and lowers for TPU (Mosaic) and GPU (Triton).
Gradients (rarely needed at decode) come from autodiff of the plain-jnp step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.kda.checks import check_step_inputs
from pallas_kernels.kda.pallas import backend_switch, pow2_at_least_16
from pallas_kernels.kda.pallas_fwd import F32, compiler_params, row_to_col
from pallas_kernels.kda.reference import kda_step_reference
from pallas_kernels.vma import vary_like, varying_out


def _step_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s_ref, o_ref, s_out_ref, *, scale):
    kc = row_to_col(k_ref[...].astype(F32))                                 # [K, 1]
    S = jnp.exp(row_to_col(g_ref[...].astype(F32))) * s_ref[...]            # decay rows first
    pred = jnp.sum(kc * S, axis=0, keepdims=True)                           # [1, V]
    S = S + kc * (b_ref[...].astype(F32) * (v_ref[...].astype(F32) - pred))
    qc = row_to_col(q_ref[...].astype(F32) * scale)
    o_ref[...] = jnp.sum(qc * S, axis=0, keepdims=True).astype(o_ref.dtype)
    s_out_ref[...] = S


def kda_step_call(q, k, v, g, b, state, *, scale, backend):
    """Kernel on prepared inputs: q, k, g [B, H, 1, K]; v [B, H, 1, V]; b [B, H, 1, 1]; state [B, H, K, V] f32."""
    B, H, _, K = q.shape
    V = v.shape[-1]
    row_spec = lambda d: pl.BlockSpec((None, None, 1, d), lambda i, j: (i, j, 0, 0))
    state_spec = pl.BlockSpec((None, None, K, V), lambda i, j: (i, j, 0, 0))
    return pl.pallas_call(
        functools.partial(_step_kernel, scale=scale),
        grid=(B, H),
        in_specs=[row_spec(K), row_spec(K), row_spec(V), row_spec(K), row_spec(1), state_spec],
        out_specs=[row_spec(V), state_spec],
        out_shape=[varying_out((B, H, 1, V), v.dtype, q, k, v, g, b, state),
                   varying_out((B, H, K, V), F32, q, k, v, g, b, state)],
        input_output_aliases={5: 1},
        compiler_params=compiler_params(backend, ("parallel", "parallel")),
        interpret=backend.startswith("interpret"),
        name="kda_step",
    )(q, k, v, g, b, state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _step(q, k, v, g, beta, state, scale, interpret):
    B, H, K = q.shape
    V = v.shape[-1]
    Kp, Vp = pow2_at_least_16(K), pow2_at_least_16(V)
    pad = lambda x, d, D: (x if d == D else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, D - d)]))[:, :, None, :]
    args = (pad(q, K, Kp), pad(k, K, Kp), pad(v, V, Vp), pad(g, K, Kp), beta[:, :, None, None])
    S = state.astype(F32)
    if (Kp, Vp) != (K, V):
        S = jnp.pad(S, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))

    def run(backend, *xs):
        return kda_step_call(*xs, scale=scale, backend=backend)

    o, S = backend_switch(run, interpret, *args, S)
    return o[:, :, 0, :V], S[:, :, :K, :V]


def _step_fwd(q, k, v, g, beta, state, scale, interpret):
    return _step(q, k, v, g, beta, state, scale, interpret), (q, k, v, g, beta, state)


def _step_bwd(scale, interpret, res, cts):
    _, vjp = jax.vjp(functools.partial(kda_step_reference, scale=scale), *res)
    return vjp(cts)


_step.defvjp(_step_fwd, _step_bwd)


def kda_step_pallas(q, k, v, g, beta, state, *, scale=None, interpret=None):
    """One decode token per sequence with a Pallas kernel.

    q, k, g: [B, H, K]; v: [B, H, V]; beta: [B, H]; state: [B, H, K, V] float32.
    Returns (o [B, H, V] in v.dtype, new_state [B, H, K, V] float32). interpret: as in `kda_pallas`.
    """
    B, H, K, V = check_step_inputs(q, k, v, g, beta, state, op="kda_step_pallas")
    if interpret not in (None, True, False):
        raise ValueError(f"kda_step_pallas: interpret must be None, True or False, got {interpret!r}")
    scale = float(K ** -0.5 if scale is None else scale)
    state = vary_like(state, q, k, v, g, beta)   # inside shard_map: the new state varies like the inputs
    return _step(q, k, v, g, beta, state, scale, interpret)

"""The per-token KDA recurrence, written straight from the math: the ground truth for every faster path.

For each (batch, head), with state S in R^{K x V} (float32), decay alpha_t = exp(g_t) in (0, 1]^K:

    S'  = Diag(alpha_t) S_{t-1}                       decay first (row i scaled by alpha_t[i])
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T          delta-rule correction against the *decayed* state
    o_t = S_t^T (scale * q_t)                         read-out after the update, so it includes token t

Segments (`segment_ids`, int [B, T]): the state restarts from zero where the id differs from the id of the row's
previous real token; the row's first real segment starts from `initial_state`. Id 0 is padding: a padding token
neither reads nor changes the state and its output is zero, so padding is transparent wherever it sits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kda.checks import check_sequence_inputs, check_step_inputs
from pallas_kernels.vma import vary_like


def delta_rule_update(state, k, v, alpha, beta):
    """One recurrence step on float32 arrays. state: [..., K, V]; k, alpha: [..., K]; v: [..., V]; beta: [...]."""
    decayed = alpha[..., :, None] * state
    predicted = jnp.einsum("...k,...kv->...v", k, decayed)
    return decayed + k[..., :, None] * (beta[..., None] * (v - predicted))[..., None, :]


def kda_reference(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None):
    """Per-token KDA recurrence (lax.scan over time).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log-decay (<= 0); beta: [B, T, H];
    initial_state: [B, H, K, V] or None (zeros); segment_ids: int [B, T] or None.
    Returns (o [B, T, H, V] in v.dtype, final_state [B, H, K, V] float32 or None).
    q and k are used as given (the layer L2-normalises them); scale defaults to K ** -0.5.
    """
    B, T, H, K, V = check_sequence_inputs(q, k, v, g, beta, initial_state, segment_ids, op="kda_reference")
    scale = K ** -0.5 if scale is None else scale
    f32 = jnp.float32
    S0 = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
    S0 = vary_like(S0, q, k, v, g, beta)   # inside shard_map the scan's carry varies like the inputs
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    seg = segment_ids.astype(jnp.int32)

    def step(carry, xs):
        S, last_id = carry
        q_t, k_t, v_t, g_t, b_t, s_t = xs
        is_pad = s_t == 0
        restart = (last_id != 0) & (s_t != last_id) & ~is_pad
        S_in = jnp.where(restart[:, None, None, None], 0.0, S)
        S_new = delta_rule_update(S_in, k_t, v_t, jnp.exp(g_t), b_t)
        o_t = jnp.einsum("bhk,bhkv->bhv", scale * q_t, S_new)
        S_out = jnp.where(is_pad[:, None, None, None], S, S_new)
        o_t = jnp.where(is_pad[:, None, None], 0.0, o_t)
        return (S_out, jnp.where(is_pad, last_id, s_t)), o_t

    time_major = [jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, g, beta)] + [jnp.moveaxis(seg, 1, 0)]
    (S_final, _), o = jax.lax.scan(step, (S0, vary_like(jnp.zeros((B,), jnp.int32), seg)), time_major)
    o = jnp.moveaxis(o, 0, 1).astype(v.dtype)
    return o, (S_final if output_final_state else None)


def kda_step_reference(q, k, v, g, beta, state, *, scale=None):
    """One decode token, plain jnp. q, k, g: [B, H, K]; v: [B, H, V]; beta: [B, H]; state: [B, H, K, V].

    Returns (o [B, H, V] in v.dtype, new_state [B, H, K, V] float32).
    """
    B, H, K, V = check_step_inputs(q, k, v, g, beta, state, op="kda_step")
    scale = K ** -0.5 if scale is None else scale
    f32 = jnp.float32
    S_new = delta_rule_update(state.astype(f32), k.astype(f32), v.astype(f32), jnp.exp(g.astype(f32)),
                              beta.astype(f32))
    o = jnp.einsum("bhk,bhkv->bhv", scale * q.astype(f32), S_new)
    return o.astype(v.dtype), S_new

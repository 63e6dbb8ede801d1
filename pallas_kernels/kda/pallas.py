"""`kda_pallas`: chunked KDA with Pallas forward and backward kernels behind a `jax.custom_vjp`.

XLA does the cheap elementwise preparation around the kernels: segment bookkeeping, zeroing padding tokens (so
they are inert), padding T to a multiple of the chunk and K, V to powers of two >= 16, and the head-major
transposes. The kernels (`pallas_fwd`, `pallas_bwd`) do the per-chunk work and the state recurrences.

Platform: one jitted function lowers to the Mosaic TPU kernel on TPU, to the Triton kernel on GPU and to the
interpreted kernel elsewhere (CPU), chosen by `jax.lax.platform_dependent` when the program is lowered.

What the backward keeps from the forward: the prepared inputs and the chunk-start states h [B, H, NT, K, V]
(float32 for float32 inputs, bfloat16 otherwise): K*V*bytes/C bytes per token per head beyond the inputs, i.e.
512 B (bf16) or 1 KiB (f32) at K = V = 128, C = 64. Everything else is recomputed per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.kda.checks import check_sequence_inputs
from pallas_kernels.kda.pallas_bwd import kda_bwd_call
from pallas_kernels.kda.pallas_fwd import kda_fwd_call
from pallas_kernels.vma import vary_like

F32 = jnp.float32
CHUNK_SIZES = (16, 32, 64, 128)


def backend_switch(fn, interpret, *args):
    """fn(backend, *args) for the platform the program is lowered for (see module docstring)."""
    if interpret:
        return fn("interpret", *args)
    return lax.platform_dependent(
        *args,
        tpu=functools.partial(fn, "tpu"),
        cuda=functools.partial(fn, "triton"),
        default=functools.partial(fn, "interpret" if interpret is None else "tpu"),
    )


# ----------------------------------------------------------------------------------------------- custom VJP core

@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _core(q, k, v, g, b, h0, sid, cm, em, cfg):
    o, ht, _ = _fwd(q, k, v, g, b, h0, sid, cm, em, cfg, save_states=False)
    return o, ht


def _fwd(q, k, v, g, b, h0, sid, cm, em, cfg, *, save_states):
    scale, chunk, interpret = cfg
    h_dtype = F32 if q.dtype == F32 else jnp.bfloat16

    def run(backend, *xs):
        return kda_fwd_call(*xs, scale=scale, chunk_size=chunk, save_states=save_states, h_dtype=h_dtype,
                            backend=backend)

    return backend_switch(run, interpret, q, k, v, g, b, sid, cm, em, h0)


def _core_fwd(q, k, v, g, b, h0, sid, cm, em, cfg):
    o, ht, h = _fwd(q, k, v, g, b, h0, sid, cm, em, cfg, save_states=True)
    return (o, ht), (q, k, v, g, b, sid, cm, em, h)


def _core_bwd(cfg, res, cts):
    scale, chunk, interpret = cfg
    q, k, v, g, b, sid, cm, em, h = res
    do, dht = cts

    def run(backend, *xs):
        return kda_bwd_call(*xs, scale=scale, chunk_size=chunk, backend=backend)

    dq, dk, dv, dg, db, dh0 = backend_switch(run, interpret, q, k, v, g, b, sid, cm, em, h, do.astype(v.dtype),
                                              dht.astype(F32))
    zero = jnp.zeros_like
    return dq, dk, dv, dg, db, dh0, zero(sid), zero(cm), zero(em)


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------- preparation

def segment_numbers(segment_ids, B, T):
    """Per-token segment number [B, T] int32 and real-token mask [B, T] bool.

    The number counts the restarts before the token (the reference's rule: a real token whose id differs from
    the previous real token's id restarts the state), so it is 0 for the first real segment, which starts from
    initial_state; padding (id 0) carries the number of the segment before it.
    """
    if segment_ids is None:
        return jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), bool)
    seg = segment_ids.astype(jnp.int32)
    real = seg != 0
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    last_real = lax.cummax(jnp.where(real, pos, -1), axis=1)
    prev_pos = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), last_real[:, :-1]], axis=1)
    prev_id = jnp.where(prev_pos >= 0, jnp.take_along_axis(seg, jnp.maximum(prev_pos, 0), axis=1), 0)
    restart = real & (prev_id != 0) & (seg != prev_id)
    return jnp.cumsum(restart.astype(jnp.int32), axis=1), real


def chunk_masks(sid, C):
    """sid [B, Tp] -> (sid, cm, em) as float32 [B, Tp, 1] (see `pallas_fwd` docstring)."""
    B, Tp = sid.shape
    s = sid.reshape(B, Tp // C, C)
    prev = jnp.concatenate([jnp.zeros((B, 1), s.dtype), s[:, :-1, -1]], axis=1)
    cm = s == prev[..., None]
    em = s == s[..., -1:]
    as_col = lambda x: x.reshape(B, Tp, 1).astype(F32)
    return as_col(s), as_col(cm), as_col(em)


def pow2_at_least_16(n):
    """The smallest power of two >= max(n, 16): a kernel block dimension that holds n."""
    return max(16, 1 << (n - 1).bit_length())


def _to_kernel_layout(x, Tp, D):
    """[B, T, H, d] -> [B, H, Tp, D], zero padded."""
    T, d = x.shape[1], x.shape[3]
    x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, D - d)))
    return jnp.transpose(x, (0, 2, 1, 3))


def kda_pallas(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
               chunk_size=64, interpret=None):
    """Chunked KDA with Pallas kernels; differentiable in q, k, v, g, beta and initial_state.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log-decay (<= 0); beta: [B, T, H];
    initial_state: [B, H, K, V] or None; segment_ids: int [B, T] or None (semantics of `kda_reference`: a change
    of id restarts the state, id 0 is inert padding). chunk_size: 16, 32, 64 or 128.
    interpret: None = interpret mode only where no TPU/GPU kernel applies (CPU); True = always interpret.
    Returns (o [B, T, H, V] in v.dtype, final_state [B, H, K, V] float32 or None).
    """
    B, T, H, K, V = check_sequence_inputs(q, k, v, g, beta, initial_state, segment_ids, op="kda_pallas")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"kda_pallas: chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")
    if interpret not in (None, True, False):
        raise ValueError(f"kda_pallas: interpret must be None, True or False, got {interpret!r}")
    scale = float(K ** -0.5 if scale is None else scale)
    C = chunk_size
    Tp = -(-T // C) * C
    Kp, Vp = pow2_at_least_16(K), pow2_at_least_16(V)

    sid, real = segment_numbers(segment_ids, B, T)
    keep = lambda x: jnp.where(real.reshape(B, T, *([1] * (x.ndim - 2))), x, jnp.zeros((), x.dtype))
    q, k, v, g, beta = (keep(x) for x in (q, k, v, g, beta))
    sid = jnp.pad(sid, ((0, 0), (0, Tp - T)), mode="edge")
    sid, cm, em = chunk_masks(sid, C)

    h0 = jnp.zeros((B, H, K, V), F32) if initial_state is None else initial_state.astype(F32)
    h0 = vary_like(h0, q, k, v, g, beta)   # inside shard_map: the state varies like the inputs (so does dh0)
    h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    qt, kt, gt = (_to_kernel_layout(x, Tp, Kp) for x in (q, k, g))
    vt = _to_kernel_layout(v, Tp, Vp)
    bt = _to_kernel_layout(beta[..., None], Tp, 1)

    o, ht = _core(qt, kt, vt, gt, bt, h0, sid, cm, em, (scale, C, interpret))
    o = jnp.transpose(o, (0, 2, 1, 3))[:, :T, :, :V]
    return o, (ht[:, :, :K, :V] if output_final_state else None)

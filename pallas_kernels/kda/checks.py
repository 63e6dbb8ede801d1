"""Shape and dtype checks at the public boundary of every KDA op (run at trace time, never inside the kernels)."""

from __future__ import annotations

import jax.numpy as jnp

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def _is_float(x) -> bool:
    return any(jnp.dtype(x.dtype) == jnp.dtype(d) for d in _FLOATS)


def check_sequence_inputs(q, k, v, g, beta, initial_state=None, segment_ids=None, *, op: str = "kda"):
    """Validate the time-major KDA inputs; returns (B, T, H, K, V).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K]; beta: [B, T, H];
    initial_state: [B, H, K, V] (any float dtype, used as float32); segment_ids: int [B, T].
    """
    if q.ndim != 4:
        raise ValueError(f"{op}: q must be [B, T, H, K], got shape {q.shape}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {q.shape} = [B, T, H, K], got {k.shape}")
    if g.shape != q.shape:
        raise ValueError(f"{op}: g (log-decay) must have q's shape {q.shape} = [B, T, H, K], got {g.shape}")
    if v.ndim != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"{op}: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {v.shape}")
    V = v.shape[3]
    if beta.shape != (B, T, H):
        raise ValueError(f"{op}: beta must be [B, T, H] = {(B, T, H)}, got {beta.shape}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not _is_float(x):
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")
    if initial_state is not None:
        if initial_state.shape != (B, H, K, V):
            raise ValueError(f"{op}: initial_state must be [B, H, K, V] = {(B, H, K, V)}, got {initial_state.shape}")
        if not _is_float(initial_state):
            raise ValueError(f"{op}: initial_state must be a float array, got {initial_state.dtype}")
    if segment_ids is not None:
        if segment_ids.shape != (B, T):
            raise ValueError(f"{op}: segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{op}: segment_ids must be an integer array, got {segment_ids.dtype}")
    return B, T, H, K, V


def check_step_inputs(q, k, v, g, beta, state, *, op: str = "kda_step"):
    """Validate one decode token: q, k, g: [B, H, K]; v: [B, H, V]; beta: [B, H]; state: [B, H, K, V]."""
    if q.ndim != 3:
        raise ValueError(f"{op}: q must be [B, H, K], got shape {q.shape}")
    B, H, K = q.shape
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"{op}: k and g must have q's shape {q.shape} = [B, H, K], got k {k.shape}, g {g.shape}")
    if v.ndim != 3 or v.shape[:2] != (B, H):
        raise ValueError(f"{op}: v must be [B, H, V] = [{B}, {H}, V], got {v.shape}")
    V = v.shape[2]
    if beta.shape != (B, H):
        raise ValueError(f"{op}: beta must be [B, H] = {(B, H)}, got {beta.shape}")
    if state.shape != (B, H, K, V):
        raise ValueError(f"{op}: state must be [B, H, K, V] = {(B, H, K, V)}, got {state.shape}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("state", state)):
        if not _is_float(x):
            raise ValueError(f"{op}: {name} must be a float array, got {x.dtype}")
    return B, H, K, V

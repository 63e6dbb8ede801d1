"""Argument checks and the shared masking rule of every attention op (run at trace time, outside the kernels)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """Sizes of one call: q [B, T, H, Dk], k [B, S, Hkv, Dk], v [B, S, Hkv, Dv]; G = H // Hkv query heads per key
    head. `static_offset` is q_offset as a Python int when it was given as one (kernels need it at trace time),
    else None."""
    B: int
    T: int
    S: int
    H: int
    Hkv: int
    Dk: int
    Dv: int
    static_offset: int | None

    @property
    def G(self) -> int:
        return self.H // self.Hkv


def _is_float(x) -> bool:
    return any(jnp.dtype(x.dtype) == jnp.dtype(d) for d in _FLOATS)


def _is_python_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_attention_inputs(q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale, *, op: str):
    """Validate the inputs of an attention op; returns (AttentionShape, kv_segment_ids, q_offset int32 [B], scale).

    q: [B, T, H, Dk]; k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv], Hkv dividing H; float32, bfloat16 or float16.
    q_segment_ids: int [B, T] or None; kv_segment_ids: int [B, S] or None (None with q_segment_ids given means
    "the same ids", which needs S == T). q_offset: int, or int array [] or [B]. scale: number or None (Dk ** -0.5).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{op}: {name} must be a 4-D array, got shape {getattr(x, 'shape', type(x))}")
        if not _is_float(x):
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")
    B, T, H, Dk = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape != (B, S, Hkv, Dk):
        raise ValueError(f"{op}: k must be [B, S, Hkv, Dk] with q's B={B} and Dk={Dk}, got {k.shape}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{op}: the key/value head count Hkv={Hkv} must divide the query head count H={H}")
    if v.shape[:3] != (B, S, Hkv):
        raise ValueError(f"{op}: v must be [B, S, Hkv, Dv] = [{B}, {S}, {Hkv}, Dv], got {v.shape}")
    if S == 0:
        raise ValueError(f"{op}: k and v need at least one key (S >= 1), got S=0")
    if kv_segment_ids is not None and q_segment_ids is None:
        raise ValueError(f"{op}: kv_segment_ids was given without q_segment_ids; pass both (0 = padding)")
    if q_segment_ids is not None:
        if kv_segment_ids is None:
            if S != T:
                raise ValueError(f"{op}: kv_segment_ids is required when S={S} differs from T={T}")
            kv_segment_ids = q_segment_ids
        for name, ids, length in (("q_segment_ids", q_segment_ids, T), ("kv_segment_ids", kv_segment_ids, S)):
            if ids.shape != (B, length):
                raise ValueError(f"{op}: {name} must be [B, {'T' if length == T else 'S'}] = {(B, length)}, "
                                 f"got {ids.shape}")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"{op}: {name} must be an integer array, got {ids.dtype}")
    if _is_python_int(q_offset):
        static_offset = int(q_offset)
        q_offset = jnp.full((B,), static_offset, jnp.int32)
    else:
        static_offset = None
        q_offset = jnp.asarray(q_offset)
        if not jnp.issubdtype(q_offset.dtype, jnp.integer) or q_offset.shape not in ((), (B,)):
            raise ValueError(f"{op}: q_offset must be an int or an int array of shape [] or [B]={[B]}, got "
                             f"{q_offset.dtype}{list(q_offset.shape)}")
        q_offset = jnp.broadcast_to(q_offset.astype(jnp.int32), (B,))
    if scale is None:
        scale = Dk ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"{op}: scale must be a Python number or None, got {scale!r}")
    return AttentionShape(B, T, S, H, Hkv, Dk, v.shape[3], static_offset), kv_segment_ids, q_offset, float(scale)


def check_block(value, name: str, *, op: str, multiple: int = 1) -> int:
    """A block size: a positive int (a multiple of `multiple`)."""
    if not _is_python_int(value) or value <= 0 or value % multiple:
        what = "a positive int" if multiple == 1 else f"a positive multiple of {multiple}"
        raise ValueError(f"{op}: {name} must be {what}, got {value!r}")
    return int(value)


def visible(q_pos, q_seg, k_pos, k_seg, causal: bool):
    """The masking rule, shared by every implementation: key s is visible to query t iff both carry the same
    nonzero segment id and, when causal, k_pos[s] <= q_pos[t] (absolute positions).

    q_pos, q_seg: int [..., Tq]; k_pos, k_seg: int [..., Sk] (leading dims broadcast). Returns bool [..., Tq, Sk].
    """
    ok = (q_seg[..., :, None] == k_seg[..., None, :]) & (k_seg[..., None, :] != 0)
    if causal:
        ok &= k_pos[..., None, :] <= q_pos[..., :, None]
    return ok


def segments_or_ones(segment_ids, B: int, L: int):
    """Segment ids int32 [B, L]; without segments every token is in segment 1 (0 stays 'padding')."""
    if segment_ids is None:
        return jnp.ones((B, L), jnp.int32)
    return segment_ids.astype(jnp.int32)


def rows_with_keys(q_seg, kv_seg, q_offset, causal: bool):
    """bool [B, T]: which queries see at least one key under `visible` (the others output 0).

    q_seg int32 [B, T], kv_seg int32 [B, S] (segments_or_ones), q_offset int32 [B]. O((T + S) log S): a query sees a
    key iff its segment is nonzero and occurs in kv_seg, at or before its position when causal; the earliest
    occurrence of each id comes from a stable sort of kv_seg.
    """
    T, S = q_seg.shape[1], kv_seg.shape[1]
    order = jnp.argsort(kv_seg, axis=-1, stable=True)
    ids = jnp.take_along_axis(kv_seg, order, axis=-1)
    at = jax.vmap(lambda row, x: jnp.searchsorted(row, x, side="left"))(ids, q_seg)
    at = jnp.clip(at, 0, S - 1).astype(jnp.int32)
    ok = (jnp.take_along_axis(ids, at, axis=-1) == q_seg) & (q_seg != 0)
    if causal:
        first = jnp.take_along_axis(order, at, axis=-1)
        ok &= first <= q_offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    return ok

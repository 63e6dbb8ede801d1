"""Plain softmax attention: materialises the [B, H, T, S] scores and the [B, T, S] mask. The ground truth."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.checks import check_attention_inputs, segments_or_ones, visible


def attention_reference(q, k, v, *, scale=None, causal=True, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
                        return_max_logit=False, return_lse=False):
    """softmax(scale * q k^T + mask) v per head, in float32, differentiable by plain autodiff.

    q: [B, T, H, Dk]; k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv]; query head h reads key/value head h // (H // Hkv)
    (Hkv == H: multi-head; Hkv == 1: multi-query, MLA's absorbed form).
    q_segment_ids: int [B, T], kv_segment_ids: int [B, S] (or None: the same as q's, S == T): a query sees only keys
    of its own segment; id 0 is padding (never seen, outputs 0).
    q_offset: int or int [B]: the absolute position of q's first token among the keys (q continues a cache of
    q_offset keys); causal: query t sees keys s <= q_offset + t.
    Returns o [B, T, H, Dv] in v's dtype (0 for rows that see no key), and with return_max_logit also
    max_logit float32 [B, H]: the largest scaled logit over visible pairs (-inf where a head sees none), and with
    return_lse lse float32 [B, T, H]: the log-sum-exp of each query's visible scaled logits (-inf where it sees
    none), the weight of this attention when merged with another over other keys.
    """
    shape, kv_segment_ids, q_offset, scale = check_attention_inputs(
        q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale, op="attention_reference")
    B, T, S, Hkv, G = shape.B, shape.T, shape.S, shape.Hkv, shape.G
    q_pos = q_offset[:, None] + jnp.arange(T, dtype=jnp.int32)
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    mask = visible(q_pos, segments_or_ones(q_segment_ids, B, T), k_pos, segments_or_ones(kv_segment_ids, B, S),
                   causal)  # [B, T, S]
    f32 = jnp.float32
    # Heads of one group next to each other and batch dims leading (XLA:CPU bf16 dots need leading batch dims).
    qg = jnp.transpose(q.astype(f32).reshape(B, T, Hkv, G, -1), (0, 2, 3, 1, 4))  # [B, Hkv, G, T, Dk]
    kh = jnp.transpose(k.astype(f32), (0, 2, 1, 3))  # [B, Hkv, S, Dk]
    vh = jnp.transpose(v.astype(f32), (0, 2, 1, 3))
    scores = jnp.einsum("bhgtd,bhsd->bhgts", qg, kh) * scale
    m = mask[:, None, None]
    scores = jnp.where(m, scores, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))  # softmax is shift-invariant
    p = jnp.where(m, jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bhgts,bhsd->bhgtd", p, vh)
    o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, shape.H, -1).astype(v.dtype)
    out = (o,)
    if return_max_logit:
        out += (jax.lax.stop_gradient(jnp.max(scores, axis=(-2, -1)).reshape(B, shape.H)),)
    if return_lse:
        shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)[..., 0]
        lse = jnp.where(denom[..., 0] > 0, jnp.log(jnp.where(denom[..., 0] > 0, denom[..., 0], 1.0)) + shift,
                        -jnp.inf)  # [B, Hkv, G, T]
        out += (jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, shape.H),)
    return out[0] if len(out) == 1 else out

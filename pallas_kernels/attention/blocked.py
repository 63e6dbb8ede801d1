"""Blocked ("flash") attention in plain JAX/XLA: O(T * block) memory, forward and backward, on any backend.

The forward walks query blocks (`lax.scan`) and, inside each, key blocks (`lax.fori_loop`) with an online softmax:
a running row max m, normaliser l and output accumulator, all float32. It keeps only o and the per-row
logsumexp (returned on request: `return_lse`, to merge partial attentions). The backward (a `jax.custom_vjp`,
FlashAttention-2's) walks key blocks outside and query blocks inside, recomputing each block's probabilities from
the logsumexp: dk and dv of the key block accumulate in the loop, dq in a [T, Dk] float32 buffer updated in place.
No [T, S] array (scores, probabilities or mask) ever exists. A cotangent of the logsumexp enters as
d lse / d score = p, which only shifts the softmax-Jacobian term D of each row.

Blocks that no visible pair can touch are never computed:
- causal: the key loop of a query block stops after the last key block at or before its last position, and the
  query loop of a key block starts at the first query block that reaches it (loop bounds);
- segments: a block pair whose nonzero segment-id ranges do not overlap in any batch row is skipped with
  `lax.cond` (packed documents give a block-diagonal band), see `visited_blocks`.

Layout inside: chunk-major, [n_blocks, B, Hkv, rows, D], where a query block's rows are its bq tokens times the
G = H / Hkv query heads that share a key head (token-major, heads minor), so multi-query attention (MLA's absorbed
form, Hkv = 1) reads each key block once for all heads. Batch and key-head dims lead every einsum (XLA:CPU cannot
run some bfloat16 dots otherwise; platform_notes section 5). Matmul inputs keep their dtype (bfloat16 stays
bfloat16, probabilities are cast to v's dtype as flash kernels do) and accumulate in float32.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.attention.checks import check_attention_inputs, check_block, segments_or_ones, visible

DEFAULT_BLOCK_Q = 256   # the largest blocks `default_blocks` picks
DEFAULT_BLOCK_K = 512
MIN_AUTO_BLOCK = 64
# Score elements (B x H x bq x bk) of one block pair that `default_blocks` stops halving at: 2^18 float32 = 1 MiB,
# half of this machine's 2 MiB L2. Measured with bench/attention_blocks.py (docs/results.md, "Attention blocks by shape").
BLOCK_SCORE_ELEMS = 1 << 18
_F32 = jnp.float32
_NO_SEGMENT = jnp.iinfo(jnp.int32).max  # the "empty" end of a segment-id range


def default_blocks(B: int, H: int, T: int, S: int) -> tuple[int, int]:
    """(block_q, block_k) for B rows of H query heads, T queries and S keys: from (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)
    capped at T and S, the larger block (block_k on a tie) is halved (to a power of two) while a block pair holds more than
    BLOCK_SCORE_ELEMS scores (B H bq bk) and the halved block stays >= MIN_AUTO_BLOCK. Why: a block pair's scores,
    probabilities and their cotangents then stay in cache, and smaller blocks let causal masking skip more pairs
    (T = 256 in one block computes all T^2 scores; in 64-blocks 10/16 of them). A wide batch gets small blocks, one
    long row keeps large ones (each loop step has enough work to amortise its overhead)."""
    bq, bk = _cap(DEFAULT_BLOCK_Q, T), _cap(DEFAULT_BLOCK_K, S)
    while B * H * bq * bk > BLOCK_SCORE_ELEMS:
        if bk >= bq and _halved(bk) >= MIN_AUTO_BLOCK:
            bk = _halved(bk)
        elif _halved(bq) >= MIN_AUTO_BLOCK:
            bq = _halved(bq)
        else:
            break
    return bq, bk


def _halved(block: int) -> int:
    """The largest power of two below block (half of a power of two; 152 -> 128)."""
    return 1 << ((block - 1).bit_length() - 1)


def _blocks(block_q, block_k, shape, op: str) -> tuple[int, int]:
    """The checked (block_q, block_k) for `shape` (None: `default_blocks`'s), capped at T and S."""
    auto_q, auto_k = default_blocks(shape.B, shape.H, max(shape.T, 1), max(shape.S, 1))
    bq = auto_q if block_q is None else check_block(block_q, "block_q", op=op)
    bk = auto_k if block_k is None else check_block(block_k, "block_k", op=op)
    return _cap(bq, max(shape.T, 1)), _cap(bk, max(shape.S, 1))


def attention_blocked(q, k, v, *, scale=None, causal=True, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
                      block_q=None, block_k=None, return_max_logit=False, return_lse=False):
    """Blocked attention with the semantics, shapes and returns of `attention_reference`.

    q: [B, T, H, Dk]; k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv]; q_segment_ids int [B, T], kv_segment_ids int [B, S]
    (0 = padding); q_offset int or int [B]. block_q, block_k: positive ints or None (`default_blocks`), capped at
    T and S (rounded up to 8 from 8 on); T and S need not be multiples (the tail block is padded with invisible rows and keys).
    Returns o [B, T, H, Dv] in v's dtype [, max_logit float32 [B, H] (no gradient flows through it)]
    [, lse float32 [B, T, H] (differentiable)].
    """
    shape, kv_segment_ids, q_offset, scale = check_attention_inputs(
        q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale, op="attention_blocked")
    bq, bk = _blocks(block_q, block_k, shape, "attention_blocked")
    B, T, H, Hkv, G = shape.B, shape.T, shape.H, shape.Hkv, shape.G
    if T == 0:
        o = jnp.zeros((B, 0, H, shape.Dv), v.dtype)
        return _returns(o, jnp.full((B, H), -jnp.inf, _F32), jnp.zeros((B, 0, H), _F32), return_max_logit,
                        return_lse)
    qc, kc, vc, q_pos, q_seg, k_seg = _chunk_inputs(q, k, v, q_segment_ids, kv_segment_ids, q_offset, shape, bq, bk)
    segmented = q_segment_ids is not None
    visit = visited_blocks(q_pos, q_seg, k_seg, causal=causal) if segmented else None
    o, max_logit, lse = _flash(float(scale), bool(causal), qc, kc, vc, q_pos, q_seg, k_seg, visit)
    nq = qc.shape[0]
    o = jnp.transpose(o.reshape(nq, B, Hkv, bq, G, -1), (1, 0, 3, 2, 4, 5)).reshape(B, nq * bq, H, -1)[:, :T]
    lse = jnp.transpose(lse.reshape(nq, B, Hkv, bq, G), (1, 0, 3, 2, 4)).reshape(B, nq * bq, H)[:, :T]
    return _returns(o, jax.lax.stop_gradient(max_logit), lse, return_max_logit, return_lse)


def _returns(o, max_logit, lse, return_max_logit, return_lse):
    """o, then max_logit and lse as asked."""
    extra = (max_logit,) * return_max_logit + (lse,) * return_lse
    return (o,) + extra if extra else o


def attention_max_logit(q, k, *, scale=None, causal=True, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
                        block_q=None, block_k=None):
    """max over visible pairs of scale * q . k per (batch, head): float32 [B, H] (-inf where a head sees no key),
    with no gradient. The key-block loop of `attention_blocked` without the softmax and value products: what the
    kernel paths run beside a kernel that cannot report it. Shapes and masking as `attention_reference`."""
    # Values play no part: k stands in for v in the shape checks and its chunked copy is never used.
    shape, kv_segment_ids, q_offset, scale = check_attention_inputs(
        q, k, k, q_segment_ids, kv_segment_ids, q_offset, scale, op="attention_max_logit")
    bq, bk = _blocks(block_q, block_k, shape, "attention_max_logit")
    B, T, Hkv, G = shape.B, shape.T, shape.Hkv, shape.G
    if T == 0:
        return jnp.full((B, shape.H), -jnp.inf, _F32)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    qc, kc, _, q_pos, q_seg, k_seg = _chunk_inputs(q, k, k, q_segment_ids, kv_segment_ids, q_offset, shape, bq, bk)
    visit = visited_blocks(q_pos, q_seg, k_seg, causal=causal) if q_segment_ids is not None else None
    k_pos = jnp.arange(kc.shape[0] * bk, dtype=jnp.int32).reshape(-1, bk)
    q_last = jnp.max(q_pos, axis=(1, 2))

    def q_block(_, xs):
        i, qi, pos_i, seg_i = xs

        def step(j, m):
            def compute(m):
                s = _scores(qi, kc[j], scale)
                s = jnp.where(_row_mask(pos_i, seg_i, k_pos[j], k_seg[j], causal, G), s, -jnp.inf)
                return jnp.maximum(m, jnp.max(s, axis=-1))
            return _maybe(visit, i, j, compute, m)

        m = jax.lax.fori_loop(0, _key_blocks_seen(q_last[i], bk, kc.shape[0], causal), step,
                              jnp.full(qi.shape[:3], -jnp.inf, _F32))
        return None, jnp.max(m.reshape(B, Hkv, bq, G), axis=2)

    _, m = jax.lax.scan(q_block, None, (jnp.arange(qc.shape[0]), qc, q_pos, q_seg))
    return jnp.max(m, axis=0).reshape(B, shape.H)


def visited_blocks(q_pos, q_seg, k_seg, *, causal: bool):
    """bool [nq, nk]: the (query block, key block) pairs the loops compute; every visible pair lies in one.

    q_pos, q_seg: int32 [nq, B, bq] (absolute positions, segment ids); k_seg: int32 [nk, B, bk], with 0 marking
    padding. A pair is visited iff, in some batch row, the blocks' ranges of nonzero segment ids overlap and (causal)
    the key block starts at or before the query block's last position.
    """
    def id_range(seg):  # [n, B, b] -> lowest and highest nonzero id, [n, B] each (empty: lo > hi)
        real = seg != 0
        return (jnp.min(jnp.where(real, seg, _NO_SEGMENT), axis=-1),
                jnp.max(jnp.where(real, seg, -_NO_SEGMENT), axis=-1))

    (q_lo, q_hi), (k_lo, k_hi) = id_range(q_seg), id_range(k_seg)
    meet = (k_lo[None] <= q_hi[:, None]) & (q_lo[:, None] <= k_hi[None])  # [nq, nk, B]
    if causal:
        bk = k_seg.shape[-1]
        k_start = (jnp.arange(k_seg.shape[0], dtype=jnp.int32) * bk)[None, :, None]
        meet &= k_start <= jnp.max(q_pos, axis=-1)[:, None, :]
    return jnp.any(meet, axis=-1)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _cap(block: int, n: int) -> int:
    """A block no larger than needed for n rows: n itself below 8 (one decode token is one row, not eight),
    else n rounded up to 8."""
    return min(block, n if n < 8 else _round_up(n, 8))


def _chunk_inputs(q, k, v, q_segment_ids, kv_segment_ids, q_offset, shape, bq, bk):
    """Pad T and S to whole blocks (padding gets segment 0: invisible) and go chunk-major.
    Returns qc [nq, B, Hkv, bq*G, Dk], kc [nk, B, Hkv, bk, Dk], vc [nk, B, Hkv, bk, Dv], q_pos, q_seg int32
    [nq, B, bq] and k_seg int32 [nk, B, bk]."""
    B, T, S, Hkv, G = shape.B, shape.T, shape.S, shape.Hkv, shape.G
    nq, nk = -(-T // bq), -(-S // bk)
    pad_t = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    qc = pad_t(q, nq * bq).reshape(B, nq, bq, Hkv, G, shape.Dk)
    qc = jnp.transpose(qc, (1, 0, 3, 2, 4, 5)).reshape(nq, B, Hkv, bq * G, shape.Dk)
    kc = jnp.transpose(pad_t(k, nk * bk).reshape(B, nk, bk, Hkv, -1), (1, 0, 3, 2, 4))
    vc = jnp.transpose(pad_t(v, nk * bk).reshape(B, nk, bk, Hkv, -1), (1, 0, 3, 2, 4))
    chunk = lambda x, n, b: jnp.swapaxes(x.reshape(B, n, b), 0, 1)  # noqa: E731
    q_seg = chunk(pad_t(segments_or_ones(q_segment_ids, B, T), nq * bq), nq, bq)
    k_seg = chunk(pad_t(segments_or_ones(kv_segment_ids, B, S), nk * bk), nk, bk)
    q_pos = chunk(q_offset[:, None] + jnp.arange(nq * bq, dtype=jnp.int32), nq, bq)
    return qc, kc, vc, q_pos, q_seg, k_seg


def _scores(qi, kj, scale):
    """[B, Hkv, R, D] x [B, Hkv, bk, D] -> scaled float32 logits [B, Hkv, R, bk]."""
    return jnp.einsum("bhrd,bhkd->bhrk", qi, kj, preferred_element_type=_F32) * scale


def _row_mask(pos_i, seg_i, k_pos_j, seg_j, causal, G):
    """`visible` for a block pair, repeated over the G heads of each query row: bool [B, 1, bq * G, bk]."""
    m = visible(pos_i, seg_i, k_pos_j[None], seg_j, causal)  # [B, bq, bk]
    B, bq, bk = m.shape
    return jnp.broadcast_to(m[:, None, :, None, :], (B, 1, bq, G, bk)).reshape(B, 1, bq * G, bk)


def _key_blocks_seen(q_last, bk, nk, causal):
    """Key blocks 0 .. n-1 hold every key a query block can see (causal: up to its last position)."""
    return jnp.clip(q_last // bk + 1, 0, nk) if causal else nk


def _first_query_block(q_last_all, k_start, causal):
    """The first query block whose last position reaches a key block starting at k_start (0 if not causal)."""
    return jnp.sum(q_last_all < k_start).astype(jnp.int32) if causal else 0


def _maybe(visit, i, j, compute, carry):
    """compute(carry) for a visited block pair, carry unchanged for a skipped one (no table: always compute)."""
    if visit is None:
        return compute(carry)
    return jax.lax.cond(visit[i, j], compute, lambda c: c, carry)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(scale, causal, qc, kc, vc, q_pos, q_seg, k_seg, visit):
    """o [nq, B, Hkv, R, Dv] in v's dtype, max_logit float32 [B, H] and lse float32 [nq, B, Hkv, R] (-inf for rows
    that see no key) from chunk-major inputs."""
    o, lse, max_logit = _forward(scale, causal, qc, kc, vc, q_pos, q_seg, k_seg, visit)
    return o, max_logit, lse


def _forward(scale, causal, qc, kc, vc, q_pos, q_seg, k_seg, visit):
    nk, B, Hkv, bk, Dv = vc.shape
    bq = q_pos.shape[-1]
    G = qc.shape[3] // bq
    k_pos = jnp.arange(nk * bk, dtype=jnp.int32).reshape(nk, bk)
    q_last = jnp.max(q_pos, axis=(1, 2))

    def q_block(_, xs):
        i, qi, pos_i, seg_i = xs

        def step(j, carry):
            def compute(carry):
                m, l, acc = carry
                s = _scores(qi, kc[j], scale)
                s = jnp.where(_row_mask(pos_i, seg_i, k_pos[j], k_seg[j], causal, G), s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                # Rows that have seen no visible key yet keep m = -inf; shift them by 0 so exp gives 0, not NaN.
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                l = alpha * l + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bhrk,bhkd->bhrd", p.astype(vc.dtype), vc[j], preferred_element_type=_F32)
                return m_new, l, alpha[..., None] * acc + pv
            return _maybe(visit, i, j, compute, carry)

        rows = qi.shape[:3]
        init = (jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, _F32), jnp.zeros(rows + (Dv,), _F32))
        m, l, acc = jax.lax.fori_loop(0, _key_blocks_seen(q_last[i], bk, nk, causal), step, init)
        seen = l > 0  # rows that see no key output 0 and a logsumexp of -inf
        l_safe = jnp.where(seen, l, 1.0)
        o = jnp.where(seen[..., None], acc / l_safe[..., None], 0.0).astype(vc.dtype)
        lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
        return None, (o, lse, jnp.max(m.reshape(B, Hkv, bq, G), axis=2))

    _, (o, lse, m) = jax.lax.scan(q_block, None, (jnp.arange(qc.shape[0]), qc, q_pos, q_seg))
    return o, lse, jnp.max(m, axis=0).reshape(B, Hkv * G)


def _flash_fwd(scale, causal, qc, kc, vc, q_pos, q_seg, k_seg, visit):
    o, lse, max_logit = _forward(scale, causal, qc, kc, vc, q_pos, q_seg, k_seg, visit)
    # Rows that see no key keep a harmless logsumexp of 0 for the backward (their p is masked to 0 there).
    return (o, max_logit, lse), (qc, kc, vc, q_pos, q_seg, k_seg, visit, o, jnp.where(jnp.isfinite(lse), lse, 0.0))


def _flash_bwd(scale, causal, residuals, cotangents):
    qc, kc, vc, q_pos, q_seg, k_seg, visit, o, lse = residuals
    do = cotangents[0].astype(vc.dtype)  # max_logit carries no gradient
    dlse = cotangents[2]
    nk, B, Hkv, bk, Dk = kc.shape
    nq, bq = qc.shape[0], q_pos.shape[-1]
    G = qc.shape[3] // bq
    # D_r = do_r . o_r = sum_s p_rs dp_rs: the softmax-Jacobian term of every row, computed once. A logsumexp
    # cotangent g_r adds p_rs g_r to d score_rs, i.e. it shifts D_r by -g_r (rows without keys have p = 0).
    delta = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1)  # [nq, B, Hkv, R]
    delta = delta - jnp.where(jnp.isfinite(dlse), dlse, 0.0).astype(_F32)
    q_last = jnp.max(q_pos, axis=(1, 2))
    k_pos = jnp.arange(nk * bk, dtype=jnp.int32).reshape(nk, bk)

    def k_block(dq, xs):
        j, kj, vj, pos_j, seg_j = xs

        def step(i, carry):
            def compute(carry):
                dq, dk, dv = carry
                qi, doi = qc[i], do[i]
                s = _scores(qi, kj, scale)
                mask = _row_mask(q_pos[i], q_seg[i], pos_j, seg_j, causal, G)
                p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
                dv = dv + jnp.einsum("bhrk,bhrd->bhkd", p.astype(doi.dtype), doi, preferred_element_type=_F32)
                dp = jnp.einsum("bhrd,bhkd->bhrk", doi, vj, preferred_element_type=_F32)
                ds = p * (dp - delta[i][..., None])
                dk = dk + scale * jnp.einsum("bhrk,bhrd->bhkd", ds.astype(qi.dtype), qi, preferred_element_type=_F32)
                dqi = scale * jnp.einsum("bhrk,bhkd->bhrd", ds.astype(kj.dtype), kj, preferred_element_type=_F32)
                dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dqi, i, 0)
                return dq, dk, dv
            return _maybe(visit, i, j, compute, carry)

        init = (dq, jnp.zeros((B, Hkv, bk, Dk), _F32), jnp.zeros((B, Hkv, bk, vj.shape[-1]), _F32))
        dq, dk, dv = jax.lax.fori_loop(_first_query_block(q_last, j * bk, causal), nq, step, init)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(qc.shape, _F32), (jnp.arange(nk), kc, vc, k_pos, k_seg))
    return dq.astype(qc.dtype), dk.astype(kc.dtype), dv.astype(vc.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)

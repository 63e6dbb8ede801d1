"""MLA's absorbed form over a latent cache: every query attends to cached latents in blocks, O(block) memory.

In the absorbed form (kimi_linear.md section 3) a query of head h is q_lat,h = W_UK,h^T q_nope,h [R] with its rope
part q_pe,h [P]; a cached token s is its normed latent c_s [R] and rope key k_pe,s [P], shared by all heads:

    score_h(t, s) = scale * (q_lat,h(t) . c_s + q_pe,h(t) . k_pe,s),    o_h(t) = sum_s softmax_s(score_h(t, .)) c_s

(the caller maps o_h back with W_UV,h). The cache is read in its own layout, a block of keys at a time
(`lax.dynamic_slice`): it is never concatenated, transposed or broadcast over heads, and no [T, S] array exists.
Heads act as extra query rows against the one shared key (multi-query), so each key block is read once for all of
them; queries go in blocks too (scan over query blocks, then key blocks), so a score block is [block_q * H,
block_k] whatever the number of queries (all 8,192 queries of a 48B prefill piece at once would make it
[262,144, 512] float32, 512 MiB). Blocks past the longest cached length are skipped (`lax.cond`), so a view
padded to a length bucket costs what its contents cost.

All cached keys precede the queries (a chunk of new tokens continuing a sequence, or one decode token), so the
only mask is each row's cached length and which queries continue the cache at all. With the log-sum-exp of the
scores returned, the caller merges this with the attention among the new tokens themselves
(`merge_attention`): one softmax over both, computed as two.

`decompressed_latent_attention` is the same attention in the expanded form: it up-projects the cache a block of
keys at a time to per-head K/V and runs the blocked attention op over each block. A (query, key) pair then costs
H * 2 * (n + P + d_v) flops instead of the absorbed H * 2 * (2 R + P), for R * H * (n + d_v) * 2 flops per key
decompressed once per call: at Kimi Linear's sizes (R = 512, n = 128, P = 64, d_v = 128, H = 32) 3.4x fewer
flops per pair, which pays for the decompression from about 171 queries on. So a long prefill piece continuing a
long cache (chunked prefill, a prefix-cache hit) runs expanded and a decode step absorbed, as vLLM's MLA backend
does; `expanded_pays_off` is the rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.dispatch import attention

_F32 = jnp.float32
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 512
DEFAULT_DECOMPRESS_BLOCK = 4096
# latent_attention_rows, measured on 2 CPU cores (28k cached tokens; `python bench/latent_rows.py --blocks
# 32x2048,32x1024`): a decode step runs 1,024-key blocks 0.69-0.86x the time of 2,048-key ones, a 129-token piece
# (padded to 256) 2,048-key blocks 0.83-0.99x the time of 1,024-key ones.
DEFAULT_ROWS_BLOCK_Q = 32
DEFAULT_ROWS_BLOCK_K = 2048
DEFAULT_ROWS_BLOCK_K_DECODE = 1024


def _read_key_block(ckv, kpe, row, start, size: int, length, rank: int, page_table=None, layer=None):
    """Keys [start, start + size) of cache row `row`: (c [size, R = rank], k_pe [size, P]).

    Contiguous cache (page_table None): ckv [N, S, R], kpe [N, S, P], read in place with dynamic slices.
    Paged cache: ckv is a page pool [L, num_pages, page_size, R + P] (c | k_pe of each token, the layout of
    k2jax.serving.page_pool), kpe is None, page_table int [B, max_pages] maps row `row`'s logical page j to its
    physical page (negative: none), layer (int scalar) picks the MLA layer; start and size are multiples of
    page_size, so the block is whole pages, read with one gather. Positions >= length are zeroed there: a page
    past a row's length may be another sequence's (or recycled), and a stale non-finite value times a masked
    (zero) probability would still poison the sum."""
    if page_table is None:
        c = jax.lax.dynamic_slice(ckv, (row, start, 0), (1, size, rank))[0]
        kp = jax.lax.dynamic_slice(kpe, (row, start, 0), (1, size, kpe.shape[-1]))[0]
        return c, kp
    block = _read_pages(ckv, page_table, row, start, size, layer, length)
    return block[:, :rank], block[:, rank:]


def _read_pages(pool, page_table, row, start, size: int, layer, length=None):
    """Keys [start, start + size) of row `row` of a paged cache, c | k_pe side by side: [size, R + P], one gather
    of whole pages (start and size multiples of page_size). With `length`, positions >= length (and pages the row
    lacks) are zeroed: such a page may be another sequence's or recycled, and a stale non-finite value times a
    masked (zero) probability would still poison the sum. Without it the caller knows every position is the row's
    own."""
    ps, D = pool.shape[2], pool.shape[3]
    pages = jax.lax.dynamic_slice(page_table, (row, start // ps), (1, size // ps))[0]
    block = pool[layer, jnp.maximum(pages, 0)].reshape(size, D)
    if length is None:
        return block
    ok = (start + jnp.arange(size, dtype=jnp.int32) < length) & jnp.repeat(pages >= 0, ps)
    return jnp.where(ok[:, None], block, jnp.zeros((), block.dtype))


def latent_attention(q_lat, q_pe, ckv, kpe, kv_lengths, *, scale: float, q_mask=None, block_q: int = DEFAULT_BLOCK_Q,
                     block_k: int = DEFAULT_BLOCK_K):
    """Softmax attention of queries over a latent cache, in the latent space.

    q_lat: [B, T, H, R]; q_pe: [B, T, H, P]; ckv: [B, S, R] (keys' latent part and the values); kpe: [B, S, P]
    (keys' rope part); kv_lengths: int [B]: row b's keys are entries [0, kv_lengths[b]); q_mask: bool [B, T] or
    None: queries that see the cache (False: they see no key). scale: the score scale. block_q: query tokens per
    block (their H heads are the block's rows); block_k: keys per block. Matmul inputs keep their dtype (ckv's),
    accumulation and softmax are float32.
    Returns (o [B, T, H, R] in ckv's dtype, 0 where a query sees no key; lse float32 [B, T, H], the log-sum-exp
    of the query's scaled scores, -inf where it sees no key). Differentiable by plain autodiff.
    """
    B, T, H, R = _check(q_lat, q_pe, ckv, kpe, kv_lengths, q_mask, block_q, block_k)
    S = ckv.shape[1]
    dt = ckv.dtype
    bq, bk = min(int(block_q), T), min(int(block_k), S)
    nq, nk = -(-T // bq), -(-S // bk)
    lengths = jnp.clip(kv_lengths.astype(jnp.int32), 0, S)
    # A query that does not continue the cache sees a cache of length 0; padded query rows see none either.
    lengths_q = jnp.broadcast_to(lengths[:, None], (B, T)) if q_mask is None else jnp.where(q_mask, lengths[:, None], 0)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, nq * bq - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    # Query blocks leading, rows = (token, head) pairs against one shared key: a plain batched matmul per block
    # pair with the batch dim leading, and a [bq * H, bk] score block that stays in cache.
    chunk = lambda x: jnp.swapaxes(pad(x).reshape(B, nq, bq * H, -1), 0, 1)  # noqa: E731
    qc, pc = chunk(q_lat.astype(dt)), chunk(q_pe.astype(dt))
    len_c = jnp.swapaxes(jnp.repeat(pad(lengths_q), H, axis=1).reshape(B, nq, bq * H), 0, 1)  # [nq, B, rows]
    n_blocks = -(-jnp.max(lengths) // bk)  # key blocks holding any visible key

    def q_block(_, xs):
        ql, qp, len_rows = xs

        def k_block(carry, j):
            def compute(carry):
                m, l, acc = carry
                # The last block is read from S - bk when bk does not divide S; keys before j * bk were counted.
                start = jnp.minimum(j * bk, S - bk)
                c = jax.lax.dynamic_slice_in_dim(ckv, start, bk, axis=1)
                kp = jax.lax.dynamic_slice_in_dim(kpe, start, bk, axis=1).astype(dt)
                s = (jnp.einsum("bqr,bkr->bqk", ql, c, preferred_element_type=_F32)
                     + jnp.einsum("bqp,bkp->bqk", qp, kp, preferred_element_type=_F32)) * scale
                pos = start + jnp.arange(bk, dtype=jnp.int32)
                ok = (pos[None, None, :] >= j * bk) & (pos[None, None, :] < len_rows[:, :, None])
                s = jnp.where(ok, s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing seen yet: exp(-inf) = 0
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = jnp.einsum("bqk,bkr->bqr", p.astype(dt), c, preferred_element_type=_F32)
                return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv
            return jax.lax.cond(j < n_blocks, compute, lambda c: c, carry), None

        rows = ql.shape[:2]
        init = (jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, _F32), jnp.zeros(rows + (R,), _F32))
        (m, l, acc), _ = jax.lax.scan(k_block, init, jnp.arange(nk, dtype=jnp.int32))
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o = jnp.where(seen[..., None], acc / l_safe[..., None], 0.0).astype(dt)
        return None, (o, jnp.where(seen, m + jnp.log(l_safe), -jnp.inf))

    _, (o, lse) = jax.lax.scan(q_block, None, (qc, pc, len_c))
    o = jnp.swapaxes(o, 0, 1).reshape(B, nq * bq, H, R)[:, :T]
    lse = jnp.swapaxes(lse, 0, 1).reshape(B, nq * bq, H)[:, :T]
    return o, lse


def expanded_pays_off(num_queries: int, *, heads: int, nope_dim: int, rope_dim: int, v_dim: int,
                      kv_lora_rank: int) -> bool:
    """Whether `num_queries` queries (a piece's tokens) over a latent cache cost fewer flops in the expanded form
    (decompress every cached key once, then per-head attention) than in the absorbed one (latent-space attention).
    Per cached key: expanded T * H * 2 * (n + P + d_v) + H * R * 2 * (n + d_v), absorbed T * H * 2 * (2 R + P).
    Static (Python ints), so a compiled program takes one form."""
    absorbed = num_queries * heads * 2 * (2 * kv_lora_rank + rope_dim)
    expanded = num_queries * heads * 2 * (nope_dim + rope_dim + v_dim) + heads * kv_lora_rank * 2 * (nope_dim + v_dim)
    return expanded < absorbed


def decompressed_latent_attention(q_nope, q_pe, ckv, kpe, kv_lengths, w_uk, w_uv, *, scale: float, q_mask=None,
                                  cache_rows=None, page_table=None, layer=None,
                                  decompress_block: int = DEFAULT_DECOMPRESS_BLOCK,
                                  block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K):
    """The attention of `latent_attention` in the expanded form, for many queries over a long cache.

    q_nope: [B, T, H, n]; q_pe: [B, T, H, P]; ckv: [N, S, R]; kpe: [N, S, P]; kv_lengths: int [B] (row b's keys are
    entries [0, kv_lengths[b]) of cache row cache_rows[b]); cache_rows: int [B] or None (then N = B and row b reads
    cache row b; a serving step reads its slots of a many-sequence cache in place, a block at a time); w_uk:
    [H, n, R] and w_uv: [H, R, d_v], the up-projections (k_nope_h(s) = W_UK,h c_s, v_h(s) = W_UV,h^T c_s); q_mask: bool [B, T] or None (False: the query sees no key). The cache is read
    `decompress_block` keys at a time (a scan that skips blocks past the longest length), each block up-projected
    to K [B, block, H, n + P] and V [B, block, H, d_v] in the compute dtype and attended by the blocked attention
    op (`block_q`, `block_k`), the blocks' partial results merged by their log-sum-exp: memory O(block), never
    [T, S]. Returns (o [B, T, H, d_v] in ckv's dtype, 0 where a query sees no key; lse float32 [B, T, H], -inf
    where it sees no key), equal to latent_attention followed by W_UV. A paged cache (page_table, layer) is read
    as in `latent_attention_rows` (decompress_block rounded down to a multiple of page_size).
    """
    B, T, H, n = q_nope.shape
    if q_pe.shape[:3] != (B, T, H) or w_uk.shape[:2] != (H, n) or w_uv.shape[0] != H:
        raise ValueError(f"decompressed_latent_attention: q_nope [B, T, H, n] = {q_nope.shape}, q_pe {q_pe.shape}, "
                         f"w_uk [H, n, R] {w_uk.shape} and w_uv [H, R, d_v] {w_uv.shape} disagree")
    R = w_uk.shape[2]
    _check(jax.ShapeDtypeStruct((B, T, H, R), q_pe.dtype), q_pe, ckv, kpe, kv_lengths, q_mask, block_q, block_k,
           cache_rows, op="decompressed_latent_attention", page_table=page_table, layer=layer)
    if w_uv.shape[1] != R:
        raise ValueError(f"decompressed_latent_attention: w_uv must be [H, R={R}, d_v], got {w_uv.shape}")
    if isinstance(decompress_block, bool) or not isinstance(decompress_block, int) or decompress_block < 1:
        raise ValueError(f"decompressed_latent_attention: decompress_block must be a positive int, "
                         f"got {decompress_block!r}")
    S, P, dv, dt = _capacity(ckv, page_table), q_pe.shape[-1], w_uv.shape[2], ckv.dtype
    bs = _key_block(decompress_block, S, ckv, page_table)
    lengths = jnp.clip(kv_lengths.astype(jnp.int32), 0, S)
    q = jnp.concatenate([q_nope.astype(dt), q_pe.astype(dt)], axis=-1)
    q_seg = jnp.ones((B, T), jnp.int32) if q_mask is None else q_mask.astype(jnp.int32)
    n_blocks = -(-jnp.max(lengths) // bs)

    def block(carry, j):
        def compute(carry):
            # The last block is read from S - bs when bs does not divide S; keys before j * bs were counted.
            start = jnp.minimum(j * bs, S - bs)
            if cache_rows is None and page_table is None:
                c = jax.lax.dynamic_slice_in_dim(ckv, start, bs, axis=1)
                kp = jax.lax.dynamic_slice_in_dim(kpe, start, bs, axis=1).astype(dt)
            else:  # only this block of each row's cache row (or pages) is read
                rows = jnp.arange(B, dtype=jnp.int32) if cache_rows is None else cache_rows
                c, kp = jax.vmap(lambda r, n: _read_key_block(ckv, kpe, r, start, bs, n, R, page_table, layer))(
                    rows, lengths)
                kp = kp.astype(dt)
            k_nope = jnp.einsum("bsr,hnr->bshn", c, w_uk.astype(dt), preferred_element_type=_F32).astype(dt)
            v = jnp.einsum("bsr,hrv->bshv", c, w_uv.astype(dt), preferred_element_type=_F32).astype(dt)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(kp[:, :, None, :], (B, bs, H, P))], axis=-1)
            pos = start + jnp.arange(bs, dtype=jnp.int32)
            kv_seg = ((pos[None, :] >= j * bs) & (pos[None, :] < lengths[:, None])).astype(jnp.int32)
            o_j, lse_j = attention(q, k, v, scale=scale, causal=False, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                   impl="xla", block_q=block_q, block_k=block_k, return_lse=True)
            return merge_attention(carry[0], carry[1], o_j, lse_j)
        return jax.lax.cond(j < n_blocks, compute, lambda c: c, carry), None

    init = (jnp.zeros((B, T, H, dv), dt), jnp.full((B, T, H), -jnp.inf, _F32))
    (o, lse), _ = jax.lax.scan(block, init, jnp.arange(-(-S // bs), dtype=jnp.int32))
    return o, lse


def latent_attention_rows(q_lat, q_pe, ckv, kpe, kv_lengths, *, scale: float, q_mask=None, cache_rows=None,
                          page_table=None, layer=None, block_q: int = DEFAULT_ROWS_BLOCK_Q,
                          block_k: int | None = None):
    """`latent_attention` for serving, where the work follows each row's live cache: row b reads row
    cache_rows[b] of a cache holding many sequences (default row b), and only its own key blocks up to
    kv_lengths[b] and its own query blocks up to its last query that sees the cache. A row of length 0 costs
    nothing, so a decode step over every slot of a slot cache costs what its live slots hold, not slots x
    max_len, and no view of the cache is ever gathered or sliced.

    q_lat: [B, T, H, R]; q_pe: [B, T, H, P]; ckv: [N, S, R]; kpe: [N, S, P] (N sequences, S entries each);
    kv_lengths: int [B]; q_mask: bool [B, T] or None (as in `latent_attention`); cache_rows: int [B] in [0, N) or
    None (then N must be B). Paged cache (page_table given): ckv is a page pool [L, num_pages, page_size, R + P],
    kpe None, page_table int [B, max_pages] row b's pages (logical order, negative: none) and layer (int scalar)
    the pool's MLA layer; row b's keys are its first kv_lengths[b] positions, read a block of whole pages at a
    time (block_k is rounded down to a multiple of page_size). Rows run one after another, each a loop over its
    query blocks and, inside, its key blocks, with trip counts read at run time (`lax.while_loop`): not
    reverse-differentiable (`latent_attention`, a scan over fixed block counts, is). Rows in sequence suit serving's few live rows; a batch of many equally long
    rows is what `latent_attention` batches better. Returns (o [B, T, H, R] in ckv's dtype, lse float32 [B, T, H])
    equal to `latent_attention` on the gathered rows. block_q: query tokens per block; block_k: keys per block
    (None: DEFAULT_ROWS_BLOCK_K_DECODE for one query token, else DEFAULT_ROWS_BLOCK_K).
    """
    if block_k is None:
        block_k = DEFAULT_ROWS_BLOCK_K_DECODE if q_lat.shape[1:2] == (1,) else DEFAULT_ROWS_BLOCK_K
    B, T, H, R = _check(q_lat, q_pe, ckv, kpe, kv_lengths, q_mask, block_q, block_k, cache_rows,
                        op="latent_attention_rows", page_table=page_table, layer=layer)
    if cache_rows is None:
        cache_rows = jnp.arange(B, dtype=jnp.int32)
    S, P, dt = _capacity(ckv, page_table), q_pe.shape[-1], ckv.dtype
    bq, bk = min(int(block_q), T), _key_block(block_k, S, ckv, page_table)
    nq = -(-T // bq)
    rows_q = bq * H  # a query block's rows: bq tokens x H heads against one shared key
    pad = lambda x: jnp.pad(x, [(0, 0), (0, nq * bq - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    ql_all = pad(q_lat.astype(dt)).reshape(B, nq * rows_q, R)
    qp_all = pad(q_pe.astype(dt)).reshape(B, nq * rows_q, P)
    lengths = jnp.clip(kv_lengths.astype(jnp.int32), 0, S)
    sees = jnp.ones((B, T), bool) if q_mask is None else q_mask
    sees = pad(sees & (lengths[:, None] > 0))  # [B, nq * bq]: the queries that see any key
    # Per row: its query blocks up to the last query that sees the cache.
    last_q = jnp.max(jnp.where(sees, jnp.arange(nq * bq, dtype=jnp.int32) + 1, 0), axis=1)
    n_q = -(-last_q // bq)
    paged = page_table is not None
    # A paged block is c | k_pe side by side: one product against [q_lat | q_pe] for the scores and one against
    # the whole block for the values (the k_pe columns of the result are dropped at the end), so the block is never
    # sliced into copies. A contiguous cache holds c and k_pe apart: two score products, values from c.
    q_all = jnp.concatenate([ql_all, qp_all], axis=-1)  # [B, nq * rows_q, R + P]
    width = ckv.shape[-1] if paged else R  # columns of the value product

    def row(xs):
        q_r, sees_r, length, nqb, cache_row = xs
        sees_rows = jnp.repeat(sees_r, H)  # [nq * rows_q], token-major like q_r
        # Every query of a row sees the same keys [0, length): blocks wholly inside are the row's own tokens and need
        # no mask (nor zeroing, paged); only the last, partial block does. Each block visited holds a visible key,
        # so every running max is finite.
        n_full = length // bk

        def scores(q, start, tail: bool):
            """(scaled scores [rows_q, bk] float32, values [bk, width]) of the keys from `start`."""
            if paged:
                kv = _read_pages(ckv, page_table, cache_row, start, bk, layer, length if tail else None)
                return jnp.einsum("qd,kd->qk", q, kv, preferred_element_type=_F32) * scale, kv
            c = jax.lax.dynamic_slice(ckv, (cache_row, start, 0), (1, bk, R))[0]
            kp = jax.lax.dynamic_slice(kpe, (cache_row, start, 0), (1, bk, P))[0].astype(dt)
            s = (jnp.einsum("qr,kr->qk", q[:, :R], c, preferred_element_type=_F32)
                 + jnp.einsum("qp,kp->qk", q[:, R:], kp, preferred_element_type=_F32))
            return s * scale, c

        def update(carry, s, v):
            m, l, acc = carry
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[:, None])
            alpha = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
            pv = jnp.einsum("qk,kd->qd", p.astype(dt), v, preferred_element_type=_F32)
            return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[:, None] * acc + pv

        def q_block(i, out):
            o_all, lse_all = out
            q = jax.lax.dynamic_slice_in_dim(q_r, i * rows_q, rows_q)

            def tail_block(carry):
                # Keys [n_full * bk, length). The block is read from S - bk when it would run past the cache, so
                # the keys before n_full * bk, counted already, are masked too.
                start = jnp.minimum(n_full * bk, S - bk)
                s, v = scores(q, start, True)
                pos = start + jnp.arange(bk, dtype=jnp.int32)
                s = jnp.where(((pos >= n_full * bk) & (pos < length))[None, :], s, -jnp.inf)
                return update(carry, s, v)

            init = (jnp.full((rows_q,), -jnp.inf, _F32), jnp.zeros((rows_q,), _F32),
                    jnp.zeros((rows_q, width), _F32))
            carry = jax.lax.fori_loop(0, n_full, lambda j, c: update(c, *scores(q, j * bk, False)), init)
            m, l, acc = jax.lax.cond(length > n_full * bk, tail_block, lambda c: c, carry)
            seen = jax.lax.dynamic_slice_in_dim(sees_rows, i * rows_q, rows_q) & (l > 0)
            l_safe = jnp.where(seen, l, 1.0)
            o = jnp.where(seen[:, None], acc[:, :R] / l_safe[:, None], 0.0).astype(dt)
            lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
            return (jax.lax.dynamic_update_slice_in_dim(o_all, o, i * rows_q, 0),
                    jax.lax.dynamic_update_slice_in_dim(lse_all, lse, i * rows_q, 0))

        out = (jnp.zeros((nq * rows_q, R), dt), jnp.full((nq * rows_q,), -jnp.inf, _F32))
        return jax.lax.fori_loop(0, nqb, q_block, out)

    o, lse = jax.lax.map(row, (q_all, sees, lengths, n_q, cache_rows.astype(jnp.int32)))
    return o.reshape(B, nq * bq, H, R)[:, :T], lse.reshape(B, nq * bq, H)[:, :T]


def merge_attention(o1, lse1, o2, lse2):
    """One softmax over two disjoint key sets from the two partial results: o = (e1 o1 + e2 o2) / (e1 + e2) with
    e_i = exp(lse_i - max(lse1, lse2)). o1, o2: [..., D]; lse1, lse2: float32 [...] (-inf: that part saw no key).
    Returns (o [..., D] in o1's dtype, 0 where neither part saw a key; lse float32 [...])."""
    m = jnp.maximum(lse1, lse2)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    e1, e2 = jnp.exp(lse1 - m_safe), jnp.exp(lse2 - m_safe)
    total = e1 + e2
    seen = total > 0
    t_safe = jnp.where(seen, total, 1.0)
    o = (e1[..., None] * o1.astype(_F32) + e2[..., None] * o2.astype(_F32)) / t_safe[..., None]
    lse = jnp.where(seen, m_safe + jnp.log(t_safe), -jnp.inf)
    return jnp.where(seen[..., None], o, 0.0).astype(o1.dtype), lse


def _capacity(ckv, page_table) -> int:
    """Key positions a cache row can hold: S of a contiguous [N, S, R] cache, max_pages * page_size paged."""
    return ckv.shape[1] if page_table is None else page_table.shape[1] * ckv.shape[2]


def _key_block(block: int, capacity: int, ckv, page_table) -> int:
    """Keys read per block: at most `block` and the capacity, whole pages when the cache is paged."""
    if page_table is None:
        return min(int(block), capacity)
    ps = ckv.shape[2]
    return min(max(ps, int(block) // ps * ps), capacity)


def _check_paged(q_pe, ckv, kpe, kv_lengths, page_table, layer, cache_rows, B, R, op):
    P = q_pe.shape[-1]
    if ckv.ndim != 4 or ckv.shape[-1] != R + P or kpe is not None:
        raise ValueError(f"{op}: a paged cache is ckv = the page pool [L, num_pages, page_size, R + P = {R + P}] "
                         f"with kpe None, got ckv {ckv.shape} and kpe {None if kpe is None else kpe.shape}")
    if page_table.ndim != 2 or page_table.shape[0] != B or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ValueError(f"{op}: page_table must be int [B={B}, max_pages], got "
                         f"{page_table.dtype}{list(page_table.shape)}")
    if page_table.shape[1] < 1:
        raise ValueError(f"{op}: page_table needs at least one column (max_pages >= 1)")
    if cache_rows is not None:
        raise ValueError(f"{op}: a paged cache is addressed by page_table rows, so cache_rows must be None")
    if layer is None or jnp.ndim(layer) != 0:
        raise ValueError(f"{op}: a paged cache needs layer, an int scalar (the pool's MLA layer), got {layer!r}")
    if kv_lengths.shape != (B,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
        raise ValueError(f"{op}: kv_lengths must be int [B={B}], got {kv_lengths.dtype}{list(kv_lengths.shape)}")


def _check(q_lat, q_pe, ckv, kpe, kv_lengths, q_mask, block_q, block_k, cache_rows=None, op="latent_attention",
           page_table=None, layer=None):
    if q_lat.ndim != 4 or q_pe.ndim != 4 or q_lat.shape[:3] != q_pe.shape[:3]:
        raise ValueError(f"{op}: q_lat must be [B, T, H, R] and q_pe [B, T, H, P] with the same B, T, H, got "
                         f"{q_lat.shape} and {q_pe.shape}")
    B, T, H, R = q_lat.shape
    if page_table is not None:
        _check_paged(q_pe, ckv, kpe, kv_lengths, page_table, layer, cache_rows, B, R, op)
        return _check_rest(q_mask, block_q, block_k, B, T, H, R, op)
    S = ckv.shape[1] if ckv.ndim == 3 else -1
    N = B if cache_rows is None else (ckv.shape[0] if ckv.ndim == 3 else -1)  # cache rows: any number when mapped
    if ckv.shape != (N, S, R) or kpe.shape != (N, S, q_pe.shape[-1]):
        lead = f"B={B}" if cache_rows is None else "N"
        raise ValueError(f"{op}: ckv must be [{lead}, S, R={R}] and kpe [{lead}, S, P={q_pe.shape[-1]}] with the same "
                         f"leading dims, got {ckv.shape} and {kpe.shape}")
    if cache_rows is not None and (cache_rows.shape != (B,) or not jnp.issubdtype(cache_rows.dtype, jnp.integer)):
        raise ValueError(f"{op}: cache_rows must be int [B={B}], got {cache_rows.dtype}{list(cache_rows.shape)}")
    if S < 1:
        raise ValueError(f"{op}: the cache needs at least one entry (S >= 1), got S={S}")
    if kv_lengths.shape != (B,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
        raise ValueError(f"{op}: kv_lengths must be int [B={B}], got {kv_lengths.dtype}{list(kv_lengths.shape)}")
    return _check_rest(q_mask, block_q, block_k, B, T, H, R, op)


def _check_rest(q_mask, block_q, block_k, B, T, H, R, op):
    if q_mask is not None and (q_mask.shape != (B, T) or q_mask.dtype != jnp.bool_):
        raise ValueError(f"{op}: q_mask must be bool [B, T] = [{B}, {T}], got {q_mask.dtype}{list(q_mask.shape)}")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {block!r}")
    return B, T, H, R

"""Chunked KDA in pure JAX/XLA: the WY/UT form of the Kimi Linear tech report (arXiv 2510.26692, Eqs. 6-7; fla's
`chunk_kda`), differentiable by plain autodiff.

Layout: chunk-major [N, B, H, C, F]. One `lax.scan` step handles a group of chunks (a few on CPU; see
`GROUP_ELEMS`): the intra-chunk part (gate cumsum, Aqk, Akk, the unit-lower inverse, W, U) is batched over the
group's chunks and heads, then the state recurrence runs over the group's chunks. Each step is rematerialised in
the backward pass. Measured on CPU (B=1, H=4, K=V=128, T=2048), this beat computing the intra-chunk part for all
chunks at once by about 5x forward: whole-sequence temporaries are larger than the cache and, above ~32 MiB,
are fresh mmap pages on every call.

Overflow safety (the model's gate has no lower bound): every exp is of a quantity forced to be <= 0 by a select
on the mask *before* the exp, never by multiplying an inf by a zero mask. The [C, C] products are built from
anchored sub-blocks (`_scores`): off-diagonal blocks as (X_r exp(G_r - g_a)) @ (K_c exp(g_a - G_c))^T with g_a the
cumulative gate at the first row of the row block (both factors <= 1 within a segment), recursing into the
diagonal blocks (16 then 4 rows) and doing only the 4x4 diagonal blocks elementwise: no [C, C, K] tensor, and the
largest elementwise temporary is [C, 4, K] per chunk.

Segments (see `kda_reference`): pad tokens (id 0) get zero q, k, v, beta and g, which makes them exactly inert
(no read, no state change, zero output); a forward-filled id marks restarts, and `sid` numbers the segments of a
row. Per chunk, `cm` masks the rows that continue the state carried into the chunk and `em` the rows of the chunk's
last segment (kda_backward.md section 2h); the gate cumsum restarts at every segment start.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kda._checks import check_sequence_inputs

SUB = 16  # chunk sizes are multiples of this; also the block size of the triangular solve


def kda_chunk(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
              chunk_size=64):
    """Chunked KDA; same shapes, semantics and return as `kda_reference`.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log-decay (<= 0); beta: [B, T, H];
    initial_state: [B, H, K, V] or None (zeros); segment_ids: int [B, T] or None (0 = padding).
    chunk_size: a positive multiple of 16; T need not be a multiple of it (padded internally with inert rows).
    Returns (o [B, T, H, V] in v.dtype, final_state [B, H, K, V] float32 or None).
    """
    B, T, H, K, V = check_sequence_inputs(q, k, v, g, beta, initial_state, segment_ids, op="kda_chunk")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0 \
            or chunk_size % SUB:
        raise ValueError(f"kda_chunk: chunk_size must be a positive multiple of {SUB}, got {chunk_size!r}")
    scale = K ** -0.5 if scale is None else scale
    S0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    if T == 0:
        return jnp.zeros((B, 0, H, V), v.dtype), (S0 if output_final_state else None)
    xs = _prepare(q, k, v, g, beta, segment_ids, jnp.asarray(scale, jnp.float32), chunk_size=int(chunk_size))
    S, o = _chunk_scan(S0, xs)
    return _finish(o, T, v.dtype), (S if output_final_state else None)


# The three stages are jitted separately so that eager callers reuse the compiled scan for every T that pads to
# the same chunk count, with or without segments (pads and masks are inputs); under an outer jit they inline.
@partial(jax.jit, static_argnames=("chunk_size",))
def _prepare(q, k, v, g, beta, segment_ids, scale, *, chunk_size):
    """Pad to whole groups of chunks, make pads inert, build segment masks; returns the scan inputs
    (q*scale, k, v, g, beta, sid, cm, em), each [N / group, group, B, H or 1, C, ...]."""
    B, T, H, K = q.shape
    C, f32 = chunk_size, jnp.float32
    n_chunks = -(-T // C)
    group = group_size(n_chunks, B * H * C * max(K, v.shape[-1]))
    Tp = -(-n_chunks // group) * group * C
    q, k, v, g, beta = (_pad_time(x.astype(f32), Tp) for x in (q, k, v, g, beta))
    q = q * scale
    if segment_ids is not None:
        real, sid = _segment_index(_pad_time(segment_ids.astype(jnp.int32), Tp))
        q, k, v, g = (jnp.where(real[:, :, None, None], x, 0.0) for x in (q, k, v, g))
        beta = jnp.where(real[:, :, None], beta, 0.0)
        sid = _chunked(sid[:, :, None], C)  # [N, B, 1, C]
    else:
        sid = jnp.zeros((Tp // C, B, 1, C), jnp.int32)
    # cm: rows continuing the state carried into their chunk; em: rows in the chunk's last segment.
    sid_prev = jnp.concatenate([jnp.zeros_like(sid[:1, ..., -1:]), sid[:-1, ..., -1:]], axis=0)
    cm, em = sid == sid_prev, sid == sid[..., -1:]
    xs = tuple(_chunked(x, C) for x in (q, k, v, g, beta)) + (sid, cm, em)
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // group, group) + x.shape[1:]), xs)


@jax.jit
def _chunk_scan(S0, xs):
    """The scan over groups of chunks; returns (final state, o [N / group, group, B, H, C, V])."""
    # Rematerialise each step in the backward pass: saving every step's intermediates costs more on CPU (large
    # temporaries) than recomputing them.
    return jax.lax.scan(jax.checkpoint(_group_step), S0, xs)


@partial(jax.jit, static_argnums=(1, 2))
def _finish(o, T, dtype):
    """[N / group, group, B, H, C, V] -> [B, T, H, V] in dtype."""
    B, H, C, V = o.shape[2:]
    o = o.reshape((-1, B, H, C, V)).transpose(1, 0, 3, 2, 4).reshape(B, -1, H, V)
    return o[:, :T].astype(dtype)


# Chunks per scan step: the largest power of two whose inputs stay within this many elements (1 chunk at B=1, H=4,
# K=V=128; more for small shapes, so fewer, larger steps). Measured on CPU: bigger groups were slower at real sizes.
GROUP_ELEMS = 1 << 15


def group_size(n_chunks, elems_per_chunk):
    """Chunks processed together per scan step: a power of two, at most n_chunks rounded up."""
    gr = 1
    while gr < n_chunks and 2 * gr * elems_per_chunk <= GROUP_ELEMS:
        gr *= 2
    return gr


def _pad_time(x, Tp):
    """Zero-pad axis 1 (time) to length Tp."""
    return jnp.pad(x, [(0, 0), (0, Tp - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _chunked(x, C):
    """[B, T, H, *F] -> [N, B, H, C, *F] (chunk-major, batch dims leading)."""
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // C, C, H, *x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 2))


def _segment_index(seg):
    """seg: int32 [B, T] -> (real bool [B, T], sid int32 [B, T]).

    restart marks a real token whose id differs from the previous real token's id (never the row's first real
    token: that one continues initial_state). sid counts restarts, so equal sid = same segment; pads take the sid
    of the previous real token (they are inert, so which segment they join does not matter).
    """
    B, T = seg.shape
    real = seg != 0
    pos = jnp.where(real, jnp.arange(T, dtype=jnp.int32)[None, :], -1)
    last = jax.lax.cummax(pos, axis=1)
    filled = jnp.where(last >= 0, jnp.take_along_axis(seg, jnp.maximum(last, 0), axis=1), 0)
    prev = jnp.pad(filled[:, :-1], ((0, 0), (1, 0)))
    restart = real & (prev != 0) & (seg != prev)
    return real, jnp.cumsum(restart.astype(jnp.int32), axis=1)


def _local_cumsum(g, same_seg):
    """Chunk-local cumulative sum over rows, restarting at segment starts: G = M @ g with the [C, C] mask
    M[r, c] = (c <= r and same segment). g: [..., C, K]; same_seg: bool [..., C, C] (broadcastable)."""
    C = g.shape[-2]
    tri = np.tril(np.ones((C, C), bool))  # static masks are numpy: constants, not traced ops
    return jnp.where(tri & same_seg, 1.0, 0.0).astype(g.dtype) @ g


LEVELS = (16, 4)  # anchoring block sizes, outermost first; the innermost blocks are done elementwise


def _sel_exp(ok, x):
    """exp(x) where ok, else 0; x is replaced by 0 before the exp where not ok, so nothing overflows."""
    return jnp.where(ok, jnp.exp(jnp.where(ok, x, 0.0)), 0.0)


def _scores(X, Kc, G, sid, levels):
    """S[l, x, r, c] = sum_k X[l, x, r, k] Kc[l, c, k] exp(G[l, r, k] - G[l, c, k]) for c <= r in one segment, else 0.

    X: [L, R, n, K] (R row sets sharing the columns); Kc, G: [L, n, K]; sid: [L, n]. G is non-increasing within
    a segment. Off-diagonal blocks of size levels[0] are anchored at the first row g_a of the row block:
    (X_r exp(G_r - g_a)) @ (K_c exp(g_a - G_c))^T, both factors <= 1; diagonal blocks recurse, and the innermost
    ones are elementwise.
    """
    L, R, n, K = X.shape
    levels = tuple(b for b in levels if b < n)
    if not levels:
        tri = np.tri(n, dtype=bool)
        same = (sid[:, :, None] == sid[:, None, :]) & tri  # [L, r, c]
        KE = Kc[:, None, :, :] * _sel_exp(same[..., None], G[:, :, None, :] - G[:, None, :, :])  # [L, r, c, K]
        S = jnp.einsum("lxrk,lrck->lxrc", X, KE)
        return jnp.where(same[:, None], S, 0.0)
    sub = levels[0]
    nb = n // sub
    Xb = X.reshape(L, R, nb, sub, K)
    Gb, Kb, sidb = G.reshape(L, nb, sub, K), Kc.reshape(L, nb, sub, K), sid.reshape(L, nb, sub)
    Ga, sid_a = Gb[:, :, 0], sidb[:, :, 0]  # anchors: first row of each row block
    # Rows after a restart inside their block see no earlier block; columns before a restart are not seen.
    er = _sel_exp((sidb == sid_a[..., None])[..., None], Gb - Ga[:, :, None])  # [L, nb, sub, K]
    before = np.arange(n)[None, :] < (np.arange(nb) * sub)[:, None]  # [nb, n]
    col_ok = (before & (sid[:, None, :] == sid_a[:, :, None]))[..., None]  # [L, nb, n, 1]
    Kcol = Kc[:, None] * _sel_exp(col_ok, Ga[:, :, None] - G[:, None])  # [L, nb, n, K]
    off = jnp.einsum("lxirk,lick->lxirc", Xb * er[:, None], Kcol)  # [L, R, nb, sub, n]
    flat = lambda x: jnp.moveaxis(x, 2, 1).reshape((L * nb,) + x.shape[1:2] + x.shape[3:])  # noqa: E731
    diag = _scores(flat(Xb), Kb.reshape(L * nb, sub, K), Gb.reshape(L * nb, sub, K), sidb.reshape(L * nb, sub),
                   levels[1:]).reshape(L, nb, R, sub, sub)
    # Place the diagonal blocks: off is zero there (columns of block i are not "before" block i).
    diag = jnp.moveaxis(diag, 2, 1)[:, :, :, :, None, :]  # [L, R, nb, sub, 1, sub]
    on_diag = np.eye(nb, dtype=bool)[:, None, :, None]  # [nb, 1, nb, 1]
    off = jnp.where(on_diag, diag, off.reshape(L, R, nb, sub, nb, sub))
    return off.reshape(L, R, n, n)


def _intra_scores(Q, Kc, G, sid):
    """Aqk [L, C, C] (c <= r) and Akk without beta [L, C, C] (c < r), zero across segments.
    Q, Kc, G: [L, C, K]; sid: [L, C]."""
    S = _scores(jnp.stack([Q, Kc], axis=1), Kc, G, sid, LEVELS)
    C = Q.shape[-2]
    return S[:, 0], jnp.where(np.eye(C, dtype=bool), 0.0, S[:, 1])


def _unit_lower_inverse(D):
    """(I + D)^{-1} for strictly lower D [..., n, n], n a power of two, by block doubling.

    With T_s the inverse of the block-diagonal part of I + D in blocks of s (T_1 = I) and X_s the lower-left
    s x s blocks inside each 2s block, T_2s = T_s - T_s X_s T_s exactly (X_s T_s X_s = 0): log2(n) levels
    of batched matmuls instead of n sequential row updates.
    """
    n = D.shape[-1]
    idx = np.arange(n)
    Tm = np.eye(n, dtype=np.float32) - jnp.where((idx[:, None] // 2 == idx[None, :] // 2), D, 0.0)
    s = 2
    while s < n:
        lower_left = (idx[:, None] // (2 * s) == idx[None, :] // (2 * s)) & (idx[:, None] // s != idx[None, :] // s)
        Tm = Tm - Tm @ jnp.where(lower_left, D, 0.0) @ Tm
        s *= 2
    return Tm


def solve_unit_lower(A, X):
    """(I + A)^{-1} X for strictly lower A [..., C, C] (C a multiple of 16) and X [..., C, F].

    The 16x16 diagonal blocks are inverted by block doubling, then block forward substitution over the C/16 row
    blocks applies them to X (never forming the full inverse).
    """
    C = A.shape[-1]
    nb = C // SUB
    sl = lambda i: slice(i * SUB, (i + 1) * SUB)  # noqa: E731
    D = jnp.stack([A[..., sl(i), sl(i)] for i in range(nb)], axis=-3)
    Tinv = _unit_lower_inverse(D)
    Y = []
    for i in range(nb):
        rhs = X[..., sl(i), :]
        if i:
            rhs = rhs - A[..., sl(i), : i * SUB] @ jnp.concatenate(Y, axis=-2)
        Y.append(Tinv[..., i, :, :] @ rhs)
    return jnp.concatenate(Y, axis=-2)


def _group_step(S, xs):
    """One scan step over a group of chunks. S: [B, H, K, V] float32 state at the group start; xs per chunk
    (leading [Gr]): q (scaled), k, g: [B, H, C, K]; v: [B, H, C, V]; beta: [B, H, C];
    sid (int), cm, em (bool): [B, 1, C]. Returns (S after the group, o [Gr, B, H, C, V])."""
    Q, Kc, Vc, g, beta, sid, cm, em = xs
    Gr, B, H, C, K = Q.shape
    G = _local_cumsum(g, sid[..., :, None] == sid[..., None, :])
    # One flat leading batch dim for the intra-chunk part. (Also a workaround: XLA:CPU in jax 0.10.2 segfaulted at
    # run time on the backward of broadcast-multiply-sum diagonal blocks with rank-7 shapes, leading (4, 1, 2, 4).)
    flat = lambda x: x.reshape((Gr * B * H,) + x.shape[3:])  # noqa: E731
    Aqk, Akk = _intra_scores(flat(Q), flat(Kc), flat(G), flat(jnp.broadcast_to(sid, (Gr, B, H, C))))
    Aqk, Akk = (x.reshape(Gr, B, H, C, C) for x in (Aqk, Akk))
    Gam = jnp.exp(G)
    rhs = jnp.concatenate([(beta[..., None] * Gam) * Kc, beta[..., None] * Vc], axis=-1)
    WU = solve_unit_lower(beta[..., :, None] * Akk, rhs)
    W, U = WU[..., :K], WU[..., K:]

    cm, em = cm[..., None], em[..., None]
    GC = G[..., -1:, :]
    Qt = jnp.where(cm, Q * Gam, 0.0)
    Wm = jnp.where(cm, W, 0.0)
    Kt = jnp.where(em, Kc * jnp.exp(jnp.where(em, GC - G, 0.0)), 0.0)
    decay = jnp.where(cm[..., -1, :], jnp.exp(GC[..., 0, :]), 0.0)  # [Gr, B, H, K]; 0 drops S at a restart

    starts, vnew = [], []
    for j in range(Gr):
        starts.append(S)
        vnew.append(U[j] - Wm[j] @ S)
        S = decay[j][..., :, None] * S + jnp.swapaxes(Kt[j], -1, -2) @ vnew[-1]
    o = Qt @ jnp.stack(starts) + Aqk @ jnp.stack(vnew)
    return S, o

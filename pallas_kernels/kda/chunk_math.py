"""Per-chunk math of the chunked KDA (`chunk.py`), batched over any leading dims: forward and hand-written backward.

Arrays are [..., C, F] with C the chunk length (a multiple of 16) and the leading dims (batch, chunks of a
group, heads) batched through every op. Notation of kda_backward.md: Q = scale * q, G = chunk-local cumulative
log-decay (fp32, non-increasing along the chunk: it is NOT restarted at segment starts, which changes no
same-segment difference and keeps every anchored factor below 1), Gamma = exp(G).

Intra-chunk scores, S_q[r, c] = sum_k Q_rk K_ck e^{G_rk - G_ck} (c <= r) and S_k likewise with K rows (c < r), come
from three anchored terms, each one batched matmul of a row operand (X * row factor) with a column operand
(K * column factor), with no exp that can overflow:
- level A, rows of 16-row block i >= 1 against all columns before it, anchored at the block's first row a:
  (X_r e^{G_r - G_a}) . (K_c e^{G_a - G_c}); both factors <= 1 because G is non-increasing.
- rect, in each 16-row block the rows 8..15 against the columns 0..7, anchored at row 8: the same form.
- diag, the 8 x 8 diagonal blocks, from gates clamped at -CLAMP (g' = max(g, -CLAMP), G' their cumsum in the
  block). Rows 0..3 are anchored at row 0 and pair with columns 0..3; rows 4..7 are anchored at row 4 and pair
  with columns 0..7: (X_r e^{G'_r - G'_a}) . (K_c e^{G'_a - G'_c}), every factor within e^{+-4 CLAMP}. The two
  anchor groups are two batch entries of one matmul, each 4 Q rows and 4 K rows against the block's 8 columns
  (the anchor-0 group's column factors are zero for columns 4..7).
  Anchors are the first row of their rows, so no output depends, even in rounding, on a later token. Clamping
  changes a pair only if a token between them has g < -CLAMP, and then both the true and the computed
  e^{G_r - G_c} are below e^{-CLAMP} = 2e-9: the error is far below float32 rounding of the rest.
The unused parts of each product (upper triangle, other blocks) are finite and removed by select before anything
uses them; the backward masks score gradients before any product with a factor.

WY/UT (section 2): A = Diag(beta) S_k, T = (I + A)^{-1}, W = T (beta Gamma K), U = T (beta V). T is formed
explicitly (16 x 16 diagonal blocks by block doubling, then block forward substitution): the backward needs
T^T products. Segment masks (`same` [..., C, C], `cm`, `em` [..., C, 1]) follow kda_backward.md section 2h.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

SUB = 16      # block rows of level A and of the inverse's diagonal blocks; chunk sizes are multiples of it
DIAG = 8      # diagonal block size of the clamped term
CLAMP = 20.0  # per-token gate clamp inside the diagonal blocks (see module docstring)
_HI = lax.Precision.HIGHEST
_LOW4 = (np.arange(8) < 4)[:, None]   # rows 0..3 of an 8-row diagonal block (the anchor-0 group)


def mm(spec, a, b):
    """einsum at full float32 precision (TPU/GPU would otherwise round the operands to bf16/tf32)."""
    return jnp.einsum(spec, a, b, precision=_HI)


def _block_cumsum(x, n):
    """Cumulative sum over axis -2 within consecutive blocks of n rows. x: [..., C, F]."""
    C, F = x.shape[-2:]
    return jnp.cumsum(x.reshape(x.shape[:-2] + (C // n, n, F)), axis=-2).reshape(x.shape)


def _block_revcumsum(x, n):
    """Reverse cumulative sum (sum over later-or-equal rows) within blocks of n rows."""
    return jnp.flip(_block_cumsum(jnp.flip(x, -2), n), -2)


def _exclusive_cumsum(x, reverse=False):
    """Sums of the strictly earlier (reverse: later) entries along axis -2, never (a + b) - b: every output is a
    sum of exactly the entries it depends on, so changing a later entry cannot move it even by rounding."""
    if reverse:
        return jnp.flip(_exclusive_cumsum(jnp.flip(x, -2)), -2)
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 0), (0, 0)]
    return jnp.pad(jnp.cumsum(x[..., :-1, :], axis=-2), pad)


def _chunk_revcumsum(x):
    """Reverse cumulative sum over the whole chunk (axis -2), in two levels of 8-row blocks."""
    C, F = x.shape[-2:]
    within = _block_revcumsum(x, DIAG).reshape(x.shape[:-2] + (C // DIAG, DIAG, F))
    later = _exclusive_cumsum(within[..., 0, :], reverse=True)              # sums of the later blocks
    return (within + later[..., None, :]).reshape(x.shape)


def gate_cumsums(g):
    """g [..., C, K] log-decays -> (G chunk-local cumsum, Gd 8-row-block-local cumsum of max(g, -CLAMP))."""
    C, K = g.shape[-2:]
    within = _block_cumsum(g, DIAG).reshape(g.shape[:-2] + (C // DIAG, DIAG, K))
    G = (within + _exclusive_cumsum(within[..., -1, :])[..., None, :]).reshape(g.shape)
    return G, _block_cumsum(jnp.maximum(g, -CLAMP), DIAG)


def gate_cumsums_vjp(g, dG, dGd):
    """Cotangent of g given those of (G, Gd) from `gate_cumsums`."""
    return _chunk_revcumsum(dG) + jnp.where(g > -CLAMP, _block_revcumsum(dGd, DIAG), 0.0)


# ----------------------------------------------------------------------------------------------- scores

class Factors(NamedTuple):
    """Row factors P and column factors N of the three score terms (see module docstring)."""
    PA: jnp.ndarray | None  # [..., nb-1, 16, K] level A rows of blocks 1.. (relative to each block's first row)
    NA: jnp.ndarray | None  # [..., nb-1, C-16, K] level A columns per anchor, zero at and after it (None if C=16)
    PR: jnp.ndarray   # [..., nb, 8, K]  rect rows 8..15 of each 16-block
    NR: jnp.ndarray   # [..., nb, 8, K]  rect columns 0..7 of each 16-block
    PD: jnp.ndarray   # [..., C/8, 8, K] diag rows (rows 0..3 relative to row 0, rows 4..7 to row 4)
    ND: jnp.ndarray   # [..., C/8, 2, 8, K] diag columns for the anchor at row 0 (zero for columns 4..7), at row 4


def _expneg(x):
    """exp(min(x, 0)): the exponents here are <= 0 up to rounding."""
    return jnp.exp(jnp.minimum(x, 0.0))


def score_factors(G, Gd) -> Factors:
    *lead, C, K = G.shape
    lead = tuple(lead)
    nb = C // SUB
    G16 = G.reshape(lead + (nb, SUB, K))
    if nb > 1:
        anchor = G16[..., 1:, :1, :]                                            # [..., nb-1, 1, K]
        PA = _expneg(G16[..., 1:, :, :] - anchor)
        ncol = C - SUB
        before = np.arange(ncol)[None, :, None] < SUB * np.arange(1, nb)[:, None, None]  # [nb-1, ncol, 1]
        NA = jnp.where(before, _expneg(anchor - G[..., None, :ncol, :]), 0.0)
    else:
        PA = NA = None   # one 16-row block: no level A
    a8 = G16[..., 8:9, :]
    PR = _expneg(G16[..., 8:, :] - a8)
    NR = _expneg(a8 - G16[..., :8, :])
    Gd8 = Gd.reshape(lead + (C // DIAG, DIAG, K))
    a0, a4 = Gd8[..., :1, :], Gd8[..., 4:5, :]
    PD = jnp.exp(Gd8 - jnp.where(_LOW4, a0, a4))
    ND = jnp.exp(jnp.stack([jnp.where(_LOW4, a0 - Gd8, -jnp.inf), a4 - Gd8], axis=-3))  # anchor 0: exactly 0 for 4..7
    return Factors(PA, NA, PR, NR, PD, ND)


class Operands(NamedTuple):
    """Matmul operands of the three terms. Row operands stack the Q rows and the K rows of each block next to each
    other (R = 2), so every product has one batch and one contracting dim."""
    XA: jnp.ndarray | None  # [..., nb-1, 2 * 16, K]
    KA: jnp.ndarray | None  # [..., nb-1, C-16, K]
    XR: jnp.ndarray         # [..., nb, 2 * 8, K]
    KR: jnp.ndarray         # [..., nb, 8, K]
    XD: jnp.ndarray         # [..., C/8, 2, 2 * 4, K] (group 0: rows 0..3, anchor 0; group 1: rows 4..7, anchor 4)
    KD: jnp.ndarray         # [..., C/8, 2, 8, K]    (the block's 8 columns with each group's column factors)


def _blocks(x, n):
    """[..., C, K] -> [..., C/n, n, K]."""
    return x.reshape(x.shape[:-2] + (x.shape[-2] // n, n, x.shape[-1]))


def _rows2(q_rows, k_rows):
    """Two [..., m, n, K] row sets -> [..., m, 2n, K] (Q rows, then K rows, per block)."""
    x = jnp.stack([q_rows, k_rows], axis=-3)
    return x.reshape(x.shape[:-4] + (x.shape[-4], 2 * x.shape[-2], x.shape[-1]))


def _split2(x):
    """Inverse of `_rows2` on the row axis of [..., m, 2n, F]: -> ([..., m, n, F], [..., m, n, F])."""
    n = x.shape[-2] // 2
    return x[..., :n, :], x[..., n:, :]


def score_operands(Q, Kc, f: Factors) -> Operands:
    """Q, Kc: [..., C, K]."""
    C = Q.shape[-2]
    Q16, K16 = _blocks(Q, SUB), _blocks(Kc, SUB)
    Q8, K8 = _blocks(Q, DIAG), _blocks(Kc, DIAG)
    XA = KA = None
    if f.PA is not None:
        XA = _rows2(Q16[..., 1:, :, :] * f.PA, K16[..., 1:, :, :] * f.PA)
        KA = Kc[..., None, : C - SUB, :] * f.NA
    return Operands(XA, KA,
                    XR=_rows2(Q16[..., 8:, :] * f.PR, K16[..., 8:, :] * f.PR), KR=K16[..., :8, :] * f.NR,
                    XD=_rows2(_groups(Q8 * f.PD), _groups(K8 * f.PD)),
                    KD=K8[..., None, :, :] * f.ND)


def _groups(x):
    """[..., 8, F] diag-block rows -> [..., 2, 4, F]: the anchor-0 rows 0..3 and the anchor-4 rows 4..7."""
    return x.reshape(x.shape[:-2] + (2, DIAG // 2, x.shape[-1]))


def _ungroup(x):
    """Inverse of `_groups`: [..., 2, 4, F] -> [..., 8, F]."""
    return x.reshape(x.shape[:-3] + (DIAG, x.shape[-1]))


def _place_diag16(SD, SR):
    """[..., C/8, 8, 8] diag and [..., nb, 8, 8] rect blocks -> [..., C, C] block-diagonal (16-blocks) matrix."""
    nb = SR.shape[-3]
    lead = SR.shape[:-3]
    SD = SD.reshape(lead + (nb, 2, DIAG, DIAG))
    top = jnp.concatenate([SD[..., 0, :, :], jnp.zeros_like(SR)], axis=-1)
    bottom = jnp.concatenate([SR, SD[..., 1, :, :]], axis=-1)
    D16 = jnp.concatenate([top, bottom], axis=-2)                               # [..., nb, 16, 16]
    eye = np.eye(nb, dtype=bool)[:, None, :, None]
    return jnp.where(eye, D16[..., :, :, None, :], 0.0).reshape(lead + (nb * SUB, nb * SUB))


def _take_diag16(dS):
    """Transpose of `_place_diag16`: [..., C, C] -> (diag [..., C/8, 8, 8], rect [..., nb, 8, 8])."""
    C = dS.shape[-1]
    sl = lambda i, j: dS[..., i * DIAG:(i + 1) * DIAG, j * DIAG:(j + 1) * DIAG]  # noqa: E731
    diag = jnp.stack([sl(i, i) for i in range(C // DIAG)], axis=-3)
    rect = jnp.stack([sl(2 * b + 1, 2 * b) for b in range(C // SUB)], axis=-3)
    return diag, rect


def _place_A(SA, C):
    """[..., nb-1, 16, C-16] level A blocks -> [..., C, C] (zero outside rows 16.. and columns ..C-16)."""
    SA = SA.reshape(SA.shape[:-3] + (C - SUB, C - SUB))
    return jnp.pad(SA, [(0, 0)] * (SA.ndim - 2) + [(SUB, 0), (0, SUB)])


def _take_A(dS, C):
    """Transpose of `_place_A`: [..., C, C] -> [..., nb-1, 16, C-16] (the caller's masks zero what is not level A's,
    except the diagonal 16-blocks, which meet zero column factors)."""
    return dS[..., SUB:, : C - SUB].reshape(dS.shape[:-2] + (C // SUB - 1, SUB, C - SUB))


def scores(op: Operands, C):
    """(S_q, S_k) [..., C, C], exact on the lower triangle (diagonal included); other entries are arbitrary."""
    SDq, SDk = (_ungroup(x) for x in _split2(mm("...grk,...gck->...grc", op.XD, op.KD)))
    SRq, SRk = _split2(mm("...brk,...bck->...brc", op.XR, op.KR))
    Sq, Sk = _place_diag16(SDq, SRq), _place_diag16(SDk, SRk)
    if op.XA is not None:   # level A is exactly zero outside its region (masked column factors)
        # computed transposed (columns x rows): the cheaper orientation for XLA:CPU's matmul layouts
        SAq, SAk = _split2(jnp.swapaxes(mm("...ick,...irk->...icr", op.KA, op.XA), -1, -2))
        Sq, Sk = Sq + _place_A(SAq, C), Sk + _place_A(SAk, C)
    return Sq, Sk


def scores_vjp(dSq, dSk, f: Factors, op: Operands):
    """Cotangents (dQ, dK, dG, dGd), each [..., C, K], of `scores` for cotangents dSq, dSk [..., C, C] that are
    already zero outside the lower-triangular, same-segment entries (the caller's masks)."""
    C = dSq.shape[-1]
    nb = C // SUB
    lead = dSq.shape[:-2]
    K = op.KR.shape[-1]
    flat = lambda x: x.reshape(lead + (C, K))  # noqa: E731
    # diag term (clamped gates): its gate gradients go to Gd
    dSD = _rows2(*(_groups(_take_diag16(d)[0]) for d in (dSq, dSk)))           # [..., C/8, 2, 8, 8]
    gx = mm("...grc,...gck->...grk", dSD, op.KD)
    gk = mm("...grc,...grk->...gck", dSD, op.XD)                              # [..., C/8, 2, 8, K] per anchor
    (gq, gkr), (xq, xk) = (tuple(_ungroup(y) for y in _split2(z)) for z in (gx, op.XD))
    dQ, dK = flat(gq * f.PD), flat(gkr * f.PD + jnp.sum(gk * f.ND, axis=-3))
    dGd = flat(xq * gq + xk * gkr - jnp.sum(op.KD * gk, axis=-3))
    # rect term: rows 8..15 and columns 0..7 of each 16-block
    dSR = _rows2(*(_take_diag16(d)[1] for d in (dSq, dSk)))                     # [..., nb, 16, 8]
    gx = mm("...brc,...bck->...brk", dSR, op.KR)
    gk = mm("...brc,...brk->...bck", dSR, op.XR)
    (gq, gkr), (xq, xk) = _split2(gx), _split2(op.XR)
    z = jnp.zeros(lead + (nb, 8, K), dSq.dtype)
    halves = lambda lo, hi: flat(jnp.concatenate([lo, hi], axis=-2))  # noqa: E731  rows 0..7, 8..15 of blocks
    dQ = dQ + halves(z, gq * f.PR)
    dK = dK + halves(gk * f.NR, gkr * f.PR)
    dG = halves(-op.KR * gk, xq * gq + xk * gkr)
    # level A: rows of blocks 1.., columns before each block
    if op.XA is not None:
        dSA = _rows2(_take_A(dSq, C), _take_A(dSk, C))                         # [..., nb-1, 32, C-16]
        gx = mm("...irc,...ick->...irk", dSA, op.KA)
        gk = mm("...irc,...irk->...ick", dSA, op.XA)                            # [..., nb-1, C-16, K]
        (gq, gkr), (xq, xk) = _split2(gx), _split2(op.XA)
        rows = lambda x: jnp.pad(x.reshape(lead + ((nb - 1) * SUB, K)),  # noqa: E731
                                 [(0, 0)] * len(lead) + [(SUB, 0), (0, 0)])
        # explicit sum over the few anchors: as a reduction XLA:CPU turned it into a slow matmul
        cols = lambda x: jnp.pad(sum(x[..., i, :, :] for i in range(nb - 1)),  # noqa: E731
                                 [(0, 0)] * len(lead) + [(0, SUB), (0, 0)])
        dQ = dQ + rows(gq * f.PA)
        dK = dK + rows(gkr * f.PA) + cols(gk * f.NA)
        dG = dG + rows(xq * gq + xk * gkr) - cols(op.KA * gk)
    return dQ, dK, dG, dGd


# ----------------------------------------------------------------------------------------------- inverse

def _unit_lower_inverse16(D):
    """(I + D)^{-1} for strictly lower D [..., 16, 16] by block doubling: with T_s the inverse of the block-diagonal
    part in blocks of s and X_s the lower-left s x s blocks inside each 2s block, T_2s = T_s - T_s X_s T_s."""
    n = D.shape[-1]
    idx = np.arange(n)
    T = np.eye(n, dtype=np.float32) - jnp.where((idx[:, None] // 2 == idx[None, :] // 2), D, 0.0)
    s = 2
    while s < n:
        lower_left = (idx[:, None] // (2 * s) == idx[None, :] // (2 * s)) & (idx[:, None] // s != idx[None, :] // s)
        T = T - mm("...ij,...jk->...ik", mm("...ij,...jk->...ik", T, jnp.where(lower_left, D, 0.0)), T)
        s *= 2
    return T


def unit_lower_inverse(A):
    """(I + A)^{-1} for strictly lower A [..., C, C], C a multiple of 16: 16 x 16 diagonal blocks by doubling, then
    block forward substitution T[i, :i] = -T_ii A[i, :i] T[:i, :i]."""
    C = A.shape[-1]
    nb = C // SUB
    sl = lambda i: slice(i * SUB, (i + 1) * SUB)  # noqa: E731
    Tii = _unit_lower_inverse16(jnp.stack([A[..., sl(i), sl(i)] for i in range(nb)], axis=-3))
    T = Tii[..., 0, :, :]
    for i in range(1, nb):
        left = -mm("...ij,...jk->...ik", Tii[..., i, :, :], mm("...ij,...jk->...ik", A[..., sl(i), : i * SUB], T))
        T = jnp.concatenate([jnp.pad(T, [(0, 0)] * (T.ndim - 1) + [(0, SUB)]),
                             jnp.concatenate([left, Tii[..., i, :, :]], axis=-1)], axis=-2)
    return T


# ----------------------------------------------------------------------------------------------- chunk forward

class Masks(NamedTuple):
    """Segment masks of a chunk (None = one segment, no padding): same [..., C, C] bool, cm, em [..., C, 1] f32."""
    same: jnp.ndarray | None
    cm: jnp.ndarray | None
    em: jnp.ndarray | None


def causal_masks(C, masks: Masks):
    r = np.arange(C)
    qk, kk = r[:, None] >= r[None, :], r[:, None] > r[None, :]
    if masks.same is None:
        return qk, kk
    return qk & masks.same, kk & masks.same


class Intra(NamedTuple):
    """State-independent chunk quantities (the scan's inputs), [..., C, F]."""
    Aqk: jnp.ndarray    # [..., C, C]
    Akk: jnp.ndarray    # [..., C, C] raw (no beta), strictly lower, same segment
    T: jnp.ndarray      # [..., C, C] (I + beta Akk)^{-1}
    W: jnp.ndarray      # [..., C, K] cm * T (beta Gamma K)
    U: jnp.ndarray      # [..., C, V] T (beta V)
    Qg: jnp.ndarray     # [..., C, K] cm * Q Gamma
    Kg: jnp.ndarray     # [..., C, K] em * K exp(G_C - G)
    decay: jnp.ndarray  # [..., K] cm_C * exp(G_C)


def _rowmask(x, m):
    return x if m is None else x * m


def chunk_intra(Q, Kc, V, g, beta, masks: Masks) -> Intra:
    """Q (scaled), Kc, g: [..., C, K]; V: [..., C, V]; beta: [..., C] (all float32, padding already zeroed)."""
    C, K = Q.shape[-2:]
    G, Gd = gate_cumsums(g)
    Sq, Sk = scores(score_operands(Q, Kc, score_factors(G, Gd)), C)
    mqk, mkk = causal_masks(C, masks)
    Aqk = jnp.where(mqk, Sq, 0.0)
    Akk = jnp.where(mkk, Sk, 0.0)
    T = unit_lower_inverse(beta[..., :, None] * Akk)
    Gam = jnp.exp(G)
    b = beta[..., None]
    W = _rowmask(mm("...rc,...ck->...rk", T, b * Gam * Kc), masks.cm)
    U = mm("...rc,...cv->...rv", T, b * V)
    gl = G[..., -1:, :]
    Qg = _rowmask(Q * Gam, masks.cm)
    Kg = _rowmask(Kc * _expneg(gl - G), masks.em)
    decay = jnp.exp(gl[..., 0, :])
    if masks.cm is not None:
        decay = decay * masks.cm[..., -1, :]
    return Intra(Aqk, Akk, T, W, U, Qg, Kg, decay)


# ----------------------------------------------------------------------------------------------- chunk backward

def chunk_intra_vjp(Q, Kc, V, g, beta, masks: Masks, Aqk, Akk, T, dAqk_raw, dW, dU, dQg, dKg, dgl):
    """Cotangents (dQ, dK, dV, dg, dbeta) of `chunk_intra` given those of Aqk (dAqk_raw, unmasked), W, U, Qg, Kg
    and of G_C through `decay` (dgl [..., K]); W/Qg/Kg cotangents are w.r.t. the masked outputs."""
    C, K = Q.shape[-2:]
    G, Gd = gate_cumsums(g)
    mqk, mkk = causal_masks(C, masks)
    Gam = jnp.exp(G)
    gl = G[..., -1:, :]
    Ef = _expneg(gl - G)
    b = beta[..., None]
    dW, dQg, dKg = _rowmask(dW, masks.cm), _rowmask(dQg, masks.cm), _rowmask(dKg, masks.em)
    Xw, Xu = b * Gam * Kc, b * V
    # W = T Xw, U = T Xu, T = (I + A)^{-1}, A = beta_r Akk. dA = -T^T dT T^T on A's entries, dT = dW Xw^T + dU Xu^T;
    # with T^T dW = dXw, T Xw = W and T Xu = U that is -(dXw W^T + dXu U^T): two [C, K] x [K, C] products instead of
    # dT's two and two [C, C] x [C, C] ones. (dT needs no mask first: T - I is strictly lower and same-segment like
    # A, so T dA T is too, and dT's other entries meet only its zeros.)
    dXw = mm("...cr,...ck->...rk", T, dW)
    dXu = mm("...cr,...cv->...rv", T, dU)
    W, U = mm("...rc,...ck->...rk", T, Xw), mm("...rc,...cv->...rv", T, Xu)   # as in chunk_intra (W unmasked)
    dA = -jnp.where(mkk, mm("...rk,...ck->...rc", dXw, W) + mm("...rv,...cv->...rc", dXu, U), 0.0)
    dbeta = (jnp.sum(dA * Akk, axis=-1) + jnp.sum(dXw * Gam * Kc, axis=-1) + jnp.sum(dXu * V, axis=-1))
    f = score_factors(G, Gd)
    dQ, dK, dG, dGd = scores_vjp(jnp.where(mqk, dAqk_raw, 0.0), beta[..., :, None] * dA, f,
                                 score_operands(Q, Kc, f))
    dQ = dQ + Gam * dQg
    dK = dK + b * Gam * dXw + Ef * dKg
    KgdKg = Kc * Ef * dKg
    dG = dG + Q * Gam * dQg + Xw * dXw - KgdKg
    dgl = dgl + jnp.sum(KgdKg, axis=-2)
    dG = dG.at[..., -1, :].add(dgl)
    return dQ, dK, b * dXu, gate_cumsums_vjp(g, dG, dGd), dbeta

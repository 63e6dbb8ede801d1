"""pallas_kernels.kda.chunk_math per chunk: the anchored scores against the direct sums, and the hand-written
backward (`scores_vjp`, `chunk_intra_vjp`) against autodiff of the forward it inverts.

Tighter than the end-to-end checks of test_kda_ops (no state recurrence in between): one chunk problem per leading
index, float32, error ratios ||ref - x|| / ||ref||. Gates reach the diagonal blocks' clamp (g < -CLAMP) and the
segment masks split chunks, so every score term (level A, rect, the two diagonal anchor groups) and every mask path
is exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kda.chunk_math import (
    CLAMP,
    Masks,
    causal_masks,
    chunk_intra,
    chunk_intra_vjp,
    gate_cumsums,
    gate_cumsums_vjp,
    score_factors,
    score_operands,
    scores,
    scores_vjp,
)
from tests.conftest import error_ratio

LEAD, K, V = 3, 8, 4


def chunk_inputs(seed, C, segmented):
    """Q, Kc, g [LEAD, C, K], V [LEAD, C, V], beta [LEAD, C] and the segment masks (numpy-made: no compiles)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    Q, Kc, Vv = unit(normal(LEAD, C, K)), unit(normal(LEAD, C, K)), normal(LEAD, C, V)
    g = -np.logaddexp(0.0, normal(LEAD, C, K) - 1.0)
    g[:, 3::7, : K // 2] = -1.5 * CLAMP      # strong gates inside diagonal blocks: the clamp is active
    beta = 1.0 / (1.0 + np.exp(-normal(LEAD, C)))
    masks = Masks(None, None, None)
    if segmented:   # segment numbers per chunk row: a cut at a random row of each chunk (and one at row 5 of chunk 0)
        sid = np.zeros((LEAD, C), np.float32)
        for i, cut in enumerate(rng.integers(1, C, LEAD)):
            sid[i, cut:] += 1
        sid[0, 5:] += 1
        masks = Masks(jnp.asarray(sid[:, :, None] == sid[:, None, :]),
                      jnp.asarray((sid == sid[:, :1])[..., None].astype(np.float32)),
                      jnp.asarray((sid == sid[:, -1:])[..., None].astype(np.float32)))
    return tuple(jnp.asarray(x) for x in (Q, Kc, Vv, g, beta)), masks


def direct_scores(Q, Kc, g):
    """S_q[r, c] = sum_k Q_rk K_ck e^{G_rk - G_ck} (c <= r), S_k likewise with K rows (c < r), zero elsewhere."""
    C = Q.shape[-2]
    G = jnp.cumsum(g, axis=-2)
    r = np.arange(C)
    diff = G[..., :, None, :] - G[..., None, :, :]                                  # [..., r, c, K]
    decay = jnp.exp(jnp.where((r[:, None] >= r[None, :])[:, :, None], diff, -jnp.inf))
    Sq = jnp.einsum("...rk,...ck,...rck->...rc", Q, Kc, decay, precision=jax.lax.Precision.HIGHEST)
    Sk = jnp.einsum("...rk,...ck,...rck->...rc", Kc, Kc, decay, precision=jax.lax.Precision.HIGHEST)
    return Sq, jnp.where(r[:, None] > r[None, :], Sk, 0.0)


@jax.jit
def anchored_scores_and_vjp(Q, Kc, g, dSq, dSk):
    """chunk_math's (S_q, S_k) on the lower triangles and (dQ, dK, dg) for cotangents already lower-triangular."""
    C = Q.shape[-2]
    G, Gd = gate_cumsums(g)
    f = score_factors(G, Gd)
    op = score_operands(Q, Kc, f)
    mqk, mkk = causal_masks(C, Masks(None, None, None))
    Sq, Sk = scores(op, C)
    dQ, dK, dG, dGd = scores_vjp(dSq, dSk, f, op)
    return jnp.where(mqk, Sq, 0.0), jnp.where(mkk, Sk, 0.0), (dQ, dK, gate_cumsums_vjp(g, dG, dGd))


@pytest.mark.parametrize("C", [16, 64])
def test_scores_and_their_vjp_match_the_direct_sums(C):
    (Q, Kc, _, g, _), _ = chunk_inputs(0, C, segmented=False)
    rng = np.random.default_rng(1)
    r = np.arange(C)
    dSq = jnp.asarray(np.where(r[:, None] >= r[None, :], rng.standard_normal((LEAD, C, C)), 0.0), jnp.float32)
    dSk = jnp.asarray(np.where(r[:, None] > r[None, :], rng.standard_normal((LEAD, C, C)), 0.0), jnp.float32)
    (Sq, Sk), vjp = jax.vjp(direct_scores, Q, Kc, g)
    want = vjp((dSq, dSk))
    got_q, got_k, got = anchored_scores_and_vjp(Q, Kc, g, dSq, dSk)
    assert error_ratio(Sq, got_q) < 2e-5 and error_ratio(Sk, got_k) < 2e-5
    for name, a, b in zip(("dQ", "dK", "dg"), want, got):
        assert error_ratio(a, b) < 2e-5, name


@jax.jit
def intra_vjp_both_ways(Q, Kc, Vv, g, beta, masks, cts):
    """(autodiff of chunk_intra, chunk_intra_vjp) for cotangents cts of (Aqk, W, U, Qg, Kg, decay)."""
    def forward(Q, Kc, Vv, g, beta):
        it = chunk_intra(Q, Kc, Vv, g, beta, masks)
        return it.Aqk, it.W, it.U, it.Qg, it.Kg, it.decay

    _, vjp = jax.vjp(forward, Q, Kc, Vv, g, beta)
    it = chunk_intra(Q, Kc, Vv, g, beta, masks)
    dAqk, dW, dU, dQg, dKg, ddecay = cts
    return vjp(cts), chunk_intra_vjp(Q, Kc, Vv, g, beta, masks, it.Aqk, it.Akk, it.T, dAqk, dW, dU, dQg, dKg,
                                     ddecay * it.decay)


@pytest.mark.parametrize("C, segmented", [(16, False), (64, False), (64, True)])
def test_chunk_backward_matches_autodiff_of_the_forward(C, segmented):
    (Q, Kc, Vv, g, beta), masks = chunk_inputs(2, C, segmented)
    rng = np.random.default_rng(3)
    cts = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
                for s in ((LEAD, C, C), (LEAD, C, K), (LEAD, C, V), (LEAD, C, K), (LEAD, C, K), (LEAD, K)))
    want, got = intra_vjp_both_ways(Q, Kc, Vv, g, beta, masks, cts)
    for name, a, b in zip(("dQ", "dK", "dV", "dg", "dbeta"), want, got):
        assert error_ratio(a, b) < 1e-5, f"{name}: error ratio {error_ratio(a, b):.3g}"

"""Pallas backward kernel of chunked KDA (kda_backward.md §2, stages a-h, with the segment masks of §2h).

One fused kernel walks the chunks last to first. Per chunk it recomputes the intra-chunk quantities (G, Aqk, Akk,
T, W, U) from the inputs and from the chunk-start state h saved by the forward, so Vnew = U - cm W h needs no
sequential recompute; then it runs the output-term gradients, the reverse state step dS (kept in a VMEM scratch
on TPU, a loop carry on GPU), the WY/UT and inverse gradients, the inter-chunk and the anchored intra-chunk q/k/g
gradients and the segment-restarting reverse cumsum that turns dG into dg. Layout and drivers as in
`pallas_fwd`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kda.pallas_fwd import (
    BC,
    F32,
    ChunkRefs,
    block_selector,
    causal_masks,
    chunk_intra,
    col,
    col_to_row,
    compiler_params,
    dot_nn,
    dot_nt,
    dot_tn,
    expneg,
    grid_specs,
    iota,
    load_chunk,
    load_rows,
    loop_block_v,
    loop_specs,
    row,
)
from pallas_kernels.vma import varying_out


def intra_grads(r: ChunkRefs, off, ch, dAq, dAk, C, scale):
    """q/k/g gradients through Aqk and raw Akk, given dAqk and dAkk_raw = beta * dAkk (both masked).

    Row-side terms (sum over earlier columns) are anchored at the first row of each row sub-block, column-side
    terms (sum over later rows) at the last row of each column sub-block, so both factors stay <= 1; the
    diagonal 16x16 blocks are elementwise. Returns dQ (w.r.t. scaled q), dK, dG, each [C, K].
    """
    K = ch.k.shape[1]
    dq = jnp.zeros((C, K), F32)
    dk = jnp.zeros((C, K), F32)
    dg = jnp.zeros((C, K), F32)
    cols = iota((BC, C), 1)
    rows_c = iota((C, BC), 0)
    rows_k = iota((BC, K), 0)
    for i in range(C // BC):
        E = block_selector(i, C)
        Gi = dot_nn(E, ch.G)
        Qi = load_rows(r.q, off, i * BC, BC) * scale
        Ki = load_rows(r.k, off, i * BC, BC)
        dAq_i = dot_nn(E, dAq)
        dAk_i = dot_nn(E, dAk)
        # row side, columns of earlier sub-blocks
        first = row(Gi, 0)
        down = expneg(Gi - first)
        Kc = ch.k * expneg(first - ch.G)
        before = cols < i * BC
        Rq = dot_nn(jnp.where(before, dAq_i, 0.0), Kc) * down
        Rk = dot_nn(jnp.where(before, dAk_i, 0.0), Kc) * down
        # column side, rows of later sub-blocks
        last = row(Gi, BC - 1)
        up = expneg(ch.G - last)
        after = rows_c >= (i + 1) * BC
        right = expneg(last - Gi)
        Cq = dot_tn(jnp.where(after, dot_nt(dAq, E), 0.0), ch.q * up) * right
        Ck = dot_tn(jnp.where(after, dot_nt(dAk, E), 0.0), ch.k * up) * right

        def diag(j, carry, Qi=Qi, Ki=Ki, Gi=Gi, dAq_i=dAq_i, dAk_i=dAk_i, i=i):
            Rq, Rk, Cq, Ck = carry
            decay = expneg(Gi - row(Gi, j))          # e^{G_r - G_c}, c = row j of the sub-block
            aq = col(dAq_i, i * BC + j)
            ak = col(dAk_i, i * BC + j)
            kd = row(Ki, j) * decay
            at_j = rows_k == j
            Cq = Cq + jnp.where(at_j, jnp.sum(aq * Qi * decay, axis=0, keepdims=True), 0.0)
            Ck = Ck + jnp.where(at_j, jnp.sum(ak * Ki * decay, axis=0, keepdims=True), 0.0)
            return Rq + aq * kd, Rk + ak * kd, Cq, Ck

        Rq, Rk, Cq, Ck = lax.fori_loop(0, BC, diag, (Rq, Rk, Cq, Ck))
        dq = dq + dot_tn(E, Rq)
        dk = dk + dot_tn(E, Rk + Cq + Ck)
        dg = dg + dot_tn(E, Qi * Rq + Ki * (Rk - Cq - Ck))
    return dq, dk, dg


def chunk_backward(r: ChunkRefs, off, S, dSp, do, C, scale):
    """One chunk, given its start state S, dL/dS+ and dO [C, V].

    Returns (dq, dk, dv, dg, dbeta [C, 1], dS) in float32; dq is w.r.t. the unscaled q.
    """
    ch = load_chunk(r, off, C, scale)
    it = chunk_intra(r, off, ch, C, scale)
    cm = ch.cm
    Qg = ch.q * it.Gam
    Xu = ch.b * ch.v
    lo = ch.lo   # bfloat16 operands for the state / value-sized products of bfloat16 inputs (f32 accumulation)
    vnew = it.U - cm * dot_nn(it.W, S, lo)
    mqk, mkk = causal_masks(ch, C)
    # (b) output term, (c) reverse state step, (d) Vnew = U - cm W S
    dAqk = jnp.where(mqk, dot_nt(do, vnew, lo), 0.0)
    dvnew = dot_tn(it.Aqk, do, lo) + dot_nn(it.Kt, dSp, lo)
    dS = ch.cm_last * (it.gam_col * dSp) + dot_tn(cm * Qg, do, lo) - dot_tn(cm * it.W, dvnew, lo)
    dW = -cm * dot_nt(dvnew, S, lo)
    # (e) W = T Xw, U = T Xu, T = (I + Akk)^-1
    dT = jnp.where(mkk, dot_nt(dW, it.Xw) + dot_nt(dvnew, Xu, lo), 0.0)
    dXw = dot_tn(it.T, dW)
    dXu = dot_tn(it.T, dvnew, lo)
    dAkk = -jnp.where(mkk, dot_nt(dot_tn(it.T, dT), it.T), 0.0)
    # (f) inter-chunk terms
    dQt = cm * dot_nt(do, S, lo)
    dKs = ch.em * dot_nt(vnew, dSp, lo) * it.Ef
    gkx = it.Gam * ch.k * dXw
    dglast = (jnp.sum(ch.k * dKs, axis=0, keepdims=True)
              + ch.cm_last * jnp.exp(ch.glast) * col_to_row(jnp.sum(S * dSp, axis=1, keepdims=True)))
    iq, ik, ig = intra_grads(r, off, ch, dAqk, ch.b * dAkk, C, scale)
    dq = dQt * it.Gam + iq
    dk = ch.b * it.Gam * dXw + dKs + ik
    dG = ch.b * gkx + dQt * Qg - ch.k * dKs + ig + jnp.where(iota(dKs.shape, 0) == C - 1, dglast, 0.0)
    db = (jnp.sum(gkx, axis=1, keepdims=True) + jnp.sum(ch.v * dXu, axis=1, keepdims=True)
          + jnp.sum(dAkk * it.AkkR, axis=1, keepdims=True))
    # (g) dg_t = sum of dG_j over later rows j of the same segment
    rev = jnp.where((iota((C, C), 1) >= iota((C, C), 0)) & ch.same, 1.0, 0.0)
    return dq * scale, dk, ch.b * dXu, dot_nn(rev, dG), db, dS


def _store(refs, vals, off, C):
    for ref, val in zip(refs, vals):
        ref[pl.ds(off, C), :] = val.astype(ref.dtype)


def _bwd_grid_kernel(q, k, v, g, b, sid, cm, em, h, do, dht, dq, dk, dg, db, dv, dh0, ds_scr, *, C, scale):
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        ds_scr[...] = dht[...]

    *grads, dS = chunk_backward(ChunkRefs(q, k, v, g, b, sid, cm, em), 0, h[...].astype(F32), ds_scr[...],
                                do[...].astype(F32), C, scale)
    _store((dq, dk, dv, dg, db), grads, 0, C)
    ds_scr[...] = dS

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        dh0[...] = dS


def _bwd_loop_kernel(q, k, v, g, b, sid, cm, em, h, do, dht, dq, dk, dg, db, dv, dh0, *, C, NT, scale):
    refs = ChunkRefs(q, k, v, g, b, sid, cm, em)

    def body(i, dSp):
        c = NT - 1 - i
        off = pl.multiple_of(c * C, C)
        *grads, dS = chunk_backward(refs, off, h[c].astype(F32), dSp, do[pl.ds(off, C), :].astype(F32), C,
                                    scale)
        _store((dq, dk, dv, dg, db), grads, off, C)
        return dS

    dh0[...] = lax.fori_loop(0, NT, body, dht[...].astype(F32))


def kda_bwd_call(q, k, v, g, b, sid, cm, em, h, do, dht, *, scale, chunk_size, backend, block_v=None):
    """Gradients of the forward kernel on prepared inputs (layout of `pallas_fwd`).

    h: chunk-start states [B, H, NT, K, V] from the forward; do: [B, H, T, V]; dht: [B, H, K, V] f32.
    block_v: value columns per program of the loop driver (see `pallas_fwd.loop_block_v`); the gradients of q, k,
    g and beta are linear in the value-blocked cotangents, so each program writes its part and they are summed.
    Returns (dq, dk, dv, dg, dbeta, dh0), each in its input's dtype (dh0 float32).
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    NT = T // C
    inputs = (q, k, v, g, b, sid, cm, em, h, do, dht)
    like = lambda x: varying_out(x.shape, x.dtype, *inputs)  # noqa: E731
    if backend in ("triton", "interpret_loop"):
        BV = loop_block_v(V, block_v)
        NV = V // BV
        grid = (B, H, NV)
        seq, vseq, tok, state, per_chunk = loop_specs(T, NT, K, BV)
        kernel = functools.partial(_bwd_loop_kernel, C=C, NT=NT, scale=scale)
        scratch = []
        part = lambda d: pl.BlockSpec((None, None, None, T, d), lambda b_, h_, j: (j, b_, h_, 0, 0))  # noqa: E731
        k_side = [(part(K), q), (part(K), k), (part(K), g), (part(1), b)]
        k_shapes = [varying_out((NV,) + x.shape, F32, *inputs) for _, x in k_side]
    else:
        NV = 1
        grid = (B, H, NT)
        seq, tok, state, per_chunk = grid_specs(NT, C, K, V, reverse=True)
        vseq = seq(V)
        kernel = functools.partial(_bwd_grid_kernel, C=C, scale=scale)
        scratch = [pltpu.VMEM((K, V), F32)]
        k_side = [(seq(K), q), (seq(K), k), (seq(K), g), (seq(1), b)]
        k_shapes = [like(x) for _, x in k_side]
    dq, dk, dg, db, dv, dh0 = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[seq(K), seq(K), vseq, seq(K), seq(1), tok, tok, tok, per_chunk, vseq, state],
        out_specs=[spec for spec, _ in k_side] + [vseq, state],
        out_shape=k_shapes + [like(v), varying_out((B, H, K, V), F32, *inputs)],
        scratch_shapes=scratch,
        compiler_params=compiler_params(backend, ("parallel", "parallel", "arbitrary")),
        interpret=backend.startswith("interpret"),
        name="kda_bwd",
    )(*inputs)
    if dq.ndim == 5:   # loop driver: sum the per-value-block parts
        dq, dk, dg, db = (d.sum(axis=0).astype(x.dtype) for d, (_, x) in zip((dq, dk, dg, db), k_side))
    return dq, dk, dv, dg, db, dh0

"""Chunked KDA in pure JAX/XLA (the WY/UT form of kimi_linear.md section 2) with a hand-written backward.

Structure (both directions): one `lax.scan` over groups of `Gc` consecutive chunks. A step slices its group out
of the caller's [B, T, H, F] arrays (no whole-sequence transposes or float32 copies), computes every
state-independent quantity of the group's B * Gc * H chunks at once as batched matmuls (`chunk_math`: gate
cumsums, anchored intra-chunk scores, the UT inverse, W and U), then runs the sequential state recurrence over
the group's chunks, two matmuls per chunk (Vnew = U - W S; S+ = decay S + Kg^T Vnew), and the outputs of the
whole group as two more batched matmuls (O = Qg S + Aqk Vnew). Groups are sized so a step's temporaries stay in
cache (`GROUP_ELEMS`): whole-sequence temporaries were several times slower on CPU at long T; a short sequence
whose arrays are small anyway (`WHOLE_ELEMS`, e.g. a training batch of 256-token rows) runs as one group.

The backward (`jax.custom_vjp`) keeps Aqk, Akk, T, Vnew and the chunk-start states from the forward (W = T Xw and
U = T Xu are recomputed: one batched matmul is cheaper than writing and reading it back; when forward and backward
are compiled together, as in a training step, XLA shares such recomputations with the forward's values), walks the
groups last to first with the reverse state recurrence (two matmuls per chunk: dVnew = Aqk^T dO + Kg dS+ and
dS = decay dS+ + Qg^T dO - W^T dVnew) and does everything else batched per group (kda_backward.md section 2). Memory
kept for the backward, beyond the inputs: 3 C + V + K V / C floats per token and head (f32), e.g. 1.3 KiB at C = 64,
K = V = 128.

Segments (see `kda_reference`): padding tokens (id 0) get zero q, k, v, g, beta, which makes them inert; `cm`
masks the rows that continue the state carried into their chunk, `em` the rows of the chunk's last segment, and
`same` the same-segment pairs (kda_backward.md section 2h).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.kda.checks import check_sequence_inputs
from pallas_kernels.kda.chunk_math import SUB, Masks, chunk_intra, chunk_intra_vjp, gate_cumsums, mm
from pallas_kernels.kda.pallas import chunk_masks, segment_numbers
from pallas_kernels.vma import vary_like

# Elements of one [Gc * B * H, C, max(K, V)] array of a scan step: chunks per group are the largest power of two
# within this. Measured on 2 CPU cores (B=1, H=4, K=V=128): 1, 2 or 4 chunks per step equal within noise, 8 about
# 20% slower, all chunks at once about 2x slower.
GROUP_ELEMS = 1 << 16
# A sequence whose chunks all fit in one step within this many elements per array runs as one group: fewer, larger
# ops and no loop. Measured in the default training step (B=32, T=256, H=4, K=V=32, C=64: 4 chunks of 262,144
# elements), one group instead of four: wall 0.92x, CPU 0.95x (bench/train_ab.py, docs/results.md).
WHOLE_ELEMS = 1 << 20


def kda_chunk(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
              chunk_size=64):
    """Chunked KDA; same shapes, semantics and return as `kda_reference`.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log-decay (<= 0); beta: [B, T, H];
    initial_state: [B, H, K, V] or None (zeros); segment_ids: int [B, T] or None (0 = padding).
    chunk_size: a positive multiple of 16; T need not be a multiple of it (padded internally with inert rows).
    Returns (o [B, T, H, V] in v.dtype, final_state [B, H, K, V] float32 or None); differentiable in q, k, v,
    g, beta and initial_state.
    """
    B, T, H, K, V = check_sequence_inputs(q, k, v, g, beta, initial_state, segment_ids, op="kda_chunk")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0 \
            or chunk_size % SUB:
        raise ValueError(f"kda_chunk: chunk_size must be a positive multiple of {SUB}, got {chunk_size!r}")
    scale = float(K ** -0.5 if scale is None else scale)
    S0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    S0 = vary_like(S0, q, k, v, g, beta)   # inside shard_map the scan's state carry varies like the inputs
    if T == 0:
        return jnp.zeros((B, 0, H, V), v.dtype), (S0 if output_final_state else None)
    C = int(chunk_size)
    n_chunks = -(-T // C)
    Gc = group_chunks(n_chunks, B * H * C * max(K, V))
    Tp = -(-n_chunks // Gc) * Gc * C
    xs, seg = _prepare(q, k, v, g, beta, segment_ids, Tp=Tp, C=C)
    o, S = _run(*xs, seg, S0, cfg=Config(scale, C, Gc))
    o = o if Tp == T else o[:, :T]
    return o, (S if output_final_state else None)


def group_chunks(n_chunks, elems_per_chunk):
    """Chunks per scan step: all n_chunks if they fit within WHOLE_ELEMS, else a power of two, at most n_chunks
    rounded up, within GROUP_ELEMS (at least 1)."""
    if n_chunks * elems_per_chunk <= WHOLE_ELEMS:
        return n_chunks
    gc = 1
    while gc < n_chunks and 2 * gc * elems_per_chunk <= GROUP_ELEMS:
        gc *= 2
    return gc


class Config(NamedTuple):
    scale: float
    C: int    # chunk size
    Gc: int   # chunks per scan step


class Segments(NamedTuple):
    """Per-token segment data, float32 [B, Tp]: real (1 = not padding), sid (segment number), cm, em."""
    real: jnp.ndarray
    sid: jnp.ndarray
    cm: jnp.ndarray
    em: jnp.ndarray


@partial(jax.jit, static_argnames=("Tp", "C"))
def _prepare(q, k, v, g, beta, segment_ids, *, Tp, C):
    """Pad time to Tp with zeros (inert tokens) and turn segment ids into per-token masks (None without ids)."""
    B, T = q.shape[:2]
    pad = lambda x: x if Tp == T else jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    xs = tuple(pad(x) for x in (q, k, v, g, beta))
    if segment_ids is None:
        return xs, None
    sid, real = segment_numbers(segment_ids, B, T)
    sid = jnp.pad(sid, ((0, 0), (0, Tp - T)), mode="edge")
    real = jnp.pad(real, ((0, 0), (0, Tp - T)))
    sid, cm, em = (x[..., 0] for x in chunk_masks(sid, C))
    return xs, Segments(real.astype(jnp.float32), sid, cm, em)


# ----------------------------------------------------------------------------------------------- group steps

class Group(NamedTuple):
    """One group's inputs in the working layout [Gc * B * H, C, F] float32 (chunk-major, q scaled, padding zeroed).
    One flat batch dim: XLA:CPU (jax 0.10.2, YNNPACK) crashed at run time on batched matmuls whose batch dims
    included a size-1 dim (Gc = 1)."""
    Q: jnp.ndarray
    K: jnp.ndarray
    V: jnp.ndarray
    g: jnp.ndarray
    beta: jnp.ndarray   # [L, C]
    masks: Masks
    real: jnp.ndarray | None  # [L, C, 1]


def _group_slice(x, i, cfg):
    """Rows of group i of a [B, Tp, ...] array, as [B, Gc, C, ...]."""
    n = cfg.C * cfg.Gc
    x = lax.dynamic_slice_in_dim(x, i * n, n, axis=1)
    return x.reshape((x.shape[0], cfg.Gc, cfg.C) + x.shape[2:])


def _to_work(x):
    """[B, Gc, C, H, F] -> [Gc * B * H, C, F] float32."""
    B, Gc, C, H, F = x.shape
    return jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(Gc * B * H, C, F).astype(jnp.float32)


def _to_seq(x, B, H, dtype):
    """[Gc * B * H, C, F] -> [B, Gc * C, H, F] in dtype."""
    L, C, F = x.shape
    x = x.reshape(L // (B * H), B, H, C, F)
    return jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(B, -1, H, F).astype(dtype)


def _per_head(x, H):
    """[B, Gc, C] segment data -> [Gc * B * H, C, 1]."""
    B, Gc, C = x.shape
    return jnp.broadcast_to(jnp.swapaxes(x, 0, 1)[:, :, None, :], (Gc, B, H, C)).reshape(Gc * B * H, C, 1)


def _load(i, q, k, v, g, beta, seg, cfg) -> Group:
    H = q.shape[2]
    Q, K, V, gg = (_to_work(_group_slice(x, i, cfg)) for x in (q, k, v, g))
    bt = _to_work(_group_slice(beta, i, cfg)[..., None])[..., 0]                 # [L, C]
    Q = Q * cfg.scale
    if seg is None:
        return Group(Q, K, V, gg, bt, Masks(None, None, None), None)
    real, sid, cm, em = (_per_head(_group_slice(x, i, cfg), H) for x in seg)   # [L, C, 1]
    Q, K, V, gg = (x * real for x in (Q, K, V, gg))
    bt = bt * real[..., 0]
    same = sid == jnp.swapaxes(sid, -1, -2)
    return Group(Q, K, V, gg, bt, Masks(same, cm, em), real)


def _forward(q, k, v, g, beta, seg, S0, cfg, save):
    """Returns (o [B, Tp, H, V] in v.dtype, final state, residuals stacked per group or None)."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    NG = Tp // (cfg.C * cfg.Gc)
    chunks = lambda x: x.reshape((cfg.Gc, B * H) + x.shape[1:])  # noqa: E731  [L, ...] -> [Gc, B*H, ...]

    def step(S, i):
        x = _load(i, q, k, v, g, beta, seg, cfg)
        it = chunk_intra(x.Q, x.K, x.V, x.g, x.beta, x.masks)
        W, U, Kg, decay = (chunks(a) for a in (it.W, it.U, it.Kg, it.decay))
        starts, vnews = [], []
        for j in range(cfg.Gc):
            starts.append(S)
            vnew = U[j] - mm("lck,lkv->lcv", W[j], S)
            vnews.append(vnew)
            S = decay[j][..., None] * S + mm("lck,lcv->lkv", Kg[j], vnew)
        starts, vnews = jnp.concatenate(starts), jnp.concatenate(vnews)          # [L, K, V], [L, C, V]
        o = mm("lck,lkv->lcv", it.Qg, starts) + mm("lrc,lcv->lrv", it.Aqk, vnews)
        res = (it.Aqk, it.Akk, it.T, vnews, starts) if save else None
        return S, (_to_seq(o, B, H, v.dtype), res)

    S, (o, res) = lax.scan(step, S0.reshape(B * H, K, V), jnp.arange(NG))
    return jnp.moveaxis(o, 0, 1).reshape(B, Tp, H, V), S.reshape(B, H, K, V), res


def _backward(q, k, v, g, beta, seg, res, do, dS, cfg):
    """Cotangents of (q, k, v, g, beta) in their dtypes and of the initial state, walking the groups backwards."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    NG = Tp // (cfg.C * cfg.Gc)
    chunks = lambda x: x.reshape((cfg.Gc, B * H) + x.shape[1:])  # noqa: E731

    def step(dSp, xs):
        i, (Aqk, Akk, T, vnews, starts) = xs
        x = _load(i, q, k, v, g, beta, seg, cfg)
        dO = _to_work(_group_slice(do, i, cfg))
        if x.real is not None:
            dO = dO * x.real
        G, _ = gate_cumsums(x.g)
        gl = G[..., -1:, :]
        Qg = x.Q * jnp.exp(G)
        Kg = x.K * jnp.exp(jnp.minimum(gl - G, 0.0))
        decay = jnp.exp(gl[..., 0, :])
        W = mm("lrc,lck->lrk", T, x.beta[..., None] * jnp.exp(G) * x.K)      # recomputed: cheaper than kept
        if x.masks.cm is not None:
            Qg, Kg, W = Qg * x.masks.cm, Kg * x.masks.em, W * x.masks.cm
            decay = decay * x.masks.cm[..., -1, :]
        dAqk = mm("lcv,lrv->lcr", dO, vnews)
        dvi = mm("lrc,lrv->lcv", Aqk, dO)
        QdO = chunks(mm("lck,lcv->lkv", Qg, dO))
        dvi, Kgc, Wc, decayc = chunks(dvi), chunks(Kg), chunks(W), chunks(decay)
        dvnews, dsps = [None] * cfg.Gc, [None] * cfg.Gc
        for j in reversed(range(cfg.Gc)):
            dsps[j] = dSp
            dvnews[j] = dvi[j] + mm("lck,lkv->lcv", Kgc[j], dSp)
            dSp = decayc[j][..., None] * dSp + QdO[j] - mm("lck,lcv->lkv", Wc[j], dvnews[j])
        dvnew, dsp = jnp.concatenate(dvnews), jnp.concatenate(dsps)
        dQg = mm("lcv,lkv->lck", dO, starts)
        dW = -mm("lcv,lkv->lck", dvnew, starts)
        dKg = mm("lcv,lkv->lck", vnews, dsp)
        dgl = decay * jnp.sum(starts * dsp, axis=-1)
        dQ, dK, dV, dgg, dbeta = chunk_intra_vjp(x.Q, x.K, x.V, x.g, x.beta, x.masks, Aqk, Akk, T, dAqk, dW,
                                                 dvnew, dQg, dKg, dgl)
        dQ = dQ * cfg.scale
        if x.real is not None:
            dQ, dK, dV, dgg = (d * x.real for d in (dQ, dK, dV, dgg))
            dbeta = dbeta * x.real[..., 0]
        grads = tuple(_to_seq(d, B, H, a.dtype) for d, a in ((dQ, q), (dK, k), (dV, v), (dgg, g)))
        grads += (_to_seq(dbeta[..., None], B, H, beta.dtype)[..., 0],)
        return dSp, grads

    dS0, grads = lax.scan(step, dS.reshape(B * H, K, V), (jnp.arange(NG), res), reverse=True)
    grads = tuple(jnp.moveaxis(x, 0, 1).reshape((B, Tp) + x.shape[3:]) for x in grads)
    return grads, dS0.reshape(B, H, K, V)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _core(q, k, v, g, beta, seg, S0, cfg):
    o, S, _ = _forward(q, k, v, g, beta, seg, S0, cfg, save=False)
    return o, S


def _core_fwd(q, k, v, g, beta, seg, S0, cfg):
    o, S, res = _forward(q, k, v, g, beta, seg, S0, cfg, save=True)
    return (o, S), (q, k, v, g, beta, seg, res)


def _core_bwd(cfg, saved, cts):
    q, k, v, g, beta, seg, res = saved
    do, dS = cts
    dS = vary_like(dS.astype(jnp.float32), q, k, v, g, beta)   # a zero cotangent may come without the axes
    (dq, dk, dv, dg, dbeta), dS0 = _backward(q, k, v, g, beta, seg, res, do, dS, cfg)
    return dq, dk, dv, dg, dbeta, jax.tree.map(jnp.zeros_like, seg), dS0


_core.defvjp(_core_fwd, _core_bwd)


@partial(jax.jit, static_argnames=("cfg",))
def _run(q, k, v, g, beta, seg, S0, *, cfg):
    return _core(q, k, v, g, beta, seg, S0, cfg)

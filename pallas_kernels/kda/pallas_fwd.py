"""Pallas forward kernel of chunked KDA, and the per-chunk math it shares with the backward kernel.

Layout inside the kernels (prepared in XLA by `pallas_kernels.kda.pallas`): head-major, time padded to a multiple
of the chunk C, K and V padded to powers of two >= 16:
    q, k, g [B, H, T, K]; v [B, H, T, V]; beta [B, H, T, 1];
    sid, cm, em [B, T, 1] float32 per-token segment data (see `pallas.py`): sid = segment number (0 for the
    segment that starts from initial_state), cm = 1 where the row continues the segment carried into its chunk,
    em = 1 where the row belongs to its chunk's last segment. Padding tokens are already zeroed (inert).

Per chunk (kda_backward.md notation, Q = scale * q):
    G = chunk-local cumsum of g restarting at segment starts (a masked triangular matmul, f32)
    Aqk[r,c] = sum_k Q_r K_c exp(G_r - G_c) (c <= r, same segment); Akk likewise (c < r) times beta_r
    T = (I + Akk)^-1 (forward substitution); W = T (beta Gamma K); U = T (beta V)
    Vnew = U - cm W S;  O = cm (Q Gamma) S + Aqk Vnew;  S+ = cm_C Diag(gamma) S + (em K exp(G_C - G))^T Vnew.
Aqk/Akk use the anchored secondary chunking: 16-row sub-blocks; off-diagonal blocks are products of two factors
<= 1 around an anchor row; diagonal blocks elementwise. Every exponent is clamped to <= 0 before exp and the
cross-segment / acausal entries are removed by select, so unbounded gates give no inf or NaN.

Portability: the kernels use only 2-D values, `dot_general` with f32 accumulation, elementwise ops, reductions,
iota masks, `fori_loop` and ref loads/stores (no value slicing, concatenation, reshapes or transposes, which the
Triton lowering lacks). Rows of a computed [C, X] value are taken and put back with exact 0/1 matmuls.
Two drivers run the same chunk math:
- "grid" (TPU, and interpret mode on CPU): grid (B, H, NT), chunk axis "arbitrary", state in a VMEM scratch.
- "loop" (GPU Triton, which has no scratch memory and runs grid programs concurrently): grid (B, H, V / BV), the
  chunk recurrence is a `fori_loop` inside the kernel with a [K, BV] block of the state as its carry (the value
  columns of the recurrence are independent; `TRITON_BLOCK_V`).
For bfloat16 inputs the state and value-sized matmuls take bfloat16 operands with float32 accumulation (fla's
choice, full tensor-core rate); gate cumsums, scores, the inverse and row selections stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.vma import varying_out

F32 = jnp.float32
BC = 16  # rows of a secondary sub-block (anchored chunking)
_HI = lax.Precision.HIGHEST

# "tpu": Mosaic, grid driver; "triton": GPU, loop driver; "interpret" / "interpret_loop": the same two drivers
# run by the Pallas interpreter (CPU).
BACKENDS = ("tpu", "triton", "interpret", "interpret_loop")


# ----------------------------------------------------------------------------------------------- small helpers

def _dot(a, b, contract=((1,), (0,)), lo=None):
    """Matmul with float32 accumulation; `contract` names the contracted dims of a and b (NN by default).

    lo=None: float32 operands at full precision. lo=bfloat16 (the state and value-sized products when the inputs
    are bfloat16, fla's choice): operands rounded to bfloat16, which the tensor cores take at full rate.
    """
    if lo is None:
        return lax.dot_general(a, b, (contract, ((), ())), precision=(_HI, _HI), preferred_element_type=F32)
    return lax.dot_general(a.astype(lo), b.astype(lo), (contract, ((), ())), preferred_element_type=F32)


def dot_nn(a, b, lo=None):
    return _dot(a, b, lo=lo)


def dot_nt(a, b, lo=None):
    """a @ b.T"""
    return _dot(a, b, ((1,), (1,)), lo)


def dot_tn(a, b, lo=None):
    """a.T @ b"""
    return _dot(a, b, ((0,), (0,)), lo)


def iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def row(x, i):
    """Row i of a 2-D value as [1, N] (a masked reduction: values cannot be sliced portably)."""
    return jnp.sum(jnp.where(iota(x.shape, 0) == i, x, 0.0), axis=0, keepdims=True)


def col(x, j):
    """Column j of a 2-D value as [M, 1]."""
    return jnp.sum(jnp.where(iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


def row_to_col(r):
    """[1, N] -> [N, 1] without a transpose."""
    n = r.shape[1]
    full = jnp.broadcast_to(r, (n, n))
    return jnp.sum(jnp.where(iota((n, n), 0) == iota((n, n), 1), full, 0.0), axis=1, keepdims=True)


def col_to_row(c):
    """[N, 1] -> [1, N] without a transpose."""
    n = c.shape[0]
    full = jnp.broadcast_to(c, (n, n))
    return jnp.sum(jnp.where(iota((n, n), 0) == iota((n, n), 1), full, 0.0), axis=0, keepdims=True)


def block_selector(i, C):
    """E_i [BC, C], E_i[a, r] = [r == i*BC + a]: E_i @ X takes rows of sub-block i, E_i^T @ Y puts them back."""
    return jnp.where(iota((BC, C), 1) == iota((BC, C), 0) + i * BC, 1.0, 0.0)


def expneg(x):
    """exp(min(x, 0)): every gate exponent is clamped first, so cross-segment pairs cannot overflow."""
    return jnp.exp(jnp.minimum(x, 0.0))


# ----------------------------------------------------------------------------------------------- chunk loading

@dataclasses.dataclass
class ChunkRefs:
    """Refs of the kernel inputs; `off` is the first row of the chunk inside them (0 for the grid driver)."""
    q: Any
    k: Any
    v: Any
    g: Any
    b: Any
    sid: Any
    cm: Any
    em: Any


@dataclasses.dataclass
class Chunk:
    """One chunk's values in float32 plus the masks and gate quantities every stage needs."""
    q: jax.Array      # [C, K] scaled queries
    k: jax.Array      # [C, K]
    v: jax.Array      # [C, V]
    b: jax.Array      # [C, 1] beta
    cm: jax.Array     # [C, 1]
    em: jax.Array     # [C, 1]
    cm_last: jax.Array  # [1, 1]
    same: jax.Array   # [C, C] bool, same segment
    G: jax.Array      # [C, K] chunk-local cumsum of g (restarting at segment starts)
    glast: jax.Array  # [1, K] G of the last row
    lo: Any = None    # operand dtype of the state / value-sized matmuls: bfloat16 for bfloat16 inputs, else None


def load_rows(ref, off, start, n):
    return ref[pl.ds(off + start, n), :].astype(F32)


def load_chunk(r: ChunkRefs, off, C, scale) -> Chunk:
    ld = functools.partial(load_rows, off=off, start=0, n=C)
    sid = ld(r.sid)
    sid_row = col_to_row(sid)
    same = jnp.broadcast_to(sid, (C, C)) == jnp.broadcast_to(sid_row, (C, C))
    cum = jnp.where((iota((C, C), 1) <= iota((C, C), 0)) & same, 1.0, 0.0)
    G = dot_nn(cum, ld(r.g))
    cm = ld(r.cm)
    lo = jnp.bfloat16 if r.q.dtype == jnp.bfloat16 else None
    return Chunk(q=ld(r.q) * scale, k=ld(r.k), v=ld(r.v), b=ld(r.b), cm=cm, em=ld(r.em), cm_last=row(cm, C - 1),
                 same=same, G=G, glast=row(G, C - 1), lo=lo)


def causal_masks(ch: Chunk, C):
    """(Aqk mask: c <= r, Akk mask: c < r), both restricted to the same segment."""
    r, c = iota((C, C), 0), iota((C, C), 1)
    return (c <= r) & ch.same, (c < r) & ch.same


# ----------------------------------------------------------------------------------------------- intra-chunk

def intra_matrices(r: ChunkRefs, off, ch: Chunk, C, scale):
    """Aqk [C, C], raw Akk (without beta) [C, C] and its transpose, masked, by anchored secondary chunking."""
    Aqk = jnp.zeros((C, C), F32)
    Akk = jnp.zeros((C, C), F32)
    AkkT = jnp.zeros((C, C), F32)
    cols = iota((BC, C), 1)
    for i in range(C // BC):
        E = block_selector(i, C)
        Gi = dot_nn(E, ch.G)
        Qi = load_rows(r.q, off, i * BC, BC) * scale
        Ki = load_rows(r.k, off, i * BC, BC)
        anchor = row(Gi, 0)
        down = expneg(Gi - anchor)                   # e^{G_r - g_n} for the sub-block rows
        Kc = ch.k * expneg(anchor - ch.G)            # e^{g_n - G_c} for earlier columns
        Pq = dot_nt(Qi * down, Kc)
        Pk = dot_nt(Ki * down, Kc)

        def diag_col(j, carry, Qi=Qi, Ki=Ki, Gi=Gi, i=i):
            Dq, Dk = carry
            kd = row(Ki, j) * expneg(Gi - row(Gi, j))   # K_c e^{G_r - G_c}, c = row j of the sub-block
            sel = cols == i * BC + j
            Dq = jnp.where(sel, jnp.sum(Qi * kd, axis=1, keepdims=True), Dq)
            Dk = jnp.where(sel, jnp.sum(Ki * kd, axis=1, keepdims=True), Dk)
            return Dq, Dk

        zero = jnp.zeros((BC, C), F32)
        Dq, Dk = lax.fori_loop(0, BC, diag_col, (zero, zero))
        before = cols < i * BC
        Aq_i = jnp.where(before, Pq, Dq)
        Ak_i = jnp.where(before, Pk, Dk)
        Aqk = Aqk + dot_tn(E, Aq_i)
        Akk = Akk + dot_tn(E, Ak_i)
        AkkT = AkkT + dot_tn(Ak_i, E)
    mqk, mkk = causal_masks(ch, C)
    mkkT = (iota((C, C), 0) < iota((C, C), 1)) & ch.same
    return jnp.where(mqk, Aqk, 0.0), jnp.where(mkk, Akk, 0.0), jnp.where(mkkT, AkkT, 0.0)


def unit_lower_inverse(AT, C):
    """T = (I + A)^-1 for strictly lower A, given A^T, by forward substitution (row r = e_r - A[r, :] T)."""
    r_io, c_io = iota((C, C), 0), iota((C, C), 1)
    eye = jnp.where(r_io == c_io, 1.0, 0.0)

    def step(r, T):
        a = jnp.sum(jnp.where(c_io == r, AT, 0.0), axis=1, keepdims=True)       # a[j] = A[r, j]
        new = jnp.where(iota((1, C), 1) == r, 1.0, 0.0) - jnp.sum(a * T, axis=0, keepdims=True)
        return jnp.where(r_io == r, new, T)

    return lax.fori_loop(1, C, step, eye)


@dataclasses.dataclass
class Intra:
    """Everything the state-independent part of a chunk produces (recomputed by the backward)."""
    Aqk: jax.Array    # [C, C]
    AkkR: jax.Array   # [C, C] Akk without beta
    T: jax.Array      # [C, C] (I + Akk)^-1
    Gam: jax.Array    # [C, K] exp(G)
    Xw: jax.Array     # [C, K] beta exp(G) K
    W: jax.Array      # [C, K]
    U: jax.Array      # [C, V]
    Ef: jax.Array     # [C, K] exp(G_C - G) (clamped)
    Kt: jax.Array     # [C, K] em K exp(G_C - G)
    gam_col: jax.Array  # [K, 1] exp(G_C)


def chunk_intra(r: ChunkRefs, off, ch: Chunk, C, scale) -> Intra:
    Aqk, AkkR, AkkRT = intra_matrices(r, off, ch, C, scale)
    T = unit_lower_inverse(AkkRT * col_to_row(ch.b), C)
    Gam = jnp.exp(ch.G)
    Xw = ch.b * Gam * ch.k
    Ef = expneg(ch.glast - ch.G)
    return Intra(Aqk=Aqk, AkkR=AkkR, T=T, Gam=Gam, Xw=Xw, W=dot_nn(T, Xw), U=dot_nn(T, ch.b * ch.v, ch.lo), Ef=Ef,
                 Kt=ch.em * ch.k * Ef, gam_col=jnp.exp(row_to_col(ch.glast)))


def chunk_forward(r: ChunkRefs, off, S, C, scale):
    """One chunk: returns (o [C, V] f32, S+ [K, V] f32) from the chunk-start state S."""
    ch = load_chunk(r, off, C, scale)
    it = chunk_intra(r, off, ch, C, scale)
    vnew = it.U - ch.cm * dot_nn(it.W, S, ch.lo)
    o = ch.cm * dot_nn(ch.q * it.Gam, S, ch.lo) + dot_nn(it.Aqk, vnew, ch.lo)
    s_next = ch.cm_last * (it.gam_col * S) + dot_tn(it.Kt, vnew, ch.lo)
    return o, s_next


# ----------------------------------------------------------------------------------------------- kernels

def _fwd_grid_kernel(q, k, v, g, b, sid, cm, em, h0, o_ref, ht_ref, *rest, C, scale, save_states):
    h_ref, s_scr = rest if save_states else (None, rest[0])
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        s_scr[...] = h0[...].astype(F32)

    S = s_scr[...]
    if save_states:
        h_ref[...] = S.astype(h_ref.dtype)
    o, s_next = chunk_forward(ChunkRefs(q, k, v, g, b, sid, cm, em), 0, S, C, scale)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = s_next

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = s_next


def _fwd_loop_kernel(q, k, v, g, b, sid, cm, em, h0, o_ref, ht_ref, *rest, C, NT, scale, save_states):
    h_ref = rest[0] if save_states else None
    refs = ChunkRefs(q, k, v, g, b, sid, cm, em)

    def body(c, S):
        off = pl.multiple_of(c * C, C)
        if save_states:
            h_ref[c] = S.astype(h_ref.dtype)
        o, s_next = chunk_forward(refs, off, S, C, scale)
        o_ref[pl.ds(off, C), :] = o.astype(o_ref.dtype)
        return s_next

    ht_ref[...] = lax.fori_loop(0, NT, body, h0[...].astype(F32))


def compiler_params(backend, semantics):
    """Per-platform compiler parameters (None for the interpreters); `semantics` names the TPU grid axes."""
    if backend == "tpu":
        return pltpu.CompilerParams(dimension_semantics=semantics)
    if backend == "triton":
        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return None


def grid_specs(NT, C, K, V, reverse=False):
    """BlockSpecs of the chunked inputs for the grid driver; `reverse` walks the chunks last to first."""
    t = (lambda c: NT - 1 - c) if reverse else (lambda c: c)
    seq = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, c: (b, h, t(c), 0))
    tok = pl.BlockSpec((None, C, 1), lambda b, h, c: (b, t(c), 0))
    state = pl.BlockSpec((None, None, K, V), lambda b, h, c: (b, h, 0, 0))
    per_chunk = pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, t(c), 0, 0))
    return seq, tok, state, per_chunk


def loop_specs(T, NT, K, BV):
    """BlockSpecs of the loop driver, grid (B, H, V / BV): whole sequences, value-sized arrays in blocks of BV."""
    seq = lambda d: pl.BlockSpec((None, None, T, d), lambda b, h, j: (b, h, 0, 0))  # noqa: E731
    vseq = pl.BlockSpec((None, None, T, BV), lambda b, h, j: (b, h, 0, j))
    tok = pl.BlockSpec((None, T, 1), lambda b, h, j: (b, 0, 0))
    state = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    per_chunk = pl.BlockSpec((None, None, NT, K, BV), lambda b, h, j: (b, h, 0, 0, j))
    return seq, vseq, tok, state, per_chunk


# Value columns per program of the GPU (Triton) driver. The state recurrence of different value columns is
# independent, so the V axis becomes a grid axis: each program holds a [K, BV] float32 state (32 KiB at K = 128,
# BV = 64) instead of [K, V], and recomputes the value-independent intra-chunk quantities.
TRITON_BLOCK_V = 64


def loop_block_v(V, block_v=None):
    """Value block of the loop driver: block_v if given, else min(V, TRITON_BLOCK_V); must divide V."""
    bv = min(V, TRITON_BLOCK_V) if block_v is None else block_v
    if V % bv:
        raise ValueError(f"kda: block_v must divide the (padded) value dim V={V}, got {bv}")
    return bv


def kda_fwd_call(q, k, v, g, b, sid, cm, em, h0, *, scale, chunk_size, save_states, h_dtype, backend,
                 block_v=None):
    """Run the forward kernel on prepared inputs (module docstring layout).

    block_v: value columns per program of the loop driver ("triton", "interpret_loop"; see `loop_block_v`).
    Returns (o [B, H, T, V] in v.dtype, final state [B, H, K, V] f32, and if save_states the chunk-start states
    h [B, H, NT, K, V] in h_dtype).
    """
    assert backend in BACKENDS, backend
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    NT = T // C
    loop = backend in ("triton", "interpret_loop")
    if loop:
        BV = loop_block_v(V, block_v)
        grid = (B, H, V // BV)
        seq, vseq, tok, state, per_chunk = loop_specs(T, NT, K, BV)
        kernel = functools.partial(_fwd_loop_kernel, C=C, NT=NT, scale=scale, save_states=save_states)
        scratch = []
    else:
        grid = (B, H, NT)
        seq, tok, state, per_chunk = grid_specs(NT, C, K, V)
        vseq = seq(V)
        kernel = functools.partial(_fwd_grid_kernel, C=C, scale=scale, save_states=save_states)
        scratch = [pltpu.VMEM((K, V), F32)]
    inputs = (q, k, v, g, b, sid, cm, em, h0)
    out_shape = [varying_out((B, H, T, V), v.dtype, *inputs), varying_out((B, H, K, V), F32, *inputs)]
    out_specs = [vseq, state]
    if save_states:
        out_shape.append(varying_out((B, H, NT, K, V), h_dtype, *inputs))
        out_specs.append(per_chunk)
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[seq(K), seq(K), vseq, seq(K), seq(1), tok, tok, tok, state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=compiler_params(backend, ("parallel", "parallel", "arbitrary")),
        interpret=backend.startswith("interpret"),
        name="kda_fwd",
    )(*inputs)
    return tuple(outs) if save_states else (*outs, None)

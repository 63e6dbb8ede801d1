"""KDA with the sequence split over a mesh axis (context parallelism), called inside `jax.shard_map`.

The recurrence is affine in the state: a stretch of tokens maps its start state S to `P S + Q` per (row, head),
P [K, K] and Q [K, V]. Forward, each shard
1. runs `kda` on its own tokens from a zero start, with the value block augmented by K zero columns and the start
   state [0 | I] (exact, since the state map is linear): the run returns the outputs from a zero start o0 [.., V],
   per-token read-out vectors r_t = scale * P_t^T q_t [.., K] (P_t: the map from the shard's start to token t),
   and the end state [Q | P]. No new kernel and no per-token [K, K] matrix;
2. gets its true start state S_in from an inclusive scan of the (P, Q) pairs over the axis, log2(n) rounds of
   `ppermute` (Kogge-Stone), then one shift by a shard;
3. corrects its outputs: o_t = o0_t + S_in^T r_t (one [K] x [K, V] product per token).
Backward (a custom VJP: the same in reverse), each shard
1. forms D = sum_t r_t do_t^T, the cotangent of its start state through its own outputs;
2. gets the cotangent dE of its end state from the transposed scan down the axis: a shard's start-state cotangent
   is G = P^T dE + D, and dE of a shard is G of the next one;
3. runs the VJP of a plain local `kda` from S_in with cotangents (do, dE): every input's exact gradient.
Nothing of the augmented run is kept for the backward (only r, S_in and P): memory stays near one local `kda`
call. Work, counted for one 48B-model layer (H = 32, K = V = 128, 1M tokens on 64-256 devices;
bench/context_parallel.py): 1.68-1.73x the flops of a local `kda` forward + backward, of which the zero-start
run is 0.55 and the scans and corrections the rest.

Why a ppermute scan and not an all-gather of (P, Q): with n shards, an all-gather puts n * B * H * K * (K + V)
floats on every device (1 GiB at n = 256, H = 32, K = V = 128, B = 1) and leaves n sequential [K, K] x [K, V]
products; the Kogge-Stone scan sends one map per round, log2(n) rounds (8 at n = 256), keeps O(1) maps per device
and costs 2 K^2 (K + V) flops per round per (row, head), equal or cheaper at every n from 2 up.

Segments (`segment_ids`, the same rule as `kda`: the state restarts where a real token's id differs from the
previous real token's id, padding id 0 is inert, the row's first real segment continues from `initial_state`):
- inside a shard the local run handles them; a restart inside the shard makes P = 0 from there on (later
  segments started from zero, so the [0 | I] block is gone), and r_t = 0 for tokens after it;
- at shard starts, every shard learns (one all-gather of two int32 ids per row and piece) the id of the last real
  token before it; its start state is the previous end state if its first real id equals that id or if there is
  no real token before it (then the previous end state is the row's `initial_state` passed through), and zero
  otherwise (the scan uses c * P with c in {0, 1});
- an all-padding shard has P = I, Q = 0 and zero outputs: it passes the state through unchanged;
- the row's `initial_state` enters only through the first shard's map (folded in as Q_0 := P_0 S0 + Q_0, P_0 := 0),
  so it reaches exactly the row's first real segment, wherever that starts.

Layout. KDA's work is linear in the tokens, so contiguous shards (shard i holds tokens [i T, (i + 1) T)) already do
equal work and need no load balancing. For a model whose causal attention layers use the load-balanced zigzag
layout (the sequence in 2n equal pieces, shard i holding pieces i and 2n - 1 - i, in that order), `layout="zigzag"`
takes that layout as is, so no per-layer permutation of activations is needed: the two halves run as two batch
rows of one local call; a forward scan over the first pieces (shard 0 to n - 1), then a reverse scan over the
second pieces (shard n - 1 down to 0, seeded on shard n - 1 with the end of the first half): 2 log2(n) rounds.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.kda.checks import check_sequence_inputs
from pallas_kernels.kda.chunk_math import mm
from pallas_kernels.kda.dispatch import kda

LAYOUTS = ("contiguous", "zigzag")
F32 = jnp.float32


def kda_context_parallel(q, k, v, g, beta, *, axis_name, scale=None, initial_state=None, output_final_state=False,
                         segment_ids=None, chunk_size=64, impl="auto", layout="contiguous"):
    """KDA of a sequence split over the mesh axis `axis_name`; call inside `jax.shard_map`.

    Every argument is this shard's part (shapes as `kda`, with T the local length):
    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log-decay; beta: [B, T, H]; segment_ids: int [B, T] or
    None; initial_state: [B, H, K, V] or None, the row's start state, the same on every shard of the axis.
    layout: "contiguous" (shard i holds tokens [i T, (i + 1) T) of the row) or "zigzag" (the row in 2n pieces of
    T / 2; shard i holds pieces i and 2n - 1 - i, in that order; T must be even). chunk_size, impl: as `kda`.
    Returns (o [B, T, H, V] in v.dtype, this shard's outputs; final_state [B, H, K, V] float32, the row's end state,
    the same on every shard (one psum over the axis), or None). The same values as `kda` on the whole row;
    differentiable in q, k, v, g, beta and initial_state.
    """
    B, T, H, K, V = check_sequence_inputs(q, k, v, g, beta, initial_state, segment_ids, op="kda_context_parallel")
    if layout not in LAYOUTS:
        raise ValueError(f"kda_context_parallel: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and T % 2:
        raise ValueError(f"kda_context_parallel: the zigzag layout needs an even local length (two pieces of T / 2), "
                         f"got T = {T}")
    try:
        n = lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(f"kda_context_parallel: axis_name {axis_name!r} is not a mesh axis of an enclosing "
                         f"jax.shard_map; call the op inside shard_map with the sequence split over that axis") from e
    S0 = None if initial_state is None else initial_state.astype(F32)
    cfg = _Config(axis_name, n, 2 if layout == "zigzag" else 1, scale, chunk_size, impl, bool(output_final_state))
    return _context_parallel(q, k, v, g, beta, S0, segment_ids, cfg)


class _Config(NamedTuple):
    axis_name: Any
    n: int                     # shards on the axis
    m: int                     # pieces per shard: 1 (contiguous) or 2 (zigzag)
    scale: float | None
    chunk_size: int
    impl: str
    output_final_state: bool


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _context_parallel(q, k, v, g, beta, S0, seg, cfg):
    o, final, _ = _forward(q, k, v, g, beta, S0, seg, cfg)
    return o, final


def _forward(q, k, v, g, beta, S0, seg, cfg):
    """Returns (o, final state or None, what the backward needs)."""
    B, m, n, axis = q.shape[0], cfg.m, cfg.n, cfg.axis_name
    rows = lambda x: x if m == 1 else _halves_to_rows(x)  # noqa: E731  the m pieces as m * B rows, piece-major
    by_piece = lambda x: x.reshape((m, B) + x.shape[1:])  # noqa: E731
    seg = None if seg is None else rows(seg)
    # 1. the local run from a zero start
    o0, r, P, Q = _zero_start_run(*(rows(x) for x in (q, k, v, g, beta)), seg, cfg)
    P, Q = by_piece(P), by_piece(Q)
    # 2. start states; c: 1 where a piece continues the end state of the piece before it in the row
    c, c_next = (jnp.ones((m, B), F32),) * 2 if seg is None else _continues(by_piece(seg), axis, n)
    if m == 1:
        start, end = _chain(P[0], Q[0], c[0], S0, axis, n, reverse=False)
        starts, last_shard, final = start[None], n - 1, end
    else:
        start_a, end_a = _chain(P[0], Q[0], c[0], S0, axis, n, reverse=False)
        # the second halves run from shard n - 1 down to 0; the first of them follows the first half's end
        seed_b = _bcast(c[1]) * end_a   # used on shard n - 1 only
        start_b, end_b = _chain(P[1], Q[1], c[1], seed_b, axis, n, reverse=True)
        starts, last_shard, final = jnp.stack([start_a, start_b]), 0, end_b
    # 3. the correction o = o0 + S_in^T r
    starts = starts.reshape((m * B,) + starts.shape[2:])
    o = (o0.astype(F32) + mm("bthk,bhkv->bthv", r.astype(F32), starts)).astype(v.dtype)
    o = o if m == 1 else _rows_to_halves(o, B)
    if cfg.output_final_state:
        final = lax.psum(jnp.where(lax.axis_index(axis) == last_shard, final, 0.0), axis)
    else:
        final = None
    return o, final, (r, starts, P, c_next)


def _forward_rule(q, k, v, g, beta, S0, seg, cfg):
    o, final, res = _forward(q, k, v, g, beta, S0, seg, cfg)
    return (o, final), (q, k, v, g, beta, S0, seg, res)


def _backward_rule(cfg, saved, cts):
    """The forward in reverse. The cotangent of a piece's start state is G = P^T dE + D (dE: that of its end state,
    D = sum_t r_t do_t^T: that through its own outputs), and dE = c' G' with G', c' of the next piece in the row: the
    same affine scan, transposed, down the axis. Then the local VJP of `kda` from the true start state with the
    true end-state cotangent gives every input's gradient."""
    q, k, v, g, beta, S0, seg, (r, starts, P, c_next) = saved
    do, dfinal = cts
    B, m, n, axis = q.shape[0], cfg.m, cfg.n, cfg.axis_name
    rows = lambda x: x if m == 1 else _halves_to_rows(x)  # noqa: E731
    do = rows(do)
    D = mm("bthk,bthv->bhkv", r.astype(F32), do.astype(F32)).reshape((m, B) + starts.shape[1:])
    PT = jnp.swapaxes(P, -1, -2)
    dfinal = None if dfinal is None else dfinal.astype(F32)
    if m == 1:   # from shard n - 1 down to 0
        dE, _ = _chain(PT[0], D[0], c_next[0], dfinal, axis, n, reverse=True)
        dE = dE[None]
    else:        # the second halves from shard 0 up to n - 1, then the first halves from n - 1 down to 0
        dE_b, G_b = _chain(PT[1], D[1], c_next[1], dfinal, axis, n, reverse=False)
        seed_a = _bcast(c_next[0]) * G_b   # on shard n - 1: the piece after its first half is its second half
        dE_a, _ = _chain(PT[0], D[0], c_next[0], seed_a, axis, n, reverse=True)
        dE = jnp.stack([dE_a, dE_b])
    dE = dE.reshape((m * B,) + dE.shape[2:])

    def local(q, k, v, g, beta, start):
        return kda(q, k, v, g, beta, scale=cfg.scale, initial_state=start, output_final_state=True,
                   segment_ids=None if seg is None else rows(seg), chunk_size=cfg.chunk_size, impl=cfg.impl)

    _, vjp = jax.vjp(local, *(rows(x) for x in (q, k, v, g, beta)), starts)
    *grads, dstart = vjp((do, dE))
    grads = tuple(x if m == 1 else _rows_to_halves(x, B) for x in grads)
    if S0 is None:
        return (*grads, None, None)
    # the row's initial state is the start state of the first piece of shard 0
    dS0 = jnp.where(lax.axis_index(axis) == 0, dstart[:B], 0.0)
    if axis not in jax.typeof(S0).manual_axis_type.varying:   # one copy for the whole axis: sum its uses
        dS0 = lax.psum(dS0, axis)
    return (*grads, dS0, None)


_context_parallel.defvjp(_forward_rule, _backward_rule)


def _bcast(c):
    """[B] -> [B, 1, 1, 1]."""
    return c[:, None, None, None]


def _halves_to_rows(x):
    """[B, T, ...] -> [2B, T / 2, ...]: first halves of all rows, then second halves."""
    B, T = x.shape[:2]
    x = x.reshape((B, 2, T // 2) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((2 * B, T // 2) + x.shape[3:])


def _rows_to_halves(x, B):
    """Inverse of `_halves_to_rows`: [2B, T / 2, ...] -> [B, T, ...]."""
    x = jnp.swapaxes(x.reshape((2, B) + x.shape[1:]), 0, 1)
    return x.reshape((B, 2 * x.shape[2]) + x.shape[3:])


def _zero_start_run(q, k, v, g, beta, segment_ids, cfg):
    """`kda` from a zero start with the value block [v | 0] and start state [0 | I].

    Returns o0 [B, T, H, V] (outputs from a zero start), r [B, T, H, K] (o = o0 + S_in^T r for a start state
    S_in), both in v.dtype, and the map S_end = P S_in + Q: P [B, H, K, K], Q [B, H, K, V] float32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    v_aug = jnp.concatenate([v, jnp.zeros((B, T, H, K), v.dtype)], axis=-1)
    s_aug = jnp.concatenate([jnp.zeros((B, H, K, V), F32), jnp.broadcast_to(jnp.eye(K, dtype=F32), (B, H, K, K))],
                            axis=-1)
    o, s = kda(q, k, v_aug, g, beta, scale=cfg.scale, initial_state=s_aug, output_final_state=True,
               segment_ids=segment_ids, chunk_size=cfg.chunk_size, impl=cfg.impl)
    return o[..., :V], o[..., V:], s[..., V:], s[..., :V]


def _first_last_ids(seg):
    """seg int [N, T] -> (id of the first real token, id of the last real token) [N] int32, 0 if none."""
    seg = seg.astype(jnp.int32)
    real = seg != 0
    any_real = jnp.any(real, axis=1)
    first = jnp.take_along_axis(seg, jnp.argmax(real, axis=1)[:, None], axis=1)[:, 0]
    last = jnp.take_along_axis(seg, seg.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1)[:, None], axis=1)[:, 0]
    return jnp.where(any_real, first, 0), jnp.where(any_real, last, 0)


def _continues(seg, axis_name, n):
    """seg int [m, B, T] (this shard's pieces) -> (c, c_next) [m, B] float32: c = 1 where the piece starts from the
    end state of the piece before it in the row (its first real id equals the last real id before it, or no real
    token comes before it, or it has no real token), 0 where its first real token restarts the state; c_next: c of
    the piece after it in the row (1 after the row's last piece, where it is unused)."""
    m, B, T = seg.shape
    first, last = _first_last_ids(seg.reshape(m * B, T))
    ids = lax.all_gather(jnp.stack([first, last], axis=-1).reshape(m, B, 2), axis_name)   # [n, m, B, 2]
    # the row's pieces in sequence order; own_pos: the positions of this shard's pieces
    idx = lax.axis_index(axis_name)
    if m == 1:
        in_order, own_pos = ids[:, 0], idx[None]
    else:
        in_order, own_pos = jnp.concatenate([ids[:, 0], ids[::-1, 1]]), jnp.stack([idx, 2 * n - 1 - idx])
    firsts, lasts = in_order[..., 0], in_order[..., 1]                                      # [N, B]
    N = firsts.shape[0]
    where_last = lax.cummax(jnp.where(lasts != 0, jnp.arange(N)[:, None], -1), axis=0)     # last real piece <= p
    prev_pos = jnp.concatenate([jnp.full((1, B), -1, where_last.dtype), where_last[:-1]])  # ... < p
    prev = jnp.where(prev_pos >= 0, jnp.take_along_axis(lasts, jnp.maximum(prev_pos, 0), axis=0), 0)
    cont = ((prev == 0) | (firsts == 0) | (firsts == prev)).astype(F32)                      # [N, B]
    cont = jnp.concatenate([cont, jnp.ones((1, B), F32)])
    return cont[own_pos], cont[own_pos + 1]


def _shift(n, d, reverse):
    """ppermute pairs sending shard j's value d places along the chain (up the axis, or down if reverse)."""
    return [(j + d, j) for j in range(n - d)] if reverse else [(j, j + d) for j in range(n - d)]


def _chain(P, Q, c, seed, axis_name, n, *, reverse):
    """Start and end states of a chain of pieces, one per shard, in axis order (reverse: from shard n - 1 down).

    P [B, H, K, K], Q [B, H, K, V]: this shard's piece maps its start state S to P S + Q; c [B]: its start state is
    c * (the previous piece's end state); the chain's first piece starts from seed [B, H, K, V] (None = zeros).
    Returns (start, end) [B, H, K, V] float32 of this shard's piece.
    """
    pos = lax.axis_index(axis_name)
    if reverse:
        pos = n - 1 - pos
    first = pos == 0
    c = _bcast(c)
    # (Pm, Qm): the map from the end of the piece before the covered range to this piece's end. The first piece's
    # map is folded with its seed into a constant (P = 0), so the scan's Q part ends as the true end state.
    Qm = Q if seed is None else jnp.where(first, mm("bhij,bhjv->bhiv", P, seed) + Q, Q)
    Pm = jnp.where(first, 0.0, c * P)
    d = 1
    while d < n:   # Kogge-Stone: after the round with d, the map covers the 2d pieces ending at this one
        last_round = 2 * d >= n
        if last_round:  # the composed P is not needed any more
            Qp = lax.ppermute(Qm, axis_name, _shift(n, d, reverse))
        else:
            Pp, Qp = lax.ppermute((Pm, Qm), axis_name, _shift(n, d, reverse))
        has = pos >= d   # shards within d of the chain's start already hold a complete (constant) map
        Q_new = jnp.where(has, mm("bhij,bhjv->bhiv", Pm, Qp) + Qm, Qm)
        if not last_round:
            Pm = jnp.where(has, mm("bhij,bhjk->bhik", Pm, Pp), Pm)
        Qm = Q_new
        d *= 2
    end = Qm
    prev_end = lax.ppermute(end, axis_name, _shift(n, 1, reverse)) if n > 1 else jnp.zeros_like(end)
    start = jnp.where(first, 0.0 if seed is None else seed, c * prev_end)
    return start, end

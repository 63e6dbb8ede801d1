"""Context parallelism: the sequence split over the `context` mesh axis, for the layers that mix tokens.

Everything per token (projections, norms, the MoE, the loss) runs on GSPMD-sharded [B, T, ...] arrays whose length
dim the logical rules put on `context`; only the three token mixers need to see other shards, each inside one
`jax.shard_map`:
- the short convolution reads a halo: the last kernel_size - 1 real tokens of its own run before the shard
  (`conv_halo_state`, one all-gather of (kernel_size - 1) tokens per piece), zero across segment starts;
- KDA runs `pallas_kernels.kda.kda_context_parallel` (per-shard state maps and a scan over the axis);
- MLA keeps its queries local and all-gathers the latents (c and k_pe, R + P values a token), then runs the
  absorbed form (`latent_attention`: one shared latent key/value head) with the attention op at each piece's
  absolute offset.

Layout. With `zigzag` (ModelConfig.context_layout, the default) the row is cut into 2n pieces and shard i holds
pieces i and 2n - 1 - i, so every shard does the same causal-attention work; `contiguous` gives shard i the i-th
n-th. The model applies the permutation to its hidden states (and segment ids, positions) once on entry
(`to_layout`) and undoes it once on exit (`from_layout`): two ppermutes of [B, T, hidden] a forward, instead of
asking every caller (data pipeline, loss, evaluation) to permute tokens, positions, segments and labels alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from k2jax.sharding import CONTEXT_AXIS, context_size, logical_to_mesh_spec
from pallas_kernels.attention import attention

LAYOUTS = ("zigzag", "contiguous")


def check_context_length(T: int, layout: str, min_piece: int = 1) -> int:
    """The number of context shards n of the active mesh after checking that a row of T tokens splits over it:
    T divisible by n (by 2n for zigzag) into pieces of at least `min_piece` tokens. Raises ValueError otherwise."""
    n = context_size()
    pieces = n * (2 if layout == "zigzag" else 1)
    if T % pieces or T // pieces < min_piece:
        raise ValueError(f"context parallelism: sequence length {T} must split into {pieces} equal pieces "
                         f"({layout} layout over context={n}) of at least {min_piece} tokens each")
    return n


def spec(names, shape) -> PartitionSpec:
    """PartitionSpec of an array with logical `names` on the active mesh (a shard_map in/out spec)."""
    return logical_to_mesh_spec(names, jax.sharding.get_abstract_mesh(), shape)


def piece_positions(layout: str):
    """Natural-order index of each local piece (int32 [m]; m = 2 for zigzag, 1 for contiguous), inside shard_map."""
    i = lax.axis_index(CONTEXT_AXIS)
    if layout == "zigzag":
        return jnp.stack([i, 2 * lax.axis_size(CONTEXT_AXIS) - 1 - i]).astype(jnp.int32)
    return i[None].astype(jnp.int32)


def natural_order(gathered, layout: str, n: int):
    """Pieces all-gathered in shard order [n * m, ...] (shard-major) -> natural order [n * m, ...]."""
    if layout != "zigzag":
        return gathered
    g = gathered.reshape((n, 2) + gathered.shape[1:])
    return jnp.concatenate([g[:, 0], g[::-1, 1]])


# ---- the zigzag permutation of the hidden states ------------------------------------------------------------------
def _dest(p: int, n: int) -> int:
    """The shard holding natural piece p (of 2n) in the zigzag layout."""
    return p if p < n else 2 * n - 1 - p


def _contiguous_to_zigzag(x):
    """Inside shard_map, x [B, T, ...] holding natural pieces 2i, 2i + 1 -> pieces i, 2n - 1 - i."""
    n, i = lax.axis_size(CONTEXT_AXIS), lax.axis_index(CONTEXT_AXIS)
    a, b = jnp.split(x, 2, axis=1)
    a = lax.ppermute(a, CONTEXT_AXIS, [(j, _dest(2 * j, n)) for j in range(n)])      # even pieces
    b = lax.ppermute(b, CONTEXT_AXIS, [(j, _dest(2 * j + 1, n)) for j in range(n)])  # odd pieces
    even = i % 2 == 0  # piece i is even iff i is; piece 2n - 1 - i has the other parity
    return jnp.concatenate([jnp.where(even, a, b), jnp.where(even, b, a)], axis=1)


def _zigzag_to_contiguous(x):
    """Inverse of `_contiguous_to_zigzag`."""
    n, i = lax.axis_size(CONTEXT_AXIS), lax.axis_index(CONTEXT_AXIS)
    first, second = jnp.split(x, 2, axis=1)
    even = i % 2 == 0
    e, o = jnp.where(even, first, second), jnp.where(even, second, first)  # the even- and odd-numbered pieces
    e = lax.ppermute(e, CONTEXT_AXIS, [(j, (j if j % 2 == 0 else 2 * n - 1 - j) // 2) for j in range(n)])
    o = lax.ppermute(o, CONTEXT_AXIS, [(j, (2 * n - 1 - j if j % 2 == 0 else j) // 2) for j in range(n)])
    return jnp.concatenate([e, o], axis=1)


def _permute(x, names, fn):
    s = spec(names, x.shape)
    if s[1] != CONTEXT_AXIS:
        raise ValueError(f"context parallelism: the length dim of a {x.shape} array does not shard over "
                         f"`{CONTEXT_AXIS}` (spec {s}); the length must divide by the context size")
    return jax.shard_map(fn, in_specs=s, out_specs=s, check_vma=False)(x)


def to_layout(x, names, layout: str):
    """x [B, T, ...] in natural order (logical `names`, length second) -> the model's context layout."""
    return x if layout != "zigzag" else _permute(x, names, _contiguous_to_zigzag)


def from_layout(x, names, layout: str):
    """Inverse of `to_layout`."""
    return x if layout != "zigzag" else _permute(x, names, _zigzag_to_contiguous)


# ---- the short convolution's halo ---------------------------------------------------------------------------------
def _last_real(x, seg, count: int):
    """The last `count` real tokens of each row, oldest first: (x [N, count, C], ids [N, count], 0 where a row has
    fewer). x [N, L, C], seg int [N, L] (0 = padding)."""
    N, L, C = x.shape
    if L < count:
        x = jnp.concatenate([jnp.zeros((N, count - L, C), x.dtype), x], axis=1)
        seg = jnp.concatenate([jnp.zeros((N, count - L), seg.dtype), seg], axis=1)
    order = jnp.argsort((seg != 0).astype(jnp.int32), axis=1, stable=True)[:, -count:]  # padding first, reals last
    ids = jnp.take_along_axis(seg, order, axis=1)
    return jnp.take_along_axis(x, order[:, :, None], axis=1), ids


def conv_halo_state(x, seg, kernel_size: int, layout: str):
    """Inside shard_map over `context`: the conv state each local piece starts from, as ShortConv takes it.

    x [m, B, Tp, C] (the m local pieces), seg int [m, B, Tp] (0 = padding; all ones when unsegmented). Returns
    [m, B, W - 1, C]: the last W - 1 real pre-conv inputs before the piece in the row that belong to the run of
    equal ids the piece's first real token is in (zero where fewer), exactly what ShortConv's taps read across
    the piece start on one device.
    """
    m, B, Tp, C = x.shape
    W1 = kernel_size - 1
    n = lax.axis_size(CONTEXT_AXIS)
    tail_x, tail_id = _last_real(x.reshape(m * B, Tp, C), seg.reshape(m * B, Tp), W1)
    all_x = natural_order(lax.all_gather(tail_x.reshape(m, B, W1, C), CONTEXT_AXIS).reshape(n * m, B, W1, C),
                          layout, n)
    all_id = natural_order(lax.all_gather(tail_id.reshape(m, B, W1), CONTEXT_AXIS).reshape(n * m, B, W1), layout, n)
    first_real = jnp.take_along_axis(seg, jnp.argmax(seg != 0, axis=2)[:, :, None], axis=2)[:, :, 0]  # [m, B]
    states = []
    for j, p in enumerate(jnp.unstack(piece_positions(layout))):
        before = (jnp.arange(n * m) < p)[:, None, None]
        ids = jnp.where(before, all_id, 0)                                      # [N, B, W1]: pieces before p only
        flat_x = jnp.swapaxes(all_x, 0, 1).reshape(B, n * m * W1, C)
        cand_x, cand_id = _last_real(flat_x, jnp.swapaxes(ids, 0, 1).reshape(B, n * m * W1), W1)
        same = cand_id == first_real[j][:, None]
        # keep slot s only when it and every later slot are in the piece's run (the run may restart in between)
        keep = jnp.flip(jnp.cumprod(jnp.flip(same, axis=1).astype(jnp.int32), axis=1), axis=1).astype(bool)
        states.append(jnp.where(keep[:, :, None], cand_x, 0).astype(x.dtype))
    return jnp.stack(states)


# ---- MLA: absorbed attention over all-gathered latents -------------------------------------------------------------
def _tokens_in_natural_order(a, layout: str, n: int, m: int):
    """a [B, n * T, ...] all-gathered (shard order, m pieces a shard) -> the row's tokens in natural order."""
    B, N = a.shape[:2]
    pieces = jnp.moveaxis(a.reshape((B, n * m, N // (n * m)) + a.shape[2:]), 1, 0)   # [n * m, B, piece, ...]
    return jnp.moveaxis(natural_order(pieces, layout, n), 0, 1).reshape(a.shape)


def latent_attention(q_nope, q_pe, c, k_pe, segment_ids, w_uk, w_uv, *, scale: float, layout: str, impl: str = "auto",
                     return_max_logit: bool = False):
    """MLA attention in the absorbed form over latents: score_h(t, s) = (q_lat,h(t) . c(s) + q_pe,h(t) . k_pe(s))
    * scale with q_lat,h = W_UK,h^T q_nope,h, o_h = W_UV,h sum_s p_s c(s). The attention op sees one shared key
    head [c | k_pe] (R + P) and value head c (R): nothing per head is built over the keys.

    Under a mesh with context > 1 (active, not inside a shard_map) the [B, T] dims are split over `context` in
    `layout`: queries stay local, the latents are all-gathered (R + P values a token) and each local piece attends
    at its absolute offset. Otherwise one device's attention.
    q_nope [B, T, H, n]; q_pe [B, T, H, P]; c [B, T, R]; k_pe [B, T, P]; segment_ids int [B, T] or None;
    w_uk [H, n, R]; w_uv [H, R, d_v]. Returns o [B, T, H * d_v] in q_nope's dtype (heads-major, as o_proj takes it), and with return_max_logit the
    largest scaled logit per (row, head) over the whole row, float32 [B, H] (no gradient; -inf for a row of
    padding).
    """
    B, T, H, _ = q_nope.shape
    dv = w_uv.shape[-1]
    n = context_size()
    args = (q_nope, q_pe, c, k_pe, w_uk, w_uv) + (() if segment_ids is None else (segment_ids.astype(jnp.int32),))

    def local(q_nope, q_pe, c, k_pe, w_uk, w_uv, seg=None):
        dt = q_nope.dtype
        B, T = c.shape[:2]  # this shard's
        q_lat = jnp.einsum("bthn,hnr->bthr", q_nope, w_uk.astype(dt), preferred_element_type=jnp.float32)
        q = jnp.concatenate([q_lat.astype(dt), q_pe.astype(dt)], axis=-1)
        if n > 1:
            gather = lambda a: lax.all_gather(a, CONTEXT_AXIS, axis=1, tiled=True)  # noqa: E731
            m = 2 if layout == "zigzag" else 1
            c_all, kpe_all = (_tokens_in_natural_order(gather(a), layout, n, m) for a in (c, k_pe))
            seg_all = None if seg is None else _tokens_in_natural_order(gather(seg), layout, n, m)
            offsets = piece_positions(layout) * (T // m)
        else:
            c_all, kpe_all, seg_all, m, offsets = c, k_pe, seg, 1, [0]
        k = jnp.concatenate([c_all.astype(dt), kpe_all.astype(dt)], axis=-1)[:, :, None, :]
        v = c_all.astype(dt)[:, :, None, :]
        outs, maxes = [], []
        Tp = T // m
        for j in range(m):
            sl = slice(j * Tp, (j + 1) * Tp)
            res = attention(q[:, sl], k, v, scale=scale, causal=True,
                            q_segment_ids=None if seg is None else seg[:, sl], kv_segment_ids=seg_all,
                            q_offset=offsets[j], impl=impl, return_max_logit=return_max_logit)
            o, mx = res if return_max_logit else (res, None)
            outs.append(o)
            maxes.append(mx)
        o = jnp.concatenate(outs, axis=1) if m > 1 else outs[0]                 # [B, T, H, R]
        o = jnp.einsum("bthr,hrv->bthv", o, w_uv.astype(dt), preferred_element_type=jnp.float32).astype(dt)
        if not return_max_logit:
            return o
        mx = jnp.max(jnp.stack(maxes), axis=0)
        return o, (lax.pmax(mx, CONTEXT_AXIS) if n > 1 else mx)

    if n == 1:
        out = local(*args)
    else:
        names = [("batch", "length", "heads", None), ("batch", "length", "heads", None), ("batch", "length", None),
                 ("batch", "length", None), ("heads", None, None), ("heads", None, None), ("batch", "length")]
        in_specs = tuple(spec(nm, a.shape) for nm, a in zip(names, args))
        o_spec = spec(("batch", "length", "heads", None), (B, T, H, dv))
        out_specs = (o_spec, spec(("batch", "heads"), (B, H))) if return_max_logit else o_spec
        out = jax.shard_map(local, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
    if return_max_logit:
        return out[0].reshape(B, T, H * dv), out[1]
    return out.reshape(B, T, H * dv)

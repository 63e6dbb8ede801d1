"""Expert parallelism: routed experts sharded over the `expert` mesh axis, tokens dispatched inside `jax.shard_map`.

`MoE.__call__` routes every token first (the router is small and replicated), then calls `routed_experts` here
whenever a mesh whose `expert` axis has more than one device is active (`jax.set_mesh`). Each device holds
E / ep experts (w1, w3: [E/ep, hidden, I/tp], w2: [E/ep, I/tp, hidden]; the fsdp shards of `hidden` are
all-gathered inside the shard_map, so the weight gradients come back reduce-scattered layer by layer, and `I`
stays split over `tensor` with a psum at the end, Megatron style).

Two dispatch schemes (`config.moe_ep_impl`):
- 'allgather': the tokens of the expert group (and their routing) are all-gathered over `expert`; every device
  runs its local experts on the rows routed to them and a reduce-scatter (`psum_scatter`) returns each device's
  tokens. Runs everywhere, including XLA:CPU; the default there.
- 'ragged_a2a': (token, slot) rows are sorted by expert and sent only to the device owning that expert with
  `jax.lax.ragged_all_to_all`, computed there, and sent back the same way. The TPU/GPU default. XLA:CPU has no
  ragged all-to-all, so on CPU the same code runs with `ragged_all_to_all_emulated` (an all-gather that places
  the rows exactly as the real collective does), which keeps this path's bookkeeping testable on CPU.
- 'auto': `jax.lax.platform_dependent` picks 'allgather' on CPU and 'ragged_a2a' elsewhere when lowering.

Capacity: by default both schemes are dropless, so every device reserves room for the worst case (all ep * n * k
(token, slot) rows of its group landing on it). With `config.moe_capacity_factor = c`, a device keeps at most
ceil(c * n * k) rows (n = tokens per device, k = experts per token; c = 1 is the balanced load); the rows past
that are dropped (they contribute zero) and counted in the MoE aux 'dropped_tokens' (dropped (token, expert)
assignments, summed over the whole batch).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from k2jax.config import ModelConfig
from k2jax.sharding import logical_to_mesh_spec
from pallas_kernels.moe import grouped_matmul

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def active_ep_mesh():
    """The active abstract mesh when expert parallelism applies (an `expert` axis of size > 1, not already inside
    a shard_map over it), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) <= 1:
        return None
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh


def capacity(config: ModelConfig, group_tokens: int, ep: int) -> int:
    """Rows of (token, slot) pairs one device keeps for its local experts, when `group_tokens` tokens are spread
    over the `ep` devices of an expert group: all group_tokens * k of them when dropless (the worst case), else
    ceil(moe_capacity_factor * group_tokens * k / ep) (the factor times the balanced load), capped at that."""
    worst = group_tokens * config.num_experts_per_token
    cf = config.moe_capacity_factor
    return worst if cf is None else max(1, min(worst, math.ceil(cf * worst / ep)))


# ---- shared pieces -----------------------------------------------------------------------------------------------
def _capped_sizes(group_sizes, cap: int):
    """Per-group sizes after keeping only the first `cap` rows of the group-sorted order."""
    ends = jnp.minimum(jnp.cumsum(group_sizes), cap)
    return jnp.diff(ends, prepend=0).astype(jnp.int32)


def _swiglu_rows(xs, group_sizes, w1, w3, w2, dtype):
    """Grouped SwiGLU over rows sorted by local expert: xs [M, D], group_sizes [G] (sum <= M; rows past the sum
    are garbage the caller masks) -> float32 [M, D] (a partial sum over `tensor` when I is split)."""
    xs, w1, w3, w2 = _same_variance(xs, w1, w3, w2)
    h = jax.nn.silu(grouped_matmul(xs, w1, group_sizes)) * grouped_matmul(xs, w3, group_sizes)
    return grouped_matmul(h.astype(dtype), w2, group_sizes)


def _vma(x) -> frozenset:
    """The manual mesh axes x varies over (`.mat.varying` on JAX 0.10-0.12, `.vma` on older releases)."""
    t = jax.typeof(x)
    mat = getattr(t, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(t, "vma", ()))


def _same_variance(*arrays):
    """The arrays, each marked as varying over every manual axis any of them varies over. The grouped matmul's
    custom VJP returns cotangents with the variance of the product; marking the inputs first makes the types
    match, and the transpose of each mark is the psum that sums partial gradients (weights over token shards,
    rows over `tensor` slices)."""
    union = frozenset().union(*(_vma(a) for a in arrays))
    out = []
    for a in arrays:
        axes = tuple(sorted(union - _vma(a)))
        out.append(jax.lax.pcast(a, axes, to="varying") if axes else a)
    return out


def _inverse_permutation(order):
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


# ---- all-gather scheme -------------------------------------------------------------------------------------------
def _local_experts(x, local_idx, topk_w, w1, w3, w2, cap: int, dtype):
    """Run this device's experts on their rows.

    x [n, D]; local_idx int32 [n, k] (local expert id, or G = w1.shape[0] for pairs owned elsewhere); topk_w f32
    [n, k]. Keeps the first `cap` local rows in (expert, pair) order. Returns (float32 [n, D] weighted sum of this
    device's expert outputs per token, int32 number of local rows dropped).
    """
    n, k = local_idx.shape
    G = w1.shape[0]
    flat = local_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)[:cap]  # local pairs first, grouped by expert
    sizes = jnp.bincount(flat, length=G).astype(jnp.int32)  # the out-of-range id G is not counted
    kept = _capped_sizes(sizes, cap)
    out = _swiglu_rows(x[order // k], kept, w1, w3, w2, dtype)
    valid = jnp.arange(cap) < kept.sum()
    rows = jnp.where(valid[:, None], out, 0.0) * jnp.where(valid, topk_w.reshape(-1)[order], 0.0)[:, None]
    y = jnp.zeros((n, out.shape[1]), jnp.float32).at[order // k].add(rows)
    return y, (sizes.sum() - kept.sum()).astype(jnp.int32)


def _allgather_body(x, idx, topk_w, w1, w3, w2, *, cap, dtype, gather, tensor):
    """shard_map body of the all-gather scheme; `gather`: tokens are sharded over `expert` (else replicated)."""
    G = w1.shape[0]
    r = jax.lax.axis_index(EXPERT_AXIS)
    if gather:
        x, idx, topk_w = (jax.lax.all_gather(a, EXPERT_AXIS, tiled=True) for a in (x, idx, topk_w))
    local = (idx // G) == r
    local_idx = jnp.where(local, idx - r * G, G)
    y, dropped = _local_experts(x, local_idx, topk_w, w1, w3, w2, cap, dtype)
    if gather:
        y = jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)
    else:
        y = jax.lax.psum(y, EXPERT_AXIS)
    if tensor:
        y = jax.lax.psum(y, TENSOR_AXIS)
    return y, dropped


# ---- ragged all-to-all scheme ------------------------------------------------------------------------------------
def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`jax.lax.ragged_all_to_all` semantics built from an all-gather and a scatter (for XLA:CPU, which lacks the
    collective). operand [N, ...]; output [M, ...]; the four offset/size arrays int32 [axis size] (one slice per
    peer). Returns output with the slices peers sent here written in place; rows that would land past M are
    dropped. Costs an all-gather of operand: fine for tests and CPU, not meant for pods."""
    del recv_sizes  # implied by the senders' sizes
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)  # [ep, N, ...]
    in_off, sizes, out_off = (jax.lax.all_gather(a, axis_name)[:, me] for a in
                              (input_offsets, send_sizes, output_offsets))  # what each source sends here
    i = jnp.arange(operand.shape[0])[None, :]
    mine = (i >= in_off[:, None]) & (i < (in_off + sizes)[:, None])
    dest = jnp.where(mine, out_off[:, None] + i - in_off[:, None], output.shape[0])
    return output.at[dest.reshape(-1)].set(ops.reshape(-1, *operand.shape[1:]), mode="drop", unique_indices=True)


def _xla_ragged_all_to_all(*args, axis_name):
    return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)


def _ragged_all_to_all(*args, axis_name):
    """The real collective on TPU/GPU, the emulation on CPU (chosen when lowering). The real one types its
    result like `output`, so every argument is first marked with the common variance."""
    return jax.lax.platform_dependent(
        *_same_variance(*args), cpu=functools.partial(ragged_all_to_all_emulated, axis_name=axis_name),
        default=functools.partial(_xla_ragged_all_to_all, axis_name=axis_name))


def _ragged_body(x, idx, topk_w, w1, w3, w2, *, cap, dtype, ep, tensor, a2a):
    """shard_map body of the ragged all-to-all scheme (tokens sharded over `expert`)."""
    n, k = idx.shape
    G = w1.shape[0]
    me = jax.lax.axis_index(EXPERT_AXIS)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert, hence by owning device
    sent_e = flat[order]
    send = jnp.bincount(flat // G, length=ep).astype(jnp.int32)  # rows for each device
    S = jax.lax.all_gather(send, EXPERT_AXIS)  # [source, destination]
    dst_off = jnp.cumsum(S, axis=0) - S  # where each source's rows start in each destination's buffer
    src_off = jnp.cumsum(S, axis=1) - S  # where each source's rows for a destination start in its own buffer
    A = jnp.clip(cap - dst_off, 0, S)  # rows actually sent after the receiver's capacity
    a2a = functools.partial(a2a, axis_name=EXPERT_AXIS)
    fwd = (src_off[me], A[me], dst_off[me], A[:, me])  # input offsets, send sizes, output offsets, recv sizes
    recv_x = a2a(x[order // k].astype(dtype), jnp.zeros((cap, x.shape[1]), dtype), *fwd)
    recv_e = a2a((sent_e % G)[:, None], jnp.full((cap, 1), G, jnp.int32), *fwd)[:, 0]

    # Received rows come source by source; regroup them by local expert (padding rows carry id G: last).
    order2 = jnp.argsort(recv_e, stable=True)
    sizes = jnp.bincount(recv_e, length=G).astype(jnp.int32)
    out = _swiglu_rows(recv_x[order2], sizes, w1, w3, w2, dtype)
    valid = jnp.arange(cap) < sizes.sum()
    out = jnp.where(valid[:, None], out, 0.0)[_inverse_permutation(order2)]
    if tensor:
        out = jax.lax.psum(out, TENSOR_AXIS)

    back = (dst_off[:, me], A[:, me], src_off[:, me], A[me])
    res = a2a(out.astype(dtype), jnp.zeros((n * k, x.shape[1]), dtype), *back)  # dropped rows stay zero
    res = res[_inverse_permutation(order)].reshape(n, k, -1).astype(jnp.float32)
    y = jnp.einsum("nkd,nk->nd", res, topk_w.astype(jnp.float32))
    return y, (send.sum() - A[me].sum()).astype(jnp.int32)


# ---- entry point -------------------------------------------------------------------------------------------------
def _specs(mesh, N, D, w1_shape):
    tok = logical_to_mesh_spec(("tokens", None), mesh, (N, D))
    wspec = logical_to_mesh_spec(("expert", "expert_embed", "expert_mlp"), mesh, w1_shape)
    return tok, wspec


def _axes(entry):
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def routed_experts(config: ModelConfig, x, topk_idx, topk_w, w1, w3, w2, dtype, mesh=None):
    """Expert-parallel routed experts: the same contract as moe.py's expert functions, plus the drop count.

    x [N, D] in dtype (N = B * T, rows ordered like a [B, T] batch sharded on `batch`); topk_idx int32 [N, k];
    topk_w f32 [N, k]; w1, w3 [E, D, I], w2 [E, I, D] in dtype. `mesh`: defaults to the active one. Returns
    (float32 [N, D], int32 scalar: (token, expert) assignments dropped over capacity, 0 when dropless).
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    N, D = x.shape
    E, ep = w1.shape[0], mesh.shape[EXPERT_AXIS]
    if E % ep:
        raise ValueError(f"expert parallelism: num_experts={E} is not divisible by the expert mesh axis ({ep})")
    impl = config.moe_ep_impl
    tok, wspec = _specs(mesh, N, D, w1.shape)
    tok_axes = _axes(tok[0])
    n = N // math.prod(mesh.shape[a] for a in tok_axes)
    tensor = wspec[2] is not None
    gather = EXPERT_AXIS in tok_axes
    group_tokens = n * ep if gather else n  # tokens one device routes to its experts
    cap = capacity(config, group_tokens, ep)
    allgather = functools.partial(_allgather_body, cap=cap, dtype=dtype, gather=gather, tensor=tensor)
    ragged = functools.partial(_ragged_body, cap=cap, dtype=dtype, ep=ep, tensor=tensor,
                               a2a=_ragged_all_to_all)
    if not gather or impl == "allgather":
        body = allgather
    elif impl == "ragged_a2a":
        body = ragged
    else:
        def body(*args):
            return jax.lax.platform_dependent(*args, cpu=allgather, default=ragged)

    w2spec = P(wspec[0], wspec[2], wspec[1])
    tok_spec = P(tok[0], None)
    drop_axes = tuple(dict.fromkeys(tok_axes + (EXPERT_AXIS,)))
    fsdp = _axes(wspec[1])

    def wrapped(x, idx, topk_w, w1, w3, w2):
        if fsdp:  # gather the hidden dim here, layer by layer: its transpose reduce-scatters the weight grads
            w1, w3 = (jax.lax.all_gather(w, fsdp, axis=1, tiled=True) for w in (w1, w3))
            w2 = jax.lax.all_gather(w2, fsdp, axis=2, tiled=True)
        y, dropped = body(x, idx, topk_w, w1, w3, w2)
        return y, jax.lax.psum(dropped, drop_axes)

    fn = jax.shard_map(wrapped, mesh=mesh, in_specs=(tok_spec, tok_spec, tok_spec, wspec, wspec, w2spec),
                       out_specs=(tok_spec, P()))
    return fn(x, topk_idx, topk_w, w1, w3, w2)

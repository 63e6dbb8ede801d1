"""kda_context_parallel inside jax.shard_map on the simulated CPU devices against single-device kda_chunk.

The whole row goes through `kda_chunk` on one device; the same row, split over the `context` axis, goes through
the op; outputs, final states and every gradient (of a random projection of both) must agree. Tolerances are
error ratios: float32 1e-5 (o, state) and 1e-4 (gradients); bfloat16 those of test_kda_pallas (fla's bounds).
Compile time dominates: B=2, H=2, K=16, V=8, 32 tokens per shard in chunks of 16, and a jitted program compiled
at XLA's lowest backend optimisation level (it does not change what is computed).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.kda import kda, kda_chunk, kda_context_parallel, kda_step
from tests.conftest import error_ratio
from tests.pallas_kernels.lowering import jit_fast_compile
from tests.pallas_kernels.test_kda_ops import make_inputs

B, H, K, V = 2, 2, 16, 8
T_SHARD, CHUNK = 32, 16
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")

# Segment layouts per context size: (start, stop, id) spans, the rest padding (id 0); shards hold 32 tokens.
SEGMENTS = {
    1: [[(0, 10, 1), (10, 32, 2)],                       # one shard: the op is kda plus a zero correction
        [(5, 20, 3), (25, 32, 3)]],
    2: [[(0, 45, 1), (45, 64, 2)],                       # crosses the boundary at 32; a restart inside shard 1
        [(32, 40, 7), (40, 64, 8)]],                     # shard 0 all padding: the row's first segment starts in
                                                         # shard 1 (from initial_state); a restart inside shard 1
    4: [[(0, 40, 1), (40, 64, 2), (64, 100, 3)],         # a restart inside shard 1; a segment starting exactly at
                                                         # shard 2's first token and crossing 96; trailing padding
        [(20, 64, 5), (96, 110, 5), (110, 128, 6)]],     # leading padding; shard 2 all padding, after which the
                                                         # same id continues the state across it
    8: [[(0, 40, 1), (40, 64, 2), (64, 100, 3), (160, 256, 4)],  # as n=4, then shard 4 all padding and a new id
                                                                  # exactly at shard 5 spanning shards 5-7
        [(96, 150, 5), (192, 230, 5), (230, 256, 6)]],   # shards 0-2 all padding (initial_state enters shard 3);
                                                         # shard 5 all padding inside segment 5
}


def segment_ids(n):
    seg = np.zeros((B, n * T_SHARD), np.int32)
    for row, spans in enumerate(SEGMENTS[n]):
        for start, stop, sid in spans:
            seg[row, start:stop] = sid
    return jnp.asarray(seg)


def context_mesh(n, data=1):
    devices = np.array(jax.devices()[: data * n])
    return Mesh(devices.reshape(data, n), ("data", "context"))


def single_device(args, cot, seg, with_state=True):
    """(o, final_state, grads) of kda_chunk on the whole rows."""
    def f(q, k, v, g, beta, s0):
        return kda_chunk(q, k, v, g, beta, initial_state=s0 if with_state else None, output_final_state=True,
                         segment_ids=seg, chunk_size=CHUNK)

    (o, s), vjp = jax.vjp(f, *args)
    return o, s, vjp(cot)


def context_parallel(args, cot, seg, mesh, *, with_state=True, layout="contiguous", batch_axis=None,
                     state_varies=False):
    """(o, final_state, grads) of kda_context_parallel with the rows split over the mesh's `context` axis.
    state_varies: give the op an initial state typed as varying over `context` (each shard its own copy)."""
    seq, row = P(batch_axis, "context"), P(batch_axis)

    def local(q, k, v, g, beta, s0, seg):
        if state_varies:
            s0 = jax.lax.pcast(s0, ("context",), to="varying")
        return kda_context_parallel(q, k, v, g, beta, axis_name="context", initial_state=s0 if with_state else None,
                                    output_final_state=True, segment_ids=seg, chunk_size=CHUNK, layout=layout)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(seq,) * 5 + (row, seq), out_specs=(seq, row))

    @jit_fast_compile
    def run(args, cot, seg):
        (o, s), vjp = jax.vjp(lambda *a: sharded(*a, seg), *args)
        return o, s, vjp(cot)

    return run(args, cot, seg)


def assert_agree(ref, got, tol_value=1e-5, tol_grad=1e-4, with_state=True):
    o_r, s_r, g_r = ref
    o_c, s_c, g_c = got
    assert o_c.dtype == o_r.dtype and s_c.dtype == jnp.float32
    to32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    assert error_ratio(to32(o_r), to32(o_c)) <= tol_value, ("o", error_ratio(to32(o_r), to32(o_c)))
    assert error_ratio(s_r, s_c) <= tol_value, ("final state", error_ratio(s_r, s_c))
    for name, a, b in zip(GRAD_NAMES, g_r, g_c):
        if name == "dh0" and not with_state:
            continue
        tol = tol_grad[name] if isinstance(tol_grad, dict) else tol_grad
        assert b.dtype == a.dtype, name
        assert error_ratio(to32(a), to32(b)) <= tol, (name, error_ratio(to32(a), to32(b)))


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_segments_crossing_shards_match_one_device(n):
    args, cot = make_inputs(n, T=n * T_SHARD)
    seg = segment_ids(n)
    assert_agree(single_device(args, cot, seg), context_parallel(args, cot, seg, context_mesh(n)))


def test_no_segments_and_no_initial_state():
    n = 4
    args, cot = make_inputs(14, T=n * T_SHARD)
    ref = single_device(args, cot, None, with_state=False)
    got = context_parallel(args, cot, None, context_mesh(n), with_state=False)
    assert_agree(ref, got, with_state=False)
    assert np.all(np.asarray(got[2][5]) == 0)   # no initial state given: it gets no gradient


def test_without_final_state_returns_none():
    args, _ = make_inputs(5, T=4 * T_SHARD)

    def local(q, k, v, g, beta):
        o, s = kda_context_parallel(q, k, v, g, beta, axis_name="context", chunk_size=CHUNK)
        assert s is None
        return o

    seq = P(None, "context")
    sharded = jax.shard_map(local, mesh=context_mesh(4), in_specs=(seq,) * 5, out_specs=seq)
    o = jax.eval_shape(sharded, *args[:5])
    assert o.shape == args[2].shape and o.dtype == args[2].dtype
    grads = jax.eval_shape(jax.grad(lambda *a: sharded(*a).sum(), argnums=tuple(range(5))), *args[:5])
    assert [x.shape for x in grads] == [x.shape for x in args[:5]]


def to_zigzag(x, n):
    """[B, T, ...] in sequence order -> the zigzag layout: 2n pieces, shard i holds pieces i and 2n - 1 - i."""
    pieces = jnp.split(x, 2 * n, axis=1)
    return jnp.concatenate([p for i in range(n) for p in (pieces[i], pieces[2 * n - 1 - i])], axis=1)


def from_zigzag(x, n):
    pieces = jnp.split(x, 2 * n, axis=1)
    order = [None] * (2 * n)
    for i in range(n):
        order[i], order[2 * n - 1 - i] = pieces[2 * i], pieces[2 * i + 1]
    return jnp.concatenate(order, axis=1)


def test_zigzag_layout_matches_one_device():
    n = 4
    args, cot = make_inputs(21, T=n * T_SHARD)
    seg = segment_ids(n)
    ref = single_device(args, cot, seg)
    zz = lambda x: to_zigzag(x, n)  # noqa: E731
    o, s, grads = context_parallel(tuple(map(zz, args[:5])) + args[5:], (zz(cot[0]), cot[1]), zz(seg),
                                   context_mesh(n), layout="zigzag")
    unzz = lambda x: from_zigzag(x, n)  # noqa: E731
    assert_agree(ref, (unzz(o), s, tuple(map(unzz, grads[:5])) + grads[5:]))


def test_two_dimensional_mesh():
    n = 4   # mesh data=2 x context=4: rows split over data, time over context
    args, cot = make_inputs(31, T=n * T_SHARD)
    seg = segment_ids(n)
    # the initial state as a per-shard copy (only shard 0's is read; pcast's transpose sums the copies' gradients)
    assert_agree(single_device(args, cot, seg), context_parallel(args, cot, seg, context_mesh(n, data=2),
                                                                 batch_axis="data", state_varies=True))


def test_bfloat16():
    n = 4
    args, cot = make_inputs(41, T=n * T_SHARD, dtype=jnp.bfloat16)
    seg = segment_ids(n)
    # float32 math on the same rounded inputs, as test_kda_pallas compares
    ref_args = tuple(x.astype(jnp.float32) for x in args)
    o, s, grads = single_device(ref_args, cot, seg)
    tols = dict(dq=8e-3, dk=8e-3, dv=8e-3, dh0=8e-3, dg=2e-2, dbeta=2e-2)
    got = context_parallel(args, (cot[0].astype(jnp.bfloat16), cot[1]), seg, context_mesh(n))
    ref = (o.astype(jnp.bfloat16), s, tuple(g.astype(a.dtype) for g, a in zip(grads, args)))
    assert_agree(ref, got, tol_value=5e-3, tol_grad=tols)


def test_bad_calls_are_rejected():
    args, _ = make_inputs(1, T=30)
    with pytest.raises(ValueError, match="axis_name 'context' is not a mesh axis"):
        kda_context_parallel(*args[:5], axis_name="context")
    with pytest.raises(ValueError, match="layout must be one of"):
        kda_context_parallel(*args[:5], axis_name="context", layout="ring")
    seq = P(None, "context")
    zigzag = functools.partial(kda_context_parallel, axis_name="context", layout="zigzag")
    with pytest.raises(ValueError, match="even local length"):   # 15 tokens per shard
        jax.shard_map(lambda *a: zigzag(*a)[0], mesh=context_mesh(2), in_specs=(seq,) * 5, out_specs=seq)(*args[:5])
    with pytest.raises(ValueError, match="beta must be"):
        kda_context_parallel(*args[:4], args[4][..., None], axis_name="context")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_with_the_pallas_kernels_inside_shard_map(platform):
    """impl="auto" inside shard_map lowers to the Pallas kernels for TPU and GPU; the kernels declare how their
    outputs vary over the manual axes (shard_map's check_vma)."""
    n, T = 4, 4 * 64
    context = contextlib.nullcontext()
    if platform == "cuda":   # an abstract GPU mesh stands in for the devices (see lowering.count_pallas_kernels)
        gpu = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
        mesh = AbstractMesh((1, n), ("data", "context"), abstract_device=gpu)
        context = jax.sharding.use_abstract_mesh(mesh)
    else:
        mesh = context_mesh(n)
    seq, row = P(None, "context"), P()

    def spec(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, sharding))

    bf16 = jnp.bfloat16
    specs = (spec((1, T, 2, 128), bf16, seq), spec((1, T, 2, 128), bf16, seq), spec((1, T, 2, 128), bf16, seq),
             spec((1, T, 2, 128), jnp.float32, seq), spec((1, T, 2), jnp.float32, seq),
             spec((1, 2, 128, 128), jnp.float32, row), spec((1, T), jnp.int32, seq))

    def local(q, k, v, g, beta, s0, seg):
        return kda_context_parallel(q, k, v, g, beta, axis_name="context", initial_state=s0, segment_ids=seg,
                                    output_final_state=True)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(seq,) * 5 + (row, seq), out_specs=(seq, row))

    def loss(*a):
        o, s = sharded(*a)
        return o.astype(jnp.float32).sum() + s.sum()

    with context:
        text = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*specs).lower(
            lowering_platforms=(platform,)).as_text()
    # forward: the zero-start run; backward: the local run from the true start state, again and its VJP
    assert text.count("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") == 3
    assert text.count("collective_permute") >= 6   # the scan's rounds and shift, forward and backward


@pytest.mark.parametrize("impl", ["auto", "chunk", "pallas", "reference"])
def test_kda_ops_trace_inside_shard_map(impl):
    """Every KDA implementation, forward and backward, and the decode step trace inside shard_map (check_vma on):
    a zero initial state must vary like the inputs (scan carries keep their type) and kernel outputs must declare
    how they vary. Tracing is enough to find a mismatch; no compile."""
    args, _ = make_inputs(2, T=40)
    mesh = context_mesh(2)   # rows split over the axis named "context" here: any manual axis will do
    rows = P("context")

    def loss(q, k, v, g, beta, s0):
        o, s = jax.shard_map(
            lambda *a: kda(*a, output_final_state=True, chunk_size=CHUNK, impl=impl),
            mesh=mesh, in_specs=(rows,) * 5, out_specs=(rows, rows))(q, k, v, g, beta)
        o_step, s_step = jax.shard_map(
            lambda *a: kda_step(*a, impl="reference" if impl in ("chunk", "reference") else impl),
            mesh=mesh, in_specs=(rows,) * 6, out_specs=(rows, rows))(q[:, 0], k[:, 0], v[:, 0], g[:, 0],
                                                                     beta[:, 0], s0)
        return o.sum() + s.sum() + o_step.sum() + s_step.sum()

    grads = jax.eval_shape(jax.grad(loss, argnums=tuple(range(6))), *args)
    assert [x.shape for x in grads] == [x.shape for x in args]

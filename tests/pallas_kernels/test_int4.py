"""INT4 weight-only quantization: packing, quantization, compressed-tensors layout, Pallas/XLA matmuls.

References are plain numpy from the math (float64 matmuls, a numpy absmax quantizer, a numpy writer of the
compressed-tensors bit layout). Pallas kernels run interpreted on CPU at small shapes; TPU and GPU portability is
checked by lowering. Tolerances are error ratios ||ref - x|| / ||ref||.
"""

import contextlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.int4 import (
    Int4Weight,
    dequantize_int4,
    from_compressed_tensors,
    int4_matmul,
    int4_ragged_dot,
    pack_int4,
    quantize_int4,
    to_compressed_tensors,
    unpack_int4,
)
from pallas_kernels.int4 import grouped as G
from pallas_kernels.int4 import matmul as MM
from pallas_kernels.int4.common import Blocks
from tests.conftest import error_ratio


def _np_quantize(w, g=32):
    """Symmetric absmax per group of g rows (axis -2): returns (q int [..., K, N], scale f64 [..., K/g, N])."""
    w = np.asarray(w, np.float64)
    K, N = w.shape[-2:]
    wg = w.reshape(*w.shape[:-2], K // g, g, N)
    s = (np.abs(wg).max(axis=-2) / 7).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    sd = s[..., None, :]
    q = np.where(sd > 0, np.round(wg / np.where(sd > 0, sd, 1)), 0).clip(-7, 7)
    return q.reshape(w.shape).astype(np.int64), s


def _np_dequant(q, s, g=32):
    return q.astype(np.float64) * np.repeat(s, g, axis=-2)


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


# ---------------------------------------------------------------- packing and quantization

def test_pack_round_trip_all_levels_and_nibble_order():
    q = np.arange(-8, 8).reshape(16, 1) * np.array([1, -1, 1]) % 16
    q = np.where(q > 7, q - 16, q).astype(np.int8)  # every value -8..7 in every column, in varied order
    packed = pack_int4(jnp.asarray(q))
    assert packed.dtype == jnp.uint8 and packed.shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), q)
    # Low nibble = even row, high nibble = odd row, two's complement: rows (-8, -7) -> 0x98.
    assert int(packed[0, 0]) == ((-7 & 15) << 4) | (-8 & 15)
    with pytest.raises(ValueError, match="even"):
        pack_int4(jnp.zeros((3, 4), jnp.int8))


def test_quantize_matches_numpy_and_uses_15_levels():
    w = _rand(0, (2, 64, 48)) * jnp.linspace(0.1, 3.0, 48)  # leading expert dim, varied column scales
    w = w.at[0, :32, 5].set(0.0)  # one all-zero group
    qw = quantize_int4(w)
    q_ref, s_ref = _np_quantize(w)
    assert qw.packed.shape == (2, 32, 48) and qw.scale.shape == (2, 2, 48) and qw.scale.dtype == jnp.bfloat16
    assert qw.shape == (2, 64, 48) and qw.group_size == 32
    q = np.asarray(unpack_int4(qw.packed))
    np.testing.assert_array_equal(q, q_ref)
    assert set(np.unique(q)) == set(range(-7, 8))
    np.testing.assert_array_equal(np.asarray(qw.scale, np.float64), s_ref)
    wd = np.asarray(dequantize_int4(qw))
    np.testing.assert_array_equal(wd, _np_dequant(q_ref, s_ref))  # exact: 4-bit x bf16 fits in f32
    assert np.all(np.isfinite(wd)) and np.all(wd[0, :32, 5] == 0) and float(qw.scale[0, 0, 5]) == 0.0
    assert dequantize_int4(qw, jnp.bfloat16).dtype == jnp.bfloat16
    leaves = jax.tree_util.tree_leaves(qw)
    assert len(leaves) == 2  # a pytree of (packed, scale); shape and group_size are static


def test_quantization_error_and_storage():
    w = _rand(1, (256, 512))
    qw = quantize_int4(w)
    ratio = error_ratio(w, dequantize_int4(qw))
    print(f"\nINT4 g32 quantization error ratio of Gaussian weights: {ratio:.4f}")
    assert 0.07 < ratio < 0.13  # symmetric absmax over 15 levels
    bf16_bytes = w.size * 2
    assert qw.nbytes == 256 * 512 // 2 + (256 // 32) * 512 * 2
    assert bf16_bytes / qw.nbytes >= 3.5


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(jnp.ones((48, 8)))
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(jnp.ones((48, 8)), group_size=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        to_compressed_tensors(quantize_int4(jnp.ones((4, 8)), group_size=2))
    qw = quantize_int4(jnp.ones((64, 16)))
    with pytest.raises(ValueError, match="impl"):
        int4_matmul(jnp.ones((2, 64)), qw, impl="cuda")
    with pytest.raises(ValueError, match="K_in=64"):
        int4_matmul(jnp.ones((2, 32)), qw)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        int4_matmul(jnp.ones((2, 64), jnp.int32), qw)
    with pytest.raises(ValueError, match="ragged"):
        int4_matmul(jnp.ones((2, 64)), quantize_int4(jnp.ones((2, 64, 16))))
    with pytest.raises(ValueError, match="group_sizes"):
        int4_ragged_dot(jnp.ones((2, 64)), quantize_int4(jnp.ones((2, 64, 16))), jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="block_sizes"):
        int4_matmul(jnp.ones((2, 64)), qw, block_sizes=(8, 16, 48))


# ---------------------------------------------------------------- compressed-tensors layout

def _np_ct_pack(q_nk):
    """The pack-quantized layout from its definition: [N, K] ints -> int32 [N, K/8], word j holds columns
    8j..8j+7, column 8j+i in bits 4i..4i+3, each stored as q + 8."""
    u = (q_nk + 8).astype(np.uint64)
    N, K = u.shape
    words = np.zeros((N, K // 8), np.uint64)
    for i in range(8):
        words |= u[:, i::8] << np.uint64(4 * i)
    return words.astype(np.uint32).view(np.int32)


def test_compressed_tensors_layout_and_round_trips():
    # A hand-computed word: columns 0..7 = -7..0 -> stored 1..8 -> 0x87654321.
    q = np.arange(-7, 1).reshape(8, 1)  # [K=8, N=1]
    qw = Int4Weight(pack_int4(jnp.asarray(q, jnp.int8)), jnp.ones((1, 1), jnp.bfloat16), (8, 1), 8)
    ct = to_compressed_tensors(qw)
    assert ct["weight_packed"].dtype == jnp.int32 and int(ct["weight_packed"][0, 0]) == 0x87654321 - 2**32

    w = _rand(2, (3, 64, 24))  # experts, K=64, N=24
    qw = quantize_int4(w)
    ct = to_compressed_tensors(qw)
    assert ct["weight_packed"].shape == (3, 24, 8) and ct["weight_scale"].shape == (3, 24, 2)
    np.testing.assert_array_equal(ct["weight_shape"], [24, 64])
    assert ct["weight_shape"].dtype == np.int64 and ct["weight_scale"].dtype == jnp.bfloat16
    q_ref, s_ref = _np_quantize(w)
    for e in range(3):
        np.testing.assert_array_equal(np.asarray(ct["weight_packed"][e]), _np_ct_pack(q_ref[e].T))
        np.testing.assert_array_equal(np.asarray(ct["weight_scale"][e], np.float64), s_ref[e].T)
    back = from_compressed_tensors(**ct)
    assert back.shape == qw.shape and back.group_size == 32
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(qw.packed))
    np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(qw.scale))

    # The other way: arbitrary words (every nibble, including the -8 code) survive CT -> Int4Weight -> CT.
    words = jax.random.randint(jax.random.PRNGKey(3), (16, 4), -2**31, 2**31 - 1, dtype=jnp.int32)
    scale = _rand(4, (16, 1), jnp.bfloat16)
    qw2 = from_compressed_tensors(words, scale, np.array([16, 32]))
    ct2 = to_compressed_tensors(qw2)
    np.testing.assert_array_equal(np.asarray(ct2["weight_packed"]), np.asarray(words))
    np.testing.assert_array_equal(np.asarray(ct2["weight_scale"]), np.asarray(scale))
    # Decoding matches the layout's own definition: (nibble - 8) * scale.
    u = np.asarray(words).view(np.uint32)
    nib = np.stack([(u >> (4 * i)) & 15 for i in range(8)], axis=-1).reshape(16, 32).astype(np.int64) - 8
    ref = nib * np.asarray(scale, np.float64)
    np.testing.assert_array_equal(np.asarray(dequantize_int4(qw2)), ref.T)
    with pytest.raises(ValueError, match="weight_packed"):
        from_compressed_tensors(words[:, :3], scale, np.array([16, 32]))


# ---------------------------------------------------------------- dense matmul

@pytest.fixture(scope="module")
def dense():
    w = _rand(10, (512, 256))
    qw = quantize_int4(w)
    q, s = _np_quantize(w)
    return qw, _np_dequant(q, s)


@pytest.mark.parametrize("M", [1, 3, 17])
def test_int4_matmul_pallas_matches_dequantized_matmul(dense, M):
    qw, wd = dense
    x = _rand(M, (M, 512))
    ref = np.asarray(x, np.float64) @ wd
    # Several N and K steps (K accumulation in scratch) and M padded to the block.
    y = int4_matmul(x, qw, impl="pallas", block_sizes=(8, 128, 256))
    assert y.shape == (M, 256) and y.dtype == jnp.float32
    assert error_ratio(ref, y) <= 1e-5
    assert error_ratio(ref, int4_matmul(x, qw, impl="xla")) <= 1e-5


def test_int4_matmul_default_blocks_leading_dims_bf16(dense):
    qw, wd = dense
    x = _rand(20, (2, 3, 512))
    ref = np.asarray(x, np.float64) @ wd
    y = int4_matmul(x, qw, impl="pallas")
    assert y.shape == (2, 3, 256) and error_ratio(ref, y) <= 1e-5
    assert error_ratio(ref, int4_matmul(x, qw)) <= 1e-5  # "auto" on CPU = XLA path
    xb = x.astype(jnp.bfloat16)
    yb = int4_matmul(xb, qw, impl="pallas")
    yx = int4_matmul(xb, qw, impl="xla")
    assert yb.dtype == jnp.bfloat16 and yx.dtype == jnp.bfloat16
    ref_b = np.asarray(xb, np.float64) @ wd
    # bf16 weights after dequant (8-bit mantissa) and a bf16 result: ~1e-3 relative.
    assert error_ratio(ref_b, yb) <= 1e-2 and error_ratio(ref_b, yx) <= 1e-2
    assert error_ratio(yx, yb) <= 1e-2


def test_int4_matmul_grad_x(dense):
    qw, wd = dense
    x, dy = _rand(30, (5, 512)), _rand(31, (5, 256))
    ref = np.asarray(dy, np.float64) @ wd.T
    loss = lambda impl: lambda x: jnp.sum(int4_matmul(x, qw, impl=impl, block_sizes=(8, 128, 256)) * dy)  # noqa
    g_pallas = jax.grad(loss("pallas"))(x)
    g_xla = jax.grad(loss("xla"))(x)
    assert error_ratio(ref, g_pallas) <= 1e-5 and error_ratio(ref, g_xla) <= 1e-5
    assert error_ratio(g_xla, g_pallas) <= 1e-5
    # The weights are frozen: their cotangent (scale) is zero.
    gw = jax.grad(lambda s: jnp.sum(int4_matmul(x, Int4Weight(qw.packed, s, qw.shape, 32), impl="xla")))(qw.scale)
    assert not np.any(np.asarray(gw, np.float32))


def test_triton_style_kernels_interpreted(dense):
    """The GPU ("loop") kernel bodies, run by the interpreter: forward and transposed, several loop steps."""
    qw, wd = dense
    x, dy = _rand(40, (17, 512)), _rand(41, (17, 256))
    b = Blocks(16, 64, 128)
    y = MM.pallas_fwd(x, qw.packed, qw.scale, style="loop", interpret=True, blocks=b)
    assert error_ratio(np.asarray(x, np.float64) @ wd, y) <= 1e-5
    dx = MM.pallas_bwd(dy, qw.packed, qw.scale, style="loop", interpret=True, blocks=b)
    assert error_ratio(np.asarray(dy, np.float64) @ wd.T, dx) <= 1e-5


def test_pallas_not_interpreted_is_refused_on_cpu(dense):
    qw, _ = dense
    with pytest.raises(Exception, match="(?i)interpret"):
        jax.block_until_ready(int4_matmul(jnp.ones((2, 512)), qw, impl="pallas", interpret=False))


# ---------------------------------------------------------------- grouped (MoE) matmul

@pytest.fixture(scope="module")
def experts():
    w = _rand(50, (4, 256, 256))
    qw = quantize_int4(w)
    q, s = _np_quantize(w)
    return qw, _np_dequant(q, s)


def _loop_over_experts(a, wd, sizes, transpose=False):
    out = np.zeros((a.shape[0], wd.shape[1] if transpose else wd.shape[2]))
    start = 0
    for e, n in enumerate(sizes):
        w = wd[e].T if transpose else wd[e]
        out[start:start + n] = np.asarray(a, np.float64)[start:start + n] @ w
        start += n
    return out  # rows past sum(sizes) stay zero, as in jax.lax.ragged_dot


SIZES = [10, 0, 19, 5]  # an expert with zero rows, experts sharing row tiles; M=45 leaves 11 rows past the groups
M_ROWS = 45


def test_int4_ragged_dot_matches_loop_over_experts(experts):
    qw, wd = experts
    x = _rand(51, (M_ROWS, 256))
    gs = jnp.asarray(SIZES, jnp.int32)
    ref = _loop_over_experts(x, wd, SIZES)
    y = int4_ragged_dot(x, qw, gs, impl="pallas", block_sizes=(8, 128, 128))
    assert y.shape == (M_ROWS, 256) and error_ratio(ref, y) <= 1e-5
    assert not np.any(np.asarray(y)[34:])  # including row tile 5, which no expert touches
    assert error_ratio(ref, int4_ragged_dot(x, qw, gs)) <= 1e-5  # XLA path
    y_loop = G.pallas_fwd(x, qw.packed, qw.scale, gs, style="loop", interpret=True, blocks=Blocks(16, 128, 128))
    assert error_ratio(ref, y_loop) <= 1e-5
    xb = x.astype(jnp.bfloat16)
    yb = int4_ragged_dot(xb, qw, gs, impl="pallas")
    assert yb.dtype == jnp.bfloat16 and error_ratio(_loop_over_experts(xb, wd, SIZES), yb) <= 1e-2


def test_int4_ragged_dot_grad_x(experts):
    qw, wd = experts
    x, dy = _rand(52, (M_ROWS, 256)), _rand(53, (M_ROWS, 256))
    gs = jnp.asarray(SIZES, jnp.int32)
    ref = _loop_over_experts(dy, wd, SIZES, transpose=True)
    for impl in ("pallas", "xla"):
        g = jax.grad(lambda x: jnp.sum(int4_ragged_dot(x, qw, gs, impl=impl, block_sizes=(8, 128, 128)) * dy))(x)
        assert error_ratio(ref, g) <= 1e-5, impl
    dx = G.pallas_bwd(dy, qw.packed, qw.scale, gs, style="loop", interpret=True, blocks=Blocks(16, 64, 128))
    assert error_ratio(ref, dx) <= 1e-5


def test_work_items_cover_every_tile_in_order():
    items, n_used = G.work_items(jnp.asarray(SIZES), M_ROWS, 6, 8)
    tile, expert, lo, hi, first, last = (np.asarray(a) for a in items)
    assert len(tile) == 6 + 4 - 1 and np.all(np.diff(tile) >= 0)
    n = int(n_used)  # 7 (tile, expert) pairs with rows + 1 item for the untouched tile 5
    assert n == 8 and set(tile[:n]) == set(range(6)) and first[:n].sum() == 6 and last[:n].sum() == 6
    assert last[n - 1] == 1 and lo[n - 1] == hi[n - 1]
    real = lo < hi
    # (tile, expert) pairs with rows: tiles 0,1 expert 0; 1,2,3 expert 2; 3,4 expert 3.
    assert list(zip(tile[real], expert[real])) == [(0, 0), (1, 0), (1, 2), (2, 2), (3, 2), (3, 3), (4, 3)]


# ---------------------------------------------------------------- portability: lowering for TPU and GPU

def _lowering_context(platform):
    """JAX >= 0.12 lowers Pallas for GPU only under an abstract GPU device; harmless on 0.10."""
    if platform != "cuda":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.mark.parametrize("platform,marker", [("tpu", "tpu_custom_call"), ("cuda", "xla.gpu.triton")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_tpu_and_gpu(platform, marker, dtype):
    qw = quantize_int4(_rand(60, (512, 256)))
    qe = quantize_int4(_rand(61, (3, 256, 128)))
    gs = jnp.asarray([7, 0, 10], jnp.int32)

    def dense(x):  # forward and backward kernels in one program
        y, vjp = jax.vjp(lambda x: int4_matmul(x, qw, impl="pallas"), x)
        return y, vjp(y)[0]

    def grouped(x, gs):
        y, vjp = jax.vjp(lambda x: int4_ragged_dot(x, qe, gs, impl="pallas"), x)
        return y, vjp(y)[0]

    def lower(fn, *args):
        with _lowering_context(platform):
            return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()

    assert lower(dense, jax.ShapeDtypeStruct((17, 512), dtype)).count(marker) >= 2
    assert lower(grouped, jax.ShapeDtypeStruct((17, 256), dtype), gs).count(marker) >= 2
    # "auto" picks the kernel on this platform (the XLA path is only the CPU default).
    assert marker in lower(lambda x: int4_matmul(x, qw), jax.ShapeDtypeStruct((4, 512), dtype))

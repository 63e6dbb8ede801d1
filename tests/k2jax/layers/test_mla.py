"""MLA (NoPE and RoPE/YaRN with q LoRA) and RoPE against plain float64 numpy transcriptions of the math.

The references here are written from the formulas (kimi_linear.md section 3; DeepSeek-V3 HF semantics for YaRN
and the rope channel layout), not by calling k2jax code: per-head expanded K/V, an explicit causal softmax loop,
rotation of interleaved pairs as complex numbers.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.layers.linear import cpu_paths_off
from k2jax.layers.mla import MLACache, MultiHeadLatentAttention
from k2jax.layers.rope import apply_rope, rope_frequencies, softmax_scale
from pallas_kernels.attention import expanded_pays_off
from tests.conftest import error_ratio
from tests.pallas_kernels.lowering import count_pallas_kernels

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_nope():
    return k2jax.load_config("tiny")


def tiny_rope(rope_scaling=YARN):
    return tiny_nope().replace(mla_use_nope=False, q_lora_rank=16, rope_scaling=rope_scaling)


CONFIGS = {
    "nope": tiny_nope,
    "rope_yarn": tiny_rope,
    "rope_yarn_no_all_dim": lambda: tiny_rope({**YARN, "mscale_all_dim": 0.0}),
    "rope_plain": lambda: tiny_rope(None),
}


def make_mla(cfg, seed=0):
    """An MLA with O(1) random weights (so softmax is far from uniform) and non-trivial norm weights."""
    m = MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 100)
    for path, var in nnx.iter_graph(m):
        if isinstance(var, nnx.Param):
            key, sub = jax.random.split(key)
            noise = jax.random.normal(sub, var.shape, jnp.float32)
            val = noise / math.sqrt(var.shape[0]) if len(var.shape) == 2 else 1.0 + 0.2 * noise
            var[...] = val.astype(var[...].dtype)
    return m


def params64(m):
    out = {}
    for path, var in nnx.iter_graph(m):
        if isinstance(var, nnx.Param):
            out[path[0]] = np.asarray(var[...], np.float64)
    return out


# ---- numpy float64 references ----------------------------------------------------------------------------------
def ref_yarn(dim, base, factor, orig_max, beta_fast, beta_slow, mscale, mscale_all_dim):
    """DeepSeek-V3 YaRN: inverse frequencies and the cos/sin magnitude factor, from the formulas."""
    def m(s, a):
        return 1.0 if s <= 1 else 0.1 * a * np.log(s) + 1.0

    def corr_dim(n_rot):
        return dim * np.log(orig_max / (n_rot * 2 * np.pi)) / (2 * np.log(base))

    low = max(int(np.floor(corr_dim(beta_fast))), 0)
    high = min(int(np.ceil(corr_dim(beta_slow))), dim - 1)
    if low == high:
        high += 0.001
    j = np.arange(dim // 2, dtype=np.float64)
    keep = 1.0 - np.clip((j - low) / (high - low), 0.0, 1.0)  # 1 = keep the original frequency
    extra = 1.0 / base ** (2 * j / dim)
    inter = 1.0 / (factor * base ** (2 * j / dim))
    return inter * (1 - keep) + extra * keep, m(factor, mscale) / m(factor, mscale_all_dim)


def ref_freqs(cfg):
    R = cfg.qk_rope_head_dim
    if cfg.rope_scaling is None:
        return 1.0 / cfg.rope_theta ** (np.arange(0, R, 2) / R), 1.0
    rs = cfg.rope_scaling
    return ref_yarn(R, cfg.rope_theta, rs["factor"], rs["original_max_position_embeddings"], rs["beta_fast"],
                    rs["beta_slow"], rs["mscale"], rs["mscale_all_dim"])


def ref_scale(cfg):
    s = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs and rs.get("mscale_all_dim"):
        s *= (0.1 * rs["mscale_all_dim"] * np.log(rs["factor"]) + 1) ** 2
    return s


def ref_rotate_pairs(x, pos, inv_freq, mscale):
    """Interleaved-pair rotation as complex multiplication; result kept in interleaved (checkpoint) order.
    x [..., T, R] with pos [..., T]."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * pos[..., None] * inv_freq) * mscale
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def ref_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def ref_mla(p, cfg, x, segment_ids=None, positions=None):
    """Expanded MLA in float64 with an explicit per-(row, head, query) softmax loop."""
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    H, n, P, dv, R = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                      cfg.kv_lora_rank)
    seg = np.ones((B, T), int) if segment_ids is None else np.asarray(segment_ids)
    pos = np.broadcast_to(np.arange(T), (B, T)) if positions is None else np.asarray(positions)
    if cfg.q_lora_rank is None:
        q = x @ p["q_proj"]
    else:
        q = ref_rms(x @ p["q_a_proj"], p["q_a_layernorm"], cfg.mla_latent_norm_eps) @ p["q_b_proj"]
    q = q.reshape(B, T, H, n + P)
    kva = x @ p["kv_a_proj_with_mqa"]
    c = ref_rms(kva[..., :R], p["kv_a_layernorm"], cfg.mla_latent_norm_eps)
    k_pe = kva[..., R:]  # [B, T, P], shared by the heads
    kv = (c @ p["kv_b_proj"]).reshape(B, T, H, n + dv)
    q_pe = q[..., n:]
    if not cfg.mla_use_nope:
        inv_freq, ms = ref_freqs(cfg)
        q_pe = np.stack([ref_rotate_pairs(q_pe[:, :, h], pos, inv_freq, ms) for h in range(H)], axis=2)
        k_pe = ref_rotate_pairs(k_pe, pos, inv_freq, ms)
    scale = ref_scale(cfg)
    o = np.zeros((B, T, H, dv))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                if seg[b, t] == 0:
                    continue
                keys = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
                sc = np.array([(q[b, t, h, :n] @ kv[b, s, h, :n] + q_pe[b, t, h] @ k_pe[b, s]) * scale
                               for s in keys])
                w = np.exp(sc - sc.max())
                w /= w.sum()
                o[b, t, h] = sum(wi * kv[b, s, h, n:] for wi, s in zip(w, keys))
    return o.reshape(B, T, H * dv) @ p["o_proj"]


def rand_x(cfg, B, T, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, cfg.hidden_size), jnp.float32)


def segment_positions(seg):
    """Per-segment positions (restart at each new id), as the caller passes them."""
    seg = np.asarray(seg)
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    return jnp.asarray(pos, jnp.int32)


# ---- RoPE / YaRN -----------------------------------------------------------------------------------------------
def test_yarn_frequencies_hand_values():
    # dim 8, theta 1e4, L0 64: d(32) < 0 -> low 0; d(1) = 8 ln(64 / 2pi) / (2 ln 1e4) ~ 1.008 -> high 2.
    # ramp = [0, .5, 1, 1]: index 0 kept, index 1 half-blended, 2 and 3 divided by the factor 4.
    inv_freq, attn = rope_frequencies(tiny_rope())
    np.testing.assert_allclose(inv_freq, [1.0, 0.1 * 0.5 + 0.1 / 4 * 0.5, 0.01 / 4, 0.001 / 4], rtol=1e-6)
    assert attn == pytest.approx(1.0)  # mscale == mscale_all_dim
    assert inv_freq.dtype == np.float32


@pytest.mark.parametrize("name", ["tiny_yarn", "tiny_yarn_mscale", "tiny_plain", "kimi_k2", "k2_0905"])
def test_rope_frequencies_match_formulas(name):
    cfg = {
        "tiny_yarn": tiny_rope(),
        "tiny_yarn_mscale": tiny_rope({**YARN, "mscale": 2.0, "mscale_all_dim": 0.5, "beta_fast": 8.0}),
        "tiny_plain": tiny_rope(None),
        "kimi_k2": k2jax.load_config("kimi_k2"),
        "k2_0905": k2jax.load_config("kimi_k2").replace(
            rope_scaling={**k2jax.load_config("kimi_k2").rope_scaling, "factor": 64.0}),
    }[name]
    inv_freq, attn = rope_frequencies(cfg)
    ref_inv, ref_attn = ref_freqs(cfg)
    assert inv_freq.shape == (cfg.qk_rope_head_dim // 2,)
    np.testing.assert_allclose(inv_freq, ref_inv, rtol=2e-7)
    assert attn == pytest.approx(ref_attn, rel=1e-12)
    if name == "tiny_yarn_mscale":
        assert attn == pytest.approx((0.2 * math.log(4) + 1) / (0.05 * math.log(4) + 1))


def test_yarn_missing_keys_use_deepseek_defaults():
    # Absent keys: beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim 0.
    cfg = tiny_rope({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    inv_freq, attn = rope_frequencies(cfg)
    ref_inv, ref_attn = ref_yarn(8, 10000.0, 4.0, 64, 32.0, 1.0, 1.0, 0.0)
    np.testing.assert_allclose(inv_freq, ref_inv, rtol=2e-7)
    assert attn == pytest.approx(ref_attn) and attn == pytest.approx(0.1 * math.log(4) + 1)
    assert softmax_scale(cfg) == pytest.approx(24 ** -0.5)


def test_softmax_scale_values():
    assert softmax_scale(tiny_nope()) == pytest.approx(24 ** -0.5)
    assert softmax_scale(k2jax.load_config("kimi_linear_48b_a3b")) == pytest.approx(192 ** -0.5)
    assert softmax_scale(k2jax.load_config("kimi_k2")) == pytest.approx(192 ** -0.5 * (0.1 * math.log(32) + 1) ** 2)
    assert softmax_scale(tiny_rope()) == pytest.approx(24 ** -0.5 * (0.1 * math.log(4) + 1) ** 2)
    assert softmax_scale(tiny_rope({**YARN, "mscale_all_dim": 0.0})) == pytest.approx(24 ** -0.5)


def test_apply_rope_matches_hf_permute_then_rotate_half():
    """HF: view(R/2, 2).transpose -> x' (half layout), then x' cos + rotate_half(x') sin, cos = cos(cat(f, f))."""
    rng = np.random.default_rng(0)
    B, T, H, R = 2, 5, 3, 8
    x = rng.standard_normal((B, T, H, R))
    pos = rng.integers(0, 1000, (B, T))
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, R, 2) / R)
    ms = 1.3
    xp = x.reshape(B, T, H, R // 2, 2).swapaxes(-1, -2).reshape(B, T, H, R)
    emb = np.concatenate([pos[..., None] * inv_freq] * 2, axis=-1)[:, :, None, :]
    rot_half = np.concatenate([-xp[..., R // 2:], xp[..., :R // 2]], axis=-1)
    ref = xp * np.cos(emb) * ms + rot_half * np.sin(emb) * ms
    out = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), jnp.asarray(inv_freq, jnp.float32), ms)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert error_ratio(ref, out) <= 1e-5
    # Same dot products as the rotation kept in interleaved order (what the MLA reference uses).
    inter = np.stack([ref_rotate_pairs(x[:, :, h], pos, inv_freq, ms) for h in range(H)], axis=2)
    np.testing.assert_allclose(np.sum(ref * ref[:, ::-1], -1), np.sum(inter * inter[:, ::-1], -1), rtol=1e-9)
    # positions [T] broadcast over the batch; bf16 in -> bf16 out.
    out1 = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(pos[0]), inv_freq, ms)
    assert out1.dtype == jnp.bfloat16
    assert error_ratio(ref[0], out1[0]) <= 1e-2


def test_apply_rope_uninterleaved_rotates_the_stored_halves():
    """transformers' DeepSeek-V3 with rope_interleave: false: x cos + rotate_half(x) sin on the channels as stored
    (pairs (j, j + R/2)), no permutation first."""
    rng = np.random.default_rng(1)
    B, T, H, R = 2, 5, 3, 8
    x = rng.standard_normal((B, T, H, R))
    pos = rng.integers(0, 1000, (B, T))
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, R, 2) / R)
    emb = np.concatenate([pos[..., None] * inv_freq] * 2, axis=-1)[:, :, None, :]
    rot_half = np.concatenate([-x[..., R // 2:], x[..., :R // 2]], axis=-1)
    ref = (x * np.cos(emb) + rot_half * np.sin(emb)) * 0.9
    out = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), jnp.asarray(inv_freq, jnp.float32), 0.9,
                     interleaved=False)
    assert error_ratio(ref, out) <= 1e-5
    assert error_ratio(ref, apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), inv_freq, 0.9)) > 0.1


def test_mla_rope_interleave_false_equals_interleaved_weights_permuted():
    """An MLA reading pairs (j, j + P/2) equals one reading pairs (2j, 2j+1) whose q_pe / k_pe projection columns
    are interleaved accordingly: the config field reaches both the query and the key rotation."""
    cfg = tiny_rope()
    halves, pairs = make_mla(cfg.replace(rope_interleave=False)), make_mla(cfg)
    x = rand_x(cfg, 2, 7)
    assert error_ratio(pairs(x)[0], halves(x)[0]) > 1e-3  # the same weights read in the two layouts differ
    P, n, H = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.num_attention_heads
    to_pairs = np.stack([np.arange(P // 2), np.arange(P // 2) + P // 2], axis=1).reshape(-1)  # [0, 4, 1, 5, ...]
    q = np.array(halves.q_b_proj.kernel[...]).reshape(-1, H, n + P)
    q[..., n:] = q[..., n:][..., to_pairs]
    kv = np.array(halves.kv_a_proj_with_mqa.kernel[...])
    kv[:, cfg.kv_lora_rank:] = kv[:, cfg.kv_lora_rank:][:, to_pairs]
    for name in ("q_a_proj", "kv_b_proj", "o_proj"):
        getattr(pairs, name).kernel[...] = getattr(halves, name).kernel[...]
    pairs.q_a_layernorm.weight[...] = halves.q_a_layernorm.weight[...]
    pairs.kv_a_layernorm.weight[...] = halves.kv_a_layernorm.weight[...]
    pairs.q_b_proj.kernel[...] = jnp.asarray(q.reshape(-1, H * (n + P)))
    pairs.kv_a_proj_with_mqa.kernel[...] = jnp.asarray(kv)
    assert error_ratio(pairs(x)[0], halves(x)[0]) <= 1e-6


def test_yarn_attention_factor_replaces_the_mscale_rule():
    inv_ref, attn_ref = rope_frequencies(tiny_rope({**YARN, "mscale": 2.0}))
    inv_freq, attn = rope_frequencies(tiny_rope({**YARN, "mscale": 2.0, "attention_factor": 1.5}))
    np.testing.assert_array_equal(inv_freq, inv_ref)
    assert attn == 1.5 and attn_ref != 1.5
    with pytest.raises(k2jax.ConfigError, match="attention_factor"):
        tiny_rope({**YARN, "attention_factor": -1.0})


def test_apply_rope_bad_inputs():
    x = jnp.zeros((2, 5, 3, 8))
    inv = jnp.ones(4)
    with pytest.raises(ValueError, match="last dim"):
        apply_rope(x, jnp.zeros((2, 5), jnp.int32), jnp.ones(3))
    with pytest.raises(ValueError, match="positions shape"):
        apply_rope(x, jnp.zeros((2, 4), jnp.int32), inv)
    with pytest.raises(ValueError, match="integers"):
        apply_rope(x, jnp.zeros((2, 5), jnp.float32), inv)
    with pytest.raises(ValueError, match=r"\[\.\.\., T, H, R\]"):
        apply_rope(jnp.zeros((5, 8)), jnp.zeros((5,), jnp.int32), inv)


# ---- MLA vs the float64 reference ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mla_matches_reference(name):
    cfg = CONFIGS[name]()
    m = make_mla(cfg)
    x = rand_x(cfg, 2, 9)
    pos = jnp.asarray([[0, 1, 2, 3, 4, 5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48]], jnp.int32)
    y = m(x, positions=pos)[0]
    ref = ref_mla(params64(m), cfg, x, positions=pos)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert error_ratio(ref, y) <= 1e-5, name


def test_mla_hf_layout_of_children():
    cfg = tiny_rope()
    m = make_mla(cfg)
    H, n, P, dv, R = 2, 16, 8, 16, 16
    assert m.q_a_proj.kernel.shape == (64, 16) and m.q_b_proj.kernel.shape == (16, H * (n + P))
    assert m.kv_a_proj_with_mqa.kernel.shape == (64, R + P) and m.kv_b_proj.kernel.shape == (R, H * (n + dv))
    assert m.o_proj.kernel.shape == (H * dv, 64) and m.kv_a_layernorm.weight.shape == (R,)
    assert not hasattr(m, "q_proj")
    assert not hasattr(MultiHeadLatentAttention(tiny_nope(), rngs=nnx.Rngs(0)), "q_a_proj")


def test_mla_single_token():
    cfg = tiny_rope()
    m = make_mla(cfg)
    x = rand_x(cfg, 3, 1)
    assert error_ratio(ref_mla(params64(m), cfg, x), m(x)[0]) <= 1e-5


def test_mla_longer_than_one_block_matches_reference():
    """T = 300 spans two of the attention op's 256-row query blocks: still the float64 loop's result."""
    cfg = tiny_nope()
    m = make_mla(cfg)
    x = rand_x(cfg, 1, 300)
    seg = jnp.asarray([[1] * 150 + [2] * 140 + [0] * 10], jnp.int32)
    pos = segment_positions(seg)
    assert error_ratio(ref_mla(params64(m), cfg, x, seg, pos), m(x, segment_ids=seg, positions=pos)[0]) <= 1e-5


def test_mla_memory_is_linear_in_length():
    """XLA's temp-buffer estimate of the layer's forward + backward at T = 4096 with packed segments: a quarter of
    one head's [T, T] float32 scores at most (measured 10.7 MB; the [B, H, T, T] scores and [B, T, T] mask of a
    materialised softmax are never built)."""
    cfg = tiny_rope()
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(0))))
    T = 4096

    def loss(state, x, seg):
        return jnp.sum(nnx.merge(graphdef, state)(x, segment_ids=seg, positions=seg)[0])

    specs = (jax.ShapeDtypeStruct((1, T, cfg.hidden_size), jnp.float32), jax.ShapeDtypeStruct((1, T), jnp.int32))
    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(state, *specs).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < T * T * 4 / 4


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_mla_lowers_to_the_attention_kernels(platform):
    """The layer's attention (no cache: training and a fresh prefill) at the 48B model's head dims (q/k 192, v 128,
    bf16, packed segments) lowers to JAX's splash kernel on TPU and its Triton kernel on GPU, forward and backward
    (the counts of the attention op's own lowering test); continuing a cache (the merged, log-sum-exp form) runs
    the XLA form."""
    cfg = tiny_nope().replace(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, dtype="bfloat16")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((1, 200, cfg.hidden_size), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 200), jnp.int32)

    def fwd(state, x, seg):
        return nnx.merge(graphdef, state)(x, segment_ids=seg)[0]

    def fwd_bwd(state, x, seg):
        return jax.grad(lambda st, x: jnp.sum(fwd(st, x, seg).astype(jnp.float32)), (0, 1))(state, x)

    def continued(state, x, seg):
        S = 64
        cache = MLACache(jnp.zeros((1, S, cfg.kv_lora_rank), jnp.bfloat16),
                         jnp.zeros((1, S, cfg.qk_rope_head_dim), jnp.bfloat16), jnp.full((1,), S, jnp.int32))
        return nnx.merge(graphdef, state)(x, segment_ids=seg, cache=cache)[0]

    kernels = {"tpu": (1, 2), "cuda": (1, 3)}[platform]
    assert count_pallas_kernels(fwd, (state, x, seg), platform) == kernels[0]
    assert count_pallas_kernels(fwd_bwd, (state, x, seg), platform) == kernels[1]
    assert count_pallas_kernels(continued, (state, x, seg), platform) == 0


# ---- segments, padding, causality ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nope", "rope_yarn"])
def test_packed_row_equals_separate_rows(name):
    cfg = CONFIGS[name]()
    m = make_mla(cfg)
    a, b = rand_x(cfg, 1, 5, seed=2), rand_x(cfg, 1, 4, seed=3)
    pad = rand_x(cfg, 1, 3, seed=4)
    x = jnp.concatenate([a, b, pad], axis=1)
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
    y = m(x, segment_ids=seg, positions=segment_positions(seg))[0]
    assert error_ratio(m(a)[0], y[:, :5]) <= 1e-5
    assert error_ratio(m(b)[0], y[:, 5:9]) <= 1e-5
    np.testing.assert_array_equal(np.asarray(y[:, 9:]), 0.0)
    # Against the loop reference too (it restarts attention at each id).
    assert error_ratio(ref_mla(params64(m), cfg, x, seg, segment_positions(seg)), y) <= 1e-5


@pytest.mark.parametrize("name", ["nope", "rope_yarn"])
def test_left_padding_equals_unpadded(name):
    cfg = CONFIGS[name]()
    m = make_mla(cfg)
    a, other = rand_x(cfg, 1, 5, seed=5), rand_x(cfg, 1, 8, seed=6)
    x = jnp.concatenate([jnp.concatenate([rand_x(cfg, 1, 3, seed=7), a], axis=1), other], axis=0)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], jnp.int32)
    pos = jnp.asarray([[0, 0, 0, 0, 1, 2, 3, 4], list(range(8))], jnp.int32)
    y = m(x, segment_ids=seg, positions=pos)[0]
    assert error_ratio(m(a)[0], y[:1, 3:]) <= 1e-5
    assert error_ratio(m(other)[0], y[1:]) <= 1e-5
    np.testing.assert_array_equal(np.asarray(y[0, :3]), 0.0)


def test_causality():
    cfg = tiny_rope()
    m = make_mla(cfg)
    x = rand_x(cfg, 2, 8)
    x2 = x.at[:, 5].add(1.0)
    y, y2 = m(x)[0], m(x2)[0]
    np.testing.assert_allclose(np.asarray(y[:, :5]), np.asarray(y2[:, :5]), rtol=1e-6, atol=0)
    assert np.all(np.abs(np.asarray(y[:, 5:] - y2[:, 5:])).max(axis=-1) > 1e-3)


# ---- absorbed (latent) form: the call with a cache ---------------------------------------------------------------
def latents(m, cfg, x, **kw):
    """x's MLALatents from a call with an empty cache."""
    return m(x, cache=MLACache.empty(x.shape[0], cfg), **kw)[1]


@pytest.mark.parametrize("name", ["nope", "rope_yarn"])
def test_latent_form_equals_expanded(name):
    cfg = CONFIGS[name]()
    m = make_mla(cfg)
    x = rand_x(cfg, 2, 9)
    seg = jnp.asarray([[1] * 4 + [2] * 3 + [0] * 2, [0] * 2 + [3] * 7], jnp.int32)
    pos = segment_positions(seg)
    y = m(x, segment_ids=seg, positions=pos)[0]
    # Row 0's first two tokens (segment 1) in the cache, the rest attending over it in the absorbed form: its
    # segment-1 tokens continue the cache, segment 2 and the padding do not see it. Row 1 has nothing cached.
    lat = latents(m, cfg, x[:, :2], segment_ids=seg[:, :2], positions=pos[:, :2])
    assert lat.ckv.shape == (2, 2, cfg.kv_lora_rank) and lat.kpe.shape == (2, 2, cfg.qk_rope_head_dim)
    y_lat, new = m(x[:, 2:], segment_ids=seg[:, 2:], positions=pos[:, 2:],
                   cache=MLACache(lat.ckv, lat.kpe, jnp.asarray([2, 0], jnp.int32)))
    assert new.ckv.shape == (2, 7, cfg.kv_lora_rank)
    assert error_ratio(y[:, 2:], y_lat) <= 1e-5, name
    np.testing.assert_array_equal(np.asarray(y_lat[0, 5:]), 0.0)
    # Decoding the last token of row 1 against the cache of the row's real tokens before it.
    lat1 = latents(m, cfg, x[1:, 2:8], positions=pos[1:, 2:8])
    y_step, _ = m(x[1:, 8:], cache=MLACache(lat1.ckv, lat1.kpe, jnp.asarray([6], jnp.int32)))
    assert error_ratio(y[1, -1], y_step[0, 0]) <= 1e-5


def test_long_piece_over_a_cache_runs_expanded_and_equals_one_shot(name="rope_yarn"):
    """With a latent rank large against the head dims (as at 48B: 2R > n + d_v), a piece of 40 tokens continuing
    a 27-token cache takes the decompressed (expanded) form, a decode step the absorbed one; both equal the
    one-shot call over the whole row, with packed segments and padding in the piece."""
    cfg = CONFIGS[name]().replace(kv_lora_rank=64)
    dims = dict(heads=cfg.num_attention_heads, nope_dim=cfg.qk_nope_head_dim, rope_dim=cfg.qk_rope_head_dim,
                v_dim=cfg.v_head_dim, kv_lora_rank=cfg.kv_lora_rank)
    assert expanded_pays_off(40, **dims) and not expanded_pays_off(1, **dims)
    m = make_mla(cfg)
    x = rand_x(cfg, 2, 67)
    seg = jnp.asarray([[1] * 60 + [2] * 5 + [0] * 2, [4] * 67], jnp.int32)
    pos = segment_positions(seg)
    y = m(x, segment_ids=seg, positions=pos)[0]
    lat = latents(m, cfg, x[:, :27], segment_ids=seg[:, :27], positions=pos[:, :27])
    cache = MLACache(lat.ckv, lat.kpe, jnp.asarray([27, 27], jnp.int32))
    y_piece, _ = jax.jit(lambda x, s, p, c: m(x, segment_ids=s, positions=p, cache=c))(
        x[:, 27:], seg[:, 27:], pos[:, 27:], cache)
    assert error_ratio(y[:, 27:60], y_piece[:, :33]) <= 1e-5, name
    y_abs, _ = m(x[:, 27:], segment_ids=seg[:, 27:], positions=pos[:, 27:], cache=cache, cache_form="absorbed")
    assert error_ratio(y_abs, y_piece) <= 1e-5
    with pytest.raises(ValueError, match="form must be"):
        m(x[:, 27:], cache=cache, cache_form="latent")
    assert error_ratio(y[1], jnp.concatenate([y[1, :27], y_piece[1]])) <= 1e-5
    np.testing.assert_array_equal(np.asarray(y_piece[0, 38:]), 0.0)  # padding
    # Segment 2 of row 0 does not see the cache: it equals its own attention.
    assert error_ratio(y[0, 60:65], y_piece[0, 33:38]) <= 1e-5
    lat_all = latents(m, cfg, x[1:, :66], segment_ids=seg[1:, :66], positions=pos[1:, :66])
    y_step, _ = m(x[1:, 66:], segment_ids=seg[1:, 66:], positions=pos[1:, 66:],
                  cache=MLACache(lat_all.ckv, lat_all.kpe, jnp.asarray([66], jnp.int32)))
    assert error_ratio(y[1, -1], y_step[0, 0]) <= 1e-5


def test_latent_cache_kpe_is_hf_rotated_half_layout():
    """The cached k_pe is HF's rotated key: permuted to half layout, rotated, scaled by the YaRN mscale."""
    cfg = tiny_rope({**YARN, "mscale_all_dim": 0.0})  # cos/sin scale 0.1 ln 4 + 1, not 1
    m = make_mla(cfg)
    x = rand_x(cfg, 2, 6)
    pos = jnp.asarray([[3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]], jnp.int32)
    kpe = latents(m, cfg, x, positions=pos).kpe
    raw = np.asarray(x, np.float64) @ params64(m)["kv_a_proj_with_mqa"][:, cfg.kv_lora_rank:]
    inv_freq, ms = ref_freqs(cfg)
    rot = ref_rotate_pairs(raw, np.asarray(pos), inv_freq, ms)
    half = np.concatenate([rot[..., 0::2], rot[..., 1::2]], axis=-1)
    assert error_ratio(half, kpe) <= 1e-5
    # Without positions, a call with a cache places x after the cached tokens: positions lengths + t.
    shifted = m(x, cache=MLACache.empty(2, cfg)._replace(lengths=jnp.asarray([3, 0], jnp.int32)))[1].kpe
    assert error_ratio(half, shifted) <= 1e-5


def test_nope_k_pe_not_rotated():
    cfg = tiny_nope()
    m = make_mla(cfg)
    x = rand_x(cfg, 1, 4)
    kpe = latents(m, cfg, x, positions=jnp.asarray([[7, 100, 3, 9]], jnp.int32)).kpe
    raw = np.asarray(x, np.float64) @ params64(m)["kv_a_proj_with_mqa"][:, cfg.kv_lora_rank:]
    assert error_ratio(raw, kpe) <= 1e-6


def test_call_without_cache_returns_no_latents():
    cfg = tiny_nope()
    m = make_mla(cfg)
    y, new = m(rand_x(cfg, 2, 3))
    assert new is None and y.shape == (2, 3, cfg.hidden_size)


# ---- bf16 under jit on CPU -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nope", "rope_yarn"])
def test_bf16_jit_runs_and_is_close(name):
    cfg32 = CONFIGS[name]()
    m32 = make_mla(cfg32)
    cfg16 = cfg32.replace(dtype="bfloat16", param_dtype="bfloat16")
    m16 = MultiHeadLatentAttention(cfg16, rngs=nnx.Rngs(0))
    nnx.update(m16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)))
    x = rand_x(cfg32, 2, 8)
    seg = jnp.asarray([[1] * 5 + [2] * 3, [0] * 2 + [1] * 6], jnp.int32)
    pos = segment_positions(seg)

    @nnx.jit
    def run(m, x):
        y = m(x, segment_ids=seg, positions=pos)[0]
        # Row 0's first two tokens cached, the rest through the absorbed form (row 1: nothing cached).
        lat = m(x[:, :2], segment_ids=seg[:, :2], positions=pos[:, :2], cache=MLACache.empty(2, cfg16))[1]
        y_lat = m(x[:, 2:], segment_ids=seg[:, 2:], positions=pos[:, 2:],
                  cache=MLACache(lat.ckv, lat.kpe, jnp.asarray([2, 0], jnp.int32)))[0]
        return y, y_lat, lat.ckv

    y, y_lat, ckv = run(m16, x.astype(jnp.bfloat16))
    assert y.dtype == y_lat.dtype == ckv.dtype == jnp.bfloat16
    ref = m32(x, segment_ids=seg, positions=pos)[0]
    assert error_ratio(ref, y) <= 3e-2
    assert error_ratio(ref[:, 2:], y_lat) <= 3e-2


# ---- bad inputs ------------------------------------------------------------------------------------------------
def test_bad_shapes_raise():
    cfg = tiny_rope()
    m = make_mla(cfg)
    x = rand_x(cfg, 2, 4)
    with pytest.raises(ValueError, match="hidden"):
        m(x[0])
    with pytest.raises(ValueError, match="hidden"):
        m(x[..., :32])
    with pytest.raises(ValueError, match="segment_ids"):
        m(x, segment_ids=jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        m(x, segment_ids=jnp.ones((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="positions"):
        m(x, positions=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="positions"):
        m(x, positions=jnp.zeros((2, 4), jnp.float32))
    lat = latents(m, cfg, x)
    lengths = jnp.asarray([1, 2], jnp.int32)
    with pytest.raises(ValueError, match="cache.ckv"):
        m(x, cache=MLACache(lat.ckv[:, :3], lat.kpe, lengths))
    with pytest.raises(ValueError, match="cache.ckv"):
        m(x, cache=MLACache(lat.ckv[..., :8], lat.kpe, lengths))
    with pytest.raises(ValueError, match="cache.lengths"):
        m(x, cache=MLACache(lat.ckv, lat.kpe, lengths[:1]))
    with pytest.raises(ValueError, match="cache.lengths"):
        m(x, cache=MLACache(lat.ckv, lat.kpe, lengths.astype(jnp.float32)))
    with pytest.raises(ValueError, match="positions"):
        m(x, positions=jnp.zeros((2, 5), jnp.int32), cache=MLACache(lat.ckv, lat.kpe, lengths))
    with pytest.raises(ValueError, match="MLACache"):
        m(x, cache=(lat.ckv, lat.kpe, lengths))


def test_absorbed_training_path_equals_the_expanded_one():
    """Without a cache, on CPU, a config whose absorbed form costs no more FLOPs (tiny: R = n = d_v = 16) attends
    in the absorbed form; its outputs and gradients (parameters and input, packed segments) equal the expanded
    form's, which `cpu_paths_off("mla_absorbed")` selects. The 48B dims (R = 512, n = d_v = 128) stay expanded."""
    cfg = tiny_rope()
    m = make_mla(cfg)
    graphdef, state = nnx.split(m)
    x = rand_x(cfg, 2, 37)
    seg = jnp.asarray([[1] * 20 + [2] * 17, [3] * 30 + [0] * 7], jnp.int32)
    pos = segment_positions(seg)
    ct = jax.random.normal(jax.random.key(3), x.shape)

    def lowered():  # a fresh function each time: jit would reuse the first trace
        def run(state, x):
            y, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x, segment_ids=seg, positions=pos)[0], state, x)
            return y, vjp(ct)
        return jax.jit(run).lower(state, x)

    absorbed = lowered()
    with cpu_paths_off("mla_absorbed"):
        expanded = lowered()
        assert not m._absorbed_is_cheaper()
    assert m._absorbed_is_cheaper() and absorbed.as_text().count("dot_general") != expanded.as_text().count(
        "dot_general")
    got, want = absorbed.compile()(state, x), expanded.compile()(state, x)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert error_ratio(a, b) <= 1e-5
    big = tiny_nope().replace(kv_lora_rank=512, qk_nope_head_dim=128, v_head_dim=128)
    assert not MultiHeadLatentAttention(big, rngs=nnx.Rngs(0))._absorbed_is_cheaper()

"""INT4 routed experts: packed storage, forward and gradients against float models holding the same (independently
dequantized) weights, QAT's straight-through estimator, PTQ, byte counts, and compressed-tensors HF checkpoints."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import k2jax.hf.load as hf_load
from k2jax import KimiLinear, load_config
from k2jax.checkpoint import restore_params, save_params
from k2jax.config import ConfigError
from k2jax.hf import CheckpointError, config_from_hf, hf_config_dict, load_hf_checkpoint, save_hf_checkpoint
from k2jax.hf.compressed_tensors import compressed_tensors_config, quantization_from_compressed_tensors
from k2jax.layers import moe as M
from k2jax.layers.qat import fake_quantize_int4
from k2jax.quantize import expert_weight_bytes, quantize_model_experts
from pallas_kernels.int4 import quantize_int4, to_compressed_tensors
from pallas_kernels.moe import grouped_matmul, int4_grouped_matmul_cpu, int4_grouped_matmul_kernel
from tests.conftest import error_ratio
from tests.k2jax.hf.test_hf import hand_written_hf_tensors, write_hf_folder

# Layer 0: KDA + dense MLP, layer 1: MLA + MoE. A larger init makes the experts matter in the logits.
TINY2 = load_config("tiny").replace(num_hidden_layers=2, kda_layers=(1,), full_attn_layers=(2,),
                                    initializer_range=0.1)
K2_TINY = TINY2.replace(kda_layers=None, full_attn_layers=None, mla_use_nope=False, q_lora_rank=16,
                        moe_router_weights_from_biased_scores=False)
TOKENS = jnp.array([[3, 17, 255, 0, 42, 9, 100, 7, 1, 2, 3, 77, 31, 8]], jnp.int32)


# ---- independent references (numpy, from the packing rule: byte r = row 2r low nibble, row 2r+1 high) ------------
def np_dequant(packed, scale):
    """uint8 [..., K/2, N] + scale [..., K/g, N] -> float32 [..., K, N]."""
    p = np.asarray(packed).astype(np.int32)
    lo, hi = p & 15, p >> 4
    lo, hi = np.where(lo >= 8, lo - 16, lo), np.where(hi >= 8, hi - 16, hi)
    q = np.empty(p.shape[:-2] + (2 * p.shape[-2], p.shape[-1]), np.float32)
    q[..., 0::2, :], q[..., 1::2, :] = lo, hi
    s = np.asarray(np.asarray(scale).astype(np.float32))
    return q * np.repeat(s, q.shape[-2] // s.shape[-2], axis=-2)


def np_fake_quant(w, g=32):
    """Symmetric absmax INT4 per group of g rows with the scale rounded to bf16 (the stored scale)."""
    w = np.asarray(w, np.float32)
    K, N = w.shape[-2:]
    wg = w.reshape(*w.shape[:-2], K // g, g, N)
    s = (np.abs(wg).max(-2, keepdims=True) / 7).astype(ml_dtypes.bfloat16).astype(np.float32)
    q = np.clip(np.round(np.divide(wg, s, out=np.zeros_like(wg), where=s > 0)), -7, 7)
    return (q * s).reshape(w.shape)


def moe_layers(model):
    return [layer.block_sparse_moe for layer in model.layers if layer.is_moe]


def float_twin(float_model, expert_values):
    """A clone of float_model whose experts hold `expert_values(moe_index, name)` (numpy), qat switched off."""
    twin = nnx.clone(float_model)
    for i, moe in enumerate(moe_layers(twin)):
        moe.experts.qat = None
        for name in ("w1", "w3", "w2"):
            getattr(moe.experts, name).set_value(jnp.asarray(expert_values(i, name)))
    return twin


def dequant_twin(float_model, qmodel):
    """The float model holding exactly the INT4 model's weights, dequantized in numpy."""
    qe = [moe.experts for moe in moe_layers(qmodel)]
    return float_twin(float_model, lambda i, n: np_dequant(getattr(qe[i], f"{n}_packed")[...],
                                                           getattr(qe[i], f"{n}_scale")[...]))


def logits(model, tokens=TOKENS):
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))


def loss_fn(model, tokens):
    lg = model(tokens)
    return -jnp.mean(jax.nn.log_softmax(lg[:, :-1]) * jax.nn.one_hot(tokens[:, 1:], lg.shape[-1])) * lg.shape[-1]


def param_grads(model):
    g = nnx.jit(nnx.grad(loss_fn))(model, TOKENS)
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g)}


@pytest.fixture(scope="module")
def float_model():
    return KimiLinear(TINY2, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def qmodel(float_model):
    return quantize_model_experts(float_model)


# ---- storage -----------------------------------------------------------------------------------------------------
def test_config_builds_packed_experts_and_bytes_are_3_5x_smaller(float_model, qmodel):
    assert qmodel.config.quantization == {"experts": "int4", "group_size": 32, "scale_dtype": "bfloat16",
                                          "qat": False}
    e = moe_layers(qmodel)[0].experts
    assert isinstance(e, M.QuantizedMoEExperts)
    E, D, I = TINY2.num_experts, TINY2.hidden_size, TINY2.moe_intermediate_size
    assert e.w1_packed[...].dtype == jnp.uint8 and e.w1_packed[...].shape == (E, D // 2, I)
    assert e.w2_packed[...].shape == (E, I // 2, D) and e.w2_scale[...].shape == (E, I // 32, D)
    assert e.w1_scale[...].dtype == jnp.bfloat16
    assert not isinstance(e.w1_packed, nnx.Param)  # frozen: optimizers and nnx.grad skip it
    logical = 3 * E * D * I
    assert expert_weight_bytes(float_model) == 4 * logical  # float32 params
    assert expert_weight_bytes(qmodel, as_dtype="bfloat16") == 2 * logical
    stored = expert_weight_bytes(qmodel)
    assert stored == logical // 2 + 2 * logical // 32  # nibbles + one bf16 scale per 32 weights
    assert 2 * logical / stored >= 3.5
    # A model built straight from a config with experts: int4 has the same structure.
    direct = KimiLinear(TINY2.replace(quantization={"experts": "int4"}), rngs=nnx.Rngs(1))
    assert isinstance(moe_layers(direct)[0].experts, M.QuantizedMoEExperts)
    assert np.isfinite(logits(direct)).all()


def test_ptq_packs_each_expert_and_leaves_the_source_alone(float_model):
    before = np.asarray(moe_layers(float_model)[0].experts.w3[...])
    q16 = quantize_model_experts(float_model, group_size=16)
    assert q16.config.quantization["group_size"] == 16
    assert isinstance(moe_layers(float_model)[0].experts, M.MoEExperts)
    np.testing.assert_array_equal(np.asarray(moe_layers(float_model)[0].experts.w3[...]), before)
    ref = quantize_int4(moe_layers(float_model)[0].experts.w3[...], 16)
    qe = moe_layers(q16)[0].experts
    np.testing.assert_array_equal(np.asarray(qe.w3_packed[...]), np.asarray(ref.packed))
    np.testing.assert_array_equal(np.asarray(qe.w3_scale[...], np.float32), np.asarray(ref.scale, np.float32))
    assert qe.w3_scale[...].shape[1] == TINY2.hidden_size // 16
    # Non-expert variables are the float model's.
    assert q16.embed_tokens[...] is float_model.embed_tokens[...]
    with pytest.raises(ValueError, match="already INT4"):
        quantize_model_experts(q16)
    with pytest.raises(ConfigError, match="quantization.group_size"):
        quantize_model_experts(float_model, group_size=24)  # does not divide hidden_size=64


# ---- forward and gradients ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_int4_model_equals_float_model_with_dequantized_weights(float_model, impl):
    fm = KimiLinear(TINY2.replace(moe_impl=impl), rngs=nnx.Rngs(0))
    q = quantize_model_experts(fm)
    twin = dequant_twin(fm, q)
    ref, got = logits(twin), logits(q)
    assert error_ratio(ref, got) <= 1e-5
    assert error_ratio(logits(fm), got) > 1e-3  # the quantization is visible, so the match above means something
    x = jax.random.normal(jax.random.key(3), (2, 40, TINY2.hidden_size))  # 80 tokens: the blocked sorted path
    moe_q, moe_f = moe_layers(q)[0], moe_layers(twin)[0]
    yq, yf = nnx.jit(lambda m, x: m(x)[0])(moe_q, x), nnx.jit(lambda m, x: m(x)[0])(moe_f, x)
    assert error_ratio(yf, yq) <= 1e-5


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_int4_model_gradients_of_other_params(impl):
    fm = KimiLinear(TINY2.replace(moe_impl=impl), rngs=nnx.Rngs(5))
    q = quantize_model_experts(fm)
    gq, gf = param_grads(q), param_grads(dequant_twin(fm, q))
    assert not any("experts" in map(str, p) for p in gq)  # packed weights are frozen (no gradient)
    for path, g in gq.items():
        assert error_ratio(gf[path], g) <= 1e-5, path
    assert np.abs(gq[("layers", 1, "block_sparse_moe", "gate", "kernel")]).max() > 0


@pytest.mark.parametrize("sizes", [[10, 0, 27, 3], [0, 0, 40, 0]])
def test_int4_grouped_matmul_paths_match_per_row_reference(sizes):
    E, K, N, M_rows = 4, 64, 48, 40
    w = jax.random.normal(jax.random.key(0), (E, K, N))
    qw = quantize_int4(w)
    x = jax.random.normal(jax.random.key(1), (M_rows, K))
    gs = jnp.array(sizes, jnp.int32)
    wd = np_dequant(qw.packed, qw.scale)
    rows = np.repeat(np.arange(E), sizes)
    ref = np.einsum("mk,mkn->mn", np.asarray(x, np.float64), wd[rows].astype(np.float64))
    dy = np.asarray(jax.random.normal(jax.random.key(2), (M_rows, N)), np.float64)
    dx_ref = np.einsum("mn,mkn->mk", dy, wd[rows].astype(np.float64))
    for fn in (int4_grouped_matmul_kernel, int4_grouped_matmul_cpu, grouped_matmul):
        y, vjp = jax.vjp(lambda x: jax.jit(fn)(x, qw, gs), x)
        assert y.dtype == jnp.float32
        assert error_ratio(ref, y) <= 1e-6, fn.__name__
        assert error_ratio(dx_ref, vjp(jnp.asarray(dy, jnp.float32))[0]) <= 1e-6, fn.__name__


def as_float32(model):
    """The same model (same bf16-representable values) with float32 params and compute."""
    cfg = model.config.replace(dtype="float32", param_dtype="float32")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: KimiLinear(cfg, rngs=nnx.Rngs(0))))
    flat = [(p, v.replace(v.get_value().astype(jnp.float32) if v.get_value().dtype == jnp.bfloat16
                          and not str(p[-1]).endswith("_scale") else v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Variable))]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def test_bf16_int4_model_runs_on_cpu_close_to_f32():
    for impl in ("dense", "ragged"):
        cfg = TINY2.replace(moe_impl=impl, dtype="bfloat16", param_dtype="bfloat16")
        q16 = quantize_model_experts(KimiLinear(cfg, rngs=nnx.Rngs(2)))
        ref, got = logits(as_float32(q16)), logits(q16)
        assert np.isfinite(got).all()
        assert error_ratio(ref, got) < 5e-2, impl
    # The bf16 backward through the INT4 sorted path (blocked grouped matmul on dequantized bf16 experts).
    assert all(np.isfinite(g).all() for g in param_grads(q16).values())


# ---- QAT ---------------------------------------------------------------------------------------------------------
def test_fake_quantize_values_and_straight_through_gradient():
    w = jax.random.normal(jax.random.key(0), (3, 64, 16)) * jnp.linspace(0.1, 2.0, 16)
    w = w.at[0, :32, 0].set(0.0)  # an all-zero group
    np.testing.assert_array_equal(np.asarray(fake_quantize_int4(w)), np_fake_quant(w))
    c = jax.random.normal(jax.random.key(1), w.shape)
    g = jax.grad(lambda w: jnp.sum(fake_quantize_int4(w) * c))(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))
    assert fake_quantize_int4(w, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_qat_forward_and_gradients_equal_float_model_on_fake_quantized_weights():
    qat = KimiLinear(TINY2.replace(quantization={"qat": True}), rngs=nnx.Rngs(4))
    fe = [moe.experts for moe in moe_layers(qat)]
    twin = float_twin(qat, lambda i, n: np_fake_quant(getattr(fe[i], n)[...]))
    assert error_ratio(logits(twin), logits(qat)) <= 1e-6
    gq, gt = param_grads(qat), param_grads(twin)
    assert gq.keys() == gt.keys()
    for path, g in gq.items():  # experts included: the STE passes d/d(fq(w)) to w unchanged
        assert error_ratio(gt[path], g) <= 1e-6, path
    w1_grad = gq[("layers", 1, "block_sparse_moe", "experts", "w1")]
    assert np.abs(w1_grad).max() > 0
    # Packing the QAT model afterwards gives the very forward it was trained with.
    packed = quantize_model_experts(qat)
    assert packed.config.quantization["qat"] is False
    assert error_ratio(logits(qat), logits(packed)) <= 1e-6


# ---- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q, key", [
    ({"experts": "int8"}, "quantization.experts"),
    ({"experts": "int4", "group_size": 0}, "quantization.group_size"),
    ({"experts": "int4", "group_size": 7}, "quantization.group_size"),
    ({"experts": "int4", "group_size": 128}, "quantization.group_size"),  # does not divide hidden_size=64
    ({"experts": "int4", "scale_dtype": "int8"}, "quantization.scale_dtype"),
    ({"qat": "yes"}, "quantization.qat"),
    ({"experts": "int4", "qat": True}, "quantization.qat"),
    ({"experts": "int4", "bits": 4}, "unknown keys"),
    ("int4", "quantization"),
])
def test_bad_quantization_config(q, key):
    with pytest.raises(ConfigError, match=key):
        TINY2.replace(quantization=q)


def test_quantization_from_yaml(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text("vocab_size: 64\nnum_experts: 4\nnum_experts_per_token: 2\nmoe_intermediate_size: 32\n"
                 "hidden_size: 64\nbos_token_id: 1\neos_token_id: 2\npad_token_id: 0\n"
                 "quantization: {experts: int4, group_size: 32}\n")
    cfg = load_config(f)
    assert cfg.quantization == {"experts": "int4", "group_size": 32, "scale_dtype": "bfloat16", "qat": False}
    assert load_config(f, quantization=None).quantization is None


# ---- compressed-tensors checkpoints --------------------------------------------------------------------------------
def _k2_thinking_quantization_config(group_size=32):
    """Written out by hand, in the shape of Kimi K2 Thinking's config.json."""
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "kv_cache_scheme": None, "sparsity_config": {},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
            "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None,
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax",
                            "observer_kwargs": {}, "block_structure": None}}}}


@pytest.mark.parametrize("config, scheme", [(K2_TINY, "deepseek"), (TINY2, "kimi")])
def test_hf_round_trip_writes_compressed_tensors(config, scheme, tmp_path):
    q = quantize_model_experts(KimiLinear(config, rngs=nnx.Rngs(6)))
    folder = save_hf_checkpoint(q, tmp_path / "ct")
    hf = json.loads((folder / "config.json").read_text())
    qc = hf["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32 and "quantization" not in hf
    moe = "mlp" if scheme == "deepseek" else "block_sparse_moe"
    up = "up_proj" if scheme == "deepseek" else "w3"
    stem = f"model.layers.1.{moe}.experts.5.{up}"
    qe = moe_layers(q)[0].experts
    expect = to_compressed_tensors(qe.int4("w3"))  # the kernel half's bit-exact converter, all experts at once
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert f.get_slice(stem + ".weight_packed").get_dtype() == "I32"
        np.testing.assert_array_equal(f.get_tensor(stem + ".weight_packed"), np.asarray(expect["weight_packed"][5]))
        assert f.get_slice(stem + ".weight_scale").get_dtype() == "BF16"
        np.testing.assert_array_equal(f.get_tensor(stem + ".weight_scale").astype(np.float32),
                                      np.asarray(expect["weight_scale"][5], np.float32))
        np.testing.assert_array_equal(f.get_tensor(stem + ".weight_shape"), [TINY2.moe_intermediate_size,
                                                                             TINY2.hidden_size])
        assert f.get_slice(f"model.layers.1.{moe}.shared_experts.up_proj.weight").get_dtype() == "F32"
    assert stem + ".weight" not in names
    loaded = load_hf_checkpoint(folder)
    assert loaded.config.quantization == q.config.quantization
    src = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(q, nnx.Variable))}
    got = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Variable))}
    assert src.keys() == got.keys()
    for path, v in src.items():
        assert got[path].dtype == v.dtype, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(v), err_msg=str(path))
    assert error_ratio(logits(q), logits(loaded)) == 0.0


@pytest.fixture(scope="module")
def k2_float():
    return KimiLinear(K2_TINY, rngs=nnx.Rngs(7))


def _ct_tensors(model, hf_config=None, quantize_attention=False):
    """HF tensors written by hand (test_hf's writer) with every routed expert replaced by compressed-tensors INT4
    from the kernel half's converter."""
    tensors = hand_written_hf_tensors(model, "deepseek")
    for name in [n for n in tensors if ".experts." in n or (quantize_attention and n.endswith("q_a_proj.weight"))]:
        ct = to_compressed_tensors(quantize_int4(jnp.asarray(tensors.pop(name).T)))  # W [N, K] -> w [K, N]
        stem = name[: -len(".weight")]
        tensors[stem + ".weight_packed"] = np.asarray(ct["weight_packed"])
        tensors[stem + ".weight_scale"] = np.asarray(ct["weight_scale"])
        tensors[stem + ".weight_shape"] = ct["weight_shape"]
    cfg = hf_config_dict(model.config) | {"quantization_config": _k2_thinking_quantization_config()}
    return tensors, cfg


def test_load_k2_thinking_style_checkpoint_without_dequantizing(k2_float, tmp_path, monkeypatch):
    tensors, cfg = _ct_tensors(k2_float)
    folder = write_hf_folder(tmp_path / "thinking", k2_float.config, tensors, hf_config=cfg, shards=2)

    monkeypatch.setattr(hf_load, "_BLOCK_BYTES", 100)  # several row blocks per weight_packed: the streaming loop
    loaded = load_hf_checkpoint(folder)
    assert loaded.config.quantization["experts"] == "int4"
    ptq = quantize_model_experts(k2_float)
    for a, b in zip(moe_layers(ptq), moe_layers(loaded)):
        for n in ("w1_packed", "w3_packed", "w2_packed", "w1_scale", "w3_scale", "w2_scale"):
            assert getattr(b.experts, n)[...].dtype == getattr(a.experts, n)[...].dtype
            np.testing.assert_array_equal(np.asarray(getattr(b.experts, n)[...], np.float32),
                                          np.asarray(getattr(a.experts, n)[...], np.float32))
    assert error_ratio(logits(ptq), logits(loaded)) == 0.0


@pytest.mark.parametrize("change, key", [
    (("quant_method",), "fp8"),
    (("format",), "float-quantized"),
    (("config_groups", "group_0", "weights", "num_bits"), 8),
    (("config_groups", "group_0", "weights", "symmetric"), False),
    (("config_groups", "group_0", "weights", "strategy"), "channel"),
    (("config_groups", "group_0", "weights", "actorder"), "group"),
    (("config_groups", "group_0", "input_activations"), {"num_bits": 8, "type": "int"}),
    (("kv_cache_scheme",), {"num_bits": 8}),
])
def test_other_quantization_schemes_are_refused(change, key):
    qc = _k2_thinking_quantization_config()
    node = qc
    for k in change[:-1]:
        node = node[k]
    node[change[-1]] = key
    hf = hf_config_dict(K2_TINY) | {"quantization_config": qc}
    with pytest.raises(ConfigError, match=f"quantization_config.{'.'.join(change)} = "):
        config_from_hf(hf)
    assert config_from_hf(hf_config_dict(K2_TINY) | {"quantization_config": _k2_thinking_quantization_config(16)}
                          ).quantization["group_size"] == 16


def test_quantized_non_expert_or_bad_shape_tensors_are_refused(k2_float, tmp_path):
    tensors, cfg = _ct_tensors(k2_float, quantize_attention=True)
    folder = write_hf_folder(tmp_path / "attn", k2_float.config, tensors, hf_config=cfg)
    with pytest.raises(CheckpointError, match="routed experts only") as e:
        load_hf_checkpoint(folder)
    assert "model.layers.0.self_attn.q_a_proj.weight_packed" in str(e.value)
    tensors, cfg = _ct_tensors(k2_float)
    tensors["model.layers.1.mlp.experts.2.down_proj.weight_shape"] = np.array([64, 16], np.int64)
    folder = write_hf_folder(tmp_path / "shape", k2_float.config, tensors, hf_config=cfg)
    with pytest.raises(CheckpointError, match=r"experts.2.down_proj.weight_shape = \[64, 16\]"):
        load_hf_checkpoint(folder)
    # A float checkpoint does not load into an INT4 model (no silent re-quantization on load).
    float_folder = save_hf_checkpoint(k2_float, tmp_path / "float")
    with pytest.raises(CheckpointError, match="weight_packed"):
        load_hf_checkpoint(float_folder, config_overrides={"quantization": {"experts": "int4"}})


def test_compressed_tensors_config_parses_back():
    q = {"experts": "int4", "group_size": 16, "scale_dtype": "bfloat16", "qat": False}
    assert quantization_from_compressed_tensors(compressed_tensors_config(q)) == q


def test_orbax_params_round_trip_keeps_packed_experts(qmodel, tmp_path):
    restored = restore_params(None, save_params(qmodel, tmp_path / "ck"))  # config (with quantization) from disk
    e = moe_layers(restored)[0].experts
    assert isinstance(e, M.QuantizedMoEExperts) and e.w2_packed[...].dtype == jnp.uint8
    src = moe_layers(qmodel)[0].experts
    np.testing.assert_array_equal(np.asarray(e.w2_packed[...]), np.asarray(src.w2_packed[...]))
    assert error_ratio(logits(qmodel), logits(restored)) == 0.0

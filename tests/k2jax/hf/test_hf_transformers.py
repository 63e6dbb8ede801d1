"""k2jax against transformers' own Kimi-Linear and DeepSeek-V3 models: tiny random models built and saved by
transformers 5 load into k2jax with the same logits, and k2jax's format='transformers' folders load into
transformers with the same logits (float32, CPU, no download).

Needs torch, which the test extra installs on Python 3.11 only (a CPU wheel of torch 2.13.0; on 3.12 pip would
fetch a multi-GB CUDA build). The checks that need no torch (config keys, tensor names) are in test_hf.py and run on
both interpreters.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from k2jax import KimiLinear, load_config
from k2jax.hf import load_hf_checkpoint, save_hf_checkpoint
from tests.conftest import error_ratio

torch = pytest.importorskip("torch", reason="torch is in the test extra for Python < 3.12 only (CPU wheel)")
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[3, 17, 200, 0, 42, 9, 100, 7, 1, 2, 3, 250, 31, 64, 5, 77]])
TOL = 1e-4  # ||ref - x|| / ||ref||, float32 (measured: 3e-7 to 5e-7)


def perturb(model, seed):
    """Every weight of a transformers model moved off its initial value (norm weights around 1, router correction
    biases non-zero), so that no parameter can be mapped wrongly and still give equal logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * noise)
            elif "norm" in name:
                t.copy_(1 + 0.1 * noise)
            else:
                t.add_(0.02 * noise)
    return model.eval()


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def k2jax_logits(model):
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(TOKENS, jnp.int32)))


def tensor_names(folder):
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        return set(f.keys())


# ---- transformers -> k2jax -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kimi_linear():
    """KDA, MLA (layer 2 of 4), KDA, KDA; layer 0 dense, then grouped sigmoid MoE with a shared expert."""
    config = transformers.KimiLinearConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=2, topk_group=1, routed_scaling_factor=2.446, linear_num_heads=2, linear_head_dim=16,
        linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention", "linear_attention",
                                               "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"], pad_token_id=None, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = perturb(transformers.KimiLinearForCausalLM(config), 1)
    return model, torch_logits(model)


@pytest.mark.parametrize("original_format", [True, False], ids=["saved-names", "fused-names"])
def test_kimi_linear_saved_by_transformers_loads_with_the_same_logits(kimi_linear, tmp_path, original_format):
    model, ref = kimi_linear
    model.save_pretrained(tmp_path, save_original_format=original_format)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert "layer_types" in hf and "linear_attn_config" not in hf and hf["pad_token_id"] is None
    names = tensor_names(tmp_path)
    if original_format:  # the dense MLP of layer 0 sits under block_sparse_moe.
        assert "model.layers.0.block_sparse_moe.gate_proj.weight" in names
        assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in names
    else:
        assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.self_attn.conv1d.weight"} <= names
    loaded = load_hf_checkpoint(tmp_path)
    c = loaded.config
    assert (c.kda_layers, c.full_attn_layers, c.first_k_dense_replace, c.moe_layer_freq) == ((1, 3, 4), (2,), 1, 1)
    assert c.pad_token_id is None and not c.moe_router_weights_from_biased_scores
    got = k2jax_logits(loaded)
    assert np.abs(ref).max() > 0.1
    assert error_ratio(ref, got) <= TOL
    if original_format:
        # The correction biases matter: the remote code's rule (weights from biased scores) gives other logits.
        quirk = load_hf_checkpoint(tmp_path, config_overrides={"moe_router_weights_from_biased_scores": True})
        assert error_ratio(ref, k2jax_logits(quirk)) > 1e-3


# rope_parameters as transformers 5 writes them. "k2": YaRN with mscale = mscale_all_dim, interleaved pairs, as the
# Kimi K2 release; "mscale-only": transformers' cos/sin scale differs from the remote code's rule (m(f, 1) instead
# of m(f, mscale)), with de-interleaved pairs (rope_interleave: false).
DSV3_ROPE = {
    "k2": ({"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 8,
            "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}, True),
    "mscale-only": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 8, "mscale": 0.707}, False),
}


@pytest.fixture(scope="module", params=sorted(DSV3_ROPE))
def deepseek_v3(request):
    rope, interleave = DSV3_ROPE[request.param]
    config = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,  # num_key_value_heads: 128
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, rope_parameters=dict(rope), rope_interleave=interleave, max_position_embeddings=32,
        pad_token_id=None)
    torch.manual_seed(0)
    model = perturb(transformers.DeepseekV3ForCausalLM(config), 2)
    return request.param, model, torch_logits(model)


def test_deepseek_v3_saved_by_transformers_loads_with_the_same_logits(deepseek_v3, tmp_path):
    variant, model, ref = deepseek_v3
    model.save_pretrained(tmp_path, save_original_format=variant == "k2")
    hf = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in hf and "rope_scaling" not in hf and hf["pad_token_id"] is None
    assert hf["num_nextn_predict_layers"] == 1  # transformers' default, with no MTP tensors in the files
    assert hf["num_key_value_heads"] == 128  # transformers' default too, unused by its MLA
    loaded = load_hf_checkpoint(tmp_path)
    c = loaded.config
    assert c.q_lora_rank == 24 and c.rope_scaling["type"] == "yarn" and c.num_expert_group == 4
    assert c.rope_interleave == (variant == "k2")
    if variant == "mscale-only":  # transformers' rule: m(4, 1), not the remote code's m(4, 0.707)
        assert c.rope_scaling["attention_factor"] == pytest.approx(0.1 * np.log(4) + 1)
    assert error_ratio(ref, k2jax_logits(loaded)) <= TOL


# ---- k2jax -> transformers -------------------------------------------------------------------------------------------
def randomized(config, seed):
    """A k2jax model whose every variable (norms and router biases included) holds distinct random values."""
    model = KimiLinear(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        v = np.asarray(var.get_value(), np.float32)
        flat.append((path, var.replace(jnp.asarray(v + 0.05 * rng.standard_normal(v.shape), v.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


K2JAX_MODELS = {
    # MLA mid-stack, dense layer 0, grouped routing; transformers' routing rule (weights from the plain scores).
    "kimi_linear": lambda: load_config("tiny").replace(kda_layers=(1, 3, 4), full_attn_layers=(2,),
                                                       moe_router_weights_from_biased_scores=False, pad_token_id=None),
    # Kimi K2 / DeepSeek-V3 path: q LoRA, YaRN, grouped routing.
    "deepseek_v3": lambda: load_config("tiny").replace(
        kda_layers=None, full_attn_layers=None, mla_use_nope=False, q_lora_rank=16, num_attention_heads=4,
        num_key_value_heads=4, moe_router_weights_from_biased_scores=False,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 1.0,
                      "mscale_all_dim": 1.0}),
}


@pytest.mark.parametrize("name", sorted(K2JAX_MODELS))
def test_save_transformers_format_loads_in_transformers_with_the_same_logits(name, tmp_path):
    model = randomized(K2JAX_MODELS[name](), 3)
    out = save_hf_checkpoint(model, tmp_path / "hf", format="transformers")
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == name and "auto_map" not in hf
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == {"kimi_linear": "KimiLinearForCausalLM",
                                     "deepseek_v3": "DeepseekV3ForCausalLM"}[name]
    ref = k2jax_logits(model)
    assert np.abs(ref).max() > 0.1
    assert error_ratio(ref, torch_logits(theirs)) <= TOL
    # ... and what transformers saves from it loads back into k2jax, every parameter bit for bit.
    theirs.save_pretrained(tmp_path / "resaved")
    back = load_hf_checkpoint(tmp_path / "resaved")
    ours = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Variable))}
    for path, var in nnx.to_flat_state(nnx.state(back, nnx.Variable)):
        np.testing.assert_array_equal(np.asarray(var.get_value()), ours[tuple(path)], err_msg=str(path))
    assert len(ours) == len(list(nnx.to_flat_state(nnx.state(back, nnx.Variable))))

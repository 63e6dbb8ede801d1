"""HF checkpoint interop. The checkpoints are written here by a hand-made writer that follows the released
model.safetensors.index.json name by name (not k2jax.hf's mapping), then loaded and compared parameter by parameter
and through logits.
transformers 5's conventions are checked here without torch (config.json as transformers writes it, its tensor
names renamed by hand); test_hf_transformers.py compares against transformers' own models."""

import json
import logging
import os
import pickle
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import k2jax.hf.load as hf_load
import k2jax.hf.save as hf_save
from k2jax import KimiLinear, load_config
from k2jax.checkpoint import restore_params, save_params
from k2jax.config import ConfigError
from k2jax.convert import main as convert_main
from k2jax.hf import (
    CheckpointError,
    config_from_hf,
    hf_config_dict,
    load_hf_checkpoint,
    save_hf_checkpoint,
    transformers_attention_factor,
)
from k2jax.hf.compressed_tensors import compressed_tensors_config
from k2jax.layers.rope import yarn_get_mscale
from k2jax.sharding import logical_to_mesh_spec
from tests.conftest import error_ratio

BF16 = ml_dtypes.bfloat16


def _k2_tiny():
    """An all-MLA, RoPE (YaRN), q-LoRA variant of the tiny config: the Kimi K2 / DeepSeek-V3 code path."""
    return load_config("tiny").replace(
        kda_layers=None, full_attn_layers=None, mla_use_nope=False, q_lora_rank=16,
        moe_router_weights_from_biased_scores=False,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})


def _randomized(config, seed):
    """A model whose every variable (norm weights and router biases included) holds distinct random values,
    rounded to bf16-representable float32 so that fp32 and bf16 files load to the same numbers."""
    model = KimiLinear(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        v = np.asarray(var.get_value(), np.float32)
        v = (v + 0.05 * rng.standard_normal(v.shape)).astype(BF16).astype(np.float32)
        flat.append((path, var.replace(jnp.asarray(v, var.get_value().dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _np(x):
    return np.asarray(x[...], np.float32)


def hand_written_hf_tensors(model, scheme):
    """HF names and layouts written out by hand from the released checkpoints' index (Linear weights are [out, in])."""
    c = model.config
    t = {"model.embed_tokens.weight": _np(model.embed_tokens), "model.norm.weight": _np(model.norm.weight)}
    if not c.tie_word_embeddings:
        t["lm_head.weight"] = _np(model.lm_head.kernel).T
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _np(layer.input_layernorm.weight)
        t[p + "post_attention_layernorm.weight"] = _np(layer.post_attention_layernorm.weight)
        a = layer.self_attn
        if layer.layer_type == "kda":
            for n in ("q_proj", "k_proj", "v_proj", "f_a_proj", "f_b_proj", "b_proj", "g_a_proj", "g_b_proj",
                      "o_proj"):
                t[p + f"self_attn.{n}.weight"] = _np(getattr(a, n).kernel).T
            for n in ("q_conv1d", "k_conv1d", "v_conv1d"):
                ours = _np(getattr(a, n).weight)  # [W, D]
                hf = np.zeros((ours.shape[1], 1, ours.shape[0]), np.float32)
                for tap in range(ours.shape[0]):
                    hf[:, 0, tap] = ours[tap, :]  # tap W-1 multiplies the current token in both layouts
                t[p + f"self_attn.{n}.weight"] = hf
            t[p + "self_attn.A_log"] = _np(a.A_log)[None, None, :, None]
            t[p + "self_attn.dt_bias"] = _np(a.dt_bias)
            t[p + "self_attn.o_norm.weight"] = _np(a.o_norm.weight)
        else:
            names = ["q_proj"] if c.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
            for n in names + ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]:
                t[p + f"self_attn.{n}.weight"] = _np(getattr(a, n).kernel).T
            t[p + "self_attn.kv_a_layernorm.weight"] = _np(a.kv_a_layernorm.weight)
            if c.q_lora_rank is not None:
                t[p + "self_attn.q_a_layernorm.weight"] = _np(a.q_a_layernorm.weight)
        if layer.is_moe:
            moe = layer.block_sparse_moe
            m = p + ("block_sparse_moe." if scheme == "kimi" else "mlp.")
            t[m + "gate.weight"] = _np(moe.gate.kernel).T
            t[m + "gate.e_score_correction_bias"] = _np(moe.gate.e_score_correction_bias)
            w1, w2, w3 = _np(moe.experts.w1), _np(moe.experts.w2), _np(moe.experts.w3)
            names = ("w1", "w2", "w3") if scheme == "kimi" else ("gate_proj", "down_proj", "up_proj")
            for e in range(c.num_experts):
                t[m + f"experts.{e}.{names[0]}.weight"] = w1[e].T  # [I, hidden]
                t[m + f"experts.{e}.{names[1]}.weight"] = w2[e].T  # [hidden, I]
                t[m + f"experts.{e}.{names[2]}.weight"] = w3[e].T
            for n in ("gate_proj", "up_proj", "down_proj"):
                t[m + f"shared_experts.{n}.weight"] = _np(getattr(moe.shared_experts, n).kernel).T
        else:
            for n in ("gate_proj", "up_proj", "down_proj"):
                t[p + f"mlp.{n}.weight"] = _np(getattr(layer.mlp, n).kernel).T
    return t


def write_hf_folder(folder, config, tensors, *, shards=1, dtype=np.float32, hf_config=None):
    """A checkpoint folder: config.json and `shards` safetensors files (with an index when shards > 1).

    Arrays are made C-contiguous first: safetensors.numpy.save_file writes a transposed view's memory as is."""
    tensors = {n: np.ascontiguousarray(v.astype(dtype) if v.dtype == np.float32 else v) for n, v in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    cfg = hf_config if hf_config is not None else hf_config_dict(config.replace(
        param_dtype="bfloat16" if dtype == BF16 else "float32"))
    (folder / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n] for n in names}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        return folder
    weight_map = {}
    for s, part in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def assert_same_params(source, loaded, dtype=np.float32):
    src = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(source, nnx.Variable))}
    got = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Variable))}
    assert src.keys() == got.keys()
    for path, v in src.items():
        a, b = np.asarray(v.get_value()), np.asarray(got[path].get_value())
        assert type(v) is type(got[path]), path
        assert a.shape == b.shape, path
        expected_dtype = np.float32 if path[-1] in ("A_log", "dt_bias", "e_score_correction_bias") else dtype
        assert b.dtype == expected_dtype, (path, b.dtype)
        np.testing.assert_array_equal(a.astype(np.float32), b.astype(np.float32), err_msg=str(path))


@pytest.fixture(scope="module")
def hybrid():
    return _randomized(load_config("tiny"), 1)


@pytest.fixture(scope="module")
def k2():
    return _randomized(_k2_tiny(), 2)


@pytest.fixture(scope="module")
def hybrid_folder(hybrid, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "hybrid_f32"
    return write_hf_folder(folder, hybrid.config, hand_written_hf_tensors(hybrid, "kimi"))


TOKENS = jnp.array([[3, 17, 255, 0, 42, 9, 100, 7, 1, 2, 3]], jnp.int32)


def _logits(model):
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, TOKENS))


# ---- loading ---------------------------------------------------------------------------------------------------------
def test_load_single_file_fp32_every_param_and_logits(hybrid, hybrid_folder):
    loaded = load_hf_checkpoint(hybrid_folder)
    assert loaded.config.replace(name=hybrid.config.name) == hybrid.config
    assert_same_params(hybrid, loaded)
    ref, got = _logits(hybrid), _logits(loaded)
    assert np.abs(ref).max() > 0.1  # a real signal, so equal logits mean something
    assert error_ratio(ref, got) == 0.0


def test_load_two_shards_bf16(hybrid, tmp_path, monkeypatch):
    folder = write_hf_folder(tmp_path / "bf16", hybrid.config, hand_written_hf_tensors(hybrid, "kimi"), shards=2,
                             dtype=BF16)
    assert len(list(folder.glob("*.safetensors"))) == 2

    monkeypatch.setattr(hf_load, "_BLOCK_BYTES", 100)  # many small blocks: the streaming re-layout and cast loops
    assert_same_params(hybrid, load_hf_checkpoint(folder, dtype="float32"))
    monkeypatch.undo()
    native = load_hf_checkpoint(folder)  # the checkpoint's own dtype (config.json "dtype": bfloat16)
    assert_same_params(hybrid, native, dtype=BF16)
    assert native.config.param_dtype == "bfloat16"


def test_load_k2_deepseek_names(k2, tmp_path):
    tensors = hand_written_hf_tensors(k2, "deepseek")
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in tensors
    folder = write_hf_folder(tmp_path / "k2", k2.config, tensors, shards=2)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "kimi_k2"
    loaded = load_hf_checkpoint(folder)
    assert loaded.config.replace(name=k2.config.name) == k2.config
    assert_same_params(k2, loaded)
    assert error_ratio(_logits(k2), _logits(loaded)) == 0.0


def test_load_onto_mesh(hybrid, hybrid_folder):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("fsdp", "expert", "tensor"))
    loaded = load_hf_checkpoint(hybrid_folder, mesh=mesh)
    assert_same_params(hybrid, loaded)
    P = jax.sharding.PartitionSpec
    assert loaded.layers[0].self_attn.q_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert loaded.layers[1].block_sparse_moe.experts.w2[...].sharding.spec == P("expert", "tensor", "fsdp")
    assert loaded.embed_tokens[...].sharding.spec == P("tensor", "fsdp")
    assert loaded.layers[0].self_attn.A_log[...].sharding.mesh == mesh


def test_logical_to_mesh_spec_rules():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    P = jax.sharding.PartitionSpec
    assert logical_to_mesh_spec(("embed", "heads"), mesh) == P("fsdp", "tensor")
    assert logical_to_mesh_spec(("expert", "expert_embed", "expert_mlp"), mesh) == P(None, "fsdp", "tensor")
    assert logical_to_mesh_spec(("batch", "length"), mesh) == P("fsdp", None)  # data/expert absent from the mesh
    assert logical_to_mesh_spec(("embed", "heads"), mesh, (64, 6)) == P("fsdp", None)  # 6 % 4 != 0: replicate
    assert logical_to_mesh_spec(("embed", "embed"), mesh) == P("fsdp", None)  # a mesh axis is used once
    with pytest.raises(ValueError, match="unknown logical axis"):
        logical_to_mesh_spec(("nope",), mesh)


def test_mtp_layers_are_skipped_with_a_note(hybrid, tmp_path, caplog):
    tensors = hand_written_hf_tensors(hybrid, "kimi")
    L = hybrid.config.num_hidden_layers
    tensors[f"model.layers.{L}.eh_proj.weight"] = np.ones((4, 4), np.float32)
    cfg = hf_config_dict(hybrid.config) | {"num_nextn_predict_layers": 1}
    folder = write_hf_folder(tmp_path / "mtp", hybrid.config, tensors, hf_config=cfg)
    with caplog.at_level(logging.WARNING, logger="k2jax.hf"):
        loaded = load_hf_checkpoint(folder)
    assert "multi-token-prediction" in caplog.text
    assert_same_params(hybrid, loaded)


# ---- bad inputs ------------------------------------------------------------------------------------------------------
def test_mismatches_are_reported_together(hybrid, tmp_path):
    tensors = hand_written_hf_tensors(hybrid, "kimi")
    del tensors["model.layers.0.self_attn.q_conv1d.weight"]
    del tensors["model.layers.1.block_sparse_moe.experts.5.w2.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.layers.3.self_attn.kv_b_proj.weight"] = tensors["model.layers.3.self_attn.kv_b_proj.weight"].T
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    folder = write_hf_folder(tmp_path / "bad", hybrid.config, tensors)
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(folder)
    msg = str(info.value)
    for expected in ("missing tensors (2)", "model.layers.0.self_attn.q_conv1d.weight",
                     "model.layers.1.block_sparse_moe.experts.5.w2.weight", "unexpected tensors (1)",
                     "model.layers.0.self_attn.extra.weight", "wrong shapes (1)",
                     "model.layers.3.self_attn.kv_b_proj.weight: checkpoint [16, 64], model expects [64, 16]",
                     "model.norm.weight: I32"):
        assert expected in msg


def test_bad_config_and_files(hybrid, hybrid_folder, tmp_path):
    tensors = hand_written_hf_tensors(hybrid, "kimi")
    cfg = hf_config_dict(hybrid.config)
    llama = write_hf_folder(tmp_path / "llama", hybrid.config, tensors, hf_config=cfg | {"model_type": "llama"})
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        load_hf_checkpoint(llama)
    quant = cfg | {"quantization_config": {"quant_method": "fp8"}}  # only compressed-tensors INT4 experts load
    with pytest.raises(ConfigError, match="quantization_config.quant_method = 'fp8' is not supported"):
        load_hf_checkpoint(write_hf_folder(tmp_path / "q", hybrid.config, tensors, hf_config=quant))
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_hf_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not supported for parameters"):
        load_hf_checkpoint(hybrid_folder, dtype="int8")


def test_truncated_and_corrupt_files_name_the_file(hybrid_folder, tmp_path):
    data = (hybrid_folder / "model.safetensors").read_bytes()
    for name, content, pattern in (("trunc", data[:-100], "truncated safetensors file"),
                                   ("header", data[:20], "corrupt or truncated"),
                                   ("garbage", b"\x05\x00\x00\x00\x00\x00\x00\x00{]]]]", "corrupt safetensors header"),
                                   ("tiny", b"abc", "not a safetensors file")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_bytes((hybrid_folder / "config.json").read_bytes())
        (folder / "model.safetensors").write_bytes(content)
        with pytest.raises(CheckpointError, match=pattern) as info:
            load_hf_checkpoint(folder)
        assert str(folder / "model.safetensors") in str(info.value)


class _Tripwire:
    """Unpickling this creates a marker file: the test proves the loader never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_weights_are_refused_never_unpickled(hybrid_folder, tmp_path):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "pt"
    folder.mkdir()
    (folder / "config.json").write_bytes((hybrid_folder / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    with pytest.raises(CheckpointError, match="refusing pickle-based weights"):
        load_hf_checkpoint(folder)
    with pytest.raises(CheckpointError, match="refusing pickle-based weights"):
        load_hf_checkpoint(folder / "pytorch_model.bin")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model.bin"}}))
    with pytest.raises(CheckpointError, match="refusing pickle-based weights"):
        load_hf_checkpoint(folder)
    assert not marker.exists()


# ---- saving ----------------------------------------------------------------------------------------------------------
def test_save_writes_hf_names_layouts_and_index(hybrid, tmp_path):
    out = save_hf_checkpoint(hybrid, tmp_path / "saved", max_shard_size="40KB")
    expected = hand_written_hf_tensors(hybrid, "kimi")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    seen, total = set(), 0
    for shard in shards:
        with safe_open(str(out / shard), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            nbytes = 0
            for name in f.keys():
                arr = f.get_tensor(name)
                assert index["weight_map"][name] == shard
                np.testing.assert_array_equal(arr, expected[name], err_msg=name)
                nbytes += arr.nbytes
                seen.add(name)
            assert nbytes <= 40_000 or len(f.keys()) == 1
            total += nbytes
    assert seen == set(expected) and index["metadata"]["total_size"] == total
    assert_same_params(hybrid, load_hf_checkpoint(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_single_file_bf16_and_k2_format(k2, tmp_path):
    model_bf16 = nnx.merge(*_cast(k2, jnp.bfloat16))
    out = save_hf_checkpoint(model_bf16, tmp_path / "k2")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.layers.2.mlp.experts.7.down_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.0.self_attn.q_a_proj.weight").get_shape() == [16, 64]
    loaded = load_hf_checkpoint(out)
    assert_same_params(k2, loaded, dtype=BF16)


def _cast(model, dtype):
    graphdef, state = nnx.split(model)
    flat = [(p, v.replace(v.get_value().astype(dtype) if p[-1] not in ("A_log", "dt_bias", "e_score_correction_bias")
                          else v.get_value())) for p, v in nnx.to_flat_state(state)]
    return graphdef, nnx.from_flat_state(flat)


def test_save_is_atomic_and_refuses_to_clobber(hybrid, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError):
        save_hf_checkpoint(hybrid, target)
    assert (target / "keep.txt").read_text() == "old"


    calls = []

    def failing_writer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_writer(*args, **kwargs)

    real_writer = hf_save.write_safetensors
    monkeypatch.setattr(hf_save, "write_safetensors", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(hybrid, target, max_shard_size="40KB", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and (target / "keep.txt").exists()
    monkeypatch.setattr(hf_save, "write_safetensors", real_writer)
    save_hf_checkpoint(hybrid, target, overwrite=True)
    assert not (target / "keep.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_config_json_of_the_48b_model_matches_the_release():
    hf = hf_config_dict(load_config("kimi_linear_48b_a3b"))
    expected = {
        "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "vocab_size": 163840,
        "hidden_size": 2304, "head_dim": 72, "intermediate_size": 9216, "num_hidden_layers": 27,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False, "model_max_length": 1048576,
        "bos_token_id": 163584, "eos_token_id": 163586, "pad_token_id": 163839, "q_lora_rank": None,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "mla_use_nope": True, "num_experts": 256, "num_experts_per_token": 8, "num_shared_experts": 1,
        "moe_intermediate_size": 1024, "moe_router_activation_func": "sigmoid", "moe_renormalize": True,
        "routed_scaling_factor": 2.446, "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
        "auto_map": {"AutoConfig": "configuration_kimi.KimiLinearConfig",
                     "AutoModel": "modeling_kimi.KimiLinearModel",
                     "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM"},
        "linear_attn_config": {"full_attn_layers": [4, 8, 12, 16, 20, 24, 27], "head_dim": 128,
                               "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25,
                                              26], "num_heads": 32, "short_conv_kernel_size": 4},
    }
    assert {k: hf[k] for k in expected} == expected


# ---- orbax and the converter -----------------------------------------------------------------------------------------
def test_orbax_params_round_trip_on_a_mesh(hybrid, tmp_path):
    path = save_params(hybrid, tmp_path / "orbax")
    with pytest.raises(FileExistsError):
        save_params(hybrid, path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    restored = restore_params(None, path, mesh=mesh)
    assert restored.config == hybrid.config
    assert_same_params(hybrid, restored)
    assert restored.layers[0].self_attn.q_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp",
                                                                                                       "tensor")
    with pytest.raises(ValueError, match="do not fit"):
        restore_params(hybrid.config.replace(hidden_size=32), path)


def test_convert_cli_round_trip(hybrid_folder, tmp_path, capsys):
    orbax_dir, hf_dir = tmp_path / "o", tmp_path / "h"
    assert convert_main(["hf-to-orbax", "--hf", str(hybrid_folder), "--out", str(orbax_dir)]) == 0
    assert convert_main(["orbax-to-hf", "--orbax", str(orbax_dir), "--out", str(hf_dir),
                         "--max-shard-size", "100KB"]) == 0
    with safe_open(str(hybrid_folder / "model.safetensors"), framework="numpy") as src:
        names = set(src.keys())
        index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == names
        for name in names:
            with safe_open(str(hf_dir / index["weight_map"][name]), framework="numpy") as f:
                np.testing.assert_array_equal(f.get_tensor(name), src.get_tensor(name), err_msg=name)
    capsys.readouterr()
    assert convert_main(["hf-to-orbax", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err
    assert convert_main(["orbax-to-hf", "--orbax", str(orbax_dir), "--out", str(hf_dir)]) == 2  # exists
    assert os.listdir(tmp_path) and not (tmp_path / "x").exists()


# ---- transformers 5's conventions, without torch ---------------------------------------------------------------------
def _hybrid_mid_mla():
    """The tiny hybrid with its MLA layer mid-stack and transformers' routing rule (weights from the plain scores)."""
    return load_config("tiny").replace(kda_layers=(1, 3, 4), full_attn_layers=(2,),
                                       moe_router_weights_from_biased_scores=False, pad_token_id=None)


# What transformers 5.24 writes for _hybrid_mid_mla() (KimiLinearForCausalLM(...).save_pretrained, copied verbatim).
TRANSFORMERS_KIMI = {
    "architectures": ["KimiLinearForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "dtype": "float32", "eos_token_id": 2, "head_dim": 8, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 128, "kv_lora_rank": 16,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    "linear_conv_kernel_dim": 4, "linear_head_dim": 16, "linear_num_heads": 2,
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "model_max_length": 4096, "model_type": "kimi_linear",
    "moe_intermediate_size": 32, "moe_renormalize": True, "num_attention_heads": 2, "num_expert_group": 4,
    "num_experts": 8, "num_experts_per_token": 2, "num_hidden_layers": 4, "num_key_value_heads": 2,
    "num_shared_experts": 1, "output_router_logits": False, "pad_token_id": None, "pretraining_tp": 1,
    "q_lora_rank": None, "qk_head_dim": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-05,
    "routed_scaling_factor": 2.446, "tie_word_embeddings": False, "topk_group": 2, "transformers_version": "5.24.0",
    "use_cache": True, "v_head_dim": 16, "vocab_size": 256,
}
# ... and for _k2_tiny() as DeepseekV3ForCausalLM (pad_token_id null, num_nextn_predict_layers its default 1).
TRANSFORMERS_DEEPSEEK = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "dtype": "float32", "eos_token_id": 2, "first_k_dense_replace": 1, "head_dim": 8, "hidden_act": "silu",
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128, "kv_lora_rank": 16,
    "max_position_embeddings": 4096, "model_type": "deepseek_v3", "moe_intermediate_size": 32, "n_group": 4,
    "n_routed_experts": 8, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 2,
    "num_experts_per_tok": 2, "num_hidden_layers": 4, "num_key_value_heads": 2, "num_nextn_predict_layers": 1,
    "output_router_logits": False, "pad_token_id": None, "pretraining_tp": 1, "q_lora_rank": 16, "qk_head_dim": 24,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-05, "rope_interleave": True,
    "rope_parameters": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                        "original_max_position_embeddings": 64, "rope_theta": 10000.0, "rope_type": "yarn"},
    "routed_scaling_factor": 2.446, "tie_word_embeddings": False, "topk_group": 2, "transformers_version": "5.24.0",
    "use_cache": True, "v_head_dim": 16, "vocab_size": 256,
}


def _same_model(config, expected):
    """config equals expected up to name and what does not change the model: kda_chunk_size, which a transformers
    config.json does not carry, the KDA settings of a model without KDA layers, and the pad token."""
    e = expected
    keep = dict(name=e.name, pad_token_id=e.pad_token_id, kda_chunk_size=e.kda_chunk_size)
    if not e.kda_layers:
        keep.update(kda_num_heads=e.kda_num_heads, kda_head_dim=e.kda_head_dim,
                    short_conv_kernel_size=e.short_conv_kernel_size)
    return config.replace(**keep) == e


def test_transformers_config_json_reads_as_transformers_computes():
    kimi = config_from_hf(TRANSFORMERS_KIMI)
    assert _same_model(kimi, _hybrid_mid_mla())
    assert (kimi.kda_layers, kimi.full_attn_layers, kimi.first_k_dense_replace, kimi.moe_layer_freq) == \
        ((1, 3, 4), (2,), 1, 1)
    assert kimi.pad_token_id is None and kimi.max_position_embeddings == 4096
    assert not kimi.moe_router_weights_from_biased_scores  # transformers' KimiLinear: weights from plain scores
    remote = config_from_hf(hf_config_dict(_hybrid_mid_mla().replace(moe_router_weights_from_biased_scores=True)))
    assert remote.moe_router_weights_from_biased_scores  # the released code's rule, from the released keys
    k2 = config_from_hf(TRANSFORMERS_DEEPSEEK)
    assert _same_model(k2, _k2_tiny())
    assert k2.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert k2.pad_token_id is None and k2.rope_interleave and k2.mla_use_nope is False


def test_rope_parameters_follow_transformers_rules():
    def read(rope, **extra):
        return config_from_hf(TRANSFORMERS_DEEPSEEK | {"rope_parameters": rope} | extra)

    plain = read({"rope_type": "default", "rope_theta": 50000.0})
    assert plain.rope_scaling is None and plain.rope_theta == 50000.0
    # transformers: m(f, mscale) / m(f, mscale_all_dim) only when both are set, else m(f, 1); the remote code's
    # rule gives m(f, 0.707) here, so k2jax records transformers' value.
    one = read({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64,
                "mscale": 0.707, "beta_fast": 0, "beta_slow": None})
    assert one.rope_scaling["attention_factor"] == pytest.approx(yarn_get_mscale(4.0))
    assert (one.rope_scaling["beta_fast"], one.rope_scaling["beta_slow"]) == (32.0, 1.0)  # 0 / null: defaults
    assert transformers_attention_factor({"mscale": 0.707}, 4.0) == yarn_get_mscale(4.0, 1.0)
    # factor left out: max_position_embeddings / original_max_position_embeddings; explicit attention_factor kept.
    implied = read({"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 1024,
                    "attention_factor": 1.25})
    assert implied.rope_scaling["factor"] == 4.0 and implied.rope_scaling["attention_factor"] == 1.25
    assert read({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64},
                rope_interleave=False).rope_interleave is False
    # transformers' DeepSeek-V3 reads an old-style rope_scaling with the same rules.
    old_key = {k: v for k, v in TRANSFORMERS_DEEPSEEK.items() if k != "rope_parameters"} | {
        "rope_theta": 1e4, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                            "mscale": 0.707}}
    assert config_from_hf(old_key).rope_scaling["attention_factor"] == pytest.approx(yarn_get_mscale(4.0))
    # ... while the released code's rope_scaling keeps the released rule: m(4, 0.707) / m(4, 0).
    remote = config_from_hf(hf_config_dict(_k2_tiny().replace(rope_scaling=old_key["rope_scaling"])))
    assert "attention_factor" not in remote.rope_scaling


def _mutated(base, change):
    out = json.loads(json.dumps(base))
    for key, value in change.items():
        if value is _DROP:
            out.pop(key)
        else:
            out[key] = value
    return out


_DROP = object()
_YARN = TRANSFORMERS_DEEPSEEK["rope_parameters"]


@pytest.mark.parametrize("base, change, message", [
    ("kimi", {"sliding_window": 128}, "unknown config.json key(s) ['sliding_window']"),
    ("kimi", {"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported"),
    ("kimi", {"attention_bias": True}, "attention_bias = True is not supported"),
    ("deepseek", {"topk_method": "greedy"}, "topk_method = 'greedy' is not supported"),
    ("deepseek", {"rope_parameters": {**_YARN, "rope_type": "longrope"}}, "rope_type = 'longrope' is not supported"),
    ("deepseek", {"rope_parameters": {**_YARN, "truncate": False}}, "truncate = False is not supported"),
    ("deepseek", {"rope_parameters": {**_YARN, "partial_rotary_factor": 0.5}}, "partial_rotary_factor = 0.5"),
    ("deepseek", {"rope_parameters": {**_YARN, "low_freq_factor": 1.0}}, "unknown keys ['low_freq_factor']"),
    ("deepseek", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "both rope_scaling"),
    ("deepseek", {"rope_theta": 5e4}, "rope_theta = 50000.0 and rope_parameters.rope_theta = 10000.0 differ"),
    ("deepseek", {"moe_layer_freq": 2}, "moe_layer_freq = 2, but this config.json was written by transformers"),
    ("deepseek", {"scoring_func": "softmax"}, "scoring_func = 'softmax', but this config.json was written"),
    ("kimi", {"mla_use_nope": False}, "mla_use_nope = False, but this config.json was written by transformers"),
    ("kimi", {"moe_router_activation_func": "softmax"}, "moe_router_activation_func = 'softmax', but"),
    ("kimi", {"num_local_experts": 16}, "num_experts = 8 and num_local_experts = 16 are two spellings"),
    ("kimi", {"layer_types": ["linear_attention"] * 3}, "layer_types = "),
    ("kimi", {"mlp_layer_types": ["dense", "sparse", "dense", "sparse"]}, "has no k2jax equivalent"),
    ("kimi", {"first_k_dense_replace": 2}, "place the MoE layers differently"),
    ("kimi", {"linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 2,
                                     "head_dim": 16, "short_conv_kernel_size": 4}}, "describe different layers"),
    ("kimi", {"rms_norm_eps": _DROP}, "does not set ['rms_norm_eps']"),
    ("deepseek", {"routed_scaling_factor": _DROP}, "does not set ['routed_scaling_factor']"),
    ("deepseek", {"q_lora_rank": _DROP, "rope_parameters": {"rope_type": "default"}},
     "does not set ['q_lora_rank', 'rope_theta']"),
    ("kimi", {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}},
     "quantization_config.quant_method = 'fp8' is not supported"),
])
def test_config_keys_that_change_the_math_are_never_ignored(base, change, message):
    hf = _mutated({"kimi": TRANSFORMERS_KIMI, "deepseek": TRANSFORMERS_DEEPSEEK}[base], change)
    with pytest.raises(ConfigError) as info:
        config_from_hf(hf, source="the/config.json")
    assert message in str(info.value) and "the/config.json" in str(info.value)


def test_load_config_reads_null_token_ids_and_quantization_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TRANSFORMERS_DEEPSEEK | {"bos_token_id": None}))
    cfg = load_config(tmp_path)
    assert (cfg.bos_token_id, cfg.pad_token_id, cfg.eos_token_id) == (None, None, 2)
    no_ids = {k: v for k, v in TRANSFORMERS_DEEPSEEK.items() if not k.endswith("_token_id")}
    assert config_from_hf(no_ids).pad_token_id is None  # not Kimi's 163839, which a 256-token vocabulary lacks
    q = {"experts": "int4", "group_size": 32, "scale_dtype": "bfloat16", "qat": False}
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(_k2_tiny()) | {
        "quantization_config": compressed_tensors_config(q)}))
    assert load_config(tmp_path / "config.json").quantization == q


def _transformers_names(tensors, config):
    """The names transformers' save_pretrained writes for Kimi-Linear: the dense MLP under block_sparse_moe."""
    dense = [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]
    return {re.sub(rf"^model\.layers\.({'|'.join(map(str, dense))})\.mlp\.", r"model.layers.\1.block_sparse_moe.", n): v
            for n, v in tensors.items()}


def _fused(tensors, config, scheme):
    """transformers' in-memory names (save_pretrained(..., save_original_format=False)), fused by hand: q/k/v convs
    stacked into conv1d, the KDA gate under forget_gate, experts stacked into gate_up_proj [E, 2I, hidden] and
    down_proj [E, hidden, I], every MoE under mlp."""
    gate, up, down = ("w1", "w3", "w2") if scheme == "kimi" else ("gate_proj", "up_proj", "down_proj")
    out = {}
    for name, value in tensors.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        name = re.sub(r"\.self_attn\.(f_a_proj|f_b_proj|dt_bias|A_log)", r".self_attn.forget_gate.\1", name)
        if not re.search(r"\.(q|k|v)_conv1d\.|\.experts\.\d+\.", name):
            out[name] = value
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if f"{p}self_attn.q_conv1d.weight" in tensors:
            out[f"{p}self_attn.conv1d.weight"] = np.concatenate(
                [tensors[f"{p}self_attn.{n}_conv1d.weight"] for n in "qkv"], axis=0)
        if config.is_moe_layer(i):
            m, E = p + ("block_sparse_moe." if scheme == "kimi" else "mlp."), config.num_experts
            out[f"{p}mlp.experts.gate_up_proj"] = np.stack([np.concatenate(
                [tensors[f"{m}experts.{e}.{gate}.weight"], tensors[f"{m}experts.{e}.{up}.weight"]]) for e in range(E)])
            out[f"{p}mlp.experts.down_proj"] = np.stack([tensors[f"{m}experts.{e}.{down}.weight"] for e in range(E)])
    return out


@pytest.mark.parametrize("naming", ["transformers-saved", "transformers-fused"])
def test_transformers_tensor_names_load_every_param(naming, tmp_path):
    model = _randomized(_hybrid_mid_mla(), 4)
    tensors = hand_written_hf_tensors(model, "kimi")
    tensors = _transformers_names(tensors, model.config) if naming == "transformers-saved" else \
        _fused(tensors, model.config, "kimi")
    assert ("model.layers.0.block_sparse_moe.up_proj.weight" in tensors) == (naming == "transformers-saved")
    folder = write_hf_folder(tmp_path / naming, model.config, tensors,
                             hf_config=TRANSFORMERS_KIMI | {"kda_chunk_size": 16})
    loaded = load_hf_checkpoint(folder)
    assert loaded.config.replace(name="tiny") == model.config
    assert_same_params(model, loaded)


def test_fused_deepseek_experts_load_every_param(k2, tmp_path):
    folder = write_hf_folder(tmp_path / "fused", k2.config, _fused(hand_written_hf_tensors(k2, "deepseek"), k2.config,
                                                                    "deepseek"), shards=2)
    assert_same_params(k2, load_hf_checkpoint(folder))


def test_save_transformers_format_names_and_refusals(tmp_path):
    model = _randomized(_hybrid_mid_mla(), 5)
    out = save_hf_checkpoint(model, tmp_path / "t", format="transformers")
    hf = json.loads((out / "config.json").read_text())
    derived = ("head_dim", "qk_head_dim", "output_router_logits", "pretraining_tp", "transformers_version")
    assert {k: hf.get(k) for k in TRANSFORMERS_KIMI if k not in derived} == \
        {k: v for k, v in TRANSFORMERS_KIMI.items() if k not in derived}
    assert "auto_map" not in hf and "linear_attn_config" not in hf
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(_transformers_names(hand_written_hf_tensors(model, "kimi"), model.config))
    assert_same_params(model, load_hf_checkpoint(out))
    # What transformers' classes cannot compute is refused before anything is written.
    for config, field in ((_hybrid_mid_mla().replace(mla_latent_norm_eps=1e-5), "mla_latent_norm_eps"),
                          (_hybrid_mid_mla().replace(tie_word_embeddings=True), "tie_word_embeddings"),
                          (_hybrid_mid_mla().replace(moe_router_activation_func="softmax"),
                           "moe_router_activation_func"),
                          (_hybrid_mid_mla().replace(num_expert_group=4, topk_group=2, use_grouped_topk=False),
                           "use_grouped_topk"),
                          (_k2_tiny().replace(moe_layer_freq=2), "moe_layer_freq")):
        with pytest.raises(ValueError, match=field):
            hf_config_dict(config, format="transformers")
    biased = _randomized(_hybrid_mid_mla().replace(moe_router_weights_from_biased_scores=True), 5)
    with pytest.raises(ValueError, match="moe_router_weights_from_biased_scores"):
        save_hf_checkpoint(biased, tmp_path / "refused", format="transformers")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="format 'torch' is not one of"):
        save_hf_checkpoint(model, tmp_path / "refused", format="torch")
    # With every correction bias zero the two routing rules pick and weigh the experts identically, so the
    # biased-rule model saves, as transformers' rule.
    graphdef, state = nnx.split(biased)
    flat = [(p, v.replace(jnp.zeros_like(v.get_value())) if p[-1] == "e_score_correction_bias" else v)
            for p, v in nnx.to_flat_state(state)]
    zero = nnx.merge(graphdef, nnx.from_flat_state(flat))
    reloaded = load_hf_checkpoint(save_hf_checkpoint(zero, tmp_path / "zero", format="transformers"))
    assert not reloaded.config.moe_router_weights_from_biased_scores
    assert_same_params(zero, reloaded)


def test_transformers_config_classes_read_our_transformers_format(tmp_path):
    transformers = pytest.importorskip("transformers")
    for i, config in enumerate((_hybrid_mid_mla(), _k2_tiny().replace(rope_interleave=False))):
        ours = hf_config_dict(config, format="transformers")
        theirs = transformers.AutoConfig.for_model(**ours)
        if config.kda_layers is not None:
            assert theirs.layer_types == ours["layer_types"] and theirs.num_local_experts == config.num_experts
            assert theirs.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"]
            assert (theirs.linear_num_heads, theirs.linear_head_dim) == (config.kda_num_heads, config.kda_head_dim)
        else:
            assert theirs.rope_parameters["factor"] == 4.0 and theirs.rope_interleave is False
            assert theirs.num_local_experts == config.num_experts and theirs.n_group == config.num_expert_group
        theirs.save_pretrained(tmp_path / str(i))  # what transformers writes back reads as the same model
        again = config_from_hf(json.loads((tmp_path / str(i) / "config.json").read_text()))
        assert _same_model(again, config) and again.kda_chunk_size == config.kda_chunk_size

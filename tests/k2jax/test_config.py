"""Config loading and validation: every bad field fails at load with a message naming it."""

import importlib.util
import json
from pathlib import Path

import pytest

from k2jax.config import ConfigError, ModelConfig, apply_overrides, parse_overrides
from k2jax.config_files import available_configs, load_config
from k2jax.serving.config import ServeConfig
from k2jax.serving.limits import ServerLimits
from k2jax.training.config import TrainConfig


def test_shipped_configs_load():
    assert {"default", "tiny", "kimi_linear_48b_a3b", "kimi_k2"} <= set(available_configs())
    for name in available_configs():
        cfg = load_config(name)
        assert cfg.name == name


def test_released_48b_values():
    cfg = load_config("kimi_linear_48b_a3b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_token) == (2304, 27, 256, 8)
    assert cfg.routed_scaling_factor == 2.446 and cfg.rms_norm_eps == 1e-5 and cfg.mla_latent_norm_eps == 1e-6
    assert cfg.mla_use_nope and cfg.q_lora_rank is None and cfg.moe_router_weights_from_biased_scores
    assert cfg.layer_types.count("kda") == 20


def test_k2_is_all_mla_with_yarn():
    cfg = load_config("kimi_k2")
    assert set(cfg.layer_types) == {"mla"} and cfg.use_rope and cfg.q_lora_rank == 1536
    assert cfg.rope_scaling["type"] == "yarn"


@pytest.mark.parametrize("overrides, field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(kda_layers=[1, 2, 9], full_attn_layers=[3, 4]), "kda_layers"),
    (dict(kda_layers=[0, 1, 2], full_attn_layers=[3, 4]), "kda_layers"),
    (dict(kda_layers=[1, 2], full_attn_layers=[4]), "full_attn_layers"),
    (dict(kda_layers=[1, 2, 3], full_attn_layers=[3, 4]), "kda_layers"),
    (dict(num_experts_per_token=9), "num_experts_per_token"),
    (dict(num_expert_group=3), "num_expert_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(dtype="float8"), "dtype"),
    (dict(moe_router_activation_func="relu"), "moe_router_activation_func"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(kda_impl="fast"), "kda_impl"),
    (dict(eos_token_id=100000), "eos_token_id"),
])
def test_bad_field_is_named(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config("tiny", **overrides)


def test_unknown_field_and_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field"):
        load_config("tiny", hiden_size=3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("vocab_size: 10\nnot_a_field: 1\n")
    with pytest.raises(ConfigError, match="not_a_field"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no config named"):
        load_config("no_such_config")
    broken = tmp_path / "broken.yaml"
    broken.write_text("vocab_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def _hf_kimi_linear_config():
    return {
        "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "vocab_size": 163840,
        "hidden_size": 2304, "head_dim": 72, "intermediate_size": 9216, "num_hidden_layers": 27,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False, "initializer_range": 0.02,
        "use_cache": True, "model_max_length": 1048576, "dtype": "bfloat16", "bos_token_id": 163584,
        "eos_token_id": 163586, "pad_token_id": 163839, "q_lora_rank": None, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "mla_use_nope": True,
        "num_experts": 256, "num_experts_per_token": 8, "num_shared_experts": 1, "moe_intermediate_size": 1024,
        "moe_router_activation_func": "sigmoid", "moe_renormalize": True, "routed_scaling_factor": 2.446,
        "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
        "linear_attn_config": {"full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
                               "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25,
                                              26],
                               "head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4},
    }


def test_hf_config_json_matches_shipped_yaml(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(_hf_kimi_linear_config()))
    from_hf = load_config(p)
    shipped = load_config("kimi_linear_48b_a3b")
    keep = {"name", "param_dtype", "dtype"}
    a = {k: v for k, v in from_hf.to_dict().items() if k not in keep}
    b = {k: v for k, v in shipped.to_dict().items() if k not in keep}
    assert a == b
    assert load_config(tmp_path).hidden_size == 2304  # a model folder works too


def test_hf_config_wrong_model_type(tmp_path):
    d = _hf_kimi_linear_config()
    d["model_type"] = "llama"
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        load_config(p)


# ---- the declarative config system (k2jax.config.Config) -------------------------------------------------------------
@pytest.mark.parametrize("field, value, allowed", [
    ("vocab_size", True, "must be a positive integer"),  # a bool is not an int
    ("hidden_size", "64", "must be a positive integer"),  # nor a string
    ("intermediate_size", -1, "must be a non-negative integer"),
    ("q_lora_rank", 0, "must be null (plain q_proj) or a positive integer"),
    ("tie_word_embeddings", 1, "must be true or false"),
    ("remat", "some", "must be one of 'none', 'full', 'dots', 'dots_no_batch'"),
    ("moe_capacity_factor", 0.0, "must be null (dropless) or a positive number"),
    ("kda_layers", [1, "2"], "must be null or a list of 1-based layer numbers"),
])
def test_each_field_states_its_constraint(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", **{field: value})
    assert str(info.value) == f"config field `{field}` = {value!r} is invalid: {allowed}"


def test_every_bad_field_is_reported_and_numbers_read_from_yaml_strings(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", hidden_size=0, dtype="int8")
    assert "`hidden_size` = 0" in str(info.value) and "`dtype` = 'int8'" in str(info.value)
    p = tmp_path / "m.yaml"
    p.write_text("rms_norm_eps: 1e-6\nrope_theta: 50000\n")  # PyYAML reads 1e-6 as the string '1e-6'
    cfg = load_config(p)
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 50000.0
    with pytest.raises(ConfigError, match="is frozen"):
        cfg.hidden_size = 3


def test_overrides_parse_once_for_every_command():
    sections = {"model": ModelConfig, "train": TrainConfig, "serve": ServeConfig}
    changes = parse_overrides(["hidden_size=32", "train.mesh.fsdp=2", "serve.limits.max_waiting=3",
                               "learning_rate=1e-3", "model.rope_scaling="], sections)
    assert changes == {"model": {"hidden_size": 32, "rope_scaling": None}, "serve": {"limits.max_waiting": 3},
                       "train": {"mesh.fsdp": 2, "learning_rate": "1e-3"}}
    # a key of a mapping field changes that key and keeps the others
    assert apply_overrides({"mesh": {"data": 2, "fsdp": 1}}, changes["train"])["mesh"] == {"data": 2, "fsdp": 2}
    serve = ServeConfig().with_overrides(changes["serve"])
    assert serve.limits.max_waiting == 3 and serve.limits.max_body_bytes == ServeConfig().limits.max_body_bytes
    with pytest.raises(ConfigError, match="names a field of each of"):
        parse_overrides(["seed=1"], {"train": TrainConfig, "other": TrainConfig})
    with pytest.raises(ConfigError, match="unknown override key 'serve.slot': no serve field 'slot'"):
        parse_overrides(["serve.slot=3"], sections)


def test_serve_settings_are_validated_fields():
    limits = ServerLimits()
    limits.max_waiting = 0  # mutable (the server reads it per request) and checked on assignment
    with pytest.raises(ConfigError, match=r"limits field `max_waiting` = -1 is invalid: must be a non-negative"):
        limits.max_waiting = -1
    assert limits.max_waiting == 0
    with pytest.raises(ConfigError, match=r"`request_timeout_s` = 0 is invalid: must be a positive number"):
        ServeConfig(limits={"request_timeout_s": 0})
    with pytest.raises(ConfigError, match=r"serve field `port` = 70000 is invalid: must be a port number"):
        ServeConfig(port=70000)


def test_serve_cli_rejects_bad_settings_before_loading_anything(monkeypatch):
    spec = importlib.util.spec_from_file_location("k2jax_serve_cli", Path(__file__).resolve().parents[2] / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    monkeypatch.setattr(serve, "_build", lambda *a: pytest.fail("a model was built despite bad settings"))
    for argv, match in ((["--slots", "0"], "serve field `slots` = 0"),
                        (["--max-waiting", "-2"], "limits field `max_waiting` = -2"),
                        (["--override", "hiden_size=3"], "unknown override key 'hiden_size'")):
        with pytest.raises(SystemExit, match=match):
            serve.main(["--config", "tiny", "--prompt", "x", *argv])
    args = serve.parser().parse_args(["--config", "tiny", "--slots", "3", "--request-timeout", "5", "--no-warmup",
                                       "--override", "vocab_size=300", "--override", "serve.port=0"])
    cfg, model_changes = serve.settings(args)
    assert (cfg.slots, cfg.limits.request_timeout_s, cfg.warmup, cfg.port) == (3, 5.0, False, 0)
    assert model_changes == {"vocab_size": 300}


def test_serve_cli_passes_max_prefill_tokens_and_checks_max_len(monkeypatch):
    """--max-prefill-tokens reaches the Engine (0 is refused by ServeConfig), and a --max-len beyond the model's
    max_position_embeddings is a clean exit naming both, not a traceback."""


    spec = importlib.util.spec_from_file_location("k2jax_serve_cli", Path(__file__).resolve().parents[2] / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    with pytest.raises(SystemExit, match="serve field `max_prefill_tokens` = 0 is invalid"):
        serve.main(["--config", "tiny", "--prompt", "x", "--max-prefill-tokens", "0"])
    with pytest.raises(SystemExit, match="max_len=8192 exceeds the model's max_position_embeddings=4096"):
        serve.main(["--config", "tiny", "--prompt", "x", "--max-len", "8192", "--override", "vocab_size=264"])
    seen = {}

    def engine(model, tokenizer, **kwargs):
        seen.update(kwargs)
        raise SystemExit("stop")

    monkeypatch.setattr(serve, "Engine", engine)
    with pytest.raises(SystemExit, match="stop"):
        serve.main(["--config", "tiny", "--prompt", "x", "--max-prefill-tokens", "64", "--max-len", "4096",
                    "--override", "vocab_size=264"])
    assert seen["max_prefill_tokens"] == 64 and seen["max_len"] == 4096

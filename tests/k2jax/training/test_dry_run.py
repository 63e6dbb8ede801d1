"""Pod planning: the dry run lowers the 48B training step on 64 simulated devices without allocating, with exact
per-device parameter and optimizer bytes, and compiles a small model for XLA's memory analysis."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from k2jax import load_config
from k2jax.model import count_params
from k2jax.training import cli, step
from k2jax.training import dry_run as dry_run_module
from k2jax.training.dry_run import default_mesh, dry_run, ensure_cpu_devices, parse_mesh

ROOT = Path(__file__).resolve().parents[3]


def _run_cli(*args, code=None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI must make its own 64 devices
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "k2jax.dry_run"]
    out = subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _gib(stdout, label):
    line = next(x for x in stdout.splitlines() if label in x)
    return float(line.split(label)[1].split("GiB")[0])


def test_48b_lowers_on_64_simulated_devices_with_exact_state_bytes():
    out = _run_cli("--config", "kimi_linear_48b_a3b", "--devices", "64", "--batch", "64", "--seq-len", "64",
                   "--no-compile")
    assert "64 simulated devices, mesh {'data': 1, 'fsdp': 8, 'expert': 8, 'context': 1, 'tensor': 1}, batch 64" in out
    cfg = load_config("kimi_linear_48b_a3b")
    n = count_params(cfg)
    # bf16 parameters: routed experts split over all 64 devices (expert x fsdp), everything else over fsdp = 8
    # (the few vectors that do not divide, norms and conv filters, stay replicated: well under 1%).
    ideal = 2 * (n["routed_experts"] / 64 + (n["total"] - n["routed_experts"]) / 8) / 2 ** 30
    params = _gib(out, "parameters")
    assert ideal <= params + 1e-3 and params < 1.01 * ideal
    assert abs(_gib(out, "optimizer state") - 2 * params) < 3e-3  # AdamW mu and nu (parameter dtype); 3 decimals
    assert "lowered in" in out


def test_small_model_compiles_and_reports_memory():
    cfg = load_config("tiny", num_hidden_layers=1, kda_layers=[1], full_attn_layers=[], first_k_dense_replace=0,
                      kda_impl="reference")  # one KDA + MoE layer: the least to compile
    r = dry_run(cfg, (1, 2, 2, 2), 4, 16, verbose=False)
    assert r["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "context": 1, "tensor": 2}
    assert r["activations"] > 0 and r["peak"] >= r["params"] + r["optimizer"]
    assert r["params"] < 4 * count_params(cfg)["total"]  # sharded: fewer float32 bytes than one full copy


def test_context_parallel_plan_against_a_target():
    """A mesh with context parallelism compiles, and --target adds the total and the verdict against its HBM."""
    cfg = load_config("tiny", num_hidden_layers=2, kda_layers=[1], full_attn_layers=[2], first_k_dense_replace=2,
                      kda_impl="chunk")
    r = dry_run(cfg, {"fsdp": 2, "context": 4}, 2, 64, verbose=False, target="v6e")
    assert r["mesh"]["context"] == 4
    assert r["total"] == r["params"] + r["optimizer"] + r["batch_bytes"] + r["activations"]
    assert r["hbm"] == 32 * 2 ** 30 and r["fits"] is True
    with pytest.raises(ValueError, match="target must be one of"):
        dry_run(cfg, {"fsdp": 2}, 2, 64, verbose=False, target="v4")


def test_parse_mesh_takes_the_context_axis():
    assert parse_mesh("expert=8,context=8") == {"data": 1, "fsdp": 1, "expert": 8, "context": 8, "tensor": 1}
    assert parse_mesh("1,2,4,8,1")["context"] == 8 and parse_mesh("1,2,4,1")["context"] == 1


def test_cli_reexecutes_when_jax_already_has_too_few_devices():
    code = ("import sys, jax; jax.devices(); from k2jax.training.cli import dry_run_main; "
            "sys.exit(dry_run_main(['--config', 'tiny', '--mesh', 'fsdp=4,expert=4', '--seq-len', '16', "
            "'--no-compile', 'model.num_hidden_layers=1', 'full_attn_layers=[]', 'kda_layers=[1]']))")
    out = _run_cli(code=code)
    assert "16 simulated devices" in out


def test_mesh_parsing_and_defaults():
    assert parse_mesh("fsdp=8,expert=8") == {"data": 1, "fsdp": 8, "expert": 8, "context": 1, "tensor": 1}
    assert parse_mesh("2,1,4,1") == {"data": 2, "fsdp": 1, "expert": 4, "context": 1, "tensor": 1}
    for bad in ("model=2", "1,2", "fsdp=0", "fsdp=x"):
        with pytest.raises(ValueError, match="--mesh"):
            parse_mesh(bad)
    assert default_mesh(64, load_config("kimi_linear_48b_a3b")) == {"data": 1, "fsdp": 8, "expert": 8, "context": 1,
                                                                   "tensor": 1}
    assert default_mesh(6, load_config("tiny")) == {"data": 1, "fsdp": 3, "expert": 2, "context": 1, "tensor": 1}
    with pytest.raises(ValueError, match="positive integers"):
        dry_run("tiny", None, 0, 16)
    ensure_cpu_devices(8)  # the test process has exactly 8
    with pytest.raises(RuntimeError, match="needs 64 simulated CPU devices"):
        ensure_cpu_devices(64)


def _tiny_run_config(tmp_path):
    """A run config of one KDA + MoE layer with its own batch and sequence length."""
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\ntrain:\n  batch_size: 8\n  seq_len: 24\n  optimizer: muon\n")
    return str(path), ["model.num_hidden_layers=1", "kda_layers=[1]", "full_attn_layers=[]",
                       "first_k_dense_replace=0", "kda_impl=reference"]


def test_train_py_dry_run_lowers_the_training_step_of_the_run_config(tmp_path, monkeypatch, capsys):
    """`train.py --dry-run` takes the run config's batch, sequence length and optimizer, and its overrides and
    --data, and lowers k2jax.training.step's train step (which, with Muon, leaves masked optimizer leaves)."""

    made = []
    real = step.make_train_step
    # The dry run calls the training step factory it imports (the very function training uses).
    assert dry_run_module.make_train_step is real
    monkeypatch.setattr(dry_run_module, "make_train_step", lambda *a, **k: made.append(a[1:3]) or real(*a, **k))
    config, overrides = _tiny_run_config(tmp_path)
    (tmp_path / "a.txt").write_text("some text\n")
    argv = ["--dry-run", "--config", config, "--mesh", "fsdp=2,expert=2,tensor=2", "--no-compile", *overrides,
            "model.hidden_size=32", "train.grad_accum_steps=2"]
    assert cli.main(argv + ["--data", str(tmp_path / "a.txt")]) == 0
    out = capsys.readouterr().out
    assert "batch 8 x seq_len 24" in out and "muon, grad_accum_steps 2" in out and "a.txt" in out
    (mcfg, tcfg), = made
    assert (mcfg.hidden_size, mcfg.num_hidden_layers, tcfg.grad_accum_steps, tcfg.data) == (
        32, 1, 2, str(tmp_path / "a.txt"))
    assert cli.main(argv + ["--seq-len", "40", "--batch", "16"]) == 0
    assert "batch 16 x seq_len 40" in capsys.readouterr().out


def test_dry_run_arguments_are_checked(tmp_path, capsys):
    config, overrides = _tiny_run_config(tmp_path)
    with pytest.raises(SystemExit):  # argparse: unknown flag
        cli.main(["--dry-run", "--config", config, "--bogus", "3"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert cli.main(["--dry-run", "--config", config, "train.bogus=1"]) == 2
    assert "unknown override key 'train.bogus'" in capsys.readouterr().err
    # batch 8 does not divide over the 16 data-parallel devices of this mesh
    assert cli.main(["--dry-run", "--config", config, "--mesh", "fsdp=4,expert=4", "--no-compile", *overrides]) == 2
    assert "divisible by the 16 data-parallel devices" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--config", config, "--devices", "8"])  # dry-run flags without --dry-run

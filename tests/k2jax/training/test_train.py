"""Training: config loading and overrides, schedules, optimizers, and the loop's guarantees (resume after a kill or
SIGTERM onto another mesh, NaN stop, corrupt checkpoint fallback, no checkpoint lost to a mismatch or a transient
error, gradient accumulation, bf16, two processes).

Every run trains configs/tiny.yaml on a small MQAR task. The step is compiled once per configuration and reused
by the later runs of this module (k2jax.training.step caches its jitted steps)."""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from optax import contrib

from k2jax import KimiLinear, load_config
from k2jax.checkpoint import array_differences, flat_arrays, restore_params
from k2jax.config import ConfigError
from k2jax.layers.moe import RouterBias
from k2jax.model import count_params
from k2jax.sharding import make_mesh
from k2jax.training import loop as training_loop
from k2jax.training.cli import main
from k2jax.training.config import TrainConfig, load_run_config
from k2jax.training.loop import TrainingDiverged, make_source, train
from k2jax.training.metrics import train_flops_per_token
from k2jax.training.optim import decay_mask, experts_axis_first, make_optimizer, make_schedule, muon_dimension_numbers

ROOT = Path(__file__).resolve().parents[3]
STEPS = 6
# A constant schedule after warmup makes the first k losses independent of the run length.
BASE = ["train.batch_size=4", "train.seq_len=32", "train.mqar_num_kv_pairs=4", f"train.steps={STEPS}",
        "train.schedule=constant", "train.warmup_steps=2", "train.learning_rate=3e-3", "train.checkpoint_every=2",
        "train.eval_every=3", "train.eval_batches=1", "train.progress=false", "train.peak_flops=1e11"]


def _configs(run_dir, *extra):
    return load_run_config("tiny", BASE + [f"train.run_dir={run_dir}", "train.mesh={data: 1}", *extra])


def _steps(checkpoints):
    return sorted(int(p.name) for p in Path(checkpoints).iterdir() if p.name.isdigit())


def _tree(path):
    """Every file and folder under `path` with its size and modification time: equal trees = nothing touched."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(path).rglob("*"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: the losses every other run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = train(*_configs(run_dir))
    return result, run_dir


# ---- configuration -------------------------------------------------------------------------------------------------
def test_default_run_config_is_a_hybrid_moe_on_mqar():
    mcfg, tcfg = load_run_config("default")
    assert set(mcfg.layer_types) == {"kda", "mla"} and mcfg.num_experts > 0
    assert tcfg.is_mqar and tcfg.seq_len >= 256 and tcfg.mqar_num_kv_pairs >= 32 and mcfg.vocab_size >= 512


def test_overrides_address_model_and_train_fields(tmp_path):
    mcfg, tcfg = load_run_config("tiny", ["model.hidden_size=32", "train.steps=7", "learning_rate=1e-3",
                                          "train.mesh.fsdp=2", "train.mesh.data=1", "kda_layers=[1, 2]",
                                          "full_attn_layers=[3, 4]"])
    assert (mcfg.hidden_size, tcfg.steps, tcfg.learning_rate) == (32, 7, 1e-3)
    assert tcfg.mesh == {"fsdp": 2, "data": 1} and mcfg.kda_layers == (1, 2)
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\ntrain:\n  steps: 3\n  learning_rate: 2e-4\n")
    mcfg, tcfg = load_run_config(str(path), ["train.steps=5"])
    assert mcfg.hidden_size == 64 and tcfg.steps == 5 and tcfg.learning_rate == 2e-4


def test_each_config_file_gets_its_own_run_dir(tmp_path):
    assert load_run_config("default")[1].run_dir == "runs/default"
    assert load_run_config("tiny")[1].run_dir == "runs/tiny"
    assert load_run_config(str(ROOT / "configs" / "tiny.yaml"))[1].run_dir == "runs/tiny"
    path = tmp_path / "exp7.yaml"
    path.write_text("model: tiny\ntrain:\n  steps: 3\n")
    assert load_run_config(str(path))[1].run_dir == "runs/exp7"
    assert load_run_config("tiny", ["train.run_dir=elsewhere"])[1].run_dir == "elsewhere"
    path.write_text("model: tiny\ntrain:\n  run_dir: mine\n")
    assert load_run_config(str(path))[1].run_dir == "mine"


@pytest.mark.parametrize("overrides, match", [
    (["train.bogus=1"], "unknown override key 'train.bogus'"),
    (["hidden=3"], "unknown override key 'hidden'"),
    (["model.hidden_size=0"], "hidden_size"),
    (["train.steps=-1"], "steps"),
    (["train.batch_size=6", "train.grad_accum_steps=4"], "grad_accum_steps"),
    (["train.optimizer=sgd"], "optimizer"),
    (["train.mesh={data: 2, pipeline: 2}"], "pipeline"),
    (["train.coordinator_address=localhost:1234"], "num_processes"),
    (["steps"], "key=value"),
])
def test_bad_overrides_fail_clearly(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config("tiny", overrides)


def test_bad_config_files_fail_clearly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 64\ntrain:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*stepz"):
        load_run_config(str(bad))
    bad.write_text("hidden_size: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(str(bad))
    with pytest.raises(ConfigError, match="no config named"):
        load_run_config(str(tmp_path / "absent.yaml"))


def test_cli_errors_before_compiling(tmp_path, monkeypatch, capsys):
    def no_build(*a, **k):
        raise AssertionError("the model was built despite bad input")

    monkeypatch.setattr(training_loop, "TrainState", no_build)
    assert main(["--config", "tiny", "train.nonsense=1"]) == 2
    assert "unknown override key 'train.nonsense'" in capsys.readouterr().err
    assert main(["--config", "default", "--data", str(tmp_path / "nowhere.jsonl")]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["--config", "default", "--data", str(tmp_path / "bad.jsonl"), f"train.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "unreadable" in err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


# ---- schedules and optimizers --------------------------------------------------------------------------------------
def test_schedules_match_their_formulas():
    peak, floor = 1e-3, 1e-4
    cos = make_schedule(TrainConfig(steps=110, warmup_steps=10, learning_rate=peak, min_lr_ratio=0.1))
    for s in (0, 5, 10, 60, 110):
        want = peak * s / 10 if s < 10 else floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * (s - 10) / 100))
        assert abs(float(cos(s)) - want) < 1e-9, s
    wsd = make_schedule(TrainConfig(steps=100, warmup_steps=10, learning_rate=peak, min_lr_ratio=0.1,
                                    schedule="wsd", decay_fraction=0.2))
    for s, want in ((5, peak / 2), (50, peak), (80, peak), (90, peak - (peak - floor) / 2), (100, floor)):
        assert abs(float(wsd(s)) - want) < 1e-9, s
    const = make_schedule(TrainConfig(steps=100, warmup_steps=4, learning_rate=peak, schedule="constant"))
    assert [float(const(s)) for s in (2, 4, 99)] == pytest.approx([peak / 2, peak, peak])


def test_muon_updates_matrices_and_leaves_the_rest_to_adamw():
    model = KimiLinear(load_config("tiny"), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    unwrap = lambda s: s.get_value() if isinstance(s, nnx.Variable) else s  # noqa: E731
    specs = {"/".join(map(str, p)): unwrap(s) for p, s in nnx.to_flat_state(muon_dimension_numbers(params))}
    assert specs["embed_tokens"] is None and specs["lm_head/kernel"] is None
    expert = next(s for k, s in specs.items() if k.endswith("experts/w1"))
    assert (expert.reduction_axis, expert.output_axis) == (1, 2)
    assert next(s for k, s in specs.items() if k.endswith("q_proj/kernel")) is not None
    tx, _ = make_optimizer(TrainConfig(optimizer="muon", learning_rate=1e-2, warmup_steps=0, weight_decay=0.0))
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = {"/".join(map(str, p)): unwrap(v) for p, v in nnx.to_flat_state(updates)}
    w = np.asarray(flat[next(k for k in flat if k.endswith("q_proj/kernel"))])
    # An all-ones gradient is rank one: Muon's orthogonalised update is rank one too, with every entry equal.
    assert np.all(np.isfinite(w)) and np.ptp(w) < 1e-3 * np.abs(w).max()


def test_muon_keeps_stacked_experts_sharded_and_its_updates_unchanged():
    """Stacked expert weights [layers, experts, in, out] sharded over `expert` and `in` over `context`: optax's Muon
    flattens the leading axes into one batch of matrices, which gathered every expert on every device; with the
    expert axis moved first and split over expert x context with whole matrices (experts_axis_first) the update's
    temp memory is a fraction of that, and updates and state are the same. (The train step pins the state's
    layout with out_shardings: make_train_step's state_shardings.)"""
    mesh = make_mesh({"expert": 2, "context": 4})
    rs = np.random.RandomState(0)
    params = {"experts": jnp.asarray(rs.randn(3, 16, 256, 128), jnp.float32), "norm": jnp.ones((256,)),
              "proj": jnp.asarray(rs.randn(64, 32), jnp.float32)}
    shardings = {"experts": NamedSharding(mesh, PartitionSpec(None, "expert", "context")),
                 "norm": NamedSharding(mesh, PartitionSpec()), "proj": NamedSharding(mesh, PartitionSpec())}
    params = jax.device_put(params, shardings)
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    base = contrib.muon(1e-2, muon_weight_dimension_numbers=muon_dimension_numbers, consistent_rms=0.2,
                        weight_decay=0.1, weight_decay_mask=decay_mask)
    results = []
    with jax.set_mesh(mesh):
        for tx in (base, experts_axis_first(base)):
            update = jax.jit(tx.update, out_shardings=(shardings, None))
            temp = update.lower(grads, tx.init(params), params).compile().memory_analysis().temp_size_in_bytes
            _, state = update(grads, tx.init(params), params)
            results.append((temp, *update(grads, state, params)))  # the second step: momentum in the state
    (gathered, u0, s0), (split, u1, s1) = results
    assert split < gathered / 3, (split, gathered)
    for a, b in zip(jax.tree.leaves((u0, s0)), jax.tree.leaves((u1, s1))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    made, _ = make_optimizer(TrainConfig(optimizer="muon", grad_clip=0.0))
    assert made.update.__qualname__.startswith("experts_axis_first")


def test_flops_per_token_formula():
    cfg = load_config("tiny")
    n = count_params(cfg)["active"] - cfg.vocab_size * cfg.hidden_size
    mla = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    kda = 6 * cfg.kda_num_heads * cfg.kda_head_dim ** 2
    for T in (32, 256):
        want = 3 * (2 * n + cfg.layer_types.count("mla") * mla * T + cfg.layer_types.count("kda") * kda)
        assert train_flops_per_token(cfg, T) == pytest.approx(want)


# ---- the loop ------------------------------------------------------------------------------------------------------
def test_reference_run_logs_metrics_and_checkpoints(reference):
    result, run_dir = reference
    assert result.stopped == "completed" and sorted(result.losses) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in result.losses.values())
    assert [e["step"] for e in result.evals] == [3, 6] and 0 <= result.evals[-1]["accuracy"] <= 1
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train_lines] == list(range(1, STEPS + 1))
    for key in ("loss", "accuracy", "grad_norm", "lr", "tokens_per_s", "mfu", "moe_max_load"):
        assert key in train_lines[-1]
    assert train_lines[-1]["mfu"] > 0 and train_lines[-1]["moe_max_load"] >= 1
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]


def test_router_biases_move_and_checkpoint_serves_the_model(reference):
    result, run_dir = reference
    model = restore_params(None, run_dir / "checkpoints" / str(STEPS))
    biases = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, RouterBias))]
    rate = model.config.moe_bias_update_rate
    assert len(biases) == 3
    for b in biases:
        steps = b / rate  # each update moves a bias by -rate, 0 or +rate
        assert np.abs(b).max() > 0 and np.allclose(steps, np.round(steps), atol=1e-3)
        assert np.abs(steps).max() <= STEPS + 1e-3


def test_killed_run_resumes_with_the_same_losses(reference, tmp_path):
    ref, _ = reference

    def crash(step, metrics, state):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train(*_configs(tmp_path), callbacks=[crash])
    resumed = train(*_configs(tmp_path))
    assert resumed.resumed_from == 4 and sorted(resumed.losses) == [5, 6]
    np.testing.assert_allclose([resumed.losses[s] for s in (5, 6)], [ref.losses[s] for s in (5, 6)], rtol=1e-6)


def test_sigterm_saves_and_resume_onto_another_mesh_matches(reference, tmp_path):
    ref, _ = reference

    def preempt(step, metrics, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(*_configs(tmp_path), callbacks=[preempt])
    assert first.stopped == "preempted" and first.step == 3
    resumed = train(*_configs(tmp_path, "train.mesh={fsdp: 2}"))
    assert resumed.resumed_from == 3 and resumed.stopped == "completed"
    losses = {**first.losses, **resumed.losses}
    np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)],
                               [ref.losses[s] for s in range(1, STEPS + 1)], rtol=1e-5)


def test_async_checkpoints_hold_their_steps_state_although_the_next_step_donates_it(tmp_path):
    """The train step donates its state; a checkpoint saved asynchronously at step 2 (and 4) must still hold
    that step's arrays, not the next step's or freed buffers."""
    seen = {}

    def keep(step, metrics, state):
        if step in (2, 4):
            seen[step] = jax.device_get(nnx.to_pure_dict(state["params"]))

    train(*_configs(tmp_path, "train.steps=5"), callbacks=[keep])
    for step, params in seen.items():
        saved = nnx.to_pure_dict(nnx.state(restore_params(None, tmp_path / "checkpoints" / str(step)), nnx.Param))
        for (path, want), (_, got) in zip(sorted(_flat(params).items()), sorted(_flat(saved).items())):
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"step {step} {path}")
    assert not np.array_equal(_flat(seen[2])["embed_tokens"], _flat(seen[4])["embed_tokens"])


def _flat(pure: dict) -> dict:
    return {"/".join(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(pure).items()}


def test_muon_run_trains_checkpoints_and_resumes_onto_another_mesh(tmp_path):
    """Muon's state holds masked (AdamW-only / Muon-only) sub-trees: they must shard, save and restore too."""
    muon = ("train.optimizer=muon", "train.checkpoint_every=0")
    whole = train(*_configs(tmp_path / "whole", *muon, "train.steps=4"))
    assert np.all(np.isfinite(list(whole.losses.values())))
    first = train(*_configs(tmp_path / "split", *muon, "train.steps=4", "train.stop_at_step=2"))
    assert first.step == 2
    resumed = train(*_configs(tmp_path / "split", *muon, "train.steps=4", "train.mesh={fsdp: 2}"))
    assert resumed.resumed_from == 2 and sorted(resumed.losses) == [3, 4]
    np.testing.assert_allclose([resumed.losses[s] for s in (3, 4)], [whole.losses[s] for s in (3, 4)], rtol=1e-5)


def test_nan_loss_stops_before_checkpointing(tmp_path):
    def poison(step, metrics, state):
        if step == 3:
            return {**state, "params": jax.tree.map(lambda p: p * jnp.nan, state["params"])}

    with pytest.raises(TrainingDiverged, match=r"step 4: the loss is nan.*nothing after step 2"):
        train(*_configs(tmp_path), callbacks=[poison])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2]


@pytest.mark.parametrize("part", ["params", "opt"])
def test_poisoned_update_on_a_checkpoint_step_is_not_saved(tmp_path, part):
    """Step 4's update leaves NaN in the state while its loss and gradient norm were finite; step 4 is a
    checkpoint step: the run must stop before writing it."""
    def poison(step, metrics, state):
        if step == 4:
            nan = lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
            return {**state, part: jax.tree.map(nan, state[part])}

    with pytest.raises(TrainingDiverged, match=rf"step 4: after the update, \d+ arrays of the training state hold "
                                               rf"NaN or inf \(\['{part}'\].*nothing after step 2 was"):
        train(*_configs(tmp_path), callbacks=[poison])
    assert _steps(tmp_path / "checkpoints") == [2]


def _truncate_largest_array_file(step_dir):
    """Cut the largest array data file of the optimizer state in half: the step's configs and array metadata still
    read, its arrays do not."""
    data = max((f for f in (step_dir / "opt").rglob("*") if f.is_file() and f.parent.name == "d"),
               key=lambda f: f.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["metadata", "array data"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(reference, tmp_path, damage):
    ref, run_dir = reference
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    if damage == "metadata":
        for f in (tmp_path / "checkpoints" / "6" / "params").rglob("*"):
            if f.is_file():
                f.write_bytes(b"garbage")
    else:
        _truncate_largest_array_file(tmp_path / "checkpoints" / "6")
    mcfg, tcfg = _configs(tmp_path)
    with pytest.warns(UserWarning, match="checkpoints/6 is unreadable"):
        resumed = train(mcfg, tcfg.replace(steps=STEPS))
    assert resumed.resumed_from == 4 and sorted(resumed.losses) == [5, 6]
    np.testing.assert_allclose([resumed.losses[s] for s in (5, 6)], [ref.losses[s] for s in (5, 6)], rtol=1e-6)
    (aside,) = (tmp_path / "checkpoints").glob("corrupt-6-*")
    reason = (aside / "reason.txt").read_text()
    assert ("JSONDecodeError" if damage == "metadata" else "OUT_OF_RANGE") in reason


# ---- resuming refuses what would lose a checkpoint ------------------------------------------------------------------
@pytest.mark.parametrize("change, named", [
    (["model.hidden_size=32"], "model.hidden_size: saved 64, this run 32"),
    (["model.num_hidden_layers=3", "model.full_attn_layers=[3]", "model.kda_layers=[1, 2]"],
     "model.num_hidden_layers: saved 4, this run 3"),
    (["train.optimizer=muon"], "train.optimizer: saved 'adamw', this run 'muon'"),
    (["train.grad_clip=0"], "train.grad_clip: saved 1.0, this run 0"),
])
def test_mismatched_checkpoint_stops_the_run_and_changes_nothing(reference, tmp_path, capsys, change, named):
    _, ref_dir = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    before = _tree(run_dir)
    assert main(["--config", "tiny", *BASE, f"train.run_dir={run_dir}", "train.mesh={data: 1}", *change]) == 2
    err = capsys.readouterr().err
    assert f"run directory {run_dir} holds the checkpoints of another run" in err and "(step 6)" in err
    assert named in err and "train.fresh=true" in err
    assert _tree(run_dir) == before


def test_execution_settings_may_change_on_resume(reference, tmp_path):
    """Compute dtype, kernels and remat change how the saved parameters are used, not what they are."""
    _, ref_dir = reference
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    result = train(*_configs(tmp_path, "model.dtype=bfloat16", "model.kda_impl=chunk", "model.remat=full",
                             "model.name=renamed"))
    assert result.resumed_from == STEPS and result.losses == {}


def test_array_differences_name_paths_shapes_and_dtypes():
    saved = flat_arrays({"a": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": [jax.ShapeDtypeStruct((4,), jnp.int32)]})
    assert saved == {"a": ((2, 3), "float32"), "b/0": ((4,), "int32")}
    wanted = flat_arrays({"a": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16), "c": jax.ShapeDtypeStruct((1,), jnp.int32)})
    assert array_differences(saved, wanted) == ["b/0: in the checkpoint, not in this run",
                                                "c: in this run, not in the checkpoint",
                                                "a: saved shape (2, 3) float32, this run (2, 3) bfloat16"]
    assert array_differences(saved, saved) == []


@pytest.mark.parametrize("error", [
    OSError(5, "Input/output error"), MemoryError("host memory exhausted"),
    ValueError('UNKNOWN: Error reading local file "{step}/params/d/x": Input/output error'),
    ValueError('RESOURCE_EXHAUSTED: Error reading "a.w/0.0" in OCDBT database at local file "{step}/params/"'),
])
def test_transient_restore_errors_propagate_and_set_nothing_aside(reference, tmp_path, monkeypatch, error):
    _, ref_dir = reference
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    error.args = tuple(str(a).replace("{step}", str(tmp_path / "checkpoints" / "6")) for a in error.args)

    def failing_restore(self, step, *args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    before = _tree(tmp_path)
    with pytest.raises(type(error)):
        train(*_configs(tmp_path))
    assert _tree(tmp_path) == before


def test_only_unreadable_checkpoints_refuse_to_start_over(reference, tmp_path, capsys):
    _, ref_dir = reference
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    for step in (2, 4, 6):
        (tmp_path / "checkpoints" / str(step) / "train" / "metadata").write_text('{"step": ')
    with pytest.warns(UserWarning, match="is unreadable"), pytest.raises(ConfigError, match="no readable checkpoint"):
        train(*_configs(tmp_path))
    aside = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name.split("-")[:2] for p in aside] == [["corrupt", "2"], ["corrupt", "4"], ["corrupt", "6"]]
    assert all("JSONDecodeError" in (p / "reason.txt").read_text() for p in aside)
    assert not (tmp_path / "metrics.jsonl").exists()
    # Asked again, it still refuses and touches nothing.
    before = _tree(tmp_path)
    assert main(["--config", "tiny", *BASE, f"train.run_dir={tmp_path}", "train.mesh={data: 1}"]) == 2
    err = capsys.readouterr().err
    assert "corrupt-2-" in err and "train.fresh=true" in err and _tree(tmp_path) == before


def test_fresh_moves_the_previous_run_aside_and_starts_at_step_0(reference, tmp_path):
    ref, ref_dir = reference
    shutil.copytree(ref_dir, tmp_path, dirs_exist_ok=True)
    with pytest.warns(UserWarning, match="train.fresh: starting"):
        result = train(*_configs(tmp_path, "train.fresh=true", "train.stop_at_step=2"))
    assert result.resumed_from is None and sorted(result.losses) == [1, 2]
    np.testing.assert_allclose([result.losses[s] for s in (1, 2)], [ref.losses[s] for s in (1, 2)], rtol=1e-6)
    (archive,) = tmp_path.glob("replaced-*")
    assert _steps(archive / "checkpoints") == [2, 4, 6] and (archive / "tensorboard").is_dir()
    assert len((archive / "metrics.jsonl").read_text().splitlines()) > STEPS
    assert _steps(tmp_path / "checkpoints") == [2]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2]


def test_text_training_accepts_a_tokenizer_with_reserved_ids_beyond_the_model(tmp_path):
    """Like a real Kimi folder: the named specials fit the model, two reserved ids after them do not exist there."""

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hello"]
    (folder / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                   for r, t in enumerate(tokens)))
    base = len(tokens)
    named = {base: "[BOS]", base + 1: "[EOS]", base + 2: "<|im_end|>", base + 255: "[PAD]"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": c} for i, c in named.items()},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]"}))
    (tmp_path / "a.txt").write_text("hello hello world\n" * 50)
    mcfg, tcfg = load_run_config("tiny", [f"train.data={tmp_path / 'a.txt'}", f"train.tokenizer={folder}",
                                          f"model.vocab_size={base + 256}", "train.seq_len=16", "train.batch_size=2"])
    source = make_source(mcfg, tcfg)
    assert int(np.max(next(source)["tokens"])) < base + 256
    with pytest.raises(ConfigError, match=rf"does not fit model.vocab_size.*pad \[PAD\]={base + 255}"):
        make_source(mcfg.replace(vocab_size=base + 255), tcfg)


def test_gradient_accumulation_matches_the_full_batch(reference, tmp_path):
    ref, _ = reference
    result = train(*_configs(tmp_path, "train.grad_accum_steps=2", "train.steps=3", "train.checkpoint_every=0"))
    np.testing.assert_allclose([result.losses[s] for s in (1, 2, 3)], [ref.losses[s] for s in (1, 2, 3)],
                               rtol=1e-5)


def test_bf16_compute_trains(reference, tmp_path):
    ref, _ = reference
    result = train(*_configs(tmp_path, "model.dtype=bfloat16", "train.steps=2", "train.checkpoint_every=0"))
    assert all(np.isfinite(v) for v in result.losses.values())
    assert result.losses[1] == pytest.approx(ref.losses[1], rel=2e-2)


# ---- two processes -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(run_dir, extra, timeout, expect_code=0):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--config", "tiny", *BASE, f"train.run_dir={run_dir}",
         "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == expect_code, out[-3000:]
    return outs


def test_two_processes_train_checkpoint_resume_and_match_one_process(reference, tmp_path):
    """Two processes save steps 2 and 3; step 3 is then damaged: both set it aside and resume from step 2."""
    ref, _ = reference
    _run_two_processes(tmp_path, ["train.stop_at_step=3"], timeout=420)
    assert _steps(tmp_path / "checkpoints") == [2, 3]
    (tmp_path / "checkpoints" / "3" / "train" / "metadata").write_text("{")
    outs = _run_two_processes(tmp_path, [], timeout=240)
    assert len(list((tmp_path / "checkpoints").glob("corrupt-3-*"))) == 1
    assert all("completed at step 6" in out for out in outs)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {x["step"]: x["loss"] for x in lines if x["kind"] == "train"}
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)],
                               [ref.losses[s] for s in range(1, STEPS + 1)], rtol=1e-4)


def test_two_processes_refuse_a_mismatched_checkpoint_together(reference, tmp_path):
    _, ref_dir = reference
    shutil.copytree(ref_dir, tmp_path, dirs_exist_ok=True)
    before = _tree(tmp_path)
    outs = _run_two_processes(tmp_path, ["train.optimizer=muon"], timeout=240, expect_code=2)
    for out in outs:
        assert "holds the checkpoints of another run" in out and "train.optimizer: saved 'adamw'" in out
    assert _tree(tmp_path) == before

"""Pod planning without a pod: build the training state abstractly (nothing allocated) on a simulated mesh, lower
(and by default compile) the training step of k2jax.training.step, the very step `train` runs, and report
per-device memory.

    python -m k2jax.dry_run --config kimi_linear_48b_a3b --mesh fsdp=8,expert=8 --batch 64 --seq-len 4096
    python train.py --config configs/kimi_linear_48b_a3b.yaml --dry-run --devices 64 --batch 64

The command line is k2jax.training.cli's: the run config and its `model.*=` / `train.*=` overrides, --data, and
the batch and sequence length (default: the run config's train.batch_size and train.seq_len) all shape the step.
The mesh is made of simulated CPU devices (`--xla_force_host_platform_device_count`, set here before JAX starts
its backends, or by re-executing the command when it already has). Parameters and optimizer state per device are
exact (their shardings' shard shapes); activations are XLA's temporary buffers of the step compiled for CPU
(`compiled.memory_analysis()`). That program takes the CPU paths (all-gather expert dispatch, the blocked grouped
matmul instead of ragged_dot, chunked KDA without Pallas), so on TPU/GPU expect less: read it as an upper estimate, and compare meshes, remat policies and `moe_capacity_factor` with it (the
dropless default reserves the worst case, ep x the balanced expert rows, on every device). Layers are scanned in
groups of their repeating pattern (scan_layers is switched on: same memory, and lowering the 27-layer model costs
about 7 layers).
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from k2jax.config import ConfigError, ModelConfig
from k2jax.config_files import load_config
from k2jax.model import router_bias_rows
from k2jax.sharding import MESH_AXES, batch_sharding, make_mesh
from k2jax.training.config import TrainConfig, load_run_config
from k2jax.training.loop import check_batch
from k2jax.training.optim import make_optimizer
from k2jax.training.state import TrainState
from k2jax.training.step import make_train_step

_REEXEC_MARK = "K2JAX_DRY_RUN_DEVICES"
# HBM per chip of the targets `--target` names, GiB.
TARGETS = {"v5p": 95, "v6e": 32, "h200": 141}


# ---- simulated devices -------------------------------------------------------------------------------------------
def ensure_cpu_devices(n: int, argv_for_reexec: list[str] | None = None) -> None:
    """Make at least `n` CPU devices available: configure JAX if its backends have not started, else re-execute
    this process (same command line) with XLA_FLAGS set. Raises RuntimeError when that cannot work."""

    try:
        jax.config.update("jax_num_cpu_devices", n)  # wins over XLA_FLAGS while the backends have not started
    except RuntimeError:
        pass  # they have: only a fresh process can change the count
    if len(jax.devices("cpu")) >= n:
        return
    if os.environ.get(_REEXEC_MARK) or argv_for_reexec is None:
        raise RuntimeError(f"dry run: needs {n} simulated CPU devices but JAX has {len(jax.devices('cpu'))}; set "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts")
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env[_REEXEC_MARK] = str(n)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + argv_for_reexec, env)


# ---- mesh choice -------------------------------------------------------------------------------------------------
def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=8,context=8' or '1,8,8,1,1' (MESH_AXES order; 4 sizes: data, fsdp, expert, tensor) -> {axis: size}."""
    text = text.strip()
    try:
        if "=" in text:
            out = {}
            for part in text.split(","):
                k, v = part.split("=")
                out[k.strip()] = int(v)
        else:
            sizes = [int(v) for v in text.split(",")]
            if len(sizes) == len(MESH_AXES) - 1:
                out = dict(zip([a for a in MESH_AXES if a != "context"], sizes))
            elif len(sizes) == len(MESH_AXES):
                out = dict(zip(MESH_AXES, sizes))
            else:
                raise ValueError
    except ValueError:
        raise ValueError(f"--mesh {text!r}: expected 'axis=size,...' with axes {MESH_AXES}, or 5 sizes in that "
                         f"order (4: without context)") from None
    unknown = sorted(set(out) - set(MESH_AXES))
    if unknown or any(v <= 0 for v in out.values()):
        raise ValueError(f"--mesh {text!r}: axes must be among {MESH_AXES} with positive sizes")
    return {a: out.get(a, 1) for a in MESH_AXES}


def default_mesh(n_devices: int, config: ModelConfig) -> dict[str, int]:
    """expert = the largest power of two <= 8 dividing both n_devices and num_experts; the rest on fsdp."""
    ep = 1
    while ep < 8 and n_devices % (2 * ep) == 0 and config.num_experts % (2 * ep) == 0:
        ep *= 2
    return {"data": 1, "fsdp": n_devices // ep, "expert": ep, "context": 1, "tensor": 1}


# ---- the step ----------------------------------------------------------------------------------------------------
def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying their shardings."""

    return sum(math.prod(s.sharding.shard_shape(tuple(s.shape))) * s.dtype.itemsize for s in jax.tree.leaves(tree))


def batch_spec(tcfg: TrainConfig, mesh) -> dict:
    """The global batch a train step takes, as ShapeDtypeStructs [batch_size, seq_len] in the data sharding:
    tokens, targets, loss_mask, and segment_ids for text data (packed documents; MQAR rows are one sequence)."""


    shape = (tcfg.batch_size, tcfg.seq_len)
    dtypes = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32}
    if not tcfg.is_mqar:
        dtypes["segment_ids"] = jnp.int32
    return {k: jax.ShapeDtypeStruct(shape, d, sharding=batch_sharding(mesh, shape)) for k, d in dtypes.items()}


def dry_run(config: ModelConfig | str, mesh_shape, batch: int | None = None, seq_len: int | None = None, *,
            train: TrainConfig | None = None, optimizer: str | None = None, scan_layers: bool = True,
            compile: bool = True, devices=None, verbose: bool = True, target: str | None = None) -> dict:
    """Lower (and with `compile`, compile) the training step of `config` and `train` on a mesh of `mesh_shape`
    without allocating anything: `k2jax.training.step.make_train_step` over the abstract TrainState.

    config: a ModelConfig or a configs/ name; train: the run's TrainConfig (default: TrainConfig()), whose
    batch_size / seq_len / optimizer `batch`, `seq_len` and `optimizer` replace when given (inputs and targets
    are [batch, seq_len]); mesh_shape: as k2jax.sharding.make_mesh; scan_layers: lower the layers scanned (same
    memory, far less lowering time) instead of as the config says. `devices`: defaults to the first prod(mesh)
    CPU devices. Returns bytes per device {'params', 'optimizer', 'batch_bytes', and with compile 'activations'
    (XLA temp), 'peak' (arguments + outputs - donated + temp), 'generated_code'}, plus 'mesh', 'batch',
    'seq_len', 'lower_s', 'compile_s'; with compile also 'total' (parameters + optimizer state + batch +
    activations: the step's state donated, as a long run needs) and, for a `target` chip (TARGETS), 'hbm' and
    'fits'. Raises ConfigError when the batch does not divide over the mesh.
    """


    if isinstance(config, str):
        config = load_config(config)
    if target is not None and target not in TARGETS:
        raise ValueError(f"dry_run: target must be one of {sorted(TARGETS)}, got {target!r}")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"dry_run: batch and seq_len must be positive integers, got {name}={value!r}")
    changes = {k: v for k, v in (("batch_size", batch), ("seq_len", seq_len), ("optimizer", optimizer)) if v}
    tcfg = (train or TrainConfig()).replace(**changes)
    mcfg = config.replace(scan_layers=True) if scan_layers else config
    mesh = make_mesh(mesh_shape, devices=jax.devices("cpu") if devices is None else devices)
    check_batch(tcfg, dict(mesh.shape))
    tx, schedule = make_optimizer(tcfg)
    st = TrainState(mcfg, tcfg, mesh, tx)
    state = st.abstract_state()
    bias_rows = router_bias_rows(mcfg, state["biases"])
    step = make_train_step(st.graphdef, mcfg, tcfg, tx, schedule, bias_rows, st.state_shardings())
    batch_in = batch_spec(tcfg, mesh)
    out = {"mesh": dict(mesh.shape), "batch": tcfg.batch_size, "seq_len": tcfg.seq_len,
           "params": _per_device_bytes([state["params"], state["biases"], state["rest"]]),
           "optimizer": _per_device_bytes(state["opt"]), "batch_bytes": _per_device_bytes(batch_in)}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step.trace(state, batch_in, jax.ShapeDtypeStruct((), "int32")).lower()
    out["lower_s"] = time.perf_counter() - t0
    if compile:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        out["compile_s"] = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if mem is not None:
            out["activations"] = int(mem.temp_size_in_bytes)
            out["generated_code"] = int(mem.generated_code_size_in_bytes)
            out["peak"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                              + mem.temp_size_in_bytes)
            out["total"] = out["params"] + out["optimizer"] + out["batch_bytes"] + out["activations"]
            if target is not None:
                out["target"], out["hbm"] = target, TARGETS[target] * 2 ** 30
                out["fits"] = out["total"] <= out["hbm"]
    if verbose:
        print(report(mcfg, tcfg, out))
    return out


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:9.3f} GiB"


def report(config: ModelConfig, train: TrainConfig, r: dict) -> str:
    """The dry run's result as a short table."""
    n = math.prod(r["mesh"].values())
    lines = [f"dry run: {config.name}, {n} simulated devices, mesh {r['mesh']}, batch {r['batch']} x seq_len "
             f"{r['seq_len']} (param_dtype {config.param_dtype}, dtype {config.dtype}, remat {config.remat}, "
             f"{train.optimizer}, grad_accum_steps {train.grad_accum_steps}, data {train.data})",
             f"  per device  parameters      {_gib(r['params'])}",
             f"              optimizer state {_gib(r['optimizer'])}"]
    if "activations" in r:
        lines += [f"              activations     {_gib(r['activations'])}  (XLA:CPU temp buffers of the step)",
                  f"              total           {_gib(r['total'])}  (parameters + optimizer + batch + "
                  f"activations, state donated)",
                  f"              peak            {_gib(r['peak'])}  (arguments + outputs - donated + temp)"]
        if "hbm" in r:
            verdict = "fits" if r["fits"] else "does NOT fit"
            lines.append(f"  target {r['target']}: {r['hbm'] / 2 ** 30:.0f} GiB HBM per chip: {verdict} "
                         f"({r['total'] / r['hbm']:.0%} of HBM; XLA:CPU overstates activations, see README)")
    lines.append(f"  lowered in {r['lower_s']:.1f} s" + (f", compiled in {r['compile_s']:.1f} s" if "compile_s" in r
                                                          else " (not compiled: no activation estimate)"))
    return "\n".join(lines)


def plan(config: str, overrides: list[str], *, mesh: str | None = None, devices: int | None = None,
         compile: bool = True, argv_for_reexec: list[str] | None = None, target: str | None = None) -> dict:
    """The dry run of a command line: load the run config with its overrides (k2jax.training.config), choose the
    mesh (`mesh` text, else the run config's train.mesh unless `devices` disagrees with it, else `default_mesh`
    for `devices` or 8), make that many simulated devices, and run `dry_run`. Raises ConfigError / ValueError for
    bad input before JAX starts."""

    if target is not None and target not in TARGETS:
        raise ConfigError(f"--target {target!r}: must be one of {sorted(TARGETS)} (HBM GiB per chip: {TARGETS})")
    mcfg, tcfg = load_run_config(config, overrides)
    if mesh is not None:
        shape = parse_mesh(mesh)
    elif tcfg.mesh and (devices is None or devices == math.prod(tcfg.mesh.values())):
        shape = {a: tcfg.mesh.get(a, 1) for a in MESH_AXES}
    else:
        shape = default_mesh(devices or 8, mcfg)
    n = math.prod(shape.values())
    if devices is not None and devices != n:
        raise ConfigError(f"--devices {devices} does not match the mesh {shape} ({n} devices)")
    check_batch(tcfg, shape)  # before the devices: a re-executed process would fail the same way
    ensure_cpu_devices(n, argv_for_reexec)
    return dry_run(mcfg, shape, train=tcfg, compile=compile, target=target)

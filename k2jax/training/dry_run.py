"""Pod planning without a pod: build the model and optimizer abstractly (nothing allocated) on a simulated mesh,
lower (and by default compile) one training step, and report per-device memory.

    python -m k2jax.dry_run --config kimi_linear_48b_a3b --mesh fsdp=8,expert=8 --batch 64 --seq-len 4096
    python train.py --config configs/kimi_linear_48b_a3b.yaml --dry-run --devices 64

The mesh is made of simulated CPU devices (`--xla_force_host_platform_device_count`, set here before JAX starts
its backends, or by re-executing the command when it already has). Parameters and optimizer state per device are
exact (their shardings' shard shapes); activations are XLA's temporary buffers of the step compiled for CPU
(`compiled.memory_analysis()`). That program takes the CPU paths (all-gather expert dispatch, the blocked grouped
matmul whose backward holds per-block float32 weight gradients, chunked KDA without Pallas), so on TPU/GPU expect
less: read it as an upper estimate, and compare meshes, remat policies and `moe_capacity_factor` with it (the
dropless default reserves the worst case, ep x the balanced expert rows, on every device). Layers are scanned in
groups of their repeating pattern (config.scan_layers), so lowering the 27-layer model costs about 7 layers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import yaml

from k2jax.config import ModelConfig, load_config

MESH_AXES = ("data", "fsdp", "expert", "tensor")
_REEXEC_MARK = "K2JAX_DRY_RUN_DEVICES"


# ---- simulated devices -------------------------------------------------------------------------------------------
def ensure_cpu_devices(n: int, argv_for_reexec: list[str] | None = None) -> None:
    """Make at least `n` CPU devices available: configure JAX if its backends have not started, else re-execute
    this process (same command line) with XLA_FLAGS set. Raises RuntimeError when that cannot work."""
    import jax

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
    """'fsdp=8,expert=8' or '1,8,8,1' (MESH_AXES order) -> {axis: size}."""
    text = text.strip()
    try:
        if "=" in text:
            out = {}
            for part in text.split(","):
                k, v = part.split("=")
                out[k.strip()] = int(v)
        else:
            sizes = [int(v) for v in text.split(",")]
            if len(sizes) != len(MESH_AXES):
                raise ValueError
            out = dict(zip(MESH_AXES, sizes))
    except ValueError:
        raise ValueError(f"--mesh {text!r}: expected 'axis=size,...' with axes {MESH_AXES}, or 4 sizes") from None
    unknown = sorted(set(out) - set(MESH_AXES))
    if unknown or any(v <= 0 for v in out.values()):
        raise ValueError(f"--mesh {text!r}: axes must be among {MESH_AXES} with positive sizes")
    return {a: out.get(a, 1) for a in MESH_AXES}


def default_mesh(n_devices: int, config: ModelConfig) -> dict[str, int]:
    """expert = the largest power of two <= 8 dividing both n_devices and num_experts; the rest on fsdp."""
    ep = 1
    while ep < 8 and n_devices % (2 * ep) == 0 and config.num_experts % (2 * ep) == 0:
        ep *= 2
    return {"data": 1, "fsdp": n_devices // ep, "expert": ep, "tensor": 1}


# ---- the step ----------------------------------------------------------------------------------------------------
def _default_optimizer(name: str):
    try:
        from k2jax.training.optim import make_optimizer
        from k2jax.training.config import TrainConfig

        return make_optimizer(TrainConfig(optimizer=name, steps=1000))[0]
    except ImportError:  # the training package is optional here
        import optax

        return optax.adamw(1e-4)


def next_token_loss(model, tokens):
    """Mean next-token cross entropy: tokens int [B, T + 1] -> float32 scalar."""
    import jax
    import jax.numpy as jnp

    logits = model(tokens[:, :-1])
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(logz - gold)


def _per_device_bytes(shapes, shardings) -> int:
    import jax

    total = 0
    for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += math.prod(sh.shard_shape(tuple(s.shape))) * s.dtype.itemsize
    return total


def dry_run(config: ModelConfig | str, mesh_shape, batch: int, seq_len: int, *, optimizer: str = "adamw",
            compile: bool = True, devices=None, verbose: bool = True) -> dict:
    """Lower (and with `compile`, compile) one training step of `config` on a mesh of `mesh_shape` without
    allocating anything.

    config: a ModelConfig or a configs/ name (layers are scanned: scan_layers is forced on); mesh_shape: as
    k2jax.sharding.make_mesh; batch: global sequences per step; seq_len: tokens per sequence (targets are the
    next tokens, so inputs are [batch, seq_len]). `devices`: defaults to the first prod(mesh) CPU devices.
    Returns bytes per device {'params', 'optimizer', 'batch', and with compile 'activations' (XLA temp),
    'peak' (arguments + outputs - donated + temp), 'generated_code'}, plus 'mesh', 'lower_s', 'compile_s'.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from k2jax.model import KimiLinear
    from k2jax.sharding import batch_sharding, make_mesh, param_shardings

    if isinstance(config, str):
        config = load_config(config)
    if not isinstance(batch, int) or batch <= 0 or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"dry_run: batch and seq_len must be positive integers, got {batch}, {seq_len}")
    config = config.replace(scan_layers=True)
    if devices is None:
        devices = jax.devices("cpu")
    mesh = make_mesh(mesh_shape, devices=devices)
    tx = _default_optimizer(optimizer)

    # rngs=None: every parameter from one fixed key. Shapes are all that matter here, and tracing nnx.Rngs'
    # counter updates costs time quadratic in the parameter count.
    abstract = nnx.eval_shape(lambda: KimiLinear(config, rngs=None))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    p_sh, r_sh = param_shardings(params, mesh), param_shardings(rest, mesh)
    opt_shapes = jax.eval_shape(tx.init, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    o_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, p_sh, transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    t_sh = batch_sharding(mesh, tokens.shape)

    def step(params, rest, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p, rest), tokens))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def spec(shape_tree, shard_tree):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape_tree, shard_tree)

    jitted = jax.jit(step, in_shardings=(p_sh, r_sh, o_sh, t_sh), out_shardings=(p_sh, o_sh, replicated),
                     donate_argnums=(0, 2))
    out = {"mesh": dict(mesh.shape), "batch": batch, "seq_len": seq_len,
           "params": _per_device_bytes(params, p_sh) + _per_device_bytes(rest, r_sh),
           "optimizer": _per_device_bytes(opt_shapes, o_sh),
           "batch_bytes": math.prod(t_sh.shard_shape(tokens.shape)) * 4}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jitted.trace(spec(params, p_sh), spec(rest, r_sh), spec(opt_shapes, o_sh), tokens).lower()
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
    if verbose:
        print(report(config, out))
    return out


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:9.3f} GiB"


def report(config: ModelConfig, r: dict) -> str:
    """The dry run's result as a short table."""
    n = math.prod(r["mesh"].values())
    lines = [f"dry run: {config.name}, {n} simulated devices, mesh {r['mesh']}, batch {r['batch']} x seq_len "
             f"{r['seq_len']} (param_dtype {config.param_dtype}, dtype {config.dtype}, remat {config.remat})",
             f"  per device  parameters      {_gib(r['params'])}",
             f"              optimizer state {_gib(r['optimizer'])}"]
    if "activations" in r:
        lines += [f"              activations     {_gib(r['activations'])}  (XLA:CPU temp buffers of the step)",
                  f"              peak            {_gib(r['peak'])}  (arguments + outputs - donated + temp)"]
    lines.append(f"  lowered in {r['lower_s']:.1f} s" + (f", compiled in {r['compile_s']:.1f} s" if "compile_s" in r
                                                          else " (not compiled: no activation estimate)"))
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dry_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="kimi_linear_48b_a3b", help="configs/ name, YAML or HF config.json")
    p.add_argument("--mesh", help="'fsdp=8,expert=8' or 'data,fsdp,expert,tensor' sizes (default: the run "
                                  "config's train.mesh, else chosen for --devices)")
    p.add_argument("--devices", type=int, help="simulated device count (default: the mesh's size, else 8)")
    p.add_argument("--batch", type=int, help="global batch in sequences (default: one per batch shard)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--optimizer", choices=("adamw", "muon"), help="default: the run config's, else adamw")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"),
                   help="per-layer remat policy (default: the model config's `remat`)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="model config override, value parsed as YAML (repeatable), e.g. --set moe_capacity_factor=2")
    p.add_argument("--no-compile", action="store_true", help="lower only (no activation estimate)")
    p.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)  # accepted from train.py
    return p


def main(argv: list[str] | None = None) -> dict:
    """CLI entry (also behind `train.py --dry-run`); unknown arguments are ignored so train.py can pass its own."""
    args, _ = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    config, train = _load(args.config)
    train_remat = getattr(train, "remat", "none")  # older TrainConfigs carried the remat policy
    remat = args.remat or (train_remat if train_remat != "none" else None)
    if remat:
        overrides["remat"] = remat
    config = config.replace(**overrides) if overrides else config
    optimizer = args.optimizer or getattr(train, "optimizer", "adamw")
    if args.mesh:
        mesh = parse_mesh(args.mesh)
    elif getattr(train, "mesh", None) and args.devices is None:
        mesh = {a: train.mesh.get(a, 1) for a in MESH_AXES}
    else:
        mesh = default_mesh(args.devices or 8, config)
    n = math.prod(mesh.values())
    if args.devices is not None and args.devices != n:
        raise SystemExit(f"--devices {args.devices} does not match the mesh {mesh} ({n} devices)")
    ensure_cpu_devices(n, argv_for_reexec=list(getattr(sys, "orig_argv", [None] + sys.argv)[1:]))
    batch = args.batch or mesh["data"] * mesh["fsdp"] * mesh["expert"]
    return dry_run(config, mesh, batch, args.seq_len, optimizer=optimizer, compile=not args.no_compile)


def _load(name_or_path: str):
    """(ModelConfig, TrainConfig or None): a run config with a `train:` section (k2jax.training.config) or a plain
    model config."""
    try:
        from k2jax.training.config import load_run_config
    except ImportError:
        return load_config(name_or_path), None
    return load_run_config(name_or_path)


if __name__ == "__main__":
    main()

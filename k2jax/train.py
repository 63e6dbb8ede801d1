"""The training loop: `train(model_config, train_config)` and the `train.py` command line (`main`).

One step, jitted: the global batch is split into `grad_accum_steps` micro-batches (a scan), each runs the model
with `return_aux=True`; the loss is the masked token cross-entropy summed over the whole global batch and divided
by its number of loss tokens (so accumulation changes nothing but memory), plus `aux_loss_weight` times the MoE
balance loss. Gradients are clipped and applied by the optax optimizer to the nnx.Param variables only; then every
router's `e_score_correction_bias` (RouterBias) moves by `model.moe_bias_update_rate` against its layer's expert
load over the global batch (aux-loss-free balancing). A step whose loss or gradient norm is not finite leaves the
state unchanged, and the run stops with TrainingDiverged before anything is checkpointed; before each checkpoint
the whole state (parameters, biases, optimizer state) is checked for NaN / inf too.

Around it: a mesh (`train.mesh`, default every device on `data`), parameters created directly in their shardings,
the data source (MQAR or text, each host loading its rows), orbax checkpoints every `checkpoint_every` steps and at
the end, SIGTERM / SIGINT handling (save, then return), evaluation, and metrics (JSONL + TensorBoard + a tqdm bar).
Resuming (`_restore_or_init`): a run continues from the newest readable checkpoint of its run directory, onto any
mesh, after comparing that checkpoint's model config, optimizer and array shapes with its own: a mismatch stops the
run with CheckpointMismatch and changes nothing. A checkpoint is set aside (renamed corrupt-<step>-<time>/) only
when its own files are unreadable; a run directory holding only such checkpoints needs train.fresh=true to start
over. Process 0 takes these decisions for every process. Multi-host: `jax.distributed` is initialised
from the train config or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from k2jax.config import ConfigError, ModelConfig
from k2jax.train_config import TrainConfig, load_run_config


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or (checked before each checkpoint) the updated state became NaN or infinite;
    nothing after the last good step was saved."""


@dataclasses.dataclass
class TrainResult:
    """What a `train` call did. `losses` maps each step run by this call (1-based: step s is the s-th update) to
    its training loss; `evals` lists {'step', 'accuracy', 'loss', 'time_s' (since the loop started)}; `stopped` is
    'completed', 'stop_at_step', 'target_accuracy', 'preempted' or 'callback'. `metrics` holds every step's
    logged metrics."""

    step: int
    stopped: str
    losses: dict[int, float]
    evals: list[dict]
    run_dir: Path
    resumed_from: int | None
    metrics: list[dict] = dataclasses.field(default_factory=list)


# ---- multi-host -----------------------------------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start jax.distributed from the arguments, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID. Returns True when running multi-process. Uses gloo for CPU collectives. Must run before any
    other JAX call."""
    import jax

    env = os.environ
    addr = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if addr is None:
        return False
    n = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
    if n is None or pid is None:
        raise ConfigError("multi-host: a coordinator address is set but the number of processes or the process id "
                          "is missing (train.num_processes / train.process_id or JAX_NUM_PROCESSES / "
                          "JAX_PROCESS_ID)")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=addr, num_processes=int(n), process_id=int(pid))
    return True


# ---- setup ----------------------------------------------------------------------------------------------------------
def build_mesh(tcfg: TrainConfig):
    """The training mesh: `tcfg.mesh`, or every device on the data axis."""
    import jax

    from k2jax.sharding import make_mesh

    shape = tcfg.mesh if tcfg.mesh is not None else {"data": jax.device_count()}
    size = math.prod(shape.values())
    if jax.process_count() > 1 and size != jax.device_count():
        raise ConfigError(f"train.mesh {shape} uses {size} devices; a multi-host mesh must use all "
                          f"{jax.device_count()}")
    try:
        return make_mesh(shape)
    except ValueError as e:
        raise ConfigError(f"train.mesh {shape}: {e}") from None


def _check_batch(tcfg: TrainConfig, mesh) -> None:
    import jax

    dp = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert") if a in mesh.shape)
    micro = tcfg.batch_size // tcfg.grad_accum_steps
    if micro % dp:
        raise ConfigError(f"train.batch_size / grad_accum_steps = {micro} sequences per micro-batch must be "
                          f"divisible by the {dp} data-parallel devices (mesh data x fsdp x expert)")
    if tcfg.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={tcfg.batch_size} must be divisible by the {jax.process_count()} "
                          f"processes")


def make_source(mcfg: ModelConfig, tcfg: TrainConfig, process_index: int = 0, process_count: int = 1):
    """The data source of this host (MQARSource or TextSource); fails on bad data before anything compiles."""
    from k2jax import data

    if tcfg.is_mqar:
        try:
            task = data.MQARTask(tcfg.seq_len, tcfg.mqar_num_kv_pairs, mcfg.vocab_size, tcfg.mqar_min_kv_pairs,
                                 tcfg.mqar_random_fill)
        except ValueError as e:
            raise ConfigError(f"{e} (set train.seq_len, train.mqar_num_kv_pairs or model.vocab_size)") from None
        return data.MQARSource(task, tcfg.batch_size, tcfg.seed, process_index, process_count)
    from k2jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tcfg.tokenizer)
    try:
        tok.check_fits_model(mcfg.vocab_size)
    except ValueError as e:
        raise ConfigError(f"train.tokenizer {tcfg.tokenizer!r} does not fit model.vocab_size: {e}") from None
    return data.TextSource(tcfg.data, tok, tcfg.seq_len, tcfg.batch_size, text_field=tcfg.text_field,
                           seed=tcfg.seed, process_index=process_index, process_count=process_count)


def _router_bias_rows(mcfg: ModelConfig, biases) -> dict[tuple, tuple[int, ...]]:
    """For each RouterBias variable (by path), the rows of the model's `expert_load` [n_moe_layers, E] it
    balances: one row for a per-layer bias [E], `repeats` rows for a scanned LayerStack's stacked [repeats, E]."""
    from flax import nnx

    moe_layers = [i for i in range(mcfg.num_hidden_layers) if mcfg.is_moe_layer(i)]
    row_of = {layer: r for r, layer in enumerate(moe_layers)}
    rows = {}
    for path, _ in nnx.to_flat_state(biases):
        path = tuple(path)
        if path[0] == "layers":
            layers = [int(path[1])]
        elif path[0] == "blocks":
            from k2jax.model import block_layout

            entry = block_layout(mcfg)[int(path[1])]
            if entry[0] == "layer":
                layers = [entry[1]]
            else:
                _, start, period, reps = entry
                layers = [start + j * period + int(path[3]) for j in range(reps)]
        else:
            raise ValueError(f"router bias at unexpected path {path}")
        rows[path] = tuple(row_of[i] for i in layers)
    return rows


# ---- the jitted steps -----------------------------------------------------------------------------------------------
_STEP_FIELDS = ("steps", "grad_accum_steps", "optimizer", "learning_rate", "schedule", "warmup_steps",
                "decay_fraction", "min_lr_ratio", "weight_decay", "adam_b1", "adam_b2", "adam_eps", "grad_clip",
                "aux_loss_weight", "moe_bias_update")
_CACHE: dict = {}  # jitted steps by configuration, so repeated `train` calls in one process reuse compilations


def _cache_key(kind: str, mcfg: ModelConfig, tcfg: TrainConfig | None = None) -> str:
    t = {f: getattr(tcfg, f) for f in _STEP_FIELDS} if tcfg is not None else {}
    return json.dumps([kind, mcfg.to_dict(), t], sort_keys=True, default=str)


def _forward_loss(graphdef, params, biases, rest, batch):
    """Masked cross-entropy pieces of one micro-batch: (loss_sum, correct, aux dict)."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    model = nnx.merge(graphdef, params, biases, rest)
    logits, aux = model(batch["tokens"], batch.get("segment_ids"), return_aux=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["loss_mask"]
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w)
    return jnp.sum(ce * w), correct, aux


def _balance_loss(aux):
    import jax
    import jax.numpy as jnp

    from k2jax.layers.moe import load_balance_loss

    if "expert_load" not in aux:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jax.vmap(load_balance_loss)(aux["router_probs_mean"], aux["expert_load"]))


def _update_biases(biases, load, rate: float, rows: dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from k2jax.layers.moe import update_router_bias

    if rate == 0 or not rows:
        return biases
    out = []
    for path, var in nnx.to_flat_state(biases):
        value, r = var.get_value(), rows[tuple(path)]
        layer_load = load[jnp.asarray(r)]
        if value.ndim == 1:
            value = update_router_bias(value, layer_load[0], rate)
        else:
            value = jax.vmap(update_router_bias, (0, 0, None))(value, layer_load, rate)
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def _make_train_step(graphdef, mcfg: ModelConfig, tcfg: TrainConfig, tx, schedule, bias_rows):
    import jax
    import jax.numpy as jnp
    import optax

    A = tcfg.grad_accum_steps
    aux_w = float(tcfg.aux_loss_weight)
    rate = float(mcfg.moe_bias_update_rate) if tcfg.moe_bias_update else 0.0

    def micro_objective(params, biases, rest, mb, total):
        loss_sum, correct, aux = _forward_loss(graphdef, params, biases, rest, mb)
        balance = _balance_loss(aux) if aux_w > 0 else jnp.zeros((), jnp.float32)
        load = aux.get("expert_load", jnp.zeros((0, 1), jnp.float32))
        return loss_sum / total + aux_w * balance / A, (loss_sum, correct, load, balance / A)

    grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

    def accumulate(params, biases, rest, batch, total):
        if A == 1:
            (_, stats), grads = grad_fn(params, biases, rest, batch, total)
            return grads, stats
        # Micro-batch a takes rows a, A + a, 2A + a, ...: every device keeps its share of each micro-batch.
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, mb):
            g_acc, s_acc = carry
            (_, stats), g = grad_fn(params, biases, rest, mb, total)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, jax.tree.map(jnp.add, s_acc, stats)), None

        zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        first = jax.tree.map(lambda x: x[0], micro)
        s0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, biases, rest, first, total)[0][1]))
        (grads, stats), _ = jax.lax.scan(body, (zeros_g, s0), micro)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return grads, stats

    def step(state, batch, step_index):
        params, biases, rest, opt = state["params"], state["biases"], state["rest"], state["opt"]
        total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        grads, (loss_sum, correct, load, balance) = accumulate(params, biases, rest, batch, total)
        loss = loss_sum / total
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt, params)
        new = {"params": optax.apply_updates(params, updates), "biases": _update_biases(biases, load, rate, bias_rows),
               "rest": rest, "opt": new_opt}
        # A non-finite step changes nothing: the state stays the last good one.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "accuracy": correct / total, "grad_norm": grad_norm, "aux_loss": balance,
                   "expert_load": load, "finite": finite, "lr": schedule(step_index), "loss_tokens": total}
        return new, metrics

    return jax.jit(step)


def _finite_leaves(tree):
    """A bool per array of `tree`: every element finite (always True for integer arrays)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                        else jnp.bool_(True), tree)


def _make_eval_step(graphdef):
    import jax

    def evaluate(state, batch):
        loss_sum, correct, _ = _forward_loss(graphdef, state["params"], state["biases"], state["rest"], batch)
        return loss_sum, correct, batch["loss_mask"].sum()

    return jax.jit(evaluate)


def _cached(key: str, build: Callable):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


# ---- state -----------------------------------------------------------------------------------------------------------
class _State:
    """Builds, restores and saves the training state {'params', 'biases', 'rest', 'opt'} on a mesh."""

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, mesh, tx):
        import jax
        import optax
        from flax import nnx

        from k2jax.model import KimiLinear
        from k2jax.layers.moe import RouterBias
        from k2jax.sharding import param_shardings

        self.mcfg, self.tcfg, self.mesh, self.tx = mcfg, tcfg, mesh, tx
        abstract = nnx.eval_shape(lambda: KimiLinear(mcfg, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_vars = nnx.split(abstract)
        self.var_shardings = param_shardings(abstract_vars, mesh)
        self.abstract_vars = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          abstract_vars, self.var_shardings)
        self.filters = (nnx.Param, RouterBias, ...)
        self.abstract_params = nnx.split_state(self.abstract_vars, *self.filters)[0]
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        abstract_opt = jax.eval_shape(tx.init, self.abstract_params)
        param_sh = nnx.split_state(self.var_shardings, *self.filters)[0]
        # Moments mirror their parameter's sharding; counts and other non-parameter leaves are replicated.
        # Masked optimizers (Muon's AdamW part, weight-decay masks) hold MaskedNode where a parameter is not
        # theirs: those stay MaskedNode (no array, no sharding).
        def moment_sharding(leaf, sh):
            value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
            return leaf if isinstance(value, optax.transforms.MaskedNode) else sh

        self.opt_shardings = optax.tree_map_params(tx, moment_sharding, abstract_opt, param_sh,
                                                   transform_non_params=lambda _: replicated,
                                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.abstract_opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                         abstract_opt, self.opt_shardings)

    def _split(self, variables) -> dict:
        from flax import nnx

        params, biases, rest = nnx.split_state(variables, *self.filters)
        return {"params": params, "biases": biases, "rest": rest}

    def fresh(self) -> dict:
        """New parameters (seed `train.seed`), created by one jitted program directly in their shardings."""
        import jax
        from flax import nnx

        from k2jax.model import KimiLinear

        mcfg, seed = self.mcfg, self.tcfg.seed
        variables = jax.jit(lambda: nnx.state(KimiLinear(mcfg, rngs=nnx.Rngs(seed))),
                            out_shardings=self.var_shardings)()
        state = self._split(variables)
        state["opt"] = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(state["params"])
        return state

    def variables(self, state: dict):
        from flax import nnx

        return nnx.merge_state(state["params"], state["biases"], state["rest"])

    def to_checkpoint(self, state: dict):
        from flax import nnx

        return nnx.to_pure_dict(self.variables(state)), state["opt"]

    def from_checkpoint(self, pure_vars, opt) -> dict:
        import jax
        from flax import nnx

        variables = jax.tree.map(lambda a: a, self.abstract_vars)
        nnx.replace_by_pure_dict(variables, pure_vars)
        state = self._split(variables)
        state["opt"] = opt
        return state

    def checkpoint_targets(self):
        from flax import nnx

        return nnx.to_pure_dict(self.abstract_vars), self.abstract_opt


# ---- preemption -----------------------------------------------------------------------------------------------------
class _StopSignals:
    """Turns SIGTERM / SIGINT into a flag checked between steps (a second SIGINT interrupts at once)."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def any_process(self) -> bool:
        """True when any process got a stop signal (all processes must stop at the same step)."""
        import jax

        flag = self.received is not None
        if jax.process_count() == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _allgather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (a collective: every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(everyone[i, :sizes[i]]).decode()) for i in range(len(sizes))]


# ---- the loop --------------------------------------------------------------------------------------------------------
def _to_global(batch: dict, mesh) -> dict:
    import jax

    from k2jax.sharding import batch_sharding

    n = jax.process_count()
    out = {}
    for k, v in batch.items():
        shape = (v.shape[0] * n,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, shape), v, shape)
    return out


def _evaluate(eval_step, state, batches, mesh) -> dict:
    loss = correct = count = 0.0
    for b in batches:
        l, c, n = eval_step(state, _to_global(b, mesh))
        loss, correct, count = loss + float(l), correct + float(c), count + float(n)
    return {"accuracy": correct / max(count, 1.0), "loss": loss / max(count, 1.0)}


def train(model_config: ModelConfig, train_config: TrainConfig, *,
          callbacks: Sequence[Callable] = ()) -> TrainResult:
    """Train `model_config` per `train_config`, resuming from `train_config.run_dir` when it holds checkpoints.

    callbacks: called after each step as `cb(step, metrics, state)`; one may return a replacement state dict
    (for tests and custom hooks), or "stop" to end the run after this step (checkpointed).
    Raises ConfigError / ValueError for bad settings or data before compiling, TrainingDiverged on a non-finite
    loss.
    """
    initialize_distributed(train_config.coordinator_address, train_config.num_processes, train_config.process_id)
    import jax

    from k2jax.checkpoint import TrainCheckpointer
    from k2jax.metrics import MetricsWriter, peak_flops_per_device, train_flops_per_token
    from k2jax.optim import make_optimizer

    mcfg, tcfg = model_config, train_config
    pid, nproc = jax.process_index(), jax.process_count()
    source = make_source(mcfg, tcfg, pid, nproc)
    mesh = build_mesh(tcfg)
    _check_batch(tcfg, mesh)
    tx, schedule = make_optimizer(tcfg)
    if tcfg.run_dir is None:
        tcfg = tcfg.replace(run_dir=str(Path("runs") / mcfg.name))
    run_dir = Path(tcfg.run_dir)
    # The model is built (abstractly and for real) outside `set_mesh`: under an active mesh nnx would read the
    # logical axis names as mesh axes. Its shardings come from k2jax.sharding instead.
    st = _State(mcfg, tcfg, mesh, tx)
    ckpt = TrainCheckpointer(run_dir / "checkpoints", keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoints)
    writer = None
    try:
        # Before anything is written to run_dir: a run that refuses to resume there leaves it as it was.
        state, start, data_states = _restore_or_init(st, ckpt, mcfg, tcfg)
        writer = MetricsWriter(run_dir, enabled=pid == 0, tensorboard=tcfg.tensorboard)
        if data_states is not None:
            _resume_data(source, data_states, start, pid, nproc)
        loop = _Loop(mcfg, tcfg, st, ckpt, writer, source, mesh, schedule, start, callbacks)
        loop.peak = peak_flops_per_device(tcfg.peak_flops)
        loop.flops_per_token = train_flops_per_token(mcfg, tcfg.seq_len)
        with jax.set_mesh(mesh):
            return loop.run(state)
    finally:
        if writer is not None:
            writer.close()
        ckpt.close()


# ---- resuming --------------------------------------------------------------------------------------------------------
# Model fields that may differ between the invocations of one run: they change how the saved parameters are computed
# (precision, kernels, memory) or were initialised, not what they are.
RESUMABLE_MODEL_FIELDS = frozenset({"name", "dtype", "kda_impl", "kda_chunk_size", "moe_impl", "moe_ep_impl",
                                    "moe_capacity_factor", "remat", "initializer_range", "max_position_embeddings",
                                    "moe_bias_update_rate"})


def checkpoint_differences(saved, mcfg: ModelConfig, tcfg: TrainConfig, targets) -> list[str]:
    """Why the checkpoint `saved` (a k2jax.checkpoint.SavedStep) cannot continue this run, one line per reason:
    model fields outside RESUMABLE_MODEL_FIELDS, the optimizer, gradient clipping switched on or off, and, when no
    field explains it, the arrays (paths, shapes, dtypes) against `targets` = (variables, optimizer state).
    Empty when it can."""
    from k2jax.checkpoint import array_differences, flat_arrays, jsonable
    from k2jax.config import from_dict

    ours = jsonable(mcfg.to_dict())
    try:  # fields added to ModelConfig since the checkpoint was written take their defaults
        theirs = jsonable(from_dict(dict(saved.config), source=str(saved.directory / "config")).to_dict())
    except (ConfigError, TypeError, ValueError) as e:
        return [f"the saved model config is not readable by this version of k2jax: {e}"]
    diffs = [f"model.{k}: saved {theirs.get(k)!r}, this run {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
             if k not in RESUMABLE_MODEL_FIELDS and theirs.get(k) != ours.get(k)]
    saved_train = saved.meta.get("train_config") or {}
    if saved_train.get("optimizer", tcfg.optimizer) != tcfg.optimizer:
        diffs.append(f"train.optimizer: saved {saved_train['optimizer']!r}, this run {tcfg.optimizer!r}")
    clip = saved_train.get("grad_clip", tcfg.grad_clip)
    if (clip > 0) != (tcfg.grad_clip > 0):
        diffs.append(f"train.grad_clip: saved {clip}, this run {tcfg.grad_clip} (clipping is on in one and off in "
                     f"the other, so the optimizer states differ)")
    if not diffs:
        for item, target in zip(("params", "opt"), targets):
            diffs += [f"{item}/{d}" for d in array_differences(saved.arrays[item], flat_arrays(target))]
    return diffs


def _plan_resume(st: _State, ckpt, mcfg: ModelConfig, tcfg: TrainConfig) -> dict:
    """What to do with the run directory's checkpoints, as JSON (decided by process 0, see `_decided_once`):
    {'action': 'fresh', 'archive': None or where the previous run goes},
    {'action': 'restore', 'step': s, 'set_aside': [[step, reason], ...]},
    {'action': 'refuse', 'set_aside': [...], 'message': str} or {'action': 'mismatch', 'message': str}.
    Only reads: unreadable steps are listed in 'set_aside' for the caller, who sets them aside unless the answer
    is 'mismatch'."""
    from k2jax.checkpoint import CheckpointCorrupt

    run_dir = Path(tcfg.run_dir)
    steps, aside = ckpt.steps(), ckpt.set_aside_dirs()
    if tcfg.fresh or not (steps or aside):
        archive = None
        if steps or aside:
            archive = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            while archive.exists():  # two fresh starts within a second
                archive = archive.with_name(archive.name + "-1")
        return {"action": "fresh", "archive": archive and str(archive), "set_aside": []}
    unreadable = []
    for step in reversed(steps):
        try:
            saved = ckpt.read_step(step)
        except CheckpointCorrupt as e:
            unreadable.append([step, e.reason])
            continue
        diffs = checkpoint_differences(saved, mcfg, tcfg, st.checkpoint_targets())
        if diffs:
            return {"action": "mismatch", "message": (
                f"run directory {run_dir} holds the checkpoints of another run: its newest readable checkpoint "
                f"(step {step}) differs from this run in\n  " + "\n  ".join(diffs) + "\nNothing was changed. Resume "
                f"it with the settings it was saved with, give this run another directory (train.run_dir=DIR or "
                f"--run-dir DIR), or start this run from step 0 in {run_dir} with train.fresh=true (its checkpoints "
                f"and metrics are then moved to {run_dir}/replaced-<time>/, not deleted)")}
        return {"action": "restore", "step": step, "set_aside": unreadable}
    names = [f"{step} (set aside now)" for step, _ in unreadable] + [p.name for p in aside]
    return {"action": "refuse", "set_aside": unreadable, "message": (
        f"run directory {run_dir} holds no readable checkpoint, only unreadable ones: {', '.join(names)} in "
        f"{ckpt.directory} (each with a reason.txt). Not starting from step 0 over them: pass train.fresh=true to do "
        f"so (they and the metrics are moved to {run_dir}/replaced-<time>/), or give this run another directory")}


def _decided_once(decide: Callable[[], dict]) -> dict:
    """`decide()` run on process 0 only and its answer given to every process, so that all take the same
    decision. An exception on process 0 is raised there and reported to the others as a RuntimeError."""
    import jax

    if jax.process_count() == 1:
        return decide()
    plan = None
    if jax.process_index() == 0:
        try:
            plan = decide()
        except BaseException as e:
            _allgather_json({"action": "failed", "message": f"{type(e).__name__}: {e}"})
            raise
    plan = _allgather_json(plan)[0]
    if plan["action"] == "failed":
        raise RuntimeError(f"process 0 could not read the checkpoints: {plan['message']}")
    return plan


def _restore_everywhere(ckpt, step: int, targets):
    """Restore `step` on every process -> ((variables, opt_state, meta), None), or (None, reason) when any
    process found its files unreadable. Any other error on any process is raised on every process (the step is
    left as it is)."""
    from k2jax.checkpoint import CheckpointCorrupt

    restored = error = None
    try:
        restored = ckpt.restore(step, variables=targets[0], opt_state=targets[1])
        outcome = {}
    except CheckpointCorrupt as e:
        outcome = {"corrupt": e.reason}
    except BaseException as e:  # noqa: BLE001 - the other processes must hear of it before this one raises
        error, outcome = e, {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    outcomes = _allgather_json(outcome)
    if error is not None:
        raise error
    failed = [f"process {i}: {o['error']}" for i, o in enumerate(outcomes) if "error" in o]
    if failed:
        raise RuntimeError(f"restoring {ckpt.directory / str(step)} failed on another process ({'; '.join(failed)}); "
                           f"it was left as it is")
    corrupt = [(i, o["corrupt"]) for i, o in enumerate(outcomes) if "corrupt" in o]
    if corrupt:
        return None, "; ".join(r if len(outcomes) == 1 else f"process {i}: {r}" for i, r in corrupt)
    return restored, None


def _archive_run(run_dir: Path, archive: Path, ckpt) -> None:
    """train.fresh over an existing run: move its checkpoints, metrics.jsonl and tensorboard/ to `archive`
    (process 0; every process calls this)."""
    import jax

    if jax.process_index() == 0:
        archive.mkdir(parents=True)
        for name in ("metrics.jsonl", "tensorboard"):
            if (run_dir / name).exists():
                (run_dir / name).rename(archive / name)
        warnings.warn(f"train.fresh: starting {run_dir} from step 0; its previous checkpoints and metrics are in "
                      f"{archive}")
    ckpt.move_all(archive / "checkpoints")


def _restore_or_init(st: _State, ckpt, mcfg: ModelConfig, tcfg: TrainConfig):
    """(state, start step, saved data states or None): the newest readable checkpoint of the run directory, or a
    fresh state when it has none (or train.fresh). Raises CheckpointMismatch (nothing changed) when that checkpoint
    belongs to another model or optimizer, and ConfigError when only unreadable checkpoints are left. A step is
    set aside only when its own files are unreadable; every process takes the same decisions."""
    from k2jax.checkpoint import CheckpointMismatch

    while True:
        plan = _decided_once(lambda: _plan_resume(st, ckpt, mcfg, tcfg))
        if plan["action"] == "mismatch":
            raise CheckpointMismatch(plan["message"])
        for step, reason in plan["set_aside"]:
            ckpt.set_aside(step, reason)
        if plan["action"] == "refuse":
            raise ConfigError(plan["message"])
        if plan["action"] == "fresh":
            if plan["archive"]:
                _archive_run(Path(tcfg.run_dir), Path(plan["archive"]), ckpt)
            return st.fresh(), 0, None
        restored, reason = _restore_everywhere(ckpt, plan["step"], st.checkpoint_targets())
        if restored is not None:
            pure_vars, opt, meta = restored
            return st.from_checkpoint(pure_vars, opt), plan["step"], meta.get("data")
        ckpt.set_aside(plan["step"], reason)  # and decide again among the older steps


def _resume_data(source, states: list, step: int, pid: int, nproc: int) -> None:
    if len(states) == nproc:
        source.set_state(states[pid])
    elif states and states[0].get("kind") == "mqar":
        source.set_state({"kind": "mqar", "step": step})
    else:
        warnings.warn(f"the checkpoint's data positions were saved by {len(states)} processes, this run has {nproc}: "
                      f"each host restarts its shard of the text data from the beginning")


class _Loop:
    """The per-step loop of `train` (state lives in `run`'s locals; this holds the fixed parts)."""

    def __init__(self, mcfg, tcfg, st, ckpt, writer, source, mesh, schedule, start, callbacks):
        self.mcfg, self.tcfg, self.st, self.ckpt, self.writer = mcfg, tcfg, st, ckpt, writer
        self.source, self.mesh, self.schedule, self.start, self.callbacks = source, mesh, schedule, start, callbacks
        self.peak = self.flops_per_token = None
        self.last_saved = start

    def _check_finite(self, state, step: int) -> None:
        """TrainingDiverged when an array of `state` (parameters, router biases, optimizer state) holds NaN or inf:
        an update can poison the state although its loss and gradient norm were finite."""
        import jax

        finite_fn = _cached(_cache_key("finite", self.mcfg, self.tcfg), lambda: jax.jit(_finite_leaves))
        flags = jax.tree_util.tree_flatten_with_path(jax.device_get(finite_fn(state)))[0]
        bad = [jax.tree_util.keystr(path) for path, ok in flags if not ok]
        if bad:
            raise TrainingDiverged(
                f"step {step}: after the update, {len(bad)} arrays of the training state hold NaN or inf "
                f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): step {step} was not checkpointed, and "
                f"nothing after step {self.last_saved} was. Lower train.learning_rate (now "
                f"{self.tcfg.learning_rate}) or keep train.grad_clip > 0; rerunning resumes from the last checkpoint.")

    def _save(self, state, step: int, wait: bool = False) -> None:
        import jax

        self._check_finite(state, step)
        data_states = _allgather_json(self.source.get_state())
        variables, opt = self.st.to_checkpoint(state)
        meta = {"step": step, "seed": self.tcfg.seed, "process_count": jax.process_count(), "data": data_states,
                "train_config": self.tcfg.to_dict()}
        self.ckpt.save(step, variables=variables, config=self.mcfg.to_dict(), opt_state=opt, meta=meta, wait=wait)
        self.last_saved = step

    def run(self, state) -> TrainResult:
        import jax
        import jax.numpy as jnp
        from tqdm import tqdm

        from k2jax.metrics import expert_load_stats

        tcfg, mcfg = self.tcfg, self.mcfg
        st = self.st
        bias_rows = _router_bias_rows(mcfg, st._split(st.abstract_vars)["biases"])
        step_fn = _cached(_cache_key("train", mcfg, tcfg),
                          lambda: _make_train_step(st.graphdef, mcfg, tcfg, st.tx, self.schedule, bias_rows))
        eval_fn = _cached(_cache_key("eval", mcfg), lambda: _make_eval_step(st.graphdef))
        eval_batches = self.source.eval_batches(tcfg.eval_batches) if hasattr(self.source, "eval_batches") else []
        end = min(tcfg.steps, tcfg.stop_at_step or tcfg.steps)
        result = TrainResult(step=self.start, stopped="completed", losses={}, evals=[], run_dir=Path(tcfg.run_dir),
                             resumed_from=self.start or None)
        tokens_per_step = tcfg.batch_size * tcfg.seq_len
        n_dev = self.mesh.size
        bar = tqdm(total=tcfg.steps, initial=self.start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not tcfg.progress or jax.process_index() != 0)
        postfix = {}
        t_start = time.perf_counter()
        with _StopSignals() as signals:
            for step in range(self.start + 1, end + 1):
                t0 = time.perf_counter()
                batch = _to_global(next(self.source), self.mesh)
                state, out = step_fn(state, batch, jnp.int32(step - 1))
                out = jax.device_get(out)
                dt = time.perf_counter() - t0
                loss = float(out["loss"])
                if not bool(out["finite"]):
                    bar.close()
                    raise TrainingDiverged(
                        f"step {step}: the loss is {loss} and the gradient norm {float(out['grad_norm'])}: training "
                        f"stopped before this step's update, and nothing after step {self.last_saved} was "
                        f"checkpointed. Lower train.learning_rate (now {tcfg.learning_rate}), check the data, or "
                        f"keep train.grad_clip > 0; rerunning resumes from the last checkpoint.")
                result.losses[step], result.step = loss, step
                metrics = {"loss": loss, "accuracy": float(out["accuracy"]), "grad_norm": float(out["grad_norm"]),
                           "lr": float(out["lr"]), "step_time": dt, "tokens_per_s": tokens_per_step / dt,
                           **expert_load_stats(out["expert_load"])}
                if tcfg.aux_loss_weight > 0:
                    metrics["aux_loss"] = float(out["aux_loss"])
                if self.peak:
                    metrics["mfu"] = self.flops_per_token * metrics["tokens_per_s"] / (self.peak * n_dev)
                if step == self.start + 1:
                    metrics["includes_compile"] = True
                result.metrics.append({"step": step, **metrics})
                if step % tcfg.log_every == 0 or step == end:
                    self.writer.write(step, metrics)
                requested = False
                for cb in self.callbacks:
                    answer = cb(step, metrics, state)
                    if isinstance(answer, str) and answer == "stop":
                        requested = True
                    elif answer is not None:
                        state = answer
                postfix.update(loss=f"{loss:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                evaluated = None
                if eval_batches and ((tcfg.eval_every and step % tcfg.eval_every == 0) or step == end):
                    evaluated = _evaluate(eval_fn, state, eval_batches, self.mesh)
                    result.evals.append({"step": step, **evaluated, "time_s": time.perf_counter() - t_start})
                    self.writer.write(step, {**evaluated, "expert_load": np.asarray(out["expert_load"])}, "eval")
                    postfix["eval_acc"] = f"{evaluated['accuracy']:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                target = (evaluated is not None and tcfg.stop_at_accuracy is not None
                          and evaluated["accuracy"] >= tcfg.stop_at_accuracy)
                stop = signals.any_process()
                if stop or target or requested:
                    self._save(state, step, wait=True)
                    result.stopped = "preempted" if stop else "target_accuracy" if target else "callback"
                    break
                if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
                    self._save(state, step)
            else:
                if end < tcfg.steps:
                    result.stopped = "stop_at_step"
            if self.last_saved != result.step:
                self._save(state, result.step, wait=True)
        bar.close()
        self.state = state
        return result


# ---- command line ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a Kimi Linear model. Without arguments: configs/default.yaml (a small hybrid KDA/MLA MoE) "
                    "on the embedded MQAR recall task.",
        epilog="Overrides: model.<field>=value and train.<field>=value (bare names work when unambiguous), "
               "e.g. model.hidden_size=256 train.steps=100 train.mesh.data=2.")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--config", default="default", help="run config: a configs/ name or a YAML file")
    p.add_argument("--data", help="text files to train on (comma-separated paths, globs or folders of .txt, "
                                  ".jsonl, .parquet); default: MQAR")
    p.add_argument("--run-dir", help="where metrics and checkpoints go (train.run_dir)")
    p.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    p.add_argument("--dry-run", action="store_true",
                   help="plan a pod run without one: lower one step on simulated devices and report memory "
                        "(k2jax.dry_run; see python -m k2jax.dry_run --help for its flags)")
    return p


def _default_compile_cache() -> None:
    """Reuse compiled programs across runs (JAX's persistent cache) unless the user chose a cache already."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/k2jax/jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: Sequence[str] | None = None) -> int:
    """`python train.py [--config FILE] [--data FILES] [key=value ...]`. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:
        from k2jax import dry_run

        dry_run.main(argv)
        return 0
    args = _parser().parse_intermixed_args(argv)
    _default_compile_cache()
    overrides = list(args.overrides)
    for flag, field in (("data", "data"), ("run_dir", "run_dir"), ("coordinator_address", "coordinator_address"),
                        ("num_processes", "num_processes"), ("process_id", "process_id")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"train.{field}={json.dumps(value) if isinstance(value, str) else value}")
    try:
        mcfg, tcfg = load_run_config(args.config, overrides)
        result = train(mcfg, tcfg)
    except (ConfigError, ValueError) as e:
        if os.environ.get("K2JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    last = result.evals[-1] if result.evals else None
    summary = f"{result.stopped} at step {result.step}"
    if result.losses:
        summary += f", loss {result.losses[result.step]:.4f}"
    if last:
        summary += f", eval accuracy {last['accuracy']:.4f}"
    print(f"{summary}; run directory {result.run_dir}")
    return 0

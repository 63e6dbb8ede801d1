"""The training loop: `train(model_config, train_config)`.

Each step runs the jitted train step of k2jax.training.step (loss, gradient accumulation, optimizer update, router
bias balancing). A step whose loss or gradient norm is not finite leaves the state unchanged, and the run stops with
TrainingDiverged before anything is checkpointed; before each checkpoint the whole state (parameters, biases,
optimizer state) is checked for NaN / inf too.

Around it: a mesh (`train.mesh`, default every device on `data`), parameters created directly in their shardings
(k2jax.training.state.TrainState), the data source (MQAR or text, each host loading its rows), orbax checkpoints
every `checkpoint_every` steps and at the end, SIGTERM / SIGINT handling (save, then return), evaluation, and
metrics (JSONL + TensorBoard + a tqdm bar). Resuming (`restore_or_init`, k2jax.training.state): a run continues
from the newest readable checkpoint of its run directory, onto any mesh, after comparing that checkpoint's model
config, optimizer and array shapes with its own: a mismatch stops the run with CheckpointMismatch and changes
nothing. Multi-host: `jax.distributed` is initialised from the train config or the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables (k2jax.training.distributed). The command line is
k2jax.training.cli.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from k2jax.checkpoint import TrainCheckpointer
from k2jax.config import ConfigError, ModelConfig
from k2jax.model import router_bias_rows
from k2jax.sharding import batch_sharding, make_mesh
from k2jax.tokenizer import load_tokenizer
from k2jax.training import data
from k2jax.training.config import TrainConfig
from k2jax.training.distributed import allgather_json, initialize_distributed
from k2jax.training.metrics import MetricsWriter, expert_load_stats, peak_flops_per_device, train_flops_per_token
from k2jax.training.optim import make_optimizer
from k2jax.training.state import TrainState, restore_or_init, resume_data
from k2jax.training.step import cache_key, cached, finite_leaves, make_eval_step, make_train_step


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


# ---- setup ----------------------------------------------------------------------------------------------------------
def build_mesh(tcfg: TrainConfig):
    """The training mesh: `tcfg.mesh`, or every device on the data axis."""


    shape = tcfg.mesh if tcfg.mesh is not None else {"data": jax.device_count()}
    size = math.prod(shape.values())
    if jax.process_count() > 1 and size != jax.device_count():
        raise ConfigError(f"train.mesh {shape} uses {size} devices; a multi-host mesh must use all "
                          f"{jax.device_count()}")
    try:
        return make_mesh(shape)
    except ValueError as e:
        raise ConfigError(f"train.mesh {shape}: {e}") from None


def check_batch(tcfg: TrainConfig, mesh_shape: Mapping[str, int], process_count: int = 1) -> None:
    """ConfigError unless each micro-batch divides over the data-parallel devices of a mesh of `mesh_shape`
    ({axis: size}), the global batch over the `process_count` hosts, and the sequence into 2 x context pieces."""
    dp = math.prod(mesh_shape.get(a, 1) for a in ("data", "fsdp", "expert"))
    micro = tcfg.batch_size // tcfg.grad_accum_steps
    if micro % dp:
        raise ConfigError(f"train.batch_size / grad_accum_steps = {micro} sequences per micro-batch must be "
                          f"divisible by the {dp} data-parallel devices (mesh data x fsdp x expert)")
    if tcfg.batch_size % process_count:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} must be divisible by the {process_count} "
                          f"processes")
    cp = mesh_shape.get("context", 1)
    if cp > 1 and tcfg.seq_len % (2 * cp):
        raise ConfigError(f"train.seq_len={tcfg.seq_len} must be divisible by 2 x the context axis ({cp}): "
                          f"context parallelism cuts each sequence into 2 x context equal pieces (zigzag layout)")


def make_source(mcfg: ModelConfig, tcfg: TrainConfig, process_index: int = 0, process_count: int = 1):
    """The data source of this host (MQARSource or TextSource); fails on bad data before anything compiles."""

    if tcfg.is_mqar:
        try:
            task = data.MQARTask(tcfg.seq_len, tcfg.mqar_num_kv_pairs, mcfg.vocab_size, tcfg.mqar_min_kv_pairs,
                                 tcfg.mqar_random_fill)
        except ValueError as e:
            raise ConfigError(f"{e} (set train.seq_len, train.mqar_num_kv_pairs or model.vocab_size)") from None
        return data.MQARSource(task, tcfg.batch_size, tcfg.seed, process_index, process_count)

    tok = load_tokenizer(tcfg.tokenizer)
    try:
        tok.check_fits_model(mcfg.vocab_size)
    except ValueError as e:
        raise ConfigError(f"train.tokenizer {tcfg.tokenizer!r} does not fit model.vocab_size: {e}") from None
    return data.TextSource(tcfg.data, tok, tcfg.seq_len, tcfg.batch_size, text_field=tcfg.text_field,
                           seed=tcfg.seed, process_index=process_index, process_count=process_count)


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

        flag = self.received is not None
        if jax.process_count() == 1:
            return flag

        return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


# ---- the loop --------------------------------------------------------------------------------------------------------
def _to_global(batch: dict, mesh) -> dict:
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
    (for tests and custom hooks), or "stop" to end the run after this step (checkpointed). The state's arrays
    live until the next step, which donates them: copy (`jax.device_get`) what a callback keeps.
    Raises ConfigError / ValueError for bad settings or data before compiling, TrainingDiverged on a non-finite
    loss.
    """
    initialize_distributed(train_config.coordinator_address, train_config.num_processes, train_config.process_id)


    mcfg, tcfg = model_config, train_config
    pid, nproc = jax.process_index(), jax.process_count()
    source = make_source(mcfg, tcfg, pid, nproc)
    mesh = build_mesh(tcfg)
    check_batch(tcfg, dict(mesh.shape), jax.process_count())
    tx, schedule = make_optimizer(tcfg)
    if tcfg.run_dir is None:
        tcfg = tcfg.replace(run_dir=str(Path("runs") / mcfg.name))
    run_dir = Path(tcfg.run_dir)
    # The model is built (abstractly and for real) outside `set_mesh`: under an active mesh nnx would read the
    # logical axis names as mesh axes. Its shardings come from k2jax.sharding instead.
    st = TrainState(mcfg, tcfg, mesh, tx)
    ckpt = TrainCheckpointer(run_dir / "checkpoints", keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoints)
    writer = None
    try:
        # Before anything is written to run_dir: a run that refuses to resume there leaves it as it was.
        state, start, data_states = restore_or_init(st, ckpt, mcfg, tcfg)
        writer = MetricsWriter(run_dir, enabled=pid == 0, tensorboard=tcfg.tensorboard)
        if data_states is not None:
            resume_data(source, data_states, start, pid, nproc)
        loop = _Loop(mcfg, tcfg, st, ckpt, writer, source, mesh, schedule, start, callbacks)
        loop.peak = peak_flops_per_device(tcfg.peak_flops)
        loop.flops_per_token = train_flops_per_token(mcfg, tcfg.seq_len)
        with jax.set_mesh(mesh):
            return loop.run(state)
    finally:
        if writer is not None:
            writer.close()
        ckpt.close()


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

        finite_fn = cached(cache_key("finite", self.mcfg, self.tcfg), lambda: jax.jit(finite_leaves))
        flags = jax.tree_util.tree_flatten_with_path(jax.device_get(finite_fn(state)))[0]
        bad = [jax.tree_util.keystr(path) for path, ok in flags if not ok]
        if bad:
            raise TrainingDiverged(
                f"step {step}: after the update, {len(bad)} arrays of the training state hold NaN or inf "
                f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): step {step} was not checkpointed, and "
                f"nothing after step {self.last_saved} was. Lower train.learning_rate (now "
                f"{self.tcfg.learning_rate}) or keep train.grad_clip > 0; rerunning resumes from the last checkpoint.")

    def _save(self, state, step: int, wait: bool = False) -> None:
        self._check_finite(state, step)
        data_states = allgather_json(self.source.get_state())
        variables, opt = self.st.to_checkpoint(state)
        meta = {"step": step, "seed": self.tcfg.seed, "process_count": jax.process_count(), "data": data_states,
                "train_config": self.tcfg.to_dict()}
        self.ckpt.save(step, variables=variables, config=self.mcfg.to_dict(), opt_state=opt, meta=meta, wait=wait)
        self.last_saved = step

    def run(self, state) -> TrainResult:
        tcfg, mcfg = self.tcfg, self.mcfg
        st = self.st
        bias_rows = router_bias_rows(mcfg, st.split_variables(st.abstract_vars)["biases"])
        # the step pins the state's shardings, so its cached program is per mesh (shape and devices) too
        mesh_key = f"{dict(self.mesh.shape)}{[d.id for d in self.mesh.devices.flat]}"
        step_fn = cached(cache_key("train", mcfg, tcfg) + mesh_key,
                         lambda: make_train_step(st.graphdef, mcfg, tcfg, st.tx, self.schedule, bias_rows,
                                                 st.state_shardings()))
        eval_fn = cached(cache_key("eval", mcfg), lambda: make_eval_step(st.graphdef))
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
                if "max_logit" in out:  # muonclip: each MLA layer's largest attention logit, before the clip
                    metrics.update({f"max_logit/mla_{r}": float(v) for r, v in enumerate(out["max_logit"])})
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

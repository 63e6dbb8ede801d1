"""The training state {'params', 'biases', 'rest', 'opt'} on a mesh (`TrainState`) and resuming a run from its
checkpoints (`restore_or_init`).

Resuming: a run continues from the newest readable checkpoint of its run directory, onto any mesh, after comparing
that checkpoint's model config, optimizer and array shapes with its own: a mismatch stops the run with
CheckpointMismatch and changes nothing. A checkpoint is set aside (renamed corrupt-<step>-<time>/) only when its own
files are unreadable; a run directory holding only such checkpoints needs train.fresh=true to start over. Process 0
takes these decisions for every process.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import jax
import optax
from flax import nnx

from k2jax.checkpoint import CheckpointCorrupt, CheckpointMismatch, array_differences, flat_arrays, jsonable
from k2jax.config import ConfigError, ModelConfig
from k2jax.layers.moe import RouterBias
from k2jax.model import KimiLinear
from k2jax.sharding import param_shardings
from k2jax.training.config import TrainConfig
from k2jax.training.distributed import allgather_json, decided_once


# ---- state -----------------------------------------------------------------------------------------------------------
class TrainState:
    """Builds, restores and saves the training state {'params', 'biases', 'rest', 'opt'} on a mesh."""

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, mesh, tx):
        self.mcfg, self.tcfg, self.mesh, self.tx = mcfg, tcfg, mesh, tx
        # rngs=None: shapes only (every parameter from one fixed key), the same tree as `fresh` builds; tracing
        # nnx.Rngs' counter updates would cost time quadratic in the parameter count.
        abstract = nnx.eval_shape(lambda: KimiLinear(mcfg, rngs=None))
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

    def abstract_state(self) -> dict:
        """The training state as ShapeDtypeStructs in their shardings: what `fresh` allocates."""
        state = self.split_variables(self.abstract_vars)
        state["opt"] = self.abstract_opt
        return state

    def state_shardings(self) -> dict:
        """The NamedSharding of every array of the training state (a tree like `abstract_state()`)."""
        return jax.tree.map(lambda a: a.sharding, self.abstract_state())

    def split_variables(self, variables) -> dict:
        """A model's variables (nnx.State) -> {'params': nnx.Param, 'biases': RouterBias, 'rest': the others}."""

        params, biases, rest = nnx.split_state(variables, *self.filters)
        return {"params": params, "biases": biases, "rest": rest}

    def fresh(self) -> dict:
        """New parameters (seed `train.seed`), created by one jitted program directly in their shardings."""


        mcfg, seed = self.mcfg, self.tcfg.seed
        variables = jax.jit(lambda: nnx.state(KimiLinear(mcfg, rngs=nnx.Rngs(seed))),
                            out_shardings=self.var_shardings)()
        state = self.split_variables(variables)
        state["opt"] = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(state["params"])
        return state

    def variables(self, state: dict):
        return nnx.merge_state(state["params"], state["biases"], state["rest"])

    def to_checkpoint(self, state: dict):
        return nnx.to_pure_dict(self.variables(state)), state["opt"]

    def from_checkpoint(self, pure_vars, opt) -> dict:
        variables = jax.tree.map(lambda a: a, self.abstract_vars)
        nnx.replace_by_pure_dict(variables, pure_vars)
        state = self.split_variables(variables)
        state["opt"] = opt
        return state

    def checkpoint_targets(self):
        return nnx.to_pure_dict(self.abstract_vars), self.abstract_opt


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

    ours = jsonable(mcfg.to_dict())
    try:  # fields added to ModelConfig since the checkpoint was written take their defaults
        theirs = jsonable(ModelConfig.from_dict(dict(saved.config), source=str(saved.directory / "config")).to_dict())
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


def _plan_resume(st: TrainState, ckpt, mcfg: ModelConfig, tcfg: TrainConfig) -> dict:
    """What to do with the run directory's checkpoints, as JSON (decided by process 0, see `decided_once`):
    {'action': 'fresh', 'archive': None or where the previous run goes},
    {'action': 'restore', 'step': s, 'set_aside': [[step, reason], ...]},
    {'action': 'refuse', 'set_aside': [...], 'message': str} or {'action': 'mismatch', 'message': str}.
    Only reads: unreadable steps are listed in 'set_aside' for the caller, who sets them aside unless the answer
    is 'mismatch'."""

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


def _restore_everywhere(ckpt, step: int, targets):
    """Restore `step` on every process -> ((variables, opt_state, meta), None), or (None, reason) when any
    process found its files unreadable. Any other error on any process is raised on every process (the step is
    left as it is)."""

    restored = error = None
    try:
        restored = ckpt.restore(step, variables=targets[0], opt_state=targets[1])
        outcome = {}
    except CheckpointCorrupt as e:
        outcome = {"corrupt": e.reason}
    except BaseException as e:  # noqa: BLE001 - the other processes must hear of it before this one raises
        error, outcome = e, {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    outcomes = allgather_json(outcome)
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

    if jax.process_index() == 0:
        archive.mkdir(parents=True)
        for name in ("metrics.jsonl", "tensorboard"):
            if (run_dir / name).exists():
                (run_dir / name).rename(archive / name)
        warnings.warn(f"train.fresh: starting {run_dir} from step 0; its previous checkpoints and metrics are in "
                      f"{archive}")
    ckpt.move_all(archive / "checkpoints")


def restore_or_init(st: TrainState, ckpt, mcfg: ModelConfig, tcfg: TrainConfig):
    """(state, start step, saved data states or None): the newest readable checkpoint of the run directory, or a
    fresh state when it has none (or train.fresh). Raises CheckpointMismatch (nothing changed) when that checkpoint
    belongs to another model or optimizer, and ConfigError when only unreadable checkpoints are left. A step is
    set aside only when its own files are unreadable; every process takes the same decisions."""

    while True:
        plan = decided_once(lambda: _plan_resume(st, ckpt, mcfg, tcfg))
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


def resume_data(source, states: list, step: int, pid: int, nproc: int) -> None:
    """Put this host's data `source` back where the checkpoint's `states` (one per saving process) left it; MQAR
    resumes from `step` on any process count, text data restarts from the beginning when the count changed."""
    if len(states) == nproc:
        source.set_state(states[pid])
    elif states and states[0].get("kind") == "mqar":
        source.set_state({"kind": "mqar", "step": step})
    else:
        warnings.warn(f"the checkpoint's data positions were saved by {len(states)} processes, this run has {nproc}: "
                      f"each host restarts its shard of the text data from the beginning")

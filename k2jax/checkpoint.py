"""Minimal orbax checkpoints of a KimiLinear's variables (parameters and router biases) plus its config.

Layout of a checkpoint directory (written atomically by orbax: a temporary directory renamed on success):
    params/   orbax StandardSave of the model's variables as a nested dict (nnx.to_pure_dict)
    config/   the ModelConfig as JSON (ModelConfig.to_dict)
`TrainCheckpointer` (below) writes the same two items plus the optimizer state and the run state, per step, for
training runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from k2jax.config import ModelConfig
from k2jax.config_files import load_config
from k2jax.model import KimiLinear
from k2jax.sharding import logical_names, logical_to_mesh_spec


def _checkpointer():
    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_params(model, directory: str | os.PathLike) -> Path:
    """Save every nnx Variable of `model` (a KimiLinear) and its config to `directory` (must not exist yet).

    Sharded arrays are written by each host's own shards (orbax), so this works on multi-host meshes.
    Returns the absolute path.
    """
    ocp, ckptr = _checkpointer()
    path = Path(directory).absolute()
    if path.exists():
        raise FileExistsError(f"save_params: {path} already exists")
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Variable))
    ckptr.save(path, args=ocp.args.Composite(params=ocp.args.StandardSave(tree),
                                             config=ocp.args.JsonSave(model.config.to_dict())))
    return path


def saved_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a `save_params` checkpoint."""
    ocp, ckptr = _checkpointer()
    path = Path(directory).absolute()
    if not (path / "config").exists():
        raise ValueError(f"{path}: not a k2jax params checkpoint (no config/ item)")
    d = ckptr.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return ModelConfig.from_dict(dict(d), source=str(path / "config"))


def restore_params(config: ModelConfig | str | os.PathLike | None, directory: str | os.PathLike, mesh=None):
    """Restore a KimiLinear saved by `save_params`.

    config: the ModelConfig (or a load_config name/path) to build; None uses the saved one. Its param_dtype may
        differ from the saved dtype (values are cast); shapes must match, else ValueError.
    mesh: place each variable on the NamedSharding given by its logical axis names; None: the default device.
    """

    ocp, ckptr = _checkpointer()
    path = Path(directory).absolute()
    if not (path / "params").exists():
        raise ValueError(f"{path}: not a k2jax params checkpoint (no params/ item)")
    if config is None:
        config = saved_config(path)
    elif not isinstance(config, ModelConfig):
        config = load_config(config)
    abstract = nnx.eval_shape(lambda: KimiLinear(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(var):
        sds = var.get_value()
        if mesh is None:
            sharding = device
        else:
            names = logical_names(var) or (None,) * len(sds.shape)
            sharding = jax.sharding.NamedSharding(mesh, logical_to_mesh_spec(names, mesh, sds.shape))
        return jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)

    abstract_tree = nnx.to_pure_dict(jax.tree.map(target, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    try:
        restored = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_tree)))
    except ValueError as e:
        raise ValueError(f"{path}: the saved parameters do not fit a model built from config {config.name!r}: "
                         f"{e}") from None
    nnx.replace_by_pure_dict(state, restored["params"])
    return nnx.merge(graphdef, state)


# ---- training checkpoints -------------------------------------------------------------------------------------------
SET_ASIDE_PREFIX = "corrupt-"
ITEMS = ("params", "config", "opt", "train")
# Status codes in tensorstore's messages that mean "the system failed" rather than "these bytes are bad" (absl maps
# errno EIO to UNKNOWN, ENOSPC / ENOMEM / EMFILE to RESOURCE_EXHAUSTED, EACCES to PERMISSION_DENIED, ESTALE to
# ABORTED, EAGAIN / EINTR / network errors to UNAVAILABLE). Bad bytes come as FAILED_PRECONDITION (undecodable
# zstd or JSON), OUT_OF_RANGE (truncated files) or NOT_FOUND.
_SYSTEM_FAILURE = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAUTHENTICATED|"
                             r"ABORTED|CANCELLED|UNKNOWN|INTERNAL)\b|Input/output error")


class CheckpointCorrupt(ValueError):
    """A checkpoint step's own files are unreadable or fail their checks; `step` and `reason` say which and why."""

    def __init__(self, step: int, directory: Path, reason: str):
        super().__init__(f"checkpoint {directory} is unreadable: {reason}")
        self.step, self.directory, self.reason = step, directory, reason


class CheckpointMismatch(ValueError):
    """A run directory's checkpoints were written by a run of another model or optimizer (nothing was changed)."""


def corruption_cause(error: BaseException, step_dir: Path) -> BaseException | None:
    """The exception in `error`'s chain (itself, its causes and contexts) saying that the checkpoint `step_dir`'s
    own bytes are bad: unparsable JSON, a file of the committed step missing, a truncated or undecodable array file
    (tensorstore errors naming a file of the step). None when there is none, or when the chain holds an out of
    memory error, an interrupt or a system failure (I/O error, UNAVAILABLE, RESOURCE_EXHAUSTED, ...): the caller
    then lets `error` propagate and leaves the step alone."""
    chain: list[BaseException] = []
    while error is not None and all(error is not e for e in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    if any(isinstance(e, (MemoryError, KeyboardInterrupt)) or _SYSTEM_FAILURE.search(str(e)) for e in chain):
        return None
    for e in chain:
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
            return e
        if isinstance(e, FileNotFoundError) and step_dir.is_dir() and f"{step_dir}/" in str(e):
            return e
        if isinstance(e, ValueError) and not isinstance(e, (CheckpointMismatch, CheckpointCorrupt)) \
                and f"{step_dir}/" in str(e):
            return e
    return None


@dataclasses.dataclass(frozen=True)
class SavedStep:
    """What a training checkpoint holds, read without restoring it: the model config (ModelConfig.to_dict), the
    train/ item, and for the array items ('params', 'opt') each array's path -> (shape, dtype name)."""

    step: int
    directory: Path
    config: dict
    meta: dict
    arrays: dict[str, dict[str, tuple]]


def flat_arrays(tree) -> dict[str, tuple]:
    """path -> (shape, dtype name) of every array leaf of `tree` (arrays, ShapeDtypeStructs or orbax array
    metadata), with paths spelled as orbax stores them ('opt/0/mu/embed_tokens/value' style, tuples as indices)."""

    flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True), sep="/")
    return {k: (tuple(v.shape), np.dtype(v.dtype).name) if hasattr(v, "shape") else (None, type(v).__name__)
            for k, v in flat.items()}


def array_differences(saved: dict[str, tuple], wanted: dict[str, tuple], limit: int = 8) -> list[str]:
    """Readable differences between two `flat_arrays` results (at most `limit` lines, then a count)."""
    out = [f"{k}: in the checkpoint, not in this run" for k in sorted(set(saved) - set(wanted))]
    out += [f"{k}: in this run, not in the checkpoint" for k in sorted(set(wanted) - set(saved))]
    out += [f"{k}: saved shape {saved[k][0]} {saved[k][1]}, this run {wanted[k][0]} {wanted[k][1]}"
            for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


class TrainCheckpointer:
    """Training checkpoints through orbax's CheckpointManager. `directory/<step>/` holds the items
        params/  every model variable, as in `save_params` (so `restore_params(None, directory/<step>)` loads the
                 trained model)
        config/  the ModelConfig as JSON
        opt/     the optimizer state
        train/   JSON: the step, the seed, the TrainConfig and every process's data-iterator position
    Each item is written by orbax to a temporary directory and renamed on success, so a run killed mid-save
    leaves the previous checkpoints intact. Saves may be asynchronous; the newest `keep` are kept.

    Reading is in two stages, so that a caller can compare before it restores: `read_step` (configs and array
    shapes, cheap) and `restore` (the arrays). Both raise CheckpointCorrupt only when the step's own bytes are bad
    (`corruption_cause`); any other error propagates untouched. Nothing here removes a step: `set_aside` renames an
    unreadable one to `corrupt-<step>-<unix time>/` with a reason.txt.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._keep, self._async = keep, async_save
        self._mngr = self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, enable_async_checkpointing=self._async,
                                               create=True)
        return ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints in the directory, oldest first."""
        return sorted(self._mngr.all_steps())

    def set_aside_dirs(self) -> list[Path]:
        """Steps set aside earlier as unreadable (`corrupt-<step>-<time>/`), by name."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(SET_ASIDE_PREFIX))

    def save(self, step: int, *, variables, config: dict, opt_state, meta: dict, wait: bool = False) -> None:
        """Save a checkpoint for `step` (asynchronously unless `wait` or async_save=False). `variables`: pure dict of
        every model variable; `opt_state`: the optimizer state pytree; `meta`: JSON-serialisable run state."""

        args = ocp.args.Composite(params=ocp.args.StandardSave(variables), config=ocp.args.JsonSave(config),
                                  opt=ocp.args.StandardSave(opt_state), train=ocp.args.JsonSave(jsonable(meta)))
        self._mngr.save(step, args=args, force=True)
        if wait or not self._async:
            self._mngr.wait_until_finished()

    def read_step(self, step: int) -> SavedStep:
        """The configs and array shapes of `step`, without reading the arrays. CheckpointCorrupt when its files
        are unreadable; other errors propagate."""

        step_dir = self.directory / str(step)
        missing = [item for item in ITEMS if not (step_dir / item).is_dir()]
        if missing:
            raise CheckpointCorrupt(step, step_dir, f"the item(s) {missing} are missing")
        try:
            # Handlers, not the manager: these reads involve no other process (the manager's restore would
            # wait for every process at a barrier).
            config, meta = (dict(ocp.JsonCheckpointHandler().restore(step_dir / item)) for item in ("config", "train"))
            arrays = {item: flat_arrays(ocp.StandardCheckpointHandler().metadata(step_dir / item).tree)
                      for item in ("params", "opt")}
        except Exception as e:
            cause = corruption_cause(e, step_dir)
            if cause is not None:
                raise CheckpointCorrupt(step, step_dir, f"{type(cause).__name__}: {str(cause)[:500]}") from e
            e.add_note(f"(while reading checkpoint {step_dir}; it was left as it is)")
            raise
        return SavedStep(step, step_dir, config, meta, arrays)

    def restore(self, step: int, *, variables, opt_state):
        """Restore `step` onto the abstract targets (ShapeDtypeStruct trees carrying the wanted shardings, which
        may differ from the saved ones) -> (variables, opt_state, meta). CheckpointCorrupt when the step's files
        are unreadable; other errors propagate."""

        args = ocp.args.Composite(params=ocp.args.StandardRestore(variables), opt=ocp.args.StandardRestore(opt_state),
                                  train=ocp.args.JsonRestore())
        step_dir = self.directory / str(step)
        try:
            out = self._mngr.restore(step, args=args)
        except Exception as e:
            cause = corruption_cause(e, step_dir)
            if cause is not None:
                raise CheckpointCorrupt(step, step_dir, f"{type(cause).__name__}: {str(cause)[:500]}") from e
            e.add_note(f"(while restoring checkpoint {step_dir}; it was left as it is)")
            raise
        return out["params"], out["opt"], dict(out["train"])

    def set_aside(self, step: int, reason: str) -> None:
        """Rename the unreadable `step` to `corrupt-<step>-<unix time>/` (process 0; every process must call this,
        it synchronises them) and write `reason` beside its files. The bytes are kept for inspection."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"{SET_ASIDE_PREFIX}{step}-{int(time.time())}"
            warnings.warn(f"checkpoint {src} is unreadable ({reason[:300]}); it is moved to {dst.name}/ and the "
                          f"previous checkpoint is tried")
            src.rename(dst)
            (dst / "reason.txt").write_text(reason + "\n")
        self._sync_and_reopen(f"k2jax_set_aside_{step}")

    def move_all(self, destination: Path) -> None:
        """Move the whole directory (every step and set-aside step) to `destination` (process 0; every process
        must call this) and continue with an empty directory."""
        if jax.process_index() == 0:
            destination.parent.mkdir(parents=True, exist_ok=True)
            self._mngr.wait_until_finished()
            self.directory.rename(destination)
        self._sync_and_reopen("k2jax_move_checkpoints")

    def _sync_and_reopen(self, name: str) -> None:
        if jax.process_count() > 1:

            multihost_utils.sync_global_devices(name)
        self._mngr.close()
        self._mngr = self._open()

    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def jsonable(obj):
    """`obj` with tuples as lists and numpy scalars as Python numbers (what orbax's JsonSave accepts)."""
    def default(x):
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
        raise TypeError(f"not JSON serialisable: {type(x).__name__}")

    return json.loads(json.dumps(obj, default=default))

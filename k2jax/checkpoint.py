"""Minimal orbax checkpoints of a KimiLinear's variables (parameters and router biases) plus its config.

Layout of a checkpoint directory (written atomically by orbax: a temporary directory renamed on success):
    params/   orbax StandardSave of the model's variables as a nested dict (nnx.to_pure_dict)
    config/   the ModelConfig as JSON (ModelConfig.to_dict)
`TrainCheckpointer` (below) writes the same two items plus the optimizer state and the run state, per step, for
training runs.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import jax
from flax import nnx

from k2jax.config import ModelConfig, from_dict, load_config
from k2jax.sharding import logical_names, logical_to_mesh_spec


def _checkpointer():
    import orbax.checkpoint as ocp

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
    return from_dict(dict(d), source=str(path / "config"))


def restore_params(config: ModelConfig | str | os.PathLike | None, directory: str | os.PathLike, mesh=None):
    """Restore a KimiLinear saved by `save_params`.

    config: the ModelConfig (or a load_config name/path) to build; None uses the saved one. Its param_dtype may
        differ from the saved dtype (values are cast); shapes must match, else ValueError.
    mesh: place each variable on the NamedSharding given by its logical axis names; None: the default device.
    """
    from k2jax.model import KimiLinear

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
class TrainCheckpointer:
    """Training checkpoints through orbax's CheckpointManager. `directory/<step>/` holds the items
        params/  every model variable, as in `save_params` (so `restore_params(None, directory/<step>)` loads the
                 trained model)
        config/  the ModelConfig as JSON
        opt/     the optimizer state
        train/   JSON: the step, the seed, the TrainConfig and every process's data-iterator position
    Each item is written by orbax to a temporary directory and renamed on success, so a run killed mid-save
    leaves the previous checkpoints intact. Saves may be asynchronous; the newest `keep` are kept.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._keep, self._async = keep, async_save
        self._mngr = self._open()

    def _open(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, enable_async_checkpointing=self._async,
                                               create=True)
        return ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints in the directory, oldest first."""
        return sorted(self._mngr.all_steps())

    def save(self, step: int, *, variables, config: dict, opt_state, meta: dict, wait: bool = False) -> None:
        """Save a checkpoint for `step` (asynchronously unless `wait` or async_save=False). `variables`: pure dict of
        every model variable; `opt_state`: the optimizer state pytree; `meta`: JSON-serialisable run state."""
        import orbax.checkpoint as ocp

        args = ocp.args.Composite(params=ocp.args.StandardSave(variables), config=ocp.args.JsonSave(config),
                                  opt=ocp.args.StandardSave(opt_state), train=ocp.args.JsonSave(_jsonable(meta)))
        self._mngr.save(step, args=args, force=True)
        if wait or not self._async:
            self._mngr.wait_until_finished()

    def restore(self, step: int, *, variables, opt_state):
        """Restore `step` onto the abstract targets (ShapeDtypeStruct trees carrying the wanted shardings, which
        may differ from the saved ones) -> (variables, opt_state, meta)."""
        import orbax.checkpoint as ocp

        args = ocp.args.Composite(params=ocp.args.StandardRestore(variables), opt=ocp.args.StandardRestore(opt_state),
                                  train=ocp.args.JsonRestore())
        out = self._mngr.restore(step, args=args)
        return out["params"], out["opt"], dict(out["train"])

    def restore_latest(self, *, variables, opt_state):
        """The newest readable checkpoint as (step, variables, opt_state, meta), or None when there is none.

        A checkpoint that fails to restore (corrupt or partial files) is moved aside to `corrupt-<step>-<time>`
        with a warning, and the previous one is tried. Raises ValueError when checkpoints exist but none is
        readable.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                return (step, *self.restore(step, variables=variables, opt_state=opt_state))
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint cannot be used
                warnings.warn(f"checkpoint {self.directory / str(step)} is unreadable ({type(e).__name__}: "
                              f"{str(e)[:300]}); moving it aside and trying the previous one")
                self._set_aside(step)
        if steps:
            raise ValueError(f"no readable checkpoint in {self.directory} (tried steps {steps}); remove the "
                             f"directory or set train.resume=false to start afresh")
        return None

    def _set_aside(self, step: int) -> None:
        import jax

        if jax.process_index() == 0:
            src = self.directory / str(step)
            try:
                src.rename(self.directory / f"corrupt-{step}-{int(time.time())}")
            except OSError as e:
                warnings.warn(f"could not move {src} aside: {e}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"k2jax_set_aside_{step}")
        self._mngr.close()
        self._mngr = self._open()

    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def _jsonable(obj):
    """`obj` with tuples as lists and numpy scalars as Python numbers (what orbax's JsonSave accepts)."""
    import numpy as np

    def default(x):
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
        raise TypeError(f"not JSON serialisable: {type(x).__name__}")

    return json.loads(json.dumps(obj, default=default))

"""Training configuration: a frozen TrainConfig validated field by field, and the run-config loader.

A run config is one YAML file holding the model and the training settings:

    # model fields at the top level (as in configs/*.yaml) ...
    hidden_size: 128
    ...
    train:               # ... and TrainConfig fields under `train:`
      steps: 600
      learning_rate: 3.0e-3

or, equivalently, `model:` (a configs/ name, a YAML path, or a mapping of model fields) beside `train:`.
A file without `train:` is a plain model config trained with the TrainConfig defaults.

Overrides are `key=value` strings applied after the file: `model.hidden_size=256`, `train.steps=100`, or a bare
`steps=100` when the name belongs to only one of the two. Values are parsed as YAML (`null`, `true`, `[1, 2]`,
`{data: 2}`); `train.mesh.data=2` sets one mesh axis. Unknown keys and bad values raise ConfigError before
anything is compiled.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from k2jax.config import CONFIG_DIR, ConfigError, ModelConfig, available_configs, from_dict, load_config
from k2jax.sharding import MESH_AXES

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run that is not the model. Defaults: the MQAR demo of `python train.py`."""

    # Run length and batch.
    steps: int = 600
    batch_size: int = 32  # global: sequences per optimizer step, over all hosts and micro-batches
    seq_len: int = 256
    grad_accum_steps: int = 1  # micro-batches per step (batch_size must divide evenly)
    seed: int = 0
    run_dir: str | None = None  # metrics.jsonl, tensorboard/, checkpoints/; None: runs/<config file stem>
    # Optimizer.
    optimizer: str = "adamw"  # "adamw" | "muon" (optax.contrib.muon on matrices, AdamW on the rest)
    learning_rate: float = 3e-3
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay) | "constant" (after warmup)
    warmup_steps: int = 30
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr_ratio
    min_lr_ratio: float = 0.1  # final learning rate / peak
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    # Model-side training options.
    aux_loss_weight: float = 0.0  # MoE load-balance loss weight (0: aux-loss-free bias balancing only)
    moe_bias_update: bool = True  # move the router biases by model.moe_bias_update_rate each step
    # Data.
    data: str = "mqar"  # "mqar", or text files: paths, globs or folders, comma-separated (.txt .jsonl .parquet)
    text_field: str = "text"  # jsonl / parquet field holding the document text
    tokenizer: str = "byte"  # k2jax.tokenizer.load_tokenizer argument
    mqar_num_kv_pairs: int = 32  # key-value pairs per MQAR row (evaluation always uses this many)
    mqar_min_kv_pairs: int | None = None  # training rows draw n from [min, num] (None: always num)
    mqar_random_fill: bool = False  # fill the non-query slots with random values instead of a filler token
    # Evaluation.
    eval_every: int = 50  # steps; 0 = only at the end
    eval_batches: int = 4
    stop_at_accuracy: float | None = None  # stop once the eval accuracy reaches this (MQAR)
    # Checkpoints.
    checkpoint_every: int = 200  # steps; 0 = only at the end and on SIGTERM / SIGINT
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    fresh: bool = False  # start from step 0 although run_dir holds checkpoints: they, metrics.jsonl and
    #                      tensorboard/ are moved to run_dir/replaced-<time>/ (never deleted). Without it a run
    #                      resumes from the newest readable checkpoint of run_dir, and refuses to start when that
    #                      checkpoint belongs to another model or optimizer, or when run_dir holds only set-aside ones
    stop_at_step: int | None = None  # end this invocation after this step (checkpointed); the schedule still
    #                                  runs to `steps`, so a later invocation continues the same run
    # Metrics.
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: measured matmul rate on CPU
    # Parallelism.
    mesh: dict | None = dataclasses.field(default=None, hash=False)  # {data: 2, fsdp: 1, expert: 1, tensor: 1};
    #                                  None = every device on `data`
    coordinator_address: str | None = None  # multi-host: "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        _validate(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        unknown = sorted(set(changes) - train_field_names())
        if unknown:
            raise ConfigError(f"unknown train field(s) {unknown}; known: {sorted(train_field_names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def is_mqar(self) -> bool:
        return self.data == "mqar"


def train_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"train field `{field}` = {value!r} is invalid: {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate(c: TrainConfig) -> None:
    for f in ("steps", "batch_size", "seq_len", "grad_accum_steps", "keep_checkpoints", "log_every",
              "eval_batches", "mqar_num_kv_pairs"):
        if not _is_int(getattr(c, f)) or getattr(c, f) <= 0:
            _fail(f, getattr(c, f), "must be a positive integer")
    for f in ("warmup_steps", "checkpoint_every", "eval_every", "seed"):
        if not _is_int(getattr(c, f)) or getattr(c, f) < 0:
            _fail(f, getattr(c, f), "must be a non-negative integer")
    if not _is_num(c.learning_rate) or not c.learning_rate > 0:
        _fail("learning_rate", c.learning_rate, "must be a positive number")
    for f in ("weight_decay", "grad_clip", "aux_loss_weight", "adam_eps"):
        if not _is_num(getattr(c, f)) or getattr(c, f) < 0:
            _fail(f, getattr(c, f), "must be a non-negative number")
    for f in ("adam_b1", "adam_b2", "min_lr_ratio", "decay_fraction"):
        if not _is_num(getattr(c, f)) or not 0 <= getattr(c, f) <= 1:
            _fail(f, getattr(c, f), "must be a number in [0, 1]")
    for f, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if getattr(c, f) not in allowed:
            _fail(f, getattr(c, f), f"must be one of {allowed}")
    for f in ("moe_bias_update", "async_checkpoints", "fresh", "tensorboard", "progress", "mqar_random_fill"):
        if not isinstance(getattr(c, f), bool):
            _fail(f, getattr(c, f), "must be true or false")
    for f in ("data", "text_field", "tokenizer", "run_dir"):
        if not isinstance(getattr(c, f), str) or not getattr(c, f):
            if f == "run_dir" and c.run_dir is None:
                continue
            _fail(f, getattr(c, f), "must be a non-empty string" + (" or null" if f == "run_dir" else ""))
    if c.batch_size % c.grad_accum_steps:
        _fail("grad_accum_steps", c.grad_accum_steps, f"must divide batch_size={c.batch_size}")
    if c.stop_at_accuracy is not None and (not _is_num(c.stop_at_accuracy) or not 0 < c.stop_at_accuracy <= 1):
        _fail("stop_at_accuracy", c.stop_at_accuracy, "must be null or a number in (0, 1]")
    if c.mqar_min_kv_pairs is not None and (not _is_int(c.mqar_min_kv_pairs)
                                            or not 1 <= c.mqar_min_kv_pairs <= c.mqar_num_kv_pairs):
        _fail("mqar_min_kv_pairs", c.mqar_min_kv_pairs, f"must be null or in [1, mqar_num_kv_pairs="
                                                         f"{c.mqar_num_kv_pairs}]")
    if c.stop_at_step is not None and (not _is_int(c.stop_at_step) or c.stop_at_step <= 0):
        _fail("stop_at_step", c.stop_at_step, "must be null or a positive integer")
    if c.peak_flops is not None and (not _is_num(c.peak_flops) or c.peak_flops <= 0):
        _fail("peak_flops", c.peak_flops, "must be null or a positive number (FLOP/s per device)")
    _validate_mesh(c.mesh)
    _validate_distributed(c)


def _validate_mesh(mesh) -> None:
    if mesh is None:
        return
    if not isinstance(mesh, dict):
        _fail("mesh", mesh, f"must be null or a mapping of mesh axes {MESH_AXES} to sizes")
    unknown = sorted(set(mesh) - set(MESH_AXES))
    if unknown:
        _fail("mesh", mesh, f"unknown mesh axes {unknown}; allowed {MESH_AXES}")
    bad = {k: v for k, v in mesh.items() if not _is_int(v) or v <= 0}
    if bad:
        _fail("mesh", mesh, f"axis sizes must be positive integers; bad: {bad}")


def _validate_distributed(c: TrainConfig) -> None:
    given = [c.coordinator_address is not None, c.num_processes is not None, c.process_id is not None]
    if any(given) and not all(given):
        _fail("coordinator_address", c.coordinator_address,
              "multi-host needs all of coordinator_address, num_processes and process_id (or none of them)")
    if c.num_processes is not None:
        if not _is_int(c.num_processes) or c.num_processes < 1:
            _fail("num_processes", c.num_processes, "must be a positive integer")
        if not _is_int(c.process_id) or not 0 <= c.process_id < c.num_processes:
            _fail("process_id", c.process_id, f"must lie in [0, num_processes={c.num_processes})")
        if not isinstance(c.coordinator_address, str) or ":" not in c.coordinator_address:
            _fail("coordinator_address", c.coordinator_address, "must be 'host:port'")


# ---- loading ---------------------------------------------------------------------------------------------------------
def _coerce(value: Any, default: Any, key: str) -> Any:
    """YAML reads `1e-3` as a string: turn numeric strings into numbers where the field is numeric."""
    if isinstance(value, str) and (isinstance(default, float) or key in _FLOAT_FIELDS):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_FLOAT_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)} | {
    f.name for f in dataclasses.fields(ModelConfig) if "float" in str(f.type)}


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(d).__name__}")
    return d


def _resolve_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(f"no config named {str(name_or_path)!r}: not a file, and not one of {available_configs()}")


def _split_sections(d: dict, path: Path) -> tuple[dict | str, dict]:
    """(model fields or a model config reference, train fields) of a run-config mapping."""
    train = d.get("train") or {}
    if not isinstance(train, dict):
        raise ConfigError(f"{path}: `train:` must be a mapping of TrainConfig fields, got {type(train).__name__}")
    if "model" in d:
        extra = sorted(set(d) - {"model", "train"})
        if extra:
            raise ConfigError(f"{path}: with a `model:` section, only `model:` and `train:` are allowed at the top "
                              f"level; found {extra}")
        model = d["model"]
        if not isinstance(model, (dict, str)):
            raise ConfigError(f"{path}: `model:` must be a config name, a path, or a mapping of model fields")
        return model, dict(train)
    model = {k: v for k, v in d.items() if k != "train"}
    model.setdefault("name", path.stem)
    return model, dict(train)


def parse_overrides(overrides: Sequence[str]) -> tuple[dict, dict]:
    """`key=value` strings -> (model field changes, train field changes). Raises ConfigError on unknown keys."""
    model_fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    model_changes: dict = {}
    train_changes: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from None
        section, _, name = key.partition(".") if key.startswith(("model.", "train.")) else ("", "", key)
        if not section:
            in_model, in_train = name in model_fields, name.split(".")[0] in train_fields
            if in_model and in_train:
                raise ConfigError(f"override {key!r} names both a model and a train field: write model.{name} or "
                                  f"train.{name}")
            section = "model" if in_model else "train" if in_train else ""
        if section == "model":
            if name not in model_fields:
                raise ConfigError(f"unknown override key {key!r}: no model field {name!r}; known model fields: "
                                  f"{sorted(model_fields)}")
            model_changes[name] = _coerce(value, model_fields[name], name)
        elif section == "train" and name.startswith("mesh."):
            axis = name.split(".", 1)[1]
            mesh = dict(train_changes.get("mesh") or {})
            mesh[axis] = value
            train_changes["mesh"] = mesh
        elif section == "train" and name in train_fields:
            train_changes[name] = _coerce(value, train_fields[name], name)
        else:
            raise ConfigError(f"unknown override key {key!r}; use model.<field> or train.<field>; known train "
                              f"fields: {sorted(train_fields)}")
    return model_changes, train_changes


def load_run_config(config: str | os.PathLike = "default", overrides: Sequence[str] = ()
                    ) -> tuple[ModelConfig, TrainConfig]:
    """Load a run config (a configs/ name or a YAML path) and apply `key=value` overrides.

    Returns (ModelConfig, TrainConfig), both validated; raises ConfigError naming the file, field and value.
    Unless the file or an override sets train.run_dir, it is `runs/<file stem>` (configs/tiny.yaml -> runs/tiny),
    so that two config files never share a run directory by default.
    """
    path = _resolve_path(config)
    if path.suffix == ".json" or path.is_dir():
        model_part, train_part = str(path), {}
    else:
        model_part, train_part = _split_sections(_read_yaml(path), path)
    model_changes, train_changes = parse_overrides(overrides)
    if isinstance(model_part, str):
        model_cfg = load_config(model_part, **model_changes)
    else:
        try:
            model_cfg = from_dict({**model_part, **model_changes}, source=str(path))
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None
    unknown = sorted(set(train_part) - train_field_names())
    if unknown:
        raise ConfigError(f"{path}: unknown train field(s) {unknown}; known: {sorted(train_field_names())}")
    train_part = {k: _coerce(v, None, k) for k, v in train_part.items()}
    train_part.setdefault("run_dir", str(Path("runs") / (path.stem if path.is_file() else path.name)))
    try:
        train_cfg = TrainConfig(**{**train_part, **train_changes})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return model_cfg, train_cfg

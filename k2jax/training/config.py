"""Training configuration: TrainConfig (declared with k2jax.config's constraint types) and the run-config loader.

A run config is one YAML file holding the model and the training settings:

    # model fields at the top level (as in configs/*.yaml) ...
    hidden_size: 128
    ...
    train:               # ... and TrainConfig fields under `train:`
      steps: 600
      learning_rate: 3.0e-3

or, equivalently, `model:` (a configs/ name, a YAML path, or a mapping of model fields) beside `train:`.
A file without `train:` is a plain model config trained with the TrainConfig defaults.

Overrides are `key=value` strings applied after the file (k2jax.config.parse_overrides): `model.hidden_size=256`,
`train.steps=100`, or a bare `steps=100` when the name belongs to only one of the two. Values are parsed as YAML
(`null`, `true`, `[1, 2]`, `{data: 2}`); `train.mesh.data=2` sets one mesh axis. Unknown keys and bad values raise
ConfigError before anything is compiled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Sequence

from pydantic import Field, model_validator

from k2jax.config import (
    Allowed,
    Config,
    ConfigError,
    ModelConfig,
    NonEmptyStr,
    NonNegativeInt,
    NonNegativeNumber,
    Number,
    PositiveInt,
    PositiveNumber,
    UnitInterval,
    apply_overrides,
    parse_overrides,
    read_yaml,
)
from k2jax.config_files import load_config, resolve_config_path
from k2jax.sharding import MESH_AXES

MeshAxis = Literal["data", "fsdp", "expert", "context", "tensor"]  # k2jax.sharding.MESH_AXES


class TrainConfig(Config):
    """Everything about a training run that is not the model. Defaults: the MQAR demo of `python train.py`."""

    section = "train"

    # Run length and batch.
    steps: PositiveInt = 600
    batch_size: PositiveInt = 32  # global: sequences per optimizer step, over all hosts and micro-batches
    seq_len: PositiveInt = 256
    grad_accum_steps: PositiveInt = 1  # micro-batches per step (must divide batch_size)
    seed: NonNegativeInt = 0
    run_dir: NonEmptyStr | None = None  # metrics.jsonl, tensorboard/, checkpoints/; None: runs/<config file stem>
    # Optimizer.
    optimizer: Literal["adamw", "muon", "muonclip"] = "adamw"  # muon: optax.contrib.muon on matrices, AdamW on the
    #                                 rest; muonclip: muon + QK-clip of the MLA heads whose max logit exceeds qk_clip_tau
    qk_clip_tau: PositiveNumber = 100.0  # muonclip: the largest attention logit an MLA head may keep (Kimi K2: 100)
    learning_rate: PositiveNumber = 3e-3
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # wsd: warmup-stable-decay; constant after warmup
    warmup_steps: NonNegativeInt = 30
    decay_fraction: UnitInterval = 0.2  # wsd: the last fraction of steps decays linearly to min_lr_ratio
    min_lr_ratio: UnitInterval = 0.1  # final learning rate / peak
    weight_decay: NonNegativeNumber = 0.1
    adam_b1: UnitInterval = 0.9
    adam_b2: UnitInterval = 0.98
    adam_eps: NonNegativeNumber = 1e-8
    grad_clip: NonNegativeNumber = 1.0  # global-norm clipping; 0 disables
    # Model-side training options.
    aux_loss_weight: NonNegativeNumber = 0.0  # MoE load-balance loss weight (0: aux-loss-free bias balancing only)
    moe_bias_update: bool = True  # move the router biases by model.moe_bias_update_rate each step
    # Data.
    data: NonEmptyStr = "mqar"  # "mqar", or text files: paths, globs or folders, comma-separated (.txt .jsonl .parquet)
    text_field: NonEmptyStr = "text"  # jsonl / parquet field holding the document text
    tokenizer: NonEmptyStr = "byte"  # k2jax.tokenizer.load_tokenizer argument
    mqar_num_kv_pairs: PositiveInt = 32  # key-value pairs per MQAR row (evaluation always uses this many)
    # training rows draw n from [min, num] (None: always num)
    mqar_min_kv_pairs: Annotated[PositiveInt | None, Allowed("null or in [1, mqar_num_kv_pairs]")] = None
    mqar_random_fill: bool = False  # fill the non-query slots with random values instead of a filler token
    # Evaluation.
    eval_every: NonNegativeInt = 50  # steps; 0 = only at the end
    eval_batches: PositiveInt = 4
    # stop once the eval accuracy reaches this (MQAR)
    stop_at_accuracy: Annotated[Annotated[Number, Field(gt=0, le=1)] | None,
                                Allowed("null or a number in (0, 1]")] = None
    # Checkpoints.
    checkpoint_every: NonNegativeInt = 200  # steps; 0 = only at the end and on SIGTERM / SIGINT
    keep_checkpoints: PositiveInt = 3
    async_checkpoints: bool = True
    fresh: bool = False  # start from step 0 although run_dir holds checkpoints: they, metrics.jsonl and
    #                      tensorboard/ are moved to run_dir/replaced-<time>/ (never deleted). Without it a run
    #                      resumes from the newest readable checkpoint of run_dir, and refuses to start when that
    #                      checkpoint belongs to another model or optimizer, or when run_dir holds only set-aside ones
    stop_at_step: PositiveInt | None = None  # end this invocation after this step (checkpointed); the schedule still
    #                                          runs to `steps`, so a later invocation continues the same run
    # Metrics.
    log_every: PositiveInt = 1
    tensorboard: bool = True
    progress: bool = True
    # per-device peak FLOP/s for MFU; None: measured matmul rate on CPU
    peak_flops: Annotated[PositiveNumber | None, Allowed("null or a positive number (FLOP/s per device)")] = None
    # Parallelism: {data: 2, fsdp: 1, expert: 1, context: 1, tensor: 1}; None = every device on `data`. context > 1
    # splits each sequence over that many devices (context parallelism; seq_len must divide into 2 x context
    # pieces for the default zigzag layout, model.context_layout).
    mesh: Annotated[dict[MeshAxis, PositiveInt] | None,
                    Allowed(f"null or a mapping of mesh axes {MESH_AXES} to positive integer sizes")] = None
    coordinator_address: str | None = None  # multi-host: "host:port" of process 0
    num_processes: PositiveInt | None = None
    process_id: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum_steps:
            self.fail("grad_accum_steps", self.grad_accum_steps, f"must divide batch_size={self.batch_size}")
        if self.mqar_min_kv_pairs is not None and self.mqar_min_kv_pairs > self.mqar_num_kv_pairs:
            self.fail("mqar_min_kv_pairs", self.mqar_min_kv_pairs,
                      f"must be null or in [1, mqar_num_kv_pairs={self.mqar_num_kv_pairs}]")
        multi_host = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is not None for v in multi_host) and not all(v is not None for v in multi_host):
            self.fail("coordinator_address", self.coordinator_address, "multi-host needs all of "
                      "coordinator_address, num_processes and process_id (or none of them)")
        if self.num_processes is not None:
            if self.process_id >= self.num_processes:
                self.fail("process_id", self.process_id, f"must lie in [0, num_processes={self.num_processes})")
            if ":" not in self.coordinator_address:
                self.fail("coordinator_address", self.coordinator_address, "must be 'host:port'")
        return self

    @property
    def is_mqar(self) -> bool:
        return self.data == "mqar"


# ---- loading ---------------------------------------------------------------------------------------------------------
RUN_SECTIONS = {"model": ModelConfig, "train": TrainConfig}  # the override sections of train.py and the dry run


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


def load_run_config(config: str | os.PathLike = "default", overrides: Sequence[str] = ()
                    ) -> tuple[ModelConfig, TrainConfig]:
    """Load a run config (a configs/ name, a YAML path, or an HF config.json / folder) and apply `key=value`
    overrides (sections `model` and `train`, see the module docstring).

    Returns (ModelConfig, TrainConfig), both validated; raises ConfigError naming the file, field and value.
    Unless the file or an override sets train.run_dir, it is `runs/<file stem>` (configs/tiny.yaml -> runs/tiny),
    so that two config files never share a run directory by default.
    """
    path = resolve_config_path(config)
    if path.suffix == ".json" or path.is_dir():
        model_part, train_part = str(path), {}
    else:
        model_part, train_part = _split_sections(read_yaml(path), path)
    changes = parse_overrides(overrides, RUN_SECTIONS)
    if isinstance(model_part, str):
        model_cfg = load_config(model_part).with_overrides(changes["model"])
    else:
        model_cfg = ModelConfig.from_dict(apply_overrides(model_part, changes["model"]), source=str(path))
    train_part.setdefault("run_dir", str(Path("runs") / (path.stem if path.is_file() else path.name)))
    train_cfg = TrainConfig.from_dict(apply_overrides(train_part, changes["train"]), source=str(path))
    return model_cfg, train_cfg

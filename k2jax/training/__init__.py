"""Training: `loop.train(model_config, train_config)` and what it is made of.

- `config`: TrainConfig and run configs (a model section + a `train:` section, YAML plus key=value overrides).
- `step`: the jitted train and eval steps; `state`: the training state on a mesh and resuming from checkpoints.
- `loop`: `train()`; `distributed`: multi-host start-up and collectives; `cli`: the `train.py` command line.
- `optim`, `data`, `metrics`: optimizers and schedules, data sources (MQAR, text), metrics and FLOP counts.
- `dry_run`: lower the training step on simulated devices and report per-device memory (its command line is
  `cli`'s, behind `train.py --dry-run` and `python -m k2jax.dry_run`).
- `hostmem`: the one-time restart of `train.py` (and the training benches) with huge pages for malloc, so that
  XLA:CPU's per-step buffers are not faulted in 4 KiB at a time every step.
"""

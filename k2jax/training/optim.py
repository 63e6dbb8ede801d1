"""Optimizers and learning-rate schedules for training (optax).

- Schedules (`make_schedule`): linear warmup from 0 to the peak over `warmup_steps`, then
  'cosine': cosine decay to `min_lr_ratio * peak` at the last step;
  'wsd': warmup-stable-decay: constant peak, then a linear decay to `min_lr_ratio * peak` over the last
         `decay_fraction` of the steps;
  'constant': the peak until the end.
- 'adamw': decoupled weight decay on matrices only (ndim >= 2); norms, biases and gate vectors are not decayed.
- 'muon': optax.contrib.muon (Newton-Schulz orthogonalised momentum) on the projection matrices, including each
  expert's matrix of the stacked [E, in, out] expert weights, with updates scaled to AdamW's RMS
  (`consistent_rms=0.2`, as in Moonlight) so that one learning rate serves both; AdamW (same schedule, no weight
  decay) on the embedding, the lm_head, the short-conv filters and every vector.
Both are preceded by global-norm gradient clipping when `grad_clip > 0`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from k2jax.training.config import TrainConfig

# Parameters that Muon leaves to AdamW although they are matrices: lookups and conv filters are not x @ W maps
# with a meaningful spectral norm, and the lm_head is conventionally kept on Adam.
_MUON_EXCLUDED = ("embed_tokens", "lm_head", "conv1d")


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based)."""
    peak, steps, warm = cfg.learning_rate, cfg.steps, min(cfg.warmup_steps, cfg.steps)
    floor = peak * cfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1)) if warm else optax.constant_schedule(peak)
    rest = max(steps - warm, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "wsd":
        decay = max(int(round(cfg.decay_fraction * steps)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
                                     [stable])
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, after], [warm])


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decay_mask(params):
    """True for the leaves that get weight decay: matrices (ndim >= 2)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def muon_dimension_numbers(params):
    """MuonDimensionNumbers for each matrix Muon updates (experts: per expert over [in, out]), None for AdamW."""
    from optax.contrib import MuonDimensionNumbers

    def spec(path, p):
        name = _path_str(path)
        if jnp.ndim(p) < 2 or any(x in name for x in _MUON_EXCLUDED):
            return None
        if jnp.ndim(p) == 2:
            return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
        return MuonDimensionNumbers(reduction_axis=jnp.ndim(p) - 2, output_axis=jnp.ndim(p) - 1)

    return jax.tree_util.tree_map_with_path(spec, params)


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(gradient transformation, learning-rate schedule) for `cfg.optimizer`."""
    schedule = make_schedule(cfg)
    if cfg.optimizer == "adamw":
        tx = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                         weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.optimizer == "muon":
        from optax import contrib

        tx = contrib.muon(schedule, weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask,
                          adam_b1=cfg.adam_b1, adam_b2=cfg.adam_b2, adam_weight_decay=0.0,
                          muon_weight_dimension_numbers=muon_dimension_numbers, consistent_rms=0.2)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, schedule

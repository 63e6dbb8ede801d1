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
- 'muonclip': 'muon', then QK-clip (Kimi K2 report, section 2.1) after every update: each MLA head h whose largest
  attention logit S_h over the step's batch exceeded tau (`qk_clip_tau`) has gamma_h = tau / S_h applied to its own
  query/key weights, split so that its logits scale by gamma_h: the per-head no-RoPE query and key columns
  (q_proj / q_b_proj's q_nope, kv_b_proj's k_nope) by sqrt(gamma_h), the per-head RoPE query columns by gamma_h, and
  the RoPE key, shared by all heads (kv_a_proj_with_mqa's k_pe columns), left untouched (`qk_clip`).
  Muon sees the stacked expert weights of scanned layers, [layers, experts, in, out], as [experts, layers, in, out]
  (`experts_axis_first`), the experts split over every data-parallel device with whole matrices on each: optax
  flattens the leading axes into one batch of matrices, and only with the sharded expert axis major does that batch
  stay sharded (else GSPMD gathered every expert of the stack on every device: 6 GiB Newton-Schulz products per
  device at 48B), and with whole matrices no device of a context / fsdp group repeats its neighbours' products
  (1.5 GiB each, a dozen alive, at 48B with context 16).
Both are preceded by global-norm gradient clipping when `grad_clip > 0`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optax import contrib
from optax.contrib import MuonDimensionNumbers

from k2jax.model import block_layout
from k2jax.sharding import constrain
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

    def spec(path, p):
        name = _path_str(path)
        if jnp.ndim(p) < 2 or any(x in name for x in _MUON_EXCLUDED):
            return None
        if jnp.ndim(p) == 2:
            return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
        return MuonDimensionNumbers(reduction_axis=jnp.ndim(p) - 2, output_axis=jnp.ndim(p) - 1)

    return jax.tree_util.tree_map_with_path(spec, params)


def _stack_axis_last_batch_first(x):
    """[..., L, E, in, out] -> [E, ..., L, in, out] for arrays of rank >= 4 (others unchanged), the experts split
    over the data-parallel devices with whole matrices on each (logical axis 'optimizer_experts')."""
    if getattr(x, "ndim", 0) < 4:
        return x
    return constrain(jnp.moveaxis(x, x.ndim - 3, 0), ("optimizer_experts",) + (None,) * (x.ndim - 1))


def _stack_axis_back(x):
    """The inverse of `_stack_axis_last_batch_first`."""
    return jnp.moveaxis(x, 0, x.ndim - 3) if getattr(x, "ndim", 0) >= 4 else x


def experts_axis_first(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` applied to parameters, updates and its parameter-shaped state with every rank >= 4 array's last batch
    axis moved first ([layers, experts, in, out] -> [experts, layers, in, out]) and moved back after. The state is
    stored in the parameters' own layout (its shardings are theirs); the math of a per-matrix optimizer (Muon) is
    unchanged, only the order in which its batch of matrices is flattened."""

    def to_inner(state):
        return optax.tree_map_params(tx, lambda x: jax.tree.map(_stack_axis_last_batch_first, x), state)

    def to_outer(state):
        return optax.tree_map_params(tx, lambda x: jax.tree.map(_stack_axis_back, x), state)

    def update(updates, state, params=None):
        inner = lambda tree: None if tree is None else jax.tree.map(_stack_axis_last_batch_first, tree)
        new_updates, new_state = tx.update(inner(updates), to_inner(state), inner(params))
        return jax.tree.map(_stack_axis_back, new_updates), to_outer(new_state)

    return optax.GradientTransformation(tx.init, update)


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(gradient transformation, learning-rate schedule) for `cfg.optimizer`."""
    schedule = make_schedule(cfg)
    if cfg.optimizer == "adamw":
        tx = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                         weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.optimizer in ("muon", "muonclip"):  # muonclip's QK-clip follows the update (train step, `qk_clip`)

        tx = contrib.muon(schedule, weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask,
                          adam_b1=cfg.adam_b1, adam_b2=cfg.adam_b2, adam_weight_decay=0.0,
                          muon_weight_dimension_numbers=muon_dimension_numbers, consistent_rms=0.2)
        tx = experts_axis_first(tx)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, schedule


# ---- QK-clip (MuonClip) ----------------------------------------------------------------------------------------------
def mla_attention_rows(config, params) -> dict[tuple, tuple[int, ...]]:
    """For each MLA self_attn module of `params` (an nnx State of the model's parameters, either layout), by path
    prefix: the rows of the model's max logits [num_mla_layers, H] (layer order) it owns: one for a per-layer
    module, `repeats` (in order) for a scanned LayerStack's stacked module."""


    mla_layers = [i for i, kind in enumerate(config.layer_types) if kind != "kda"]
    row_of = {layer: r for r, layer in enumerate(mla_layers)}
    layout = block_layout(config) if config.scan_layers else None
    rows = {}
    for path, _ in nnx.to_flat_state(params):
        path = tuple(str(p) if not isinstance(p, int) else p for p in path)
        if "self_attn" not in path or "kv_b_proj" not in path:
            continue
        prefix = path[:path.index("self_attn") + 1]
        if prefix[0] == "layers":
            layers = [int(prefix[1])]
        else:
            entry = layout[int(prefix[1])]
            layers = ([entry[1]] if entry[0] == "layer"
                      else [entry[1] + j * entry[2] + int(prefix[3]) for j in range(entry[3])])
        rows[prefix] = tuple(row_of[i] for i in layers)
    return rows


def qk_clip(config, params, max_logits, tau: float):
    """QK-clip of every MLA head (see the module docstring): params (nnx State of the model's parameters, either
    layout) -> the clipped State. max_logits float32 [num_mla_layers, H]: each head's largest scaled attention logit
    over the step (KimiLinear.hidden_states(return_max_logit=True), maxed over the batch); heads at or below tau
    (and -inf: no visible key) are unchanged. Jittable."""

    n, P, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    gamma = jnp.where(max_logits > tau, tau / jnp.maximum(max_logits, tau), 1.0).astype(jnp.float32)  # [L, H]
    q_name = "q_proj" if config.q_lora_rank is None else "q_b_proj"
    rows = mla_attention_rows(config, params)

    def scale_columns(kernel, g, parts):
        """kernel [in, H * sum(widths)] (or [repeats, in, ...] with g [repeats, H]); parts: (width, power) per
        head part, each scaled by g ** power."""
        head = jnp.concatenate([jnp.broadcast_to(g[..., None] ** p, g.shape + (w,)) for w, p in parts], axis=-1)
        factor = head.reshape(g.shape[:-1] + (1, -1))  # [..., 1, H * width]
        return (kernel.astype(jnp.float32) * factor).astype(kernel.dtype)

    out = []
    for path, var in nnx.to_flat_state(params):
        key = tuple(str(p) if not isinstance(p, int) else p for p in path)
        prefix = key[:key.index("self_attn") + 1] if "self_attn" in key else None
        if prefix in rows and key[len(prefix):] in ((q_name, "kernel"), ("kv_b_proj", "kernel")):
            r = rows[prefix]
            g = gamma[jnp.asarray(r)] if var.get_value().ndim == 3 else gamma[r[0]]
            parts = ((n, 0.5), (P, 1.0)) if key[len(prefix)] == q_name else ((n, 0.5), (dv, 0.0))
            var = var.replace(scale_columns(var.get_value(), g, parts))
        out.append((path, var))
    return nnx.from_flat_state(out)

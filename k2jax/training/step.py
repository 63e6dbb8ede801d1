"""The jitted training and evaluation steps: loss, gradient accumulation, optimizer update, router-bias balancing.

One step: the global batch is split into `grad_accum_steps` micro-batches (a scan), each runs the model to its final
hidden states (and MoE statistics); the loss is the masked token cross-entropy of the lm_head's logits, computed
blockwise without [B, T, vocab] logits (`lm_head_cross_entropy`), summed over the whole global batch and divided by
its number of loss tokens (so accumulation changes nothing but memory), plus `aux_loss_weight` times the MoE balance
loss. Gradients are clipped and applied by the optax optimizer to the nnx.Param variables only; then every router's
`e_score_correction_bias` (RouterBias) moves by `model.moe_bias_update_rate` against its layer's expert load over the
global batch (aux-loss-free balancing). A step whose loss or gradient norm is not finite leaves the state unchanged.
"""

from __future__ import annotations

import json
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from k2jax.config import ModelConfig
from k2jax.layers.moe import load_balance_loss, update_router_bias
from k2jax.sharding import logical_to_mesh_spec
from k2jax.training.config import TrainConfig
from k2jax.training.optim import qk_clip
from pallas_kernels.cross_entropy import linear_cross_entropy

# ---- the jitted steps -----------------------------------------------------------------------------------------------
_STEP_FIELDS = ("steps", "grad_accum_steps", "optimizer", "learning_rate", "schedule", "warmup_steps",
                "decay_fraction", "min_lr_ratio", "weight_decay", "adam_b1", "adam_b2", "adam_eps", "grad_clip",
                "aux_loss_weight", "moe_bias_update", "qk_clip_tau")
_CACHE: dict = {}  # jitted steps by configuration, so repeated `train` calls in one process reuse compilations


def cache_key(kind: str, mcfg: ModelConfig, tcfg: TrainConfig | None = None) -> str:
    """The `cached` key of a jitted step: its kind, the model config and the train fields the step depends on."""
    t = {f: getattr(tcfg, f) for f in _STEP_FIELDS} if tcfg is not None else {}
    return json.dumps([kind, mcfg.to_dict(), t], sort_keys=True, default=str)


def output_weight(model, h_dtype):
    """The [hidden, vocab] matrix KimiLinear.logits multiplies the final hidden states by, in the dtype it does:
    the lm_head kernel in the compute dtype, or the tied embedding transposed in the hidden states' dtype."""

    if model.config.tie_word_embeddings:
        return model.embed_tokens[...].astype(h_dtype).T
    return model.lm_head.kernel[...].astype(jnp.dtype(model.config.dtype))


def lm_head_cross_entropy(model, h, targets, loss_mask):
    """(loss_sum, correct) of the model's logits at hidden states h [B, T, hidden] against targets int [B, T],
    weighted by loss_mask [B, T], without building the [B, T, vocab] logits: pallas_kernels.cross_entropy's
    blockwise lm_head + cross-entropy (custom VJP), on each device's tokens under a mesh (shard_map,
    the sums added over the batch axes and, under context parallelism, `context`). Equal to the full-logits loss; logits are float32 (for a bfloat16 untied
    lm_head the full path rounded them to bfloat16 first)."""


    w = output_weight(model, h.dtype)
    x = h.astype(w.dtype)

    def local(x, w, targets, loss_mask):
        B, T, D = x.shape
        sums = linear_cross_entropy(x.reshape(B * T, D), w, targets.reshape(B * T), mask=loss_mask.reshape(B * T))
        return jax.lax.psum(sums, rows) if rows else sums

    mesh = jax.sharding.get_abstract_mesh()
    spec = PartitionSpec() if mesh.empty else logical_to_mesh_spec(("batch", "length"), mesh, targets.shape)
    # every mesh axis the tokens are split over (batch axes, and `context` on the length under context parallelism)
    rows = tuple(a for entry in spec for a in ((entry,) if isinstance(entry, str) else (entry or ())))
    if not rows:
        return local(x, w, targets, loss_mask)
    # check_vma=False: the op's scan carries start from constants, which shard_map's varying-axes check rejects.
    return jax.shard_map(local, in_specs=(spec, PartitionSpec(), spec, spec), out_specs=PartitionSpec(),
                         check_vma=False)(x, w, targets, loss_mask)


def _forward_loss(graphdef, params, biases, rest, batch, max_logit: bool = False):
    """Masked cross-entropy pieces of one micro-batch: (loss_sum, correct, aux dict); with max_logit the aux dict
    also holds 'max_logit' f32 [num_mla_layers, H] (MuonClip)."""

    model = nnx.merge(graphdef, params, biases, rest)
    h, auxes, *maxes = model.hidden_states(batch["tokens"], batch.get("segment_ids"), return_max_logit=max_logit)
    loss_sum, correct = lm_head_cross_entropy(model, h, batch["targets"], batch["loss_mask"])
    aux = {k: jnp.stack([a[k] for a in auxes]) for k in (auxes[0] if auxes else {})}  # as KimiLinear(return_aux)
    if max_logit:
        aux["max_logit"] = maxes[0]
    return loss_sum, correct, aux


def _balance_loss(aux):
    if "expert_load" not in aux:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jax.vmap(load_balance_loss)(aux["router_probs_mean"], aux["expert_load"]))


def _update_biases(biases, load, rate: float, rows: dict):
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


def make_train_step(graphdef, mcfg: ModelConfig, tcfg: TrainConfig, tx, schedule, bias_rows, state_shardings=None):
    """The jitted step(state, batch, step_index) -> (new state, metrics): batch holds 'tokens', 'targets',
    'loss_mask' [B, T] (and optionally 'segment_ids'); state is TrainState's dict; `bias_rows` is
    `router_bias_rows` of the model (see the module docstring for what one step does).

    The state is donated: its buffers become the new state's (a long run cannot hold two copies of parameters and
    optimizer state), so the arrays passed in are deleted by the call; read or save them before it.
    `state_shardings` (a tree like the state, e.g. TrainState.state_shardings()): the new state's shardings, so that
    it comes back in the layout it went in (the optimizer may reshard on the way: see optim.experts_axis_first)
    and its buffers can be reused."""


    A = tcfg.grad_accum_steps
    aux_w = float(tcfg.aux_loss_weight)
    rate = float(mcfg.moe_bias_update_rate) if tcfg.moe_bias_update else 0.0
    clip = tcfg.optimizer == "muonclip"

    def micro_objective(params, biases, rest, mb, total):
        loss_sum, correct, aux = _forward_loss(graphdef, params, biases, rest, mb, max_logit=clip)
        balance = _balance_loss(aux) if aux_w > 0 else jnp.zeros((), jnp.float32)
        load = aux.get("expert_load", jnp.zeros((0, 1), jnp.float32))
        # the stats of micro-batches add up, except the max logit (last), whose running max `accumulate` keeps
        max_logit = aux.get("max_logit", jnp.zeros((0, mcfg.num_attention_heads), jnp.float32))
        return loss_sum / total + aux_w * balance / A, (loss_sum, correct, load, balance / A, max_logit)

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
            stats = (*jax.tree.map(jnp.add, s_acc[:-1], stats[:-1]), jnp.maximum(s_acc[-1], stats[-1]))
            return (g_acc, stats), None

        zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        first = jax.tree.map(lambda x: x[0], micro)
        s0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, biases, rest, first, total)[0][1]))
        s0 = (*s0[:-1], jnp.full_like(s0[-1], -jnp.inf))  # the max logit's running max
        (grads, stats), _ = jax.lax.scan(body, (zeros_g, s0), micro)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return grads, stats

    def step(state, batch, step_index):
        params, biases, rest, opt = state["params"], state["biases"], state["rest"], state["opt"]
        total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        grads, (loss_sum, correct, load, balance, max_logit) = accumulate(params, biases, rest, batch, total)
        loss = loss_sum / total
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt, params)
        new_params = optax.apply_updates(params, updates)
        if clip:  # MuonClip: QK-clip after the update, from the logits this step's forward saw
            new_params = qk_clip(mcfg, new_params, max_logit, float(tcfg.qk_clip_tau))
        new = {"params": new_params, "biases": _update_biases(biases, load, rate, bias_rows),
               "rest": rest, "opt": new_opt}
        # A non-finite step changes nothing: the state stays the last good one.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "accuracy": correct / total, "grad_norm": grad_norm, "aux_loss": balance,
                   "expert_load": load, "finite": finite, "lr": schedule(step_index), "loss_tokens": total}
        if clip:  # per MLA layer, the largest logit over its heads (before the clip)
            metrics["max_logit"] = jnp.max(max_logit, axis=-1)
        return new, metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=0, out_shardings=out_shardings)


def finite_leaves(tree):
    """A bool per array of `tree`: every element finite (always True for integer arrays)."""

    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                        else jnp.bool_(True), tree)


def make_eval_step(graphdef):
    """The jitted evaluate(state, batch) -> (loss sum, correct tokens, loss tokens) over one batch [B, T]."""

    def evaluate(state, batch):
        loss_sum, correct, _ = _forward_loss(graphdef, state["params"], state["biases"], state["rest"], batch)
        return loss_sum, correct, batch["loss_mask"].sum()

    return jax.jit(evaluate)


def cached(key: str, build: Callable):
    """`build()` once per key in this process (jitted steps reused across `train` calls)."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]

"""The decoder stack: embeddings -> [pre-norm attention (KDA or MLA) + pre-norm FFN (dense or MoE)] x L -> norm -> lm_head.

Layer i (0-based) is KDA iff i+1 is in `config.kda_layers` (HF lists are 1-based); layers below
`first_k_dense_replace` use a dense SwiGLU, the rest a MoE (kimi_linear.md section 4).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ModelConfig
from k2jax.layers.kda import KimiDeltaAttention
from k2jax.layers.linear import Linear
from k2jax.layers.mla import MultiHeadLatentAttention
from k2jax.layers.mlp import SwiGLU
from k2jax.layers.moe import MoE, update_router_bias
from k2jax.layers.norms import RMSNorm
from k2jax.sharding import constrain, logical_names, make_param

# Hidden states [batch, length, hidden] between layers: batch over the data axes, hidden replicated.
_HIDDEN = ("batch", "length", None)


def segment_positions(segment_ids):
    """Position of each token inside its segment, counting real tokens only.

    segment_ids: int [B, T] (0 = padding, transparent). Returns int32 [B, T]; a padding token repeats the position
    of the real token before it (0 before any), a value never used since padding neither attends nor is attended.
    """
    seg = segment_ids.astype(jnp.int32)
    real = seg != 0
    # Forward-fill padding with the previous real id, so a pad run never starts a new segment.
    idx = jnp.where(real, jnp.arange(seg.shape[1])[None, :], -1)
    last_real = jax.lax.cummax(idx, axis=1)
    filled = jnp.where(last_real >= 0, jnp.take_along_axis(seg, jnp.maximum(last_real, 0), axis=1), 0)
    starts = jnp.concatenate([jnp.ones_like(filled[:, :1], bool), filled[:, 1:] != filled[:, :-1]], axis=1)
    count = jnp.cumsum(real.astype(jnp.int32), axis=1)  # real tokens up to and including t
    before = jnp.where(starts, count - real.astype(jnp.int32), 0)
    base = jax.lax.cummax(jnp.where(starts, before, -1), axis=1)
    return (count - base - 1).clip(min=0).astype(jnp.int32)


class DecoderLayer(nnx.Module):
    """h = x + Attn(RMSNorm_in(x)); out = h + FFN(RMSNorm_post(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.is_moe = config.is_moe_layer(layer_idx)
        pdt = jnp.dtype(config.param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, rngs=rngs, param_dtype=pdt)
        if self.layer_type == "kda":
            self.self_attn = KimiDeltaAttention(config, rngs=rngs)
        else:
            self.self_attn = MultiHeadLatentAttention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, rngs=rngs,
                                                param_dtype=pdt)
        if self.is_moe:
            self.block_sparse_moe = MoE(config, rngs=rngs)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, rngs=rngs, param_dtype=pdt,
                              dtype=jnp.dtype(config.dtype))

    def __call__(self, x, *, segment_ids, positions, token_mask):
        """x: [B, T, hidden] -> ([B, T, hidden], MoE aux dict or None)."""
        normed = self.input_layernorm(x)
        if self.layer_type == "kda":
            attn = self.self_attn(normed, segment_ids=segment_ids)
        else:
            attn = self.self_attn(normed, segment_ids=segment_ids, positions=positions)
        h = x + attn.astype(x.dtype)
        normed = self.post_attention_layernorm(h)
        if self.is_moe:
            ffn, aux = self.block_sparse_moe(normed, token_mask=token_mask)
        else:
            ffn, aux = self.mlp(normed), None
        return h + ffn.astype(h.dtype), aux


_REMAT_POLICIES = {
    "full": None,  # save nothing inside the layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat(fn, remat: str):
    """fn under jax.checkpoint with config.remat's policy ('none': fn itself)."""
    return fn if remat == "none" else jax.checkpoint(fn, policy=_REMAT_POLICIES[remat])


def _call_layer(layer: DecoderLayer, x, *, remat: str, segment_ids, positions, token_mask):
    """layer(x) with the hidden-state sharding constraint; with `remat` != 'none' its activations are recomputed
    in the backward pass (jax.checkpoint over the layer's state and inputs)."""
    if remat == "none":
        x, aux = layer(x, segment_ids=segment_ids, positions=positions, token_mask=token_mask)
        return constrain(x, _HIDDEN), aux
    graphdef, state = nnx.split(layer)

    def pure(state, x, segment_ids, positions, token_mask):
        x, aux = nnx.merge(graphdef, state)(x, segment_ids=segment_ids, positions=positions, token_mask=token_mask)
        return constrain(x, _HIDDEN), aux

    return _remat(pure, remat)(state, x, segment_ids, positions, token_mask)


# ---- scanned layers ----------------------------------------------------------------------------------------------
def layer_pattern(config: ModelConfig) -> tuple[int, int, int]:
    """(start, period, repeats): layers [start, start + period * repeats) are `repeats` copies of one run of
    `period` structurally identical layer kinds ((layer_type, is_moe) per layer), chosen to minimise the layer
    bodies traced, (num_layers - period * repeats) + period; ties go to the shorter period, then the earlier
    start. repeats is 0 when no pattern repeats (every layer is then unrolled).

    Kimi-Linear-48B: (1, 4, 6): layer 0 (dense FFN), six times [KDA, KDA, MLA, KDA], then layers 25-26.
    """
    L = config.num_hidden_layers
    kinds = [(config.layer_types[i], config.is_moe_layer(i)) for i in range(L)]
    best, best_saved = (0, 0, 0), 0
    for period in range(1, L // 2 + 1):
        for start in range(0, L - 2 * period + 1):
            unit = kinds[start:start + period]
            reps = 1
            while kinds[start + reps * period:start + (reps + 1) * period] == unit:
                reps += 1
            saved = (reps - 1) * period
            if reps >= 2 and saved > best_saved:
                best, best_saved = (start, period, reps), saved
    return best


def block_layout(config: ModelConfig) -> list[tuple]:
    """The scanned model's `blocks`: ('layer', i) for an unrolled layer, ('stack', start, period, repeats) for
    the LayerStack of the repeating pattern (see layer_pattern)."""
    start, period, reps = layer_pattern(config)
    L = config.num_hidden_layers
    if reps == 0:
        return [("layer", i) for i in range(L)]
    end = start + period * reps
    return ([("layer", i) for i in range(start)] + [("stack", start, period, reps)]
            + [("layer", i) for i in range(end, L)])


def _stacked(variables):
    """One Variable holding the values of `variables` (same type and metadata) stacked on a new leading axis,
    whose logical name is 'layers'."""
    first = variables[0]
    value = jnp.stack([v.get_value() for v in variables])
    names = logical_names(first)
    if names is None:
        return first.replace(value)
    key = next(k for k in ("out_sharding", "sharding_names", "sharding") if first.get_metadata().get(k) is not None)
    return first.replace(value, **{key: ("layers",) + tuple(names)})


class LayerStack(nnx.Module):
    """`repeats` consecutive copies of a run of `period` DecoderLayers, run by `jax.lax.scan` so the program
    holds one copy of the run however deep the model is. `layers` (nnx.List of `period` DecoderLayers) has every
    variable stacked to [repeats, ...], with 'layers' prepended to its logical names; `first_layer` is the index
    of the first layer."""

    def __init__(self, runs: list[list[DecoderLayer]]):
        if len(runs) < 1 or len({len(r) for r in runs}) != 1:
            raise ValueError(f"LayerStack: needs equal-length runs of layers, got lengths {[len(r) for r in runs]}")
        self.first_layer, self.period, self.repeats = runs[0][0].layer_idx, len(runs[0]), len(runs)
        graphdef, _ = nnx.split(nnx.List(runs[0]))
        states = [nnx.state(nnx.List(run)) for run in runs]
        stacked = jax.tree.map(lambda *vs: _stacked(vs), *states, is_leaf=lambda v: isinstance(v, nnx.Variable))
        self.layers = nnx.merge(graphdef, stacked)

    def __call__(self, x, *, remat: str, segment_ids, positions, token_mask):
        """x [B, T, hidden] -> (x after all period * repeats layers, the per-MoE-layer aux dicts in layer order)."""
        graphdef, state = nnx.split(self.layers)

        def run(x, state):
            auxes = []
            for layer in nnx.merge(graphdef, state):
                x, aux = layer(x, segment_ids=segment_ids, positions=positions, token_mask=token_mask)
                x = constrain(x, _HIDDEN)
                if aux is not None:
                    auxes.append(aux)
            return x, jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else None

        x, aux = jax.lax.scan(_remat(run, remat), x, state)
        if aux is None:
            return x, []
        per_run = jax.tree.leaves(aux)[0].shape[1]  # [repeats, MoE layers per run, ...]: repeat-major = layer order
        return x, [jax.tree.map(lambda a: a[j, m], aux) for j in range(self.repeats) for m in range(per_run)]


class KimiLinear(nnx.Module):
    """Kimi Linear / Kimi K2 causal language model.

    `model(tokens, segment_ids=None)` -> logits float32 [B, T, vocab]. `segment_ids` (int [B, T]) packs several
    sequences per row (0 = padding); tokens attend only within their segment and KDA states restart per segment.

    Layers: `model.layers` (nnx.List of DecoderLayer, the layout of HF loading and serving), or with
    config.scan_layers `model.blocks`: the unrolled layers around one LayerStack of the repeating pattern
    (`block_layout`), same weights and math; convert with `stack_layers` / `unstack_layers`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt, dt = jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
        self.embed_tokens = make_param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"),
                                       std=config.initializer_range, dtype=pdt)
        layers = [DecoderLayer(config, i, rngs=rngs) for i in range(config.num_hidden_layers)]
        if config.scan_layers:
            self.blocks = nnx.List([layers[e[1]] if e[0] == "layer" else
                                    LayerStack([layers[e[1] + j * e[2]:e[1] + (j + 1) * e[2]] for j in range(e[3])])
                                    for e in block_layout(config)])
        else:
            self.layers = nnx.List(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, rngs=rngs, param_dtype=pdt)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, names=("embed", "vocab"), rngs=rngs,
                                  std=config.initializer_range, param_dtype=pdt, dtype=dt)

    def _check_inputs(self, tokens, segment_ids):
        if tokens.ndim != 2:
            raise ValueError(f"KimiLinear: tokens must be [batch, length], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"KimiLinear: tokens must be integer token ids, got {tokens.dtype}")
        if segment_ids is not None:
            if segment_ids.shape != tokens.shape:
                raise ValueError(f"KimiLinear: segment_ids shape {segment_ids.shape} != tokens shape {tokens.shape}")
            if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise ValueError(f"KimiLinear: segment_ids must be integers, got {segment_ids.dtype}")
        if not isinstance(tokens, jax.core.Tracer):
            lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"KimiLinear: token ids must lie in [0, vocab_size={self.config.vocab_size}), "
                                 f"got min {lo}, max {hi}")

    def hidden_states(self, tokens, segment_ids=None):
        """Final-normed hidden states [B, T, hidden] and the per-MoE-layer aux dicts."""
        self._check_inputs(tokens, segment_ids)
        dt = jnp.dtype(self.config.dtype)
        if segment_ids is None:
            seg, positions, token_mask = None, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), None
        else:
            seg = segment_ids.astype(jnp.int32)
            positions, token_mask = segment_positions(seg), seg != 0
        x = constrain(jnp.take(self.embed_tokens[...], tokens, axis=0).astype(dt), _HIDDEN)
        auxes = []
        kw = dict(segment_ids=seg, positions=positions, token_mask=token_mask)
        for block in (self.blocks if self.config.scan_layers else self.layers):
            if isinstance(block, LayerStack):
                x, stack_aux = block(x, remat=self.config.remat, **kw)
                auxes.extend(stack_aux)
                continue
            x, aux = _call_layer(block, x, remat=self.config.remat, **kw)
            if aux is not None:
                auxes.append(aux)
        return self.norm(x), auxes

    def logits(self, h):
        """h: [..., hidden] -> float32 logits [..., vocab] (untied lm_head unless tie_word_embeddings)."""
        if self.config.tie_word_embeddings:
            w = self.embed_tokens[...].astype(h.dtype)
            return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, tokens, segment_ids=None, *, return_aux: bool = False):
        """tokens: int [B, T] -> logits float32 [B, T, vocab] (and, with return_aux, the MoE statistics:
        'expert_load' f32 [num_moe_layers, E], 'router_probs_mean' f32 [num_moe_layers, E])."""
        h, auxes = self.hidden_states(tokens, segment_ids)
        logits = self.logits(h)
        if not return_aux:
            return logits
        aux = {k: jnp.stack([a[k] for a in auxes]) for k in (auxes[0] if auxes else {})}
        return logits, aux


def count_params(config: ModelConfig) -> dict[str, int]:
    """Parameter counts from an abstract model (nothing allocated).

    Returns {'total', 'embedding' (embed + lm_head), 'routed_experts', 'active'}, where 'active' counts what one
    token touches: everything except the routed experts, plus `num_experts_per_token` of them per MoE layer.
    Router score-correction biases are counted (they are stored in the checkpoint).
    """
    abstract = nnx.eval_shape(lambda: KimiLinear(config, rngs=None))  # shapes only: no Rngs to trace
    total = routed = 0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Variable)):
        n = math.prod(var.get_value().shape)
        total += n
        if "experts" in [str(p) for p in path]:
            routed += n
    emb = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    per_expert = routed // max(1, n_moe * config.num_experts) if n_moe else 0
    active = total - routed + n_moe * config.num_experts_per_token * per_expert
    return {"total": total, "embedding": emb, "routed_experts": routed, "active": active}


# ---- converting between the per-layer list and the scanned layout ------------------------------------------------
def _scanned_sources(config: ModelConfig) -> dict[tuple, tuple[tuple, ...]]:
    """For each path prefix of the scanned layout, the per-layer-list prefixes it holds (stacked in order):
    ('blocks', b) -> (('layers', i),) for an unrolled layer; ('blocks', b, 'layers', q) -> one prefix per repeat."""
    out = {}
    for b, entry in enumerate(block_layout(config)):
        if entry[0] == "layer":
            out[("blocks", b)] = (("layers", entry[1]),)
        else:
            _, start, period, reps = entry
            for q in range(period):
                out[("blocks", b, "layers", q)] = tuple(("layers", start + j * period + q) for j in range(reps))
    return out


def _split_prefix(path: tuple, prefixes) -> tuple[tuple, tuple] | None:
    for n in (4, 2):
        if tuple(path[:n]) in prefixes:
            return tuple(path[:n]), tuple(path[n:])
    return None


def _abstract_state(config: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: KimiLinear(config, rngs=None)))  # shapes only: no Rngs to trace


def stack_layers(model: KimiLinear) -> KimiLinear:
    """The scanned (config.scan_layers=True) model holding exactly `model`'s weights: a pure reshuffle of its
    state (per-layer arrays stacked into the LayerStack). `model` (per-layer list, e.g. HF-loaded) is unchanged."""
    if model.config.scan_layers:
        raise ValueError("stack_layers: the model is already scanned (config.scan_layers=True)")
    config = model.config.replace(scan_layers=True)
    graphdef, abstract = _abstract_state(config)
    src = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    sources = _scanned_sources(config)
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        split = _split_prefix(path, sources)
        if split is None:
            flat.append((path, var.replace(src[tuple(path)].get_value())))
            continue
        prefix, rest = split
        values = [src[p + rest].get_value() for p in sources[prefix]]
        flat.append((path, var.replace(values[0] if prefix[2:] == () else jnp.stack(values))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def unstack_layers(model: KimiLinear) -> KimiLinear:
    """The per-layer-list model (config.scan_layers=False, the layout of HF loading and serving) holding exactly
    the scanned `model`'s weights; inverse of `stack_layers`."""
    if not model.config.scan_layers:
        raise ValueError("unstack_layers: the model is not scanned (config.scan_layers=False)")
    config = model.config.replace(scan_layers=False)
    graphdef, abstract = _abstract_state(config)
    target = {}  # per-layer path -> value
    sources = _scanned_sources(model.config)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        split = _split_prefix(path, sources)
        if split is None:
            target[tuple(path)] = var.get_value()
            continue
        prefix, rest = split
        value = var.get_value()
        for j, p in enumerate(sources[prefix]):
            target[p + rest] = value if prefix[2:] == () else value[j]
    flat = [(path, var.replace(target[tuple(path)])) for path, var in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def decoder_blocks(model: KimiLinear):
    """The layer containers in order: `model.layers` (DecoderLayer each) or `model.blocks` (DecoderLayer or
    LayerStack) when scanned."""
    return model.blocks if model.config.scan_layers else model.layers


def update_router_biases(model: KimiLinear, expert_load, rate: float) -> None:
    """Aux-loss-free balancing step on every MoE layer, in place, for either layout.

    expert_load: f32 [num_moe_layers, E] in layer order (the model's aux 'expert_load'); each layer's router
    bias moves by `moe.update_router_bias`.
    """
    n_moe = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
    if expert_load.shape != (n_moe, model.config.num_experts):
        raise ValueError(f"update_router_biases: expert_load must be [num_moe_layers, num_experts] = "
                         f"{(n_moe, model.config.num_experts)}, got {tuple(expert_load.shape)}")
    i = 0
    for block in decoder_blocks(model):
        if isinstance(block, LayerStack):
            moes = [layer for layer in block.layers if layer.is_moe]
            for m, layer in enumerate(moes):
                bias = layer.block_sparse_moe.gate.e_score_correction_bias
                loads = expert_load[i + m:i + len(moes) * block.repeats:len(moes)]  # [repeats, E]
                bias[...] = jax.vmap(update_router_bias, (0, 0, None))(bias[...], loads, rate)
            i += len(moes) * block.repeats
        elif block.is_moe:
            bias = block.block_sparse_moe.gate.e_score_correction_bias
            bias[...] = update_router_bias(bias[...], expert_load[i], rate)
            i += 1

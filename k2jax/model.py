"""The decoder stack: embeddings -> [pre-norm attention (KDA or MLA) + pre-norm FFN (dense or MoE)] x L -> norm -> lm_head.

Layer i (0-based) is KDA iff i+1 is in `config.kda_layers` (HF lists are 1-based); layers below
`first_k_dense_replace` use a dense SwiGLU, the rest a MoE (kimi_linear.md section 4).

One forward path: every layer, the decoder layer and the model have one `__call__` that takes an optional cache
(one per layer: a `KDAState` for a KDA layer, an `MLACache` view for an MLA layer) and returns the cache update.
No cache is training; a cache is prefill (empty caches: `empty_cache`), chunked prefill (the caches earlier pieces
left) and decode (one token per row). The update is the new `KDAState` of each KDA layer and the new latents
(`MLALatents`) of each MLA layer, which the caller stores (k2jax.serving.cache).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ModelConfig
from k2jax.layers.context_parallel import check_context_length, from_layout, to_layout
from k2jax.layers.kda import KDAState, KimiDeltaAttention
from k2jax.layers.linear import PROJECTION_NAME, Linear
from k2jax.layers.mla import MLACache, MultiHeadLatentAttention
from k2jax.layers.mlp import SwiGLU
from k2jax.layers.moe import MoE, RouterBias, update_router_bias
from k2jax.layers.norms import RMSNorm
from k2jax.sharding import constrain, context_size, logical_names, make_param

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

    def __call__(self, x, *, segment_ids=None, positions=None, token_mask=None, cache=None,
                 return_max_logit: bool = False):
        """x: [B, T, hidden] -> ([B, T, hidden], MoE aux dict or None, cache update or None).

        segment_ids: int [B, T] (0 = padding) or None; positions: int [B, T] (RoPE MLA) or None; token_mask:
        bool [B, T] (False = padding, left out of the MoE statistics) or None; cache: this layer's cache
        (KDAState or MLACache) or None. See the layers for what the cache update is. return_max_logit (training,
        MuonClip): also return, last, an MLA layer's largest attention logit per head over the batch, float32 [H]
        (None for a KDA layer).
        """
        normed = self.input_layernorm(x)
        max_logit = None
        if self.layer_type == "kda":
            attn, update = self.self_attn(normed, segment_ids=segment_ids, cache=cache)
        elif return_max_logit:
            attn, update, max_logit = self.self_attn(normed, segment_ids=segment_ids, positions=positions,
                                                     cache=cache, return_max_logit=True)
            max_logit = jnp.max(max_logit, axis=0)
        else:
            attn, update = self.self_attn(normed, segment_ids=segment_ids, positions=positions, cache=cache)
        h = x + attn.astype(x.dtype)
        normed = self.post_attention_layernorm(h)
        if self.is_moe:
            ffn, aux = self.block_sparse_moe(normed, token_mask=token_mask)
        else:
            ffn, aux = self.mlp(normed), None
        out = h + ffn.astype(h.dtype)
        return (out, aux, update, max_logit) if return_max_logit else (out, aux, update)


# The dot policies also save the Linear outputs (named PROJECTION_NAME): their dot sits inside a custom VJP.
_SAVE_PROJECTIONS = jax.checkpoint_policies.save_only_these_names(PROJECTION_NAME)
_REMAT_POLICIES = {
    "full": None,  # save nothing inside the layer
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots,
                                                            _SAVE_PROJECTIONS),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _SAVE_PROJECTIONS),
}


def _remat(fn, remat: str):
    """fn under jax.checkpoint with config.remat's policy ('none': fn itself)."""
    return fn if remat == "none" else jax.checkpoint(fn, policy=_REMAT_POLICIES[remat])


def _call_layer(layer: DecoderLayer, x, *, remat: str, cache, return_max_logit: bool = False, **inputs):
    """layer(x) with the hidden-state sharding constraint; with `remat` != 'none' its activations are recomputed
    in the backward pass (jax.checkpoint over the layer's state and inputs). Returns (x, aux, cache update), and
    the layer's max logit last with return_max_logit (see DecoderLayer)."""
    if remat == "none":
        x, *out = layer(x, cache=cache, return_max_logit=return_max_logit, **inputs)
        return (constrain(x, _HIDDEN), *out)
    graphdef, state = nnx.split(layer)

    def pure(state, x, cache, inputs):
        x, *out = nnx.merge(graphdef, state)(x, cache=cache, return_max_logit=return_max_logit, **inputs)
        return (constrain(x, _HIDDEN), *out)

    return _remat(pure, remat)(state, x, cache, inputs)


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

    def __call__(self, x, *, remat: str, cache=None, return_max_logit: bool = False, **inputs):
        """x [B, T, hidden] -> (x after all period * repeats layers, the per-MoE-layer aux dicts in layer order,
        the cache updates in layer order or None), and with return_max_logit the MLA layers' max logits [H] in
        layer order last. cache: None or the period * repeats layers' caches in layer order (run j, position q at
        index j * period + q); `inputs` as DecoderLayer's."""
        graphdef, state = nnx.split(self.layers)
        P, R = self.period, self.repeats
        # Position q of every run has the same layer kind, so its caches stack along the scanned axis.
        stacked = None if cache is None else [jax.tree.map(lambda *a: jnp.stack(a), *cache[q::P]) for q in range(P)]

        def run(x, xs):
            state, caches = xs
            auxes, updates, maxes = [], [], []
            for q, layer in enumerate(nnx.merge(graphdef, state)):
                x, aux, update, *mx = layer(x, cache=None if caches is None else caches[q],
                                            return_max_logit=return_max_logit, **inputs)
                x = constrain(x, _HIDDEN)
                updates.append(update)
                if aux is not None:
                    auxes.append(aux)
                if mx and mx[0] is not None:
                    maxes.append(mx[0])
            aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else None
            return x, (aux, None if caches is None else updates, jnp.stack(maxes) if maxes else None)

        x, (aux, updates, maxes) = jax.lax.scan(_remat(run, remat), x, (state, stacked))
        updates = None if updates is None else [jax.tree.map(lambda a: a[j], updates[q])
                                                for j in range(R) for q in range(P)]
        # [repeats, layers of a kind per run, ...]: repeat-major is layer order
        maxes = [] if maxes is None else [maxes[j, m] for j in range(R) for m in range(maxes.shape[1])]
        if aux is None:
            auxes = []
        else:
            per_run = jax.tree.leaves(aux)[0].shape[1]
            auxes = [jax.tree.map(lambda a: a[j, m], aux) for j in range(R) for m in range(per_run)]
        return (x, auxes, updates, maxes) if return_max_logit else (x, auxes, updates)


class KimiLinear(nnx.Module):
    """Kimi Linear / Kimi K2 causal language model.

    `model(tokens, segment_ids=None)` -> logits float32 [B, T, vocab]. `segment_ids` (int [B, T]) packs several
    sequences per row (0 = padding); tokens attend only within their segment and KDA states restart per segment.
    `model(tokens, segment_ids, cache=caches)` continues sequences from per-layer caches (`empty_cache` to start
    one) and returns (logits, cache updates): prefill, chunked prefill and decode are this call (see the module
    docstring and k2jax.serving).

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

    def _check_inputs(self, tokens, segment_ids, positions, cache):
        if tokens.ndim != 2:
            raise ValueError(f"KimiLinear: tokens must be [batch, length], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"KimiLinear: tokens must be integer token ids, got {tokens.dtype}")
        for name, ids in (("segment_ids", segment_ids), ("positions", positions)):
            if ids is None:
                continue
            if ids.shape != tokens.shape:
                raise ValueError(f"KimiLinear: {name} shape {ids.shape} != tokens shape {tokens.shape}")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"KimiLinear: {name} must be integers, got {ids.dtype}")
        if cache is not None:
            kinds = self.config.layer_types
            if not isinstance(cache, (tuple, list)) or len(cache) != len(kinds):
                raise ValueError(f"KimiLinear: cache must be a sequence of {len(kinds)} per-layer caches (one per "
                                 f"layer, k2jax.model.empty_cache), got {type(cache).__name__}"
                                 f"{'' if not isinstance(cache, (tuple, list)) else f' of length {len(cache)}'}")
            for i, (kind, c) in enumerate(zip(kinds, cache)):
                want, article = (KDAState, "a") if kind == "kda" else (MLACache, "an")
                if not isinstance(c, want):
                    raise ValueError(f"KimiLinear: cache[{i}] of {kind.upper()} layer {i} must be {article} "
                                     f"{want.__name__}, got {type(c).__name__}")
        if not isinstance(tokens, jax.core.Tracer):
            lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"KimiLinear: token ids must lie in [0, vocab_size={self.config.vocab_size}), "
                                 f"got min {lo}, max {hi}")

    def hidden_states(self, tokens, segment_ids=None, *, positions=None, cache=None, return_max_logit=False):
        """Final-normed hidden states [B, T, hidden] and the per-MoE-layer aux dicts; with a cache also the cache
        updates: (h, auxes) or (h, auxes, updates). Arguments as `__call__`. return_max_logit (training, no cache;
        for MuonClip): also return, last, every MLA layer's largest attention logit per head over the batch,
        float32 [num_mla_layers, H] in layer order."""
        self._check_inputs(tokens, segment_ids, positions, cache)
        dt = jnp.dtype(self.config.dtype)
        if segment_ids is None:
            seg, token_mask = None, None
            if positions is None and cache is None:
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        else:
            seg = segment_ids.astype(jnp.int32)
            token_mask = seg != 0
            if positions is None and cache is None:
                positions = segment_positions(seg)
        # With a cache and no positions, each MLA layer places x after the row's cached tokens.
        x = constrain(jnp.take(self.embed_tokens[...], tokens, axis=0).astype(dt), _HIDDEN)
        layout = None
        if context_size() > 1:  # context parallelism: the layers see the sequence in config.context_layout
            if cache is not None:
                raise ValueError("KimiLinear: a cache cannot be used under context parallelism (a mesh with "
                                 "context > 1 is for training); run cached inference on a mesh with context 1")
            layout = self.config.context_layout
            check_context_length(tokens.shape[1], layout)
            x = to_layout(x, _HIDDEN, layout)
            seg, positions, token_mask = (None if a is None else to_layout(a, ("batch", "length"), layout)
                                          for a in (seg, positions, token_mask))
        if return_max_logit and cache is not None:
            raise ValueError("KimiLinear: return_max_logit is for training (no cache)")
        auxes, updates, maxes, i = [], [], [], 0
        inputs = dict(segment_ids=seg, positions=positions, token_mask=token_mask)
        for block in (self.blocks if self.config.scan_layers else self.layers):
            n = block.period * block.repeats if isinstance(block, LayerStack) else 1
            block_cache = None if cache is None else list(cache[i:i + n])
            if isinstance(block, LayerStack):
                x, stack_aux, update, *mx = block(x, remat=self.config.remat, cache=block_cache,
                                                  return_max_logit=return_max_logit, **inputs)
                auxes.extend(stack_aux)
                updates.extend(update or [])
                maxes.extend(mx[0] if mx else [])
            else:
                x, aux, update, *mx = _call_layer(block, x, remat=self.config.remat,
                                                  cache=None if block_cache is None else block_cache[0],
                                                  return_max_logit=return_max_logit, **inputs)
                if aux is not None:
                    auxes.append(aux)
                updates.append(update)
                if mx and mx[0] is not None:
                    maxes.append(mx[0])
            i += n
        h = self.norm(x if layout is None else from_layout(x, _HIDDEN, layout))
        if return_max_logit:
            H = self.config.num_attention_heads
            return h, auxes, jnp.stack(maxes) if maxes else jnp.zeros((0, H), jnp.float32)
        return (h, auxes) if cache is None else (h, auxes, tuple(updates))

    def logits(self, h):
        """h: [..., hidden] -> float32 logits [..., vocab] (untied lm_head unless tie_word_embeddings)."""
        if self.config.tie_word_embeddings:
            w = self.embed_tokens[...].astype(h.dtype)
            return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, tokens, segment_ids=None, *, positions=None, cache=None, logits_at=None,
                 return_aux: bool = False):
        """tokens: int [B, T] -> logits float32 [B, T, vocab].

        segment_ids: int [B, T] (0 = padding) or None. positions: int [B, T] RoPE positions (default: per segment
        from 0, or with a cache after each row's cached tokens). cache: None, or one cache per layer (KDAState /
        MLACache, `empty_cache` for new sequences): x continues each row's sequence and the call returns
        (logits, cache updates), a tuple with the new KDAState of each KDA layer and x's MLALatents of each MLA
        layer. logits_at: int [B] or None: the logits of token logits_at[b] of each row only, [B, vocab] (a
        prompt's last token; never the [B, T, vocab] of a long prompt). return_aux: also return the MoE
        statistics, last: 'expert_load' f32 [num_moe_layers, E], 'router_probs_mean' f32 [num_moe_layers, E].
        """
        out = self.hidden_states(tokens, segment_ids, positions=positions, cache=cache)
        h, auxes = out[0], out[1]
        if logits_at is not None:
            if logits_at.shape != tokens.shape[:1] or not jnp.issubdtype(logits_at.dtype, jnp.integer):
                raise ValueError(f"KimiLinear: logits_at must be int [B={tokens.shape[0]}], got "
                                 f"{logits_at.dtype}{list(logits_at.shape)}")
            h = h[jnp.arange(h.shape[0]), logits_at]
        result = (self.logits(h),) if cache is None else (self.logits(h), out[2])
        if return_aux:
            result += ({k: jnp.stack([a[k] for a in auxes]) for k in (auxes[0] if auxes else {})},)
        return result[0] if len(result) == 1 else result


def empty_cache(config: ModelConfig, batch: int) -> tuple:
    """Per-layer caches that start `batch` new sequences: KDAState.zeros for KDA layers, MLACache.empty views
    for MLA layers (layer order, the `cache` argument of KimiLinear)."""
    return tuple(KDAState.zeros(batch, config) if kind == "kda" else MLACache.empty(batch, config)
                 for kind in config.layer_types)


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


# ---- aux-loss-free router balancing ------------------------------------------------------------------------------
def router_bias_rows(config: ModelConfig, biases) -> dict[tuple, tuple[int, ...]]:
    """For each RouterBias variable of `biases` (nnx.State of the model's RouterBias variables, either layout), by
    path: the rows of the model's `expert_load` [num_moe_layers, E] it balances, one for a per-layer bias [E],
    `repeats` (in order) for a scanned LayerStack's stacked [repeats, E]."""
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    row_of = {layer: r for r, layer in enumerate(moe_layers)}
    layout = block_layout(config) if config.scan_layers else None
    rows = {}
    for path, _ in nnx.to_flat_state(biases):
        path = tuple(path)
        if path[0] == "layers":
            layers = [int(path[1])]
        elif path[0] == "blocks":
            entry = layout[int(path[1])]
            if entry[0] == "layer":
                layers = [entry[1]]
            else:
                _, start, period, reps = entry
                layers = [start + j * period + int(path[3]) for j in range(reps)]
        else:
            raise ValueError(f"router_bias_rows: a router bias at unexpected path {path}")
        rows[path] = tuple(row_of[i] for i in layers)
    return rows


def updated_router_biases(config: ModelConfig, biases, expert_load, rate: float):
    """The aux-loss-free balancing step (DeepSeek-V3) of every MoE layer, as a pure function (jittable).

    biases: nnx.State of the model's RouterBias variables (`nnx.state(model, RouterBias)`, either layout);
    expert_load: f32 [num_moe_layers, E] in layer order (the model's aux 'expert_load'); rate: float. Returns the
    new State, each layer's bias moved by `moe.update_router_bias` against its row of the load.
    """
    rows = router_bias_rows(config, biases)
    if rate == 0 or not rows:
        return biases
    out = []
    for path, var in nnx.to_flat_state(biases):
        value, load = var.get_value(), expert_load[jnp.asarray(rows[tuple(path)])]
        if value.ndim == 1:
            value = update_router_bias(value, load[0], rate)
        else:
            value = jax.vmap(update_router_bias, (0, 0, None))(value, load, rate)
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def update_router_biases(model: KimiLinear, expert_load, rate: float) -> None:
    """`updated_router_biases` applied to `model` in place (either layout).

    expert_load: f32 [num_moe_layers, E] in layer order (the model's aux 'expert_load').
    """
    n_moe = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
    if expert_load.shape != (n_moe, model.config.num_experts):
        raise ValueError(f"update_router_biases: expert_load must be [num_moe_layers, num_experts] = "
                         f"{(n_moe, model.config.num_experts)}, got {tuple(expert_load.shape)}")
    nnx.update(model, updated_router_biases(model.config, nnx.state(model, RouterBias), expert_load, rate))

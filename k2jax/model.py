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
from k2jax.kda_layer import KimiDeltaAttention
from k2jax.linear import Linear
from k2jax.mla import MultiHeadLatentAttention
from k2jax.mlp import SwiGLU
from k2jax.moe import MoE
from k2jax.norms import RMSNorm
from k2jax.sharding import make_param


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


class KimiLinear(nnx.Module):
    """Kimi Linear / Kimi K2 causal language model.

    `model(tokens, segment_ids=None)` -> logits float32 [B, T, vocab]. `segment_ids` (int [B, T]) packs several
    sequences per row (0 = padding); tokens attend only within their segment and KDA states restart per segment.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt, dt = jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
        self.embed_tokens = make_param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"),
                                       std=config.initializer_range, dtype=pdt)
        self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs) for i in range(config.num_hidden_layers)])
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
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(dt)
        auxes = []
        for layer in self.layers:
            x, aux = layer(x, segment_ids=seg, positions=positions, token_mask=token_mask)
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
    abstract = nnx.eval_shape(lambda: KimiLinear(config, rngs=nnx.Rngs(0)))
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

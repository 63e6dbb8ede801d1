"""Model-level prefill and decode over a slot cache: the pure functions behind the serving engine.

The cache holds a fixed number of sequence slots. Per layer it stores what that layer needs to continue a
sequence, and nothing more:
- a KDA layer: a `KDAState` (the last W-1 pre-conv q/k/v inputs and the [H, K, V] float32 recurrent state), a
  size that does not grow with the context;
- an MLA layer: an `MLACache`, the normed latent c [max_len, kv_lora_rank] and the rope key part k_pe
  [max_len, qk_rope_head_dim] per slot (never the per-head expanded K/V); decode attends in the absorbed form.
`lengths` [slots] counts the tokens cached per slot; latent entry i of a slot is its token at position i.

Prompts are right-padded to a length bucket, with segment id 1 on real tokens and 0 on padding. Padding is inert
for KDA (it neither reads nor changes the state) and masked for MLA, and real tokens keep positions 0..n-1, so
the cache index of a token equals its RoPE position and a decode step simply writes at index `lengths[slot]`.
(Left padding would work for the layers too, but would offset every cache index by the padding.)

Everything here is shape-static given (slots, max_len, prompt bucket, kv_len), so it jits once per bucket.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from k2jax.layers.kda import KDAState

F32 = jnp.float32


class MLACache(NamedTuple):
    """Latent cache of one MLA layer: ckv [slots, max_len, kv_lora_rank] (normed c) and kpe [slots, max_len,
    qk_rope_head_dim] (rotated when RoPE is on), both in the compute dtype."""

    ckv: jax.Array
    kpe: jax.Array


class DecodeCache(NamedTuple):
    """Per-layer caches (a KDAState or an MLACache for each layer, in layer order) and lengths int32 [slots]."""

    layers: tuple
    lengths: jax.Array


# ---- cache construction ---------------------------------------------------------------------------------------------
def _check_model(model):
    if getattr(model.config, "scan_layers", False):
        raise ValueError("k2jax.serving.cache needs the per-layer model (config.scan_layers=False); convert a scanned "
                         "one with k2jax.model.unstack_layers")


def init_cache(config, num_slots: int, max_len: int) -> DecodeCache:
    """An empty cache for `num_slots` sequences of up to `max_len` tokens each."""
    if num_slots < 1 or max_len < 1:
        raise ValueError(f"init_cache: num_slots and max_len must be positive, got {num_slots}, {max_len}")
    dt = jnp.dtype(config.dtype)
    layers = []
    for kind in config.layer_types:
        if kind == "kda":
            # Separate buffers (KDAState.zeros shares one conv array): the engine donates every leaf.
            layers.append(KDAState(*(jnp.array(a, copy=True) for a in KDAState.zeros(num_slots, config))))
        else:
            layers.append(MLACache(jnp.zeros((num_slots, max_len, config.kv_lora_rank), dt),
                                   jnp.zeros((num_slots, max_len, config.qk_rope_head_dim), dt)))
    return DecodeCache(tuple(layers), jnp.zeros((num_slots,), jnp.int32))


def cache_logical_names(cache: DecodeCache):
    """A pytree like `cache` whose leaves are logical axis-name tuples (k2jax.sharding): slots on 'batch', KDA
    channels on 'heads'. The MLA latent is shared by all heads, so only its slot dim is sharded."""
    def names(leaf_path, leaf):
        field = getattr(leaf_path[-1], "name", None)
        if field in ("conv_q", "conv_k", "conv_v"):
            return ("batch", None, "heads")
        if field == "recurrent":
            return ("batch", "heads", None, None)
        return ("batch",) + (None,) * (leaf.ndim - 1)

    return jax.tree_util.tree_map_with_path(names, cache)


def cache_bytes_per_sequence(config, context_len: int) -> int:
    """Bytes one sequence of `context_len` tokens occupies in the decode cache (what `init_cache` allocates
    per slot when max_len = context_len): KDA states are constant, MLA latents grow with the context."""
    dt = jnp.dtype(config.dtype).itemsize
    H, K, W = config.kda_num_heads, config.kda_head_dim, config.short_conv_kernel_size
    total = 0
    for kind in config.layer_types:
        if kind == "kda":
            total += 3 * (W - 1) * H * K * dt + H * K * K * 4
        else:
            total += context_len * (config.kv_lora_rank + config.qk_rope_head_dim) * dt
    return total


def _ffn(layer, h, token_mask):
    """The layer's feed-forward on h [B, T, hidden]: dense SwiGLU or MoE (float or INT4 experts, as the model
    holds them; see k2jax.quantize)."""
    if layer.is_moe:
        return layer.block_sparse_moe(h, token_mask=token_mask)[0]
    return layer.mlp(h)


# ---- writing into the cache ------------------------------------------------------------------------------------------
# Each step is two programs: one that reads the cache and computes the new entries (`prefill_entries`,
# `decode_entries`), one that writes them (`write_prefill`, `write_decode`, with the cache donated). A single
# program that both updates the cache in place and reads it makes XLA:CPU copy the whole cache several times per
# step (measured: ~20x the attention cost at 8k context); split, the write is an in-place scatter of the new rows.
class MLAEntries(NamedTuple):
    """New latents of one MLA layer: c [B, T, kv_lora_rank] and kpe [B, T, qk_rope_head_dim]."""

    c: jax.Array
    kpe: jax.Array


def _write(buf, idx, rows, keep):
    """buf with rows written at buf[idx] (idx: a tuple of in-bounds int index arrays broadcasting to rows'
    leading dims; rows [B, ...]); where keep [B] is False the old row is written back."""
    old = buf[idx]
    keep = keep.reshape(keep.shape + (1,) * (old.ndim - keep.ndim))
    return buf.at[idx].set(jnp.where(keep, rows.astype(buf.dtype), old), mode="promise_in_bounds",
                           unique_indices=True)


# ---- prefill ---------------------------------------------------------------------------------------------------------
def _check_prefill(cache, tokens, lengths, slots):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"prefill: tokens must be int [B, T], got {tokens.dtype}{list(tokens.shape)}")
    B, T = tokens.shape
    for name, a in (("lengths", lengths), ("slots", slots)):
        if a.shape != (B,) or not jnp.issubdtype(a.dtype, jnp.integer):
            raise ValueError(f"prefill: {name} must be int [B={B}], got {a.dtype}{list(a.shape)}")
    for layer in cache.layers:
        if isinstance(layer, MLACache) and T > layer.ckv.shape[1]:
            raise ValueError(f"prefill: prompt bucket T={T} exceeds the cache's max_len={layer.ckv.shape[1]}")
    if not isinstance(slots, jax.core.Tracer):
        S, got = cache.lengths.shape[0], [int(s) for s in slots]
        if len(set(got)) != len(got) or not all(0 <= s < S for s in got):
            raise ValueError(f"prefill: slots must be distinct and in [0, num_slots={S}), got {got}")


def prefill_entries(model, tokens, lengths):
    """Run right-padded prompts from an empty state. tokens: int [B, T] (row b's prompt in [:lengths[b]]);
    lengths: int [B]. Returns (per-layer entries: a KDAState [B, ...] or MLAEntries [B, T, ...], logits float32
    [B, vocab] at each row's last prompt token)."""
    _check_model(model)
    B, T = tokens.shape
    dt = jnp.dtype(model.config.dtype)
    lengths = lengths.astype(jnp.int32)
    real = jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]
    seg = real.astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = jnp.take(model.embed_tokens[...], tokens, axis=0).astype(dt)
    entries = []
    for layer in model.layers:
        normed = layer.input_layernorm(x)
        if layer.layer_type == "kda":
            attn, st = layer.self_attn(normed, segment_ids=seg, return_state=True)
            entries.append(st)
        else:
            attn = layer.self_attn(normed, segment_ids=seg, positions=positions)
            entries.append(MLAEntries(*layer.self_attn.latent_cache(normed, positions)))
        h = x + attn.astype(x.dtype)
        x = h + _ffn(layer, layer.post_attention_layernorm(h), real).astype(h.dtype)
    last = x[jnp.arange(B), jnp.maximum(lengths - 1, 0)]
    return tuple(entries), model.logits(model.norm(last))


def write_prefill(cache: DecodeCache, entries, lengths, slots) -> DecodeCache:
    """Store `prefill_entries` rows in their slots (rows with length 0 leave their slot unchanged). A slot's
    previous content is fully replaced: KDA states overwritten, MLA length reset."""
    lengths, slots = lengths.astype(jnp.int32), slots.astype(jnp.int32)
    used = lengths > 0
    layers = []
    for lc, e in zip(cache.layers, entries):
        if isinstance(lc, MLACache):
            idx = (slots[:, None], jnp.arange(e.c.shape[1])[None, :])
            layers.append(MLACache(_write(lc.ckv, idx, e.c, used), _write(lc.kpe, idx, e.kpe, used)))
        else:
            layers.append(KDAState(*(_write(old, (slots,), new, used) for old, new in zip(lc, e))))
    return DecodeCache(tuple(layers), _write(cache.lengths, (slots,), lengths, used))


def prefill(model, cache: DecodeCache, tokens, lengths, slots):
    """Prefill right-padded prompts into slots: `write_prefill(cache, *prefill_entries(...))` in one call.

    tokens: int [B, T]; lengths: int [B] (0 marks an unused row, whose slot is left unchanged); slots: int [B]
    distinct slots in [0, num_slots). Returns (new cache, logits float32 [B, vocab] of each row's last prompt
    token).
    """
    _check_prefill(cache, tokens, lengths, slots)
    entries, logits = prefill_entries(model, tokens, lengths)
    return write_prefill(cache, entries, lengths, slots), logits


# ---- decode ----------------------------------------------------------------------------------------------------------
def _absorbed_attention(attn, x, pos, ckv, kpe, mask, c_new, kpe_new):
    """Absorbed MLA (kimi_linear.md section 3, the form of `MultiHeadLatentAttention.attend_latent`) of one query
    per slot over its cached latents plus its own, which is not in the cache yet.

    x [S, hidden] (normed) at positions pos [S]; ckv [S, kv, R], kpe [S, kv, P] cached entries visible where mask
    [S, kv]; c_new [S, R], kpe_new [S, P] the query token's own latent. Returns [S, hidden].
    The softmax runs over the union of both score sets in float32.
    """
    dt = attn.dtype
    q_nope, q_pe = attn.queries(x[:, None], pos[:, None])  # [S, 1, H, n], [S, 1, H, P]
    w_uk, w_uv = attn.absorbed_weights()  # [H, n, R], [H, R, d_v]
    q_lat = jnp.einsum("hsn,hnr->hsr", jnp.swapaxes(q_nope[:, 0], 0, 1), w_uk, preferred_element_type=F32)
    q_lat = jnp.swapaxes(q_lat.astype(dt), 0, 1)  # [S, H, R]
    q_pe = q_pe[:, 0].astype(dt)  # [S, H, P]
    ckv, kpe, c_new, kpe_new = (a.astype(dt) for a in (ckv, kpe, c_new, kpe_new))
    cached = (jnp.einsum("shr,skr->shk", q_lat, ckv, preferred_element_type=F32)
              + jnp.einsum("shp,skp->shk", q_pe, kpe, preferred_element_type=F32))
    own = (jnp.einsum("shr,sr->sh", q_lat, c_new, preferred_element_type=F32)
           + jnp.einsum("shp,sp->sh", q_pe, kpe_new, preferred_element_type=F32))
    scores = jnp.concatenate([cached, own[..., None]], axis=-1) * attn.scale
    visible = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=-1)[:, None, :]
    p = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(F32).min), axis=-1) * visible
    ctx = (jnp.einsum("shk,skr->shr", p[..., :-1].astype(dt), ckv, preferred_element_type=F32)
           + p[..., -1:] * c_new[:, None, :].astype(F32))
    o = jnp.einsum("hsr,hrv->hsv", jnp.swapaxes(ctx.astype(dt), 0, 1), w_uv, preferred_element_type=F32)
    return attn.o_proj(jnp.swapaxes(o, 0, 1).reshape(x.shape[0], -1).astype(dt))


def _check_decode(cache, tokens, active, kv_len):
    S = cache.lengths.shape[0]
    if tokens.shape != (S,) or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"decode: tokens must be int [slots={S}], got {tokens.dtype}{list(tokens.shape)}")
    if active.shape != (S,) or active.dtype != jnp.bool_:
        raise ValueError(f"decode: active must be bool [slots={S}], got {active.dtype}{list(active.shape)}")
    for layer in cache.layers:
        if isinstance(layer, MLACache) and not 1 <= kv_len <= layer.ckv.shape[1]:
            raise ValueError(f"decode: kv_len={kv_len} must lie in [1, max_len={layer.ckv.shape[1]}]")


def decode_entries(model, cache: DecodeCache, tokens, *, kv_len: int):
    """The read half of a decode step: token tokens[s] at position lengths[s] of each slot attends over the
    slot's first min(lengths[s], kv_len) cached entries and itself. Returns (per-layer entries: the new KDAState
    [slots, ...] or MLAEntries [slots, 1, ...], logits float32 [slots, vocab])."""
    _check_model(model)
    dt = jnp.dtype(model.config.dtype)
    lengths = cache.lengths
    mask = jnp.arange(kv_len, dtype=jnp.int32)[None, :] < lengths[:, None]
    x = jnp.take(model.embed_tokens[...], tokens, axis=0).astype(dt)
    entries = []
    for layer, lc in zip(model.layers, cache.layers):
        normed = layer.input_layernorm(x)
        if layer.layer_type == "kda":
            attn, st = layer.self_attn.step(normed, lc)
            entries.append(st)
        else:
            c, kpe = layer.self_attn.latent_cache(normed[:, None], lengths[:, None])
            attn = _absorbed_attention(layer.self_attn, normed, lengths, lc.ckv[:, :kv_len], lc.kpe[:, :kv_len],
                                       mask, c[:, 0], kpe[:, 0])
            entries.append(MLAEntries(c, kpe))
        h = x + attn.astype(x.dtype)
        x = h + _ffn(layer, layer.post_attention_layernorm(h)[:, None], None)[:, 0].astype(h.dtype)
    return tuple(entries), model.logits(model.norm(x))


def write_decode(cache: DecodeCache, entries, active) -> DecodeCache:
    """The write half of a decode step: active slots take their new KDA states and store their latents at index
    lengths[s], and their lengths grow by one; inactive slots are left unchanged."""
    S, lengths = cache.lengths.shape[0], cache.lengths
    layers = []
    for lc, e in zip(cache.layers, entries):
        if isinstance(lc, MLACache):
            idx = (jnp.arange(S), jnp.minimum(lengths, lc.ckv.shape[1] - 1))
            layers.append(MLACache(_write(lc.ckv, idx, e.c[:, 0], active), _write(lc.kpe, idx, e.kpe[:, 0], active)))
        else:
            keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
            layers.append(KDAState(*(keep(n, o) for n, o in zip(e, lc))))
    return DecodeCache(tuple(layers), lengths + active.astype(jnp.int32))


def decode(model, cache: DecodeCache, tokens, active, *, kv_len: int):
    """One decode step for every slot: `write_decode(cache, decode_entries(...), active)` in one call.

    tokens: int [slots]; active: bool [slots] (inactive slots keep their cache and length; their logits are
    meaningless); kv_len: static number of cache positions MLA attends over, at least max(lengths[active]) (a
    bucket, so that decode cost follows the context and shapes stay static).
    Returns (new cache, logits float32 [slots, vocab]).
    """
    _check_decode(cache, tokens, active, kv_len)
    entries, logits = decode_entries(model, cache, tokens, kv_len=kv_len)
    return write_decode(cache, entries, active), logits

"""The serving engine's slot cache: its layout, building it, reading per-layer views of it for a model call, and
writing a call's cache updates back. Nothing here runs a layer: prefill and decode are the model's one forward
path (`KimiLinear.__call__` with a cache, k2jax.model) between a read and a write (k2jax.serving.runner).

The cache holds a fixed number of sequence slots. Per layer it stores what that layer needs to continue a
sequence, and nothing more:
- a KDA layer: a `KDAState` (the last W-1 pre-conv q/k/v inputs and the [H, K, V] float32 recurrent state), a
  size that does not grow with the context;
- an MLA layer: `MLALatents` [slots, max_len, ...], the normed latent c (kv_lora_rank) and the rope key part k_pe
  (qk_rope_head_dim) of every cached token (never the per-head expanded K/V); the layer reads it through an
  `MLACache` view and attends in the absorbed form.
`lengths` [slots] counts the tokens cached per slot; latent entry i of a slot is its token at position i.

Prompts are right-padded to a length bucket, with segment id 1 on real tokens and 0 on padding. Padding is inert
for KDA (it neither reads nor changes the state) and masked for MLA, and real tokens keep positions 0..n-1, so
the cache index of a token equals its RoPE position and a decode step simply writes at index `lengths[slot]`.
(Left padding would work for the layers too, but would offset every cache index by the padding.) A long prompt
is prefilled in pieces: each piece reads its slot (`slot_views`) and continues it, its tokens at positions
start + t, and its latents are written from index start.

Each step is two programs: one that reads the cache and computes the new entries, one that writes them
(`write_prefill`, `write_decode`, with the cache donated). A single program that both updates the cache in place
and reads it makes XLA:CPU copy the whole cache several times per step (measured: ~20x the attention cost at 8k
context); split, the write is an in-place scatter of the new rows.

Everything here is shape-static given (slots, max_len, prompt bucket, kv_len), so it jits once per bucket. The
serving runner reads MLA latents with kv_len = max_len: the attention over them (`latent_attention_rows`) reads
each row's own slot up to its own length, so the cost follows the live tokens without kv buckets.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from k2jax.layers.kda import KDAState
from k2jax.layers.mla import MLACache, MLALatents


class DecodeCache(NamedTuple):
    """Per-layer storage (a KDAState [slots, ...] or MLALatents [slots, max_len, ...] for each layer, in layer
    order) and lengths int32 [slots]."""

    layers: tuple
    lengths: jax.Array


# ---- building ----------------------------------------------------------------------------------------------------
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
            layers.append(MLALatents(jnp.zeros((num_slots, max_len, config.kv_lora_rank), dt),
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


def max_len_of(cache: DecodeCache) -> int | None:
    """The cache's max_len (None for a model without MLA layers: nothing grows with the context)."""
    return next((lc.ckv.shape[1] for lc in cache.layers if isinstance(lc, MLALatents)), None)


# ---- reading -----------------------------------------------------------------------------------------------------
def decode_views(cache: DecodeCache, kv_len: int, active=None) -> tuple:
    """The per-layer caches a decode call reads, every slot one row: KDA states as stored, MLA `MLACache` views of
    each slot's first kv_len latent entries (kv_len: static, at least the longest length attended; the whole
    cache when it is max_len). active: bool [slots] or None (all): an inactive slot's view has length 0, so its
    row reads no latents (its output is discarded anyway) and a step costs what the active slots hold."""
    lengths = cache.lengths if active is None else jnp.where(active, cache.lengths, 0)
    return tuple(MLACache(_first(lc.ckv, kv_len), _first(lc.kpe, kv_len), lengths)
                 if isinstance(lc, MLALatents) else lc for lc in cache.layers)


def _first(buf, kv_len: int):
    """buf [slots, max_len, ...]'s first kv_len entries per slot (buf itself at max_len: no slice, no copy)."""
    return buf if kv_len >= buf.shape[1] else buf[:, :kv_len]


def slot_views(cache: DecodeCache, slots, starts, kv_len: int) -> tuple:
    """The per-layer caches a prefill piece reads, one row per slot: row b continues slots[b] after its first
    starts[b] tokens (0: a fresh sequence, reading zero KDA states and no latents). KDA states as stored (zeros
    where starts is 0); MLA `MLACache` views of every slot's first kv_len latent entries with rows = slots and
    lengths = starts (kv_len: static, at least max(starts); at max_len the slot cache is read in place, never
    gathered)."""
    slots, starts = slots.astype(jnp.int32), starts.astype(jnp.int32)
    fresh = starts == 0
    views = []
    for lc in cache.layers:
        if isinstance(lc, MLALatents):
            views.append(MLACache(_first(lc.ckv, kv_len), _first(lc.kpe, kv_len), starts, rows=slots))
        else:
            views.append(KDAState(*(jnp.where(fresh.reshape((-1,) + (1,) * (a.ndim - 1)), 0, a[slots]).astype(a.dtype)
                                    for a in lc)))
    return tuple(views)


# ---- writing -----------------------------------------------------------------------------------------------------
def _write(buf, idx, rows, keep, mode="promise_in_bounds"):
    """buf with rows written at buf[idx] (idx: a tuple of distinct int index arrays broadcasting to rows' leading
    dims; rows [B, ...]); where keep [B] is False the old row is written back. mode "drop": indices out of
    bounds write nothing."""
    old = buf[idx]
    keep = keep.reshape(keep.shape + (1,) * (old.ndim - keep.ndim))
    return buf.at[idx].set(jnp.where(keep, rows.astype(buf.dtype), old), mode=mode, unique_indices=True)


def write_prefill(cache: DecodeCache, updates, lengths, slots, starts=None) -> DecodeCache:
    """Store a prefill call's cache updates (the model's, rows [B]) in their slots; rows with length 0 leave their
    slot unchanged. Row b's piece of T tokens (lengths[b] real) continues its slot after starts[b] tokens
    (default 0: the slot's previous content is replaced): KDA states overwritten, the T latents written from index
    starts[b] (those past max_len dropped: padding), the slot's length set to starts[b] + lengths[b]."""
    lengths, slots = lengths.astype(jnp.int32), slots.astype(jnp.int32)
    starts = jnp.zeros_like(lengths) if starts is None else starts.astype(jnp.int32)
    used = lengths > 0
    layers = []
    for lc, e in zip(cache.layers, updates):
        if isinstance(lc, MLALatents):
            idx = (slots[:, None], starts[:, None] + jnp.arange(e.ckv.shape[1])[None, :])
            layers.append(MLALatents(_write(lc.ckv, idx, e.ckv, used, "drop"),
                                     _write(lc.kpe, idx, e.kpe, used, "drop")))
        else:
            layers.append(KDAState(*(_write(old, (slots,), new, used) for old, new in zip(lc, e))))
    return DecodeCache(tuple(layers), _write(cache.lengths, (slots,), starts + lengths, used))


def write_decode(cache: DecodeCache, updates, active) -> DecodeCache:
    """Store a decode call's cache updates (rows = slots): active slots take their new KDA states and store their
    latents at index lengths[s], and their lengths grow by one; inactive slots are left unchanged."""
    S, lengths = cache.lengths.shape[0], cache.lengths
    layers = []
    for lc, e in zip(cache.layers, updates):
        if isinstance(lc, MLALatents):
            idx = (jnp.arange(S), jnp.minimum(lengths, lc.ckv.shape[1] - 1))
            layers.append(MLALatents(_write(lc.ckv, idx, e.ckv[:, 0], active),
                                     _write(lc.kpe, idx, e.kpe[:, 0], active)))
        else:
            keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
            layers.append(KDAState(*(keep(n, o) for n, o in zip(e, lc))))
    return DecodeCache(tuple(layers), lengths + active.astype(jnp.int32))

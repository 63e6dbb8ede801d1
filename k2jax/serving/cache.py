"""The serving engine's slot cache: its layout, building it, reading per-layer views of it for a model call, and
writing a call's cache updates back. Nothing here runs a layer: prefill and decode are the model's one forward
path (`KimiLinear.__call__` with a cache, k2jax.model) between a read and a write (k2jax.serving.runner).

The cache holds a fixed number of sequence slots. Per layer it stores what that layer needs to continue a
sequence, and nothing more:
- a KDA layer: a `KDAState` per slot (the last W-1 pre-conv q/k/v inputs and the [H, K, V] float32 recurrent
  state), a size that does not grow with the context;
- every MLA layer together: one paged pool (k2jax.serving.page_pool) `pool` [num_mla_layers, num_pages,
  page_size, kv_lora_rank + qk_rope_head_dim] holding the normed latent c and the rope key k_pe of every cached
  token (never the per-head expanded K/V). A slot addresses its tokens through its row of a page table (int32
  [slots, max_pages], logical page j of the slot = physical page table[slot, j]), which the host keeps
  (page_pool.PageTables) and passes to every step. So memory follows the tokens in use, and slots with a common
  prefix hold the same pages (the prefix cache, k2jax.serving.prefix_store, hands pages to slots and back).
`lengths` [slots] counts the tokens cached per slot; position i of a slot is its token at position i. A write
only touches positions whose pages the host reserved first.

Prompts are right-padded to a length bucket, with segment id 1 on real tokens and 0 on padding. Padding is inert
for KDA (it neither reads nor changes the state) and masked for MLA (and never written to the pool), and real
tokens keep positions 0..n-1, so the cache position of a token equals its RoPE position and a decode step simply
writes at position `lengths[slot]`. A long prompt is prefilled in pieces: each piece reads its slot
(`slot_views`) and continues it, its tokens at positions start + t.

Each step is two programs: one that reads the cache and computes the new entries, one that writes them
(`write_prefill`, `write_decode`, with the cache donated). A single program that both updates the cache in place
and reads it makes XLA:CPU copy the whole cache several times per step (measured: ~20x the attention cost at 8k
context); split, the write is an in-place scatter of the new tokens into their pages.

Everything here is shape-static given (slots, num_pages, page_size, max_pages, prompt bucket), so it jits once per
bucket. MLA's attention over the pool (`latent_attention_rows`) reads each row's own pages up to its own length, a
block of whole pages at a time, so the cost follows the live tokens without kv buckets.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.layers.kda import KDAState
from k2jax.layers.mla import MLACache
from k2jax.serving.page_pool import init_latent_pages, num_mla_layers, pages_for, scatter_pages, stack_latents


class DecodeCache(NamedTuple):
    """Per-layer storage in layer order (a KDAState [slots, ...] for a KDA layer, None for an MLA layer: its
    latents are in `pool`), lengths int32 [slots], and pool [num_mla_layers, num_pages, page_size, R + P] (None
    for a model without MLA layers)."""

    layers: tuple
    lengths: jax.Array
    pool: jax.Array | None = None


# ---- building ----------------------------------------------------------------------------------------------------
def init_cache(config, num_slots: int, max_len: int, *, page_size: int = 16, num_pages: int | None = None
               ) -> DecodeCache:
    """An empty cache for `num_slots` sequences of up to `max_len` tokens each, the MLA latents in a pool of
    `num_pages` pages of `page_size` tokens (default num_slots x ceil(max_len / page_size): every slot can be full
    at once without sharing)."""
    if num_slots < 1 or max_len < 1 or page_size < 1:
        raise ValueError(f"init_cache: num_slots, max_len and page_size must be positive, got {num_slots}, "
                         f"{max_len}, {page_size}")
    num_pages = num_slots * pages_for(max_len, page_size) if num_pages is None else num_pages
    layers = []
    for kind in config.layer_types:
        if kind == "kda":
            # Separate buffers (KDAState.zeros shares one conv array): the engine donates every leaf.
            layers.append(KDAState(*(jnp.array(a, copy=True) for a in KDAState.zeros(num_slots, config))))
        else:
            layers.append(None)
    pool = init_latent_pages(config, num_pages, page_size) if num_mla_layers(config) else None
    return DecodeCache(tuple(layers), jnp.zeros((num_slots,), jnp.int32), pool)


def identity_page_table(num_slots: int, max_len: int, page_size: int) -> np.ndarray:
    """int32 [num_slots, ceil(max_len / page_size)]: slot s owns pages s * max_pages + j (a contiguous layout of
    the default pool: for tests and benchmarks that do not allocate pages)."""
    M = pages_for(max_len, page_size)
    return np.arange(num_slots * M, dtype=np.int32).reshape(num_slots, M)


def cache_logical_names(cache: DecodeCache):
    """A pytree like `cache` whose leaves are logical axis-name tuples (k2jax.sharding): slots on 'batch', KDA
    channels on 'heads'. The latent pool is replicated: the latent is shared by every head, and any slot may read
    any page (sharding pages over the batch axes would make each read an all-gather)."""
    def names(leaf_path, leaf):
        field = getattr(leaf_path[-1], "name", None)
        if field in ("conv_q", "conv_k", "conv_v"):
            return ("batch", None, "heads")
        if field == "recurrent":
            return ("batch", "heads", None, None)
        if field == "pool":
            return (None,) * leaf.ndim
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


def page_size_of(cache: DecodeCache) -> int | None:
    """The pool's page size (None for a model without MLA layers)."""
    return None if cache.pool is None else cache.pool.shape[2]


# ---- reading -----------------------------------------------------------------------------------------------------
def _mla_views(cache: DecodeCache, page_table, lengths) -> tuple:
    """Per-layer views: KDA states as stored, MLA layer m (in order) as `MLACache.paged` of the pool."""
    views, m = [], 0
    for lc in cache.layers:
        if lc is None:
            views.append(MLACache.paged(cache.pool, page_table, lengths, m))
            m += 1
        else:
            views.append(lc)
    return tuple(views)


def decode_views(cache: DecodeCache, page_table, active=None) -> tuple:
    """The per-layer caches a decode call reads, every slot one row: KDA states as stored, MLA paged views of
    each slot's pages (page_table int32 [slots, max_pages]) up to its length. active: bool [slots] or None (all):
    an inactive slot's view has length 0, so its row reads no latents (its output is discarded anyway) and a step
    costs what the active slots hold."""
    lengths = cache.lengths if active is None else jnp.where(active, cache.lengths, 0)
    return _mla_views(cache, jnp.asarray(page_table, jnp.int32), lengths)


def slot_views(cache: DecodeCache, page_table, slots, starts) -> tuple:
    """The per-layer caches a prefill piece reads, one row per slot: row b continues slots[b] after its first
    starts[b] tokens (0: a fresh sequence, reading zero KDA states and no latents). KDA states gathered (zeros
    where starts is 0); MLA paged views of the slots' pages (page_table[slots]) with lengths = starts."""
    slots, starts = slots.astype(jnp.int32), starts.astype(jnp.int32)
    fresh = starts == 0
    views = _mla_views(cache, jnp.asarray(page_table, jnp.int32)[slots], starts)
    return tuple(v if isinstance(v, MLACache) else
                 KDAState(*(jnp.where(fresh.reshape((-1,) + (1,) * (a.ndim - 1)), 0, a[slots]).astype(a.dtype)
                            for a in v)) for v in views)


# ---- writing -----------------------------------------------------------------------------------------------------
def _write(buf, idx, rows, keep, mode="promise_in_bounds"):
    """buf with rows written at buf[idx] (idx: a tuple of distinct int index arrays broadcasting to rows' leading
    dims; rows [B, ...]); where keep [B] is False the old row is written back. mode "drop": indices out of
    bounds write nothing."""
    old = buf[idx]
    keep = keep.reshape(keep.shape + (1,) * (old.ndim - keep.ndim))
    return buf.at[idx].set(jnp.where(keep, rows.astype(buf.dtype), old), mode=mode, unique_indices=True)


def _write_latents(pool, updates, page_table, positions, valid):
    """pool with every MLA layer's new latents (the MLALatents among `updates`, rows [B, T]) scattered into the
    rows' pages (page_table int [B, max_pages]) at positions int [B, T] where valid bool [B, T]."""
    pairs = [(e.ckv, e.kpe) for e in updates if not isinstance(e, KDAState)]
    if not pairs:
        return pool
    return scatter_pages(pool, page_table, positions, stack_latents(pairs), valid)


def write_prefill(cache: DecodeCache, updates, page_table, lengths, slots, starts=None) -> DecodeCache:
    """Store a prefill call's cache updates (the model's, rows [B]) in their slots; rows with length 0 leave their
    slot unchanged. Row b's piece of T tokens (lengths[b] real) continues its slot after starts[b] tokens
    (default 0: a fresh sequence): KDA states overwritten, the lengths[b] real latents written into the slot's
    pages (page_table int [slots, max_pages]; the host reserved them) at positions starts[b] + t, padding never
    written, the slot's length set to starts[b] + lengths[b]."""
    lengths, slots = lengths.astype(jnp.int32), slots.astype(jnp.int32)
    starts = jnp.zeros_like(lengths) if starts is None else starts.astype(jnp.int32)
    used = lengths > 0
    layers = []
    for lc, e in zip(cache.layers, updates):
        layers.append(None if lc is None else KDAState(*(_write(old, (slots,), new, used) for old, new in zip(lc, e))))
    T = next((e.ckv.shape[1] for e in updates if not isinstance(e, KDAState)), 0)
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    pool = _write_latents(cache.pool, updates, jnp.asarray(page_table, jnp.int32)[slots], starts[:, None] + t,
                          t < lengths[:, None])
    return DecodeCache(tuple(layers), _write(cache.lengths, (slots,), starts + lengths, used), pool)


def write_decode(cache: DecodeCache, updates, page_table, active) -> DecodeCache:
    """Store a decode call's cache updates (rows = slots): active slots take their new KDA states and store their
    latents at position lengths[s] (in its page, page_table int [slots, max_pages]), and their lengths grow by
    one; inactive slots are left unchanged."""
    lengths = cache.lengths
    layers = []
    for lc, e in zip(cache.layers, updates):
        if lc is None:
            layers.append(None)
        else:
            keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
            layers.append(KDAState(*(keep(n, o) for n, o in zip(e, lc))))
    pool = _write_latents(cache.pool, updates, jnp.asarray(page_table, jnp.int32), lengths[:, None], active[:, None])
    return DecodeCache(tuple(layers), lengths + active.astype(jnp.int32), pool)

"""The engine's prefix store: cached prefixes (k2jax.serving.prefix_cache) whose MLA latents live in a paged pool
(k2jax.serving.page_pool) and whose KDA states are snapshots (k2jax.serving.state_store), copied into and out of
the runner's slots.

Design. The slots keep their contiguous decode cache (k2jax.serving.cache: `MLALatents` [slots, max_len, ...]);
the paged pool is the store of cached prefixes, not the slots' working memory. So:
- `lookup(prompt)` finds the longest cached prefix the prompt can resume from (a hybrid model: the deepest one with
  a KDA snapshot; never the last prompt token, whose logits the request needs);
- `load(slot, match)` copies its latents from the pool pages into the slot's MLA rows, restores its KDA snapshot
  into the slot and sets the slot's length: the request then prefills only the suffix (ModelRunner.prefill with
  start = the cached length);
- `save(slot, tokens)` caches what the slot holds (its first len(tokens) tokens): the latents of the tokens the
  tree does not hold yet go into fresh pages, the KDA state into a new snapshot, and the tree inserts them.
Memory is bounded by `budget_bytes`, allocated once: the snapshot buffers take at most a quarter of it, the pages
the rest; the tree keeps its pages + snapshots within the budget (LRU eviction), and an allocation that finds the
pool or the snapshot store full evicts from the tree first. Every device copy is a jitted program with fixed
shapes: one per kv length bucket for a load and for a store, one snapshot save (`compile_count` counts them).

Exactness: a resumed slot holds exactly what a slot that prefilled the prefix itself would hold up to rounding
(the cached latents and states were computed by the same model on the same tokens), and nothing stale is ever read:
positions past the cached length are zeroed on load, and a prefix is cached only after its request finished
normally or its prefill piece completed.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.layers.kda import KDAState
from k2jax.layers.mla import MLALatents
from k2jax.serving import cache as kvcache
from k2jax.serving.page_pool import (
    NO_PAGE,
    PageAllocator,
    gather_pages,
    init_latent_pages,
    num_mla_layers,
    page_bytes,
    pages_for,
    scatter_pages,
    split_latents,
    stack_latents,
)
from k2jax.serving.prefix_cache import Match, PrefixCache, Snapshot
from k2jax.serving.runner import bucket
from k2jax.serving.state_store import (
    NO_SNAPSHOT,
    SnapshotStore,
    SnapshotStoreFull,
    num_kda_layers,
    restore_states,
    snapshot_bytes,
)

log = logging.getLogger(__name__)


def load_prefix(cache: kvcache.DecodeCache, pool, store_states, page_row, num_tokens, slot, handle, *, kv_len: int):
    """cache with slot `slot` resumed from a cached prefix of num_tokens tokens: its MLA rows [0, kv_len) set to
    the latents in pool pages page_row (int [max_pages], logical order; zero past num_tokens), its KDA states to
    snapshot `handle` of store_states (zeros for NO_SNAPSHOT), its length to num_tokens.

    pool [L_mla, N, page_size, D]; store_states: tuple of KDAState [capacity, ...] (one per KDA layer);
    num_tokens, slot, handle: int32 scalars; kv_len: static, >= num_tokens."""
    rank = next(lc.ckv.shape[-1] for lc in cache.layers if isinstance(lc, MLALatents))
    latents = gather_pages(pool, page_row[None], num_tokens[None], kv_len)  # [L_mla, 1, kv_len, D]
    kda = restore_states(tuple(lc for lc in cache.layers if isinstance(lc, KDAState)), store_states, slot[None],
                         handle[None])
    layers, m, k = [], 0, 0
    for lc in cache.layers:
        if isinstance(lc, MLALatents):
            c, kpe = split_latents(latents[m, 0], rank)
            layers.append(MLALatents(jax.lax.dynamic_update_slice(lc.ckv, c[None].astype(lc.ckv.dtype), (slot, 0, 0)),
                                     jax.lax.dynamic_update_slice(lc.kpe, kpe[None].astype(lc.kpe.dtype),
                                                                  (slot, 0, 0))))
            m += 1
        else:
            layers.append(kda[k])
            k += 1
    return kvcache.DecodeCache(tuple(layers), cache.lengths.at[slot].set(num_tokens))


def store_prefix(pool, cache: kvcache.DecodeCache, page_row, start, num_tokens, slot, *, kv_len: int):
    """pool with the slot's latents at positions [start, num_tokens) written into its pages page_row (int
    [max_pages]; NO_PAGE entries are not written). kv_len: static, >= num_tokens. Call with the pool donated."""
    mla = [lc for lc in cache.layers if isinstance(lc, MLALatents)]
    entries = stack_latents([(jax.lax.dynamic_slice_in_dim(lc.ckv, slot, 1)[:, :kv_len],
                              jax.lax.dynamic_slice_in_dim(lc.kpe, slot, 1)[:, :kv_len]) for lc in mla])
    pos = jnp.arange(kv_len, dtype=jnp.int32)[None]
    valid = (pos >= start) & (pos < num_tokens)
    return scatter_pages(pool, page_row[None], pos, entries, valid)


class PrefixStore:
    """Cached prefixes for a ModelRunner's slots within `budget_bytes` of device memory (see the module docstring).

    runner: the engine's ModelRunner (its cache is read and replaced); budget_bytes: device bytes for pages and
    snapshots together; page_size: tokens per page (the granularity of sharing latents, not of resuming: a
    prefix resumes at any token count).
    """

    def __init__(self, runner, budget_bytes: int, *, page_size: int = 16):
        cfg = runner.config
        if num_mla_layers(cfg) == 0:
            raise ValueError("PrefixStore: the model has no MLA layer; the prefix cache stores MLA latents in pages "
                             "and needs at least one (turn it off for an all-KDA model)")
        if page_size < 1:
            raise ValueError(f"PrefixStore: page_size={page_size} must be a positive integer")
        self.runner, self.page_size = runner, page_size
        self.hybrid = num_kda_layers(cfg) > 0
        self.page_bytes = page_bytes(cfg, page_size)
        self.max_pages = pages_for(runner.max_len, page_size)
        snap_bytes = snapshot_bytes(cfg) if self.hybrid else 0
        # Snapshots get at most a quarter of the budget (a snapshot is worth many pages) but at least one buffer
        # per slot plus one, so that every finishing request can be cached; pages get the rest, at least one
        # sequence's worth so that a single prefix always fits the pool.
        capacity = max(runner.num_slots + 1, budget_bytes // 4 // snap_bytes) if self.hybrid else 0
        num_pages = max(self.max_pages + 1, (budget_bytes - capacity * snap_bytes) // self.page_bytes)
        self.reserved_bytes = num_pages * self.page_bytes + capacity * snap_bytes
        self.allocator = PageAllocator(num_pages, page_size)
        self.snapshots = SnapshotStore(cfg, capacity, mesh=runner.mesh) if self.hybrid else None
        self.tree = PrefixCache(self.allocator, page_bytes=self.page_bytes, budget_bytes=budget_bytes,
                                needs_snapshots=self.hybrid,
                                release_snapshot=(lambda h: self.snapshots.free([h])) if self.hybrid else None)
        self._pool_sharding = None
        if runner.mesh is not None:
            self._pool_sharding = jax.sharding.NamedSharding(runner.mesh, jax.sharding.PartitionSpec())
        self.pool = self._new_pool()
        self.compile_count = 0
        kw = {} if self._pool_sharding is None else {"out_shardings": self._pool_sharding}
        self._load_jit = jax.jit(self._traced(load_prefix), static_argnames=("kv_len",), donate_argnums=(0,))
        self._store_jit = jax.jit(self._traced(store_prefix), static_argnames=("kv_len",), donate_argnums=(0,), **kw)

    def _new_pool(self):
        make = lambda: init_latent_pages(self.runner.config, self.allocator.num_pages, self.page_size)  # noqa: E731
        return make() if self._pool_sharding is None else jax.jit(make, out_shardings=self._pool_sharding)()

    def _traced(self, fn):
        def run(*args, **kwargs):
            self.compile_count += 1  # runs only while tracing
            return fn(*args, **kwargs)
        return run

    def _call(self, step, *args, **kwargs):
        if self.runner.mesh is None:
            return step(*args, **kwargs)
        with jax.set_mesh(self.runner.mesh):
            return step(*args, **kwargs)

    # ---- reading -------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """The tree's counters and sizes (PrefixCache.stats) plus reserved_bytes (device memory held for pages
        and snapshot buffers), pages_free and page_size."""
        return dict(self.tree.stats(), reserved_bytes=self.reserved_bytes, pages_free=self.allocator.num_free,
                    page_size=self.page_size)

    def lookup(self, prompt: Sequence[int], *, record: bool = True) -> Match:
        """The cached prefix `prompt` (int [n]) can resume from: at most n - 1 tokens (its last token must run to
        give logits). Match.num_tokens 0 is a miss."""
        return self.tree.match(list(prompt)[:-1], record=record)

    # ---- device copies ------------------------------------------------------------------------------------
    def load(self, slot: int, match: Match) -> None:
        """Resume `slot` from `match` (num_tokens > 0): latents and KDA state into the slot, its length set (the
        runner's cache is donated: if this fails, the caller must recover the runner)."""
        n = match.num_tokens
        if n < 1:
            raise ValueError(f"PrefixStore.load: a match of {n} tokens has nothing to load")
        self.tree.lock(match.node)  # the pages and the snapshot stay valid until the copy is done
        try:
            row = np.full(self.max_pages, NO_PAGE, np.int32)
            row[:len(match.pages)] = match.pages
            handle = NO_SNAPSHOT if match.snapshot is None else int(match.snapshot)
            states = self.snapshots.states if self.hybrid else ()
            self.runner.cache = self._call(self._load_jit, self.runner.cache, self.pool, states, row, np.int32(n),
                                           np.int32(slot), np.int32(handle), kv_len=bucket(n, self.runner.buckets))
            self.runner.lengths[slot] = n
        finally:
            self.tree.unlock(match.node)

    def save(self, slot: int, tokens: Sequence[int]) -> int:
        """Cache the first len(tokens) tokens `slot` holds (`tokens`: exactly those ids, int [n]): pages for the
        part the tree lacks, a KDA snapshot of the slot's current state (so the slot must hold exactly n
        tokens), an insert. Returns the tokens newly cached (0 when nothing fit or all was cached)."""
        tokens = [int(t) for t in tokens]
        n, ps = len(tokens), self.page_size
        if n < 1 or int(self.runner.lengths[slot]) != n:
            raise ValueError(f"PrefixStore.save: slot {slot} holds {int(self.runner.lengths[slot])} tokens, not "
                             f"the {n} given")
        if self.tree.match(tokens, record=False).num_tokens == n:
            return 0  # resumable at n already (a hybrid model: a snapshot there)
        # Make room for the new pages first; evicting may shorten the cached path, so recount until stable.
        end = -1
        for _ in range(4):
            known = self.tree.match(tokens, record=False).num_matched
            if known == end:
                break
            end = known
            need = pages_for(n, ps) - end // ps if end < n else 0
            if need > self.allocator.num_free:
                self.tree.evict_for_free_pages(need)
        need = pages_for(n, ps) - end // ps if end < n else 0
        if need > self.allocator.num_free:
            return 0
        fresh = self.allocator.alloc(need)
        try:
            if fresh:
                row = np.full(self.max_pages, NO_PAGE, np.int32)
                row[end // ps:end // ps + len(fresh)] = fresh
                try:
                    self.pool = self._call(self._store_jit, self.pool, self.runner.cache, row, np.int32((end // ps) * ps),
                                           np.int32(n), np.int32(slot), kv_len=bucket(n, self.runner.buckets))
                except Exception:
                    self._recover_pool()
                    raise
            snap = None
            if self.hybrid:
                handle = self._save_snapshot(slot)
                if handle is None:
                    return 0
                snap = Snapshot(handle, self.snapshots.nbytes_per_snapshot)
            # The tree keeps its own pages for the first `end` tokens: only pages[end // ps:] are read.
            pages = ([NO_PAGE] * (end // ps) + fresh + [NO_PAGE] * pages_for(n, ps))[:pages_for(n, ps)]
            result = self.tree.insert(tokens, pages, snap)
            return result.num_new_tokens
        finally:
            self.allocator.decref(fresh)  # the tree holds its own references on what it kept

    def _save_snapshot(self, slot: int) -> int | None:
        kda = tuple(lc for lc in self.runner.cache.layers if isinstance(lc, KDAState))
        for _ in range(2):
            try:
                return self.snapshots.save(kda, [slot])[0]
            except SnapshotStoreFull:
                if self.tree.evict_snapshots(1) == 0:
                    return None
        return None

    def _recover_pool(self) -> None:
        """After a failed store: if it consumed the donated pool, every cached latent is gone: start empty."""
        if self.pool.is_deleted():
            log.error("the prefix cache's page pool was lost with a failed call: dropping every cached prefix")
            self.tree.clear()
            self.pool = self._new_pool()

    def warmup(self) -> None:
        """Compile the load and store programs of every kv bucket and the snapshot save now. The store writes
        nothing; the load resets slot 0 to an empty sequence (call it while no request holds a slot)."""
        row = np.full(self.max_pages, NO_PAGE, np.int32)
        states = self.snapshots.states if self.hybrid else ()
        for kv in self.runner.buckets:
            self.pool = self._call(self._store_jit, self.pool, self.runner.cache, row, np.int32(0), np.int32(0),
                                   np.int32(0), kv_len=kv)
            self.runner.cache = self._call(self._load_jit, self.runner.cache, self.pool, states, row, np.int32(0),
                                           np.int32(0), np.int32(NO_SNAPSHOT), kv_len=kv)
        if self.hybrid:
            kda = tuple(lc for lc in self.runner.cache.layers if isinstance(lc, KDAState))
            self.snapshots.free(self.snapshots.save(kda, [0]))
        self.runner.lengths[0] = 0
        jax.block_until_ready((self.pool, self.runner.cache))

"""The engine's prefix store: cached prefixes (k2jax.serving.prefix_cache) over the runner's own paged latent pool
(k2jax.serving.page_pool, k2jax.serving.cache) plus KDA state snapshots (k2jax.serving.state_store).

Design (vLLM's and SGLang's: the KV cache IS the prefix cache). The slots' MLA latents live in the runner's page
pool, so caching and reusing a prefix moves no latent:
- `lookup(prompt)` finds the longest cached prefix the prompt can resume from (a hybrid model: the deepest one with
  a KDA snapshot; never the last prompt token, whose logits the request needs);
- `load(slot, match)` attaches its pages to the slot (a reference each; a prefix ending mid-page whose tail
  another sequence has written past gets a private copy of that one page: page_pool's copy-on-write rule),
  restores its KDA snapshot into the slot and sets the slot's length, in one small program: the request then
  prefills only the suffix (ModelRunner.prefill with start = the cached length);
- `save(slot, tokens)` caches what the slot holds: the tree takes a reference on the slot's pages for the tokens
  it lacks, and the KDA state goes into a new snapshot (the only device copy).
Memory: the runner's pool holds the live slots' pages and the tree's; the tree keeps what it alone holds plus its
snapshots within `budget_bytes` (LRU eviction; `pool_pages_for` sizes the pool's share for it), and a slot that
needs pages the pool lacks makes the engine evict unused cached prefixes first (`evict_for_free_pages`).
Every device copy is a jitted program with fixed shapes: one resume, one snapshot save (`compile_count`).

Exactness: a resumed slot holds exactly what a slot that prefilled the prefix itself would hold up to rounding
(the cached latents and states were computed by the same model on the same tokens), and nothing stale is ever
read: a page's positions past a sequence's length are never attended (and read as zeros), the tokens of a page
that a cached prefix covers are never written again, and a prefix is cached only after its request finished
normally or its prefill piece completed.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import numpy as np

from k2jax.serving import cache as kvcache
from k2jax.serving.page_pool import copy_pages, num_mla_layers, page_bytes
from k2jax.serving.prefix_cache import Match, PrefixCache, Snapshot
from k2jax.serving.state_store import (
    NO_SNAPSHOT,
    SnapshotStore,
    SnapshotStoreFull,
    num_kda_layers,
    restore_states,
    snapshot_bytes,
)

log = logging.getLogger(__name__)


def resume_slot(cache: kvcache.DecodeCache, store_states, slot, handle, num_tokens, copy_src, copy_dst):
    """cache with slot `slot` resumed from a cached prefix of num_tokens tokens whose pages are already in its page
    table: its KDA states set to snapshot `handle` of store_states (zeros for NO_SNAPSHOT), the page copies
    copy_src -> copy_dst made (int [n]; -1 pads), its length set to num_tokens. Call with the cache donated.

    store_states: tuple of KDAState [capacity, ...] (one per KDA layer); slot, handle, num_tokens: int32 scalars."""
    kda = restore_states(tuple(lc for lc in cache.layers if lc is not None), store_states, slot[None], handle[None])
    it = iter(kda)
    layers = tuple(None if lc is None else next(it) for lc in cache.layers)
    pool = copy_pages(cache.pool, copy_src, copy_dst)
    return kvcache.DecodeCache(layers, cache.lengths.at[slot].set(num_tokens), pool)


def snapshot_capacity(config, budget_bytes: int, num_slots: int) -> int:
    """Snapshot buffers of a prefix cache of `budget_bytes`: at most a quarter of the budget (a snapshot is worth
    many pages) but at least one per slot plus one, so that every finishing request can be cached; 0 for a model
    without KDA layers."""
    if num_kda_layers(config) == 0:
        return 0
    return max(num_slots + 1, budget_bytes // 4 // snapshot_bytes(config))


def pool_pages_for(config, budget_bytes: int, num_slots: int, page_size: int) -> int:
    """Pages to add to the runner's pool for a prefix cache of `budget_bytes`: what the budget leaves after the
    snapshot buffers (0 for budget 0)."""
    if budget_bytes <= 0:
        return 0
    snaps = snapshot_capacity(config, budget_bytes, num_slots) * (snapshot_bytes(config) if num_kda_layers(config)
                                                                    else 0)
    return max(0, (budget_bytes - snaps) // page_bytes(config, page_size))


class PrefixStore:
    """Cached prefixes over a ModelRunner's page pool within `budget_bytes` (see the module docstring).

    runner: the engine's ModelRunner (its slots, allocator, page tables and cache are shared: its pool should
    hold `pool_pages_for(...)` pages beyond the slots' own); budget_bytes: most bytes of pages + snapshots the
    tree holds. The page size is the runner's (the granularity of sharing latents, not of resuming: a prefix
    resumes at any token count).
    """

    def __init__(self, runner, budget_bytes: int):
        cfg = runner.config
        if num_mla_layers(cfg) == 0:
            raise ValueError("PrefixStore: the model has no MLA layer; the prefix cache stores MLA latents in pages "
                             "and needs at least one (turn it off for an all-KDA model)")
        if budget_bytes < 1:
            raise ValueError(f"PrefixStore: budget_bytes={budget_bytes} must be positive (0 turns the cache off)")
        self.runner, self.page_size = runner, runner.page_size
        self.hybrid = num_kda_layers(cfg) > 0
        self.page_bytes = page_bytes(cfg, self.page_size)
        capacity = snapshot_capacity(cfg, budget_bytes, runner.num_slots)
        self.snapshots = SnapshotStore(cfg, capacity, mesh=runner.mesh) if self.hybrid else None
        self.reserved_bytes = capacity * (snapshot_bytes(cfg) if self.hybrid else 0)  # the snapshot buffers
        self.tree = PrefixCache(runner.allocator, page_bytes=self.page_bytes, budget_bytes=budget_bytes,
                                needs_snapshots=self.hybrid,
                                release_snapshot=(lambda h: self.snapshots.free([h])) if self.hybrid else None)
        self.compile_count = 0
        kw = {} if runner.mesh is None else {"out_shardings": runner.cache_sharding}
        self._resume_jit = jax.jit(self._traced(resume_slot), donate_argnums=(0,), **kw)

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
        """The tree's counters and sizes (PrefixCache.stats: pages_in_use is the tree's) plus reserved_bytes
        (the snapshot buffers), pages_free and page_size."""
        return dict(self.tree.stats(), reserved_bytes=self.reserved_bytes, pages_free=self.runner.allocator.num_free,
                    page_size=self.page_size)

    def tree_pages(self) -> set[int]:
        """The pages the tree references."""
        return self.tree.pages()

    def lookup(self, prompt: Sequence[int], *, record: bool = True) -> Match:
        """The cached prefix `prompt` (int [n]) can resume from: at most n - 1 tokens (its last token must run to
        give logits). Match.num_tokens 0 is a miss."""
        return self.tree.match(list(prompt)[:-1], record=record)

    # ---- attaching and caching ----------------------------------------------------------------------------
    def load(self, slot: int, match: Match) -> None:
        """Resume `slot` (holding no pages) from `match` (num_tokens > 0): its pages attached, KDA state restored,
        length set. PagePoolExhausted (nothing changed) when a copy-on-write page cannot be allocated; if the
        device call fails the runner's cache may be gone (the caller recovers the runner)."""
        n = match.num_tokens
        if n < 1:
            raise ValueError(f"PrefixStore.load: a match of {n} tokens has nothing to load")
        self.tree.lock(match.node)  # the pages and the snapshot stay valid until the slot holds them
        try:
            copies = self.runner.tables.attach(slot, match.pages, n)
            src = np.array([c[0] for c in copies] or [0], np.int32)
            dst = np.array([c[1] for c in copies] or [-1], np.int32)
            handle = NO_SNAPSHOT if match.snapshot is None else int(match.snapshot)
            states = self.snapshots.states if self.hybrid else ()
            try:
                self.runner.cache = self._call(self._resume_jit, self.runner.cache, states, np.int32(slot),
                                               np.int32(handle), np.int32(n), src, dst)
            except Exception:
                self.runner.release(slot)
                raise
            self.runner.lengths[slot] = n
        finally:
            self.tree.unlock(match.node)

    def save(self, slot: int, tokens: Sequence[int]) -> int:
        """Cache the first len(tokens) tokens `slot` holds (`tokens`: exactly those ids, int [n]; the slot holds
        exactly n): the tree references the slot's pages for the part it lacks (no copy) and takes a snapshot of
        the slot's KDA state. Returns the tokens newly cached (0 when nothing fit or all was cached)."""
        tokens = [int(t) for t in tokens]
        n = len(tokens)
        if n < 1 or int(self.runner.lengths[slot]) != n:
            raise ValueError(f"PrefixStore.save: slot {slot} holds {int(self.runner.lengths[slot])} tokens, not "
                             f"the {n} given")
        if self.tree.match(tokens, record=False).num_tokens == n:
            return 0  # resumable at n already (a hybrid model: a snapshot there)
        snap = None
        if self.hybrid:
            handle = self._save_snapshot(slot)
            if handle is None:
                return 0
            snap = Snapshot(handle, self.snapshots.nbytes_per_snapshot)
        return self.tree.insert(tokens, self.runner.tables.pages(slot), snap).num_new_tokens

    def evict_for_free_pages(self, num_pages: int) -> bool:
        """Evict unused cached prefixes (LRU) until the pool has num_pages free pages; whether it got there."""
        return self.tree.evict_for_free_pages(num_pages)

    def clear(self) -> None:
        """Drop every cached prefix (the runner's pool was lost: their latents are gone)."""
        log.error("the page pool was lost with a failed call: dropping every cached prefix")
        self.tree.clear()

    def _save_snapshot(self, slot: int) -> int | None:
        kda = tuple(lc for lc in self.runner.cache.layers if lc is not None)
        for _ in range(2):
            try:
                return self.snapshots.save(kda, [slot])[0]
            except SnapshotStoreFull:
                if self.tree.evict_snapshots(1) == 0:
                    return None
        return None

    def warmup(self) -> None:
        """Compile the resume program and the snapshot save now. Resets slot 0 to an empty sequence (call it while
        no request holds a slot)."""
        states = self.snapshots.states if self.hybrid else ()
        self.runner.cache = self._call(self._resume_jit, self.runner.cache, states, np.int32(0),
                                       np.int32(NO_SNAPSHOT), np.int32(0), np.zeros(1, np.int32),
                                       np.full(1, -1, np.int32))
        if self.hybrid:
            kda = tuple(lc for lc in self.runner.cache.layers if lc is not None)
            self.snapshots.free(self.snapshots.save(kda, [0]))
        self.runner.lengths[0] = 0
        jax.block_until_ready(self.runner.cache)

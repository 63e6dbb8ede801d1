"""A paged pool for the MLA latents: fixed-size pages shared between sequences, with host-side refcounts.

Device side: one array `latents` [num_mla_layers, num_pages, page_size, kv_lora_rank + qk_rope_head_dim] in the
compute dtype. Entry [l, p, i] is the latent of MLA layer l (in layer order) for the token stored at offset i of
page p: the normed c in [:kv_lora_rank], k_pe (rotated when RoPE is on) after it, exactly what `MLACache` holds
per token. Why one stacked array and c | k_pe side by side:
- a write (prefill chunk or decode step) is ONE scatter for every MLA layer, into the donated pool, in place;
- a read is one gather of whole pages (page_size x D contiguous values per index) per layer, the layer index being
  part of the gather index, so no per-layer slice of the pool is ever materialised;
- there is one buffer to donate, size and place (it is replicated: the latent is shared by every head, and a
  page can be read by any slot, so sharding pages over the batch axes would make each read an all-gather).

A sequence slot addresses its tokens through a page table row: logical page j (token positions [j*page_size,
(j+1)*page_size)) lives in physical page table[j]; NO_PAGE (-1) marks a logical page the slot does not have. Memory
follows the tokens in use: a slot holds ceil(length / page_size) pages, not max_len tokens, and sequences with a
common prefix hold the same pages.

Host side: `PageAllocator` (free list, refcounts, and the tail marks that decide copy-on-write) and `PageTables`
(each slot's page list and the [num_slots, max_pages] int32 table the jitted steps take).

Shared partial pages (the copy-on-write rule). A prefix of n tokens ending mid-page ends in a page whose offsets
[n % page_size, page_size) may be free, or may hold another sequence's continuation. A page's *tail mark* is the
offset from which one more sequence may append in place: `page_size` while some sequence owns the tail (a fresh
page belongs to the slot that allocated it), or the valid length a sequence left when it released the tail. A slot
that resumes at n takes the tail in place iff the mark equals n % page_size (nobody has written past n in this
page since); otherwise it copies the page first (`copy_pages`) and appends into its private copy. Either way the
tokens [0, n) of the page, which others may reference, are never written again. So the common agent turn (resume
exactly where the last turn ended) appends in place with no copy, and two branches from one point copy once.
"""

from __future__ import annotations

import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NO_PAGE = -1


class PagePoolExhausted(RuntimeError):
    """Not enough free pages for an allocation (the caller may evict cached prefixes and retry)."""


# ---- sizes and construction -----------------------------------------------------------------------------------------
def num_mla_layers(config) -> int:
    """How many layers of `config` are MLA (the leading dim of the pool)."""
    return sum(kind == "mla" for kind in config.layer_types)


def latent_dim(config) -> int:
    """Values stored per token per MLA layer: kv_lora_rank + qk_rope_head_dim."""
    return config.kv_lora_rank + config.qk_rope_head_dim


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold num_tokens tokens: ceil(num_tokens / page_size)."""
    return -(-num_tokens // page_size)


def page_bytes(config, page_size: int) -> int:
    """Bytes one page occupies in the pool (every MLA layer of page_size tokens)."""
    return num_mla_layers(config) * page_size * latent_dim(config) * jnp.dtype(config.dtype).itemsize


def init_latent_pages(config, num_pages: int, page_size: int) -> jax.Array:
    """An all-zero pool [num_mla_layers, num_pages, page_size, kv_lora_rank + qk_rope_head_dim] in config.dtype."""
    L = num_mla_layers(config)
    if L == 0:
        raise ValueError("init_latent_pages: the config has no MLA layer, so there are no latents to page")
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"init_latent_pages: num_pages and page_size must be positive, got {num_pages}, {page_size}")
    return jnp.zeros((L, num_pages, page_size, latent_dim(config)), jnp.dtype(config.dtype))


def latent_pages_logical_names() -> tuple:
    """Logical axis names of the pool (k2jax.sharding): replicated (see the module docstring for why)."""
    return ("layers", None, None, None)


# ---- jittable reads and writes ------------------------------------------------------------------------------------
def gather_pages(latents, page_table, lengths, kv_len: int, *, layer: int | None = None):
    """Contiguous latents of each row's first kv_len positions, zero at positions >= lengths[b].

    latents [L, N, page_size, D]; page_table int [B, P] with P >= ceil(kv_len / page_size) (NO_PAGE entries are
    read as zeros); lengths int [B]; kv_len: static. Returns [B, kv_len, D] for one MLA layer (`layer`, static,
    its index among the MLA layers) or [L, B, kv_len, D] for all (layer=None). Positions past a row's length are
    zeroed rather than merely left for the attention mask: a recycled page may hold another sequence's latents,
    and a masked score times a non-finite stale value would still poison the sum.
    """
    L, N, ps, D = latents.shape
    B, P = page_table.shape
    need = pages_for(kv_len, ps)
    if kv_len < 1 or need > P:
        raise ValueError(f"gather_pages: kv_len={kv_len} needs {need} pages of {ps} tokens but the page table has "
                         f"{P} columns")
    if lengths.shape != (B,):
        raise ValueError(f"gather_pages: lengths must be [B={B}], got {list(lengths.shape)}")
    idx = page_table[:, :need].astype(jnp.int32)
    present = idx >= 0
    idx = jnp.where(present, idx, 0)
    if layer is None:
        pages = latents[:, idx]  # [L, B, need, ps, D]
    else:
        if not 0 <= layer < L:
            raise ValueError(f"gather_pages: layer={layer} must lie in [0, {L}) (an index among the MLA layers)")
        pages = latents[layer, idx]  # [B, need, ps, D]
    pages = pages.reshape(pages.shape[:-3] + (need * ps, D))[..., :kv_len, :]
    pos = jnp.arange(kv_len, dtype=jnp.int32)
    keep = (pos[None, :] < lengths.astype(jnp.int32)[:, None]) & jnp.repeat(present, ps, axis=1)[:, :kv_len]
    return jnp.where(keep[..., None], pages, jnp.zeros((), pages.dtype))


def scatter_pages(latents, page_table, positions, entries, valid):
    """latents with entries written at their rows' token positions (call with the pool donated: in place).

    latents [L, N, page_size, D]; page_table int [B, P]; positions int [B, T] (token positions of the entries);
    entries [L, B, T, D] (cast to the pool dtype); valid bool [B, T]. Invalid entries, positions outside
    [0, P * page_size) and positions whose page is NO_PAGE are dropped, never written anywhere.
    """
    L, N, ps, D = latents.shape
    B, P = page_table.shape
    if positions.ndim != 2 or positions.shape[0] != B or valid.shape != positions.shape:
        raise ValueError(f"scatter_pages: positions and valid must be [B={B}, T], got {list(positions.shape)} and "
                         f"{list(valid.shape)}")
    if entries.shape != (L, B, positions.shape[1], D):
        raise ValueError(f"scatter_pages: entries must be [L={L}, B={B}, T={positions.shape[1]}, D={D}], got "
                         f"{list(entries.shape)}")
    positions = positions.astype(jnp.int32)
    logical = positions // ps
    inside = (positions >= 0) & (logical < P)
    page = jnp.take_along_axis(page_table.astype(jnp.int32), jnp.clip(logical, 0, P - 1), axis=1)
    ok = valid & inside & (page >= 0)
    dest = jnp.where(ok, page * ps + positions % ps, N * ps)  # N * ps is out of range: dropped
    flat = latents.reshape(L, N * ps, D)
    flat = flat.at[:, dest].set(entries.astype(latents.dtype), mode="drop")
    return flat.reshape(L, N, ps, D)


def copy_pages(latents, src, dst):
    """latents with page dst[i] := page src[i] in every layer (copy-on-write; call with the pool donated).
    src, dst: int [n]; pairs whose dst is negative are skipped (pad a batch of copies with -1 to keep one shape)."""
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError(f"copy_pages: src and dst must be int [n] of one shape, got {list(src.shape)} and "
                         f"{list(dst.shape)}")
    N = latents.shape[1]
    dst = jnp.where(dst >= 0, dst, N)
    return latents.at[:, dst].set(latents[:, jnp.clip(src, 0, N - 1)], mode="drop")


def stack_latents(pairs) -> jax.Array:
    """[L, B, T, kv_lora_rank + P] from one (c [B, T, kv_lora_rank], kpe [B, T, P]) pair per MLA layer (what
    `MLAEntries` holds), the layout `scatter_pages` writes."""
    return jnp.stack([jnp.concatenate([c, kpe.astype(c.dtype)], axis=-1) for c, kpe in pairs])


def split_latents(x, kv_lora_rank: int):
    """(c [..., kv_lora_rank], kpe [..., P]) from gathered latents [..., kv_lora_rank + P]."""
    return x[..., :kv_lora_rank], x[..., kv_lora_rank:]


# ---- host side ----------------------------------------------------------------------------------------------------
class PageAllocator:
    """Free list, refcounts and tail marks of a pool of `num_pages` pages of `page_size` tokens (host side,
    thread-safe). Every page a sequence or the prefix cache uses holds one reference per holder; a page returns
    to the free list when its last reference goes."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"PageAllocator: num_pages and page_size must be positive, got {num_pages}, {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._refs = np.zeros(num_pages, np.int64)
        self._tail = np.full(num_pages, page_size, np.int64)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        return int(self._refs[self._check(page)])

    def _check(self, page) -> int:
        if isinstance(page, bool) or not isinstance(page, (int, np.integer)) or not 0 <= page < self.num_pages:
            raise ValueError(f"page id {page!r} is invalid: must be an integer in [0, num_pages={self.num_pages})")
        return int(page)

    def alloc(self, n: int) -> list[int]:
        """n fresh pages, each with one reference and its tail owned by the caller; PagePoolExhausted (and
        nothing taken) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"alloc: n={n} must be >= 0")
        with self._lock:
            if n > len(self._free):
                raise PagePoolExhausted(f"the page pool has {len(self._free)} free pages of {self.num_pages}, "
                                        f"{n} were requested")
            pages = [self._free.pop() for _ in range(n)]
            self._refs[pages] = 1
            self._tail[pages] = self.page_size
            return pages

    def incref(self, pages: Sequence[int]) -> None:
        """One more reference on each page (all must be in use)."""
        with self._lock:
            pages = [self._check(p) for p in pages]
            dead = [p for p in pages if self._refs[p] == 0]
            if dead:
                raise ValueError(f"incref: pages {dead[:8]} are free (not allocated)")
            np.add.at(self._refs, pages, 1)

    def decref(self, pages: Sequence[int]) -> list[int]:
        """Drop one reference from each page; returns the pages that became free."""
        with self._lock:
            pages = [self._check(p) for p in pages]
            counts = np.bincount(pages, minlength=self.num_pages) if pages else np.zeros(self.num_pages, np.int64)
            over = np.flatnonzero(counts > self._refs)
            if over.size:
                raise ValueError(f"decref: pages {over[:8].tolist()} would drop below zero references")
            self._refs -= counts
            freed = [int(p) for p in np.flatnonzero((counts > 0) & (self._refs == 0))]
            self._tail[freed] = self.page_size
            self._free.extend(freed)
            return freed

    def claim_tail(self, page: int, used: int) -> bool:
        """Take the right to append into `page` from offset `used` (the caller's valid tokens in it): True iff
        nobody has written past `used` since the tail was last released there; the caller owns the tail then.
        False means: copy the page first (copy_pages) and append into the copy."""
        with self._lock:
            page = self._check(page)
            if self._refs[page] == 0:
                raise ValueError(f"claim_tail: page {page} is free")
            if self._tail[page] != used:
                return False
            self._tail[page] = self.page_size
            return True

    def release_tail(self, page: int, used: int) -> None:
        """Give up the tail of `page` (owned by the caller), whose valid tokens end at offset `used`: the next
        sequence resuming exactly there may append in place."""
        if not 0 <= used <= self.page_size:
            raise ValueError(f"release_tail: used={used} must lie in [0, page_size={self.page_size}]")
        with self._lock:
            page = self._check(page)
            if self._refs[page] == 0 or self._tail[page] != self.page_size:
                raise ValueError(f"release_tail: the tail of page {page} is not owned (refs "
                                 f"{int(self._refs[page])}, tail mark {int(self._tail[page])})")
            self._tail[page] = used


class PageTables:
    """Each sequence slot's pages and the int32 table [num_slots, ceil(max_len / page_size)] (NO_PAGE padded) the
    jitted steps read. A slot holds one reference on each of its pages and owns the tail of its last one.

    Lifecycle of a slot: `attach` (the pages of a cached prefix, or none) -> `reserve` before each write that
    reaches new positions -> `release` when the sequence ends (after the prefix cache has taken its own
    references).
    """

    def __init__(self, allocator: PageAllocator, num_slots: int, max_len: int):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"PageTables: num_slots and max_len must be positive, got {num_slots}, {max_len}")
        self.allocator, self.page_size = allocator, allocator.page_size
        self.max_pages = pages_for(max_len, self.page_size)
        self.max_len = max_len
        self.table = np.full((num_slots, self.max_pages), NO_PAGE, np.int32)
        self._pages: list[list[int]] = [[] for _ in range(num_slots)]
        self._tokens = np.zeros(num_slots, np.int64)  # positions [0, tokens) hold valid latents

    def pages(self, slot: int) -> list[int]:
        """The slot's physical pages in logical order."""
        return list(self._pages[slot])

    def num_tokens(self, slot: int) -> int:
        return int(self._tokens[slot])

    def attach(self, slot: int, pages: Sequence[int], num_tokens: int) -> list[tuple[int, int]]:
        """Start `slot` on a cached prefix: `pages` (ceil(num_tokens / page_size) ids, referenced by the prefix
        cache) hold the latents of its first num_tokens tokens. The slot takes a reference on each; if the prefix
        ends mid-page and that page's tail is taken, the slot gets a fresh copy instead. Returns the (src, dst)
        page copies to run on the device (copy_pages) before anything is written. Atomic: on PagePoolExhausted
        nothing changed."""
        if self._pages[slot]:
            raise ValueError(f"attach: slot {slot} already holds {len(self._pages[slot])} pages (release it first)")
        need = pages_for(num_tokens, self.page_size)
        if num_tokens < 0 or num_tokens > self.max_len or len(pages) != need:
            raise ValueError(f"attach: {num_tokens} tokens (max_len {self.max_len}) need {need} pages of "
                             f"{self.page_size}, got {len(pages)}")
        pages = [int(p) for p in pages]
        copies = []
        used = num_tokens % self.page_size
        self.allocator.incref(pages)
        if used and not self.allocator.claim_tail(pages[-1], used):
            try:
                (fresh,) = self.allocator.alloc(1)
            except PagePoolExhausted:
                self.allocator.decref(pages)
                raise
            copies.append((pages[-1], fresh))
            self.allocator.decref([pages[-1]])
            pages[-1] = fresh
        self._set(slot, pages, num_tokens)
        return copies

    def reserve(self, slot: int, num_tokens: int) -> list[int]:
        """Make sure positions [0, num_tokens) of `slot` have pages (allocating fresh ones at the end); the slot's
        valid length becomes num_tokens. Returns the new pages. Atomic: on PagePoolExhausted nothing changed."""
        if num_tokens > self.max_len:
            raise ValueError(f"reserve: {num_tokens} tokens exceed max_len={self.max_len}")
        have = self._pages[slot]
        need = pages_for(num_tokens, self.page_size) - len(have)
        fresh = self.allocator.alloc(need) if need > 0 else []
        self._set(slot, have + fresh, max(num_tokens, int(self._tokens[slot])))
        return fresh

    def release(self, slot: int) -> list[int]:
        """End `slot`'s sequence: give up the tail of its last page at its valid length (so the next turn can
        append there in place) and drop its references; returns the pages that became free."""
        pages, n = self._pages[slot], int(self._tokens[slot])
        if pages and n % self.page_size and n > (len(pages) - 1) * self.page_size:
            self.allocator.release_tail(pages[-1], n % self.page_size)
        freed = self.allocator.decref(pages)
        self._set(slot, [], 0)
        return freed

    def _set(self, slot, pages, num_tokens):
        self._pages[slot], self._tokens[slot] = pages, num_tokens
        self.table[slot] = NO_PAGE
        self.table[slot, :len(pages)] = pages

"""A prefix cache across requests: a radix tree over token ids holding MLA latent pages and KDA state snapshots.

Each node ends an edge, a run of tokens; its path from the root spells a cached prefix of `node.end` tokens. Edges
split where two cached sequences diverge, at token granularity (never rounded to a block). A node holds:
- `pages`: the physical pages (k2jax.serving.page_pool) of logical pages start // page_size .. ceil(end /
  page_size) - 1, i.e. every page its edge touches. When an edge starts mid-page, its first page is the same
  logical page as its parent's last: the child's copy holds the parent's tokens of that page too (whoever wrote a
  page wrote all of the sequence's tokens in it), so along a path the deepest node's page wins. The tree holds one
  allocator reference per distinct page, however many nodes name it.
- optionally a KDA `Snapshot` (an opaque handle and its bytes, from k2jax.serving.state_store) of the state after
  exactly `end` tokens.

Reuse. A hybrid model (`needs_snapshots=True`) can resume at n only with the KDA state at n, so `match` returns the
deepest node on the query's path that holds a snapshot; an all-MLA model can resume at any prefix, even mid-edge.
The tree accepts snapshots at any token count and always prefers the deepest usable one; which counts get one
(the end of every request, every N tokens of a long prefill, the point where a request diverged from a cached
path: `Match.num_matched`) is the engine's policy. In hybrid mode every leaf holds a snapshot: a leaf without one
could never be used, so it is removed as soon as it appears.

Memory. Bytes in use = distinct pages x page_bytes + snapshot bytes, kept under `budget_bytes`: an insert first
evicts what it needs and is dropped whole if the budget cannot be met. Eviction is LRU over unlocked leaves (a
parent that becomes a leaf joins the queue); evicting a node drops its page references (a page returns to the
pool when no slot holds it either) and releases its snapshot through `release_snapshot(handle)`. `evict_snapshots`
frees snapshot buffers alone: a leaf goes whole, an internal node only loses its snapshot. A request pins what it
uses with `lock(node)` (the node and its ancestors) until `unlock(node)`.

Ownership. `insert` takes ownership of the snapshot handle (kept, or released at once when redundant or rejected);
the caller keeps its own page references (the tree takes its own). Handles and pages of a `Match` stay valid while
its node is locked.

Thread safety: every public method holds one lock, so `stats()` may be read from another thread (the HTTP
server) while the engine thread matches, inserts and evicts.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from k2jax.serving.page_pool import PageAllocator, pages_for


class Snapshot(NamedTuple):
    """A KDA state snapshot: an opaque handle (e.g. a k2jax.serving.state_store handle) and its size in bytes."""

    handle: Any
    nbytes: int


class Node:
    """A radix tree node (see the module docstring). Read its fields; never change them."""

    __slots__ = ("tokens", "start", "pages", "parent", "children", "snapshot", "lock_count", "last_access",
                 "snapshot_used", "id", "alive", "cleared")

    def __init__(self, tokens: np.ndarray, start: int, pages: list[int], parent: "Node | None", node_id: int):
        self.tokens, self.start, self.pages, self.parent = tokens, start, pages, parent
        self.children: dict[int, Node] = {}
        self.snapshot: Snapshot | None = None
        self.lock_count = 0
        self.last_access = 0  # the last match or insert through this node
        self.snapshot_used = 0  # the last time its snapshot was stored or served
        self.id = node_id
        self.alive = True
        self.cleared = False  # dropped by PrefixCache.clear

    @property
    def end(self) -> int:
        """Tokens in the prefix this node ends."""
        return self.start + len(self.tokens)

    def __repr__(self):
        return (f"Node(id={self.id}, tokens=[{self.start}, {self.end}), pages={len(self.pages)}, "
                f"snapshot={self.snapshot is not None}, locks={self.lock_count}, children={len(self.children)})")


class Match(NamedTuple):
    """What a request can reuse: its first `num_tokens` tokens, whose latents are in `pages` (ceil(num_tokens /
    page_size) ids, logical order; the last may be partially valid) and, for a hybrid model, whose KDA state is the
    snapshot `snapshot` (None for an all-MLA model or when num_tokens is 0). `node`: lock it while the pages and
    snapshot are in use. `num_matched` >= num_tokens: how many tokens match a cached path at all (a snapshot there,
    taken during this request's prefill, makes the next request with this prefix hit in full)."""

    num_tokens: int
    pages: list[int]
    snapshot: Any
    node: Node
    num_matched: int


class InsertResult(NamedTuple):
    """`node`: the node ending exactly at len(tokens) (None when the insert was rejected, or for an all-MLA model
    when the tokens end inside an edge); `num_new_tokens`: tokens added to the tree; `snapshot_kept`: whether the
    tree kept the snapshot (otherwise it was released already); `rejected`: the budget could not be met."""

    node: Node | None
    num_new_tokens: int
    snapshot_kept: bool
    rejected: bool = False


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """Radix tree prefix cache (see the module docstring).

    allocator: the PageAllocator of the latent pool (page_size comes from it); page_bytes: bytes of one page
    (k2jax.serving.page_pool.page_bytes); budget_bytes: most bytes of pages + snapshots the tree may hold;
    needs_snapshots: True for a model with KDA layers (resume only where a snapshot exists), False for all-MLA;
    release_snapshot: called with a handle when the tree drops a snapshot (e.g. SnapshotStore.free of [handle]).
    """

    def __init__(self, allocator: PageAllocator, *, page_bytes: int, budget_bytes: int, needs_snapshots: bool,
                 release_snapshot: Callable[[Any], None] | None = None):
        if page_bytes < 1:
            raise ValueError(f"PrefixCache: page_bytes={page_bytes} must be positive")
        if budget_bytes < 0:
            raise ValueError(f"PrefixCache: budget_bytes={budget_bytes} must be >= 0 (0 caches nothing)")
        if needs_snapshots and release_snapshot is None:
            raise ValueError("PrefixCache: a cache that needs snapshots needs release_snapshot to free them")
        self.allocator, self.page_size, self.page_bytes = allocator, allocator.page_size, page_bytes
        self.budget_bytes, self.needs_snapshots = budget_bytes, needs_snapshots
        self._release = release_snapshot
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self.root = Node(np.zeros(0, np.int32), 0, [], None, next(self._ids))
        self._page_refs: dict[int, int] = {}  # page -> number of nodes naming it
        self._snapshot_bytes = 0
        self._num_snapshots = 0
        self._num_nodes = 0
        self._tokens_cached = 0
        self._lock = threading.RLock()
        self._counters = dict(queries=0, hits=0, misses=0, tokens_queried=0, cached_tokens=0, inserts=0,
                              inserted_tokens=0, inserts_rejected=0, evicted_nodes=0, evicted_tokens=0,
                              evicted_snapshots=0)

    # ---- reading ------------------------------------------------------------------------------------------------
    @property
    def bytes_in_use(self) -> int:
        with self._lock:
            return len(self._page_refs) * self.page_bytes + self._snapshot_bytes

    def stats(self) -> dict:
        """Counters (queries, hits, misses, tokens_queried, cached_tokens = tokens reused, inserts,
        inserted_tokens, inserts_rejected, evicted_nodes, evicted_tokens, evicted_snapshots) and the current
        bytes_in_use, budget_bytes, pages_in_use, snapshots_in_use, snapshot_bytes, nodes, tokens_cached."""
        with self._lock:
            return dict(self._counters, bytes_in_use=self.bytes_in_use, budget_bytes=self.budget_bytes,
                        pages_in_use=len(self._page_refs), snapshots_in_use=self._num_snapshots,
                        snapshot_bytes=self._snapshot_bytes, nodes=self._num_nodes, tokens_cached=self._tokens_cached)

    def pages(self) -> set[int]:
        """The distinct pages the tree references."""
        with self._lock:
            return set(self._page_refs)

    def match(self, tokens: Sequence[int], *, record: bool = True) -> Match:
        """The longest reusable prefix of `tokens` (int [n]). A request must still run at least its last prompt
        token to get logits, so pass prompt[:-1]. Marks the reused path as recently used and, if `record`, counts
        the query in the stats (an engine that retries an admission records it once)."""
        tokens = self._as_tokens(tokens, "match")
        with self._lock:
            node, pos, child, k, path = self._walk(tokens)
            matched = pos + k
            if self.needs_snapshots:
                while node is not self.root and node.snapshot is None:
                    node = node.parent
                path = path[:path.index(node) + 1]
                num = node.end
            else:
                if child is not None:
                    path.append(child)
                num = matched
            self._touch(path)
            if self.needs_snapshots:
                path[-1].snapshot_used = path[-1].last_access
            if record:
                c = self._counters
                c["queries"] += 1
                c["tokens_queried"] += len(tokens)
                c["hits" if num > 0 else "misses"] += 1
                c["cached_tokens"] += num
            snap = path[-1].snapshot if self.needs_snapshots and num > 0 else None
            return Match(num, self._path_pages(path, num), None if snap is None else snap.handle, path[-1], matched)

    # ---- locking --------------------------------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        """Pin `node` and its ancestors against eviction (counted: call unlock once per lock). The root (a miss's
        node) is never evicted: locking it does nothing."""
        with self._lock:
            if not node.alive:
                raise ValueError(f"lock: {node} was evicted")
            while node is not self.root:
                node.lock_count += 1
                node = node.parent

    def unlock(self, node: Node) -> None:
        """Undo one `lock(node)`. A node dropped by `clear` (the only way a locked node dies) is ignored."""
        with self._lock:
            if node is self.root or (not node.alive and node.cleared):
                return
            if not node.alive or node.lock_count < 1:
                raise ValueError(f"unlock: {node} is not locked")
            self._unpin(node)
            self._prune(node)

    # ---- inserting ------------------------------------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], pages: Sequence[int], snapshot: Snapshot | None = None) -> InsertResult:
        """Cache `tokens` (int [n]) whose latents are in `pages` (at least ceil(n / page_size) ids, logical order:
        the sequence's page table) and, for a hybrid model, whose KDA state after all n tokens is `snapshot`
        (required then; must be None for an all-MLA model). Parts already cached are kept as they are (the tree's
        pages win); the tree references the pages it keeps. May evict to stay within the budget."""
        tokens = self._as_tokens(tokens, "insert")
        n, ps = len(tokens), self.page_size
        if n == 0:
            raise ValueError("insert: tokens is empty")
        if len(pages) < pages_for(n, ps):
            raise ValueError(f"insert: {n} tokens need {pages_for(n, ps)} pages of {ps} tokens, got {len(pages)}")
        if self.needs_snapshots and snapshot is None:
            raise ValueError("insert: this model has KDA layers: a snapshot of the state after the tokens is "
                             "required (latents alone could never be resumed)")
        if not self.needs_snapshots and snapshot is not None:
            raise ValueError("insert: this model has no KDA layer: snapshot must be None")
        if snapshot is not None and (not isinstance(snapshot, Snapshot) or snapshot.nbytes < 0):
            raise ValueError(f"insert: snapshot must be a Snapshot(handle, nbytes >= 0), got {snapshot!r}")
        pages = [int(p) for p in pages[:pages_for(n, ps)]]
        with self._lock:
            self._counters["inserts"] += 1
            node, pos, child, k, path = self._walk(tokens)
            end = pos + k  # tokens of `tokens` already cached
            exact = node if child is None else None  # the node ending at `end`, if one does
            if end == n and (snapshot is None or (exact is not None and exact.snapshot is not None)):
                self._touch(path + ([child] if child is not None else []))
                self._drop_snapshot(snapshot)
                return InsertResult(exact, 0, False)
            anchor = child if child is not None else node
            if self._new_bytes(pages, end, n, snapshot) > self.budget_bytes:  # could not fit even alone
                return self._reject(snapshot)
            if self.bytes_in_use + self._new_bytes(pages, end, n, snapshot) > self.budget_bytes:
                self.lock(anchor)  # what the insert builds on must survive its own eviction
                try:
                    over = self.bytes_in_use + self._new_bytes(pages, end, n, snapshot) - self.budget_bytes
                    self._evict(lambda freed: freed >= over)
                finally:
                    self._unpin(anchor)  # no pruning yet: the insert may still hang its leaf there
                if self.bytes_in_use + self._new_bytes(pages, end, n, snapshot) > self.budget_bytes:
                    self._prune(anchor)  # its children may have gone: a hybrid leaf without a snapshot is useless
                    return self._reject(snapshot)
            base = self._split(child, k) if child is not None else node
            if base is not node:
                path.append(base)
            if end < n:
                leaf = Node(tokens[end:].copy(), end, pages[end // ps:], base, next(self._ids))
                base.children[int(tokens[end])] = leaf
                self._ref_pages(leaf.pages)
                self._num_nodes += 1
                self._tokens_cached += n - end
                self._counters["inserted_tokens"] += n - end
                target = leaf
                path.append(leaf)
            else:
                target = base
            if snapshot is not None:
                target.snapshot = snapshot
                self._snapshot_bytes += snapshot.nbytes
                self._num_snapshots += 1
            self._touch(path)
            target.snapshot_used = target.last_access
            if child is not None:  # the eviction may have emptied child's subtree
                self._prune(child)
            return InsertResult(target, n - end, snapshot is not None)

    # ---- evicting -------------------------------------------------------------------------------------------------
    def evict(self, bytes_needed: int) -> int:
        """Evict least recently used unlocked leaves until at least `bytes_needed` bytes were freed from the
        tree's accounting (or nothing evictable is left); returns the bytes freed."""
        with self._lock:
            return self._evict(lambda freed: freed >= bytes_needed)

    def evict_for_free_pages(self, num_pages: int) -> bool:
        """Evict LRU leaves until the allocator has `num_pages` free pages (pages slots still hold are not freed
        by the tree's eviction); returns whether it got there."""
        with self._lock:
            self._evict(lambda freed: self.allocator.num_free >= num_pages)
            return self.allocator.num_free >= num_pages

    def evict_snapshots(self, count: int) -> int:
        """Release at least `count` snapshots (to free snapshot buffers) from unlocked nodes, the least recently
        stored or served first: a leaf is evicted whole, an internal node keeps its latents. Returns how many were
        released."""
        with self._lock:
            before = self._counters["evicted_snapshots"]
            while self._counters["evicted_snapshots"] - before < count:
                held = [nd for nd in self._nodes() if nd.snapshot is not None and nd.lock_count == 0]
                if not held:
                    break
                nd = min(held, key=lambda x: (x.snapshot_used, x.id))
                if nd.children:
                    self._drop_node_snapshot(nd)
                else:
                    self._remove_leaf(nd)
            return self._counters["evicted_snapshots"] - before

    def clear(self) -> int:
        """Drop everything, locked or not (the pool was lost or the model changed: nothing cached is valid);
        returns the bytes freed. Matches taken before are void; unlocking their nodes does nothing."""
        with self._lock:
            freed = self.bytes_in_use
            for nd in list(self._nodes()):
                self._unref_pages(nd.pages)
                self._drop_node_snapshot(nd)
                nd.alive, nd.cleared = False, True
            self.root.children.clear()
            self._num_nodes = self._tokens_cached = 0
            return freed

    # ---- consistency (tests and debugging) -----------------------------------------------------------------
    def check_consistency(self) -> None:
        """Raise RuntimeError naming the first broken invariant: page references, byte and token totals, lock
        counts, page coverage of every edge, hybrid leaves holding snapshots (unless locked), the budget."""
        with self._lock:
            refs: dict[int, int] = {}
            snap_bytes = snaps = tokens = nodes = 0
            for nd in self._nodes():
                nodes += 1
                tokens += len(nd.tokens)
                want = pages_for(nd.end, self.page_size) - nd.start // self.page_size
                if len(nd.pages) != want or len(nd.tokens) == 0:
                    raise RuntimeError(f"{nd} covers [{nd.start}, {nd.end}) with {len(nd.pages)} pages, not {want}")
                for p in nd.pages:
                    refs[p] = refs.get(p, 0) + 1
                if nd.snapshot is not None:
                    snap_bytes += nd.snapshot.nbytes
                    snaps += 1
                elif self.needs_snapshots and not nd.children and nd.lock_count == 0:
                    raise RuntimeError(f"hybrid leaf {nd} holds no snapshot")
                child_locks = sum(c.lock_count for c in nd.children.values())
                if nd.lock_count < child_locks:
                    raise RuntimeError(f"{nd} has fewer locks than its children together ({child_locks})")
                for first, c in nd.children.items():
                    if c.parent is not nd or int(c.tokens[0]) != first or c.start != nd.end:
                        raise RuntimeError(f"{c} is misplaced under {nd}")
            if refs != self._page_refs:
                raise RuntimeError("the page reference counts do not match the nodes' pages")
            for p in refs:
                if self.allocator.refcount(p) < 1:
                    raise RuntimeError(f"page {p} is named by the tree but free in the allocator")
            if (snap_bytes, snaps, tokens, nodes) != (self._snapshot_bytes, self._num_snapshots,
                                                       self._tokens_cached, self._num_nodes):
                raise RuntimeError("the snapshot / token / node totals are out of date")
            if self.bytes_in_use > self.budget_bytes:
                raise RuntimeError(f"{self.bytes_in_use} bytes in use exceed the budget of {self.budget_bytes}")

    # ---- internals ------------------------------------------------------------------------------------------------
    def _as_tokens(self, tokens, op) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{op}: tokens must be a 1-D sequence of integer ids, got {arr.dtype}{list(arr.shape)}")
        return arr.astype(np.int64)

    def _walk(self, tokens):
        """Follow `tokens` from the root: (node, pos, child, k, path) where `node` (path[-1]) is the deepest node
        whose whole path matches (node.end == pos) and `child`, if not None, is the next node, whose edge matches
        only its first k tokens (1 <= k < len(child.tokens)) before `tokens` diverge or end."""
        node, pos, path, n = self.root, 0, [self.root], len(tokens)
        while pos < n:
            child = node.children.get(int(tokens[pos]))
            if child is None:
                break
            k = _common_prefix(child.tokens, tokens[pos:])
            if k < len(child.tokens):
                return node, pos, child, k, path
            node, pos = child, pos + k
            path.append(child)
        return node, pos, None, 0, path

    def _path_pages(self, path, num_tokens) -> list[int]:
        """Pages of logical pages 0 .. ceil(num_tokens / page_size) - 1 along `path` (the deepest node wins)."""
        out: list[int] = []
        for nd in path:
            first = nd.start // self.page_size
            out[first:first + len(nd.pages)] = nd.pages
        return out[:pages_for(num_tokens, self.page_size)]

    def _touch(self, path):
        now = next(self._clock)
        for nd in path:
            nd.last_access = now

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            nd = stack.pop()
            yield nd
            stack.extend(nd.children.values())

    def _new_bytes(self, pages, end, n, snapshot) -> int:
        """Bytes an insert of tokens [end, n) with `pages` and `snapshot` would add to the tree."""
        new_pages = set(pages[end // self.page_size:]) - self._page_refs.keys() if end < n else set()
        return len(new_pages) * self.page_bytes + (snapshot.nbytes if snapshot is not None else 0)

    def _split(self, child: Node, k: int) -> Node:
        """Cut child's edge after k tokens: a new node ends there, child keeps the rest (and its identity)."""
        ps, start = self.page_size, child.start
        mid = Node(child.tokens[:k], start, child.pages[:pages_for(start + k, ps) - start // ps], child.parent,
                   next(self._ids))
        mid.lock_count, mid.last_access = child.lock_count, child.last_access
        child.parent.children[int(child.tokens[0])] = mid
        child.pages = child.pages[(start + k) // ps - start // ps:]
        child.tokens, child.start, child.parent = child.tokens[k:], start + k, mid
        mid.children[int(child.tokens[0])] = child
        if (start + k) % ps:  # the page holding the cut is now named by both
            self._page_refs[mid.pages[-1]] += 1
        self._num_nodes += 1
        return mid

    def _ref_pages(self, pages):
        for p in pages:
            if p in self._page_refs:
                self._page_refs[p] += 1
            else:
                self.allocator.incref([p])
                self._page_refs[p] = 1

    def _unref_pages(self, pages) -> int:
        """Drop the node's names of `pages`; returns the bytes leaving the tree's accounting."""
        gone = []
        for p in pages:
            self._page_refs[p] -= 1
            if self._page_refs[p] == 0:
                del self._page_refs[p]
                gone.append(p)
        self.allocator.decref(gone)
        return len(gone) * self.page_bytes

    def _reject(self, snapshot) -> InsertResult:
        self._counters["inserts_rejected"] += 1
        self._drop_snapshot(snapshot)
        return InsertResult(None, 0, False, rejected=True)

    def _drop_snapshot(self, snapshot):
        if snapshot is not None:
            self._release(snapshot.handle)

    def _drop_node_snapshot(self, nd) -> int:
        if nd.snapshot is None:
            return 0
        snap, nd.snapshot = nd.snapshot, None
        self._snapshot_bytes -= snap.nbytes
        self._num_snapshots -= 1
        self._counters["evicted_snapshots"] += 1
        self._release(snap.handle)
        return snap.nbytes

    def _unpin(self, node) -> None:
        while node is not self.root:
            node.lock_count -= 1
            node = node.parent

    def _prune(self, nd) -> None:
        """Remove `nd` if it is an unlocked hybrid leaf without a snapshot (nothing could ever resume there)."""
        if (self.needs_snapshots and nd.alive and nd is not self.root and not nd.children and nd.snapshot is None
                and nd.lock_count == 0):
            self._remove_leaf(nd)

    def _remove_leaf(self, nd) -> int:
        """Evict leaf `nd` and then, for a hybrid model, its snapshotless ancestors left as leaves; returns the
        bytes freed."""
        freed = 0
        while True:
            parent = nd.parent
            freed += self._unref_pages(nd.pages) + self._drop_node_snapshot(nd)
            del parent.children[int(nd.tokens[0])]
            nd.alive = False
            self._num_nodes -= 1
            self._tokens_cached -= len(nd.tokens)
            self._counters["evicted_nodes"] += 1
            self._counters["evicted_tokens"] += len(nd.tokens)
            if not (self.needs_snapshots and parent is not self.root and not parent.children
                    and parent.snapshot is None and parent.lock_count == 0):
                return freed
            nd = parent

    def _evict(self, done: Callable[[int], bool]) -> int:
        """Evict LRU unlocked leaves until done(bytes freed so far); returns the bytes freed."""
        freed = 0
        if done(freed):
            return freed
        heap = [(nd.last_access, nd.id, nd) for nd in self._nodes() if not nd.children and nd.lock_count == 0]
        heapq.heapify(heap)
        while heap and not done(freed):
            _, _, nd = heapq.heappop(heap)
            if not nd.alive or nd.children or nd.lock_count:
                continue
            parent = nd.parent
            freed += self._remove_leaf(nd)
            while not parent.alive:  # the cascade took it
                parent = parent.parent
            if parent is not self.root and not parent.children and parent.lock_count == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

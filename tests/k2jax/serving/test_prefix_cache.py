"""The radix prefix cache: matching, splitting, the deepest usable snapshot, page sharing and copy-on-write, locks,
LRU eviction, the byte budget, stats read from another thread, and a randomized engine-like run checked against a
brute-force model (no stale latent or state is ever served; every live snapshot is found)."""

import threading

import numpy as np
import pytest

from k2jax.serving.page_pool import PageAllocator, PagePoolExhausted, PageTables
from k2jax.serving.prefix_cache import PrefixCache, Snapshot

PS = 4  # tokens per page
PAGE_BYTES, SNAP_BYTES = 100, 150
BIG = 10 ** 9


def _tree(needs_snapshots=True, budget=BIG, num_pages=256):
    alloc = PageAllocator(num_pages, PS)
    released = []
    tree = PrefixCache(alloc, page_bytes=PAGE_BYTES, budget_bytes=budget, needs_snapshots=needs_snapshots,
                       release_snapshot=released.append)
    return tree, alloc, released


def _computed(alloc, n):
    """Pages of a sequence of n tokens computed from scratch (a slot's own pages)."""
    return alloc.alloc(-(-n // PS))


def _insert(tree, alloc, tokens, snapshot=None, pages=None):
    """Insert like an engine at the end of a request: the slot's pages go to the tree, then the slot lets go."""
    pages = _computed(alloc, len(tokens)) if pages is None else pages
    res = tree.insert(tokens, pages, snapshot)
    alloc.decref(pages)
    return res, pages


def _snap(name):
    return Snapshot(name, SNAP_BYTES)


def test_insert_match_and_split_at_token_granularity():
    tree, alloc, _ = _tree(needs_snapshots=False)
    A = list(range(10, 22))  # 12 tokens, pages a0 a1 a2
    _, a = _insert(tree, alloc, A)
    m = tree.match(A)
    assert (m.num_tokens, m.pages, m.num_matched) == (12, a, 12)
    # An all-MLA model resumes anywhere, even inside an edge: 7 tokens, 2 pages (the second holds 3 of them).
    m = tree.match(A[:7] + [99])
    assert (m.num_tokens, m.pages, m.num_matched) == (7, a[:2], 7) and m.node.end == 12
    # B shares 6 tokens with A: the edge splits at 6, mid-page. B's own first page is not kept (A's holds those
    # tokens), its second page is: it holds B's tokens 6 and 7 beside the shared 4 and 5.
    B = A[:6] + [50, 51, 52, 53, 54, 55]
    _, b = _insert(tree, alloc, B)
    mid = tree.root.children[10]
    assert (mid.start, mid.end, mid.pages) == (0, 6, a[:2]) and sorted(mid.children) == [16, 50]
    assert mid.children[16].pages == a[1:] and mid.children[50].pages == b[1:]
    assert tree.match(B).pages == [a[0], b[1], b[2]]  # the deepest node's copy of logical page 1 wins
    assert tree.match(A).pages == a
    assert alloc.refcount(b[0]) == 0 and alloc.refcount(a[1]) == 1  # one tree reference, however many nodes
    m = tree.match([7, 8, 9])
    assert (m.num_tokens, m.pages, m.node) == (0, [], tree.root)
    s = tree.stats()
    assert (s["pages_in_use"], s["bytes_in_use"], s["nodes"], s["tokens_cached"]) == (5, 500, 3, 18)
    assert (s["queries"], s["hits"], s["misses"], s["cached_tokens"]) == (5, 4, 1, 12 + 7 + 12 + 12)
    tree.check_consistency()


def test_hybrid_resumes_only_at_the_deepest_snapshot_mla_anywhere():
    S = [int(t) for t in np.random.default_rng(0).integers(3, 100, 20)]
    tree, alloc, released = _tree()
    res, pages = _insert(tree, alloc, S, _snap("s20"))
    assert res.snapshot_kept and res.num_new_tokens == 20
    alloc.incref(pages[:2])  # a slot still on those pages took a snapshot at 8 during its prefill
    res, _ = _insert(tree, alloc, S[:8], _snap("s8"), pages=pages[:2])
    assert res.snapshot_kept and res.num_new_tokens == 0 and res.node.end == 8
    m = tree.match(S + [5])
    assert (m.num_tokens, m.snapshot, m.num_matched, m.pages) == (20, "s20", 20, pages)
    m = tree.match(S[:15] + [1])
    assert (m.num_tokens, m.snapshot, m.num_matched, m.pages) == (8, "s8", 15, pages[:2])
    m = tree.match(S[:5])
    assert (m.num_tokens, m.snapshot, m.num_matched, m.node) == (0, None, 5, tree.root)
    # A second snapshot at a point that has one is redundant: released at once, the first kept.
    res, _ = _insert(tree, alloc, S, _snap("again"))
    assert not res.snapshot_kept and released == ["again"] and tree.match(S).snapshot == "s20"
    # The same history on an all-MLA model: any prefix is reusable.
    mla, alloc2, _ = _tree(needs_snapshots=False)
    _insert(mla, alloc2, S)
    assert mla.match(S[:15] + [1]).num_tokens == 15 and mla.match(S[:5]).num_tokens == 5
    tree.check_consistency()


def test_conversation_turns_append_in_place_and_a_branch_copies_the_shared_partial_page():
    """Turn 1 caches 10 tokens (its last page half full). Turn 2 resumes there and appends into that page in
    place; a branch from the same 10 tokens must copy it. Each path then reads its own latents."""
    tree, alloc, released = _tree()
    slots = PageTables(alloc, 2, 64)
    rng = np.random.default_rng(1)
    turn1 = [int(t) for t in rng.integers(3, 100, 10)]
    slots.reserve(0, 10)
    tree.insert(turn1, slots.pages(0), _snap("t1"))
    slots.release(0)
    t1_pages = tree.match(turn1).pages

    def resume(slot, tokens):
        m = tree.match(tokens[:-1])
        tree.lock(m.node)
        copies = slots.attach(slot, m.pages, m.num_tokens)
        slots.reserve(slot, len(tokens) - 1)  # generation's last token is never fed back, so not cached
        return m, copies

    turn2 = turn1 + [int(t) for t in rng.integers(3, 100, 7)]
    m2, copies = resume(0, turn2)
    assert m2.num_tokens == 10 and copies == [] and slots.pages(0)[:3] == t1_pages
    branch = turn1 + [int(t) for t in rng.integers(3, 100, 4)]
    m3, copies = resume(1, branch)
    assert m3.num_tokens == 10 and copies == [(t1_pages[2], slots.pages(1)[2])]
    for slot, toks, m, name in ((0, turn2, m2, "t2"), (1, branch, m3, "b")):
        res = tree.insert(toks[:-1], slots.pages(slot), _snap(name))
        assert res.num_new_tokens == len(toks) - 11
        tree.unlock(m.node)
        slots.release(slot)
    assert tree.match(turn2).pages[:3] == t1_pages
    assert tree.match(branch).pages[2] != t1_pages[2] and tree.match(branch).pages[:2] == t1_pages[:2]
    assert alloc.num_used == tree.stats()["pages_in_use"] == 3 + 2 + 1  # turn 1, turn 2's new, the copy
    tree.check_consistency()
    assert tree.evict(BIG) == 6 * PAGE_BYTES + 3 * SNAP_BYTES
    assert alloc.num_used == 0 and sorted(released) == ["b", "t1", "t2"]


def test_locked_paths_survive_eviction_and_lru_order_decides_the_rest():
    tree, alloc, released = _tree()
    seqs = {name: [i + 3] * (4 + i) for i, name in enumerate("abcd")}
    for name, toks in seqs.items():
        _insert(tree, alloc, toks, _snap(name))
    tree.match(seqs["a"])  # a is now the most recently used
    locked = tree.match(seqs["c"]).node
    tree.lock(locked)
    tree.lock(locked)
    freed = tree.evict(1)  # the least recently used unlocked leaf: b
    assert released == ["b"] and freed == 2 * PAGE_BYTES + SNAP_BYTES
    tree.evict(BIG)
    assert released == ["b", "d", "a"] and tree.match(seqs["c"]).num_tokens == 6
    tree.unlock(locked)
    assert tree.evict(BIG) == 0  # still locked once
    tree.unlock(locked)
    with pytest.raises(ValueError, match="not locked"):
        tree.unlock(locked)
    tree.evict(BIG)
    assert released == ["b", "d", "a", "c"]
    with pytest.raises(ValueError, match="was evicted"):
        tree.lock(locked)
    s = tree.stats()
    assert (s["bytes_in_use"], s["pages_in_use"], s["snapshots_in_use"], s["nodes"], s["tokens_cached"]) == (0,) * 5
    assert s["evicted_nodes"] == 4 and s["evicted_snapshots"] == 4 and alloc.num_used == 0


def test_eviction_walks_up_shared_prefixes_and_frees_everything():
    tree, alloc, released = _tree()
    base = list(range(3, 13))
    for i in range(5):
        _insert(tree, alloc, base + [50 + i] * (i + 1), _snap(f"s{i}"))
        _insert(tree, alloc, base[:6 + i % 3], _snap(f"mid{i}"))  # snapshots on the shared prefix, some redundant
    nodes, before = tree.stats()["nodes"], tree.bytes_in_use
    tree.check_consistency()
    assert tree.evict(BIG) == before
    s = tree.stats()
    assert (s["bytes_in_use"], s["nodes"], alloc.num_used) == (0, 0, 0) and s["evicted_nodes"] == nodes
    assert len(released) == len(set(released)) == 10


def test_the_budget_is_respected_by_evicting_lru_or_rejecting():
    budget = 2 * (3 * PAGE_BYTES + SNAP_BYTES) + 100  # two 12-token sequences and change
    tree, alloc, released = _tree(budget=budget)
    for i in range(3):
        res, _ = _insert(tree, alloc, [i + 3] * 12, _snap(i))
        assert res.snapshot_kept and tree.bytes_in_use <= budget
    assert released == [0] and tree.match([3] * 12).num_tokens == 0  # the oldest made room
    res, _ = _insert(tree, alloc, [9] * 40, _snap("huge"))  # 10 pages: never fits
    assert res.rejected and released == [0, "huge"] and tree.stats()["nodes"] == 2  # nothing evicted for it
    for toks in ([4] * 12, [5] * 12):
        tree.lock(tree.match(toks).node)
    res, _ = _insert(tree, alloc, [6] * 12, _snap("late"))  # everything is locked
    assert res.rejected and released[-1] == "late" and tree.stats()["inserts_rejected"] == 2
    assert alloc.num_used == tree.stats()["pages_in_use"] == 6
    tree.check_consistency()


def test_evict_snapshots_frees_buffers_keeping_internal_latents():
    tree, alloc, released = _tree()
    S = list(range(3, 23))
    _, pages = _insert(tree, alloc, S, _snap("s20"))
    alloc.incref(pages[:2])
    _insert(tree, alloc, S[:8], _snap("s8"), pages=pages[:2])
    tree.match(S)  # s8's node is now the older one
    assert tree.evict_snapshots(1) == 1 and released == ["s8"]
    assert tree.match(S).num_tokens == 20 and tree.match(S[:10]).num_tokens == 0  # latents kept, state gone
    assert tree.evict_snapshots(5) == 1 and released == ["s8", "s20"]
    assert tree.stats()["nodes"] == 0 and alloc.num_used == 0  # the snapshotless parent went with its leaf


def test_clear_drops_everything_even_locked_and_the_tree_carries_on():
    tree, alloc, released = _tree()
    for i in range(3):
        _insert(tree, alloc, [i + 3] * 9, _snap(i))
    hit, miss = tree.match([3] * 9 + [1]), tree.match([7, 7])
    tree.lock(hit.node)
    tree.lock(miss.node)
    assert tree.clear() == 3 * (3 * PAGE_BYTES + SNAP_BYTES)
    assert tree.bytes_in_use == 0 and alloc.num_used == 0 and sorted(released) == [0, 1, 2]
    tree.unlock(hit.node)  # void now: nothing to undo
    tree.unlock(miss.node)
    assert tree.match([3] * 9, record=False).num_tokens == 0
    _insert(tree, alloc, [3] * 9, _snap("new"))
    assert tree.match([3] * 9).snapshot == "new"
    s = tree.stats()
    assert (s["queries"], s["hits"], s["misses"]) == (3, 2, 1)  # the unrecorded match is not counted
    tree.check_consistency()


def test_bad_calls_name_the_problem():
    tree, alloc, _ = _tree()
    with pytest.raises(ValueError, match="snapshot of the state after the tokens is required"):
        tree.insert([1, 2], [0])
    with pytest.raises(ValueError, match="2 tokens need 1 pages of 4 tokens, got 0"):
        tree.insert([1, 2], [], _snap("x"))
    with pytest.raises(ValueError, match="1-D sequence of integer ids"):
        tree.match([[1, 2]])
    with pytest.raises(ValueError, match="tokens is empty"):
        tree.insert([], [], _snap("x"))
    mla, alloc2, _ = _tree(needs_snapshots=False)
    with pytest.raises(ValueError, match="snapshot must be None"):
        mla.insert([1], [0], _snap("x"))
    with pytest.raises(ValueError, match="needs release_snapshot"):
        PrefixCache(alloc, page_bytes=1, budget_bytes=1, needs_snapshots=True)


def test_stats_can_be_read_from_another_thread_while_the_engine_works():
    tree, alloc, _ = _tree(budget=20 * PAGE_BYTES)
    stop, seen, errors = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                s = tree.stats()
                assert s["bytes_in_use"] == s["pages_in_use"] * PAGE_BYTES + s["snapshot_bytes"]
                assert s["bytes_in_use"] <= s["budget_bytes"]
                seen.append(s["inserts"])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    t = threading.Thread(target=reader)
    t.start()
    rng = np.random.default_rng(2)
    try:
        for i in range(300):
            toks = [int(x) for x in rng.integers(3, 6, rng.integers(1, 20))]
            tree.match(toks)
            _insert(tree, alloc, toks, _snap(i))
            if i % 7 == 0:
                tree.evict(3 * PAGE_BYTES)
    finally:
        stop.set()
        t.join()
    assert not errors and len(seen) > 0 and seen == sorted(seen)
    tree.check_consistency()


# ---- randomized: an engine-like run against a brute-force model ---------------------------------------------------
class Sim:
    """Requests through the tree as an engine would run them (match -> lock -> attach -> write -> optional mid
    snapshot -> insert -> release -> unlock), up to 3 in flight, with random evictions, a tight budget and a
    small pool (exhaustion -> evict_for_free_pages). Each page's content is modelled per offset as the token
    prefix whose latent it holds, so any stale or overwritten latent a match serves is caught."""

    def __init__(self, seed, needs_snapshots, budget):
        self.rng = np.random.default_rng(seed)
        self.hybrid = needs_snapshots
        self.alloc = PageAllocator(48, PS)
        self.released = []
        self.tree = PrefixCache(self.alloc, page_bytes=PAGE_BYTES, budget_bytes=budget,
                                needs_snapshots=needs_snapshots, release_snapshot=self.released.append)
        self.slots = PageTables(self.alloc, 3, 64)
        self.content = {}  # page -> {offset: token prefix tuple}
        self.snap_of = {}  # handle -> token prefix tuple
        self.kept = set()  # live snapshot handles the tree holds
        self.inserted = []  # every sequence inserted (for the all-MLA completeness check without eviction)
        self.in_flight = {}  # slot -> (tokens, match)
        self.handles = iter(range(10 ** 9))
        self.evicted_any = False

    def tokens(self):
        r = self.rng.random()
        if self.inserted and r < 0.7:  # continue or branch from a cached sequence
            base = list(self.inserted[self.rng.integers(len(self.inserted))])
            base = base[:self.rng.integers(1, len(base) + 1)]
            return (base + [int(t) for t in self.rng.integers(3, 6, self.rng.integers(1, 12))])[:60]
        return [int(t) for t in self.rng.integers(3, 6, self.rng.integers(2, 24))]

    def check_match(self, toks, m):
        assert m.num_tokens <= m.num_matched <= len(toks) and len(m.pages) == -(-m.num_tokens // PS)
        for pos in range(m.num_tokens):  # every latent served is the one for this very prefix
            assert self.content[m.pages[pos // PS]].get(pos % PS) == tuple(toks[:pos + 1])
        if self.hybrid:
            live = [len(self.snap_of[h]) for h in self.kept if toks[:len(self.snap_of[h])] == list(self.snap_of[h])]
            assert m.num_tokens == max(live, default=0)
            if m.num_tokens:
                assert m.snapshot in self.kept and self.snap_of[m.snapshot] == tuple(toks[:m.num_tokens])
        elif not self.evicted_any:
            best = max((next((i for i, (a, b) in enumerate(zip(s, toks)) if a != b), min(len(s), len(toks)))
                        for s in self.inserted), default=0)
            assert m.num_tokens == best

    def new_snapshot(self, prefix):
        h = next(self.handles)
        self.snap_of[h] = tuple(prefix)
        return Snapshot(h, int(self.rng.integers(50, 200)))

    def insert(self, toks, pages):
        snap = self.new_snapshot(toks) if self.hybrid else None
        res = self.tree.insert(toks, pages, snap)
        if snap is not None and res.snapshot_kept:
            self.kept.add(snap.handle)
        if not res.rejected:
            self.inserted.append(tuple(toks))

    def start(self, slot):
        toks = self.tokens()
        m = self.tree.match(toks[:-1])
        self.check_match(toks[:-1], m)
        self.tree.lock(m.node)
        try:
            copies = self.slots.attach(slot, m.pages, m.num_tokens)
        except PagePoolExhausted:
            if not self.tree.evict_for_free_pages(1):
                self.tree.unlock(m.node)
                return
            copies = self.slots.attach(slot, m.pages, m.num_tokens)
        for src, dst in copies:
            self.content[dst] = dict(self.content[src])
        self.in_flight[slot] = (toks, m)

    def finish(self, slot):
        toks, m = self.in_flight.pop(slot)
        n = len(toks) - 1
        try:
            fresh = self.slots.reserve(slot, n)
        except PagePoolExhausted:
            need = -(-n // PS) - len(self.slots.pages(slot))
            if not self.tree.evict_for_free_pages(need):
                self.slots.release(slot)
                self.tree.unlock(m.node)
                return
            fresh = self.slots.reserve(slot, n)
        for page in fresh:  # a recycled page holds nothing valid
            self.content[page] = {}
        pages = self.slots.pages(slot)
        for pos in range(m.num_tokens, n):  # the prefill writes the suffix's latents
            page = pages[pos // PS]
            self.content.setdefault(page, {})[pos % PS] = tuple(toks[:pos + 1])
        for pos in range(n):  # what the slot attends over is intact
            assert self.content[pages[pos // PS]][pos % PS] == tuple(toks[:pos + 1])
        if n > 4 and self.rng.random() < 0.3:  # a snapshot taken part-way through the prefill
            k = int(self.rng.integers(1, n))
            self.insert(toks[:k], pages)
        self.insert(toks[:n], pages)
        self.slots.release(slot)
        self.tree.unlock(m.node)

    def step(self):
        r = self.rng.random()
        free = [s for s in range(3) if s not in self.in_flight]
        if r < 0.45 and free:
            self.start(free[0])
        elif r < 0.9 and self.in_flight:
            self.finish(list(self.in_flight)[self.rng.integers(len(self.in_flight))])
        elif r < 0.95:
            self.evicted_any |= self.tree.evict(int(self.rng.integers(1, 800))) > 0
        elif self.hybrid:
            self.tree.evict_snapshots(1)
        self.kept -= set(self.released)
        self.evicted_any |= self.tree.stats()["evicted_nodes"] > 0
        self.tree.check_consistency()
        held = {p for s in self.in_flight for p in self.slots.pages(s)}
        tree_pages = self.tree.stats()["pages_in_use"]
        assert tree_pages <= self.alloc.num_used <= tree_pages + len(held)  # no page leaks

    def drain(self):
        for slot in list(self.in_flight):
            self.finish(slot)
        self.tree.evict(BIG)
        assert self.alloc.num_used == 0 and self.tree.bytes_in_use == 0
        # Every snapshot handed to the tree was released, exactly once.
        assert len(self.released) == len(set(self.released)) and set(self.released) == set(self.snap_of)


@pytest.mark.parametrize("needs_snapshots", [True, False], ids=["hybrid", "all_mla"])
@pytest.mark.parametrize("budget", [BIG, 2500], ids=["unbounded", "tight"])
def test_random_engine_runs_match_a_brute_force_model(needs_snapshots, budget):
    for seed in range(3):
        sim = Sim(seed, needs_snapshots, budget)
        for _ in range(250):
            sim.step()
            assert sim.tree.bytes_in_use <= budget
        sim.drain()

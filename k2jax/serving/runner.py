"""The compiled half of serving: the model, its slot cache, the jitted prefill / decode steps and their shape
buckets. It knows slots, never requests (k2jax.serving.scheduler.Engine decides who runs where).

A step is the model's one forward path with a cache (`KimiLinear.__call__`, k2jax.model) between a cache read and
a cache write (k2jax.serving.cache). Prefill and decode each run as a read program (compute and sample) and a
write program that takes the cache donated and updates it in place (k2jax.serving.cache explains the split).
Every jitted shape comes from the buckets (`length_buckets`: powers of two, then the context length), so after
`warmup()` no call triggers a compilation.

Grammar-constrained rows: prefill and decode take an optional packed token bitmask (int32 [rows, ceil(vocab / 32)])
and a bool [rows] saying which rows it constrains; it is applied to the logits on the device before sampling
(k2jax.serving.sampling). Both are always inputs of the compiled steps (all-ones / all-False when not given), so
constrained and free requests share a batch and program.

A prefill call takes pieces of at most `piece_len` tokens (the largest length bucket within max_prefill_tokens):
either fresh prompts (or their first pieces), batched, or one piece continuing a slot's sequence.

Memory and per-step work follow the live tokens, not slots x max_len. The MLA latents live in a paged pool
(k2jax.serving.cache, k2jax.serving.page_pool): the runner's `allocator` hands out pages and its `tables` keep each
slot's page list and the int32 page table every step takes. A slot reserves pages as it grows (a prefill piece:
enough for start + piece; a decode step: one more page when it crosses a page boundary) and gives them back when
the engine releases it; slots with a common prefix hold the same pages (k2jax.serving.prefix_store attaches a
cached prefix's pages to a slot). When the pool has too few free pages a step raises `PagePoolExhausted` before
changing anything: making room (evicting cached prefixes, preempting a request) is the engine's policy
(`pages_needed` says how many a step takes). MLA's attention (`pallas_kernels.attention.latent_attention_rows`)
reads each row's own pages up to its own length, skips inactive slots (length 0) and query blocks of padding. So
there are no kv length buckets: one decode program, and one continuing program per piece length
(`continue_lengths`), whatever the context.

The pure functions `prefill_entries` / `prefill` and `decode_entries` / `decode` are those steps without jit and
sampling (tests and benchmarks call them directly).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.layers.qat import int4_experts as has_int4
from k2jax.model import empty_cache, unstack_layers
from k2jax.quantize import quantize_model_experts
from k2jax.serving import cache as kvcache
from k2jax.serving.page_pool import PageAllocator, PagePoolExhausted, PageTables, pages_for
from k2jax.serving.sampling import row_keys, sample
from k2jax.sharding import logical_to_mesh_spec


def length_buckets(max_len: int, min_bucket: int) -> list[int]:
    """Powers of two from min_bucket below max_len, then max_len itself."""
    out, b = [], max(1, min_bucket)
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` (ascending) that holds n."""
    return next(b for b in buckets if b >= n)


def pow2_upto(n: int) -> list[int]:
    """Powers of two below n, then n: the row buckets of a prefill call."""
    return length_buckets(n, 1)


# ---- the steps as pure functions ------------------------------------------------------------------------------------
def _check_prefill(cache, page_table, tokens, lengths, slots):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"prefill: tokens must be int [B, T], got {tokens.dtype}{list(tokens.shape)}")
    B, T = tokens.shape
    for name, a in (("lengths", lengths), ("slots", slots)):
        if a.shape != (B,) or not jnp.issubdtype(a.dtype, jnp.integer):
            raise ValueError(f"prefill: {name} must be int [B={B}], got {a.dtype}{list(a.shape)}")
    _check_table(cache, page_table, "prefill")
    S = cache.lengths.shape[0]
    if cache.pool is not None and T > page_table.shape[1] * cache.pool.shape[2]:
        raise ValueError(f"prefill: prompt bucket T={T} exceeds a slot's {page_table.shape[1]} pages of "
                         f"{cache.pool.shape[2]} tokens")
    if not isinstance(slots, jax.core.Tracer):
        got = [int(s) for s in slots]
        if len(set(got)) != len(got) or not all(0 <= s < S for s in got):
            raise ValueError(f"prefill: slots must be distinct and in [0, num_slots={S}), got {got}")


def _check_table(cache, page_table, op):
    S = cache.lengths.shape[0]
    if page_table.ndim != 2 or page_table.shape[0] != S or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ValueError(f"{op}: page_table must be int [num_slots={S}, max_pages], got "
                         f"{page_table.dtype}{list(page_table.shape)}")


def prefill_entries(model, tokens, lengths, cache=None, page_table=None, slots=None, starts=None):
    """The read half of a prefill: right-padded pieces (tokens int [B, T], row b's tokens in [:lengths[b]]) run
    from empty caches (starts None), or each continuing its slot slots[b] of `cache` (pages page_table int
    [slots, max_pages]) after the starts[b] tokens it holds (a start of 0 is a fresh row).
    Returns (the model's cache updates, rows [B]: a KDAState per KDA layer, MLALatents [B, T, ...] per MLA layer;
    logits float32 [B, vocab] at each row's last token)."""
    B, T = tokens.shape
    lengths = lengths.astype(jnp.int32)
    segment_ids = (jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.int32)
    views = empty_cache(model.config, B) if starts is None else kvcache.slot_views(cache, page_table, slots, starts)
    logits, updates = model(tokens, segment_ids, cache=views, logits_at=jnp.maximum(lengths - 1, 0))
    return updates, logits


def prefill(model, cache: kvcache.DecodeCache, page_table, tokens, lengths, slots, starts=None):
    """Prefill right-padded prompts or pieces into slots: `write_prefill(cache, *prefill_entries(...))` in one
    call.

    page_table: int [slots, max_pages], every slot's pages (those the pieces' positions reach must be there);
    tokens: int [B, T]; lengths: int [B] (0 marks an unused row, whose slot is left unchanged); slots: int [B]
    distinct slots in [0, num_slots); starts: int [B] or None: tokens each slot already holds that its row
    continues (None: fresh rows from empty states, replacing the slots' content).
    Returns (new cache, logits float32 [B, vocab] of each row's last token).
    """
    _check_prefill(cache, page_table, tokens, lengths, slots)
    updates, logits = prefill_entries(model, tokens, lengths, cache, page_table, slots, starts)
    return kvcache.write_prefill(cache, updates, page_table, lengths, slots, starts), logits


def _check_decode(cache, page_table, tokens, active):
    S = cache.lengths.shape[0]
    if tokens.shape != (S,) or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"decode: tokens must be int [slots={S}], got {tokens.dtype}{list(tokens.shape)}")
    if active.shape != (S,) or active.dtype != jnp.bool_:
        raise ValueError(f"decode: active must be bool [slots={S}], got {active.dtype}{list(active.shape)}")
    _check_table(cache, page_table, "decode")


def decode_entries(model, cache: kvcache.DecodeCache, page_table, tokens, *, active=None):
    """The read half of a decode step: token tokens[s] at position lengths[s] of each slot attends over the
    slot's cached entries (its pages, page_table int [slots, max_pages]) and itself. active: bool [slots] or None
    (all); inactive slots read no cached entries (their rows are meaningless). Returns (the model's cache
    updates, rows = slots; logits float32 [slots, vocab])."""
    logits, updates = model(tokens[:, None], cache=kvcache.decode_views(cache, page_table, active))
    return updates, logits[:, 0]


def decode(model, cache: kvcache.DecodeCache, page_table, tokens, active):
    """One decode step for every slot: `write_decode(cache, decode_entries(...), page_table, active)` in one call.

    page_table: int [slots, max_pages] (an active slot's position lengths[s] must have its page); tokens: int
    [slots]; active: bool [slots] (inactive slots keep their cache and length; their logits are meaningless).
    MLA reads each slot only up to its length, so the cost follows the live context with one program.
    Returns (new cache, logits float32 [slots, vocab]).
    """
    _check_decode(cache, page_table, tokens, active)
    updates, logits = decode_entries(model, cache, page_table, tokens, active=active)
    return kvcache.write_decode(cache, updates, page_table, active), logits


# ---- the runner ---------------------------------------------------------------------------------------------------
class ModelRunner:
    """The model side of serving: parameters, the slot cache and the jitted, bucketed steps.

    model: a KimiLinear (already placed on `mesh` if one is given; a scanned one is unstacked); num_slots:
    sequences the cache holds; max_len: context per slot; min_bucket: smallest prompt / kv length bucket;
    max_prefill_batch: most rows of one prefill call (default num_slots); max_prefill_tokens: rows x length
    bucket limit of one prefill call, and so the longest piece (`piece_len`); vocab_limit: ids [vocab_limit,
    vocab) are never sampled (default: none masked); int4_experts: serve the routed experts packed as INT4 (k2jax.quantize.quantize_model_experts; a model
    whose config already says so is used as is); mesh: a k2jax.sharding mesh: the steps run under
    `jax.set_mesh(mesh)`, so an 'expert' axis > 1 runs the MoE expert parallel, 'tensor' splits heads, and the
    cache's slots are sharded over the batch axes and its KDA heads over 'tensor'; resume_anywhere: continuing
    pieces may start at any length and are padded to their own length bucket (a prefix cache needs this: see
    `continue_lengths`); page_size: tokens per page of the MLA latent pool; num_pages: pages in the pool (default
    num_slots x ceil(max_len / page_size): every slot full at once, nothing shared).

    State: `cache` (DecodeCache, the pool included), `lengths` (host int32 [num_slots], tokens cached per slot),
    `allocator` (PageAllocator of the pool) and `tables` (PageTables: each slot's pages and the page table),
    `compile_count` (programs traced so far), `cache_sharding` (the cache's shardings on the mesh, None without
    one). `piece_len`: the most tokens one prefill call takes per prompt.
    """

    def __init__(self, model, *, num_slots: int, max_len: int, min_bucket: int = 16,
                 max_prefill_batch: int | None = None, max_prefill_tokens: int = 8192, vocab_limit: int | None = None,
                 int4_experts: bool = False, mesh=None, resume_anywhere: bool = False, page_size: int = 16,
                 num_pages: int | None = None):
        cfg = model.config
        if num_slots < 1 or max_len < 2:
            raise ValueError(f"ModelRunner: num_slots must be >= 1 and max_len >= 2, got {num_slots}, {max_len}")
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"ModelRunner: max_len={max_len} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        if model.config.scan_layers:
            model = unstack_layers(model)  # the cache is per layer: a scanned model would stack it every step
        if int4_experts and not has_int4(model.config):
            model = quantize_model_experts(model)  # a new model: the caller's float experts are not kept here
        self.config, self.mesh = model.config, mesh
        self.num_slots, self.max_len = num_slots, max_len
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"ModelRunner: page_size={page_size!r} must be a positive integer")
        self.page_size, self.max_pages = page_size, pages_for(max_len, page_size)
        self.num_pages = num_slots * self.max_pages if num_pages is None else num_pages
        if self.num_pages < self.max_pages:
            raise ValueError(f"ModelRunner: num_pages={self.num_pages} cannot hold one full sequence "
                             f"(max_len={max_len} needs {self.max_pages} pages of {page_size} tokens)")
        self.allocator = PageAllocator(self.num_pages, page_size)
        self.tables = PageTables(self.allocator, num_slots, max_len)
        self.buckets = length_buckets(max_len, min_bucket)
        self.max_prefill_batch = max(1, min(max_prefill_batch or num_slots, num_slots))
        self.max_prefill_tokens = max(max_prefill_tokens, self.buckets[0])
        self.piece_len = max(b for b in self.buckets if b <= self.max_prefill_tokens)
        # A prefix cache resumes slots at any length and continues them by short suffixes: continuing pieces are
        # then padded to their own length bucket (not piece_len) and may start at any length.
        self.resume_anywhere = resume_anywhere
        V = self.config.vocab_size
        self.vocab_limit = V if vocab_limit is None else min(V, int(vocab_limit))
        self.mask_words = (V + 31) // 32  # width of a row's packed grammar bitmask
        self.graphdef, self.params = nnx.split(model)
        # The jitted steps take the parameters as a flat list: flattening an nnx.State on every call costs
        # about as much as a small model's whole decode step.
        self._param_leaves, self._param_def = jax.tree.flatten(self.params)
        self.cache_sharding = self._cache_shardings()
        self.cache = self._new_cache()
        self.lengths = np.zeros(num_slots, np.int32)
        self.compile_count = 0
        (self._prefill_jit, self._continue_jit, self._write_prefill_jit, self._decode_jit,
         self._write_decode_jit) = self._build_steps()

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _cache_shardings(self):
        if self.mesh is None:
            return None
        abstract = jax.eval_shape(self._empty_cache)
        leaves, treedef = jax.tree.flatten(abstract)
        names = treedef.flatten_up_to(kvcache.cache_logical_names(abstract))
        return treedef.unflatten([jax.sharding.NamedSharding(self.mesh, logical_to_mesh_spec(n, self.mesh, a.shape))
                                  for n, a in zip(names, leaves)])

    def _empty_cache(self):
        return kvcache.init_cache(self.config, self.num_slots, self.max_len, page_size=self.page_size,
                                  num_pages=self.num_pages)

    def _new_cache(self):
        if self.cache_sharding is None:
            return self._empty_cache()
        return jax.jit(self._empty_cache, out_shardings=self.cache_sharding)()

    def _run(self, step, *args, **kwargs):
        """Call a jitted step (under the mesh, when there is one: tracing sees it, so MoE goes expert parallel)."""
        if self.mesh is None:
            return step(*args, **kwargs)
        with jax.set_mesh(self.mesh):
            return step(*args, **kwargs)

    def _build_steps(self):
        """Jitted (prefill, continue, write_prefill, decode, write_decode): the reads sample too, the writes
        donate the cache (see k2jax.serving.cache on why each step is two programs)."""
        graphdef, param_def = self.graphdef, self._param_def
        # A static bound fixed per runner: no recompiles per request, and no mask at all when it is the full vocab.
        limit = self.vocab_limit if self.vocab_limit < self.config.vocab_size else None

        def model_of(params):
            self.compile_count += 1  # runs only while tracing
            return nnx.merge(graphdef, jax.tree.unflatten(param_def, params))

        def prefill_fn(params, tokens, lengths, temp, top_k, top_p, seeds, bitmask, constrained):
            updates, logits = prefill_entries(model_of(params), tokens, lengths)
            return updates, sample(logits, temp, top_k, top_p, row_keys(seeds, jnp.zeros_like(lengths)),
                                   vocab_limit=limit, bitmask=bitmask, constrained=constrained)

        def continue_fn(params, cache, page_table, tokens, lengths, slots, starts, temp, top_k, top_p, seeds, bitmask,
                        constrained):
            updates, logits = prefill_entries(model_of(params), tokens, lengths, cache, page_table, slots, starts)
            return updates, sample(logits, temp, top_k, top_p, row_keys(seeds, jnp.zeros_like(lengths)),
                                   vocab_limit=limit, bitmask=bitmask, constrained=constrained)

        def decode_fn(params, cache, page_table, tokens, active, temp, top_k, top_p, seeds, counters, all_greedy,
                      bitmask, constrained):
            updates, logits = decode_entries(model_of(params), cache, page_table, tokens, active=active)
            return updates, sample(logits, temp, top_k, top_p, row_keys(seeds, counters), all_greedy=all_greedy,
                                   vocab_limit=limit, bitmask=bitmask, constrained=constrained)

        def write_prefill_fn(cache, updates, page_table, lengths, slots, starts):
            self.compile_count += 1
            return kvcache.write_prefill(cache, updates, page_table, lengths, slots, starts)

        def write_decode_fn(cache, updates, page_table, active):
            self.compile_count += 1
            return kvcache.write_decode(cache, updates, page_table, active)

        kw = {} if self.cache_sharding is None else {"out_shardings": self.cache_sharding}
        return (jax.jit(prefill_fn), jax.jit(continue_fn), jax.jit(write_prefill_fn, donate_argnums=(0,), **kw),
                jax.jit(decode_fn), jax.jit(write_decode_fn, donate_argnums=(0,), **kw))

    # ---- shapes ---------------------------------------------------------------------------------------------
    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) bucket pair a prefill call of fresh prompts can use."""
        rows = pow2_upto(self.max_prefill_batch)
        return [(r, T) for T in self.buckets if T <= self.piece_len for r in rows
                if r == 1 or r * T <= self.max_prefill_tokens]

    def continue_lengths(self) -> list[int]:
        """The token buckets a continuing piece is padded to: piece_len, or with `resume_anywhere` every length
        bucket up to it (a 128-token suffix then costs a 128-token prefill)."""
        return [b for b in self.buckets if b <= self.piece_len] if self.resume_anywhere else [self.piece_len]

    def prefill_fits(self, prompt_lengths: Sequence[int]) -> bool:
        """Whether one prefill call takes fresh pieces of these lengths (each at most piece_len) together (rows
        and the row x length bucket within the limits). A single piece always fits."""
        if len(prompt_lengths) <= 1:
            return True
        rows = bucket(len(prompt_lengths), pow2_upto(self.max_prefill_batch)) \
            if len(prompt_lengths) <= self.max_prefill_batch else None
        return rows is not None and rows * bucket(max(prompt_lengths), self.buckets) <= self.max_prefill_tokens

    # ---- pages ----------------------------------------------------------------------------------------------
    def pages_to_hold(self, slot: int, num_tokens: int) -> int:
        """Fresh pages `slot` needs to hold its first num_tokens tokens (0 when it has them)."""
        return max(0, pages_for(num_tokens, self.page_size) - len(self.tables.pages(slot)))

    def pages_needed(self, *, prefill: Sequence[tuple[int, int, int]] = (), decode=None) -> int:
        """Fresh pages a step takes: prefill = (slot, start, piece length) per row (start 0: a fresh piece, whose
        slot's old pages are released first), decode = bool [slots] of the decoding slots (one more token each)."""
        need = 0
        for slot, start, n in prefill:
            need += pages_for(n, self.page_size) if start == 0 else self.pages_to_hold(slot, start + n)
        if decode is not None:
            need += sum(self.pages_to_hold(s, int(self.lengths[s]) + 1) for s in np.flatnonzero(decode))
        return need

    def release(self, slot: int) -> list[int]:
        """End `slot`'s sequence: drop its page references (pages the prefix cache also holds stay) and its
        length. Returns the pages that became free."""
        freed = self.tables.release(slot)
        self.lengths[slot] = 0
        return freed

    def _reserve(self, rows: Sequence[tuple[int, int]]) -> None:
        """Give each (slot, end) its pages for positions [0, end), all or nothing (PagePoolExhausted)."""
        need = sum(self.pages_to_hold(s, end) for s, end in rows)
        if need > self.allocator.num_free:
            raise PagePoolExhausted(f"the step needs {need} fresh pages of {self.page_size} tokens and the pool has "
                                    f"{self.allocator.num_free} free of {self.num_pages}")
        for s, end in rows:
            self.tables.reserve(s, end)

    def warmup(self) -> float:
        """Compile every prefill and decode shape now (so serving never compiles); returns the seconds taken.
        Leaves the cache empty."""
        t0 = time.perf_counter()
        S = self.num_slots
        for r, T in self.prefill_shapes():
            z = np.zeros(r, np.int32)
            self._prefill_rows(np.zeros((r, T), np.int32), z, np.arange(r, dtype=np.int32), np.zeros(r, np.float32),
                               z, np.ones(r, np.float32), np.zeros(r, np.uint32), *self._masks(r, None, None))
        z = np.zeros(1, np.int32)
        for T in self.continue_lengths():  # a length-0 row changes nothing
            self._continue_row(np.zeros((1, T), np.int32), z, z, z, np.zeros(1, np.float32), z,
                               np.ones(1, np.float32), np.zeros(1, np.uint32), *self._masks(1, None, None))
        zeros = np.zeros(S, np.int32)
        self._decode_all(zeros, np.zeros(S, bool), zeros, np.zeros(S, np.float32), zeros, np.ones(S, np.float32),
                         np.zeros(S, np.uint32), *self._masks(S, None, None))
        jax.block_until_ready(self.cache)
        return time.perf_counter() - t0

    # ---- steps ----------------------------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int], temperature, top_k, top_p, seeds,
                bitmask=None, constrained=None, *, start: int = 0):
        """Prefill prompts or pieces of them (token id lists of at most piece_len tokens) into the given distinct
        slots and sample each one's next token. start 0: fresh pieces (at most max_prefill_batch, fitting
        `prefill_fits`) replace what their slots held; start > 0: one piece continuing its slot, which holds
        exactly `start` tokens of the sequence. temperature, top_k, top_p, seeds: per prompt (numpy float32 /
        int32 / float32 / uint32); bitmask / constrained: optional grammar masks per prompt (int32 [n, mask_words],
        bool [n]). The slots take the pages their pieces reach first (a fresh piece's slot gives back what it held);
        PagePoolExhausted, with nothing changed, when the pool lacks them. Returns the SampleOutput on the host
        (row i for prompt i)."""
        n = len(prompts)
        too_long = [len(p) for p in prompts if not 1 <= len(p) <= self.piece_len]
        if too_long:
            raise ValueError(f"ModelRunner.prefill: pieces hold 1 to piece_len={self.piece_len} tokens, got "
                             f"{too_long[0]}")
        if start:
            if n != 1 or self.lengths[slots[0]] != start or start + len(prompts[0]) > self.max_len:
                raise ValueError(f"ModelRunner.prefill: a continuing piece comes alone, its slot holds exactly "
                                 f"start={start} tokens (slot {slots[0]} holds {self.lengths[slots[0]]}) and it ends "
                                 f"within max_len={self.max_len}; got {n} piece(s) of {len(prompts[0])} tokens")
            self._reserve([(slots[0], start + len(prompts[0]))])
            tokens = np.zeros((1, bucket(len(prompts[0]), self.continue_lengths())), np.int32)
            tokens[0, :len(prompts[0])] = prompts[0]
            return self._continue_row(tokens, np.array([len(prompts[0])], np.int32), np.array(slots, np.int32),
                                      np.array([start], np.int32),
                                      *(np.asarray(a, d) for a, d in ((temperature, np.float32), (top_k, np.int32),
                                                                       (top_p, np.float32), (seeds, np.uint32))),
                                      *self._masks(1, bitmask, constrained))
        need = self.pages_needed(prefill=[(s, 0, len(p)) for s, p in zip(slots, prompts)])
        if need > self.allocator.num_free:  # checked before releasing anything: all or nothing
            raise PagePoolExhausted(f"the prefill needs {need} fresh pages of {self.page_size} tokens and the pool "
                                    f"has {self.allocator.num_free} free of {self.num_pages}")
        for s in slots:  # a fresh piece replaces what its slot held (the engine normally released it already)
            self.release(s)
        self._reserve([(s, len(p)) for s, p in zip(slots, prompts)])
        r = bucket(n, pow2_upto(self.max_prefill_batch))
        T = bucket(max(len(p) for p in prompts), self.buckets)
        tokens, lengths = np.zeros((r, T), np.int32), np.zeros(r, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)], lengths[i] = p, len(p)
        # Padding rows (length 0, left unchanged) need distinct slots too: any the real rows do not use.
        spare = [s for s in range(self.num_slots) if s not in slots]
        row_slots = np.array(list(slots) + spare[:r - n], np.int32)

        def pad(a, fill, dtype):
            return np.concatenate([np.asarray(a, dtype), np.full(r - n, fill, dtype)])

        masks, rows = self._masks(n, bitmask, constrained)
        return self._prefill_rows(tokens, lengths, row_slots, pad(temperature, 0, np.float32), pad(top_k, 0, np.int32),
                                  pad(top_p, 1, np.float32), pad(seeds, 0, np.uint32),
                                  np.concatenate([masks, np.full((r - n, self.mask_words), -1, np.int32)]),
                                  pad(rows, False, bool))

    def _masks(self, n: int, bitmask, constrained) -> tuple[np.ndarray, np.ndarray]:
        """(int32 [n, mask_words], bool [n]) grammar masks of n rows: all-ones / unconstrained when not given."""
        if bitmask is None and constrained is None:
            return np.full((n, self.mask_words), -1, np.int32), np.zeros(n, bool)
        bitmask, constrained = np.asarray(bitmask), np.asarray(constrained)
        if bitmask.shape != (n, self.mask_words) or bitmask.dtype != np.int32 or constrained.shape != (n,):
            raise ValueError(f"grammar masks must be int32 [{n}, {self.mask_words}] with a bool [{n}], got "
                             f"{bitmask.dtype}{list(bitmask.shape)} and {list(constrained.shape)}")
        return bitmask, constrained.astype(bool)

    def _prefill_rows(self, tokens, lengths, slots, temp, top_k, top_p, seeds, bitmask, constrained):
        updates, out = self._run(self._prefill_jit, self._param_leaves, tokens, lengths, temp, top_k, top_p, seeds,
                                 bitmask, constrained)
        self.cache = self._run(self._write_prefill_jit, self.cache, updates, self.tables.table.copy(), lengths, slots,
                               np.zeros_like(lengths))
        used = lengths > 0
        self.lengths[slots[used]] = lengths[used]
        return jax.device_get(out)

    def _continue_row(self, tokens, lengths, slots, starts, temp, top_k, top_p, seeds, bitmask, constrained):
        table = self.tables.table.copy()  # the host table may change while the call runs asynchronously
        updates, out = self._run(self._continue_jit, self._param_leaves, self.cache, table, tokens, lengths, slots,
                                 starts, temp, top_k, top_p, seeds, bitmask, constrained)
        self.cache = self._run(self._write_prefill_jit, self.cache, updates, table, lengths, slots, starts)
        used = lengths > 0
        self.lengths[slots[used]] = (starts + lengths)[used]
        return jax.device_get(out)

    def decode(self, tokens, active, counters, temperature, top_k, top_p, seeds, bitmask=None, constrained=None):
        """One decode step over all slots: slot s takes tokens[s] (its last token) where active[s]; inactive slots
        are unchanged. counters: int32 [slots] tokens each slot has generated (the sampling key's counter);
        temperature, top_k, top_p, seeds: per slot; bitmask / constrained: optional grammar masks per slot (int32
        [slots, mask_words], bool [slots]). Each active slot attends over its own cached tokens only; one crossing
        a page boundary takes a page first (PagePoolExhausted, nothing changed, when the pool has too few).
        Returns the SampleOutput on the host (row s for slot s)."""
        return self._decode_all(tokens, active, counters, temperature, top_k, top_p, seeds,
                                *self._masks(self.num_slots, bitmask, constrained))

    def _decode_all(self, tokens, active, counters, temp, top_k, top_p, seeds, bitmask, constrained):
        all_greedy = np.bool_((np.asarray(temp)[active] == 0).all())
        active = np.asarray(active, bool)
        self._reserve([(s, int(self.lengths[s]) + 1) for s in np.flatnonzero(active)])
        table = self.tables.table.copy()
        updates, out = self._run(self._decode_jit, self._param_leaves, self.cache, table, np.asarray(tokens, np.int32),
                                 np.asarray(active, bool), temp, top_k, top_p, seeds, counters, all_greedy, bitmask,
                                 constrained)
        self.cache = self._run(self._write_decode_jit, self.cache, updates, table, active)
        self.lengths += np.asarray(active, np.int32)
        return jax.device_get(out)

    # ---- failures -------------------------------------------------------------------------------------------
    def recover(self) -> bool:
        """After a failed call: if it consumed the donated cache, replace it with an empty one and return True
        (every slot's sequence is gone); an intact cache is kept (False)."""
        if not any(leaf.is_deleted() for leaf in jax.tree.leaves(self.cache)):
            return False
        self.reset()
        return True

    def reset(self) -> None:
        """Forget every slot's sequence: a fresh, empty cache, every slot's pages released (pages the prefix
        cache holds stay allocated: its owner must drop them, their latents are gone)."""
        for s in range(self.num_slots):
            self.release(s)
        self.cache = self._new_cache()

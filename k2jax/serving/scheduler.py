"""Serving engine: a fixed set of sequence slots, continuous batching, requests and stop handling.

`Engine` is the scheduler: it owns requests, slots, the waiting queue and the stop rules, and drives a
`k2jax.serving.runner.ModelRunner` (the model, its slot cache and the compiled, bucketed steps; it knows nothing
of requests, while the engine knows nothing of jit, buckets or cache arrays). Each `step()`:
1. admits waiting requests into free slots: the runner prefills a group of their prompts in one call that also
   samples their first token (the runner says which prompts fit one call);
2. continues one prompt longer than the runner's `piece_len` (max_prefill_tokens): such a prompt is admitted with
   its first piece and prefilled one piece per later step, each continuing the slot's cache, until its last
   piece samples its first token; the slots already decoding keep decoding in between (prompts waiting for
   their pieces go first come, first served);
3. runs one decode step for all decoding slots (the others are left unchanged);
4. applies stop rules (EOS / stop token ids, stop strings, max_tokens) and frees finished slots.
A request's failure stays its own: admission builds the whole prefill batch before it takes any slot, a failing
prefill call fails only the requests it admits, a failing decode call only the requests it decodes, and an error
in one request's bookkeeping (a decode, a callback) only that request. Every submitted request reaches a finished
state: if the engine thread itself dies, `error` says why, every pending request finishes with it and `submit`
raises `EngineStoppedError`.
Ids the tokenizer cannot decode (a model vocabulary padded beyond the tokenizer's) are never sampled (the runner's
`vocab_limit`). A freed slot is reused by the next admission, which overwrites its whole state. After
`warmup()` no request triggers a compilation (`runner.compile_count` stays put).

Memory. The MLA latents of every live sequence and of every cached prefix live in one paged pool (the runner's;
`kv_cache_bytes` for the sequences plus the prefix cache's share), so a sequence holds the pages of its own tokens
and sessions on one prefix hold its pages once (`pool_stats()`). Admission takes free pages only (evicting unused
cached prefixes, least recently used first): a request whose first piece does not fit waits at the front of the
queue. A slot that grows (a prefill piece, a decode step crossing a page boundary) into a full pool evicts cached
prefixes, then preempts the most recently admitted request (vLLM's recompute preemption, chosen over reserving
prompt + max_tokens at admission, which would hold the whole context of every request that leaves max_tokens
open and make memory follow slots x max_len again): its slot and pages go back, it is requeued at the front and
later prefills its prompt and the tokens it generated so far but the last, then decodes on with the same
sampling counters, so its greedy and seeded output is the one it would have produced, and no token is streamed
twice. A request alone always fits (the pool holds at least one max_len context), so nobody's growth fails or
corrupts another request, and a request that can never fit (prompt + max_tokens > max_len) is refused at
submission.

Grammar-constrained requests (`submit(..., grammar=...)`, a Lark grammar from k2jax.chat.grammar, e.g. a tool call
whose arguments follow the tool's JSON schema): the request holds a GrammarMatcher; before each prefill / decode
call the engine packs the masks of the constrained rows of that call into one [rows, ceil(vocab / 32)] int32
bitmask, which the runner applies to the logits on the device before sampling (free rows are left bit for bit
as they are, so constrained and free requests share a batch). Each sampled token advances the matcher; the
request ends ('stop') once the grammar has accepted a stop token, and a token the grammar rejects fails that
request only.

Thread use: `submit()` may be called from any thread; `start()` runs `step()` in a background thread (the HTTP
server does this), `generate()` drives the steps itself when no thread runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from typing import Callable, Sequence

import numpy as np

from k2jax.chat.grammar import BatchBitmask, GrammarMatcher, GrammarTokenizer
from k2jax.serving.page_pool import num_mla_layers, page_bytes, pages_for
from k2jax.serving.prefix_store import PrefixStore, pool_pages_for
from k2jax.serving.runner import ModelRunner
from k2jax.serving.sampling import MAX_TOP_LOGPROBS
from k2jax.tokenizer import IM_END

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 256


class EngineStoppedError(RuntimeError):
    """The engine's thread has died (see `Engine.error`): it accepts no more requests."""


# ---- requests ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SamplingParams:
    """Per-request generation settings. max_tokens None means "up to the context limit"; temperature 0 is greedy;
    top_k 0 and top_p 1 are off (a top_k above the vocabulary keeps every id); seed None draws one, any integer is
    reduced mod 2**32; logprobs None is off, n >= 0 also returns the n most likely alternatives (n <= 5); stop
    strings (at most 16) end the text before them; stop_token_ids (at most 256) end it after them; ignore_eos
    keeps going past EOS."""

    max_tokens: int | None = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def validate(self) -> None:
        """ValueError naming the first invalid field."""
        def bad(field, allowed):
            shown = repr(getattr(self, field))
            raise ValueError(f"{field}={shown[:100] + '...' if len(shown) > 100 else shown} is invalid: {allowed}")

        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

        def is_number(x):
            return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))

        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be a positive integer")
        # Comparisons are False for NaN, so NaN fails each range check.
        if not is_number(self.temperature) or not 0 <= self.temperature <= 100:
            bad("temperature", "must be a number in [0, 100]")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be a non-negative integer (0 = off)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be a number in (0, 1]")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer")
        if (isinstance(self.stop, str) or not isinstance(self.stop, Sequence) or len(self.stop) > MAX_STOP_STRINGS
                or any(not isinstance(s, str) or not s for s in self.stop)):
            bad("stop", f"must be a list of at most {MAX_STOP_STRINGS} non-empty strings")
        if (not isinstance(self.stop_token_ids, Sequence) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS
                or any(not is_int(t) or t < 0 for t in self.stop_token_ids)):
            bad("stop_token_ids", f"must be a list of at most {MAX_STOP_TOKEN_IDS} non-negative token ids")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}] or null")


@dataclasses.dataclass
class TokenLogprob:
    """Log-probability of one generated token and, if asked, of the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Event:
    """What a request produced in one engine step: new token ids, the new text (stop-safe), their logprobs, and
    whether it finished (finish_reason 'stop', 'length', 'abort' or 'error'; error holds the message)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass
class Completion:
    """A finished request: its prompt and generated ids, text (stop string excluded), finish reason, logprobs
    (if asked), and time to first token / total time in seconds from submission."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None
    ttft_s: float
    total_s: float
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens resumed from the prefix cache (not prefilled)


class Request:
    """Engine-side state of one request (create through `Engine.submit`). max_tokens, top_k, seed and stop_ids
    are the effective values the engine uses (validated, clamped, the EOS ids added unless ignore_eos)."""

    def __init__(self, request_id, prompt_ids, params: SamplingParams, *, max_tokens: int, top_k: int, seed: int,
                 stop_ids: frozenset[int], callback, grammar: GrammarMatcher | None = None):
        self.id, self.prompt_ids, self.params = request_id, list(prompt_ids), params
        self.grammar = grammar  # None: free decoding
        self.max_tokens, self.top_k, self.seed, self.stop_ids = max_tokens, top_k, seed, stop_ids
        self.callback = callback
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text, self.sent = "", 0  # text so far (stop-trimmed at the end) and how much of it was emitted
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.slot: int | None = None
        # What the slot must hold before decoding: the prompt, or after a preemption the prompt and the tokens
        # generated so far but the last (which the next decode step feeds, as it would have).
        self.prefill_ids: list[int] = self.prompt_ids
        self.prefilled = 0  # tokens of prefill_ids in the slot's cache so far
        self.admitted = -1  # admission order (the most recently admitted request is preempted first)
        self.cached_tokens = 0  # of those, tokens loaded from the prefix cache
        self.cuts: list[int] = []  # prompt lengths where a prefill piece ends and the prefix cache takes a snapshot
        self.aborted = False
        self.t_submit, self.t_first, self.t_done = time.perf_counter(), None, None
        self._done = threading.Event()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        """Holding a slot with the whole prompt (prefill_ids) prefilled."""
        return self.slot is not None and self.prefilled == len(self.prefill_ids)

    def wait(self, timeout: float | None = None) -> Completion:
        """Block until finished and return the Completion (TimeoutError after `timeout` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self.completion()

    def completion(self) -> Completion:
        t_first = self.t_first if self.t_first is not None else self.t_done
        return Completion(self.id, self.prompt_ids, self.token_ids, self.text, self.finish_reason or "",
                          self.logprobs if self.params.logprobs is not None else None,
                          (t_first or 0) - self.t_submit, (self.t_done or 0) - self.t_submit, self.error,
                          self.cached_tokens)


# ---- engine -----------------------------------------------------------------------------------------------------
class Engine:
    """Continuous-batching generation over a KimiLinear.

    model: a KimiLinear (already placed on `mesh` if one is given); tokenizer: optional (needed for text and stop
    strings); num_slots: concurrent sequences; max_len: context per slot (prompt + generated), default
    min(max_position_embeddings, 2048); min_bucket: smallest prompt / kv length bucket; max_prefill_batch: most prompts
    prefilled in one call (default num_slots); max_prefill_tokens: rows x bucket limit of one prefill call, so also
    the longest piece a long prompt is prefilled in (one piece per step, between decode steps);
    eos_token_ids: default [config.eos_token_id] (+ the tokenizer's eos); int4_experts: serve the routed experts packed
    as INT4; mesh: a `k2jax.sharding.make_mesh` mesh the parameters are placed on (see `ModelRunner` for these);
    kv_cache_bytes: device bytes of the paged MLA latent pool for the live slots (None: num_slots x max_len
    tokens, every slot full at once; less makes memory follow the tokens in use, and a slot that grows into a
    full pool preempts the most recently admitted request, see below); prefix_cache_bytes: device bytes the
    prefix cache may hold beyond that (its pages and KDA snapshots; 0: off; see k2jax.serving.prefix_store);
    prefix_page_size: tokens per page of the pool; snapshot_every: a prompt's prefill also stops to cache its
    prefix every this many tokens (so a long shared system prompt hits while requests continue behind it).

    runner: the ModelRunner; vocab_limit: ids the engine may generate are [0, vocab_limit) = [0, min(model vocab,
    tokenizer.vocab_size)) (the model vocab without a tokenizer); error: None, or why the engine thread died.
    """

    def __init__(self, model, tokenizer=None, *, num_slots: int = 8, max_len: int | None = None,
                 min_bucket: int = 16, max_prefill_batch: int | None = None, max_prefill_tokens: int = 8192,
                 eos_token_ids: Sequence[int] | None = None, int4_experts: bool = False, mesh=None,
                 kv_cache_bytes: int | None = None, prefix_cache_bytes: int = 0, prefix_page_size: int = 16,
                 snapshot_every: int = 1024):
        cfg = model.config
        if prefix_cache_bytes < 0 or snapshot_every < 1:
            raise ValueError(f"Engine: prefix_cache_bytes={prefix_cache_bytes} must be >= 0 (0 = off) and "
                             f"snapshot_every={snapshot_every} >= 1")
        use_prefix = prefix_cache_bytes > 0 and any(kind == "mla" for kind in cfg.layer_types)
        if prefix_cache_bytes > 0 and not use_prefix:
            log.warning("the prefix cache is off: it stores MLA latents and this model has no MLA layer")
        self.tokenizer = tokenizer
        max_len = min(cfg.max_position_embeddings, 2048) if max_len is None else max_len
        # Ids in [0, tokenizer.vocab_size) decode (byte, tiktoken and HF tokenizers alike); a model vocabulary
        # padded beyond them must never produce the rest.
        self.vocab_limit = cfg.vocab_size if tokenizer is None else min(cfg.vocab_size, int(tokenizer.vocab_size))
        if isinstance(prefix_page_size, bool) or not isinstance(prefix_page_size, int) or prefix_page_size < 1:
            raise ValueError(f"Engine: prefix_page_size={prefix_page_size!r} must be a positive integer")
        max_pages = pages_for(max_len, prefix_page_size)
        kv_pages = num_slots * max_pages
        if kv_cache_bytes is not None and num_mla_layers(cfg):
            kv_pages = int(kv_cache_bytes) // page_bytes(cfg, prefix_page_size)
            if kv_pages < max_pages:
                raise ValueError(f"Engine: kv_cache_bytes={kv_cache_bytes} holds {kv_pages * prefix_page_size} "
                                 f"tokens, less than one context of max_len={max_len} "
                                 f"({max_pages * page_bytes(cfg, prefix_page_size)} bytes): raise it or lower "
                                 f"max_len")
        extra = pool_pages_for(cfg, prefix_cache_bytes, num_slots, prefix_page_size) if use_prefix else 0
        self.runner = ModelRunner(model, num_slots=num_slots, max_len=max_len, min_bucket=min_bucket,
                                  max_prefill_batch=max_prefill_batch, max_prefill_tokens=max_prefill_tokens,
                                  vocab_limit=self.vocab_limit, int4_experts=int4_experts, mesh=mesh,
                                  resume_anywhere=use_prefix, page_size=prefix_page_size,
                                  num_pages=kv_pages + extra)
        self.prefix = PrefixStore(self.runner, prefix_cache_bytes) if use_prefix else None
        self._admissions = itertools.count()
        self.snapshot_every = snapshot_every
        self._prefix_logged = time.monotonic()
        self.num_slots, self.max_len = num_slots, max_len
        eos = set(eos_token_ids if eos_token_ids is not None else [cfg.eos_token_id])
        if eos_token_ids is None and tokenizer is not None and tokenizer.eos_id is not None:
            eos.add(tokenizer.eos_id)
        self.eos_token_ids = frozenset(int(e) for e in eos if e is not None)
        # Per-slot sampling settings and last token, handed to every decode step.
        S = num_slots
        self.slots: list[Request | None] = [None] * S
        self._temp = np.zeros(S, np.float32)
        self._top_k = np.zeros(S, np.int32)
        self._top_p = np.ones(S, np.float32)
        self._seed = np.zeros(S, np.uint32)
        self._last = np.zeros(S, np.int32)
        self.waiting: deque[Request] = deque()
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._cv = threading.Condition()  # guards _stop, error, _unfinished and the hand-over through _incoming
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: str | None = None
        self._unfinished = 0
        self._grammar_tokenizer: GrammarTokenizer | None = None
        self._grammar_lock = threading.Lock()
        self._prefill_masks: BatchBitmask | None = None  # made with the first constrained request
        self._decode_masks: BatchBitmask | None = None
        self.stats = {"prefill_calls": 0, "prefill_tokens": 0, "decode_steps": 0, "decode_tokens": 0,
                      "decode_s": 0.0, "prefill_s": 0.0, "preempted": 0, "finished": {}}

    @property
    def config(self):
        """The served model's config (as the runner holds it: with INT4 experts if it quantized them)."""
        return self.runner.config

    @property
    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The tokenizer bridged for constrained decoding (built on first use, about a second at Kimi's vocabulary;
        thread-safe). A completed grammar allows only the engine's EOS ids and `<|im_end|>` (if the tokenizer
        has it). ValueError without a tokenizer."""
        if self.tokenizer is None:
            raise ValueError("grammar-constrained decoding needs a tokenizer")
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                stops = set(self.eos_token_ids)
                if IM_END in self.tokenizer.specials:
                    stops.add(self.tokenizer.special_id(IM_END))
                self._grammar_tokenizer = GrammarTokenizer(self.tokenizer, self.config.vocab_size,
                                                           sorted(t for t in stops if t < self.config.vocab_size))
            return self._grammar_tokenizer

    def warmup(self) -> float:
        """Compile every shape the runner (and the prefix cache) can use now (so serving never compiles); returns
        the seconds taken."""
        t0 = time.perf_counter()
        self.runner.warmup()
        if self.prefix is not None:
            self.prefix.warmup()
        return time.perf_counter() - t0

    def prefix_stats(self) -> dict | None:
        """The prefix cache's counters and sizes (k2jax.serving.prefix_store.PrefixStore.stats), None when off
        (thread-safe)."""
        return None if self.prefix is None else self.prefix.stats()

    def pool_stats(self) -> dict:
        """The paged latent pool: page_size, page_bytes, pages_total, pages_free, pages_slots (distinct pages the
        live slots hold), pages_tree (distinct pages the prefix cache holds), pages_shared (held by both, or by
        more than one slot: stored once, used many times), bytes_total / bytes_in_use, and preempted (requests
        preempted so far to make room)."""
        r = self.runner
        held: dict[int, int] = {}
        for s in range(self.num_slots):
            for p in r.tables.pages(s):
                held[p] = held.get(p, 0) + 1
        tree = self.prefix.tree_pages() if self.prefix is not None else set()
        pb = page_bytes(self.config, r.page_size) if num_mla_layers(self.config) else 0
        used = r.num_pages - r.allocator.num_free
        return {"page_size": r.page_size, "page_bytes": pb, "pages_total": r.num_pages,
                "pages_free": r.allocator.num_free, "pages_slots": len(held), "pages_tree": len(tree),
                "pages_shared": sum(1 for p, n in held.items() if n > 1 or p in tree),
                "bytes_total": r.num_pages * pb, "bytes_in_use": used * pb, "preempted": self.stats["preempted"]}

    # ---- submission -------------------------------------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Validate a request against the model and context; returns its effective max_tokens (ValueError)."""
        params.validate()
        n, V = len(prompt_ids), self.config.vocab_size
        if n == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        if n >= self.max_len:  # before looking at the ids: an over-long prompt costs nothing more
            raise ValueError(f"the prompt has {n} tokens but the context is {self.max_len} tokens "
                             f"(at most {self.max_len - 1} prompt tokens, leaving room for one generated token)")
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < V for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, vocab_size={V})")
        max_tokens = self.max_len - n if params.max_tokens is None else params.max_tokens
        if n + max_tokens > self.max_len:
            raise ValueError(f"max_tokens={max_tokens} plus the prompt's {n} tokens exceed the context of "
                             f"{self.max_len} tokens: ask for at most {self.max_len - n}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        return max_tokens

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
               callback: Callable[[Event], None] | None = None, request_id: str | None = None,
               grammar: str | GrammarMatcher | None = None) -> Request:
        """Queue a request (thread-safe). callback(Event) is called from the engine's thread after every step
        that produced something for it; grammar: a Lark grammar (k2jax.chat.grammar.request_grammar /
        `grammar_tokenizer.grammar(...)`) the output must follow, or a fresh GrammarMatcher of one from
        `grammar_tokenizer.matcher` (built off the caller's thread: compiling takes milliseconds), None for free
        decoding. Raises ValueError for an invalid request (a grammar that does not compile included) before
        queueing it, and EngineStoppedError once the engine thread has died."""
        params = params or SamplingParams()
        max_tokens = self.check_request(prompt_ids, params)
        if isinstance(grammar, GrammarMatcher):
            if grammar.gt is not self.grammar_tokenizer or grammar.num_accepted:
                raise ValueError("grammar: a GrammarMatcher must be fresh and from this engine's grammar_tokenizer")
            matcher = grammar
        else:
            matcher = self.grammar_tokenizer.matcher(grammar) if grammar is not None else None
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        stop_ids = frozenset(int(t) for t in params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids)
        req = Request(request_id or f"req-{next(self._ids)}", [int(t) for t in prompt_ids], params,
                      max_tokens=max_tokens, top_k=min(int(params.top_k), self.config.vocab_size),
                      seed=int(seed) % 2 ** 32, stop_ids=stop_ids, callback=callback, grammar=matcher)
        with self._cv:
            if self.error is not None:
                raise EngineStoppedError(self.error)
            self._unfinished += 1
            self._incoming.put(req)
            self._cv.notify()
        return req

    def abort(self, request: Request) -> None:
        """Ask the engine to drop a request (thread-safe); it finishes with reason 'abort' at the next step."""
        request.aborted = True
        with self._cv:
            self._cv.notify()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or not self._incoming.empty() or any(s is not None for s in self.slots)

    @property
    def num_active(self) -> int:
        """Requests holding a slot."""
        return sum(s is not None for s in self.slots)

    @property
    def num_unfinished(self) -> int:
        """Submitted requests not finished yet, holding a slot or waiting for one (thread-safe)."""
        with self._cv:
            return self._unfinished

    @property
    def num_waiting(self) -> int:
        """Submitted requests that neither hold a slot nor finished yet (thread-safe)."""
        with self._cv:
            return max(0, self._unfinished - self.num_active)

    @property
    def running(self) -> bool:
        """True while the background thread is alive and the engine has not died."""
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # ---- the step --------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit waiting requests into free slots (prefill), continue one long prompt by a piece, then decode one
        token for every decoding slot. A failed prefill or decode call finishes only the requests in it (reason
        'error'), never raises for them."""
        self._take_incoming()
        for req in [r for r in self.waiting if r.aborted]:
            self.waiting.remove(req)
            self._finish(req, FINISH_ABORT)
        for req in [r for r in self.slots if r is not None and r.aborted]:
            self._finish(req, FINISH_ABORT)
        # Prompts admitted in an earlier step continue by one piece; one admitted now waits for the next step, so
        # that a step runs at most one piece of a long prompt besides admission.
        prefilling = [r for r in self.slots if r is not None and not r.decoding]
        while self.waiting and None in self.slots:
            if not self._admit():
                break  # the pool has no room for the next request's first piece yet
        prefilling = [r for r in prefilling if not r.finished]  # a failed admission may have lost the cache
        if prefilling:
            self._continue_prefill(min(prefilling, key=lambda r: r.t_submit))
        if any(r is not None and r.decoding for r in self.slots):
            self._decode_step()

    def _take_incoming(self):
        while True:
            try:
                self.waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                return

    def _piece_end(self, req: Request) -> int:
        """Where the request's next prefill piece ends: piece_len on, or at its next cut."""
        ends = [req.prefilled + self.runner.piece_len, len(req.prefill_ids)] + [c for c in req.cuts if c > req.prefilled]
        return min(ends)

    def _first_piece(self, req: Request) -> list[int]:
        return req.prefill_ids[:self._piece_end(req)]

    def _plan(self, req: Request, match) -> None:
        """Set the prompt lengths where its prefill stops to cache a prefix: every snapshot_every tokens and, for a
        hybrid model, where the prompt leaves a cached path that has no snapshot there (so the next request
        branching at that point resumes there)."""
        n = len(req.prefill_ids)
        cuts = set(range(self.snapshot_every, n, self.snapshot_every))
        if self.prefix.hybrid and match.num_tokens < match.num_matched < n:
            cuts.add(match.num_matched)
        req.cuts = sorted(c for c in cuts if c > match.num_tokens)

    def _peek_hit(self, req: Request) -> bool:
        """Whether the prefix cache holds a prefix of the request (not counted in the stats); plans its cuts."""
        match = self.prefix.lookup(req.prefill_ids, record=False)
        self._plan(req, match)
        return match.num_tokens > 0

    def _next_group(self, num_free: int) -> list[Request]:
        """The waiting requests (from the front, not removed) one prefill call takes: prompts starting from
        scratch (one that the prefix cache can resume is admitted alone, by `_admit_cached`)."""
        group = [self.waiting[0]]
        while len(group) < min(len(self.waiting), num_free):
            if self.prefix is not None and self._peek_hit(self.waiting[len(group)]):
                break
            lengths = [len(self._first_piece(r)) for r in group + [self.waiting[len(group)]]]
            if not self.runner.prefill_fits(lengths):
                break
            group.append(self.waiting[len(group)])
        return group

    @staticmethod
    def _sampling(group: list[Request]):
        """Per-row sampling arrays (temperature, top_k, top_p, seed) of a prefill call."""
        return (np.array([r.params.temperature for r in group], np.float32),
                np.array([r.top_k for r in group], np.int32),
                np.array([r.params.top_p for r in group], np.float32),
                np.array([r.seed for r in group], np.uint32))

    def _admit(self) -> bool:
        """Prefill the next group of waiting requests (their first pieces) into free slots. The whole call is
        prepared and run before any slot is taken; if it fails, only the group's requests fail (and leave the
        queue). A request whose prompt is not done takes its slot and continues in later steps. Admission takes
        free pages only (evicting unused cached prefixes), never preempts: returns False when the first waiting
        request's first piece does not fit the pool now (it stays at the front)."""
        free = [i for i, r in enumerate(self.slots) if r is None]
        if self.prefix is not None and self._peek_hit(self.waiting[0]):
            return self._admit_cached(self.waiting[0], free[0])
        group = self._next_group(len(free))
        while group and not self._make_room(sum(pages_for(len(self._first_piece(r)), self.runner.page_size)
                                                for r in group)):
            group.pop()
        if not group:
            return False
        slots = free[:len(group)]
        if self.prefix is not None:
            for req in group:  # count each query once, when it is admitted
                self.prefix.lookup(req.prefill_ids)
        temp, top_k, top_p, seeds = self._sampling(group)
        pieces = [self._first_piece(r) for r in group]
        t0 = time.perf_counter()
        try:
            bitmask, constrained = self._prefill_grammar_masks(group)
            out = self.runner.prefill(pieces, slots, temp, top_k, top_p, seeds, bitmask, constrained)
        except Exception as e:
            log.exception("prefill of %d request(s) failed", len(group))
            for req in group:
                self.waiting.popleft()
                self._finish(req, FINISH_ERROR, error=f"prefill failed: {type(e).__name__}: {e}")
            self._recover_cache(e)
            return
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += sum(len(p) for p in pieces)
        self.stats["prefill_s"] += time.perf_counter() - t0
        for i, (req, s) in enumerate(zip(group, slots)):
            self.waiting.popleft()
            req.slot, self.slots[s], req.prefilled = s, req, len(pieces[i])
            req.admitted = next(self._admissions)
            self._temp[s], self._top_k[s], self._top_p[s], self._seed[s] = temp[i], top_k[i], top_p[i], seeds[i]
        for i, req in enumerate(group):
            self._piece_done(req, out, i)
        return True

    def _piece_done(self, req: Request, out, row: int):
        """After a prefill piece of `req` (row `row` of `out`): cache the prefix at a cut; once the prompt is in,
        take its first token, or, for a request resumed after a preemption, feed its last generated token next
        (the token sampled here is the one it already has)."""
        if not req.decoding:
            self._cache_piece(req)
        elif req.token_ids:
            self._last[req.slot] = req.token_ids[-1]
        else:
            self._accept(req, out, row)

    def _make_room(self, num_pages: int) -> bool:
        """Whether the pool has num_pages free pages, after evicting unused cached prefixes (LRU) if it had not."""
        if self.runner.allocator.num_free < num_pages and self.prefix is not None:
            self.prefix.evict_for_free_pages(num_pages)
        return self.runner.allocator.num_free >= num_pages

    def _make_room_preempting(self, pages_needed: Callable[[], int], keep: Request | None = None) -> bool:
        """Free pages for a step that takes pages_needed() (re-evaluated as requests leave): evict unused cached
        prefixes, then preempt the most recently admitted requests holding slots (never `keep`) until it fits.
        Whether it fits."""
        while not self._make_room(pages_needed()):
            victims = [r for r in self.slots if r is not None and r is not keep]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda r: r.admitted))
        return True

    def _preempt(self, req: Request):
        """Take `req`'s slot and pages back and requeue it at the front, to be recomputed exactly: it prefills its
        prompt and the tokens it generated so far but the last, then decodes on with the same sampling counters
        (so greedy and seeded sampling continue as if nothing happened). vLLM's recompute preemption."""
        log.info("preempting request %s (%d prompt + %d generated tokens) to free pages", req.id,
                 len(req.prompt_ids), len(req.token_ids))
        self.runner.release(req.slot)
        self.slots[req.slot] = None
        req.slot, req.prefilled, req.cuts = None, 0, []
        req.prefill_ids = req.prompt_ids + req.token_ids[:-1]
        self.waiting.appendleft(req)
        self.stats["preempted"] += 1

    def _admit_cached(self, req: Request, slot: int) -> bool:
        """Admit the request at the front of the queue into `slot` resumed from its cached prefix, and prefill its
        first piece after it (False, nothing done, when the pool lacks the pages for that now). If the load fails,
        the request fails (and, if the call consumed the cache, every slot's)."""
        match = self.prefix.lookup(req.prefill_ids, record=False)
        n, ps = match.num_tokens, self.runner.page_size
        end = min(n + self.runner.piece_len, len(req.prefill_ids))
        if not self._make_room(1 + pages_for(end, ps) - pages_for(n, ps)):  # 1: a copy-on-write tail page
            return False
        match = self.prefix.lookup(req.prefill_ids)  # the same match (nothing changed), counted now
        self._plan(req, match)
        self.waiting.popleft()
        try:
            self.prefix.load(slot, match)
        except Exception as e:
            log.exception("loading a cached prefix for request %s failed", req.id)
            self._finish(req, FINISH_ERROR, error=f"prefix cache load failed: {type(e).__name__}: {e}")
            self._recover_cache(e)
            return True
        temp, top_k, top_p, seeds = self._sampling([req])
        req.slot, self.slots[slot] = slot, req
        req.admitted = next(self._admissions)
        req.prefilled = match.num_tokens
        if req.prefill_ids is req.prompt_ids:  # not a recompute after a preemption: prompt tokens resumed
            req.cached_tokens = match.num_tokens
        self._temp[slot], self._top_k[slot], self._top_p[slot], self._seed[slot] = temp[0], top_k[0], top_p[0], seeds[0]
        self._continue_prefill(req)
        return True

    def _cache_piece(self, req: Request):
        """After a prefill piece that ended at one of the request's cuts: cache the prompt so far."""
        if self.prefix is None or req.prefilled not in req.cuts:
            return
        try:
            self.prefix.save(req.slot, req.prefill_ids[:req.prefilled])
        except Exception:  # a prefix that is not cached costs time later, never correctness
            log.exception("caching the prefix of request %s failed", req.id)

    def _continue_prefill(self, req: Request):
        """Prefill the next piece of a prompt that holds a slot; its last piece samples the first token. A failure
        fails this request (and, if the call consumed the cache, every slot's)."""
        piece = req.prefill_ids[req.prefilled:self._piece_end(req)]
        if not self._make_room_preempting(lambda: self.runner.pages_to_hold(req.slot, req.prefilled + len(piece)),
                                          keep=req):
            return  # cannot happen while one request alone fits the pool; it would wait for pages
        t0 = time.perf_counter()
        try:
            out = self.runner.prefill([piece], [req.slot], *self._sampling([req]), *self._prefill_grammar_masks([req]),
                                      start=req.prefilled)
        except Exception as e:
            log.exception("prefill of request %s failed", req.id)
            self._finish(req, FINISH_ERROR, error=f"prefill failed: {type(e).__name__}: {e}")
            self._recover_cache(e)
            return
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += len(piece)
        self.stats["prefill_s"] += time.perf_counter() - t0
        req.prefilled += len(piece)
        self._piece_done(req, out, 0)

    def _decode_step(self):
        decoding = lambda: np.array([r is not None and r.decoding for r in self.slots])  # noqa: E731
        # A slot crossing a page boundary takes a page; a full pool preempts the latest admitted requests.
        self._make_room_preempting(lambda: self.runner.pages_needed(decode=decoding()))
        active = decoding()
        if not active.any():
            return
        counters = np.array([len(r.token_ids) if r is not None else 0 for r in self.slots], np.int32)
        t0 = time.perf_counter()
        try:
            if self._decode_masks is None and any(r is not None and r.grammar is not None for r in self.slots):
                self._decode_masks = BatchBitmask(self.num_slots, self.config.vocab_size)
            bitmask, constrained = self._grammar_masks(self._decode_masks, self.slots)
            out = self.runner.decode(self._last, active, counters, self._temp, self._top_k, self._top_p, self._seed,
                                     bitmask, constrained)
        except Exception as e:
            log.exception("decode step failed")
            for req in [r for s, r in enumerate(self.slots) if active[s]]:
                self._finish(req, FINISH_ERROR, error=f"decode failed: {type(e).__name__}: {e}")
            self._recover_cache(e)
            return
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += int(active.sum())
        self.stats["decode_s"] += time.perf_counter() - t0
        for s, req in enumerate(list(self.slots)):
            if active[s] and req is not None:
                self._accept(req, out, s)

    def _prefill_grammar_masks(self, group: Sequence[Request]):
        """The grammar masks of a prefill call's rows (see `_grammar_masks`); the buffers are made on first use."""
        if self._prefill_masks is None and any(r.grammar is not None for r in group):
            self._prefill_masks = BatchBitmask(self.runner.max_prefill_batch, self.config.vocab_size)
        return self._grammar_masks(self._prefill_masks, group)

    @staticmethod
    def _grammar_masks(masks: BatchBitmask | None, rows: Sequence[Request | None]):
        """(int32 [len(rows), W], bool [len(rows)]) grammar masks of a call's rows, or (None, None) when no row
        is constrained (the runner then passes all-ones masks)."""
        matchers = {i: r.grammar for i, r in enumerate(rows) if r is not None and r.grammar is not None}
        if not matchers:
            return None, None
        bitmask, constrained = masks.fill(matchers)
        return bitmask[:len(rows)], constrained[:len(rows)]

    def _recover_cache(self, e: Exception):
        """After a failed call: if it consumed the donated cache, the active requests' states and every cached
        prefix's latents are gone with it; they fail, the prefix cache empties and the runner starts a fresh
        cache. (An intact cache is kept: the other slots carry on.)"""
        if not self.runner.recover():
            return
        if self.prefix is not None:
            self.prefix.clear()
        for req in [r for r in self.slots if r is not None]:
            self._finish(req, FINISH_ERROR, error=f"the decode cache was lost when a call failed: "
                                                  f"{type(e).__name__}: {e}")

    # ---- per-token bookkeeping --------------------------------------------------------------------------------
    def _accept(self, req: Request, out, row: int):
        """Take the token sampled for `req` (row `row` of `out`); an error here fails this request only."""
        try:
            self._take_token(req, out, row)
        except Exception as e:
            log.exception("request %s failed", req.id)
            if not req.finished:
                self._finish(req, FINISH_ERROR, error=f"{type(e).__name__}: {e}")

    def _take_token(self, req: Request, out, row: int):
        tok = int(out.tokens[row])
        if req.grammar is not None and not req.grammar.accept(tok):
            raise ValueError(f"the grammar rejected token {tok}: {req.grammar.error}")
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
        lp = None
        if req.params.logprobs is not None:
            n = req.params.logprobs
            # -inf alternatives are ids the engine may not generate (only when fewer than n ids are allowed).
            top = [(int(i), float(v)) for i, v in zip(out.top_ids[row][:n], out.top_logprobs[row][:n])
                   if np.isfinite(v)]
            lp = TokenLogprob(tok, float(out.logprob[row]), top)
            req.logprobs.append(lp)
        req.token_ids.append(tok)
        self._last[req.slot] = tok
        reason = None
        if tok in req.stop_ids or (req.grammar is not None and req.grammar.ended):
            reason = FINISH_STOP
        elif len(req.token_ids) >= req.max_tokens:
            reason = FINISH_LENGTH
        text_ids = req.token_ids[:-1] if reason == FINISH_STOP else req.token_ids
        if self.tokenizer is not None:
            req.text = self.tokenizer.decode(text_ids)
            cut = _first_stop(req.text, req.params.stop)
            if cut is not None:
                req.text, reason = req.text[:cut], FINISH_STOP
        self._emit(req, [tok], [lp] if lp else [], reason)
        if reason is not None:
            self._finish(req, reason, emitted=True)

    def _emit(self, req: Request, toks, lps, reason):
        """Send the text that can no longer change: hold back a tail that could start a stop string, and an
        incomplete UTF-8 character (decoded as U+FFFD)."""
        end = len(req.text)
        if reason is None:
            hold = max((len(s) - 1 for s in req.params.stop), default=0)
            end = max(req.sent, end - hold)
            while end > req.sent and req.text[end - 1] == "\ufffd":
                end -= 1
        delta, req.sent = req.text[req.sent:end], max(req.sent, end)
        if req.callback is not None:
            self._call(req, Event(req.id, toks, delta, lps, reason is not None, reason))

    def _call(self, req, event):
        try:
            req.callback(event)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("callback of request %s failed", req.id)

    def _finish(self, req: Request, reason: str, *, emitted: bool = False, error: str | None = None):
        """End `req` (once; later calls do nothing): free its slot, send the final event unless `emitted`."""
        if req.finished:
            return
        holds_slot = req.slot is not None and self.slots[req.slot] is req
        if holds_slot and self.prefix is not None and reason in (FINISH_STOP, FINISH_LENGTH) and req.decoding:
            self._cache_sequence(req)
        req.finish_reason, req.error, req.t_done = reason, error, time.perf_counter()
        if holds_slot:
            self.runner.release(req.slot)  # pages the prefix cache took stay; the rest return to the pool
            self.slots[req.slot] = None
        with self._cv:
            self._unfinished -= 1
        finished = self.stats["finished"]
        finished[reason] = finished.get(reason, 0) + 1
        if not emitted and req.callback is not None:
            self._call(req, Event(req.id, [], "", [], True, reason, error))
        req._done.set()

    def _cache_sequence(self, req: Request):
        """Cache what a finished request's slot holds: its prompt and generated tokens but the last (never fed
        back), so the next turn of the conversation resumes where this one ended."""
        n = int(self.runner.lengths[req.slot])
        try:
            self.prefix.save(req.slot, (req.prompt_ids + req.token_ids)[:n])
        except Exception:
            log.exception("caching the sequence of request %s failed", req.id)
        if time.monotonic() - self._prefix_logged >= 60:
            self._prefix_logged = time.monotonic()
            st, pool = self.prefix.stats(), self.pool_stats()
            log.info("prefix cache: %d hits / %d queries, %d cached tokens reused, %d evicted nodes, %.1f of %.1f MiB "
                     "in use; page pool: %d pages of %d, %d held by live slots, %d by the tree, %d shared, %d free, "
                     "%d preempted", st["hits"], st["queries"], st["cached_tokens"], st["evicted_nodes"],
                     st["bytes_in_use"] / 2 ** 20, st["budget_bytes"] / 2 ** 20, pool["pages_total"],
                     pool["page_size"], pool["pages_slots"], pool["pages_tree"], pool["pages_shared"],
                     pool["pages_free"], pool["preempted"])

    def _finish_everything(self, reason: str, error: str | None = None):
        """Finish every queued, waiting and active request."""
        self._take_incoming()
        for req in list(self.waiting) + [r for r in self.slots if r is not None]:
            self._finish(req, reason, error=error)
        self.waiting.clear()

    # ---- driving ---------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 timeout: float | None = None) -> list[Completion]:
        """Generate for every prompt (token id lists), batching them through the slots; returns Completions in
        prompt order. Drives the steps itself unless the background thread runs."""
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        if self._thread is None:
            while not all(r.finished for r in reqs):
                self.step()
        return [r.wait(timeout) for r in reqs]

    def start(self) -> None:
        """Run the step loop in a background daemon thread until `shutdown()`."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="k2jax-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the background thread; unfinished requests end with reason 'abort'."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._finish_everything(FINISH_ABORT)

    def _loop(self):
        try:
            while True:
                with self._cv:
                    while not self._stop and not self.has_work:
                        self._cv.wait(timeout=1.0)
                    if self._stop:
                        return
                try:
                    self.step()
                except Exception as e:
                    # step() confines request failures itself, so this is a fault of the engine's own
                    # bookkeeping: return to a known state (nothing in flight, a fresh cache) and keep serving.
                    log.exception("engine step failed")
                    self._finish_everything(FINISH_ERROR, f"engine step failed: {type(e).__name__}: {e}")
                    self.runner.reset()
                    if self.prefix is not None:
                        self.prefix.clear()
        except BaseException as e:  # the thread ends here: nothing may be left waiting on it
            log.exception("the engine thread died")
            with self._cv:
                self.error = f"the engine stopped: {type(e).__name__}: {e}"
            self._finish_everything(FINISH_ERROR, self.error)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None

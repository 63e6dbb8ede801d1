"""The compiled half of the serving engine: the jitted prefill / decode steps, their shape buckets and the slot
cache they read and write.

Prefill and decode each run as a read program (compute and sample) and a write program that takes the cache donated
and updates it in place (k2jax.serving.cache explains the split). Every jitted shape comes from the buckets
(`length_buckets`: powers of two, then the context length), so after `warmup()` no request triggers a compilation.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.layers.qat import int4_experts as has_int4
from k2jax.model import unstack_layers
from k2jax.quantize import quantize_model_experts
from k2jax.serving import cache as kvcache
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


class ModelRunner:
    """The model side of `k2jax.serving.scheduler.Engine` (its base class): the parameters, the slot cache and the
    jitted steps. It reads the engine's settings (config, num_slots, max_len, mesh, buckets, max_prefill_batch,
    max_prefill_tokens, vocab_limit) and per-slot host mirrors (_last, _temp, _top_k, _top_p, _seed), and owns
    graphdef, params, cache and compile_count."""

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _setup_model(self, model, int4_experts: bool):
        if model.config.scan_layers:
            model = unstack_layers(model)  # serving walks the per-layer list
        if int4_experts and not has_int4(model.config):
            model = quantize_model_experts(model)  # a new model: the caller's float experts are not kept here
        self.config = model.config
        self.graphdef, self.params = nnx.split(model)
        # The jitted steps take the parameters as a flat list: flattening an nnx.State on every call costs
        # about as much as a small model's whole decode step.
        self._param_leaves, self._param_def = jax.tree.flatten(self.params)

    def _cache_shardings(self):
        if self.mesh is None:
            return None
        abstract = jax.eval_shape(lambda: kvcache.init_cache(self.config, self.num_slots, self.max_len))
        leaves, treedef = jax.tree.flatten(abstract)
        names = treedef.flatten_up_to(kvcache.cache_logical_names(abstract))
        return treedef.unflatten([jax.sharding.NamedSharding(self.mesh, logical_to_mesh_spec(n, self.mesh, a.shape))
                                  for n, a in zip(names, leaves)])

    def _new_cache(self):
        make = lambda: kvcache.init_cache(self.config, self.num_slots, self.max_len)  # noqa: E731
        if self._cache_sharding is None:
            return make()
        return jax.jit(make, out_shardings=self._cache_sharding)()

    def _run(self, step, *args, **kwargs):
        """Call a jitted step (under the mesh, when there is one: tracing sees it, so MoE goes expert parallel)."""
        if self.mesh is None:
            return step(*args, **kwargs)
        with jax.set_mesh(self.mesh):
            return step(*args, **kwargs)

    def _build_steps(self):
        """Jitted (prefill, write_prefill, decode, write_decode): the reads sample too, the writes donate the
        cache (see k2jax.serving.cache on why each step is two programs)."""
        graphdef, param_def = self.graphdef, self._param_def
        # A static bound fixed per engine: no recompiles per request, and no mask at all when it is the full vocab.
        limit = self.vocab_limit if self.vocab_limit < self.config.vocab_size else None

        def model_of(params):
            self.compile_count += 1  # runs only while tracing
            return nnx.merge(graphdef, jax.tree.unflatten(param_def, params))

        def prefill_fn(params, tokens, lengths, temp, top_k, top_p, seeds):
            entries, logits = kvcache.prefill_entries(model_of(params), tokens, lengths)
            return entries, sample(logits, temp, top_k, top_p, row_keys(seeds, jnp.zeros_like(lengths)),
                                   vocab_limit=limit)

        def decode_fn(params, cache, tokens, temp, top_k, top_p, seeds, counters, all_greedy, *, kv_len):
            entries, logits = kvcache.decode_entries(model_of(params), cache, tokens, kv_len=kv_len)
            return entries, sample(logits, temp, top_k, top_p, row_keys(seeds, counters), all_greedy=all_greedy,
                                   vocab_limit=limit)

        def write_prefill_fn(cache, entries, lengths, slots):
            self.compile_count += 1
            return kvcache.write_prefill(cache, entries, lengths, slots)

        def write_decode_fn(cache, entries, active):
            self.compile_count += 1
            return kvcache.write_decode(cache, entries, active)

        kw = {} if self._cache_sharding is None else {"out_shardings": self._cache_sharding}
        return (jax.jit(prefill_fn), jax.jit(write_prefill_fn, donate_argnums=(0,), **kw),
                jax.jit(decode_fn, static_argnames=("kv_len",)),
                jax.jit(write_decode_fn, donate_argnums=(0,), **kw))

    def _prefill_shapes(self):
        """Every (rows, length) bucket pair a prefill call can use."""
        rows = pow2_upto(self.max_prefill_batch)
        return [(r, T) for T in self.buckets for r in rows if r == 1 or r * T <= self.max_prefill_tokens]

    def warmup(self) -> float:
        """Compile every prefill and decode shape now (so serving never compiles); returns the seconds taken."""
        t0 = time.perf_counter()
        S = self.num_slots
        for r, T in self._prefill_shapes():
            z = np.zeros(r, np.int32)
            self._prefill(np.zeros((r, T), np.int32), z, np.arange(r, dtype=np.int32), np.zeros(r, np.float32), z,
                          np.ones(r, np.float32), np.zeros(r, np.uint32))
        for kv in self.buckets:
            self._decode(kv, np.zeros(S, bool), np.zeros(S, np.int32), np.bool_(True))
        jax.block_until_ready(self.cache)
        return time.perf_counter() - t0

    def _prefill(self, tokens, lengths, slots, temp, top_k, top_p, seeds):
        """Prefill rows into slots (length-0 rows change nothing); returns the first tokens' SampleOutput (host)."""
        entries, out = self._run(self._prefill_jit, self._param_leaves, tokens, lengths, temp, top_k, top_p, seeds)
        self.cache = self._run(self._write_prefill_jit, self.cache, entries, lengths, slots)
        return jax.device_get(out)

    def _decode(self, kv_len, active, counters, all_greedy):
        """One decode step over all slots (inactive ones unchanged); returns the SampleOutput (host)."""
        entries, out = self._run(self._decode_jit, self._param_leaves, self.cache, self._last, self._temp,
                                 self._top_k, self._top_p, self._seed, counters, all_greedy, kv_len=kv_len)
        self.cache = self._run(self._write_decode_jit, self.cache, entries, active)
        return jax.device_get(out)

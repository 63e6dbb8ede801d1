"""Token sampling for batched generation: greedy, temperature, top-k, top-p, a per-request seed, and logprobs.

Every row carries its own parameters, so requests with different settings share one batch. Randomness comes
from `key(seed)` folded with the row's token index, so a request's samples depend only on its own seed and
position, never on its batch neighbours or on how many steps the engine ran before it arrived.

Order of operations (as in HF `generate` and vLLM): logits / temperature, keep the top_k largest, renormalise,
keep the smallest prefix (by decreasing probability) whose mass reaches top_p, sample. temperature 0 is greedy
(argmax of the raw logits, ties to the lower id). Logprobs are of the raw model distribution (temperature 1,
no truncation), as the OpenAI API reports them.

`vocab_limit` (a static int) restricts every choice to ids below it: the logits of ids >= vocab_limit are set to
-inf before anything else, so greedy, sampled and logprob alternatives alike never name them, and logprobs are
then of the model's distribution renormalised over ids [0, vocab_limit). The engine uses it when its model has
more ids (padded embeddings) than its tokenizer can decode.

`bitmask` / `constrained` (grammar-constrained decoding, k2jax.chat.grammar): rows with constrained[b] set have the
ids their packed bitmask forbids set to -inf as well (k2jax.chat.bitmask.apply_token_bitmask), so greedy and
sampled choices and logprobs follow the grammar (logprobs renormalised over the allowed ids); other rows are left
bit for bit as they are, and a batch with no constrained row skips the unpacking at run time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from k2jax.chat.bitmask import apply_token_bitmask

MAX_TOP_LOGPROBS = 5  # the OpenAI completions limit; the engine always computes this many


class SampleOutput(NamedTuple):
    """tokens int32 [B]; logprob float32 [B] of each chosen token; top_ids int32 [B, n]; top_logprobs f32 [B, n]."""

    tokens: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def row_keys(seeds, counters):
    """One PRNG key per row: fold_in(key(seeds[b]), counters[b]). seeds: uint32 [B]; counters: int [B]."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters.astype(jnp.uint32))


def _truncated_logits(logits, temperature, top_k, top_p):
    """Sorted (descending) scaled logits with everything outside top-k / top-p set to -inf, and the sort order.

    logits f32 [B, V]; temperature f32 [B] (> 0 here); top_k int32 [B] (0 = off); top_p f32 [B] (1 = off).
    """
    V = logits.shape[-1]
    scaled = logits / temperature[:, None]
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    srt = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V, dtype=jnp.int32)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
    srt = jnp.where(rank < k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The first token is always kept, so top_p -> 0 degenerates to greedy rather than to nothing.
    keep = (mass_before < top_p[:, None]) | (rank == 0)
    return jnp.where(keep, srt, -jnp.inf), order


def sample(logits, temperature, top_k, top_p, keys, *, all_greedy=False, vocab_limit: int | None = None,
           bitmask=None, constrained=None, num_top_logprobs: int = MAX_TOP_LOGPROBS) -> SampleOutput:
    """Choose one token per row.

    logits: float [B, V]; temperature: f32 [B] (0 = greedy); top_k: int32 [B] (0 = off); top_p: f32 [B] in
    (0, 1] (1 = off); keys: [B] PRNG keys (`row_keys`). all_greedy: True skips the sort when every row is
    greedy; a traced bool decides at run time (one compiled program serves both cases). vocab_limit: a static
    int; ids >= vocab_limit are never chosen nor listed (None, or >= V: no mask and no cost). bitmask: int32
    [B, ceil(V / 32)] packed grammar masks and constrained: bool [B] the rows they apply to (both or neither; see
    the module docstring). Returns a
    SampleOutput with the log-probabilities of the choice and the top `num_top_logprobs` alternatives (one beyond
    the allowed ids, possible only when vocab_limit < num_top_logprobs, has logprob -inf).
    """
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    if vocab_limit is not None and vocab_limit < V:
        if vocab_limit < 1:
            raise ValueError(f"sample: vocab_limit must be >= 1, got {vocab_limit}")
        logits = jnp.where(jnp.arange(V, dtype=jnp.int32)[None, :] < vocab_limit, logits, -jnp.inf)
    if (bitmask is None) != (constrained is None):
        raise ValueError("sample: bitmask and constrained go together")
    if bitmask is not None:
        logits = jax.lax.cond(jnp.any(constrained), lambda x: apply_token_bitmask(x, bitmask, constrained),
                              lambda x: x, logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def general():
        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        trunc, order = _truncated_logits(logits, safe_t, top_k.astype(jnp.int32), top_p.astype(jnp.float32))
        pick = jax.vmap(jax.random.categorical)(keys, trunc)
        sampled = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature > 0, sampled, greedy)

    if isinstance(all_greedy, bool):
        tokens = greedy if all_greedy else general()
    else:
        tokens = jax.lax.cond(all_greedy, lambda: greedy, general)
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, num_top_logprobs)
    return SampleOutput(tokens, chosen, top_ids.astype(jnp.int32), top_lp)

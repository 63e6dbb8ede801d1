"""lm_head + softmax cross-entropy without [N, V] logits: chunked over tokens and vocabulary, custom VJP.

Forward: for each block of tokens (`lax.scan`), the vocabulary is walked in blocks with an online logsumexp
(running max and normaliser), the label's logit and a running argmax (an earlier block wins ties, so the result
is jnp.argmax's first index). Only the per-token logsumexp and loss are kept. Backward: vocabulary blocks outside,
token blocks inside; each block's logits are recomputed, dz = (softmax - onehot) * mask * g, and
dx += dz w_block^T (a [N, D] float32 buffer updated in place), dw_block += x^T dz (written once per vocabulary
block). Temporaries are O(block_tokens * block_vocab); logits are float32 whatever the input dtype; matmul inputs
keep their dtype (dz is cast to it, as the matmul kernels of flash attention do) and accumulate in float32.

When block_vocab does not divide V, the last vocabulary block is the last block_vocab columns (it overlaps the
one before) and masks the columns already counted, so w is never padded or copied.

Why not tokamax's `linear_softmax_cross_entropy_loss`: it takes no per-token weights and returns no argmax count,
its XLA path builds the full logits, and its kernels need tokamax >= 0.0.13 (Python >= 3.12), which the Python
3.11 interpreter cannot install.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.cross_entropy.checks import check_block, check_cross_entropy_inputs

DEFAULT_BLOCK_TOKENS = 512
DEFAULT_BLOCK_VOCAB = 16384  # 163,840 = 10 blocks; a [512, 16384] float32 block is 32 MiB
# The logits block's size in elements that the default token block keeps whatever the vocabulary: a small vocabulary
# gets more tokens per block (V = 512: 16,384), so a small model's loss is a few large matmuls rather than a scan of
# small ones (default training config, 2,048 tokens x 512 per micro-batch: forward + backward 6.8 -> 5.3 ms).
BLOCK_ELEMS = DEFAULT_BLOCK_TOKENS * DEFAULT_BLOCK_VOCAB
_F32 = jnp.float32


def linear_cross_entropy(x, w, labels, *, mask=None, block_tokens=None, block_vocab=DEFAULT_BLOCK_VOCAB):
    """Masked cross-entropy of logits = x @ w, summed, and the masked count of correct argmaxes, chunked.

    x: [N, D]; w: [D, V]; labels: int [N] in [0, V); mask: [N] bool or float weights (None: all ones).
    block_tokens, block_vocab: positive ints (capped at N rounded up to 8 and at V); N and V need not be multiples.
    block_tokens None: DEFAULT_BLOCK_TOKENS, or more when the vocabulary block is narrower than DEFAULT_BLOCK_VOCAB,
    up to BLOCK_ELEMS logits per block (a multiple of 8).
    Returns (loss_sum, correct) as `linear_cross_entropy_reference`: float32 scalars; gradients flow to x, w and
    a float mask (d loss_sum / d mask_n is token n's loss); `correct` has none.
    """
    op = "linear_cross_entropy"
    N, D, V, weight = check_cross_entropy_inputs(x, w, labels, mask, op=op)
    bv = min(check_block(block_vocab, "block_vocab", op=op), V)
    if block_tokens is None:
        block_tokens = default_block_tokens(bv)
    bt = min(check_block(block_tokens, "block_tokens", op=op), -(-N // 8) * 8)
    if N == 0:
        return jnp.zeros((), _F32), jnp.zeros((), _F32)
    nt = -(-N // bt)
    pad = nt * bt - N  # padded tokens get weight 0: they add nothing to either sum or to any gradient
    xc = jnp.pad(x, [(0, pad), (0, 0)]).reshape(nt, bt, D)
    lc = jnp.pad(labels.astype(jnp.int32), (0, pad)).reshape(nt, bt)
    mc = jnp.pad(weight, (0, pad)).reshape(nt, bt)
    loss_sum, correct = _chunked(bv, xc, w, lc, mc)
    return loss_sum, jax.lax.stop_gradient(correct)


def default_block_tokens(block_vocab: int) -> int:
    """Tokens per block for vocabulary blocks of block_vocab columns: DEFAULT_BLOCK_TOKENS, or as many more (a
    multiple of 8) as keep a block within BLOCK_ELEMS logits (block_vocab 16,384 -> 512; 512 -> 16,384)."""
    return max(DEFAULT_BLOCK_TOKENS, BLOCK_ELEMS // max(block_vocab, 1) // 8 * 8)


def _vocab_block(w, j, bv):
    """Vocabulary block j: (w[:, start:start + bv], column ids, fresh) where the last block starts at V - bv and
    `fresh` marks the columns no earlier block holds."""
    V = w.shape[1]
    start = jnp.minimum(j * bv, V - bv)
    cols = start + jnp.arange(bv, dtype=jnp.int32)
    return jax.lax.dynamic_slice_in_dim(w, start, bv, axis=1), cols, cols >= j * bv, start


def _logits(xi, wj):
    return jnp.dot(xi, wj, preferred_element_type=_F32)


def _token_stats(bv, xc, w, lc):
    """Per token (each [nt, bt]): logsumexp over the vocabulary, the label's logit, the argmax."""
    nv = -(-w.shape[1] // bv)

    def token_block(_, xs):
        xi, li = xs

        def vocab_step(carry, j):
            m, l, label_logit, best, arg = carry
            wj, cols, fresh, start = _vocab_block(w, j, bv)
            z = jnp.where(fresh[None], _logits(xi, wj), -jnp.inf)
            z_max = jnp.max(z, axis=-1)
            m_new = jnp.maximum(m, z_max)
            l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=-1)
            mine = (cols[None] == li[:, None]) & fresh[None]  # the label's column, counted in one block only
            label_logit = label_logit + jnp.sum(jnp.where(mine, z, 0.0), axis=-1)
            better = z_max > best  # strict: an earlier block keeps a tie, as jnp.argmax's first index
            # the first column holding the block's max: a plain min reduction, which XLA:CPU vectorizes (jnp.argmax
            # lowers to a two-operand reduction that it runs element by element, ~1/3 of this forward's time)
            first = jnp.min(jnp.where(z == z_max[:, None], cols[None], jnp.iinfo(jnp.int32).max), axis=-1)
            arg = jnp.where(better, first, arg)
            return (m_new, l, label_logit, jnp.where(better, z_max, best), arg), None

        rows = li.shape
        init = (jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, _F32), jnp.zeros(rows, _F32),
                jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, jnp.int32))
        (m, l, label_logit, _, arg), _ = jax.lax.scan(vocab_step, init, jnp.arange(nv))
        return None, (m + jnp.log(l), label_logit, arg)

    _, stats = jax.lax.scan(token_block, None, (xc, lc))
    return stats


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(bv, xc, w, lc, mc):
    lse, label_logit, arg = _token_stats(bv, xc, w, lc)
    return jnp.sum((lse - label_logit) * mc), jnp.sum((arg == lc) * mc)


def _chunked_fwd(bv, xc, w, lc, mc):
    lse, label_logit, arg = _token_stats(bv, xc, w, lc)
    loss = lse - label_logit
    return (jnp.sum(loss * mc), jnp.sum((arg == lc) * mc)), (xc, w, lc, mc, lse, loss)


def _chunked_bwd(bv, residuals, cotangents):
    xc, w, lc, mc, lse, loss = residuals
    g = cotangents[0]  # `correct` carries no gradient
    coef = mc * g
    nt = xc.shape[0]
    nv = -(-w.shape[1] // bv)

    def vocab_block(carry, j):
        dx, dw = carry
        wj, cols, fresh, start = _vocab_block(w, j, bv)

        def token_step(inner, i):
            dx, dwj = inner
            xi = xc[i]
            p = jnp.where(fresh[None], jnp.exp(_logits(xi, wj) - lse[i][:, None]), 0.0)
            onehot = (cols[None] == lc[i][:, None]) & fresh[None]
            dz = (p - onehot) * coef[i][:, None]
            dxi = jnp.dot(dz.astype(w.dtype), wj.T, preferred_element_type=_F32)
            dx = jax.lax.dynamic_update_index_in_dim(dx, dx[i] + dxi, i, 0)
            dwj = dwj + jnp.dot(xi.T, dz.astype(xi.dtype), preferred_element_type=_F32)
            return (dx, dwj), None

        (dx, dwj), _ = jax.lax.scan(token_step, (dx, jnp.zeros(wj.shape, _F32)), jnp.arange(nt))
        # Add, not overwrite: the last block overlaps the previous one (its stale columns hold zeros here).
        dw = jax.lax.dynamic_update_slice_in_dim(dw, jax.lax.dynamic_slice_in_dim(dw, start, bv, axis=1) + dwj,
                                                 start, axis=1)
        return (dx, dw), None

    init = (jnp.zeros(xc.shape, _F32), jnp.zeros(w.shape, _F32))
    (dx, dw), _ = jax.lax.scan(vocab_block, init, jnp.arange(nv))
    return dx.astype(xc.dtype), dw.astype(w.dtype), None, loss * g


_chunked.defvjp(_chunked_fwd, _chunked_bwd)

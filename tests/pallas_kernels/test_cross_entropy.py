"""Chunked lm_head + cross-entropy against the full-logits reference (the loss k2jax.training.step computed before),
and its memory.

Tolerances are error ratios: float32 1e-5 (loss) and 1e-4 (gradients); bfloat16 inputs 1e-5 (loss: logits are
float32 either way) and 5e-3 (gradients: dz is cast to bfloat16 for the matmuls), against the float32 reference
on the same rounded inputs. The correct-argmax count must be equal.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pallas_kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from pallas_kernels.cross_entropy.chunked import (
    BLOCK_ELEMS,
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_BLOCK_VOCAB,
    default_block_tokens,
)
from tests.conftest import error_ratio


def make_inputs(N, D, V, dtype=jnp.float32, seed=0):
    """Hidden states, lm_head kernel and labels of which about half are the argmax (so `correct` is not ~0), and
    a float mask with zeros."""
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (N, D)).astype(dtype)
    w = (jax.random.normal(ks[1], (D, V)) / np.sqrt(D) * 3).astype(dtype)
    top = jnp.argmax(jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)), axis=-1)
    labels = jnp.where(jnp.arange(N) % 2 == 0, top, jax.random.randint(ks[2], (N,), 0, V))
    mask = (jax.random.uniform(ks[3], (N,)) > 0.25).astype(jnp.float32)
    return x, w, labels.astype(jnp.int32), mask


def sums_and_grads(fn, x, w, labels, mask, **kw):
    """(loss_sum, correct) and d loss_sum / d (x, w, mask), jitted."""
    @jax.jit
    def run(x, w, mask):
        out, vjp = jax.vjp(lambda x, w, mask: fn(x, w, labels, mask=mask, **kw), x, w, mask)
        return out, vjp((jnp.float32(1.7), jnp.float32(0.0)))
    return run(x, w, mask)


@pytest.mark.parametrize("N, V, block_tokens, block_vocab", [
    (45, 100, 16, 32),    # neither N nor V a multiple: padded tokens, an overlapping last vocabulary block
    (45, 100, 64, 100),   # one token block, whole vocabulary
    (64, 97, 8, 7),       # many small blocks
    (1100, 600, None, None),  # default (omitted) blocks: one token block of 1,104 (padded), the whole vocabulary
    (1100, 600, None, 256),   # the default token block for 256-column vocabulary blocks, the last one overlapping
])
def test_float32_matches_reference(N, V, block_tokens, block_vocab):
    x, w, labels, mask = make_inputs(N, 24, V)
    (loss_ref, correct_ref), grads_ref = sums_and_grads(linear_cross_entropy_reference, x, w, labels, mask)
    blocks = {k: v for k, v in (("block_tokens", block_tokens), ("block_vocab", block_vocab)) if v is not None}
    (loss, correct), grads = sums_and_grads(linear_cross_entropy, x, w, labels, mask, **blocks)
    assert loss.dtype == jnp.float32 and error_ratio(loss_ref, loss) < 1e-5
    assert float(correct) == float(correct_ref) > N / 4
    for name, a, b in zip(("dx", "dw", "dmask"), grads_ref, grads):
        assert error_ratio(a, b) < 1e-4, name


def test_default_block_tokens_keep_the_block_size():
    """Without block_tokens, a narrow vocabulary block gets more tokens, within the large-vocabulary block's size."""
    assert default_block_tokens(DEFAULT_BLOCK_VOCAB) == DEFAULT_BLOCK_TOKENS == 512
    assert default_block_tokens(512) == 16384
    assert default_block_tokens(600) == 13976 and 13976 * 600 <= BLOCK_ELEMS
    assert default_block_tokens(10 ** 6) == DEFAULT_BLOCK_TOKENS


def test_reference_is_the_training_loss():
    """The reference equals the former training loss: masked optax cross-entropy and argmax count on full logits."""
    x, w, labels, mask = make_inputs(40, 16, 50)
    logits = jnp.dot(x, w)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss, correct = linear_cross_entropy_reference(x, w, labels, mask=mask)
    assert error_ratio(jnp.sum(ce * mask), loss) < 1e-6
    assert float(correct) == float(jnp.sum((jnp.argmax(logits, -1) == labels) * mask))


def test_bfloat16_matches_reference():
    x, w, labels, mask = make_inputs(45, 32, 100, dtype=jnp.bfloat16)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    (loss_ref, correct_ref), grads_ref = sums_and_grads(linear_cross_entropy_reference, f32(x), f32(w), labels, mask)
    (loss, correct), grads = sums_and_grads(linear_cross_entropy, x, w, labels, mask, block_tokens=16,
                                            block_vocab=32)
    assert error_ratio(loss_ref, loss) < 1e-5 and float(correct) == float(correct_ref)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    for name, a, b in zip(("dx", "dw"), grads_ref, grads):
        assert error_ratio(a, b) < 5e-3, name


def test_bool_mask_and_no_mask():
    x, w, labels, mask = make_inputs(30, 8, 20)
    for m in (mask > 0, None):
        ref = linear_cross_entropy_reference(x, w, labels, mask=m)
        got = linear_cross_entropy(x, w, labels, mask=m, block_tokens=8, block_vocab=8)
        assert error_ratio(ref[0], got[0]) < 1e-5 and float(ref[1]) == float(got[1])
    dx = jax.grad(lambda x: linear_cross_entropy(x, w, labels, mask=mask > 0, block_tokens=8)[0])(x)
    assert np.all(np.asarray(dx)[np.asarray(mask) == 0] == 0)  # unmasked-out tokens only


def test_memory_never_holds_the_logits():
    """XLA's temp-buffer estimate of loss + gradients at N = 4096, V = 8192: the reference holds [N, V] float32
    logits (128 MiB), the chunked op blocks of [256, 1024]."""
    N, D, V = 4096, 64, 8192
    specs = (jax.ShapeDtypeStruct((N, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
             jax.ShapeDtypeStruct((N,), jnp.int32), jax.ShapeDtypeStruct((N,), jnp.float32))

    def temp_bytes(fn):
        grad = jax.grad(lambda x, w, labels, mask: fn(x, w, labels, mask=mask)[0], (0, 1))
        return jax.jit(grad).lower(*specs).compile().memory_analysis().temp_size_in_bytes

    logits = N * V * 4
    assert temp_bytes(linear_cross_entropy_reference) >= logits
    chunked = temp_bytes(lambda *a, **kw: linear_cross_entropy(*a, block_tokens=256, block_vocab=1024, **kw))
    assert chunked < logits / 8


def test_bad_arguments_raise():
    x, w, labels, mask = make_inputs(8, 4, 10)
    with pytest.raises(ValueError, match="w must be \\[D, V\\] with x's D=4"):
        linear_cross_entropy(x, w.T, labels)
    with pytest.raises(ValueError, match="labels must be an int array \\[N\\]"):
        linear_cross_entropy(x, w, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match="mask must be \\[N\\]"):
        linear_cross_entropy(x, w, labels, mask=mask[:3])
    with pytest.raises(ValueError, match="block_vocab must be a positive int"):
        linear_cross_entropy(x, w, labels, block_vocab=0)
    with pytest.raises(ValueError, match="x must be a 2-D array"):
        linear_cross_entropy(x[None], w, labels)


@pytest.mark.parametrize("block_vocab", [7, 16, 40])
def test_tied_logits_count_the_first_column_as_jnp_argmax(block_vocab):
    """Exact ties (integer-valued inputs, so every logit is exact whatever the summation order): a label counts
    as correct only when it is the first column holding the row's max, as jnp.argmax decides, whether the tied
    columns share a vocabulary block or not."""
    N, D, V = 48, 8, 40
    ks = jax.random.split(jax.random.key(5), 3)
    x = jax.random.randint(ks[0], (N, D), -2, 3).astype(jnp.float32)
    w = jax.random.randint(ks[1], (D, V), -2, 3).astype(jnp.float32)
    w = w.at[:, 20:30].set(w[:, 0:10])          # columns 20..29 tie with 0..9 (some across blocks)
    w = w.at[:, 5].set(w[:, 4])                 # and neighbours in one block
    logits = x @ w
    top = jnp.argmax(logits, axis=-1)
    tied = jnp.argmax(jnp.where(jnp.arange(V) > top[:, None], logits == logits.max(-1, keepdims=True), False), -1)
    labels = jnp.where(jnp.arange(N) % 2 == 0, top, tied).astype(jnp.int32)   # odd rows: a later tied column
    assert int(jnp.sum((jnp.arange(N) % 2 == 1) & (tied > top))) > N // 8      # enough rows really tie
    _, correct_ref = linear_cross_entropy_reference(x, w, labels)
    _, correct = linear_cross_entropy(x, w, labels, block_tokens=16, block_vocab=block_vocab)
    assert float(correct) == float(correct_ref) == float(jnp.sum(labels == top))

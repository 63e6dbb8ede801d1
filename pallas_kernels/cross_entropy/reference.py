"""The lm_head + cross-entropy with full [N, V] float32 logits, as k2jax.training.step computed it before it took
the chunked op: the ground truth."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.cross_entropy.checks import check_cross_entropy_inputs


def linear_cross_entropy_reference(x, w, labels, *, mask=None):
    """Masked softmax cross-entropy of logits = x @ w (float32), summed, and the masked count of correct argmaxes.

    x: [N, D] (hidden states); w: [D, V] (lm_head kernel; a tied embedding [V, D] passes as its transpose);
    labels: int [N] in [0, V); mask: [N] bool or float weights (None: all ones).
    Returns (loss_sum, correct): float32 scalars, sum_n mask_n * (logsumexp_v z_nv - z_n,label_n) and
    sum_n mask_n * [argmax_v z_nv == label_n] (first index on ties, as jnp.argmax). `correct` has no gradient.
    """
    _, _, _, weight = check_cross_entropy_inputs(x, w, labels, mask, op="linear_cross_entropy_reference")
    logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * weight)
    return jnp.sum(ce * weight), jax.lax.stop_gradient(correct)

"""The lm_head + softmax cross-entropy of training without [N, V] logits, beside the reference it is tested against.

- `linear_cross_entropy_reference`: logits = x @ w in full, then masked cross-entropy and argmax count (what
  k2jax.training.step computed before); ground truth.
- `linear_cross_entropy`: the same sums, chunked over tokens and vocabulary with a custom VJP that recomputes each
  block's logits in the backward; the training loss (k2jax.training.step.lm_head_cross_entropy).
"""

from pallas_kernels.cross_entropy.chunked import linear_cross_entropy
from pallas_kernels.cross_entropy.reference import linear_cross_entropy_reference

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference"]

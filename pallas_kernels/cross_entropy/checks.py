"""Argument checks at the public boundary of the cross-entropy ops (trace time)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_cross_entropy_inputs(x, w, labels, mask, *, op: str):
    """Validate x [N, D] float, w [D, V] float, labels int [N], mask [N] (bool or float) or None.
    Returns (N, D, V, mask as float32 [N])."""
    for name, a in (("x", x), ("w", w)):
        if getattr(a, "ndim", None) != 2:
            raise ValueError(f"{op}: {name} must be a 2-D array ({'[N, D]' if name == 'x' else '[D, V]'}), got shape "
                             f"{getattr(a, 'shape', type(a))}")
        if not any(jnp.dtype(a.dtype) == jnp.dtype(d) for d in _FLOATS):
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {a.dtype}")
    N, D = x.shape
    if w.shape[0] != D or w.shape[1] == 0:
        raise ValueError(f"{op}: w must be [D, V] with x's D={D} and V >= 1, got {w.shape}")
    if getattr(labels, "shape", None) != (N,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{op}: labels must be an int array [N] = [{N}], got "
                         f"{getattr(labels, 'dtype', type(labels))}{list(getattr(labels, 'shape', ()))}")
    if mask is None:
        mask = jnp.ones((N,), jnp.float32)
    else:
        if getattr(mask, "shape", None) != (N,):
            raise ValueError(f"{op}: mask must be [N] = [{N}] (per-token weights, 0 = not counted), got "
                             f"{getattr(mask, 'shape', type(mask))}")
        if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.floating)):
            raise ValueError(f"{op}: mask must be bool or float, got {mask.dtype}")
        mask = mask.astype(jnp.float32)
    return N, D, w.shape[1], mask


def check_block(value, name: str, *, op: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return int(value)

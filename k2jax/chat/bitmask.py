"""Grammar masks on the device: the per-row token bitmask applied to the logits inside the jitted decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array, active: jax.Array) -> jax.Array:
    """Logits with the tokens a row's grammar forbids set to -inf; inactive rows are returned unchanged (bit for bit).

    logits: float [B, V]; bitmask: int32 [B, W] with W = ceil(V / 32), bit j of word w allowing token 32 w + j (as
    k2jax.chat.grammar writes it); active: bool [B], True for constrained rows. Returns logits' dtype and shape.
    Jittable; the unpacking is elementwise, so XLA fuses it into one pass over the logits.
    """
    B, V = logits.shape
    if bitmask.shape != (B, (V + 31) // 32) or active.shape != (B,):
        raise ValueError(f"apply_token_bitmask: logits {logits.shape} need bitmask [{B}, {(V + 31) // 32}] and "
                         f"active [{B}], got {bitmask.shape} and {active.shape}")
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = jnp.right_shift(bitmask.astype(jnp.int32)[:, :, None], shifts) & 1  # arithmetic shift: bit 31 works too
    allowed = bits.reshape(B, -1)[:, :V].astype(bool) | ~active[:, None]
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, logits.dtype))

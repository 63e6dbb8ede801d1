"""Causal depthwise short convolution followed by SiLU (the q/k/v `ShortConvolution` of a KDA layer).

Weight layout: ours is `weight[i, c]` with shape [W, C]; HF/torch stores `conv.weight[c, 0, i]` with shape
[C, 1, W]. So `ours = hf[:, 0, :].T`. In both, index W-1 multiplies the current token:

    y_t[c] = SiLU( sum_{i=0..W-1} weight[i, c] * x_{t-W+1+i}[c] )

Positions before the start of a sequence read the conv state (the previous W-1 pre-conv inputs, oldest first)
or zero. With `segment_ids` (int [B, T]; 0 = padding) taps never cross a segment boundary and padding is
transparent: each token sees the previous real tokens of its own segment, padding anywhere in the row is
skipped, padding outputs are zero, and the row's first real segment continues from `conv_state`, exactly as the
KDA ops treat `initial_state`. So a left-padded row gives the unpadded row's outputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.sharding import make_param


def _torch_conv_init(kernel_size: int):
    # torch Conv1d default (kaiming_uniform with a=sqrt(5)) for a depthwise conv: U(-1/sqrt(W), 1/sqrt(W)).
    bound = 1.0 / math.sqrt(kernel_size)

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _take_time(x, idx):
    """x: [B, N, C], idx: int [B, M] -> x[b, idx[b, m], :] as [B, M, C]."""
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


def _runs(seg):
    """For ids seg [B, T]: (start of each position's run of equal ids [B, T], position within that run [B, T])."""
    T = seg.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)
    changed = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(changed, t, 0), axis=1)
    return start, t - start


class ShortConv(nnx.Module):
    """Causal depthwise conv1d (no bias) over time, then SiLU. Param `weight` [W, C], logical ('conv', channel_axis).

    `channel_axis` names the sharded channel dim ('heads': the KDA channels are the flattened heads x head_dim).
    Compute: float32 accumulation and SiLU, output in `dtype`. States hold pre-conv inputs in `dtype`.
    """

    def __init__(self, channels: int, kernel_size: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32, channel_axis: str = "heads"):
        if kernel_size < 1 or channels < 1:
            raise ValueError(f"ShortConv: channels and kernel_size must be positive, got {channels}, {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        self.dtype = jnp.dtype(dtype)
        self.weight = make_param(rngs, (kernel_size, channels), ("conv", channel_axis),
                                 init=_torch_conv_init(kernel_size), dtype=param_dtype)

    # ---- checks ------------------------------------------------------------------------------------------------
    def _check_state(self, conv_state, B: int, op: str):
        want = (B, self.kernel_size - 1, self.channels)
        if conv_state is not None and tuple(conv_state.shape) != want:
            raise ValueError(f"ShortConv.{op}: conv_state must be [B, W-1, C] = {want}, got {conv_state.shape}")

    def _check_x(self, x, segment_ids):
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(f"ShortConv: x must be [B, T, C={self.channels}], got shape {x.shape}")
        if segment_ids is not None:
            if tuple(segment_ids.shape) != tuple(x.shape[:2]):
                raise ValueError(f"ShortConv: segment_ids must be [B, T] = {x.shape[:2]}, got {segment_ids.shape}")
            if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise ValueError(f"ShortConv: segment_ids must be integers, got {segment_ids.dtype}")

    # ---- forward -----------------------------------------------------------------------------------------------
    def __call__(self, x, segment_ids=None, conv_state=None):
        """x: [B, T, C]; segment_ids: int [B, T] or None; conv_state: [B, W-1, C] or None (zeros).

        Returns (y [B, T, C] in `dtype`, new_conv_state [B, W-1, C] in `dtype`). The new state is the context a
        next token of the row's last real segment would see: its last W-1 real pre-conv inputs, preceded by the
        old state when that segment is the row's first and shorter than W-1 (zeros if it is a later segment).
        """
        self._check_x(x, segment_ids)
        B, T, C = x.shape
        W = self.kernel_size
        self._check_state(conv_state, B, "__call__")
        x = x.astype(self.dtype)
        state = jnp.zeros((B, W - 1, C), self.dtype) if conv_state is None else conv_state.astype(self.dtype)
        if segment_ids is None:
            xe = jnp.concatenate([state, x], axis=1)
            y = self._taps(xe, T, valid=None)
            return y.astype(self.dtype), xe[:, T:]
        return self._segmented(x, segment_ids.astype(jnp.int32), state)

    def _taps(self, xe, T: int, valid):
        """SiLU(sum_j w[W-1-j] * xe[W-1+t-j]) in float32; valid(j) -> bool [B, T] masks tap j (None: all)."""
        W = self.kernel_size
        w = self.weight[...].astype(jnp.float32)
        acc = jnp.zeros((xe.shape[0], T, xe.shape[2]), jnp.float32)
        for j in range(W):
            shifted = xe[:, W - 1 - j: W - 1 - j + T].astype(jnp.float32)
            if valid is not None:
                shifted = jnp.where(valid(j)[:, :, None], shifted, 0.0)
            acc = acc + w[W - 1 - j] * shifted
        return jax.nn.silu(acc)

    def _segmented(self, x, seg, state):
        # Move each row's real tokens to the front (stable), so that "the j-th previous real token" is a static
        # shift; runs of equal ids are then the segments, and the first run is the one that reads `state`.
        B, T, C = x.shape
        real = seg != 0
        perm = jnp.argsort(jnp.logical_not(real).astype(jnp.int32), axis=1, stable=True)
        seg_c = jnp.take_along_axis(seg, perm, axis=1)
        start, pos = _runs(seg_c)
        xe = jnp.concatenate([state, _take_time(x, perm)], axis=1)
        y_c = self._taps(xe, T, valid=lambda j: (pos >= j) | (start == 0))
        y_c = jnp.where((seg_c != 0)[:, :, None], y_c, 0.0)
        y = _take_time(y_c, jnp.argsort(perm, axis=1))
        return y.astype(self.dtype), self._final_state(xe, real.sum(axis=1).astype(jnp.int32), start)

    def _final_state(self, xe, n_real, start):
        """Context after the last real token: slot s holds compact token n_real-(W-1)+s (xe index n_real+s)."""
        W = self.kernel_size
        s = jnp.arange(W - 1, dtype=jnp.int32)
        last_start = jnp.take_along_axis(start, jnp.maximum(n_real - 1, 0)[:, None], axis=1)  # [B, 1]
        rel = n_real[:, None] - (W - 1) + s[None, :]
        keep = (rel >= last_start) | (last_start == 0)
        return jnp.where(keep[:, :, None], _take_time(xe, n_real[:, None] + s[None, :]), 0).astype(self.dtype)

    def step(self, x_t, conv_state):
        """One decode token. x_t: [B, C]; conv_state: [B, W-1, C] (previous pre-conv inputs, oldest first).

        Returns (y_t [B, C], new_conv_state [B, W-1, C]) in `dtype`: the window [state, x_t] rolled by one.
        """
        if x_t.ndim != 2 or x_t.shape[-1] != self.channels:
            raise ValueError(f"ShortConv.step: x_t must be [B, C={self.channels}], got shape {x_t.shape}")
        self._check_state(conv_state, x_t.shape[0], "step")
        window = jnp.concatenate([conv_state.astype(self.dtype), x_t.astype(self.dtype)[:, None]], axis=1)
        y = jnp.einsum("bwc,wc->bc", window.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        return jax.nn.silu(y).astype(self.dtype), window[:, 1:]

"""Rotary position embedding for MLA with RoPE (Kimi K2 / DeepSeek-V3), including YaRN context extension.

Kimi Linear's MLA is NoPE and never calls `apply_rope`; Kimi K2 uses everything here.

Semantics follow the DeepSeek-V3 Hugging Face code:

* Frequencies. Plain RoPE: ``inv_freq[j] = theta ** (-2j / R)`` for ``j < R/2`` (``R = qk_rope_head_dim``).
  YaRN (``rope_scaling.type == "yarn"``, factor ``s``, original context ``L0``): each frequency is blended
  between the original one ("extrapolation") and the one divided by ``s`` ("interpolation"),

      inv_freq[j] = inv_freq_orig[j] / s * ramp[j] + inv_freq_orig[j] * (1 - ramp[j]),
      ramp[j]     = clip((j - low) / (high - low), 0, 1),

  where ``low = floor(d(beta_fast))``, ``high = ceil(d(beta_slow))`` clamped to ``[0, R - 1]``, and
  ``d(n) = R * ln(L0 / (2 pi n)) / (2 ln theta)`` is the index whose wavelength fits ``n`` times into ``L0``
  (``high`` gets +0.001 when ``low == high``). Fast (low-index) frequencies are kept, slow ones interpolated.
* Attention scale on cos/sin. YaRN multiplies cos and sin (hence both rotated q_pe and k_pe) by
  ``m(s, mscale) / m(s, mscale_all_dim)`` with ``m(s, a) = 0.1 a ln(s) + 1`` for ``s > 1`` (else 1), or by
  ``rope_scaling.attention_factor`` when that is given (transformers' explicit form; k2jax.hf fills it in when
  transformers' own rule for a `rope_parameters` dict differs from this one).
* Softmax scale. ``qk_head_dim ** -0.5``, times ``m(s, mscale_all_dim) ** 2`` when rope_scaling is set and
  ``mscale_all_dim`` is non-zero (this applies to the whole q.k score, the no-position part included).
  For Kimi K2 (mscale = mscale_all_dim = 1, s = 32) the cos/sin scale is 1.0 and the softmax scale is
  ``192 ** -0.5 * (0.1 ln 32 + 1) ** 2``.

Layout (the subtle part). The checkpoint's q_pe / k_pe channels are *interleaved pairs*: channels ``(2j, 2j+1)``
form the complex number rotated by the angle ``pos * inv_freq[j]``. The HF code first permutes each rope vector
from interleaved to half layout, ``x' = [x0, x2, x4, ..., x1, x3, x5, ...]`` (``view(R/2, 2).transpose``), and then
applies the usual ``x' * cos + rotate_half(x') * sin`` with ``cos = cos(cat(freqs, freqs))``. `apply_rope` does the
same thing in one step and returns the result in that **half layout**:

    out[j]       = (x[2j]   cos(a_j) - x[2j+1] sin(a_j)) * mscale
    out[j + R/2] = (x[2j+1] cos(a_j) + x[2j]   sin(a_j)) * mscale

so rotated q_pe / k_pe (and a latent k_pe cache) are bit-for-bit in HF's order. Dot products q_pe . k_pe are the
same in either layout, since both sides get the same permutation.

transformers' DeepSeek-V3 does exactly this when `rope_interleave` is true (its default, `apply_rotary_pos_emb_
interleave`). With `rope_interleave: false` it applies `rotate_half` to the channels as stored, i.e. the pairs are
``(j, j + R/2)``: `apply_rope(..., interleaved=False)` (config field `rope_interleave`) computes

    out[j]       = (x[j]       cos(a_j) - x[j + R/2] sin(a_j)) * mscale
    out[j + R/2] = (x[j + R/2] cos(a_j) + x[j]       sin(a_j)) * mscale

which is the same formula with the pair members taken from the two halves instead of even/odd channels.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# DeepSeek-V3 HF defaults for keys absent from rope_scaling.
_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction m(s, a) = 0.1 a ln(s) + 1 for s > 1, and 1.0 otherwise."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, original_max_pos: int) -> float:
    # Index j (in units of channels) whose wavelength 2 pi theta^(j/dim) fits `num_rotations` times in L0.
    return dim * math.log(original_max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          original_max_pos: int) -> tuple[int, int]:
    """(low, high) frequency indices of the YaRN ramp, floored/ceiled and clamped to [0, dim - 1]."""
    low = math.floor(_correction_dim(beta_fast, dim, base, original_max_pos))
    high = math.ceil(_correction_dim(beta_slow, dim, base, original_max_pos))
    return max(low, 0), min(high, dim - 1)


def _yarn_params(rope_scaling: dict) -> dict:
    p = dict(_YARN_DEFAULTS)
    p.update({k: rope_scaling[k] for k in _YARN_DEFAULTS if rope_scaling.get(k) is not None})
    p["factor"] = float(rope_scaling["factor"])
    p["original_max_position_embeddings"] = int(rope_scaling["original_max_position_embeddings"])
    return p


def yarn_attention_factor(rope_scaling: dict) -> float:
    """The cos/sin scale of a YaRN `rope_scaling` dict: its `attention_factor` if given, else
    m(factor, mscale) / m(factor, mscale_all_dim) with the released DeepSeek-V3 defaults (mscale 1,
    mscale_all_dim 0)."""
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    p = _yarn_params(rope_scaling)
    return yarn_get_mscale(p["factor"], p["mscale"]) / yarn_get_mscale(p["factor"], p["mscale_all_dim"])


def rope_frequencies(config) -> tuple[np.ndarray, float]:
    """(inv_freq [qk_rope_head_dim / 2] float32, attention_scale) for `config` (plain RoPE or YaRN).

    attention_scale multiplies cos and sin (1.0 without scaling; with YaRN rope_scaling.attention_factor if given,
    else m(s, mscale) / m(s, mscale_all_dim)).
    Computed in float64 on the host and rounded once to float32.
    """
    dim, base = int(config.qk_rope_head_dim), float(config.rope_theta)
    if dim % 2:
        raise ValueError(f"rope_frequencies: qk_rope_head_dim={dim} must be even")
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if config.rope_scaling is None or dim == 0:
        return inv_freq.astype(np.float32), 1.0
    p = _yarn_params(config.rope_scaling)
    s = p["factor"]
    low, high = yarn_correction_range(p["beta_fast"], p["beta_slow"], dim, base,
                                      p["original_max_position_embeddings"])
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    inv_freq = inv_freq / s * ramp + inv_freq * (1.0 - ramp)
    return inv_freq.astype(np.float32), yarn_attention_factor(config.rope_scaling)


def softmax_scale(config) -> float:
    """Score scale: qk_head_dim**-0.5, times m(factor, mscale_all_dim)**2 when rope_scaling sets mscale_all_dim."""
    scale = float(config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rs = config.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_get_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        scale *= m * m
    return scale


def apply_rope(x, positions, inv_freq, mscale: float = 1.0, interleaved: bool = True):
    """Rotate channel pairs of x and return them in HF's half layout (see the module docstring).

    x: [..., T, H, R] in checkpoint channel order: pairs (2j, 2j+1) when `interleaved` (the released DeepSeek-V3 /
    K2 layout), else (j, j + R/2) (transformers' `rope_interleave: false`); positions: int [T] or [..., T] matching
    the dims of x before H (e.g. [B, T] for x [B, T, H, R]); inv_freq: [R/2]. Returns x's shape and dtype, computed
    in float32 (angles are positions * inv_freq in float32, as HF).
    """
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    positions = jnp.asarray(positions)
    if x.ndim < 3:
        raise ValueError(f"apply_rope: x must be [..., T, H, R], got shape {x.shape}")
    if inv_freq.ndim != 1 or x.shape[-1] != 2 * inv_freq.shape[0]:
        raise ValueError(f"apply_rope: x's last dim {x.shape[-1]} must be 2 * len(inv_freq) = "
                         f"{2 * inv_freq.shape[0] if inv_freq.ndim == 1 else inv_freq.shape}")
    lead = x.shape[:-2]
    if positions.ndim < 1 or positions.ndim > len(lead) or positions.shape != lead[len(lead) - positions.ndim:]:
        raise ValueError(f"apply_rope: positions shape {positions.shape} must match the trailing dims of "
                         f"x.shape[:-2] = {lead} (e.g. [T] or [B, T])")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"apply_rope: positions must be integers, got {positions.dtype}")
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, R/2]
    cos = (jnp.cos(angles) * mscale)[..., None, :]  # broadcast over heads
    sin = (jnp.sin(angles) * mscale)[..., None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    first, second = (xf[..., 0::2], xf[..., 1::2]) if interleaved else (xf[..., :half], xf[..., half:])
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(x.dtype)

"""A bias-free linear layer with logical axis names, the building block of every projection."""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from k2jax.sharding import make_param

# checkpoint_name of every Linear output: remat's dot policies (k2jax.model) save these, since the dot inside
# `dot_f32`'s custom VJP is not a dot_general they can see.
PROJECTION_NAME = "linear_projection"

# The CPU-only paths of the layers (each exact: the same outputs and gradients up to float32 summation order), by
# name: Linear's transposed-input weight gradient (`dot_f32`), and MLA's training attention in the absorbed form
# where it costs no more FLOPs than the expanded one (k2jax.layers.mla). A layer asks `cpu_path(name)` when it is
# traced; bench/train_ab.py turns them off (`cpu_paths_off`) to measure what each buys in the full training step.
# (Hand-written backwards of the short conv, the norms and the SwiGLU activation measured 0.98-1.07x: not kept.)
CPU_PATHS = ("linear", "mla_absorbed")
_paths_off: set = set()


def cpu_path(name: str) -> bool:
    """True when the program is being traced for CPU and the CPU-only backward `name` (one of CPU_PATHS) is on."""
    if name not in CPU_PATHS:
        raise ValueError(f"cpu_path: name must be one of {CPU_PATHS}, got {name!r}")
    return jax.default_backend() == "cpu" and name not in _paths_off


@contextlib.contextmanager
def cpu_paths_off(*names: str):
    """Within the block, functions traced use autodiff's plain backward instead of the CPU-only ones `names`
    (a jitted function keeps the program it was first traced with: trace it inside the block)."""
    bad = [n for n in names if n not in CPU_PATHS]
    if bad:
        raise ValueError(f"cpu_paths_off: names must be among {CPU_PATHS}, got {bad}")
    before = set(_paths_off)
    _paths_off.update(names)
    try:
        yield
    finally:
        _paths_off.clear()
        _paths_off.update(before)


@jax.custom_vjp
def dot_f32(x, w):
    """x [..., in] @ w [in, out] (one dtype) with float32 accumulation -> float32 [..., out].

    The backward is autodiff's up to float32 summation order, but the forward saves x transposed, [in, tokens],
    and the weight gradient is x^T dy from it. Why: for x^T dy XLA:CPU wants one operand transposed with the tokens
    minor; left to itself it transposes dy and fuses dy's producer (the backward of the SiLU, norm or short conv
    after the projection) into that transpose, a loop that reads every input with a stride of `out` elements
    (one such fusion took 4-6% of the default training step). Transposing x, the materialised layer input,
    is a plain copy, once per layer input (XLA merges the copies of the projections that share it); the default
    training step ran 0.85-0.93x the time (in-process A/B, docs/results.md). Remat's dot-saving policies do not
    see inside a custom VJP: Linear names its output PROJECTION_NAME, which k2jax.model's policies also save.
    Linear uses it only when tracing on CPU: on TPU/GPU the compilers pick the dots' operand layouts themselves,
    and an explicit transposed copy of every layer input would only cost memory traffic.
    """
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _dot_f32_fwd(x, w):
    return dot_f32(x, w), (jnp.transpose(x.reshape(-1, x.shape[-1])), w, x.shape)


def _dot_f32_bwd(residuals, dy):
    x_t, w, x_shape = residuals
    dw = jnp.dot(x_t, dy.reshape(-1, dy.shape[-1]), preferred_element_type=jnp.float32)
    dx = jnp.dot(dy, w.T.astype(jnp.float32), preferred_element_type=jnp.float32)
    return dx.reshape(x_shape).astype(x_t.dtype), dw.astype(w.dtype)


dot_f32.defvjp(_dot_f32_fwd, _dot_f32_bwd)


class Linear(nnx.Module):
    """y = x @ kernel, with kernel [in, out] (HF stores [out, in]: the loader transposes).

    `dtype` is the compute dtype (inputs and kernel are cast to it; accumulation is float32 on every backend
    and the result is returned in `dtype`). On CPU the product is `dot_f32` (see there for its backward).
    """

    def __init__(self, in_features: int, out_features: int, *, names: Sequence[str | None], rngs: nnx.Rngs,
                 std: float = 0.02, param_dtype=jnp.float32, dtype=jnp.float32):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = make_param(rngs, (in_features, out_features), names, std=std, dtype=param_dtype)

    def __call__(self, x):
        """x: [..., in] -> [..., out] in the compute dtype."""
        w = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        # The transposed-input backward is an XLA:CPU fix (see dot_f32); other backends get autodiff's plain dot.
        y = dot_f32(x, w) if cpu_path("linear") else jnp.dot(x, w, preferred_element_type=jnp.float32)
        return checkpoint_name(y, PROJECTION_NAME).astype(self.dtype)

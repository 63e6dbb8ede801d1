"""Output types for `pallas_call` inside `jax.shard_map`.

With `check_vma=True` (shard_map's default) every `pallas_call` output must say over which manual mesh axes it
varies (`manual_axis_type` of `jax.ShapeDtypeStruct`). `jax.lax.platform_dependent` traces every branch, so this
matters even where the kernel never runs (the XLA path on CPU). Outside shard_map the type is empty and unused.
"""

from __future__ import annotations

import jax


def varying_out(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """jax.ShapeDtypeStruct(shape, dtype) for a kernel output computed from `inputs` (arrays): it varies over the
    manual mesh axes of the input that varies over the most, which must include those of every other input."""
    types = [jax.typeof(x).manual_axis_type for x in inputs]
    widest = max(types, key=lambda t: len(t.varying))
    if any(not t.varying <= widest.varying for t in types):
        raise ValueError(f"varying_out: kernel inputs vary over incomparable mesh axes "
                         f"{[sorted(t.varying) for t in types]}; make them vary over the same axes (jax.lax.pcast)")
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=widest)


def vary_like(x, *refs):
    """x made varying over every manual mesh axis any of `refs` varies over (`jax.lax.pcast`), e.g. a zero initial
    state that a scan carries next to varying inputs (a scan's carry must keep its type). x unchanged outside
    shard_map or when it already varies over those axes."""
    missing = set().union(*(jax.typeof(r).manual_axis_type.varying for r in refs))
    missing -= jax.typeof(x).manual_axis_type.varying
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x

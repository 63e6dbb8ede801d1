"""Shared timing for the benchmarks: the median wall time of a jitted call, compile and warm-up excluded."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int) -> float:
    """Median wall seconds of `fn(*args)` over `repeats` calls, after one excluded call that compiles and warms up.
    Waits for every output (`block_until_ready`), so asynchronous dispatch is not mistaken for speed."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

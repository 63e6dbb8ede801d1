"""Shared timing for the benchmarks: the median wall time of a jitted call, compile and warm-up excluded."""

from __future__ import annotations

import os
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


def _wall(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def interleaved_rate(fn, args, flops: float, ref_fn, ref_args, ref_flops: float, *, repeats: int):
    """(median seconds of fn, median of fn's FLOP rate / ref_fn's FLOP rate) with ref_fn timed right before every
    timed call of fn, so slow drifts in the load of a shared machine cancel in the ratio. Compile and warm-up
    calls of both are excluded."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(ref_fn(*ref_args))
    times, ratios = [], []
    for _ in range(repeats):
        t_ref = _wall(ref_fn, ref_args)
        t = _wall(fn, args)
        times.append(t)
        ratios.append((flops / t) / (ref_flops / t_ref))
    return statistics.median(times), statistics.median(ratios)


def interleaved_medians(fns: dict, args, *, repeats: int) -> dict:
    """{name: median wall seconds} of each `fns[name](*args)`, timed in rounds that call every function once in turn,
    so a change in the load of a shared machine hits them all alike. Compile and warm-up calls excluded."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_wall(fn, args))
    return {name: statistics.median(t) for name, t in times.items()}


def write_report(text: str, out: str | None) -> None:
    """Print a benchmark's markdown report and, with `out`, also write it there (creating its folder)."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")

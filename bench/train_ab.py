"""In-process A/B of the full jitted training step: the layers' CPU-only custom backwards on (new) against some of
them off (old, autodiff's plain backward), both programs in one process, timed in alternating rounds.

    python bench/train_ab.py --off short_conv            # what the short conv's custom backward buys
    python bench/train_ab.py --off all --rounds 8         # all CPU paths (k2jax.layers.linear.CPU_PATHS) together
    python bench/train_ab.py --off norms model.dtype=bfloat16   # any run-config override

Single runs of bench/train_speed.py swing 2x on a shared machine; here both programs see the same load. Each round
runs old then new (new then old on odd rounds), --reps steps each, and records the new / old ratio of the wall time
and of the process CPU time (all threads; less sensitive to other processes' load). Prints the per-round ratios and
their medians, and the first step's loss and gradient norm of each program (equal up to float32 summation order).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

# the repository root first, so that k2jax is this checkout's (not an installed copy's)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.train_profile import train_step_call  # noqa: E402
from k2jax.layers.linear import CPU_PATHS, cpu_paths_off  # noqa: E402
from k2jax.training.config import load_run_config  # noqa: E402


def _traced(mcfg, tcfg, context):
    """(step, [state, batch, index], first step's metrics) of the real train step, traced and compiled inside
    `context` (a context manager: what it switches is read when the step is traced)."""
    with context:
        step_fn, args = train_step_call(mcfg, tcfg)
        state, batch, index = args
        # the step donates its state: keep a copy for the next call, and compile inside the block
        fresh = jax.tree.map(lambda a: a.copy(), state)
        new_state, metrics = step_fn(state, batch, index)
        jax.block_until_ready(new_state)
    return step_fn, [fresh, batch, index], metrics


def _run(step_fn, args, reps):
    """Wall and process-CPU seconds of `reps` steps; the state is carried (the step donates it)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(reps):
        args[0], _ = step_fn(*args)
    jax.block_until_ready(args[0])
    return time.perf_counter() - wall, time.process_time() - cpu


def ab_contexts(mcfg, tcfg, old, new, rounds=6, reps=2):
    """Ratios new / old of the train step traced inside the context manager `old` and inside `new`.

    Returns {'wall': [per-round ratio], 'cpu': [...], 'old_s', 'new_s': median wall seconds per step,
    'loss_old', 'loss_new', 'grad_norm_old', 'grad_norm_new': the first step's loss and gradient norm of each}."""
    old_fn, old_args, old_metrics = _traced(mcfg, tcfg, old)
    new_fn, new_args, new_metrics = _traced(mcfg, tcfg, new)
    ratios = {"wall": [], "cpu": []}
    times = {"old": [], "new": []}
    for r in range(rounds):
        order = (("old", old_fn, old_args), ("new", new_fn, new_args))
        got = {}
        for name, fn, args in (order if r % 2 == 0 else order[::-1]):
            got[name] = _run(fn, args, reps)
            times[name].append(got[name][0] / reps)
        ratios["wall"].append(got["new"][0] / got["old"][0])
        ratios["cpu"].append(got["new"][1] / got["old"][1])
    return {**ratios, "old_s": statistics.median(times["old"]), "new_s": statistics.median(times["new"]),
            **{f"{k}_{name}": float(np.asarray(m[k])) for k in ("loss", "grad_norm")
               for name, m in (("old", old_metrics), ("new", new_metrics))}}


def ab(mcfg, tcfg, off, rounds=6, reps=2):
    """`ab_contexts` of the step with the CPU paths `off` switched off (old) against all of them on (new)."""
    return ab_contexts(mcfg, tcfg, cpu_paths_off(*off), contextlib.nullcontext(), rounds=rounds, reps=reps)


def report(res, old_label, new_label):
    """Print `ab_contexts`'s result."""
    print(f"old: {old_label}; new: {new_label}")
    print(f"first step: loss old {res['loss_old']:.7f} new {res['loss_new']:.7f}, gradient norm old "
          f"{res['grad_norm_old']:.7f} new {res['grad_norm_new']:.7f}")
    print("per-round new/old wall: " + " ".join(f"{r:.3f}" for r in res["wall"]))
    print("per-round new/old CPU:  " + " ".join(f"{r:.3f}" for r in res["cpu"]))
    print(f"median new/old: wall {statistics.median(res['wall']):.3f}, CPU {statistics.median(res['cpu']):.3f} "
          f"(median step: old {res['old_s'] * 1e3:.0f} ms, new {res['new_s'] * 1e3:.0f} ms)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    p.add_argument("--config", default="default")
    p.add_argument("--off", required=True,
                   help=f"comma-separated CPU paths to switch off in the old program ({', '.join(CPU_PATHS)}), "
                        "or 'all'")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=2, help="steps per program per round")
    args = p.parse_args(argv)
    off = CPU_PATHS if args.off == "all" else tuple(n for n in args.off.split(",") if n)
    mcfg, tcfg = load_run_config(args.config, [*args.overrides, "train.mqar_min_kv_pairs=null"])
    res = ab(mcfg, tcfg, off, rounds=args.rounds, reps=args.reps)
    print(f"config {mcfg.name}, batch {tcfg.batch_size} x {tcfg.seq_len}, dtype {mcfg.dtype}")
    report(res, f"{', '.join(off)} off", f"all of {', '.join(CPU_PATHS)} on")
    return res


if __name__ == "__main__":
    main()

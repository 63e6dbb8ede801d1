"""A/B of the full jitted training step of a config, old against new, timed in alternating rounds.

    python bench/train_ab.py --off linear                  # in one process: Linear's CPU backward off vs on
    python bench/train_ab.py --off all model.dtype=bfloat16  # every CPU path (k2jax.layers.linear.CPU_PATHS); overrides
    python bench/train_ab.py --huge-pages --rounds 4       # two processes: K2JAX_HUGE_PAGES=0 vs huge pages
    python bench/train_ab.py --xla-flags=--xla_cpu_use_xnnpack=false   # two processes: XLA_FLAGS as set vs added

Single runs of bench/train_speed.py swing 2x on a shared machine; alternating rounds see the same load. --off: both
programs in one process (`ab_contexts`: traced inside two context managers); each round runs old then new (new then
old on odd rounds), --reps steps each, and records the new / old ratio of the wall time and of the process CPU
time (all threads, user + system; less sensitive to other processes' load); also the first step's loss and
gradient norm of each program (equal up to float32 summation order). --huge-pages: what a process-wide setting
buys (k2jax.training.hostmem, read at process start): each round starts one process per setting (in alternating
order) that runs --reps steps after two warm-up steps and reports wall, CPU and page faults per step.
--xla-flags: the same two-process rounds, the old process with XLA_FLAGS as this one has them, the new one with
the given flags added (XLA reads them once per process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# the repository root first, so that k2jax is this checkout's (not an installed copy's)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.train_profile import train_step_call  # noqa: E402
from k2jax.layers.linear import CPU_PATHS, cpu_paths_off  # noqa: E402
from k2jax.training.config import load_run_config  # noqa: E402
from k2jax.training.hostmem import OPT_OUT, reexec_with_huge_pages  # noqa: E402


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
    """Wall seconds, process-CPU seconds (user + system) and minor page faults of `reps` steps; the state is
    carried (the step donates it)."""
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(reps):
        args[0], _ = step_fn(*args)
    jax.block_until_ready(args[0])
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, after.ru_minflt - before.ru_minflt


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
            got[name] = _run(fn, args, reps)[:2]
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


def _worker(mcfg, tcfg, reps):
    """One process of --huge-pages: two warm-up steps, then `reps` steps; prints a JSON line of per-step figures."""
    step_fn, args, _ = _traced(mcfg, tcfg, contextlib.nullcontext())
    _run(step_fn, args, 1)
    wall, cpu, faults = _run(step_fn, args, reps)
    print(json.dumps({"wall": wall / reps, "cpu": cpu / reps, "faults": faults / reps,
                      "tunables": os.environ.get("GLIBC_TUNABLES", "")}))


def ab_processes(argv, rounds=4, reps=3, xla_flags=None):
    """Ratios new / old of per-step wall and CPU time between a process of this script run with `argv` and
    K2JAX_HUGE_PAGES=0 (old) and one with huge pages (new), alternating which starts first; with `xla_flags`, both
    with huge pages and the new one with those flags added to XLA_FLAGS.

    Returns {'wall': [...], 'cpu': [...], 'old': [per-round dict], 'new': [...]}."""
    out = {"wall": [], "cpu": [], "old": [], "new": []}
    for r in range(rounds):
        got = {}
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            # without the tunable (this process has it after its own re-exec): the new worker adds it itself
            tunables = ":".join(t for t in os.environ.get("GLIBC_TUNABLES", "").split(":")
                                if t and not t.startswith("glibc.malloc.hugetlb"))
            huge_pages = name == "new" or xla_flags is not None
            env = {**os.environ, OPT_OUT: "1" if huge_pages else "0", "GLIBC_TUNABLES": tunables}
            if xla_flags is not None and name == "new":
                env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
            env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/k2jax/jax_cache"))
            run = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--worker", str(reps)],
                                 env=env, check=True, capture_output=True, text=True)
            got[name] = json.loads(run.stdout.strip().splitlines()[-1])
            out[name].append(got[name])
        out["wall"].append(got["new"]["wall"] / got["old"]["wall"])
        out["cpu"].append(got["new"]["cpu"] / got["old"]["cpu"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    p.add_argument("--config", default="default")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--off", help=f"comma-separated CPU paths to switch off in the old program "
                                    f"({', '.join(CPU_PATHS)}), or 'all'")
    mode.add_argument("--huge-pages", action="store_true",
                      help="two processes per round: K2JAX_HUGE_PAGES=0 (old) against huge pages (new)")
    mode.add_argument("--xla-flags", help="two processes per round: XLA_FLAGS as set (old) against these added (new)")
    mode.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=2, help="steps per program per round")
    args = p.parse_args(argv)
    mcfg, tcfg = load_run_config(args.config, [*args.overrides, "train.mqar_min_kv_pairs=null"])
    if args.worker:
        return _worker(mcfg, tcfg, args.worker)
    print(f"config {mcfg.name}, batch {tcfg.batch_size} x {tcfg.seq_len}, dtype {mcfg.dtype}")
    if args.huge_pages or args.xla_flags is not None:
        res = ab_processes([*args.overrides, "--config", args.config], rounds=args.rounds, reps=args.reps,
                           xla_flags=args.xla_flags)
        labels = ({"old": "XLA_FLAGS as set", "new": f"+ {args.xla_flags}"} if args.xla_flags is not None
                  else {"old": "K2JAX_HUGE_PAGES=0", "new": "huge pages"})
        for name in ("old", "new"):
            print(f"{name} ({labels[name]}), per step and round: " +
                  "; ".join(f"wall {x['wall'] * 1e3:.0f} ms, CPU {x['cpu'] * 1e3:.0f} ms, {x['faults']:.0f} faults"
                            for x in res[name]))
        print("per-round new/old wall: " + " ".join(f"{r:.3f}" for r in res["wall"]))
        print("per-round new/old CPU:  " + " ".join(f"{r:.3f}" for r in res["cpu"]))
        print(f"median new/old: wall {statistics.median(res['wall']):.3f}, CPU {statistics.median(res['cpu']):.3f}")
        return res
    off = CPU_PATHS if args.off == "all" else tuple(n for n in args.off.split(",") if n)
    res = ab(mcfg, tcfg, off, rounds=args.rounds, reps=args.reps)
    report(res, f"{', '.join(off)} off", f"all of {', '.join(CPU_PATHS)} on")
    return res


if __name__ == "__main__":
    reexec_with_huge_pages()
    main()

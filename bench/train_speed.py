"""Training throughput of a config on this machine: tokens/s and MFU against the machine's own matmul rate.

    python bench/train_speed.py                                  # configs/default.yaml, its MQAR batch (~1 min)
    python bench/train_speed.py --config tiny --batch 8 --seq-len 128 --steps 5
    python bench/train_speed.py model.dtype=bfloat16             # any run-config override

Runs the real training step (k2jax.training.step: forward, backward, AdamW, router-bias update) for --steps steps after
one compile step, on MQAR batches of the given shape, with checkpoints and evaluation off. The reference rate is
the best float32 n x n x n matmul (`k2jax.training.metrics.measure_matmul_flops`, n = --matmul-n) on the same devices,
measured before and after the run (the faster kept);
MFU = model FLOPs per token (k2jax.training.metrics.train_flops_per_token, formula in its docstring) x tokens/s / that
rate. Times are medians over the measured steps. Like train.py, it restarts itself once with huge pages for malloc
(k2jax.training.hostmem; K2JAX_HUGE_PAGES=0 measures without).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

# the repository root first, so that k2jax is this checkout's (not an installed copy's)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench.train_profile import format_op_table, format_table, op_profile, profile_step, train_step_call  # noqa: E402
from k2jax.model import count_params  # noqa: E402
from k2jax.training.config import load_run_config  # noqa: E402
from k2jax.training.hostmem import reexec_with_huge_pages  # noqa: E402
from k2jax.training.loop import train  # noqa: E402
from k2jax.training.metrics import measure_matmul_flops, train_flops_per_token  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    p.add_argument("--config", default="default")
    p.add_argument("--batch", type=int, help="global batch (default: the config's train.batch_size)")
    p.add_argument("--seq-len", type=int, help="default: the config's train.seq_len")
    p.add_argument("--steps", type=int, default=8, help="measured steps (after one compile step)")
    p.add_argument("--matmul-n", type=int, default=1024)
    p.add_argument("--profile", action="store_true",
                   help="time the step's pieces (bench/train_profile.py) instead of a training run; prints a table")
    p.add_argument("--profile-out", default=None, help="with --profile: also write the table (markdown) here")
    p.add_argument("--trace-dir", default=None,
                   help="with --profile: also trace 3 steps there (jax.profiler) and print their XLA ops by component")
    p.add_argument("--rounds", type=int, default=5, help="with --profile: interleaved timing rounds (medians)")
    args = p.parse_args(argv)
    extra = [f"train.steps={args.steps + 1}", "train.checkpoint_every=0", "train.eval_every=0",
             "train.progress=false", "train.tensorboard=false", "train.mqar_min_kv_pairs=null"]
    if args.batch:
        extra.append(f"train.batch_size={args.batch}")
    if args.seq_len:
        extra.append(f"train.seq_len={args.seq_len}")
    with tempfile.TemporaryDirectory() as tmp:
        mcfg, tcfg = load_run_config(args.config, [*args.overrides, *extra, f"train.run_dir={tmp}"])
        if args.profile:
            return _profile(mcfg, tcfg, args)
        peak = measure_matmul_flops(args.matmul_n)
        result = train(mcfg, tcfg.replace(peak_flops=peak))
        # again after the run, keeping the faster: in about one fresh process in six on the 2-core machine the
        # first measure read ~110 GFLOP/s against ~200 (sometimes for the whole process), which doubled the MFU
        peak = max(peak, measure_matmul_flops(args.matmul_n))
    steps = [m for m in result.metrics if not m.get("includes_compile")]
    step_s = statistics.median(m["step_time"] for m in steps)
    tok_s = tcfg.batch_size * tcfg.seq_len / step_s
    fpt = train_flops_per_token(mcfg, tcfg.seq_len)
    n = jax.device_count()
    counts = count_params(mcfg)
    print(f"config {mcfg.name}: {counts['total']:,} parameters ({counts['active']:,} active), layers "
          f"{''.join('K' if t == 'kda' else 'M' for t in mcfg.layer_types)}, dtype {mcfg.dtype}, "
          f"{n} {jax.devices()[0].platform} device(s)")
    print(f"{'batch':>6} {'seq':>5} {'step s':>8} {'tokens/s':>10} {'FLOP/token':>11} {'model GFLOP/s':>14} "
          f"{'matmul GFLOP/s':>15} {'MFU':>7}")
    print(f"{tcfg.batch_size:>6} {tcfg.seq_len:>5} {step_s:>8.3f} {tok_s:>10.0f} {fpt:>11.3g} "
          f"{fpt * tok_s / 1e9:>14.2f} {peak * n / 1e9:>15.2f} {fpt * tok_s / (peak * n):>7.2%}")
    return {"step_s": step_s, "tokens_per_s": tok_s, "flops_per_token": fpt, "matmul_flops": peak * n,
            "mfu": fpt * tok_s / (peak * n)}


def _profile(mcfg, tcfg, args):
    rows = profile_step(mcfg, tcfg, rounds=args.rounds)
    peak = measure_matmul_flops(args.matmul_n)
    step_s = dict((n, s) for n, s, _ in rows)["train step (jitted)"]
    fpt = train_flops_per_token(mcfg, tcfg.seq_len)
    mfu = fpt * tcfg.batch_size * tcfg.seq_len / step_s / (peak * jax.device_count())
    table = format_table(rows)
    micro = f" in {tcfg.grad_accum_steps} micro-batches" if tcfg.grad_accum_steps > 1 else ""
    head = (f"config {mcfg.name}, batch {tcfg.batch_size} x {tcfg.seq_len}{micro}, dtype {mcfg.dtype}, optimizer "
            f"{tcfg.optimizer}: jitted step {step_s * 1e3:.0f} ms, MFU of the jitted step {mfu:.1%} "
            f"(matmul {peak / 1e9:.0f} GFLOP/s)")
    if args.trace_dir:
        ops = op_profile(*train_step_call(mcfg, tcfg), args.trace_dir)
        table += "\n\nXLA ops of the traced step (jax.profiler trace in " + args.trace_dir + "):\n\n" + format_op_table(ops)
    print(head)
    print(table)
    if args.profile_out:
        with open(args.profile_out, "w") as f:
            f.write(head + "\n\n" + table + "\n")
    return {"rows": rows, "mfu_jitted": mfu}


if __name__ == "__main__":
    reexec_with_huge_pages()  # as train.py does (k2jax.training.hostmem; K2JAX_HUGE_PAGES=0: off)
    main()

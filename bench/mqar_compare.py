"""Steps to MQAR recall for the hybrid KDA/MLA model against an all-MLA and an all-KDA model of the same shape.

    python bench/mqar_compare.py                       # the three models of configs/default.yaml, 10 min each
    python bench/mqar_compare.py --minutes 3 --models hybrid,mla train.steps=300
    python bench/mqar_compare.py --plot bench/out/mqar_compare.png

Each model trains with the run config's training settings (default: configs/default.yaml's `train:` section) and
evaluates every --eval-every steps on held-out rows with the full number of key-value pairs; a run stops at
--target accuracy, at train.steps, or after --minutes of wall time. The three models differ only in the attention
of each layer (same widths, MoE, depth): 'hybrid' is the config's own layer list, 'mla' makes every layer MLA and
'kda' every layer KDA; their parameter counts are printed. Prints a table (steps and minutes to the target, or the
best accuracy reached) and writes the curves as JSON (and a PNG with --plot, which needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from k2jax.model import count_params
from k2jax.training.config import load_run_config
from k2jax.training.loop import train

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ("hybrid", "mla", "kda")


def _variant_overrides(name: str, num_layers: int) -> list[str]:
    if name == "hybrid":
        return []
    if name == "mla":
        return ["model.kda_layers=null", "model.full_attn_layers=null"]
    if name == "kda":
        return [f"model.kda_layers={list(range(1, num_layers + 1))}", "model.full_attn_layers=[]"]
    raise SystemExit(f"unknown model {name!r}; choose from {VARIANTS}")


def run_one(config: str, name: str, overrides: list[str], minutes: float, target: float, eval_every: int) -> dict:
    base_model, _ = load_run_config(config, overrides)
    extra = _variant_overrides(name, base_model.num_hidden_layers)
    with tempfile.TemporaryDirectory() as tmp:
        mcfg, tcfg = load_run_config(config, [*overrides, *extra, f"train.run_dir={tmp}", "train.checkpoint_every=0",
                                              f"train.eval_every={eval_every}", f"train.stop_at_accuracy={target}"])
        t0 = time.perf_counter()

        def budget(step, metrics, state):
            return "stop" if time.perf_counter() - t0 > minutes * 60 else None

        result = train(mcfg, tcfg, callbacks=[budget])
    reached = next((e for e in result.evals if e["accuracy"] >= target), None)
    best = max(result.evals, key=lambda e: e["accuracy"]) if result.evals else None
    return {"model": name, "layers": "".join("K" if t == "kda" else "M" for t in mcfg.layer_types),
            "params": count_params(mcfg)["total"], "steps_run": result.step, "stopped": result.stopped,
            "minutes": (time.perf_counter() - t0) / 60, "target": target,
            "steps_to_target": reached["step"] if reached else None,
            "minutes_to_target": reached["time_s"] / 60 if reached else None,
            "best_accuracy": best["accuracy"] if best else None, "best_step": best["step"] if best else None,
            "curve": [{k: e[k] for k in ("step", "accuracy", "loss", "time_s")} for e in result.evals]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value run-config overrides applied to every model")
    p.add_argument("--config", default="default")
    p.add_argument("--models", default="hybrid,mla,kda")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-time budget per model")
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--out", default="bench/out/mqar_compare.json")
    p.add_argument("--plot", help="write a PNG of accuracy against steps here")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        rows.append(run_one(args.config, name, args.overrides, args.minutes, args.target, args.eval_every))
        r = rows[-1]
        print(f"{name}: {r['steps_run']} steps in {r['minutes']:.1f} min, best accuracy {r['best_accuracy']:.3f}",
              flush=True)
    print(f"\n{'model':>7} {'layers':>7} {'params':>9} {'steps to ' + format(args.target, '.0%'):>13} "
          f"{'min to ' + format(args.target, '.0%'):>11} {'best acc':>9} {'at step':>8} {'steps run':>10}")
    for r in rows:
        st = r["steps_to_target"] if r["steps_to_target"] is not None else "-"
        mt = f"{r['minutes_to_target']:.1f}" if r["minutes_to_target"] is not None else "-"
        print(f"{r['model']:>7} {r['layers']:>7} {r['params']:>9,} {st:>13} {mt:>11} {r['best_accuracy']:>9.3f} "
              f"{r['best_step']:>8} {r['steps_run']:>10}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    if args.plot:
        import matplotlib  # noqa: PLC0415 (optional: the dev extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: the dev extra)

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            ax.plot([c["step"] for c in r["curve"]], [c["accuracy"] for c in r["curve"]], marker="o",
                    label=f"{r['model']} ({r['layers']})")
        ax.axhline(args.target, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("MQAR answer accuracy (held-out)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return rows


if __name__ == "__main__":
    main()

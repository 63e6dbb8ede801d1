"""Long-context benchmark: memory and time of the forward, forward + backward and serving prefill against the
sequence length T, for the default config and for one KDA and one MLA layer at Kimi-Linear-48B widths, and the
48B dry run at long sequence lengths.

    python bench/long_context.py                                   # model, layers, serve (CPU-sized: hours)
    python bench/long_context.py --sections model --lengths 1024,16384,65536 --time-max 8192
    python bench/long_context.py --sections serve --serve-len 131072   # runner pieces, then serve.py end to end
    python bench/long_context.py --sections dry_run --dry-devices 64    # 48B at 32,768 and 131,072 tokens

Each point runs in a fresh subprocess, so its peak resident memory (`resource.getrusage`) is its own.
- memory: XLA's estimate of the compiled program's temporary buffers (`compiled.memory_analysis()`, compile only,
  every T) and, where the program also ran (T <= --time-max), the process's peak RSS and its RSS before compiling;
- time: median of --repeats runs after a first (compiling) one;
- model: the `default` config, batch 1, float32: forward = logits [1, T, vocab]; forward + backward = gradients of
  the training loss (k2jax.training.step.lm_head_cross_entropy: blockwise lm_head + cross-entropy) with respect
  to every parameter;
- layers: one KDA and one MLA layer (the 48B config's widths, float32), x [1, T, hidden]: forward, and gradients of
  sum(y) with respect to the parameters and x;
- serve: (1) the `default` model in a `ModelRunner` (the engine's compiled half; one slot, context --serve-len +
  64): a --serve-len token prompt prefilled in pieces of --max-prefill-tokens, each continuing the cache, every
  piece timed after a run that compiles the shapes the prompt uses: prefill time per token at each context;
  (2) `serve.py --config default` (random weights, byte tokenizer, one slot, --no-warmup: it compiles the shapes
  the prompt uses, not every bucket) on a --serve-len byte prompt, generating 16 tokens: wall time (compiles
  included) and the process's peak RSS;
- pieces48: prefill time per token against the context at Kimi-Linear-48B widths (float32), from one decoder
  layer of each kind timed on one --piece48-token piece continuing a cache: a KDA layer (from a random state), an
  MoE block (the 48B's 8 routed of 1,024 wide + 1 shared expert per token, with 32 experts instead of 256: the same
  flops per token; the dense first layer's MLP has the same flops, 3 x 2304 x 9216) and an MLA layer over a cache
  of c random latents at each of --contexts48 (the expanded form, as serving picks for such pieces; at the first
  context also the absorbed form, for the ratio). MLA time is linear in c (identical cache blocks), so it is fitted
  a + b c and extrapolated to 131,072. The 27-layer model's time per token at context c is then
  20 KDA + 7 MLA(c) + 27 MoE/MLP, for the last piece of a prompt and averaged over a whole prompt's pieces.
Writes markdown tables (stdout, --out) and a plot (--plot, needs matplotlib: the `dev` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.timing import interleaved_rate, median_seconds, write_report
from k2jax import KimiLinear, load_config
from k2jax.layers.kda import KDAState, KimiDeltaAttention
from k2jax.layers.mla import MLACache, MultiHeadLatentAttention
from k2jax.layers.moe import MoE
from k2jax.serving.runner import ModelRunner
from k2jax.training.step import lm_head_cross_entropy
from pallas_kernels.attention import expanded_pays_off

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20


def peak_rss_mib(who=resource.RUSAGE_SELF) -> float:
    """Peak resident memory of this process (or of its largest waited-for child) so far, MiB (ru_maxrss: KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024


# ---- one point, in its own process --------------------------------------------------------------------------------
def program(kind: str, mode: str, T: int):
    """(jitted function, its arguments) of one point: kind model / kda48 / mla48, mode fwd / fwdbwd."""


    key = jax.random.key(0)
    if kind == "model":
        cfg = load_config("default")
        graphdef, state = nnx.split(KimiLinear(cfg, rngs=nnx.Rngs(0)))
        tokens = jax.random.randint(key, (1, T + 1), 0, cfg.vocab_size)

        def forward(state, tokens):
            return nnx.merge(graphdef, state)(tokens[:, :-1])

        def loss(state, tokens):
            model = nnx.merge(graphdef, state)
            h, _ = model.hidden_states(tokens[:, :-1])
            loss_sum, _ = lm_head_cross_entropy(model, h, tokens[:, 1:], jnp.ones((1, T), jnp.float32))
            return loss_sum / T

        return jax.jit(forward if mode == "fwd" else jax.grad(loss)), (state, tokens)
    cfg = load_config("kimi_linear_48b_a3b", dtype="float32", param_dtype="float32")
    layer = (KimiDeltaAttention if kind == "kda48" else MultiHeadLatentAttention)(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(key, (1, T, cfg.hidden_size), jnp.float32)

    def layer_fwd(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    def layer_loss(state, x):
        return jnp.sum(layer_fwd(state, x))

    return jax.jit(layer_fwd if mode == "fwd" else jax.grad(layer_loss, (0, 1))), (state, x)


def run_point(kind: str, mode: str, T: int, timed: bool, repeats: int) -> dict:
    fn, args = program(kind, mode, T)
    rss_base = peak_rss_mib()
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    row = {"kind": kind, "mode": mode, "T": T, "temp_MiB": mem.temp_size_in_bytes / MiB,
           "compile_s": time.perf_counter() - t0}
    if timed:
        row.update(time_s=median_seconds(compiled, *args, repeats=repeats), rss_base_MiB=rss_base,
                   rss_peak_MiB=peak_rss_mib())
    return row


MATMUL_N = 2048
_matmul = jax.jit(lambda a: a @ a)


def _timed(fn, args, repeats: int) -> tuple[float, float]:
    """(median seconds of `repeats` calls of fn after a warm-up call, median of seconds x the rate of a 2048^3
    float32 matmul timed right before each call: the call's cost in matmul flops, which a shared machine's changing
    load does not skew the way it skews seconds). bench.timing.interleaved_rate with a unit of work."""
    a = jnp.ones((MATMUL_N, MATMUL_N), jnp.float32)
    seconds, rate_ratio = interleaved_rate(fn, args, 1.0, _matmul, (a,), 2 * MATMUL_N ** 3, repeats=repeats)
    return seconds, 1.0 / rate_ratio


def run_pieces48(piece: int, contexts, repeats: int) -> dict:
    """Seconds per `piece`-token piece of one KDA layer, one MoE block and one MLA layer (per context, expanded and
    at the first context absorbed) at 48B widths, float32, each continuing a cache."""
    cfg = load_config("kimi_linear_48b_a3b", dtype="float32", param_dtype="float32", num_experts=32)
    key = jax.random.key(0)
    x = jax.random.normal(key, (1, piece, cfg.hidden_size), jnp.float32)
    out = {"piece": piece, "contexts": list(contexts)}

    def layer_fn(layer, **call):
        graphdef, state = nnx.split(layer)
        return jax.jit(lambda state, x, cache: nnx.merge(graphdef, state)(x, cache=cache, **call)[0]), state

    kda_fn, kda_state = layer_fn(KimiDeltaAttention(cfg, rngs=nnx.Rngs(0)))
    cache = KDAState.zeros(1, cfg)
    cache = cache._replace(recurrent=jax.random.normal(key, cache.recurrent.shape, jnp.float32) * 0.1)
    out["kda_s"], out["kda_mmflop"] = _timed(kda_fn, (kda_state, x, cache), repeats)
    graphdef, state = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))
    moe_fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])
    out["moe_s"], out["moe_mmflop"] = _timed(moe_fn, (state, x), repeats)
    mla = MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mla)
    for form in ("expanded", "absorbed"):
        def attend(state, x, cache, form=form):
            return nnx.merge(graphdef, state)(x, cache=cache, cache_form=form)[0]
        fn = jax.jit(attend)
        for c in (contexts if form == "expanded" else contexts[:1]):
            ck = jax.random.split(jax.random.key(c), 2)
            mcache = MLACache(jax.random.normal(ck[0], (1, c, cfg.kv_lora_rank), jnp.float32),
                              jax.random.normal(ck[1], (1, c, cfg.qk_rope_head_dim), jnp.float32),
                              jnp.array([c], jnp.int32))
            out[f"mla_{form}_{c}_s"], out[f"mla_{form}_{c}_mmflop"] = _timed(fn, (state, x, mcache), repeats)
            print(f"  mla {form} context {c}: {out[f'mla_{form}_{c}_s']:.2f} s", file=sys.stderr, flush=True)
    # The layer's automatic choice for this piece length must be the expanded form timed above.
    out["auto_is_expanded"] = expanded_pays_off(piece, heads=cfg.num_attention_heads, nope_dim=cfg.qk_nope_head_dim,
                                                rope_dim=cfg.qk_rope_head_dim, v_dim=cfg.v_head_dim,
                                                kv_lora_rank=cfg.kv_lora_rank)
    out["rss_peak_MiB"] = peak_rss_mib()
    return out


def pieces48_table(res: dict, target: int = 131072, short: int = 8192) -> str:
    """Markdown: the measured layer costs and the 27-layer model's prefill cost per token at each context. Costs
    are in matmul-flop units (seconds x the matmul rate measured right before each call), so that load changes
    during the run do not skew the ratios; seconds at the run's median matmul rate are shown beside them."""
    P, cs = res["piece"], res["contexts"]
    rate = statistics.median([res[k] / res[k.replace("_mmflop", "_s")] for k in res if k.endswith("_mmflop")])
    sec = lambda w: w / rate  # noqa: E731  matmul flops -> seconds at the median rate
    work = np.array([res[f"mla_expanded_{c}_mmflop"] for c in cs])
    b, a = np.polyfit(np.array(cs, float), work, 1)  # MLA piece cost = a + b * context
    mla = lambda c: a + b * c  # noqa: E731
    fixed = 20 * res["kda_mmflop"] + 27 * res["moe_mmflop"]
    per_token = lambda c: sec(fixed + 7 * mla(c)) / P * 1e3  # ms per token, a piece at this context  # noqa: E731
    average = lambda T: np.mean([per_token(c) for c in range(0, T, P)])  # noqa: E731
    resid = np.max(np.abs(work - np.array([mla(c) for c in cs])) / work)
    absorbed = res[f"mla_absorbed_{cs[0]}_mmflop"]
    lines = [f"piece {P:,} tokens, 48B widths, float32; seconds at the run's median 2048^3 matmul rate "
             f"({rate / 1e9:.0f} GFLOP/s): one layer each: KDA {sec(res['kda_mmflop']):.2f} s, MoE block "
             f"{sec(res['moe_mmflop']):.2f} s, MLA (expanded over the cache) " + ", ".join(
                 f"{sec(v):.2f} s at {c:,}" for c, v in zip(cs, work)) + f" (fit a + b c: a {sec(a):.2f} s, b "
             f"{sec(b) * 1e3:.3f} ms per cached token, worst residual {resid:.1%}); absorbed at {cs[0]:,}: "
             f"{sec(absorbed):.2f} s ({absorbed / work[0]:.2f}x the expanded).",
             "", "| context | 27-layer ms/token (a piece at this context) | whole-prompt average ms/token (prompt of this "
             "length) |", "|---|---|---|"]
    for c in sorted({short, *cs, target}):
        lines.append(f"| {c:,} | {per_token(c):.1f} | {average(c):.1f} |")
    lines += ["", f"128k / 8k per token: last piece {per_token(target) / per_token(short):.2f}x, whole-prompt "
              f"average {average(target) / average(short):.2f}x."]
    return "\n".join(lines)


def run_serve_pieces(T: int, max_prefill_tokens: int) -> dict:
    """Prefill one T-token prompt through a ModelRunner in pieces, timing each (and noting the pieces that
    compiled a new program), then the first two pieces again, warm: the time per token at the start of a prompt."""


    cfg = load_config("default")
    runner = ModelRunner(KimiLinear(cfg, rngs=nnx.Rngs(0)), num_slots=1, max_len=T + 64,
                         max_prefill_tokens=max_prefill_tokens)
    P = runner.piece_len
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, cfg.vocab_size, T)]
    sampling = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.uint32))

    def prefill(end):
        runner.reset()
        pieces = []
        for start in range(0, end, P):
            compiles, t0 = runner.compile_count, time.perf_counter()
            runner.prefill([prompt[start:start + P]], [0], *sampling, start=start)
            n = min(P, T - start)
            pieces.append((start + n, time.perf_counter() - t0, runner.compile_count > compiles, n))
        return pieces

    rss_base = peak_rss_mib()
    t0 = time.perf_counter()
    pieces = prefill(T)
    total = time.perf_counter() - t0
    warm_start = prefill(min(2 * P, T))  # compiled by now
    return {"kind": "serve", "T": T, "piece": P, "total_s": total, "pieces": pieces, "warm_start": warm_start,
            "rss_base_MiB": rss_base, "rss_peak_MiB": peak_rss_mib()}


def run_serve_cli(T: int, max_prefill_tokens: int) -> dict:
    """`serve.py --config default` on one T-byte prompt (T tokens with the byte tokenizer), 16 new tokens: wall
    time and peak RSS of the serve.py process (this process only waits for it)."""

    text = "".join(chr(c) for c in np.random.default_rng(0).integers(ord("a"), ord("z") + 1, T))
    max_tokens = 16
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text + "\n")
    argv = [sys.executable, os.path.join(ROOT, "serve.py"), "--config", "default", "--prompts-file", f.name,
            "--slots", "1", "--max-len", str(T + max_tokens), "--max-prefill-tokens", str(max_prefill_tokens),
            "--max-tokens", str(max_tokens), "--no-warmup"]
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    os.unlink(f.name)
    tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
    return {"argv": " ".join(["serve.py"] + argv[2:4] + ["--prompts-file", f"<{T:,} bytes>"] + argv[6:]),
            "exit": res.returncode, "wall_s": wall, "rss_peak_MiB": peak_rss_mib(resource.RUSAGE_CHILDREN),
            "tail": [line[-300:] for line in tail]}


# ---- the sections ---------------------------------------------------------------------------------------------------
def in_subprocess(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def points(kinds, lengths, time_max: int, repeats: int) -> list[dict]:
    rows = []
    for kind in kinds:
        for mode in ("fwd", "fwdbwd"):
            for T in lengths:
                timed = T <= time_max
                try:
                    row = in_subprocess(["--point", f"{kind}:{mode}:{T}", "--repeats", str(repeats)]
                                        + ([] if timed else ["--compile-only"]))
                except subprocess.CalledProcessError as e:
                    row = {"kind": kind, "mode": mode, "T": T, "error": e.stderr.strip().splitlines()[-1][:200]}
                rows.append(row)
                print(f"  {kind} {mode} T={T}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in row.items() if k not in ("kind", "mode", "T")),
                      file=sys.stderr, flush=True)
    return rows


def dry_run(devices: int, lengths, batch: int) -> str:
    out = []
    for T in lengths:
        argv = [sys.executable, "-m", "k2jax.dry_run", "--config", "kimi_linear_48b_a3b", "--devices", str(devices),
                "--batch", str(batch), "--seq-len", str(T), "model.remat=full"]
        t0 = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        out.append(f"\n`python {' '.join(argv[1:])}` (exit {res.returncode}, {time.perf_counter() - t0:.0f} s):\n\n"
                   "```\n" + (res.stdout + res.stderr).strip()[-3000:] + "\n```")
    return "\n".join(out)


def markdown(rows: list[dict], keys: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if v < 10 else f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) else str(v)
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(fmt(r[k]) if k in r else "—" for k in keys) + " |" for r in rows]
    return "\n".join(out)


def plot(path: str, rows: list[dict], serve: dict | None) -> None:
    """A panel of compiled temp memory against T (when rows have it) and one of time per token (the model's
    forward and the serving prefill pieces that compiled nothing, when measured)."""
    import matplotlib  # noqa: PLC0415 (optional: the dev extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (optional)

    names = {"model": "default model", "kda48": "KDA layer, 48B widths", "mla48": "MLA layer, 48B widths"}
    memory = {(kind, mode): [(r["T"], r["temp_MiB"]) for r in rows
                             if r.get("kind") == kind and r.get("mode") == mode and "temp_MiB" in r]
              for kind in names for mode in ("fwd", "fwdbwd")}
    timing = {}
    if serve is not None:
        end, t, _, n = serve["warm_start"][0]
        timing[f"serving prefill, pieces of {serve['piece']} (no compile)"] = (
            [(end, 1e3 * t / n)] + [(e, 1e3 * t / n) for e, t, compiled, n in serve["pieces"] if not compiled])
    fwd = [(r["T"], 1e3 * r["time_s"] / r["T"]) for r in rows
           if r.get("kind") == "model" and r.get("mode") == "fwd" and "time_s" in r]
    if fwd:
        timing["forward, whole sequence"] = fwd
    have_memory = any(memory.values())
    n_panels = int(have_memory) + int(bool(timing))
    if n_panels == 0:
        return
    fig, axes = plt.subplots(1, n_panels, figsize=(6 * n_panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if have_memory:
        a = axes.pop(0)
        for (kind, mode), pts in memory.items():
            if pts:
                a.plot(*zip(*pts), "o-" if mode == "fwd" else "s--",
                       label=f"{names[kind]}, {'fwd' if mode == 'fwd' else 'fwd+bwd'}")
        a.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="XLA temp memory (MiB)",
              title="memory against length (compiled estimate)")
        a.legend(fontsize=7)
    if timing:
        b = axes.pop(0)
        for label, pts in timing.items():
            b.plot(*zip(*pts), "o-", label=label)
        b.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per token",
              title="default model: time per token")
        b.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="model,layers,serve", help="model, layers, serve, pieces48, dry_run")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--time-max", type=int, default=16384, help="run (time, RSS) the model points up to this T")
    ap.add_argument("--layer-time-max", type=int, default=4096, help="the same for the 48B-width layers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--serve-len", type=int, default=131072)
    ap.add_argument("--max-prefill-tokens", type=int, default=8192)
    ap.add_argument("--no-serve-cli", action="store_true", help="serve section: the runner pieces only")
    ap.add_argument("--piece48", type=int, default=2048, help="pieces48: the piece length")
    ap.add_argument("--contexts48", default="8192,16384,32768", help="pieces48: MLA cache lengths timed")
    ap.add_argument("--pieces48-point", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dry-devices", type=int, default=64)
    ap.add_argument("--dry-batch", type=int, default=64)
    ap.add_argument("--dry-lengths", default="32768,131072")
    ap.add_argument("--plot", default="docs/long_context.png")
    ap.add_argument("--out", help="also write the markdown to this file")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # KIND:MODE:T, run in a subprocess
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-point", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-cli-point", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.point:
        kind, mode, T = args.point.split(":")
        print(json.dumps(run_point(kind, mode, int(T), not args.compile_only, args.repeats)))
        return 0
    if args.serve_point:
        print(json.dumps(run_serve_pieces(args.serve_point, args.max_prefill_tokens)))
        return 0
    if args.serve_cli_point:
        print(json.dumps(run_serve_cli(args.serve_cli_point, args.max_prefill_tokens)))
        return 0
    if args.pieces48_point:
        print(json.dumps(run_pieces48(args.piece48, [int(c) for c in args.contexts48.split(",")], args.repeats)))
        return 0
    sections = set(args.sections.split(","))
    unknown = sections - {"model", "layers", "serve", "pieces48", "dry_run"}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from model, layers, serve, pieces48, dry_run")
    lengths = [int(x) for x in args.lengths.split(",")]
    report = [f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, float32; machine load average at "
              f"start {os.getloadavg()[0]:.1f}"]
    keys = ["T", "temp_MiB", "compile_s", "time_s", "rss_base_MiB", "rss_peak_MiB", "error"]
    rows, serve = [], None
    if "model" in sections:
        model_rows = points(["model"], lengths, args.time_max, args.repeats)
        rows += model_rows
        for mode in ("fwd", "fwdbwd"):
            report += [f"\n### Default model, {'forward' if mode == 'fwd' else 'forward + backward'} (batch 1)\n",
                       markdown([r for r in model_rows if r["mode"] == mode], keys)]
    if "layers" in sections:
        layer_rows = points(["kda48", "mla48"], lengths, args.layer_time_max, args.repeats)
        rows += layer_rows
        for kind in ("kda48", "mla48"):
            for mode in ("fwd", "fwdbwd"):
                report += [f"\n### One {kind[:3].upper()} layer at 48B widths, "
                           f"{'forward' if mode == 'fwd' else 'forward + backward'}\n",
                           markdown([r for r in layer_rows if r["kind"] == kind and r["mode"] == mode], keys)]
    if "serve" in sections:
        serve = in_subprocess(["--serve-point", str(args.serve_len), "--max-prefill-tokens",
                               str(args.max_prefill_tokens)])
        per = [{"context": end, "piece_s": t, "ms_per_token": 1e3 * t / n, "compiled": c}
               for end, t, c, n in serve["pieces"]]
        first = 1e3 * serve["warm_start"][0][1] / serve["warm_start"][0][3]
        report += [f"\n### Serving prefill of one {args.serve_len:,}-token prompt (default model, ModelRunner, pieces "
                   f"of {serve['piece']:,}): {serve['total_s']:.1f} s including compiles, peak RSS "
                   f"{serve['rss_peak_MiB']:,.0f} MiB (before compiling {serve['rss_base_MiB']:,.0f}); the first "
                   f"piece again, warm: {first:.3f} ms/token; the last piece / that: "
                   f"{per[-1]['ms_per_token'] / first:.2f}\n",
                   markdown(per, ["context", "piece_s", "ms_per_token", "compiled"])]
        if not args.no_serve_cli:
            cli = in_subprocess(["--serve-cli-point", str(args.serve_len), "--max-prefill-tokens",
                                 str(args.max_prefill_tokens)])
            report += [f"\n### `{cli['argv']}`\n\nexit {cli['exit']}, wall {cli['wall_s']:.1f} s (compiles included), "
                       f"peak RSS {cli['rss_peak_MiB']:,.0f} MiB; last lines:\n\n```\n" + "\n".join(cli["tail"])
                       + "\n```"]
    if "pieces48" in sections:
        res = in_subprocess(["--pieces48-point", "--piece48", str(args.piece48), "--contexts48", args.contexts48,
                             "--repeats", str(args.repeats)])
        report += ["\n### Prefill time per token against the context at 48B widths (one layer of each kind)\n",
                   pieces48_table(res)]
    if "dry_run" in sections:
        report += ["\n### Kimi-Linear-48B-A3B dry run at long sequence lengths\n",
                   dry_run(args.dry_devices, [int(x) for x in args.dry_lengths.split(",")], args.dry_batch)]
    if args.plot and (rows or serve):
        try:
            plot(args.plot, rows, serve)
            report.append(f"\nplot: {args.plot}")
        except ImportError:
            report.append("\n(matplotlib not installed: no plot; `pip install -e .[dev]`)")
    write_report("\n".join(report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

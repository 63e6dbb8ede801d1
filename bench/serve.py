"""Serving benchmark: decode throughput by batch size, time to first token, cache size against context, and
decode time per token against context for the hybrid (3 KDA : 1 MLA) model and an all-MLA model of the same shape.

    python bench/serve.py                                # everything, CPU-sized defaults (minutes on 2 cores)
    python bench/serve.py --quick                        # smaller sweep
    python bench/serve.py --plot bench/out/serve.png --out bench/out/serve.md

Sections
1. Throughput: an Engine with `batch` slots takes `batch` requests (prompt --prompt-len random tokens, greedy,
   --new-tokens each); a first identical round compiles, the second is timed. Decode tok/s = tokens produced by
   decode steps / time in decode steps; TTFT = mean time from submission to first token in that round.
2. TTFT alone: one request on an idle engine, per prompt length (prefill + first sample).
3. Cache bytes per sequence (`k2jax.serving.cache.cache_bytes_per_sequence`, equal to what `init_cache` allocates) for
   the released 48B-A3B hybrid config and the same config with every layer MLA.
4. Decode time per token against context: one decode step (batch --sweep-batch) with the cache filled to the
   context (synthetic cache contents: the cost of a step does not depend on them) and MLA attending over a kv
   bucket equal to the context, for a hybrid and an all-MLA model with the same widths (--sweep-config).
Models have random weights (speed does not depend on them). Timings are medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.timing import write_report  # noqa: E402
from k2jax import KimiLinear, load_config  # noqa: E402
from k2jax.serving import cache as kvcache  # noqa: E402
from k2jax.serving.runner import decode_entries  # noqa: E402
from k2jax.serving.scheduler import Engine, SamplingParams  # noqa: E402

# The context sweep's model: the 48B model's MLA latent (512 + 64), heads and widths scaled down so that a CPU runs
# it; 4 layers, as 3 KDA + 1 MLA or 4 MLA; dense FFNs (the FFN costs the same in both and does not grow with the
# context, so MoE would only add a constant).
SWEEP = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, kda_layers=(1, 2, 3), full_attn_layers=(4,),
             num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=512, qk_nope_head_dim=64,
             qk_rope_head_dim=64, v_head_dim=64, kda_num_heads=8, kda_head_dim=64, num_experts=0,
             first_k_dense_replace=4, vocab_size=1024, max_position_embeddings=65536)


def all_mla(config):
    """The same model with every layer MLA."""
    return config.replace(kda_layers=None, full_attn_layers=None)


def _model(config):
    return KimiLinear(config, rngs=nnx.Rngs(0))


# ---- 1, 2: engine throughput and TTFT --------------------------------------------------------------------------------
def throughput(config, batch: int, prompt_len: int, new_tokens: int) -> dict:
    max_len = 1 << (prompt_len + new_tokens - 1).bit_length()
    eng = Engine(_model(config), None, num_slots=batch, max_len=max_len, min_bucket=max(16, prompt_len),
                 max_prefill_batch=min(batch, 8), max_prefill_tokens=max(8192, prompt_len))
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, config.vocab_size, prompt_len))) for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    eng.generate(prompts, params)  # compiles every shape this workload uses
    for k, v in eng.stats.items():  # counters restart for the timed round (per-reason dicts are left alone)
        if isinstance(v, (int, float)):
            eng.stats[k] = type(v)(0)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    wall = time.perf_counter() - t0
    st = eng.stats
    return {"batch": batch, "decode_tok_s": st["decode_tokens"] / st["decode_s"],
            "ms_per_step": 1e3 * st["decode_s"] / st["decode_steps"],
            "ttft_ms": 1e3 * statistics.mean(o.ttft_s for o in outs),
            "total_tok_s": sum(len(o.token_ids) for o in outs) / wall}


def ttft_alone(config, prompt_lens, repeats: int) -> list[dict]:
    max_len = 1 << max(prompt_lens).bit_length()
    eng = Engine(_model(config), None, num_slots=1, max_len=max_len, min_bucket=min(prompt_lens))
    rng = np.random.default_rng(1)
    rows = []
    for n in prompt_lens:
        prompt = list(map(int, rng.integers(3, config.vocab_size, n)))
        eng.generate([prompt], SamplingParams(max_tokens=1))
        ts = [eng.generate([prompt], SamplingParams(max_tokens=1))[0].ttft_s for _ in range(repeats)]
        rows.append({"prompt": n, "ttft_ms": 1e3 * statistics.median(ts)})
    return rows


# ---- 3: cache bytes ------------------------------------------------------------------------------------------------
def cache_table(contexts) -> list[dict]:
    hybrid = load_config("kimi_linear_48b_a3b")
    mla = all_mla(hybrid)
    rows = []
    for c in contexts:
        h, m = kvcache.cache_bytes_per_sequence(hybrid, c), kvcache.cache_bytes_per_sequence(mla, c)
        rows.append({"context": c, "hybrid_MiB": h / 2 ** 20, "all_mla_MiB": m / 2 ** 20, "saving": 1 - h / m})
    return rows


# ---- 4: decode time against context ----------------------------------------------------------------------------------
def decode_ms(config, context: int, batch: int, repeats: int) -> float:
    """Median ms of one decode step (read + write programs, as the engine runs them) at `context`."""
    model = _model(config)
    graphdef, state = nnx.split(model)
    table = kvcache.identity_page_table(batch, context, 16)  # every slot's pages allocated up front
    read = jax.jit(lambda st, c, t: decode_entries(nnx.merge(graphdef, st), c, table, t))
    write = jax.jit(kvcache.write_decode, donate_argnums=(0,))
    cache = kvcache.init_cache(config, batch, context, page_size=16)
    cache = cache._replace(lengths=jnp.full((batch,), context - 2 - repeats, jnp.int32))
    tokens, active = jnp.ones((batch,), jnp.int32), jnp.ones((batch,), bool)

    def step(cache):
        entries, logits = read(state, cache, tokens)
        cache = write(cache, entries, table, active)
        jax.block_until_ready((cache, logits))
        return cache

    cache = step(cache)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cache = step(cache)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def sweep(config, contexts, batch: int, repeats: int) -> list[dict]:
    rows = []
    for c in contexts:
        h = decode_ms(config, c, batch, repeats)
        m = decode_ms(all_mla(config), c, batch, repeats)
        rows.append({"context": c, "hybrid_ms": h, "all_mla_ms": m, "ratio": m / h})
        print(f"  context {c}: hybrid {h:.2f} ms, all-MLA {m:.2f} ms", file=sys.stderr, flush=True)
    return rows


# ---- output ----------------------------------------------------------------------------------------------------------
def markdown(rows: list[dict], fmt: dict) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(format(r[k], fmt.get(k, "")) for k in keys) + " |")
    return "\n".join(out)


def plot(path: str, sweep_rows, cache_rows, title: str) -> None:
    import matplotlib  # noqa: PLC0415 (optional: the dev extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: the dev extra)

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ctx = [r["context"] for r in sweep_rows]
    a.plot(ctx, [r["hybrid_ms"] for r in sweep_rows], "o-", label="hybrid 3 KDA : 1 MLA")
    a.plot(ctx, [r["all_mla_ms"] for r in sweep_rows], "s-", label="all MLA")
    a.set(xscale="log", xlabel="context (tokens)", ylabel="decode ms / step", title=title)
    a.set_xticks(ctx, [f"{c // 1024}k" for c in ctx])
    a.legend()
    cc = [r["context"] for r in cache_rows]
    b.plot(cc, [r["hybrid_MiB"] for r in cache_rows], "o-", label="Kimi Linear 48B (hybrid)")
    b.plot(cc, [r["all_mla_MiB"] for r in cache_rows], "s-", label="same, all MLA")
    b.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="cache MiB / sequence",
          title="decode cache per sequence")
    b.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="default", help="model for throughput / TTFT (a configs/ name)")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ttft-lens", default="128,512,2048")
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--sweep-batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="batches 1,8; contexts 1k-8k; 3 repeats")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: throughput,ttft,cache,sweep")
    ap.add_argument("--plot", default="bench/out/serve.png")
    ap.add_argument("--out", help="also write the markdown tables to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.repeats, args.ttft_lens = "1,8", "1024,2048,4096,8192", 3, "128,512"
    skip = set(filter(None, args.skip.split(",")))
    dt = dict(param_dtype=args.dtype, dtype=args.dtype)
    base = load_config(args.config, **dt)
    report = [f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, {args.dtype}"]

    if "throughput" not in skip:
        rows = []
        for b in map(int, args.batches.split(",")):
            rows.append(throughput(base, b, args.prompt_len, args.new_tokens))
            print(f"  batch {b}: {rows[-1]['decode_tok_s']:.0f} decode tok/s", file=sys.stderr, flush=True)
        report += [f"\n### Decode throughput ({args.config} config, prompt {args.prompt_len}, "
                   f"{args.new_tokens} new tokens, greedy)\n",
                   markdown(rows, {"decode_tok_s": ".0f", "ms_per_step": ".2f", "ttft_ms": ".1f",
                                   "total_tok_s": ".0f"})]
    if "ttft" not in skip:
        rows = ttft_alone(base, [int(x) for x in args.ttft_lens.split(",")], args.repeats)
        report += [f"\n### Time to first token, one request on an idle engine ({args.config} config)\n",
                   markdown(rows, {"ttft_ms": ".1f"})]
    cache_rows = cache_table([1024, 2048, 4096, 16384, 32768, 131072, 1048576])
    if "cache" not in skip:
        report += ["\n### Decode cache per sequence: Kimi-Linear-48B-A3B (20 KDA + 7 MLA) vs all 27 layers MLA "
                   "(bf16 latents, f32 KDA states)\n",
                   markdown(cache_rows, {"hybrid_MiB": ".1f", "all_mla_MiB": ".1f", "saving": ".1%"})]
    if "sweep" not in skip:
        cfg = load_config("default", **{**SWEEP, **dt})
        contexts = [int(x) for x in args.contexts.split(",")]
        rows = sweep(cfg, contexts, args.sweep_batch, args.repeats)
        report += [f"\n### Decode time per step against context (batch {args.sweep_batch}; hidden "
                   f"{cfg.hidden_size}, 4 layers with dense FFNs, MLA latent {cfg.kv_lora_rank}+"
                   f"{cfg.qk_rope_head_dim}, {cfg.num_attention_heads} heads; hybrid = 3 KDA + 1 MLA)\n",
                   markdown(rows, {"hybrid_ms": ".2f", "all_mla_ms": ".2f", "ratio": ".2f"})]
        if args.plot:
            try:
                plot(args.plot, rows, cache_rows, f"decode step, batch {args.sweep_batch}")
                report.append(f"\nplot: {args.plot}")
            except ImportError:
                report.append("\n(matplotlib not installed: no plot; `pip install -e .[dev]`)")
    write_report("\n".join(report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

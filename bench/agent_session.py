"""Agent sessions through the engine, prefix cache on and off: per-turn latency against the turn index, prefilled
and cached tokens, and concurrent sessions sharing a system prompt.

    python bench/agent_session.py                                   # 60 turns, 16 x 4 turns (minutes on 2 cores)
    python bench/agent_session.py --turns 200 --out docs/agent_session.md --plot docs/agent_session.png
    python bench/agent_session.py --turns 200 --http --skip-off --skip-concurrent   # the same through serve.py's server

1. One session: the first prompt has --first-tokens random tokens; every turn generates --gen-tokens (greedy,
   EOS ignored), then a tool result of --tool-tokens random tokens is appended and the whole history is the next
   turn's prompt (what an agent client sends). Each configuration runs the session twice with different random
   tokens of the same lengths: the first pass compiles every shape the second uses, the second is timed
   (compiles excluded). Latency = submission to last token of a turn. Prefilled = prompt tokens the engine ran
   through prefill; cached = prompt tokens resumed from the prefix cache.
2. --sessions concurrent sessions whose first prompts share a --system-tokens system prompt (then --user-tokens of
   their own), --session-turns turns each; session 0's first turn runs alone first (the system prompt is then
   cached once, as on a server that has seen it before). Throughput = generated tokens / wall time; memory = the
   prefix cache's bytes in use at the end (pages + snapshots), the pages holding the system prompt, and the page
   pool (live sequences and cached prefixes share it): its size and the peak of its pages in use during the timed
   pass (sampled every 10 ms), against what a contiguous slots x max_len latent cache would hold.
3. Paired turns (--paired K, cache on): a machine shared with other work makes single turns noisy (a load spike
   on the first or the last turn alone swings their ratio), so after the session K first-like turns (a fresh
   --first-tokens prompt, no cache hit) alternate with K late turns (the final history plus a fresh tool result,
   which resumes where the last turn ended): the ratio of their medians is the last / first latency under the same
   load. Between the pairs the matmuls of the late turn's attention over its history are timed alone: their
   median added to the first-like turn is the floor of that ratio for exact attention on this machine.
--http runs 1 and 3 through serve.py's OpenAI server (k2jax.serving.server, uvicorn in this process) over a real
socket: POST /v1/completions with token-id prompts and `return_token_ids` (so the next turn sends back exactly the
generated ids); latency then includes HTTP, JSON and the engine thread hand-over, and cached tokens are read from
usage.prompt_tokens_details.cached_tokens. --csv writes every turn's row.
Models have random weights (the timing does not depend on them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.latent_rows import history_attention_floor  # noqa: E402
from k2jax import KimiLinear, load_config  # noqa: E402
from k2jax.serving.page_pool import pages_for  # noqa: E402
from k2jax.serving.scheduler import Engine, SamplingParams  # noqa: E402
from k2jax.serving.server import serve_in_thread  # noqa: E402
from k2jax.tokenizer import load_tokenizer  # noqa: E402


def make_engine(model, args, prefix_gb: float, tokenizer=None) -> Engine:
    kv = None if args.kv_cache_gb is None else int(args.kv_cache_gb * 2 ** 30)
    return Engine(model, tokenizer, num_slots=args.slots, max_len=args.max_len, min_bucket=args.min_bucket,
                  max_prefill_tokens=args.max_prefill_tokens, prefix_cache_bytes=int(prefix_gb * 2 ** 30),
                  kv_cache_bytes=kv, snapshot_every=args.snapshot_every)


@contextmanager
def peak_pages(engine: Engine, every_s: float = 0.01):
    """Samples the page pool while the block runs; yields a dict that then holds the peak pages in use (live
    sequences and cached prefixes together), the live sequences' pages and the pages shared at that moment."""
    peak = dict(pages_used=0, pages_slots=0, pages_shared=0)
    stop = threading.Event()

    def sample():
        while not stop.wait(every_s):
            st = engine.pool_stats()
            used = st["pages_total"] - st["pages_free"]
            if used > peak["pages_used"]:
                peak.update(pages_used=used, pages_slots=st["pages_slots"], pages_shared=st["pages_shared"])

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        stop.set()
        t.join()


def compiles(engine: Engine) -> int:
    """Programs the engine has compiled so far (the runner's steps and the prefix cache's copies)."""
    extra = 0 if engine.prefix is None else engine.prefix.compile_count + (
        engine.prefix.snapshots.compile_count if engine.prefix.snapshots is not None else 0)
    return engine.runner.compile_count + extra


def random_tokens(rng, n: int, vocab: int) -> list[int]:
    return [int(t) for t in rng.integers(3, vocab, n)]


class EngineClient:
    """Turns straight through `Engine.generate`."""

    def __init__(self, engine: Engine, args):
        self.engine = engine
        self.params = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)

    def turn(self, prompt: list[int]) -> tuple[list[int], int]:
        """Generate for one prompt: (generated token ids, cached prompt tokens)."""
        (out,) = self.engine.generate([prompt], self.params)
        return out.token_ids, out.cached_tokens


class HTTPClient:
    """Turns through serve.py's OpenAI server over a socket (see the module docstring)."""

    def __init__(self, url: str, args):
        self.url, self.gen_tokens = url + "/v1/completions", args.gen_tokens

    def turn(self, prompt: list[int]) -> tuple[list[int], int]:
        body = {"prompt": prompt, "max_tokens": self.gen_tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        req = urllib.request.Request(self.url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.load(r)
        return out["choices"][0]["token_ids"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


@contextmanager
def serving(engine: Engine, tokenizer, http: bool, args):
    """A client for `engine`: direct, or through the HTTP server on a free local port (the engine thread and the
    server run while the context is open)."""
    if not http:
        yield EngineClient(engine, args)
        return
    with serve_in_thread(engine, tokenizer, args.config) as url:
        yield HTTPClient(url, args)


def run_session(client, engine: Engine, args, seed: int) -> tuple[list[dict], list[int]]:
    """One scripted session; returns (one row per turn: latency_s, history (prompt tokens), prefilled, cached;
    the history after the last turn's generation)."""
    rng = np.random.default_rng(seed)
    vocab = engine.vocab_limit
    history = random_tokens(rng, args.first_tokens, vocab)
    rows = []
    for turn in range(args.turns):
        before = engine.stats["prefill_tokens"]
        t0 = time.perf_counter()
        generated, cached = client.turn(history)
        latency = time.perf_counter() - t0
        rows.append(dict(turn=turn, latency_s=latency, history=len(history),
                         prefilled=engine.stats["prefill_tokens"] - before, cached=cached))
        history = history + generated
        if turn + 1 < args.turns:
            history = history + random_tokens(rng, args.tool_tokens, vocab)
    return rows, history


def paired_turns(client, engine: Engine, args, history: list[int], seed: int) -> dict:
    """--paired first-like and late turns, alternated (module docstring, 3): their median latencies. A new seed
    per call: a first-like prompt must never be cached already."""
    rng = np.random.default_rng(seed)
    vocab = engine.vocab_limit
    first, late, floor = [], [], []
    for _ in range(args.paired):
        for times, prompt in ((first, random_tokens(rng, args.first_tokens, vocab)),
                              (late, history + random_tokens(rng, args.tool_tokens, vocab))):
            t0 = time.perf_counter()
            client.turn(prompt)
            times.append(time.perf_counter() - t0)
        # The least the late turn's attention over its history can cost here (its matmuls alone), timed between
        # the pairs so it sees the same load. The suffix is the tool result and the last generated token.
        floor.append(history_attention_floor(engine.config, len(history), args.tool_tokens + 1,
                                              args.gen_tokens - 1, repeats=3))
    f, l, a = (float(np.median(x)) for x in (first, late, floor))
    return dict(first_ms=1e3 * f, late_ms=1e3 * l, ratio=l / f, floor_ms=1e3 * a, floor_ratio=(f + a) / f)


def single_session(model, args, prefix_gb: float) -> tuple[list[dict], int, dict | None]:
    """The timed pass's rows, the programs compiled during it (0 expected) and the paired turns (cache on)."""
    tokenizer = load_tokenizer("byte") if args.http else None
    engine = make_engine(model, args, prefix_gb, tokenizer)
    with serving(engine, tokenizer, args.http, args) as client:
        _, history = run_session(client, engine, args, seed=1)  # compiles every shape the timed pass uses
        if prefix_gb and args.paired:
            paired_turns(client, engine, args, history, seed=11)  # a late turn branches: compile its shapes too
        before = compiles(engine)
        rows, history = run_session(client, engine, args, seed=2)
        paired = paired_turns(client, engine, args, history, seed=12) if prefix_gb and args.paired else None
        return rows, compiles(engine) - before, paired


def concurrent_sessions(model, args, prefix_gb: float) -> dict:
    """--sessions sessions sharing a system prompt, each --session-turns turns, all in flight at once."""
    engine = make_engine(model, args, prefix_gb)
    vocab = engine.config.vocab_size
    params = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)

    def run_all(seed):
        rng = np.random.default_rng(seed)
        system = random_tokens(rng, args.system_tokens, vocab)
        firsts = [system + random_tokens(rng, args.user_tokens, vocab) for _ in range(args.sessions)]
        tools = [[random_tokens(rng, args.tool_tokens, vocab) for _ in range(args.session_turns)]
                 for _ in range(args.sessions)]
        generated = [0] * args.sessions

        def session(k, turns):
            history = firsts[k]
            for turn in turns:
                out = engine.submit(history, params).wait()
                generated[k] += len(out.token_ids)
                history = history + out.token_ids + tools[k][turn]
            return history

        before = engine.stats["prefill_tokens"]
        t0 = time.perf_counter()
        engine.start()
        try:
            session(0, [0])  # the system prompt reaches the cache once
            threads = [threading.Thread(target=session, args=(k, range(1 if k == 0 else 0, args.session_turns)))
                       for k in range(args.sessions)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            engine.shutdown()
        wall = time.perf_counter() - t0
        return dict(wall_s=wall, generated=sum(generated), prefilled=engine.stats["prefill_tokens"] - before)

    for seed in range(args.warm_passes):  # compile (thread timing varies the shapes a little: more than one pass)
        run_all(seed=100 + seed)
    before = compiles(engine)
    with peak_pages(engine) as peak:
        res = run_all(seed=4)
    res["compiles"] = compiles(engine) - before
    pool = engine.pool_stats()
    res.update(peak, pool_bytes=pool["bytes_total"], peak_bytes=peak["pages_used"] * pool["page_bytes"],
               contiguous_bytes=args.slots * pages_for(args.max_len, pool["page_size"]) * pool["page_bytes"])
    st = engine.prefix_stats()
    res.update(tok_per_s=res["generated"] / res["wall_s"], bytes_in_use=st["bytes_in_use"] if st else 0,
               system_prompt_page_bytes=(pages_for(args.system_tokens, engine.prefix.page_size) * engine.prefix.page_bytes
                                         if st else 0))
    return res


def summarize(rows: list[dict]) -> dict:
    total_prefilled = sum(r["prefilled"] for r in rows)
    final_history = rows[-1]["history"]
    return dict(first_ms=rows[0]["latency_s"] * 1e3, last_ms=rows[-1]["latency_s"] * 1e3,
                ratio=rows[-1]["latency_s"] / rows[0]["latency_s"], prefilled=total_prefilled,
                cached=sum(r["cached"] for r in rows), history=final_history,
                prefilled_over_history=total_prefilled / final_history)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default")
    p.add_argument("--turns", type=int, default=60)
    p.add_argument("--first-tokens", type=int, default=256)
    p.add_argument("--tool-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--session-turns", type=int, default=3)
    p.add_argument("--warm-passes", type=int, default=2, help="untimed passes of the concurrent sessions")
    p.add_argument("--system-tokens", type=int, default=2048)
    p.add_argument("--user-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=None, help="default: what the longest session needs")
    p.add_argument("--min-bucket", type=int, default=128)
    p.add_argument("--max-prefill-tokens", type=int, default=2048)
    p.add_argument("--snapshot-every", type=int, default=1024)
    p.add_argument("--prefix-cache-gb", type=float, default=1.0)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="the live sequences' page pool (default: slots x "
                                                                   "max_len tokens)")
    p.add_argument("--paired", type=int, default=7, help="first-like / late turn pairs after the session (0: none)")
    p.add_argument("--http", action="store_true", help="the single session through serve.py's HTTP server")
    p.add_argument("--csv", help="write every turn's row here")
    p.add_argument("--skip-off", action="store_true", help="only the cache-on runs")
    p.add_argument("--skip-concurrent", action="store_true")
    p.add_argument("--out", help="write the markdown tables here too")
    p.add_argument("--plot", help="save latency against turn index (PNG) here")
    args = p.parse_args()
    need_single = args.first_tokens + args.turns * (args.gen_tokens + args.tool_tokens)
    need_conc = args.system_tokens + args.user_tokens + args.session_turns * (args.gen_tokens + args.tool_tokens)
    args.max_len = args.max_len or max(need_single, need_conc) + args.gen_tokens
    model = KimiLinear(load_config(args.config), rngs=nnx.Rngs(0))
    configs = [("on", args.prefix_cache_gb)] + ([] if args.skip_off else [("off", 0.0)])

    lines = [f"config `{args.config}`, {args.turns} turns (first prompt {args.first_tokens} tokens, +{args.tool_tokens} "
             f"tool tokens and {args.gen_tokens} generated per turn), max_len {args.max_len}, min_bucket "
             f"{args.min_bucket}, max_prefill_tokens {args.max_prefill_tokens}, compiles excluded, through "
             f"{'HTTP (serve.py server, token-id prompts)' if args.http else 'the engine'}", "",
             "| prefix cache | first turn ms | last turn ms | last / first | prefilled tokens | cached tokens | "
             "final history | prefilled / history | compiles in the timed pass |", "|---|---|---|---|---|---|---|---|---|"]
    curves, pairs = {}, {}
    for name, gb in configs:
        rows, compiled, pairs[name] = single_session(model, args, gb)
        curves[name] = rows
        s = summarize(rows)
        lines.append(f"| {name} | {s['first_ms']:.0f} | {s['last_ms']:.0f} | {s['ratio']:.2f} | {s['prefilled']:,} | "
                     f"{s['cached']:,} | {s['history']:,} | {s['prefilled_over_history']:.2f} | {compiled} |")
        print(lines[-1], flush=True)
    if pairs.get("on"):
        pr = pairs["on"]
        lines += ["", f"Paired turns, cache on ({args.paired} of each, alternated after the session; medians): "
                  f"first-like {pr['first_ms']:.0f} ms, late (history {curves['on'][-1]['history'] + args.gen_tokens:,}"
                  f" + {args.tool_tokens}) {pr['late_ms']:.0f} ms, late / first **{pr['ratio']:.2f}**",
                  "", f"Floor: the late turn's attention over its history costs at least {pr['floor_ms']:.0f} ms here "
                  f"(its matmuls alone, no softmax: bench/latent_rows.py history_attention_floor, timed between the "
                  f"pairs), so no exact attention takes late / first below **{pr['floor_ratio']:.2f}** on this "
                  f"machine at this load (the rest of a late turn counted as a first-like turn's)"]
        print(lines[-1], flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, ["cache", "turn", "latency_s", "history", "prefilled", "cached"])
            w.writeheader()
            for name, rows in curves.items():
                w.writerows({"cache": name, **r} for r in rows)
    if not args.skip_concurrent:
        lines += ["", f"{args.sessions} concurrent sessions, a shared {args.system_tokens}-token system prompt + "
                  f"{args.user_tokens} own tokens, {args.session_turns} turns each ({args.slots} slots)", "",
                  "| prefix cache | wall s | generated tok/s | prefilled tokens | prefix cache bytes in use | "
                  "system prompt pages (bytes) | peak latent MiB in use (pages: all / live / shared) | page pool MiB "
                  "| slots x max_len MiB | compiles in the timed pass |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, gb in configs:
            r = concurrent_sessions(model, args, gb)
            lines.append(f"| {name} | {r['wall_s']:.1f} | {r['tok_per_s']:.1f} | {r['prefilled']:,} | "
                         f"{r['bytes_in_use']:,} | {r['system_prompt_page_bytes']:,} | {r['peak_bytes'] / 2 ** 20:.1f} "
                         f"({r['pages_used']:,} / {r['pages_slots']:,} / {r['pages_shared']:,}) | "
                         f"{r['pool_bytes'] / 2 ** 20:.1f} | {r['contiguous_bytes'] / 2 ** 20:.1f} | {r['compiles']} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.plot:
        import matplotlib  # noqa: PLC0415 (optional: the dev extra)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (optional)

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, rows in curves.items():
            ax.plot([r["turn"] for r in rows], [r["latency_s"] * 1e3 for r in rows], label=f"prefix cache {name}")
        ax.set_xlabel("turn")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"agent session, config {args.config}{' (HTTP)' if args.http else ''}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()

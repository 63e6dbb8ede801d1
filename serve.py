"""Generate with a Kimi Linear / Kimi K2 model, or serve it over an OpenAI-compatible HTTP API.

    python serve.py --checkpoint DIR --prompt "Once upon a time" [--prompt ...] [--max-tokens 64]
    python serve.py --checkpoint DIR --prompts-file prompts.txt --slots 32      # one prompt per line
    python serve.py --checkpoint DIR --http --port 8000                         # /v1/completions, /v1/chat/completions
    python serve.py --checkpoint DIR --http --prefix-cache-gb 8                 # more room for cached prefixes
    python serve.py --config default --prompt "hi"                             # random weights, byte tokenizer

DIR is a Hugging Face folder (config.json + safetensors) or an orbax checkpoint written by train.py. The CLI is
a thin layer over k2jax.serving (scheduler, runner, cache, sampling) and k2jax.serving.server (HTTP). A model
whose vocabulary is larger than the tokenizer's (padded embeddings) is served: ids the tokenizer cannot decode are
never sampled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flax import nnx

from k2jax import KimiLinear, load_config
from k2jax.chat import encode_chat, load_chat_template
from k2jax.config import ConfigError, ModelConfig, parse_overrides
from k2jax.serving.config import ServeConfig
from k2jax.serving.loading import load_model
from k2jax.serving.scheduler import Engine, SamplingParams
from k2jax.sharding import make_mesh, shard_model
from k2jax.tokenizer import load_tokenizer

# flag -> ServeConfig field (dotted: a field of its `limits`)
_SERVE_FLAGS = {"slots": "slots", "max_len": "max_len", "min_bucket": "min_bucket",
                "max_prefill_tokens": "max_prefill_tokens", "int4_experts": "int4_experts",
                "prefix_cache_gb": "prefix_cache_gb", "kv_cache_gb": "kv_cache_gb", "snapshot_every": "snapshot_every",
                "tensor_parallel": "tensor_parallel", "expert_parallel": "expert_parallel", "host": "host",
                "port": "port", "max_body_bytes": "limits.max_body_bytes", "max_waiting": "limits.max_waiting",
                "request_timeout": "limits.request_timeout_s", "default_max_tokens": "limits.default_max_tokens"}


def parser() -> argparse.ArgumentParser:
    d = ServeConfig()

    def default(field: str) -> str:  # the help text's default, from ServeConfig
        value = d
        for part in field.split("."):
            value = getattr(value, part)
        return f"(ServeConfig.{field}, default {value})"

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", help="HF folder or orbax checkpoint directory")
    src.add_argument("--config", help="build a randomly initialised model from this config (no --checkpoint)")
    src.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                     help="model config field (model.<field> or a bare field, e.g. vocab_size=264) or serve setting "
                          "(serve.<field>, e.g. serve.limits.max_waiting=8); value parsed as YAML; repeatable")
    src.add_argument("--tokenizer", help="'byte', or a folder/file (default: the checkpoint folder if it has one, "
                                         "else 'byte')")
    src.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter and compute dtype")
    src.add_argument("--int4-experts", action="store_const", const=True,
                     help="serve the routed experts from INT4 weights " + default("int4_experts"))
    src.add_argument("--tensor-parallel", type=int, help="devices on the 'tensor' mesh axis " +
                     default("tensor_parallel"))
    src.add_argument("--expert-parallel", type=int, help="devices on the 'expert' mesh axis " +
                     default("expert_parallel"))
    src.add_argument("--seed-init", type=int, default=0, help="init seed with --config")
    eng = p.add_argument_group("engine")
    eng.add_argument("--slots", type=int, help="concurrent sequences (decode batch) " + default("slots"))
    eng.add_argument("--max-len", type=int, help="context per sequence (prompt + generated) " + default("max_len"))
    eng.add_argument("--min-bucket", type=int, help="smallest prompt-length bucket " + default("min_bucket"))
    eng.add_argument("--max-prefill-tokens", type=int,
                     help="tokens one prefill call takes (rows x length bucket); a longer prompt is prefilled in "
                          "pieces of at most this many, between decode steps " + default("max_prefill_tokens"))
    eng.add_argument("--kv-cache-gb", type=float,
                     help="device memory (GiB) of the paged MLA latent pool of the live sequences; default: slots x "
                          "max-len tokens; less makes memory follow the tokens in use (a full pool preempts the "
                          "latest request and recomputes it later, exactly) " + default("kv_cache_gb"))
    eng.add_argument("--prefix-cache-gb", type=float,
                     help="device memory (GiB) for cached prefixes beyond the live sequences: requests resume from "
                          "them and prefill only the rest; 0 turns it off " + default("prefix_cache_gb"))
    eng.add_argument("--snapshot-every", type=int,
                     help="a long prefill also caches its prefix every this many tokens " + default("snapshot_every"))
    eng.add_argument("--no-warmup", action="store_true", help="compile lazily instead of all buckets up front")
    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="a text file, one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    http = p.add_argument_group("http")
    http.add_argument("--http", action="store_true", help="serve the OpenAI-compatible API instead")
    http.add_argument("--host", help=default("host"))
    http.add_argument("--port", type=int, help=default("port"))
    http.add_argument("--model-name", help="model id the API answers to (default: the checkpoint folder name)")
    http.add_argument("--max-body-bytes", type=int,
                      help="larger request bodies get 413 " + default("limits.max_body_bytes"))
    http.add_argument("--max-waiting", type=int,
                      help="requests queued behind busy slots before new ones get 429 " + default("limits.max_waiting"))
    http.add_argument("--request-timeout", type=float, metavar="SECONDS",
                      help="a request still running after this is aborted with 504 " +
                           default("limits.request_timeout_s"))
    http.add_argument("--default-max-tokens", type=int,
                      help="max_tokens of a chat request that names none " + default("limits.default_max_tokens"))
    return p


def settings(args: argparse.Namespace) -> tuple[ServeConfig, dict]:
    """(ServeConfig, model config overrides) of a command line: the flags, then `--override serve.*` over them;
    ConfigError naming the field, the value and what is allowed (nothing is loaded before)."""
    changes = parse_overrides(args.override, {"model": ModelConfig, "serve": ServeConfig})
    flags = {field: getattr(args, flag) for flag, field in _SERVE_FLAGS.items() if getattr(args, flag) is not None}
    if args.no_warmup:
        flags["warmup"] = False
    serve = ServeConfig().with_overrides({**flags, **changes["serve"]})
    return serve, changes["model"]


def _build(args, serve: ServeConfig, model_overrides: dict):
    tp, ep = serve.tensor_parallel, serve.expert_parallel
    mesh = None
    if tp * ep > 1:
        try:  # the four-axis mesh of k2jax.sharding; serving's replicas go on 'data'
            mesh = make_mesh({"data": -1, "expert": ep, "tensor": tp})
        except ValueError as e:
            raise SystemExit(f"--tensor-parallel {tp} x --expert-parallel {ep}: {e}")
    if args.checkpoint:
        if any("." in k for k in model_overrides):
            raise SystemExit("error: --override model.<field>.<key> needs --config (with --checkpoint, give the "
                             "whole field)")
        model = load_model(args.checkpoint, dtype=args.dtype, mesh=mesh, config_overrides=model_overrides)
    elif args.config:
        if args.dtype:
            model_overrides = {**model_overrides, "param_dtype": args.dtype, "dtype": args.dtype}
        try:
            config = load_config(args.config).with_overrides(model_overrides)
        except ConfigError as e:
            raise SystemExit(f"error: {e}")
        model = KimiLinear(config, rngs=nnx.Rngs(args.seed_init))
        if mesh is not None:
            shard_model(model, mesh)
    else:
        raise SystemExit("give --checkpoint DIR (or --config NAME for random weights)")
    tok_src = args.tokenizer
    if tok_src is None:
        ck = Path(args.checkpoint) if args.checkpoint else None
        has = ck is not None and any((ck / n).is_file() for n in ("tiktoken.model", "tokenizer.json"))
        tok_src = str(ck) if has else "byte"
    tokenizer = load_tokenizer(tok_src)
    try:
        tokenizer.check_fits_model(model.config.vocab_size)
    except ValueError as e:
        hint = f" (with --config, add --override vocab_size={tokenizer.vocab_size})" if args.config else ""
        raise SystemExit(f"the tokenizer {tok_src!r} does not fit the model: {e}{hint}")
    try:  # e.g. --max-len beyond the model's max_position_embeddings
        engine = Engine(model, tokenizer, num_slots=serve.slots, max_len=serve.max_len, min_bucket=serve.min_bucket,
                        max_prefill_tokens=serve.max_prefill_tokens, int4_experts=serve.int4_experts, mesh=mesh,
                        prefix_cache_bytes=int(serve.prefix_cache_gb * 2 ** 30),
                        kv_cache_bytes=None if serve.kv_cache_gb is None else int(serve.kv_cache_gb * 2 ** 30),
                        prefix_page_size=serve.prefix_page_size, snapshot_every=serve.snapshot_every)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return engine, tokenizer


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    prompts = _prompts(args)
    if not args.http and not prompts:
        raise SystemExit("nothing to do: give --prompt, --prompts-file or --http")
    try:
        serve, model_overrides = settings(args)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")

    engine, tokenizer = _build(args, serve, model_overrides)
    if serve.warmup:
        print(f"warm-up: compiled {len(engine.runner.buckets)} length buckets in {engine.warmup():.1f} s",
              file=sys.stderr)
    # The checkpoint's own chat template when it ships one, else the built-in Kimi K2 format.
    template = load_chat_template(args.checkpoint) if args.checkpoint else None
    if args.http:
        from k2jax.serving.server import make_server  # noqa: PLC0415 (FastAPI, the serve extra: --http only)

        name = args.model_name or Path(args.checkpoint or args.config).name
        print(f"serving {name!r} on http://{serve.host}:{serve.port} (slots={engine.num_slots}, "
              f"context={engine.max_len})", file=sys.stderr)
        t0 = time.perf_counter()  # bridge the vocabulary for constrained decoding now, not in the first request
        words = engine.grammar_tokenizer.words
        print(f"constrained decoding ready ({words} mask words) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        make_server(engine, tokenizer, name, serve.host, serve.port, serve.limits, chat_template=template).run()
        return 0
    ids = [encode_chat(tokenizer, [{"role": "user", "content": p}], template=template) if args.chat
           else tokenizer.encode(p) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop,
                            stop_token_ids=[tokenizer.special_id("<|im_end|>")] if args.chat else [])
    try:
        for i in ids:
            engine.check_request(i, params)
    except ValueError as e:
        raise SystemExit(f"invalid request: {e}")
    t0 = time.perf_counter()
    outs = engine.generate(ids, params)
    wall = time.perf_counter() - t0
    for p, o in zip(prompts, outs):
        print(f"=== {p!r} -> [{o.finish_reason}, {len(o.token_ids)} tokens, ttft {o.ttft_s * 1e3:.0f} ms]")
        print(o.text)
    n = sum(len(o.token_ids) for o in outs)
    st = engine.stats
    print(f"--- {len(outs)} prompts, {n} tokens in {wall:.2f} s: {n / wall:.1f} tok/s overall, decode "
          f"{st['decode_tokens'] / max(st['decode_s'], 1e-9):.1f} tok/s over {st['decode_steps']} steps, "
          f"mean ttft {1e3 * sum(o.ttft_s for o in outs) / len(outs):.0f} ms", file=sys.stderr)
    pc = engine.prefix_stats()
    if pc is not None:
        print(f"--- prefix cache: {pc['hits']} hits / {pc['queries']} queries, {pc['cached_tokens']} prompt tokens "
              f"reused, {pc['evicted_nodes']} evictions, {pc['bytes_in_use'] / 2 ** 20:.1f} MiB in use of "
              f"{pc['budget_bytes'] / 2 ** 20:.0f} MiB", file=sys.stderr)
    pool = engine.pool_stats()
    print(f"--- page pool: {pool['pages_total']} pages of {pool['page_size']} tokens "
          f"({pool['bytes_total'] / 2 ** 20:.1f} MiB), {pool['pages_tree']} held by the prefix cache, "
          f"{pool['pages_free']} free, {pool['preempted']} preemptions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

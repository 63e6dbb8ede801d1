"""Benchmark: the cost of grammar-constrained decoding per step, against free decoding.

Two vocabularies: the byte tokenizer (V = 264) and a synthetic Kimi-sized tiktoken vocabulary (V = 163,840: byte
tokens, then word pieces cut from the Python standard library's sources as BPE merges would, then Kimi's special
tokens), both through k2jax's tokenizer classes and k2jax.chat.grammar's bridge. The grammar is tool_choice
"required" over two tools, one with a nested schema (objects, arrays, enums, numbers, required fields).

Host (per decode step, per constrained request): the mask computation (GrammarMatcher.allowed_tokens_bitmask) and
the token commit (accept), median and 90th percentile over a generation driven by random logits; then one batch
fill (BatchBitmask.fill, in the calling thread and in llguidance's thread pool) for B = 1..64 constrained rows. One-off costs: the tokenizer
bridge and the grammar compilation per request. Device: a jitted step "argmax(logits)" (free) against
"argmax(apply_token_bitmask(logits, bitmask, active))" (constrained), plus the host-to-device copy of the [B, W]
mask, for B = 1..64. --outlines also times outlines-core's index construction for the same schema (if installed).

Engine (--engine): the real serving step (k2jax.serving.scheduler.Engine.step: host mask fill, the jitted decode
with the mask applied before sampling, the token commit) on a random tiny model (configs/tiny, 2 layers) with each
vocabulary, S slots all busy: per step ms with every row free, half constrained and every row constrained
(tool_choice "required" over the nested schema, thinking "none", sampled), and the ratio to free.

    python bench/constrained.py [--repeats 20] [--steps 200] [--outlines] [--engine] [--slots 8]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.timing import median_seconds  # noqa: E402
from k2jax import KimiLinear, load_config  # noqa: E402
from k2jax.chat.bitmask import apply_token_bitmask  # noqa: E402
from k2jax.chat.grammar import BatchBitmask, GrammarTokenizer, unpack_bitmask  # noqa: E402
from k2jax.serving.scheduler import Engine, SamplingParams  # noqa: E402
from k2jax.tokenizer import ByteTokenizer, KimiTokenizer  # noqa: E402

KIMI_BASE, KIMI_VOCAB = 163_582, 163_840  # KimiTokenizer adds 258 special ids after the ranks
SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
            "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<think>", "</think>"]
NESTED = {"type": "object", "properties": {
    "origin": {"type": "string", "maxLength": 12},
    "destination": {"type": "string", "enum": ["Paris", "Rome", "Tokyo", "Nairobi"]},
    "passengers": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                         "seat": {"type": "string", "enum": ["aisle", "window"]}},
        "required": ["name", "age"], "additionalProperties": False}},
    "budget": {"type": "number", "minimum": 0, "maximum": 100000},
    "flexible": {"type": "boolean"}},
    "required": ["origin", "destination", "passengers", "budget"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "search_flights", "parameters": NESTED}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}}, "required": ["tz"]}}}]


def synthetic_kimi_tokenizer(folder: Path) -> KimiTokenizer:
    """A KimiTokenizer with 163,840 ids: 256 bytes, word pieces of the stdlib sources, filler, then specials."""
    tokens, seen = [bytes([b]) for b in range(256)], set()
    seen.update(tokens)
    pieces = re.compile(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+")
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        for piece in pieces.findall(path.read_text(errors="ignore")):
            data = piece.encode()
            for n in range(2, min(len(data), 16) + 1):  # every prefix, as a chain of merges would build it
                if data[:n] not in seen:
                    seen.add(data[:n])
                    tokens.append(data[:n])
            if len(tokens) >= KIMI_BASE:
                break
        if len(tokens) >= KIMI_BASE:
            break
    cjk = 0x4E00
    while len(tokens) < KIMI_BASE:  # filler: CJK pairs, as a real Kimi vocabulary has many
        t = (chr(cjk + len(tokens) % 20000) + chr(cjk + len(tokens) // 20000)).encode()
        if t not in seen:
            seen.add(t)
            tokens.append(t)
        cjk += 1
    tokens = tokens[:KIMI_BASE]
    (folder / "tiktoken.model").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    config = {"added_tokens_decoder": {str(KIMI_BASE + i): {"content": s} for i, s in enumerate(SPECIALS)}}
    return KimiTokenizer(folder / "tiktoken.model", config)


def _percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def host_costs(gt: GrammarTokenizer, grammar: str, steps: int, rng) -> dict:
    """Per-step mask and accept times (seconds) over random-logit generations totalling `steps` steps."""
    mask_t, accept_t, compile_t = [], [], []
    V = gt.vocab_size
    while len(mask_t) < steps:
        t0 = time.perf_counter()
        m = gt.matcher(grammar)
        compile_t.append(time.perf_counter() - t0)
        while not m.is_terminated() and len(mask_t) < steps:
            t0 = time.perf_counter()
            bits = m.allowed_tokens_bitmask()
            mask_t.append(time.perf_counter() - t0)
            logits = rng.standard_normal(V, dtype=np.float32)
            tok = int(np.argmax(np.where(unpack_bitmask(bits, V), logits, -np.inf)))
            t0 = time.perf_counter()
            m.accept(tok)
            accept_t.append(time.perf_counter() - t0)
    return {"mask_med": statistics.median(mask_t), "mask_p90": _percentile(mask_t, 90),
            "accept_med": statistics.median(accept_t), "compile": statistics.median(compile_t)}


def batch_fill_cost(gt: GrammarTokenizer, grammar: str, B: int, repeats: int, rng,
                    num_threads: int | None = 0) -> float:
    """Median seconds of one BatchBitmask.fill over B constrained rows, each a few tokens into its grammar
    (num_threads as in BatchBitmask: 0 the calling thread, None llguidance's pool)."""
    matchers = {}
    for r in range(B):
        m = gt.matcher(grammar)
        for _ in range(int(rng.integers(0, 40))):  # rows at different points of their output
            bits = unpack_bitmask(m.allowed_tokens_bitmask(), gt.vocab_size)
            m.accept(int(rng.choice(np.flatnonzero(bits))))
            if m.is_accepting():
                break
        matchers[r] = m
    batch = BatchBitmask(B, gt.vocab_size, num_threads)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch.fill(matchers)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_costs(V: int, B: int, repeats: int) -> tuple[float, float, float]:
    """(free step, constrained step, mask host-to-device copy) median seconds."""
    logits = jax.random.normal(jax.random.key(0), (B, V), jnp.float32)
    words = (B, (V + 31) // 32)
    bitmask_host = np.random.default_rng(0).integers(-2**31, 2**31, words, dtype=np.int64).astype(np.int32)
    bitmask = jnp.asarray(bitmask_host)
    active = jnp.asarray(np.arange(B) % 2 == 0)  # half the rows constrained, half free
    free = jax.jit(lambda lg: jnp.argmax(lg, axis=-1))
    masked = jax.jit(lambda lg, bm, act: jnp.argmax(apply_token_bitmask(lg, bm, act), axis=-1))
    t_free = median_seconds(free, logits, repeats=repeats)
    t_mask = median_seconds(masked, logits, bitmask, active, repeats=repeats)
    t_copy = median_seconds(lambda x: jax.device_put(x), bitmask_host, repeats=repeats)
    return t_free, t_mask, t_copy


def outlines_index_seconds(tokenizer, V: int) -> float | None:
    """Seconds outlines-core takes to build its index for NESTED over the same vocabulary (None if not installed)."""
    try:
        from outlines_core import Index, Vocabulary  # noqa: PLC0415 (optional: only for the comparison)
        from outlines_core.json_schema import build_regex_from_schema  # noqa: PLC0415 (optional)
    except ImportError:
        return None
    specials = set(tokenizer.specials.values())
    vocab: dict[str, list[int]] = {}
    for i in range(V):
        if i in specials:
            continue
        text = tokenizer.decode([i])
        vocab.setdefault(text, []).append(i)
    eos = tokenizer.special_id("<|im_end|>")
    regex = build_regex_from_schema(json.dumps(NESTED))
    t0 = time.perf_counter()
    Index(regex, Vocabulary(eos, vocab))
    return time.perf_counter() - t0


def engine_step_ms(tok, V: int, slots: int, steps: int) -> dict[str, float]:
    """Median ms of Engine.step() with every slot decoding, for 0, half and all slots grammar-constrained."""
    cfg = load_config("tiny", vocab_size=V, num_hidden_layers=2, kda_layers=(1,), full_attn_layers=(2,))
    stop = [tok.special_id("<|im_end|>")]
    engine = Engine(KimiLinear(cfg, rngs=nnx.Rngs(0)), tok, num_slots=slots, max_len=512, min_bucket=512,
                    eos_token_ids=stop)
    engine.warmup()
    grammar = engine.grammar_tokenizer.grammar(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    prompt = tok.encode("find me a flight")
    out = {}
    for label, n_constrained in (("free", 0), ("half", slots // 2), ("all", slots)):
        times = []
        while len(times) < steps:
            reqs = [engine.submit(prompt, SamplingParams(max_tokens=400, temperature=1.0, seed=len(times) + i,
                                                         ignore_eos=True),
                                  grammar=grammar if i < n_constrained else None) for i in range(slots)]
            engine.step()  # prefill (and the first decode step)
            while engine.num_active == slots and len(times) < steps:
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
            for r in reqs:
                engine.abort(r)
            while engine.has_work:
                engine.step()
        out[label] = statistics.median(times) * 1e3
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--outlines", action="store_true", help="also time outlines-core's index construction")
    ap.add_argument("--engine", action="store_true", help="also time the real engine step, free vs constrained")
    ap.add_argument("--slots", type=int, default=8)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        kimi = synthetic_kimi_tokenizer(Path(tmp))
        print(f"synthetic Kimi vocabulary built in {time.perf_counter() - t0:.1f} s")
        vocabs = [("byte", ByteTokenizer(), 264), ("kimi-size", kimi, KIMI_VOCAB)]
        print("\n| vocab | V | bridge build | grammar compile | mask / step (median, p90) | accept / step |")
        print("|---|---|---|---|---|---|")
        prepared = []
        for name, tok, V in vocabs:
            t0 = time.perf_counter()
            gt = GrammarTokenizer(tok, V, [tok.special_id("<|im_end|>")])
            bridge = time.perf_counter() - t0
            grammar = gt.grammar(tools=TOOLS, tool_choice="required")
            h = host_costs(gt, grammar, args.steps, rng)
            print(f"| {name} | {V} | {bridge * 1e3:.0f} ms | {h['compile'] * 1e3:.1f} ms | "
                  f"{h['mask_med'] * 1e6:.0f} us,"
                  f" {h['mask_p90'] * 1e6:.0f} us | {h['accept_med'] * 1e6:.0f} us |")
            prepared.append((name, tok, V, gt, grammar))
        print("\n| vocab | B | host batch fill (thread, pool) | device free step | device constrained step | ratio "
              "| mask H2D |")
        print("|---|---|---|---|---|---|---|")
        for name, tok, V, gt, grammar in prepared:
            for B in batches:
                fill = batch_fill_cost(gt, grammar, B, args.repeats, rng)
                fill_pool = batch_fill_cost(gt, grammar, B, args.repeats, rng, num_threads=None)
                t_free, t_mask, t_copy = device_costs(V, B, args.repeats)
                print(f"| {name} | {B} | {fill * 1e6:.0f} us, {fill_pool * 1e6:.0f} us | {t_free * 1e6:.0f} us | "
                      f"{t_mask * 1e6:.0f} us | {t_mask / t_free:.2f}x | {t_copy * 1e6:.0f} us |")
        if args.engine:
            print("\n| vocab | V | slots | engine step, all free | half constrained | all constrained | ratio (all) |")
            print("|---|---|---|---|---|---|---|")
            for name, tok, V, _, _ in prepared:
                ms = engine_step_ms(tok, V, args.slots, args.steps)
                print(f"| {name} | {V} | {args.slots} | {ms['free']:.2f} ms | {ms['half']:.2f} ms | {ms['all']:.2f} ms | "
                      f"{ms['all'] / ms['free']:.2f}x |")
        if args.outlines:
            for name, tok, V, _, _ in prepared:
                s = outlines_index_seconds(tok, V)
                print(f"outlines-core index for the nested schema, {name} (V={V}): "
                      + ("not installed" if s is None else f"{s:.2f} s"))


if __name__ == "__main__":
    main()

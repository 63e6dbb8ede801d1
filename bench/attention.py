"""Benchmark (not a test): memory and time of MLA attention and of the lm_head cross-entropy, full vs blocked.

    python bench/attention.py [--config default] [--lengths 1024,2048,4096,16384,65536] [--time-max 4096]
                              [--form expanded|absorbed] [--ce-tokens 1024,4096,16384,65536] [--out results.md]

Attention: one MLA layer's attention of `--config` (heads, q/k head dim nope + rope, v head dim; the absorbed form
uses one key head of kv_lora_rank + rope and values of kv_lora_rank), B=1, causal, float32, under jit:
`attention_reference` (materialises [H, T, T]) vs `attention_blocked` (the XLA flash form, default blocks).
Cross-entropy: N tokens of hidden_size against the config's vocabulary, float32: `linear_cross_entropy_reference`
([N, V] logits) vs `linear_cross_entropy` (default blocks). Memory is XLA's compiled temp-buffer estimate
(`memory_analysis().temp_size_in_bytes`, compile only, so it is given at every length); time is the median of
--repeats runs (compile and a warm-up excluded), only up to --time-max (attention T, cross-entropy N).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import median_seconds, write_report  # noqa: E402
from k2jax.config_files import load_config  # noqa: E402
from pallas_kernels.attention import attention_blocked, attention_reference  # noqa: E402
from pallas_kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402

MIB = 2 ** 20


def attention_dims(cfg, form: str):
    """(H, Hkv, Dk, Dv) of the config's MLA attention in the expanded or absorbed form."""
    H, rope = cfg.num_attention_heads, cfg.qk_rope_head_dim
    if form == "expanded":
        return H, H, cfg.qk_nope_head_dim + rope, cfg.v_head_dim
    return H, 1, cfg.kv_lora_rank + rope, cfg.kv_lora_rank


def compiled_pair(fn, specs):
    """Compiled forward and forward+backward (cotangent as the last argument) of fn over `specs`."""
    def fwd_bwd(*args):
        out, vjp = jax.vjp(fn, *args[:-1])
        return vjp(args[-1])
    out_spec = jax.eval_shape(fn, *specs)
    return (jax.jit(fn).lower(*specs).compile(),
            jax.jit(fwd_bwd).lower(*specs, out_spec).compile(), out_spec)


def measure(fn, specs, make_args, timed: bool, repeats: int):
    """(fwd temp MiB, fwd+bwd temp MiB, fwd s or None, fwd+bwd s or None)."""
    fwd, fwd_bwd, out_spec = compiled_pair(fn, specs)
    mem = (fwd.memory_analysis().temp_size_in_bytes / MIB, fwd_bwd.memory_analysis().temp_size_in_bytes / MIB)
    if not timed:
        return mem + (None, None)
    args = make_args()
    cot = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), out_spec)
    return mem + (median_seconds(fwd, *args, repeats=repeats), median_seconds(fwd_bwd, *args, cot, repeats=repeats))


def attention_rows(cfg, form, lengths, time_max, repeats):
    H, Hkv, Dk, Dv = attention_dims(cfg, form)
    rows = []
    for T in lengths:
        shapes = ((1, T, H, Dk), (1, T, Hkv, Dk), (1, T, Hkv, Dv))
        specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
        make = lambda: [jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes)]  # noqa: E731
        for name, fn in (("reference", attention_reference), ("blocked", attention_blocked)):
            rows.append((T, name) + measure(fn, specs, make, T <= time_max, repeats))
            print(_row(rows[-1]), flush=True)
    return (H, Hkv, Dk, Dv), rows


def cross_entropy_rows(cfg, tokens, time_max, repeats):
    D, V = cfg.hidden_size, cfg.vocab_size
    rows = []
    for N in tokens:
        specs = [jax.ShapeDtypeStruct((N, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32)]
        labels = jnp.arange(N, dtype=jnp.int32) % V

        def make():
            return [jax.random.normal(jax.random.key(0), (N, D)), 0.05 * jax.random.normal(jax.random.key(1), (D, V))]

        for name, op in (("reference", linear_cross_entropy_reference), ("chunked", linear_cross_entropy)):
            fn = lambda x, w, op=op: op(x, w, labels)[0]  # noqa: E731
            rows.append((N, name) + measure(fn, specs, make, N <= time_max, repeats))
            print(_row(rows[-1]), flush=True)
    return (D, V), rows


def _row(r):
    n, name, mf, mb, tf, tb = r
    ms = lambda t: "—" if t is None else f"{t * 1e3:.1f}"  # noqa: E731
    return f"| {n} | {name} | {mf:.1f} | {mb:.1f} | {ms(tf)} | {ms(tb)} |"


def _ratios(rows, full: str, blocked: str):
    """Lines 'n: blocked / full' for memory and, where both were timed, time."""
    by = {(r[0], r[1]): r for r in rows}
    out = []
    for n in sorted({r[0] for r in rows}):
        f, b = by[(n, full)], by[(n, blocked)]
        line = f"| {n} | {b[2] / f[2]:.3f} | {b[3] / f[3]:.3f} |"
        line += "".join(f" {b[i] / f[i]:.2f} |" if f[i] and b[i] else " — |" for i in (4, 5))
        out.append(line)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="a configs/ name or YAML path (MLA and vocabulary sizes)")
    p.add_argument("--form", choices=("expanded", "absorbed"), default="expanded")
    p.add_argument("--lengths", default="1024,2048,4096,16384,65536", help="attention sequence lengths T")
    p.add_argument("--ce-tokens", default="1024,4096,16384,65536", help="cross-entropy token counts N")
    p.add_argument("--time-max", type=int, default=4096, help="time only up to this T / N (memory: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="also write the markdown tables to this file")
    a = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    cfg = load_config(a.config)
    head = "| n | impl | fwd temp MiB | fwd+bwd temp MiB | fwd ms | fwd+bwd ms |\n|---|---|---|---|---|---|"
    ratio_head = "| n | fwd temp | fwd+bwd temp | fwd time | fwd+bwd time |\n|---|---|---|---|---|"
    print(head)
    dims, att = attention_rows(cfg, a.form, ints(a.lengths), a.time_max, a.repeats)
    (D, V), ce = cross_entropy_rows(cfg, ints(a.ce_tokens), a.time_max, a.repeats)
    H, Hkv, Dk, Dv = dims
    md = [
        f"On {jax.default_backend().upper()} ({os.cpu_count()} cores visible, load average at the end "
        f"{os.getloadavg()[0]:.1f}), jax {jax.__version__}; config `{a.config}`, float32, B=1, jit; memory: XLA's "
        f"compiled temp-buffer estimate; time: median of {a.repeats} (— = not timed, above --time-max "
        f"{a.time_max}).",
        "",
        f"Attention ({a.form} MLA: H={H}, Hkv={Hkv}, Dk={Dk}, Dv={Dv}, causal), n = T:",
        "", head, *[_row(r) for r in att], "",
        "blocked / reference:", "", ratio_head, *_ratios(att, "reference", "blocked"), "",
        f"lm_head + cross-entropy (D={D}, V={V}), n = N tokens:",
        "", head, *[_row(r) for r in ce], "",
        "chunked / reference:", "", ratio_head, *_ratios(ce, "reference", "chunked"),
    ]
    print()
    write_report("\n".join(md), a.out)


if __name__ == "__main__":
    main()

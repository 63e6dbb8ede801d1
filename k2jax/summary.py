"""`python -m k2jax.summary [CONFIG]`: the layer schedule, parameter counts and one timed forward pass.

Large configs (e.g. kimi_linear_48b_a3b) are counted abstractly (nothing allocated) and never run; configs under
`--max-run-params` (default 50M) also run a jitted forward pass on random tokens.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config_files import load_config
from k2jax.model import KimiLinear, count_params


def _schedule(cfg) -> str:
    attn = "".join("K" if t == "kda" else "M" for t in cfg.layer_types)
    ffn = "".join("E" if cfg.is_moe_layer(i) else "D" for i in range(cfg.num_hidden_layers))
    return f"attention {attn}  (K = KDA, M = MLA)\nffn       {ffn}  (D = dense SwiGLU, E = MoE)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="default", help="a configs/ name, a YAML file or an HF config.json")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--max-run-params", type=float, default=50e6)
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    print(f"config {cfg.name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"{cfg.num_experts} experts top-{cfg.num_experts_per_token}, params {cfg.param_dtype}, compute {cfg.dtype}")
    print(_schedule(cfg))
    counts = count_params(cfg)
    for k, v in counts.items():
        print(f"  {k:>15}: {v:>18,d}  ({v / 1e9:.3f} B)")
    if counts["total"] > args.max_run_params:
        print(f"not running a forward pass: {counts['total']:,d} params > --max-run-params")
        return 0
    model = KimiLinear(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.length), 0, cfg.vocab_size)
    fwd = nnx.jit(lambda m, t: m(t))
    t0 = time.perf_counter()
    logits = fwd(model, tokens).block_until_ready()
    t1 = time.perf_counter()
    logits = fwd(model, tokens).block_until_ready()
    t2 = time.perf_counter()
    ok = bool(jnp.isfinite(logits).all())
    print(f"forward [{args.batch}, {args.length}] -> logits {tuple(logits.shape)} {logits.dtype}, finite={ok}; "
          f"compile+run {t1 - t0:.2f} s, run {1e3 * (t2 - t1):.1f} ms "
          f"({args.batch * args.length / (t2 - t1):,.0f} tokens/s on {jax.devices()[0].platform})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark (not a test): serving's attention over a latent cache (`latent_attention_rows`) by block sizes.

    python bench/latent_rows.py [--config default] [--context 28800] [--pieces 1,129] [--repeats 30]
                                [--blocks 32x2048,default,8x1024] [--out results.md]

What an agent turn at a long history spends in each MLA layer: a decode step (piece 1) and a tool result's
continuing piece (129 tokens) attending to --context cached latents of one slot (the config's heads, kv_lora_rank,
rope dims; float32), for each --blocks setting (`QxK`: block_q tokens x block_k keys; `default`: the op's own
choice). Times are interleaved medians (every setting once per round), reported as ms and as a ratio to the first
setting, with the attention's matmul FLOPs per second (2 x H x (2 R + P) per real query-key pair) beside them.
The `matmuls only` rows are a floor for any exact form of this attention on this backend: the same two products
(scores = q . [c | k_pe] for every (token, head) row and key, then scores . c) and nothing else (no softmax, no
mask), blocked by 1,024 or 4,096 keys (faster than unblocked here).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import interleaved_medians, median_seconds, write_report  # noqa: E402
from k2jax.config_files import load_config  # noqa: E402
from pallas_kernels.attention import latent_attention_rows  # noqa: E402


def blocks_of(spec: str) -> dict:
    """'32x2048' -> {'block_q': 32, 'block_k': 2048}; 'default' -> {}."""
    if spec == "default":
        return {}
    q, k = spec.split("x")
    return {"block_q": int(q), "block_k": int(k)}


def matmuls_only(q, keys, values, block: int = 4096):
    """The attention's two products without the softmax, a block of keys at a time: sum over blocks of
    (q . keys_blk^T) . values_blk. q [rows, R + P] (every (token, head) row), keys [L, R + P] ([c | k_pe] of the
    cached tokens), values [L, R] (their c) -> [rows, R]."""
    block = min(block, keys.shape[0])
    n = keys.shape[0] // block  # whole blocks; the rest as one more product

    def add_block(j, acc):
        k = jax.lax.dynamic_slice_in_dim(keys, j * block, block)
        return acc + (q @ k.T) @ jax.lax.dynamic_slice_in_dim(values, j * block, block)

    out = jax.lax.fori_loop(0, n, add_block, jnp.zeros((q.shape[0], values.shape[1]), jnp.float32))
    return out + (q @ keys[n * block:].T) @ values[n * block:]


def history_attention_floor(config, history: int, piece: int, decode_steps: int, *, repeats: int = 10) -> float:
    """Seconds that the attention over `history` cached tokens of one agent turn costs at least on this backend:
    per MLA layer of `config`, `matmuls_only` for the `piece` new tokens plus `decode_steps` single tokens (the
    faster of 1,024- and 4,096-key blocks for each, median of `repeats`). What a late turn must add to a first one
    whatever the attention kernel, softmax and masking free."""
    H, R, P = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    ks = jax.random.split(jax.random.key(1), 3)
    keys = jax.random.normal(ks[0], (history, R + P))
    values = keys[:, :R]
    total = 0.0
    for tokens, times in ((piece, 1), (1, decode_steps)):
        q = jax.random.normal(ks[1], (tokens * H, R + P))
        best = min(median_seconds(jax.jit(lambda *xs, b=b: matmuls_only(*xs, block=b)), q, keys, values,
                                  repeats=repeats) for b in (1024, 4096))
        total += times * best
    return total * sum(kind == "mla" for kind in config.layer_types)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default")
    p.add_argument("--context", type=int, default=28800, help="cached tokens the pieces attend to")
    p.add_argument("--pieces", default="1,256/129",
                   help="query tokens per call (1: a decode step); T/N: a piece padded to T with N real queries, as "
                        "serving pads a 129-token suffix to its 256-token bucket")
    p.add_argument("--blocks", default="32x2048,default", help="block settings QxK or 'default'; the first is 1.00")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    H, R, P = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    slots_len = -(-(a.context + 16) // 1024) * 1024  # a slot cache a bit longer than the context, as serving's
    ks = jax.random.split(jax.random.key(0), 4)
    ckv = jax.random.normal(ks[0], (1, slots_len, R))
    kpe = jax.random.normal(ks[1], (1, slots_len, P))
    lengths = jnp.array([a.context], jnp.int32)
    specs = [s.strip() for s in a.blocks.split(",") if s.strip()]
    lines = [f"`latent_attention_rows`, config `{a.config}` (H={H}, R={R}, P={P}), float32, {a.context:,} cached "
             f"tokens, {jax.default_backend().upper()} ({os.cpu_count()} cores), interleaved medians of {a.repeats}",
             "", "| piece | blocks | ms | ratio | GFLOP/s |", "|---|---|---:|---:|---:|"]
    for piece in a.pieces.split(","):
        T, real = (int(x) for x in piece.split("/")) if "/" in piece else (int(piece), int(piece))
        q_mask = jnp.arange(T)[None, :] < real
        q_lat = jax.random.normal(ks[2], (1, T, H, R))
        q_pe = jax.random.normal(ks[3], (1, T, H, P))
        fns = {s: jax.jit(lambda *xs, kw=blocks_of(s): latent_attention_rows(*xs, scale=0.1, q_mask=q_mask,
                                                                                      **kw)) for s in specs}
        # The floor gets the cache sliced and [c | k_pe] side by side ready-made (outside the timing).
        floors = {b: jax.jit(lambda *xs, b=b: matmuls_only(*xs, block=b)) for b in (1024, 4096)}
        floor_args = (jnp.concatenate([q_lat, q_pe], axis=-1)[:, :real].reshape(real * H, R + P),
                      jnp.concatenate([ckv[0, :a.context], kpe[0, :a.context]], axis=-1), ckv[0, :a.context])
        for b, floor in floors.items():
            fns[f"matmuls only, {b}-key blocks"] = lambda *_, floor=floor: floor(*floor_args)
        secs = interleaved_medians(fns, (q_lat, q_pe, ckv, kpe, lengths), repeats=a.repeats)
        flops = 2 * H * (2 * R + P) * real * a.context
        for s in fns:
            lines.append(f"| {piece} | {s} | {secs[s] * 1e3:.2f} | {secs[s] / secs[specs[0]]:.2f} | "
                         f"{flops / secs[s] / 1e9:.1f} |")
    lines.append(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    write_report("\n".join(lines), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

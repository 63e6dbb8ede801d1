"""QAT vs PTQ for INT4 routed experts: train one small model with and one without quantization-aware training on the
same synthetic language-modelling task, pack both with INT4 experts, and compare eval losses.

Task: an order-2 Markov chain over a small vocabulary (each pair of previous tokens has its own sparse next-token
distribution, Dirichlet(alpha)), generated here from a seed; the eval set is held-out sequences of the same chain,
whose entropy rate is the best achievable loss. Both runs share the init, the batches and the AdamW schedule; the
QAT run sets `quantization: {qat: true}` (fake-quantized experts, straight-through gradients).
After training, `quantize_model_experts` packs each model (PTQ for the float one; for the QAT one the same grid it
trained on), and the eval loss is measured on the packed model (INT4 sorted path) and on the float weights.

    python bench/qat.py [--steps 300] [--config tiny] [--batch 32] [--length 64] [--num-shared-experts 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from k2jax import KimiLinear, load_config  # noqa: E402
from k2jax.quantize import expert_weight_bytes, quantize_model_experts  # noqa: E402


# ---- data --------------------------------------------------------------------------------------------------------
def markov_chain(vocab: int, alpha: float, seed: int) -> np.ndarray:
    """Transition table P [vocab, vocab, vocab]: P[a, b] is the distribution of the token after (a, b)."""
    return np.random.default_rng(seed).dirichlet(np.full(vocab, alpha), size=(vocab, vocab))


def sample(P: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """n sequences [n, length] of the chain (first two tokens uniform)."""
    V = P.shape[0]
    out = np.empty((n, length), np.int32)
    out[:, :2] = rng.integers(0, V, (n, 2))
    cdf = np.cumsum(P, axis=-1)
    for t in range(2, length):
        u = rng.random(n)[:, None]
        out[:, t] = np.minimum((u > cdf[out[:, t - 2], out[:, t - 1]]).sum(-1), V - 1)
    return out


def entropy_rate(P: np.ndarray, tokens: np.ndarray) -> float:
    """Mean true-model cross-entropy over positions >= 2 of `tokens` (the loss floor)."""
    p = P[tokens[:, :-2], tokens[:, 1:-1], tokens[:, 2:]]
    return float(-np.log(p).mean())


# ---- model and loop ----------------------------------------------------------------------------------------------
def lm_loss(logits, tokens):
    """Mean next-token cross-entropy over positions >= 2 (the chain's context is complete from there on)."""
    logp = jax.nn.log_softmax(logits[:, 1:-1].astype(jnp.float32))
    return -jnp.take_along_axis(logp, tokens[:, 2:, None], axis=-1).mean()


@nnx.jit
def train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(lambda m: lm_loss(m(tokens), tokens))(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model, tokens):
    return lm_loss(model(tokens), tokens)


def train(config, batches, lr: float, seed: int):
    model = KimiLinear(config, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, len(batches) // 20), len(batches), lr / 10)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
    losses = [float(train_step(model, optimizer, jnp.asarray(batches[0])))]  # includes the compile
    t0 = time.perf_counter()
    losses += [float(train_step(model, optimizer, jnp.asarray(b))) for b in batches[1:]]
    return model, losses, time.perf_counter() - t0


def without_fake_quant(model):
    """A clone of a QAT model evaluated on its raw float expert weights."""
    clone = nnx.clone(model)
    for layer in clone.layers:
        if layer.is_moe:
            layer.block_sparse_moe.experts.qat = None
    return clone


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=16, help="tokens used by the chain (the model keeps its vocab)")
    ap.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of each next-token law")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-shared-experts", type=int, default=None, help="override the config's (0: routed only)")
    args = ap.parse_args()

    base = load_config(args.config)
    if args.num_shared_experts is not None:
        base = base.replace(num_shared_experts=args.num_shared_experts)
    if args.vocab > base.vocab_size:
        raise SystemExit(f"--vocab {args.vocab} exceeds the config's vocab_size {base.vocab_size}")
    P = markov_chain(args.vocab, args.alpha, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    batches = [sample(P, args.batch, args.length, rng) for _ in range(args.steps)]
    eval_tokens = jnp.asarray(sample(P, 128, args.length, np.random.default_rng(args.seed + 2)))
    floor = entropy_rate(P, np.asarray(eval_tokens))

    q = {"group_size": args.group_size}
    runs = {"float (no QAT) + PTQ": base, "QAT": base.replace(quantization={**q, "qat": True})}
    rows = []
    for name, cfg in runs.items():
        model, losses, secs = train(cfg, batches, args.lr, args.seed)
        packed = quantize_model_experts(model, group_size=args.group_size)
        raw = without_fake_quant(model) if cfg.quantization else model
        l_float = float(eval_loss(raw, eval_tokens))
        l_train = float(eval_loss(model, eval_tokens))  # the forward it trained with (fake-quant for QAT)
        l_int4 = float(eval_loss(packed, eval_tokens))
        rows.append((name, secs, np.mean(losses[-20:]), l_float, l_train, l_int4,
                     expert_weight_bytes(model, as_dtype="bfloat16"), expert_weight_bytes(packed)))

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; config {base.name} ({base.num_hidden_layers} "
          f"layers, hidden {base.hidden_size}, {base.num_experts} experts top-{base.num_experts_per_token}, expert I "
          f"{base.moe_intermediate_size}, {base.num_shared_experts} shared); order-2 Markov chain over {args.vocab} "
          f"tokens (alpha {args.alpha}); {args.steps} AdamW steps of {args.batch} x {args.length} tokens, lr "
          f"{args.lr}; INT4 group {args.group_size}, bf16 scales; eval on 128 held-out sequences, entropy-rate "
          f"floor {floor:.4f} nats")
    print("| run | train time (s, after compile) | train loss (last 20) | eval float experts | eval as trained "
          "| eval INT4 packed | INT4 vs float | INT4 vs as trained | expert bytes bf16 -> INT4 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, secs, tl, lf, lt, lq, bb, qb in rows:
        print(f"| {name} | {secs:.0f} | {tl:.4f} | {lf:.4f} | {lt:.4f} | {lq:.4f} | {100 * (lq - lf) / lf:+.2f}% "
              f"| {100 * (lq - lt) / lt:+.2f}% | {bb:,} -> {qb:,} ({bb / qb:.2f}x) |")


if __name__ == "__main__":
    main()

"""Where one training step's time goes: the step, then its pieces, each jitted and timed alone (forward + backward).

    python bench/train_speed.py --profile                  # default config: table on stdout and in --profile-out
    python bench/train_speed.py --profile --trace-dir /tmp/trace   # also a jax.profiler trace of 3 steps

Rows (`profile_step`):
- 'train step (jitted)': the real `make_train_step` program (forward, backward, optimizer, router-bias update) on
  one batch; 'batch (MQAR, host)' the host-side batch generation and transfer the training loop adds per step.
- Top-level pieces, each its own jitted forward + backward (gradients with respect to its parameters and input,
  against a fixed random cotangent) on the activations the real model produces: the embedding lookup, each
  layer's attention block (input norm + token mixer + residual) and FFN block (post norm + MLP or MoE + residual),
  the final norm + lm_head + cross-entropy, and the optimizer update (tx.update + apply_updates). 'other' is the
  step minus their sum: what the fused program saves (negative) or adds (gradient accumulation, norms, clipping,
  the finite check, the bias update).
- Indented rows are parts of the row above (not added to the total): the KDA op alone (`pallas_kernels.kda.kda`
  on the layer's q, k, v, g, beta shapes), the attention op alone, the MoE router, routed experts and shared experts.

Each piece runs in interleaved rounds and reports its median, so a change in the machine's load hits all rows
alike; figures are noisy on a shared machine: compare rows within one table.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from k2jax.layers.moe import RouterBias, experts_auto, experts_dense, experts_sorted, route
from k2jax.model import KimiLinear, router_bias_rows
from k2jax.training.loop import make_source
from k2jax.training.optim import make_optimizer
from k2jax.training.step import lm_head_cross_entropy, make_train_step
from pallas_kernels.attention import attention
from pallas_kernels.kda import kda

_MOE_IMPLS = {"auto": experts_auto, "ragged": experts_sorted, "dense": experts_dense}


def _fwd_bwd(fn, params, *inputs):
    """A jitted forward + backward of fn(params, *inputs) -> array (or tuple, first used): gradients with respect
    to params and every floating input, against a fixed random cotangent of the output."""

    def loss(params, inputs, ct):
        out = fn(params, *inputs)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(jnp.float32) * ct)

    out = jax.eval_shape(fn, params, *inputs)
    out = out[0] if isinstance(out, tuple) else out
    ct = jax.random.normal(jax.random.key(7), out.shape, jnp.float32)
    floating = tuple(jnp.issubdtype(x.dtype, jnp.floating) for x in inputs)

    def run(params, inputs, ct):
        diff = tuple(x for x, f in zip(inputs, floating) if f)

        def wrapped(params, diff):
            it = iter(diff)
            return loss(params, tuple(next(it) if f else x for x, f in zip(inputs, floating)), ct)

        return jax.grad(wrapped, argnums=(0, 1))(params, diff)

    jitted = jax.jit(run)
    return lambda: jitted(params, inputs, ct)


def _module_fn(module, call):
    """(fn(params, *inputs), params) for calling `module` through `call(module, *inputs)` with its nnx.Param
    variables as the differentiated argument."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return (lambda p, *inputs: call(nnx.merge(graphdef, p, rest), *inputs)), params


def _time_rounds(pieces: dict, rounds: int) -> dict:
    """Median seconds of each zero-argument callable in `pieces` over `rounds` interleaved rounds (after a warm-up
    call each, which compiles)."""
    for fn in pieces.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in pieces}
    for _ in range(rounds):
        for name, fn in pieces.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def profile_step(mcfg, tcfg, rounds: int = 5, trace_dir: str | None = None) -> list[tuple[str, float, int]]:
    """Time one training step of (mcfg, tcfg) on one device and its pieces (see the module docstring).

    Returns rows (name, seconds, depth): depth 0 rows are the step and the batch, depth 1 its pieces (with 'other'),
    depth 2 parts of the piece above. With trace_dir, also writes a jax.profiler trace of 3 steps there.
    """
    if mcfg.scan_layers:
        raise ValueError("profile_step: profiles the per-layer model (model.scan_layers=false); the scanned one "
                         "runs the same layers inside one scan")
    model = KimiLinear(mcfg, rngs=nnx.Rngs(tcfg.seed))
    tx, schedule = make_optimizer(tcfg)
    graphdef, params, biases, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    source = make_source(mcfg, tcfg)
    batch = {k: jnp.asarray(v) for k, v in next(source).items()}
    state = {"params": params, "biases": biases, "rest": rest, "opt": tx.init(params)}
    step_fn = make_train_step(graphdef, mcfg, tcfg, tx, schedule, router_bias_rows(mcfg, biases))
    pieces = {"train step (jitted)": lambda: step_fn(state, batch, jnp.int32(0))}

    def host_batch():
        return {k: jnp.asarray(v) for k, v in next(source).items()}

    pieces["batch (MQAR, host)"] = host_batch
    rows = [("train step (jitted)", 0), ("batch (MQAR, host)", 0)]

    # Activations of the real model on this batch, the inputs of each piece.
    tokens, seg = batch["tokens"], batch.get("segment_ids")
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    token_mask = None if seg is None else seg != 0
    emb_fn, emb_params = _module_fn(model, lambda m, t: jnp.take(m.embed_tokens[...], t, axis=0))
    pieces["embedding"] = _fwd_bwd(lambda p, t: emb_fn(p, t).astype(jnp.dtype(mcfg.dtype)), emb_params, tokens)
    rows.append(("embedding", 1))
    x = jnp.take(model.embed_tokens[...], tokens, axis=0).astype(jnp.dtype(mcfg.dtype))
    for i, layer in enumerate(model.layers):
        kind = layer.layer_type.upper()

        def attn_call(m, x):
            kw = {} if m.layer_type == "kda" else {"positions": positions}
            return x + m.self_attn(m.input_layernorm(x), segment_ids=seg, **kw)[0].astype(x.dtype)

        fn, p = _module_fn(layer, attn_call)
        name = f"layer {i} attention ({kind})"
        pieces[name] = _fwd_bwd(fn, p, x)
        rows.append((name, 1))
        rows.extend(_mixer_parts(layer, mcfg, x, seg, positions, pieces, i))
        h = attn_call(layer, x)

        def ffn_call(m, h):
            normed = m.post_attention_layernorm(h)
            out = m.block_sparse_moe(normed, token_mask=token_mask)[0] if m.is_moe else m.mlp(normed)
            return h + out.astype(h.dtype)

        fn, p = _module_fn(layer, ffn_call)
        name = f"layer {i} FFN ({'MoE' if layer.is_moe else 'MLP'})"
        pieces[name] = _fwd_bwd(fn, p, h)
        rows.append((name, 1))
        if layer.is_moe:
            rows.extend(_moe_parts(layer, mcfg, layer.post_attention_layernorm(h), pieces, i))
        x = ffn_call(layer, h)

    def head_call(m, x, targets, mask):
        return lm_head_cross_entropy(m, m.norm(x), targets, mask)[0]

    fn, p = _module_fn(model, head_call)
    pieces["final norm + lm_head + cross-entropy"] = _fwd_bwd(fn, p, x, batch["targets"], batch["loss_mask"])
    rows.append(("final norm + lm_head + cross-entropy", 1))
    grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype) * 1e-3, params)
    update = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
    pieces[f"optimizer update ({tcfg.optimizer})"] = lambda: update(grads, state["opt"], params)
    rows.append((f"optimizer update ({tcfg.optimizer})", 1))

    seconds = _time_rounds(pieces, rounds)
    step = seconds["train step (jitted)"]
    top = sum(seconds[n] for n, d in rows if d == 1)
    out = [(n, seconds[n], d) for n, d in rows]
    out.append(("other (step - pieces)", step - top, 1))
    if trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(3):
                jax.block_until_ready(pieces["train step (jitted)"]())
    return out


def _mixer_parts(layer, mcfg, x, seg, positions, pieces, i):
    """The token mixer's core op alone (KDA op or attention op) on random inputs of the layer's shapes."""
    B, T = x.shape[:2]
    dt = jnp.dtype(mcfg.dtype)
    keys = jax.random.split(jax.random.key(11), 5)
    if layer.layer_type == "kda":
        H, K = mcfg.kda_num_heads, mcfg.kda_head_dim
        unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
        q = unit(jax.random.normal(keys[0], (B, T, H, K))).astype(dt)
        k = unit(jax.random.normal(keys[1], (B, T, H, K))).astype(dt)
        v = jax.random.normal(keys[2], (B, T, H, K)).astype(dt)
        g = -jnp.exp(jax.random.uniform(keys[3], (B, T, H, K), minval=-6.0, maxval=-1.0))
        beta = jax.nn.sigmoid(jax.random.normal(keys[4], (B, T, H)))

        def op(_, q, k, v, g, beta):
            return kda(q, k, v, g, beta, scale=K ** -0.5, segment_ids=seg, chunk_size=mcfg.kda_chunk_size,
                       impl=mcfg.kda_impl)[0]

        name = f"  KDA op (kda_impl={mcfg.kda_impl}, chunk {mcfg.kda_chunk_size})"
        pieces[name] = _fwd_bwd(op, {}, q, k, v, g, beta)
        return [(name, 2)]
    H, dk, dv = mcfg.num_attention_heads, mcfg.qk_nope_head_dim + mcfg.qk_rope_head_dim, mcfg.v_head_dim
    q = jax.random.normal(keys[0], (B, T, H, dk)).astype(dt)
    k = jax.random.normal(keys[1], (B, T, H, dk)).astype(dt)
    v = jax.random.normal(keys[2], (B, T, H, dv)).astype(dt)
    scale = layer.self_attn.scale

    def op(_, q, k, v):
        return attention(q, k, v, scale=scale, q_segment_ids=seg)

    name = "  attention op"
    pieces[name] = _fwd_bwd(op, {}, q, k, v)
    return [(name, 2)]


def _moe_parts(layer, mcfg, normed, pieces, i):
    """The MoE's router, routed experts and shared experts alone, on the layer's real normed input."""
    moe = layer.block_sparse_moe
    dt = jnp.dtype(mcfg.dtype)
    xf = normed.reshape(-1, normed.shape[-1]).astype(dt)
    fn, p = _module_fn(moe.gate, lambda g, x: route(mcfg, x, g.kernel[...], g.e_score_correction_bias[...])[1])
    pieces[f"  MoE router (layer {i})"] = _fwd_bwd(fn, p, xf)
    idx, w = route(mcfg, xf, moe.gate.kernel[...], moe.gate.e_score_correction_bias[...])
    impl = _MOE_IMPLS[mcfg.moe_impl]
    fn, p = _module_fn(moe.experts, lambda e, x, idx, w: impl(x, idx, w, *e.weights(dt), dt))
    pieces[f"  MoE routed experts (layer {i}, moe_impl={mcfg.moe_impl})"] = _fwd_bwd(fn, p, xf, idx, w)
    rows = [(f"  MoE router (layer {i})", 2), (f"  MoE routed experts (layer {i}, moe_impl={mcfg.moe_impl})", 2)]
    if moe.shared_experts is not None:
        fn, p = _module_fn(moe.shared_experts, lambda s, x: s(x))
        pieces[f"  MoE shared experts (layer {i})"] = _fwd_bwd(fn, p, normed.astype(dt))
        rows.append((f"  MoE shared experts (layer {i})", 2))
    return rows


def format_table(rows, step_name: str = "train step (jitted)") -> str:
    """Markdown table of `profile_step` rows: name, ms, % of the jitted step."""
    step = dict((n, s) for n, s, _ in rows)[step_name]
    lines = ["| piece (forward + backward) | ms | % of step |", "|---|---:|---:|"]
    for name, s, depth in rows:
        label = ("&nbsp;&nbsp;" * (depth - 1) if depth > 1 else "") + name.strip()
        lines.append(f"| {label} | {s * 1e3:.1f} | {100 * s / step:.1f}% |")
    return "\n".join(lines)

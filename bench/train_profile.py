"""Where one training step's time goes: the step, then its pieces, each jitted and timed alone (forward + backward).

    python bench/train_speed.py --profile                  # default config: table on stdout and in --profile-out
    python bench/train_speed.py --profile --trace-dir /tmp/trace   # also a jax.profiler trace and its op table

Rows (`profile_step`):
- 'train step (jitted)': the real `make_train_step` program (forward, backward, optimizer, router-bias update) on
  one batch; 'batch (MQAR, host)' the host-side batch generation and transfer the training loop adds per step.
- Top-level pieces, each its own jitted forward + backward (gradients with respect to its parameters and input,
  against a fixed random cotangent) on the activations the real model produces: the embedding lookup, each
  layer's attention block (input norm + token mixer + residual) and FFN block (post norm + MLP or MoE + residual),
  the final norm + lm_head + cross-entropy, and the optimizer update (tx.update + apply_updates). With
  `train.grad_accum_steps` = A > 1 the step runs A micro-batches of B / A rows, so each model piece runs on one
  micro-batch (the step's first: rows 0, A, 2A, ...) and counts A times; the optimizer once. 'other' is the
  step minus their sum: what the fused program saves (negative) or adds (the accumulation, norms, clipping,
  the finite check, the bias update).
- Indented rows are parts of the row above (not added to the total): the KDA op alone (`pallas_kernels.kda.kda`
  on the layer's q, k, v, g, beta shapes), the attention op alone, the MoE router, routed experts and shared experts.

Each piece runs in interleaved rounds and reports its median, so a change in the machine's load hits all rows
alike; figures are noisy on a shared machine: compare rows within one table.

With a trace directory, `op_profile` also traces the real step (jax.profiler) and charges every executed XLA op
(fusion, dot, copy) to the model component its HLO stack frames name (`COMPONENTS`: first matching source file
from the innermost frame out), forward or backward (autodiff's `transpose(` in the op name), and to a kind: matmul
(a dot, or a fusion around one) or not. Times there are op self-times summed over XLA's worker threads (so shares,
not wall time): the matmul share is the part of the step that runs at matmul speed, the rest is the small-op work
(elementwise fusions, copies, scatters, loop bookkeeping) that bounds the step on XLA:CPU.
"""

from __future__ import annotations

import collections
import glob
import os
import re
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


def profile_step(mcfg, tcfg, rounds: int = 5) -> list[tuple[str, float, int]]:
    """Time one training step of (mcfg, tcfg) on one device and its pieces (see the module docstring).

    Returns rows (name, seconds, depth): depth 0 rows are the step and the batch, depth 1 its pieces (with 'other'),
    depth 2 parts of the piece above.
    """
    if mcfg.scan_layers:
        raise ValueError("profile_step: profiles the per-layer model (model.scan_layers=false); the scanned one "
                         "runs the same layers inside one scan")
    model = KimiLinear(mcfg, rngs=nnx.Rngs(tcfg.seed))
    tx, schedule = make_optimizer(tcfg)
    graphdef, params, biases, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    source = make_source(mcfg, tcfg)
    batch = {k: jnp.asarray(v) for k, v in next(source).items()}
    # the step donates its state: it gets copies (the pieces below use the originals) and carries them on
    state = {"params": params, "biases": biases, "rest": rest, "opt": tx.init(params)}
    carried = [jax.tree.map(lambda a: a.copy(), state)]
    step_fn = make_train_step(graphdef, mcfg, tcfg, tx, schedule, router_bias_rows(mcfg, biases))

    def train_step():
        carried[0], metrics = step_fn(carried[0], batch, jnp.int32(0))
        return metrics

    pieces = {"train step (jitted)": train_step}

    def host_batch():
        return {k: jnp.asarray(v) for k, v in next(source).items()}

    pieces["batch (MQAR, host)"] = host_batch
    rows = [("train step (jitted)", 0), ("batch (MQAR, host)", 0)]

    # Activations of the real model on the step's first micro-batch (the whole batch when A = 1), the inputs of
    # each piece: a piece on the whole batch would allocate and touch A times the buffers the step does.
    A = tcfg.grad_accum_steps
    micro = jax.tree.map(lambda v: v[0::A], batch)
    tokens, seg = micro["tokens"], micro.get("segment_ids")
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
    pieces["final norm + lm_head + cross-entropy"] = _fwd_bwd(fn, p, x, micro["targets"], micro["loss_mask"])
    rows.append(("final norm + lm_head + cross-entropy", 1))
    grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype) * 1e-3, params)
    update = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
    pieces[f"optimizer update ({tcfg.optimizer})"] = lambda: update(grads, state["opt"], params)
    rows.append((f"optimizer update ({tcfg.optimizer})", 1))

    seconds = _time_rounds(pieces, rounds)
    per_step = {"train step (jitted)", "batch (MQAR, host)", f"optimizer update ({tcfg.optimizer})"}
    seconds = {n: t if n in per_step else A * t for n, t in seconds.items()}   # A micro-batches per step
    step = seconds["train step (jitted)"]
    top = sum(seconds[n] for n, d in rows if d == 1)
    out = [(n, seconds[n], d) for n, d in rows]
    out.append(("other (step - pieces)", step - top, 1))
    return out


def train_step_call(mcfg, tcfg):
    """(jitted step, its (state, batch, step index) arguments): the real train step of (mcfg, tcfg) on one MQAR
    batch, for tracing."""
    model = KimiLinear(mcfg, rngs=nnx.Rngs(tcfg.seed))
    tx, schedule = make_optimizer(tcfg)
    graphdef, params, biases, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    batch = {k: jnp.asarray(v) for k, v in next(make_source(mcfg, tcfg)).items()}
    state = {"params": params, "biases": biases, "rest": rest, "opt": tx.init(params)}
    step_fn = make_train_step(graphdef, mcfg, tcfg, tx, schedule, router_bias_rows(mcfg, biases))
    return step_fn, (state, batch, jnp.int32(0))


# Model components by source file (path suffixes, checked from the innermost stack frame outwards): the first
# match names the component an XLA op belongs to.
COMPONENTS = (
    ("pallas_kernels/kda/", "KDA op (chunked recurrence)"),
    ("k2jax/layers/short_conv.py", "KDA short convolutions"),
    ("k2jax/layers/kda.py", "KDA layer: gates, beta, q/k norm, heads"),
    ("pallas_kernels/attention/", "MLA attention op"),
    ("k2jax/layers/mla.py", "MLA layer: latents, RoPE, heads"),
    ("k2jax/layers/context_parallel.py", "MLA layer: latents, RoPE, heads"),  # the absorbed form's W_UK, W_UV
    ("pallas_kernels/moe/", "MoE grouped matmuls"),
    ("k2jax/layers/moe.py", "MoE routing, sort, combine"),
    ("k2jax/layers/mlp.py", "SwiGLU (dense MLP, shared experts)"),
    ("pallas_kernels/cross_entropy/", "lm_head + cross-entropy"),
    ("k2jax/layers/norms.py", "RMSNorm / gated norm / L2 norm"),
    ("k2jax/layers/linear.py", "projections (Linear)"),
    ("optax/", "optimizer (optax)"),
    ("k2jax/training/step.py", "step: accumulation, clipping, bias update"),
    ("k2jax/model.py", "model: embedding, residuals"),
)


def _hlo_sources(hlo_text: str):
    """For the compiled HLO text of a program: {instruction name: (source files innermost first, is backward,
    is matmul)} from its StackFrames / FileLocations / FileNames tables and op metadata."""
    lines = hlo_text.split("\n")
    starts = {line: i for i, line in enumerate(lines) if line in ("FileNames", "FileLocations", "StackFrames")}

    def table(name):
        rows, i = {}, starts.get(name, len(lines)) + 1
        while i < len(lines) and re.match(r"^\d+ ", lines[i]):
            key, value = lines[i].split(" ", 1)
            rows[int(key)] = value
            i += 1
        return rows

    files = {k: v.strip('"') for k, v in table("FileNames").items()}
    locations = {k: files[int(re.search(r"file_name_id=(\d+)", v)[1])] for k, v in table("FileLocations").items()}
    frames = {k: tuple(int(n) for n in re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", v).groups())
              for k, v in table("StackFrames").items()}
    out, users = {}, []
    for line in lines:
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if not m:
            continue
        chain, frame = [], re.search(r"stack_frame_id=(\d+)", line)
        frame = int(frame[1]) if frame else None
        while frame in frames and len(chain) < 64:
            location, parent = frames[frame]
            chain.append(locations[location])
            frame = None if parent == frame else parent
        op_name = re.search(r'op_name="([^"]*)"', line)
        backward = bool(op_name and "transpose(" in op_name[1])
        matmul = " dot(" in line or "__ynn_fusion" in line or "__xnn_fusion" in line or "onednn" in line
        out[m[1]] = (tuple(chain), backward, matmul)
        users.append((m[1], re.findall(r"%([\w.\-]+)", line.split(" = ", 1)[1])))
    # XLA:CPU drops the metadata of some instructions it creates (a batched dot_general rewritten as a dot, a
    # broadcast it wraps): such an instruction is charged to the source of an instruction that uses it. HLO lists
    # an instruction after its operands, so one pass from the end reaches chains of such instructions too.
    for name, operands in reversed(users):
        chain, backward, _ = out[name]
        for operand in operands:
            if chain and operand in out and not out[operand][0]:
                out[operand] = (chain, out[operand][1] or backward, out[operand][2])
    return out


def _component(chain) -> str:
    for path in chain:
        for suffix, name in COMPONENTS:
            if suffix in path:
                return name
    return "other (no model source)"


def op_profile(step_fn, args, trace_dir: str, steps: int = 3) -> dict:
    """Trace `steps` calls of the jitted `step_fn(*args) -> (new args[0], ...)` (args[0], the state, carried from
    call to call: the step donates it) into trace_dir and charge every executed XLA op to a
    component (see the module docstring). Returns {'rows': [(component, fwd s, bwd s, matmul s)] by total time
    descending, 'total': op seconds per step (summed over worker threads), 'matmul': matmul op seconds per step}."""
    sources = _hlo_sources(step_fn.lower(*args).compile().as_text())
    args = list(args)

    def call():  # the step donates its first argument (the state) and returns the next one first
        args[0], _ = step_fn(*args)
        jax.block_until_ready(args[0])

    call()
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            call()
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"op_profile: jax.profiler wrote no *.xplane.pb under {trace_dir}")
    per_op = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(paths[-1]).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in sources:  # HLO instructions only (not the runtime's own spans)
                    per_op[event.name] += event.duration_ns
    table = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for name, ns in per_op.items():
        chain, backward, matmul = sources[name]
        if name.startswith(("while", "conditional", "call")):
            continue  # containers: their body ops are counted themselves
        row = table[_component(chain)]
        row[1 if backward else 0] += ns / steps / 1e9
        row[2] += ns / steps / 1e9 if matmul else 0.0
    rows = sorted(((k, *v) for k, v in table.items()), key=lambda r: -(r[1] + r[2]))
    return {"rows": rows, "total": sum(r[1] + r[2] for r in rows), "matmul": sum(r[3] for r in rows)}


def format_op_table(prof: dict) -> str:
    """Markdown table of `op_profile`'s result: component, forward / backward op ms, share, matmul share."""
    total = prof["total"]
    lines = ["| component (XLA ops of the traced step) | forward ms | backward ms | % of op time | of which matmul |",
             "|---|---:|---:|---:|---:|"]
    for name, fwd, bwd, mm in prof["rows"]:
        lines.append(f"| {name} | {fwd * 1e3:.1f} | {bwd * 1e3:.1f} | {100 * (fwd + bwd) / total:.1f}% | "
                     f"{100 * mm / max(fwd + bwd, 1e-12):.0f}% |")
    lines.append(f"| **all** | | | {total * 1e3:.0f} ms | {100 * prof['matmul'] / total:.0f}% |")
    return "\n".join(lines)


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

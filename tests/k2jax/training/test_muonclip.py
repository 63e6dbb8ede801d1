"""MuonClip (train.optimizer=muonclip): the per-head max attention logit the forward reports (from inside the
attention op) is the true one, QK-clip brings heads above tau to tau and leaves the rest alone, and the train step
applies it after the update and reports the max logit per MLA layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax import KimiLinear, load_config
from k2jax.config import ConfigError
from k2jax.model import router_bias_rows, segment_positions, stack_layers, unstack_layers
from k2jax.sharding import make_mesh
from k2jax.training.config import TrainConfig
from k2jax.training.optim import make_optimizer, qk_clip
from k2jax.training.state import TrainState
from k2jax.training.step import make_train_step

B, T = 2, 16


def _config(**changes):
    """KDA then RoPE MLA with a low-rank query (q_b_proj), so every part QK-clip scales is there."""
    fields = dict(num_hidden_layers=2, kda_layers=[1], full_attn_layers=[2], vocab_size=64, hidden_size=32,
                  mla_use_nope=False, q_lora_rank=16, kda_impl="chunk")
    return load_config("tiny", **{**fields, **changes})


def _boost_queries(params, factor):
    """Multiply every MLA query up-projection by `factor` (logits grow by it): pushes the logits above tau."""
    out = []
    for path, var in nnx.to_flat_state(params):
        if "q_b_proj" in [str(p) for p in path]:
            var = var.replace(var.get_value() * factor)
        out.append((path, var))
    return nnx.from_flat_state(out)


def _max_logits(model, tokens, seg):
    return jax.jit(lambda t, s: model.hidden_states(t, s, return_max_logit=True)[2])(tokens, seg)


def _reference_max_logits(model, tokens, seg):
    """Max over visible (query, key) pairs of each head's scaled score, from the materialised expanded scores."""
    mla = model.layers[1].self_attn
    h = jnp.take(model.embed_tokens[...], tokens, axis=0)
    layer0 = model.layers[0]
    h, _, _ = layer0(h, segment_ids=seg, positions=jnp.broadcast_to(jnp.arange(T), (B, T)))
    x = model.layers[1].input_layernorm(h)
    pos = segment_positions(seg)
    q_nope, q_pe = mla.queries(x, pos)
    c, k_pe = mla._latent(x, pos)
    kv = mla.kv_b_proj(c).reshape(B, T, mla.num_heads, -1)
    k_nope = kv[..., :mla.nope_dim]
    scores = (jnp.einsum("bthn,bshn->bhts", q_nope, k_nope) + jnp.einsum("bthp,bsp->bhts", q_pe, k_pe)) * mla.scale
    visible = (jnp.tril(jnp.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
    return jnp.max(jnp.where(visible, scores, -jnp.inf), axis=(0, 2, 3))


def _inputs():
    tokens = jax.random.randint(jax.random.key(3), (B, T), 0, 64)
    seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 10], B, 0), jnp.int32)
    return tokens, seg


def test_max_logit_from_the_attention_op_is_the_true_one():
    model = KimiLinear(_config(), rngs=nnx.Rngs(0))
    tokens, seg = _inputs()
    got = _max_logits(model, tokens, seg)
    assert got.shape == (1, 2)
    np.testing.assert_allclose(got[0], _reference_max_logits(model, tokens, seg), rtol=1e-5)


def test_qk_clip_brings_logits_above_tau_to_tau_and_leaves_the_rest():
    cfg = _config()
    model = KimiLinear(cfg, rngs=nnx.Rngs(0))
    tokens, seg = _inputs()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = _boost_queries(params, 30.0)
    before = _max_logits(nnx.merge(graphdef, params, rest), tokens, seg)
    tau = float(jnp.sort(before[0])[0] + jnp.sort(before[0])[1]) / 2  # one head above tau, one below
    clipped = qk_clip(cfg, params, before, tau)
    after = _max_logits(nnx.merge(graphdef, clipped, rest), tokens, seg)
    above = before[0] > tau
    assert bool(above.any()) and not bool(above.all())
    np.testing.assert_allclose(after[0][above], tau, rtol=1e-5)     # clipped heads: exactly at tau
    np.testing.assert_allclose(after[0][~above], before[0][~above], rtol=1e-6)  # the others: untouched
    # only the head-specific q/k parts change: q_a_proj, the shared rope key and the values are untouched
    flat_b, flat_a = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(clipped))
    for path in flat_b:
        name = "/".join(str(p) for p in path)
        same = np.array_equal(flat_b[path].get_value(), flat_a[path].get_value())
        assert same == ("q_b_proj/kernel" not in name and "kv_b_proj/kernel" not in name), name
    kv_b = lambda p: p[next(k for k in p if "kv_b_proj" in "/".join(map(str, k)))].get_value().reshape(  # noqa
        cfg.kv_lora_rank, 2, -1)[:, :, cfg.qk_nope_head_dim:]
    np.testing.assert_array_equal(kv_b(flat_b), kv_b(flat_a))  # value columns of kv_b_proj


def test_qk_clip_is_a_no_op_below_tau():
    cfg = _config()
    model = KimiLinear(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tokens, seg = _inputs()
    logits = _max_logits(model, tokens, seg)
    clipped = qk_clip(cfg, params, logits, float(jnp.max(logits)) + 1e-3)
    for (_, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(clipped)):
        np.testing.assert_array_equal(a.get_value(), b.get_value())


def test_muonclip_train_step_clips_after_the_update():
    """A step with logits pushed above tau (and a learning rate too small to matter) leaves them at tau, and
    reports the pre-clip max logit per MLA layer."""
    cfg = _config()
    tcfg = TrainConfig(optimizer="muonclip", qk_clip_tau=0.2, learning_rate=1e-9, warmup_steps=0, batch_size=B,
                       seq_len=T, steps=2, grad_clip=0.0, weight_decay=0.0)
    mesh = make_mesh(None)
    tx, schedule = make_optimizer(tcfg)
    st = TrainState(cfg, tcfg, mesh, tx)
    state = st.fresh()
    state["params"] = _boost_queries(state["params"], 30.0)
    step = make_train_step(st.graphdef, cfg, tcfg, tx, schedule, router_bias_rows(cfg, state["biases"]))
    tokens, seg = _inputs()
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "loss_mask": jnp.ones((B, T)), "segment_ids": seg}
    with jax.set_mesh(mesh):
        new, metrics = step(state, batch, jnp.int32(0))
    model_after = nnx.merge(st.graphdef, new["params"], new["biases"], new["rest"])
    before = metrics["max_logit"]
    assert before.shape == (1,) and float(before[0]) > 0.2
    after = _max_logits(model_after, tokens, seg)
    assert float(jnp.max(after)) <= 0.2 * (1 + 1e-4)


def test_qk_clip_tau_is_validated():
    with pytest.raises(ConfigError, match="qk_clip_tau"):
        TrainConfig(qk_clip_tau=0)


def test_qk_clip_of_scanned_layers_equals_the_per_layer_model():
    """Scanned layers (LayerStack, [repeats, ...] weights): the max logits come out in layer order and each repeat
    is clipped by its own layer's factors."""
    cfg = _config(num_hidden_layers=4, kda_layers=[1, 3], full_attn_layers=[2, 4], first_k_dense_replace=4)
    model = KimiLinear(cfg, rngs=nnx.Rngs(0))
    scanned = stack_layers(model)
    tokens, seg = _inputs()
    logits = _max_logits(model, tokens, seg)
    np.testing.assert_allclose(_max_logits(scanned, tokens, seg), logits, rtol=1e-6)
    tau = float(jnp.median(logits))
    graphdef, params, rest = nnx.split(scanned, nnx.Param, ...)
    clipped = unstack_layers(nnx.merge(graphdef, qk_clip(scanned.config, params, logits, tau), rest))
    want = qk_clip(cfg, nnx.state(model, nnx.Param), logits, tau)
    for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(nnx.state(clipped, nnx.Param))):
        np.testing.assert_allclose(a.get_value(), b.get_value(), rtol=1e-6, err_msg=str(path))

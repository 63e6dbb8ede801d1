"""Context parallelism in the model (k2jax.layers.context_parallel): with the sequence split over the `context` mesh
axis, alone and mixed with fsdp / expert / data, in both layouts, the training loss and every gradient equal one
device's (float32), with packed segments and padding crossing shard boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax import KimiLinear, load_config
from k2jax.sharding import batch_sharding, make_mesh
from k2jax.training.step import lm_head_cross_entropy
from tests.conftest import error_ratio

B, T = 2, 32


def _model(**changes):
    """KDA (dense FFN) then MLA with RoPE (MoE): every token mixer and the expert-parallel MoE."""
    cfg = load_config("tiny", num_hidden_layers=2, kda_layers=[1], full_attn_layers=[2], vocab_size=64,
                      hidden_size=32, mla_use_nope=False, kda_impl="chunk", kda_chunk_size=16, **changes)
    return KimiLinear(cfg, rngs=nnx.Rngs(0))


def _batch(vocab):
    """Packed rows whose documents and padding straddle every shard boundary of 2, 4 and 8 shards (and zigzag's
    pieces): row 0 has documents of 5, 9, 11 tokens, a 3-token padding run and 4 more tokens; row 1 one document
    of 13, a padding run across positions 15-17, then one of 14."""
    ks = jax.random.split(jax.random.key(7), 3)
    tokens = jax.random.randint(ks[0], (B, T), 0, vocab)
    targets = jax.random.randint(ks[1], (B, T), 0, vocab)
    seg = np.zeros((B, T), np.int32)
    seg[0, :5], seg[0, 5:14], seg[0, 14:25], seg[0, 28:] = 1, 2, 3, 4
    seg[1, :13], seg[1, 13:15], seg[1, 18:] = 1, 2, 3
    mask = (jnp.asarray(seg) != 0).astype(jnp.float32) * (jax.random.uniform(ks[2], (B, T)) > 0.2)
    return tokens, targets, mask, jnp.asarray(seg)


def _loss_and_grads(model, batch, mesh=None):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, batch):
        def loss(params):
            tokens, targets, mask, seg = batch
            m = nnx.merge(graphdef, params, rest)
            h, _ = m.hidden_states(tokens, seg)
            return lm_head_cross_entropy(m, h, targets, mask)[0]

        return jax.value_and_grad(loss)(params)

    if mesh is None:
        return run(params, batch)
    with jax.set_mesh(mesh):
        return run(params, tuple(jax.device_put(x, batch_sharding(mesh, x.shape)) for x in batch))


@pytest.fixture(scope="module")
def reference():
    model = _model()
    batch = _batch(model.config.vocab_size)
    return model, batch, _loss_and_grads(model, batch)


@pytest.mark.parametrize("mesh_shape, layout", [
    ({"context": 2}, "zigzag"),
    ({"context": 8}, "zigzag"),
    ({"context": 4}, "contiguous"),
    ({"fsdp": 2, "context": 4}, "zigzag"),
    ({"expert": 2, "context": 2, "data": 2}, "zigzag"),
])
def test_context_parallel_loss_and_grads_equal_one_device(reference, mesh_shape, layout):
    model, batch, (loss_ref, grads_ref) = reference
    model = nnx.merge(*nnx.split(model)) if layout == "zigzag" else _with_layout(model, layout)
    loss, grads = _loss_and_grads(model, batch, make_mesh(mesh_shape))
    assert abs(float(loss) - float(loss_ref)) <= 1e-5 * abs(float(loss_ref))
    for (path, ref), (_, got) in zip(nnx.to_flat_state(grads_ref), nnx.to_flat_state(grads)):
        assert error_ratio(ref.get_value(), got.get_value()) < 1e-5, path


def _with_layout(model, layout):
    """The same weights in a model whose config has another context_layout."""
    other = KimiLinear(model.config.replace(context_layout=layout), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model))
    return other


def test_sequence_that_does_not_split_is_refused():
    model = _model()
    tokens = jnp.zeros((B, 20), jnp.int32)  # 20 tokens do not make 2 x 4 zigzag pieces
    with jax.set_mesh(make_mesh({"context": 4})):
        with pytest.raises(ValueError, match="sequence length 20 must split into 8 equal pieces"):
            jax.jit(lambda t: model.hidden_states(t))(tokens)

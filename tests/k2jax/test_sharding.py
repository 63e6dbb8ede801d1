"""Meshes, the logical-axis rules, parameter placement, and the sharded train-step math: loss and gradients on
8 simulated CPU devices equal one device for every mesh shape (expert parallelism included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from k2jax import KimiLinear, load_config
from k2jax.model import LayerStack, stack_layers, unstack_layers
from k2jax.sharding import (
    MESH_AXES,
    batch_sharding,
    constrain,
    logical_to_mesh_spec,
    make_mesh,
    param_shardings,
    shard_model,
)
from tests.conftest import error_ratio


def test_make_mesh_conventions():
    one = make_mesh()
    assert one.axis_names == MESH_AXES and one.devices.size == 1
    assert all(t == AxisType.Auto for t in one.axis_types)
    m = make_mesh({"expert": 4, "data": 2})
    assert dict(m.shape) == {"data": 2, "fsdp": 1, "expert": 4, "context": 1, "tensor": 1}
    assert dict(make_mesh((1, 1, 2, 2, 2)).shape) == {"data": 1, "fsdp": 1, "expert": 2, "context": 2, "tensor": 2}
    assert dict(make_mesh((1, -1, 2, 1)).shape)["fsdp"] == 4
    assert make_mesh((1, 1, 2, 1), devices=jax.devices()[4:]).devices.flatten().tolist() == jax.devices()[4:6]
    for bad, msg in [({"model": 2}, "unknown mesh axes"), ((2, 2), "5 sizes"), ((16, 1, 1, 1), "needs 16"),
                     ((0, 1, 1, 1), "positive"), ((-1, -1, 1, 1), "at most one"), ((3, -1, 1, 1), "do not split")]:
        with pytest.raises(ValueError, match=msg):
            make_mesh(bad)


def test_rules_and_shardings():
    mesh = make_mesh((2, 2, 2, 1))
    assert logical_to_mesh_spec(("batch", "length"), mesh, (8, 5)) == P(("data", "fsdp", "expert"), None)
    assert logical_to_mesh_spec(("batch", "length"), mesh, (2, 5)) == P("data", None)  # 2 rows: one axis fits
    cp = make_mesh({"fsdp": 2, "context": 4})
    assert logical_to_mesh_spec(("batch", "length"), cp, (2, 8)) == P(("data", "fsdp", "expert"), "context")
    assert logical_to_mesh_spec(("batch", "length"), cp, (2, 6))[1] is None  # 6 tokens do not split over 4
    assert logical_to_mesh_spec(("expert", "expert_embed", "expert_mlp"), mesh) == P("expert", "fsdp", "tensor")
    assert batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)
    cfg = load_config("tiny")
    model = nnx.eval_shape(lambda: KimiLinear(cfg, rngs=nnx.Rngs(0)))
    sh = param_shardings(nnx.state(model), mesh)
    assert sh["layers"][1]["block_sparse_moe"]["experts"]["w1"].get_value().spec == P("expert", "fsdp", "tensor")
    assert sh["embed_tokens"].get_value().spec == P("tensor", "fsdp")
    # with context parallelism the weights are sharded over `context` too (gathered layer by layer, as fsdp's)
    cp_sh = param_shardings(nnx.state(model), cp)
    assert cp_sh["embed_tokens"].get_value().spec == P("tensor", ("fsdp", "context"))
    assert sh["layers"][1]["block_sparse_moe"]["gate"]["e_score_correction_bias"].get_value().spec == P(None)


def test_shard_model_places_params_and_keeps_values():
    cfg = load_config("tiny")
    model = KimiLinear(cfg, rngs=nnx.Rngs(0))
    before = np.asarray(model.layers[1].block_sparse_moe.experts.w1[...])
    mesh = make_mesh((1, 2, 4, 1))
    shard_model(model, mesh)
    w1 = model.layers[1].block_sparse_moe.experts.w1[...]
    assert w1.sharding.spec == P("expert", "fsdp", "tensor")
    assert w1.addressable_shards[0].data.shape == (cfg.num_experts // 4, cfg.hidden_size // 2, cfg.moe_intermediate_size)
    np.testing.assert_array_equal(np.asarray(w1), before)


def test_constrain_is_a_noop_without_a_mesh_and_shards_with_one():
    x = jnp.arange(16.0).reshape(8, 2)
    assert constrain(x, ("batch", None)) is x
    mesh = make_mesh((2, 1, 4, 1))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", None)))(x)
    assert y.sharding.spec == P(("data", "expert"), None) or y.sharding.spec == P(("data", "expert"))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)


def _loss(model, tokens):
    """Next-token cross entropy, mean over B * (T - 1) positions."""
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def _loss_and_grads(model, tokens, mesh):
    graphdef, state = nnx.split(model)
    fn = jax.value_and_grad(lambda st, t: _loss(nnx.merge(graphdef, st), t))
    if mesh is None:
        return jax.jit(fn)(state, tokens)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, param_shardings(state, mesh))
        tokens = jax.device_put(tokens, batch_sharding(mesh, tokens.shape))
        return jax.jit(fn)(state, tokens)


@pytest.fixture(scope="module")
def reference():
    # The tiny config (8 experts: expert=8 divides) cut to 3 layers, KDA + dense FFN then twice MLA + MoE (a
    # repeat, for the scanned case), with the reference KDA: every kind of parameter at little compile time.
    cfg = load_config("tiny", num_hidden_layers=3, kda_layers=[1], full_attn_layers=[2, 3], kda_impl="reference")
    model = KimiLinear(cfg, rngs=nnx.Rngs(3))
    tokens = jax.random.randint(jax.random.key(4), (8, 17), 0, cfg.vocab_size)
    return model, tokens, _loss_and_grads(model, tokens, None)


@pytest.mark.parametrize("shape,scanned", [((1, 1, 1, 1), False), ((2, 1, 4, 1), False), ((1, 2, 2, 2), False),
                                           ((1, 1, 8, 1), False), ((1, 2, 2, 2), True)])
def test_sharded_loss_and_grads_match_one_device(reference, shape, scanned):
    model, tokens, (loss0, grads0) = reference
    if scanned:  # the expert-parallel shard_map inside the layer scan
        model = stack_layers(model)
        assert isinstance(model.blocks[1], LayerStack)
    loss, grads = _loss_and_grads(model, tokens, make_mesh(shape))
    if scanned:
        grads = nnx.state(unstack_layers(nnx.merge(nnx.graphdef(model), grads)))
    assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0))
    flat0 = dict(nnx.to_flat_state(grads0))
    assert len(flat0) == len(nnx.to_flat_state(grads))
    for path, g in nnx.to_flat_state(grads):
        ref = flat0[path].get_value()
        assert error_ratio(ref, g.get_value()) < 1e-5, (path, error_ratio(ref, g.get_value()))

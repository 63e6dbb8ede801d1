"""The training loss: the blockwise lm_head + cross-entropy (pallas_kernels.cross_entropy) equals the full-logits
loss through the model (loss, correct count, every gradient; float32, bfloat16, tied embeddings, one device and a
mesh), and the train step's memory holds neither [B, T, vocab] logits nor more than linear activations in T."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from k2jax import KimiLinear, load_config
from k2jax.model import router_bias_rows
from k2jax.sharding import batch_sharding, make_mesh
from k2jax.training.config import TrainConfig
from k2jax.training.dry_run import dry_run
from k2jax.training.optim import make_optimizer
from k2jax.training.state import TrainState
from k2jax.training.step import lm_head_cross_entropy, make_train_step
from tests.conftest import error_ratio

B, T = 8, 24


def _model(**changes):
    """One KDA layer with a dense MLP: the least to compile in front of the lm_head."""
    cfg = load_config("tiny", num_hidden_layers=1, kda_layers=[1], full_attn_layers=[], vocab_size=300,
                      hidden_size=32, kda_impl="reference", **changes)
    return KimiLinear(cfg, rngs=nnx.Rngs(0))


def _batch(model):
    """tokens, targets (every other one the model's own argmax, so that `correct` counts), loss mask, segments."""
    vocab = model.config.vocab_size
    ks = jax.random.split(jax.random.key(1), 3)
    tokens = jax.random.randint(ks[0], (B, T), 0, vocab)
    top = jnp.argmax(model(tokens), axis=-1)
    targets = jnp.where(jnp.arange(T) % 2 == 0, top, jax.random.randint(ks[1], (B, T), 0, vocab))
    mask = (jax.random.uniform(ks[2], (B, T)) > 0.3).astype(jnp.float32)
    segments = jnp.where(jnp.arange(T) < T // 2, 1, 2)[None].repeat(B, 0).astype(jnp.int32)
    return tokens, targets, mask, segments


def _sums_and_grads(model, batch, chunked: bool):
    """(loss_sum, correct) and the loss_sum gradient of every parameter, jitted."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def sums(params, batch):
        tokens, targets, mask, segments = batch
        m = nnx.merge(graphdef, params, rest)
        if chunked:
            h, _ = m.hidden_states(tokens, segments)
            return lm_head_cross_entropy(m, h, targets, mask)
        logits = m(tokens, segments)  # the loss training computed before: full float32 logits
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * mask), jnp.sum((jnp.argmax(logits, -1) == targets) * mask)

    @jax.jit
    def run(params, batch):
        (loss, correct), vjp = jax.vjp(lambda p: sums(p, batch), params)
        return loss, correct, vjp((jnp.float32(1.0), jnp.float32(0.0)))[0]

    return run(params, batch)


def _check_equal(model, batch, grad_tol: float, mesh=None):
    loss_ref, correct_ref, grads_ref = _sums_and_grads(model, batch, chunked=False)
    if mesh is None:
        loss, correct, grads = _sums_and_grads(model, batch, chunked=True)
    else:
        with jax.set_mesh(mesh):
            sharded = tuple(jax.device_put(x, batch_sharding(mesh, x.shape)) for x in batch)
            loss, correct, grads = _sums_and_grads(model, sharded, chunked=True)
    assert error_ratio(loss_ref, loss) < 1e-5
    assert float(correct) == float(correct_ref) > 0
    for (path, ref), (_, got) in zip(nnx.to_flat_state(grads_ref), nnx.to_flat_state(grads)):
        assert error_ratio(ref.get_value(), got.get_value()) < grad_tol, path


def test_blockwise_loss_on_a_mesh_equals_full_logits():
    """float32, untied lm_head, 8 devices: each device's rows (shard_map), sums and gradients added up."""
    model = _model()
    _check_equal(model, _batch(model), 1e-4, mesh=make_mesh({"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}))


def test_blockwise_loss_with_tied_bfloat16_embeddings_equals_full_logits():
    """The tied embedding (transposed) as the lm_head, bfloat16 parameters and compute: the full path's logits are
    float32 here too; gradients differ by the bfloat16 rounding of the blockwise backward's dz."""
    model = _model(tie_word_embeddings=True, param_dtype="bfloat16", dtype="bfloat16")
    _check_equal(model, _batch(model), 1e-2)


def _step_temp_bytes(seq_len: int) -> int:
    """XLA's temporary bytes of the compiled train step (the dry run's analysis) of a one-layer model with a
    32,768-id vocabulary and per-layer remat, batch 1, one device."""
    cfg = load_config("tiny", num_hidden_layers=1, kda_layers=[1], full_attn_layers=[], vocab_size=32768,
                      hidden_size=32, kda_impl="reference", remat="full")
    r = dry_run(cfg, {"data": 1}, 1, seq_len, train=TrainConfig(), scan_layers=False, devices=jax.devices()[:1],
                verbose=False)
    return r["activations"]


def test_train_step_memory_holds_no_logits_and_grows_linearly():
    """The step's temp buffers hold no [T, vocab] float32 logits (the full-logits loss held them and their
    gradient: 512 MiB at T = 4096), and with remat they grow linearly in T."""
    short, long = _step_temp_bytes(1024), _step_temp_bytes(4096)
    assert long < 4096 * 32768 * 4 / 2, long
    assert long < 4.5 * short, (short, long)


def test_train_step_donates_the_state():
    """The step's state buffers become the new state's: every array passed in is deleted by the call (the loop
    never holds two copies of parameters and optimizer state), and the new state trains on."""
    cfg = _model().config
    tcfg = TrainConfig(batch_size=B, seq_len=T, steps=2, warmup_steps=0)
    mesh = make_mesh(None)
    tx, schedule = make_optimizer(tcfg)
    st = TrainState(cfg, tcfg, mesh, tx)
    state = st.fresh()
    step = make_train_step(st.graphdef, cfg, tcfg, tx, schedule, router_bias_rows(cfg, state["biases"]))
    tokens, targets, mask, segments = _batch(KimiLinear(cfg, rngs=nnx.Rngs(0)))
    batch = {"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": segments}
    old = jax.tree.leaves(state)
    with jax.set_mesh(mesh):
        new, metrics = step(state, batch, jnp.int32(0))
        assert all(a.is_deleted() for a in old)
        assert not any(a.is_deleted() for a in jax.tree.leaves(new))
        newer, later = step(new, batch, jnp.int32(1))
    assert bool(metrics["finite"]) and bool(later["finite"])
    assert float(later["loss"]) < float(metrics["loss"])

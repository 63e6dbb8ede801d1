"""bench/train_profile.py: the op trace of a jitted step charged to source components (the per-piece table compiles
a dozen programs per model: run by hand, `python bench/train_speed.py --profile`)."""

import jax
import jax.numpy as jnp

from bench import train_profile


def _mlp_loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)


def test_op_profile_charges_traced_ops_to_their_source_forward_and_backward(tmp_path, monkeypatch):
    # This file as a component: its matmul and tanh, forward and backward, must land in its row.
    monkeypatch.setattr(train_profile, "COMPONENTS", (("tests/test_train_profile.py", "test mlp"),))
    step = jax.jit(jax.grad(_mlp_loss, argnums=(0, 1)))
    w, x = jnp.ones((64, 64)) / 64, jnp.ones((256, 64))
    prof = train_profile.op_profile(step, (w, x), str(tmp_path), steps=2)
    rows = {name: (fwd, bwd, mm) for name, fwd, bwd, mm in prof["rows"]}
    fwd, bwd, mm = rows["test mlp"]
    assert fwd > 0 and bwd > 0 and 0 < mm <= fwd + bwd
    assert abs(prof["total"] - sum(f + b for f, b, _ in rows.values())) < 1e-12
    table = train_profile.format_op_table(prof)
    assert "| test mlp |" in table and "**all**" in table


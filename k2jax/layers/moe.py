"""Mixture of Experts: the Kimi / DeepSeek-V3 sigmoid router with a selection-only bias, routed SwiGLU experts
and shared experts (kimi_linear.md section 5, HF `KimiMoEGate` + `KimiSparseMoeBlock`).

Routing follows the released HF code step by step, including two details that change results:
- experts outside the kept groups are masked to 0.0 (not -inf) before the final top-k, as the released Kimi Linear
  and DeepSeek-V3 HF code do; with a negative correction bias a masked expert can therefore outrank a kept one;
- renormalisation only happens when top_k > 1.
Top-k ties go to the lower expert index (`jax.lax.top_k`); HF's `torch.topk(sorted=False)` leaves that unspecified.

Implementations (`config.moe_impl`), all dropless and equal up to float rounding:
- 'dense': every expert runs on every token; the routing weights (zero for unselected experts) combine them.
  E / k times the useful FLOPs, but only three plain 2-D GEMMs.
- 'ragged': the (token, slot) pairs are sorted by expert, pass through grouped matmuls with the group sizes, and
  are unsorted and combined. The grouped matmul is `jax.lax.ragged_dot` on TPU/GPU. On CPU, XLA lowers ragged_dot
  to a masked product over every group (about E x the useful FLOPs on N * k rows, k times dense's cost), so CPU
  uses `pallas_kernels.moe.blocked_grouped_matmul` instead (rows padded to per-expert blocks, one batched matmul
  over the blocks or, for large weights, a scan); the choice is made by `jax.lax.platform_dependent` when the
  program is lowered.
- 'auto': `experts_auto`: 'ragged' except for decode-sized batches on CPU.
Every path also takes INT4 experts (`Int4Weight`, config `quantization.experts: int4`, k2jax.layers.qat): 'dense'
dequantizes them; the sorted path runs `int4_ragged_dot` (the Pallas kernel) on TPU/GPU and, on CPU, where that
op's XLA path would be lax.ragged_dot, dequantizes and uses the blocked grouped matmul.

On CPU the blocked sorted path wins from about 16 (token, slot) rows per expert on (4-10x at the default and
large shapes) and dense is as fast below that, while XLA:CPU's own ragged_dot loses everywhere (`bench/moe.py`;
the measured table is in the README, "MoE on CPU"). TPU/GPU are not measured here: there lax.ragged_dot is the
grouped matmul (TPU lowers it natively; GPU XLA uses cuDNN/hipBLASLt where it can, else it too expands to dense,
so GPU deserves a measurement with bench/moe.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ModelConfig
from k2jax.layers import expert_parallel
from k2jax.layers.mlp import SwiGLU
from k2jax.layers.qat import fake_quantize_int4, int4_experts, qat_settings
from k2jax.sharding import make_param
from pallas_kernels.int4 import Int4Weight, quantize_int4
from pallas_kernels.moe import frozen_dequantized, grouped_matmul

# Mask value for experts of dropped groups: the released HF code's `masked_fill(~mask, 0.0)`.
GROUP_MASK_VALUE = 0.0
RENORM_EPS = 1e-20


class RouterBias(nnx.Variable):
    """The router's `e_score_correction_bias` [E] (float32): changes which experts are selected, never trained by
    the optimizer (which updates nnx.Param only); `update_router_bias` moves it between steps."""


# ---- routing -----------------------------------------------------------------------------------------------------
def _check_route_inputs(config: ModelConfig, x, gate_kernel, bias) -> None:
    E, D = config.num_experts, config.hidden_size
    if x.ndim != 2 or x.shape[-1] != D:
        raise ValueError(f"route: x must be [tokens, hidden_size={D}], got shape {tuple(x.shape)}")
    if tuple(gate_kernel.shape) != (D, E):
        raise ValueError(f"route: gate_kernel must be [hidden_size, num_experts] = {(D, E)}, "
                         f"got {tuple(gate_kernel.shape)}")
    if tuple(bias.shape) != (E,):
        raise ValueError(f"route: bias must be [num_experts] = {(E,)}, got {tuple(bias.shape)}")


def _router_probs(config: ModelConfig, x, gate_kernel):
    """Router probabilities p [N, E] in float32 (HF computes the router in fp32; HIGHEST keeps it fp32 on TPU)."""
    logits = jnp.dot(x.astype(jnp.float32), gate_kernel.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if config.moe_router_activation_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.sigmoid(logits)


def _group_limit(config: ModelConfig, scores):
    """Keep the `topk_group` groups with the largest sum of their top-2 scores; others -> GROUP_MASK_VALUE."""
    G = config.num_expert_group
    if not config.use_grouped_topk or G <= config.topk_group:
        return scores  # every group is kept: HF's masking is a no-op here
    N, E = scores.shape
    grouped = scores.reshape(N, G, E // G)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
    kept = jax.lax.top_k(group_scores, config.topk_group)[1]  # [N, topk_group]
    group_kept = jnp.any(kept[:, :, None] == jnp.arange(G)[None, None, :], axis=1)  # [N, G]
    expert_kept = jnp.repeat(group_kept, E // G, axis=1)
    return jnp.where(expert_kept, scores, jnp.asarray(GROUP_MASK_VALUE, scores.dtype))


def _route(config: ModelConfig, x, gate_kernel, bias):
    """`route` plus the router probabilities p [N, E] (for the load statistics)."""
    p = _router_probs(config, x, gate_kernel)
    biased = p + bias.astype(jnp.float32)[None, :]
    topk_idx = jax.lax.top_k(_group_limit(config, biased), config.num_experts_per_token)[1]
    source = biased if config.moe_router_weights_from_biased_scores else p
    w = jnp.take_along_axis(source, topk_idx, axis=1)
    if config.num_experts_per_token > 1 and config.moe_renormalize:
        w = w / (w.sum(-1, keepdims=True) + RENORM_EPS)
    w = w * config.routed_scaling_factor
    return topk_idx.astype(jnp.int32), w, p


def route(config: ModelConfig, x, gate_kernel, bias):
    """HF `KimiMoEGate`: which experts each token uses, and their combine weights.

    x: [N, hidden] (used in float32); gate_kernel: [hidden, E]; bias: [E] (e_score_correction_bias).
    Returns (topk_idx int32 [N, k], topk_weights float32 [N, k]), slots ordered by decreasing selection score.
    Weights come from the biased scores when `config.moe_router_weights_from_biased_scores` (the HF aliasing
    quirk), else from the unbiased p; renormalised when `moe_renormalize` and k > 1; times routed_scaling_factor.
    """
    _check_route_inputs(config, x, gate_kernel, bias)
    idx, w, _ = _route(config, x, gate_kernel, bias)
    return idx, w


# ---- expert computation ------------------------------------------------------------------------------------------
def experts_dense(x, topk_idx, topk_w, w1, w3, w2, dtype):
    """Every expert on every token. x [N, D] in dtype, w1/w3 [E, D, I], w2 [E, I, D] (arrays in dtype, or
    Int4Weight) -> float32 [N, D]."""
    w1, w3, w2 = (frozen_dequantized(w, dtype) for w in (w1, w3, w2))
    E, D, I = w1.shape
    N = x.shape[0]
    # Dense combine weights [N, E]: zero where the expert was not selected (a token's k experts are distinct).
    comb = jnp.sum(jax.nn.one_hot(topk_idx, E, dtype=jnp.float32) * topk_w[..., None], axis=1)
    # All experts side by side as one [D, E*I] matrix: plain 2-D GEMMs, the fastest layout on CPU.
    g = jnp.dot(x, w1.transpose(1, 0, 2).reshape(D, E * I), preferred_element_type=jnp.float32)
    u = jnp.dot(x, w3.transpose(1, 0, 2).reshape(D, E * I), preferred_element_type=jnp.float32)
    # The weights are folded in before the (linear) down projection, so [N, E, D] is never materialised and the
    # sum over experts is the float32 accumulation of one contraction over (e, i).
    h = (jax.nn.silu(g) * u).reshape(N, E, I) * comb[:, :, None]
    return jnp.dot(h.astype(dtype).reshape(N, E * I), w2.reshape(E * I, D), preferred_element_type=jnp.float32)


def experts_sorted(x, topk_idx, topk_w, w1, w3, w2, dtype, gmm=grouped_matmul):
    """Dropless grouped matmuls over (token, slot) pairs sorted by expert; same contract as `experts_dense`."""
    N, k = topk_idx.shape
    E = w1.shape[0]
    flat = topk_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pair positions, grouped by expert
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[order // k]
    h = (jax.nn.silu(gmm(xs, w1, group_sizes)) * gmm(xs, w3, group_sizes)).astype(dtype)
    out = gmm(h, w2, group_sizes)  # [N*k, D], sorted
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    out = out[inverse].reshape(N, k, -1)
    return jnp.einsum("nkd,nk->nd", out, topk_w)


# 'auto' on CPU: the blocked sorted path pads every expert's rows to blocks of at least this many rows; with fewer
# (token, slot) rows per expert than that (decode-sized batches) dense is as fast and simpler (bench/moe.py).
_AUTO_CPU_MIN_ROWS_PER_EXPERT = 16


def experts_auto(x, topk_idx, topk_w, w1, w3, w2, dtype):
    """moe_impl='auto': 'ragged' (lax.ragged_dot) on TPU/GPU; on CPU 'ragged' (blocked) unless the batch is so
    small that each expert averages fewer than _AUTO_CPU_MIN_ROWS_PER_EXPERT rows, then 'dense'."""
    rows_per_expert = topk_idx.size / w1.shape[0]
    if rows_per_expert >= _AUTO_CPU_MIN_ROWS_PER_EXPERT:
        return experts_sorted(x, topk_idx, topk_w, w1, w3, w2, dtype)
    dense = functools.partial(experts_dense, dtype=dtype)
    ragged = functools.partial(experts_sorted, dtype=dtype)
    return jax.lax.platform_dependent(x, topk_idx, topk_w, w1, w3, w2, cpu=dense, default=ragged)


_IMPLS = {"dense": experts_dense, "ragged": experts_sorted, "auto": experts_auto}


# ---- modules -----------------------------------------------------------------------------------------------------
class MoERouter(nnx.Module):
    """Router parameters: `kernel` [hidden, E] and `e_score_correction_bias` [E].

    The kernel's logical names are ('embed', None): it is small (hidden x E), so it is replicated over the expert
    axis and only follows the embedding's fsdp sharding.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        E, D = config.num_experts, config.hidden_size
        self.config = config
        self.kernel = make_param(rngs, (D, E), ("embed", None), std=config.initializer_range,
                                 dtype=jnp.dtype(config.param_dtype))
        self.e_score_correction_bias = RouterBias(jnp.zeros((E,), jnp.float32), out_sharding=(None,),
                                                  eager_sharding=False)

    def __call__(self, x):
        """x [N, hidden] -> (topk_idx int32 [N, k], topk_weights f32 [N, k]): `route` with these parameters."""
        return route(self.config, x, self.kernel[...], self.e_score_correction_bias[...])


class MoEExperts(nnx.Module):
    """Stacked routed SwiGLU experts: w1 (gate) and w3 (up) [E, hidden, I], w2 (down) [E, I, hidden]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        pd, std = jnp.dtype(config.param_dtype), config.initializer_range
        self.w1 = make_param(rngs, (E, D, I), ("expert", "expert_embed", "expert_mlp"), std=std, dtype=pd)
        self.w3 = make_param(rngs, (E, D, I), ("expert", "expert_embed", "expert_mlp"), std=std, dtype=pd)
        self.w2 = make_param(rngs, (E, I, D), ("expert", "expert_mlp", "expert_embed"), std=std, dtype=pd)
        self.qat = qat_settings(config)  # (group_size, scale_dtype) or None

    def weights(self, dtype):
        """(w1, w3, w2) in the compute dtype; with quantization.qat, fake-quantized to the INT4 grid (the values
        `quantize_model_experts` will pack) with a straight-through gradient."""
        ws = (self.w1[...], self.w3[...], self.w2[...])
        if self.qat is None:
            return tuple(w.astype(dtype) for w in ws)
        return tuple(fake_quantize_int4(w, *self.qat, dtype=dtype) for w in ws)


class ExpertInt4(nnx.Variable):
    """Packed INT4 expert data (uint8 nibbles or group scales): frozen, as the optimizer updates nnx.Param only."""


_EXPERT_LAYOUT = {"w1": ("expert", "expert_embed", "expert_mlp"), "w3": ("expert", "expert_embed", "expert_mlp"),
                  "w2": ("expert", "expert_mlp", "expert_embed")}


class QuantizedMoEExperts(nnx.Module):
    """Routed SwiGLU experts stored as INT4 (config quantization.experts = 'int4'): for each of w1 (gate), w3 (up)
    [E, hidden, I] and w2 (down) [E, I, hidden], `<name>_packed` uint8 [E, K/2, N] (two 4-bit values per byte
    along the input dim K) and `<name>_scale` [E, K/group_size, N] in quantization.scale_dtype, both ExpertInt4
    with the float weight's logical axis names. Initialised by quantizing a random normal init; PTQ
    (k2jax.quantize.quantize_model_experts) and the HF loader fill in real values."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        q = config.quantization
        E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.shapes = (("w1", (E, D, I)), ("w3", (E, D, I)), ("w2", (E, I, D)))  # static: hashable
        self.group_size = q["group_size"]
        init = jax.nn.initializers.normal(config.initializer_range)
        for name, shape in self.shapes:
            names = _EXPERT_LAYOUT[name]
            qw = quantize_int4(init(rngs.params(), shape, jnp.float32), self.group_size, jnp.dtype(q["scale_dtype"]))
            setattr(self, f"{name}_packed", ExpertInt4(qw.packed, out_sharding=names, eager_sharding=False))
            setattr(self, f"{name}_scale", ExpertInt4(qw.scale, out_sharding=names, eager_sharding=False))

    def int4(self, name: str) -> Int4Weight:
        """The Int4Weight of 'w1', 'w3' or 'w2'."""
        return Int4Weight(packed=getattr(self, f"{name}_packed")[...], scale=getattr(self, f"{name}_scale")[...],
                          shape=dict(self.shapes)[name], group_size=self.group_size)

    def weights(self, dtype):
        """(w1, w3, w2) as Int4Weight (the expert functions compute in `dtype`)."""
        del dtype
        return tuple(self.int4(n) for n in ("w1", "w3", "w2"))


class MoE(nnx.Module):
    """Routed experts (top-k of E, HF `KimiSparseMoeBlock`) plus shared experts; children `gate`, `experts`,
    `shared_experts` (None when num_shared_experts == 0)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if config.num_experts <= 0:
            raise ValueError("MoE needs config.num_experts > 0")
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        self.gate = MoERouter(config, rngs=rngs)
        self.experts = (QuantizedMoEExperts if int4_experts(config) else MoEExperts)(config, rngs=rngs)
        if config.num_shared_experts > 0:
            self.shared_experts = SwiGLU(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts,
                                         rngs=rngs, param_dtype=jnp.dtype(config.param_dtype), dtype=self.dtype,
                                         std=config.initializer_range)
        else:
            self.shared_experts = None

    def __call__(self, x, *, token_mask=None):
        """x [B, T, hidden]; token_mask bool [B, T] (False = padding: routed, but left out of the statistics).

        Returns (y [B, T, hidden] in config.dtype, aux) with aux = {'expert_load': f32 [E] (token, slot)
        assignments per expert over real tokens, 'router_probs_mean': f32 [E] mean over real tokens of the
        per-token normalised router probabilities p / sum(p), 'dropped_tokens': int32 (token, expert)
        assignments dropped over capacity (0 unless expert parallel with config.moe_capacity_factor)}.
        """
        cfg = self.config
        D, E = cfg.hidden_size, cfg.num_experts
        if x.ndim != 3 or x.shape[-1] != D:
            raise ValueError(f"MoE: x must be [batch, length, hidden_size={D}], got shape {tuple(x.shape)}")
        B, T = x.shape[:2]
        if token_mask is not None and tuple(token_mask.shape) != (B, T):
            raise ValueError(f"MoE: token_mask must be [batch, length] = {(B, T)}, got {tuple(token_mask.shape)}")
        xf = x.reshape(B * T, D).astype(self.dtype)
        idx, w, p = _route(cfg, xf, self.gate.kernel[...], self.gate.e_score_correction_bias[...])
        routed, dropped = _routed_experts(cfg, xf, idx, w, self.experts.weights(self.dtype), self.dtype)
        y = routed.astype(self.dtype).reshape(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x.astype(self.dtype))
        return y, {**_load_stats(idx, p, token_mask, E), "dropped_tokens": dropped}


def _routed_experts(cfg, xf, idx, w, weights, dtype):
    """Routed experts -> (float32 [N, D], int32 dropped (token, expert) assignments). Expert parallel
    (k2jax.layers.expert_parallel) when a mesh with an `expert` axis > 1 is active and the experts are float arrays,
    else `cfg.moe_impl` on this device's view (dropless)."""
    mesh = expert_parallel.active_ep_mesh()
    if mesh is not None and not any(isinstance(a, Int4Weight) for a in weights):
        return expert_parallel.routed_experts(cfg, xf, idx, w, *weights, dtype, mesh=mesh)
    return _IMPLS[cfg.moe_impl](xf, idx, w, *weights, dtype), jnp.zeros((), jnp.int32)


def _load_stats(idx, p, token_mask, E):
    """The aux dict of `MoE.__call__`, over real tokens only."""
    N, k = idx.shape
    real = jnp.ones((N,), jnp.float32) if token_mask is None else token_mask.reshape(N).astype(jnp.float32)
    load = jnp.zeros((E,), jnp.float32).at[idx.reshape(-1)].add(jnp.repeat(real, k))
    p_norm = p / jnp.maximum(p.sum(-1, keepdims=True), RENORM_EPS)
    probs_mean = (p_norm * real[:, None]).sum(0) / jnp.maximum(real.sum(), 1.0)
    return {"expert_load": load, "router_probs_mean": probs_mean, "dropped_tokens": jnp.zeros((), jnp.int32)}


# ---- balancing ---------------------------------------------------------------------------------------------------
def update_router_bias(bias, expert_load, rate):
    """Aux-loss-free balancing (DeepSeek-V3): bias [E] += rate * sign(mean load - load) -> new bias [E] float32.

    Overloaded experts go down, underloaded ones up, exactly balanced ones stay.
    """
    if bias.shape != expert_load.shape or bias.ndim != 1:
        raise ValueError(f"update_router_bias: bias {tuple(bias.shape)} and expert_load "
                         f"{tuple(expert_load.shape)} must both be [num_experts]")
    load = expert_load.astype(jnp.float32)
    return bias.astype(jnp.float32) + rate * jnp.sign(load.mean() - load)


def load_balance_loss(router_probs_mean, expert_load):
    """Switch / DeepSeek-V3 style balance loss: E * sum_i f_i * P_i, a float32 scalar.

    f_i = expert_load_i / sum(expert_load) (fraction of the assignments, = load_i / (k * tokens) when dropless),
    P_i = router_probs_mean_i (mean normalised router probability, as returned in MoE's aux). Equals 1 when both
    are uniform. The top-k size needs no argument: it cancels out of f_i since sum(load) = k * tokens.
    """
    if router_probs_mean.shape != expert_load.shape or expert_load.ndim != 1:
        raise ValueError(f"load_balance_loss: router_probs_mean {tuple(router_probs_mean.shape)} and expert_load "
                         f"{tuple(expert_load.shape)} must both be [num_experts]")
    E = expert_load.shape[0]
    f = expert_load.astype(jnp.float32) / jnp.maximum(expert_load.sum().astype(jnp.float32), 1.0)
    return E * jnp.sum(f * router_probs_mean.astype(jnp.float32))

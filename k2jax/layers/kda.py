"""The Kimi Delta Attention layer (HF `KimiDeltaAttention`, kimi_linear.md section 1): one `__call__` for training,
prefill, chunked prefill and decode (a `KDAState` cache in, the next one out).

Children are named as in HF so that the checkpoint loader maps them one to one. Layout differences from HF:
- Linear kernels are [in, out] (HF weights are [out, in]).
- `q_conv1d.weight` etc. are [W, H*K] = HF `[H*K, 1, W][:, 0, :].T` (see k2jax.layers.short_conv).
- `A_log` is [H] (HF stores (1, 1, H, 1)); `dt_bias` is [H*K] flat like HF, indexed h*K + k.
`A_log` and `dt_bias` are float32 parameters whatever `param_dtype` is, as in HF.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.layers.context_parallel import check_context_length, conv_halo_state, spec
from k2jax.layers.linear import Linear
from k2jax.layers.norms import GatedRMSNorm, l2_normalize
from k2jax.layers.short_conv import ShortConv
from k2jax.sharding import CONTEXT_AXIS, context_size, make_param
from pallas_kernels.kda import kda, kda_step
from pallas_kernels.kda.context_parallel import kda_context_parallel

QK_L2_EPS = 1e-6
# fla / Mamba initialisation ranges of the gate parameters.
_A_RANGE = (1.0, 16.0)
_DT_RANGE = (1e-3, 1e-1)
_DT_FLOOR = 1e-4


class KDAState(NamedTuple):
    """Per-layer KDA cache: the last W-1 pre-conv inputs of q, k, v ([B, W-1, H*K] each, compute dtype, oldest
    first) and the recurrent state [B, H, K, V] float32 (rows = key dim)."""

    conv_q: jax.Array
    conv_k: jax.Array
    conv_v: jax.Array
    recurrent: jax.Array

    @classmethod
    def zeros(cls, batch: int, config) -> "KDAState":
        """The empty cache for `batch` sequences of a layer built from `config`."""
        H, K, W = config.kda_num_heads, config.kda_head_dim, config.short_conv_kernel_size
        conv = jnp.zeros((batch, W - 1, H * K), jnp.dtype(config.dtype))
        return cls(conv, conv, conv, jnp.zeros((batch, H, K, K), jnp.float32))


def _a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, *_A_RANGE)).astype(dtype)


def _dt_bias_init(key, shape, dtype):
    # dt ~ log-uniform in _DT_RANGE; the bias is softplus^{-1}(dt) so that softplus(0 + dt_bias) = dt at init.
    lo, hi = math.log(_DT_RANGE[0]), math.log(_DT_RANGE[1])
    dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi)), _DT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class KimiDeltaAttention(nnx.Module):
    """One KDA token mixer. Input x [B, T, hidden] is already input-layernormed; output [B, T, hidden].

    Uses config.kda_num_heads (H), config.kda_head_dim (K = V), config.short_conv_kernel_size (W),
    config.kda_impl, config.kda_chunk_size, config.rms_norm_eps, config.dtype / param_dtype.
    Gates, beta and the recurrent state are float32; projections, convs and outputs use config.dtype.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.config = config
        h, H, K, W = config.hidden_size, config.kda_num_heads, config.kda_head_dim, config.short_conv_kernel_size
        self.hidden_size, self.num_heads, self.head_dim, self.kernel_size = h, H, K, W
        self.dtype = jnp.dtype(config.dtype)
        pd = jnp.dtype(config.param_dtype)
        D = H * K

        def linear(i, o, names):
            return Linear(i, o, names=names, rngs=rngs, std=config.initializer_range, param_dtype=pd,
                          dtype=self.dtype)

        def conv():
            return ShortConv(D, W, rngs=rngs, param_dtype=pd, dtype=self.dtype, channel_axis="heads")

        self.q_proj = linear(h, D, ("embed", "heads"))
        self.k_proj = linear(h, D, ("embed", "heads"))
        self.v_proj = linear(h, D, ("embed", "heads"))
        self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(), conv(), conv()
        self.A_log = make_param(rngs, (H,), ("heads",), init=_a_log_init, dtype=jnp.float32)
        self.dt_bias = make_param(rngs, (D,), ("heads",), init=_dt_bias_init, dtype=jnp.float32)
        self.f_a_proj = linear(h, K, ("embed", "kda_low_rank"))
        self.f_b_proj = linear(K, D, ("kda_low_rank", "heads"))
        self.b_proj = linear(h, H, ("embed", "heads"))
        self.g_a_proj = linear(h, K, ("embed", "kda_low_rank"))
        self.g_b_proj = linear(K, D, ("kda_low_rank", "heads"))
        self.o_norm = GatedRMSNorm(K, eps=config.rms_norm_eps, rngs=rngs, param_dtype=pd)
        self.o_proj = linear(D, h, ("heads", "embed"))

    # ---- pieces shared by the sequence and the single-step paths ----------------------------------------------------
    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def _gate_and_beta(self, x):
        """Log-decay g = -exp(A_log[h]) * softplus(f + dt_bias) [..., H, K] and beta [..., H], both float32."""
        f = self._heads(self.f_b_proj(self.f_a_proj(x))).astype(jnp.float32)
        dt_bias = self.dt_bias[...].astype(jnp.float32).reshape(self.num_heads, self.head_dim)
        # jax.nn.softplus equals torch's threshold-20 softplus in float32 (log1p(exp(-x)) < ulp(x) above 20)
        # and, unlike a `where`, keeps finite gradients for large inputs.
        g = -jnp.exp(self.A_log[...].astype(jnp.float32))[:, None] * jax.nn.softplus(f + dt_bias)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        return g, beta

    def _qk(self, q, k):
        """Split into heads and L2-normalise per head (float32, eps 1e-6 inside the sqrt), back to dtype."""
        return l2_normalize(self._heads(q), QK_L2_EPS), l2_normalize(self._heads(k), QK_L2_EPS)

    def _output(self, o, x):
        """Gated RMSNorm with gate z = g_b(g_a(x)), then o_proj. o: [..., H, V]."""
        z = self._heads(self.g_b_proj(self.g_a_proj(x)))
        o = self.o_norm(o.astype(self.dtype), z)
        return self.o_proj(o.reshape(*o.shape[:-2], self.num_heads * self.head_dim))

    # ---- checks ------------------------------------------------------------------------------------------------
    def _check_cache(self, cache, B: int):
        if cache is None:
            return
        if not isinstance(cache, KDAState):
            raise ValueError(f"KimiDeltaAttention: cache must be a KDAState, got {type(cache).__name__}")
        H, K, W = self.num_heads, self.head_dim, self.kernel_size
        want = {"conv_q": (B, W - 1, H * K), "conv_k": (B, W - 1, H * K), "conv_v": (B, W - 1, H * K),
                "recurrent": (B, H, K, K)}
        for name, shape in want.items():
            got = tuple(getattr(cache, name).shape)
            if got != shape:
                raise ValueError(f"KimiDeltaAttention: cache.{name} must have shape {shape}, got {got}")

    # ---- forward -----------------------------------------------------------------------------------------------
    def __call__(self, x, *, segment_ids=None, cache: KDAState | None = None):
        """x: [B, T, hidden]; segment_ids: int [B, T] (0 = padding) or None; cache: KDAState [B, ...] or None.

        Returns (y [B, T, hidden] in config.dtype, new cache): without a cache (training) the new cache is None and
        the sequence starts from zero states; with one, x continues it and the new cache is the KDAState after x's
        last real token (`KDAState.zeros` starts a sequence: prefill). With segment_ids the states (conv and
        recurrent) restart at each segment, the row's first real segment continuing from the cache; padding is
        inert, so a left-padded row matches the unpadded one. One token with a cache and no segment ids (decode)
        runs the single-step recurrence (`kda_step`), the rest the chunked sequence op (`kda`).
        """
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"KimiDeltaAttention: x must be [B, T, hidden_size={self.hidden_size}], "
                             f"got shape {x.shape}")
        B, T, _ = x.shape
        if segment_ids is not None and tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"KimiDeltaAttention: segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
        self._check_cache(cache, B)
        x = x.astype(self.dtype)
        if cache is not None and T == 1 and segment_ids is None:
            return self._step(x[:, 0], cache)
        if context_size() > 1:
            if cache is not None:
                raise ValueError("KimiDeltaAttention: a cache cannot be used under context parallelism (a mesh with "
                                 "context > 1 is for training); run cached inference on a mesh with context 1")
            return self._output(self._mix_context_parallel(x, segment_ids), x), None
        cs = (None, None, None) if cache is None else (cache.conv_q, cache.conv_k, cache.conv_v)
        q, cq = self.q_conv1d(self.q_proj(x), segment_ids, cs[0])
        k, ck = self.k_conv1d(self.k_proj(x), segment_ids, cs[1])
        v, cv = self.v_conv1d(self.v_proj(x), segment_ids, cs[2])
        q, k = self._qk(q, k)
        g, beta = self._gate_and_beta(x)
        o, final = kda(q, k, self._heads(v), g, beta, scale=self.head_dim ** -0.5,
                       initial_state=None if cache is None else cache.recurrent,
                       output_final_state=cache is not None, segment_ids=segment_ids,
                       chunk_size=self.config.kda_chunk_size, impl=self.config.kda_impl)
        y = self._output(o, x)
        return y, (None if cache is None else KDAState(cq, ck, cv, final))

    def _mix_context_parallel(self, x, segment_ids):
        """Training with the sequence split over `context` (k2jax.layers.context_parallel), x [B, T, hidden] in
        config.context_layout -> KDA outputs o [B, T, H, V] before the output gate, same layout.

        Inside one shard_map: each short conv reads its halo (`conv_halo_state`) and the recurrence runs
        `kda_context_parallel`. Channels are whole on every device here (heads are not split over `tensor`)."""
        layout, W = self.config.context_layout, self.kernel_size
        B, T, _ = x.shape
        check_context_length(T, layout)
        D = self.num_heads * self.head_dim
        g, beta = self._gate_and_beta(x)
        seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        convs = [nnx.split(c) for c in (self.q_conv1d, self.k_conv1d, self.v_conv1d)]
        projected = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        m = 2 if layout == "zigzag" else 1

        def local(q, k, v, g, beta, seg, conv_states):
            b, t = seg.shape
            tp = t // m
            pieces = lambda a: jnp.swapaxes(a.reshape((b, m, tp) + a.shape[2:]), 0, 1)  # noqa: E731  [m, b, tp, ..]
            seg_p = pieces(seg)
            mixed = []
            for a, (graphdef, _), state in zip((q, k, v), convs, conv_states):
                a_p = pieces(a)
                start = conv_halo_state(a_p, seg_p, W, layout).reshape(m * b, W - 1, D)
                y, _ = nnx.merge(graphdef, state)(a_p.reshape(m * b, tp, D),
                                                  None if segment_ids is None else seg_p.reshape(m * b, tp), start)
                mixed.append(jnp.swapaxes(y.reshape(m, b, tp, D), 0, 1).reshape(b, t, D))
            q, k = self._qk(mixed[0], mixed[1])
            o, _ = kda_context_parallel(q, k, self._heads(mixed[2]), g, beta, axis_name=CONTEXT_AXIS,
                                        scale=self.head_dim ** -0.5, segment_ids=None if segment_ids is None else seg,
                                        chunk_size=self.config.kda_chunk_size, impl=self.config.kda_impl,
                                        layout=layout)
            return o

        tok = spec(("batch", "length", None), (B, T, D))
        in_specs = (tok, tok, tok, spec(("batch", "length", None, None), g.shape),
                    spec(("batch", "length", None), beta.shape), spec(("batch", "length"), (B, T)),
                    jax.sharding.PartitionSpec())
        out_spec = spec(("batch", "length", None, None), (B, T, self.num_heads, self.head_dim))
        return jax.shard_map(local, in_specs=in_specs, out_specs=out_spec, check_vma=False)(
            *projected, g, beta, seg, [state for _, state in convs])

    def _step(self, x_t, cache: KDAState):
        """One decode token per row: x_t [B, hidden] -> (y [B, 1, hidden], new KDAState)."""
        q, cq = self.q_conv1d.step(self.q_proj(x_t), cache.conv_q)
        k, ck = self.k_conv1d.step(self.k_proj(x_t), cache.conv_k)
        v, cv = self.v_conv1d.step(self.v_proj(x_t), cache.conv_v)
        q, k = self._qk(q, k)
        g, beta = self._gate_and_beta(x_t)
        o, rec = kda_step(q, k, self._heads(v), g, beta, cache.recurrent, scale=self.head_dim ** -0.5)
        return self._output(o, x_t)[:, None], KDAState(cq, ck, cv, rec)

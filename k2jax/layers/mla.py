"""Multi-head Latent Attention (MLA): NoPE for Kimi Linear, RoPE + YaRN with a q LoRA for Kimi K2 / DeepSeek-V3.

Per token (kimi_linear.md section 3), with H heads, n = qk_nope_head_dim, P = qk_rope_head_dim, d_v = v_head_dim,
R = kv_lora_rank:

    q            = q_proj(x)  or  q_b_proj(q_a_layernorm(q_a_proj(x)))      [H, n + P] -> q_nope [H, n], q_pe [H, P]
    c_kv, k_pe   = kv_a_proj_with_mqa(x)                                     [R + P]   (k_pe: one key part shared by all heads)
    c            = kv_a_layernorm(c_kv)                                      [R]
    k_nope, v    = kv_b_proj(c)                                              [H, n + d_v], per head [n | d_v]
    score_h(t,s) = (q_nope_h(t) . k_nope_h(s) + q_pe_h(t) . k_pe(s)) * softmax_scale
    y            = o_proj(concat_h(softmax_s(score_h) @ v_h))

With RoPE, q_pe and k_pe are rotated by `k2jax.layers.rope.apply_rope` (HF half layout; see that module). With NoPE
(`mla_use_nope`) nothing is rotated and positions are ignored.

Two equal forms are offered:
* expanded (`__call__`): per-head K/V as HF computes them, for training and prefill;
* absorbed (`latent_cache` + `attend_latent`): the cache holds only (c, k_pe), R + P values per token, and
  q_lat,h = W_UK,h^T q_nope,h, score = q_lat . c + q_pe . k_pe, o_h = W_UV,h (sum_s p_s c_s),
  where W_UK,h / W_UV,h are head h's k_nope / v rows of kv_b_proj. This is exact (RoPE touches only the P part).

Masking: causal by index within a row AND within the same segment; segment id 0 is padding (never attended,
its own output is zero). Scores, softmax and accumulation are float32; activations use config.dtype.
Every einsum keeps its batch dims leading (XLA:CPU cannot run some bf16 dots otherwise: platform_notes §5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.layers.linear import Linear
from k2jax.layers.norms import RMSNorm
from k2jax.layers.rope import apply_rope, rope_frequencies, softmax_scale

_F32 = jnp.float32


def _dot(eq, a, b):
    """einsum accumulated in float32."""
    return jnp.einsum(eq, a, b, preferred_element_type=_F32)


def _masked_softmax(scores, mask):
    """Softmax over the last axis in float32; masked entries get 0, fully masked rows give all-zero rows."""
    scores = jnp.where(mask, scores, jnp.finfo(_F32).min)
    return jax.nn.softmax(scores, axis=-1) * mask


def attention_mask(segment_ids, T: int, B: int):
    """bool [B, T, T]: key s visible to query t iff s <= t and both are in the same non-padding segment."""
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    if segment_ids is None:
        return jnp.broadcast_to(causal, (B, T, T))
    seg = segment_ids
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    return causal & same


class MultiHeadLatentAttention(nnx.Module):
    """MLA layer with HF child names (q_proj | q_a_proj, q_a_layernorm, q_b_proj; kv_a_proj_with_mqa,
    kv_a_layernorm, kv_b_proj, o_proj). Kernels are [in, out] in HF's output order, so HF `weight.T` loads as is.

    `__call__(x [B, T, hidden], *, segment_ids=None, positions=None) -> [B, T, hidden]`.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.nope_dim, self.rope_dim = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank, self.hidden_size = c.v_head_dim, c.kv_lora_rank, c.hidden_size
        self.use_rope = not c.mla_use_nope
        self.rope_interleave = c.rope_interleave
        self.dtype = jnp.dtype(c.dtype)
        self.scale = softmax_scale(c)
        inv_freq, self.rope_mscale = rope_frequencies(c) if self.use_rope else ((), 1.0)
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static, so the module stays a pure-Param pytree
        H, qk = self.num_heads, self.nope_dim + self.rope_dim
        kw = dict(rngs=rngs, param_dtype=jnp.dtype(c.param_dtype), dtype=self.dtype, std=c.initializer_range)
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, H * qk, names=("embed", "heads"), **kw)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, names=("embed", "q_lora"), **kw)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=c.mla_latent_norm_eps, rngs=rngs,
                                         param_dtype=jnp.dtype(c.param_dtype))
            self.q_b_proj = Linear(c.q_lora_rank, H * qk, names=("q_lora", "heads"), **kw)
        self.q_lora_rank = c.q_lora_rank
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + self.rope_dim, names=("embed", "kv_lora"),
                                         **kw)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=c.mla_latent_norm_eps, rngs=rngs,
                                      param_dtype=jnp.dtype(c.param_dtype))
        self.kv_b_proj = Linear(c.kv_lora_rank, H * (self.nope_dim + self.v_dim), names=("kv_lora", "heads"), **kw)
        self.o_proj = Linear(H * self.v_dim, c.hidden_size, names=("heads", "embed"), **kw)

    # ---- input checks (trace time) -----------------------------------------------------------------------------
    def _check_x(self, x, name="x"):
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MultiHeadLatentAttention: {name} must be [B, T, hidden={self.hidden_size}], "
                             f"got shape {x.shape}")
        return x.shape[0], x.shape[1]

    def _positions(self, positions, B, T, name="positions"):
        if positions is None:
            return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if positions.shape not in ((B, T), (T,)) or not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(f"MultiHeadLatentAttention: {name} must be int [B, T] = [{B}, {T}] (or [T]), "
                             f"got {positions.dtype}{list(positions.shape)}")
        return jnp.broadcast_to(positions, (B, T))

    # ---- shared pieces ------------------------------------------------------------------------------------------
    def queries(self, x, positions):
        """Per-head queries of x [B, T, hidden] (already layernormed) at int positions [B, T]: q_nope [B, T, H, n],
        q_pe [B, T, H, P] (rotated when RoPE is on). Public for decoders that build their own attention."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, T, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q[..., :self.nope_dim], q[..., self.nope_dim:]
        if self.use_rope:
            q_pe = apply_rope(q_pe, positions, self.inv_freq, self.rope_mscale, self.rope_interleave)
        return q_nope, q_pe

    def _latent(self, x, positions):
        """c (normed) [B, T, R] and k_pe [B, T, P] (rotated when RoPE is on)."""
        kv_a = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv_a[..., :self.kv_lora_rank], kv_a[..., self.kv_lora_rank:]
        c = self.kv_a_layernorm(c_kv).astype(self.dtype)
        if self.use_rope:
            k_pe = apply_rope(k_pe[:, :, None, :], positions, self.inv_freq, self.rope_mscale,
                              self.rope_interleave)[:, :, 0, :]
        return c, k_pe

    def _attend(self, q, k, v, mask):
        """q [B, Tq, H, Dk], k [B, S, H, Dk], v [B, S, H, Dv], mask [B, Tq, S] -> [B, Tq, H*Dv] (compute dtype)."""
        B, Tq = q.shape[:2]
        qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # heads next to batch: leading batch dims
        scores = _dot("bhtd,bhsd->bhts", qh, kh) * self.scale
        p = _masked_softmax(scores, mask[:, None])
        o = _dot("bhts,bhsd->bhtd", p.astype(self.dtype), vh)
        return jnp.swapaxes(o, 1, 2).reshape(B, Tq, -1).astype(self.dtype)

    # ---- expanded form ------------------------------------------------------------------------------------------
    def __call__(self, x, *, segment_ids=None, positions=None):
        """x [B, T, hidden] -> [B, T, hidden]. segment_ids: int [B, T] (0 = padding); positions: int [B, T]
        (RoPE only; default arange(T)). Padding rows output zeros."""
        B, T = self._check_x(x)
        if segment_ids is not None and (segment_ids.shape != (B, T)
                                        or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
            raise ValueError(f"MultiHeadLatentAttention: segment_ids must be int [B, T] = [{B}, {T}], "
                             f"got {segment_ids.dtype}{list(segment_ids.shape)}")
        positions = self._positions(positions, B, T)
        q_nope, q_pe = self.queries(x, positions)
        c, k_pe = self._latent(x, positions)
        kv = self.kv_b_proj(c).reshape(B, T, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv[..., :self.nope_dim], kv[..., self.nope_dim:]
        k_pe = jnp.broadcast_to(k_pe[:, :, None, :].astype(k_nope.dtype), (B, T, self.num_heads, self.rope_dim))
        q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1)
        k = jnp.concatenate([k_nope, k_pe], axis=-1)
        o = self._attend(q, k, v, attention_mask(segment_ids, T, B))
        return self.o_proj(o)

    # ---- absorbed (latent) form ---------------------------------------------------------------------------------
    def latent_cache(self, x, positions=None):
        """What a decoding cache stores per token: (c [B, T, kv_lora_rank] normed, k_pe [B, T, P] rotated if RoPE),
        both in the compute dtype. positions: int [B, T] (default arange(T))."""
        B, T = self._check_x(x)
        c, k_pe = self._latent(x, self._positions(positions, B, T))
        return c, k_pe.astype(self.dtype)

    def absorbed_weights(self):
        """W_UK [H, n, R] and W_UV [H, R, d_v] (compute dtype) split from kv_b_proj (kernel [R, H*(n + d_v)]):
        the up-projections the absorbed form folds into the query and the output."""
        w = self.kv_b_proj.kernel[...].astype(self.dtype).reshape(self.kv_lora_rank, self.num_heads, -1)
        w_uk = jnp.transpose(w[..., :self.nope_dim], (1, 2, 0))
        w_uv = jnp.transpose(w[..., self.nope_dim:], (1, 0, 2))
        return w_uk, w_uv

    def attend_latent(self, x_q, q_positions, cache_ckv, cache_kpe, kv_mask):
        """Absorbed MLA: queries x_q [B, Tq, hidden] at q_positions (int [B, Tq], None = arange(Tq)) attend to a
        latent cache (cache_ckv [B, S, R], cache_kpe [B, S, P] from `latent_cache`) where kv_mask (bool
        [B, Tq, S]) allows. Returns [B, Tq, hidden]; rows with no visible key output zeros."""
        B, Tq = self._check_x(x_q, "x_q")
        S = cache_ckv.shape[1] if cache_ckv.ndim == 3 else -1
        if cache_ckv.shape != (B, S, self.kv_lora_rank) or cache_kpe.shape != (B, S, self.rope_dim):
            raise ValueError(f"MultiHeadLatentAttention.attend_latent: cache_ckv must be [B={B}, S, "
                             f"{self.kv_lora_rank}] and cache_kpe [B, S, {self.rope_dim}] with the same S, got "
                             f"{cache_ckv.shape} and {cache_kpe.shape}")
        if kv_mask.shape != (B, Tq, S) or kv_mask.dtype != jnp.bool_:
            raise ValueError(f"MultiHeadLatentAttention.attend_latent: kv_mask must be bool [B, Tq, S] = "
                             f"[{B}, {Tq}, {S}], got {kv_mask.dtype}{list(kv_mask.shape)}")
        q_nope, q_pe = self.queries(x_q, self._positions(q_positions, B, Tq, "q_positions"))
        w_uk, w_uv = self.absorbed_weights()
        ckv, kpe = cache_ckv.astype(self.dtype), cache_kpe.astype(self.dtype)
        # Heads act as extra query rows against the one shared latent key/value (MQA): the cache is never
        # broadcast over heads.
        q_lat = _dot("hbtn,hnr->hbtr", jnp.transpose(q_nope, (2, 0, 1, 3)), w_uk).astype(self.dtype)
        q_lat = jnp.transpose(q_lat, (1, 0, 2, 3))  # [B, H, Tq, R]
        q_pe = jnp.transpose(q_pe.astype(self.dtype), (0, 2, 1, 3))  # [B, H, Tq, P]
        scores = _dot("bhtr,bsr->bhts", q_lat, ckv) + _dot("bhtp,bsp->bhts", q_pe, kpe)
        p = _masked_softmax(scores * self.scale, kv_mask[:, None])
        ctx = _dot("bhts,bsr->bhtr", p.astype(self.dtype), ckv).astype(self.dtype)
        o = _dot("hbtr,hrv->hbtv", jnp.transpose(ctx, (1, 0, 2, 3)), w_uv)  # [H, B, Tq, d_v]
        o = jnp.transpose(o, (1, 2, 0, 3)).reshape(B, Tq, -1).astype(self.dtype)
        return self.o_proj(o)

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

One `__call__` serves training, prefill, chunked prefill and decode, in two equal forms:
* expanded: per-head K/V as HF computes them, over x's own tokens (no cache, or an empty one);
* absorbed: with cached tokens. A cache holds only (c, k_pe), R + P values per token, and
  q_lat,h = W_UK,h^T q_nope,h, score = q_lat . c + q_pe . k_pe, o_h = W_UV,h (sum_s p_s c_s),
  where W_UK,h / W_UV,h are head h's k_nope / v rows of kv_b_proj. This is exact (RoPE touches only the P part).
  A piece with many queries (chunked prefill, a prefix-cache hit) instead up-projects the cached latents a block
  at a time and attends expanded: fewer flops per pair at Kimi Linear's sizes; `expanded_pays_off` picks the form
  from the piece length at trace time (decode steps stay absorbed).
With a cache the layer also returns x's own latents (`MLALatents`): storing them is the caller's job
(k2jax.serving.cache), so that a program reading the cache never also writes it.

Masking: causal by index within a row AND within the same segment; segment id 0 is padding (never attended,
its own output is zero). Scores, softmax and accumulation are float32; activations use config.dtype.
Every einsum keeps its batch dims leading (XLA:CPU cannot run some bf16 dots otherwise: platform_notes §5).

Memory is O(T) at any length: attention runs blocked, never building the [T, T] scores or mask
(`pallas_kernels.attention`). Among x's own tokens it is `attention` (flash attention, custom VJP; the Pallas
kernels on TPU/GPU where they fit); over cached tokens `latent_attention_rows` reads the latents in blocks; with both,
the two partial softmaxes are merged by their log-sum-exp (`merge_attention`), which equals one softmax over all.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.layers import context_parallel
from k2jax.layers.linear import Linear, cpu_path
from k2jax.layers.norms import RMSNorm
from k2jax.layers.rope import apply_rope, rope_frequencies, softmax_scale
from k2jax.sharding import context_size
from pallas_kernels.attention import (
    attention,
    decompressed_latent_attention,
    expanded_pays_off,
    latent_attention_rows,
    merge_attention,
)

_F32 = jnp.float32


def _dot(eq, a, b):
    """einsum accumulated in float32."""
    return jnp.einsum(eq, a, b, preferred_element_type=_F32)


class MLACache(NamedTuple):
    """What an MLA layer reads of a sequence's earlier tokens: a view of their latents. ckv [B, S, R] (normed c)
    and kpe [B, S, P] (rotated when RoPE is on), compute dtype; lengths int32 [B]: row b's cached tokens are
    entries [0, lengths[b]) (the rest of the S slots are ignored), and x's tokens follow at positions
    lengths[b] + t. An S of 0 (`MLACache.empty`) starts a sequence.

    rows: None, or int32 [B] when ckv / kpe are a whole slot cache [N, S, ...] of N sequences: row b of x then
    continues sequence rows[b] (a serving step reads its slots in place, no gathered copy).

    Paged form (`MLACache.paged`, what the serving engine reads): ckv is the whole page pool [L, num_pages,
    page_size, R + P] (k2jax.serving.page_pool: c | k_pe per token, every MLA layer), kpe None, page_table int32
    [B, max_pages] row b's physical pages in logical order (negative: none), layer an int32 scalar (this layer's
    index among the MLA layers); row b's cached tokens are its positions [0, lengths[b]). Nothing is gathered: the
    attention reads whole pages of each row a block at a time."""

    ckv: jax.Array
    kpe: jax.Array | None
    lengths: jax.Array
    rows: jax.Array | None = None
    page_table: jax.Array | None = None
    layer: jax.Array | None = None

    @classmethod
    def paged(cls, pool, page_table, lengths, layer) -> "MLACache":
        """The paged view of MLA layer `layer` (int, its index among the MLA layers) of pool [L, num_pages,
        page_size, R + P] for rows with pages page_table int [B, max_pages] and lengths int [B]."""
        return cls(pool, None, lengths, page_table=page_table, layer=jnp.asarray(layer, jnp.int32))

    @property
    def is_paged(self) -> bool:
        return self.page_table is not None

    @property
    def capacity(self) -> int:
        """Positions a row can hold (0 for the empty view of a fresh prefill)."""
        return self.page_table.shape[1] * self.ckv.shape[2] if self.is_paged else self.ckv.shape[1]

    @classmethod
    def empty(cls, batch: int, config) -> "MLACache":
        """The view of no cached tokens for `batch` rows of a layer built from `config` (prefill)."""
        dt = jnp.dtype(config.dtype)
        return cls(jnp.zeros((batch, 0, config.kv_lora_rank), dt), jnp.zeros((batch, 0, config.qk_rope_head_dim), dt),
                   jnp.zeros((batch,), jnp.int32))


class MLALatents(NamedTuple):
    """Latents of a run of tokens, as a cache stores them: ckv [B, T, R] (normed c) and kpe [B, T, P] (rotated
    when RoPE is on), compute dtype."""

    ckv: jax.Array
    kpe: jax.Array


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
        self.context_layout = c.context_layout
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

    # ---- forward ------------------------------------------------------------------------------------------------
    def _check_cache(self, cache, B: int):
        if not isinstance(cache, MLACache):
            raise ValueError(f"MultiHeadLatentAttention: cache must be an MLACache, got {type(cache).__name__}")
        if cache.is_paged:
            D = self.kv_lora_rank + self.rope_dim
            if cache.ckv.ndim != 4 or cache.ckv.shape[-1] != D or cache.kpe is not None or cache.rows is not None:
                raise ValueError(f"MultiHeadLatentAttention: a paged cache holds the pool [L, num_pages, page_size, "
                                 f"R + P = {D}] in ckv, kpe None and rows None, got ckv {cache.ckv.shape}, kpe "
                                 f"{None if cache.kpe is None else cache.kpe.shape}, rows {cache.rows}")
            if cache.page_table.ndim != 2 or cache.page_table.shape[0] != B:
                raise ValueError(f"MultiHeadLatentAttention: cache.page_table must be int [B={B}, max_pages], got "
                                 f"{list(cache.page_table.shape)}")
            if cache.lengths.shape != (B,) or not jnp.issubdtype(cache.lengths.dtype, jnp.integer):
                raise ValueError(f"MultiHeadLatentAttention: cache.lengths must be int [B={B}], got "
                                 f"{cache.lengths.dtype}{list(cache.lengths.shape)}")
            return
        S = cache.ckv.shape[1] if cache.ckv.ndim == 3 else -1
        N = B if cache.rows is None else (cache.ckv.shape[0] if cache.ckv.ndim == 3 else -1)
        if cache.ckv.shape != (N, S, self.kv_lora_rank) or cache.kpe.shape != (N, S, self.rope_dim):
            lead = f"B={B}" if cache.rows is None else "N"
            raise ValueError(f"MultiHeadLatentAttention: cache.ckv must be [{lead}, S, {self.kv_lora_rank}] and "
                             f"cache.kpe [{lead}, S, {self.rope_dim}] with the same leading dims, got "
                             f"{cache.ckv.shape} and {cache.kpe.shape}")
        if cache.rows is not None and (cache.rows.shape != (B,) or not jnp.issubdtype(cache.rows.dtype, jnp.integer)):
            raise ValueError(f"MultiHeadLatentAttention: cache.rows must be int [B={B}] or None, got "
                             f"{cache.rows.dtype}{list(cache.rows.shape)}")
        if cache.lengths.shape != (B,) or not jnp.issubdtype(cache.lengths.dtype, jnp.integer):
            raise ValueError(f"MultiHeadLatentAttention: cache.lengths must be int [B={B}], got "
                             f"{cache.lengths.dtype}{list(cache.lengths.shape)}")

    def __call__(self, x, *, positions=None, segment_ids=None, cache: MLACache | None = None,
                 return_max_logit: bool = False, cache_form: str = "auto"):
        """x [B, T, hidden] (input-layernormed) -> (y [B, T, hidden], new latents).

        segment_ids: int [B, T] (0 = padding: attends to nothing, outputs zeros) or None; positions: int [B, T]
        (RoPE only), default arange(T), or with a cache cache.lengths + arange(T). Without a cache (training)
        the new latents are None. With one (an `MLACache` view of the row's earlier tokens) x's queries also
        attend to every cached token (x continues the row's first real segment) and the new latents are x's own
        (`MLALatents` [B, T, ...]), for the caller to store at positions cache.lengths + t.
        return_max_logit (training, no cache; MuonClip): also return, last, the largest scaled attention logit per
        (row, head), float32 [B, H], from inside the attention op (then the absorbed latent path computes it).
        cache_form: how x attends to the cached tokens: "absorbed", "expanded" or "auto" (the one with fewer flops
        for x's length: absorbed for decode, expanded for long pieces at Kimi Linear's sizes); all are equal.
        """
        B, T = self._check_x(x)
        if segment_ids is not None and (segment_ids.shape != (B, T)
                                        or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
            raise ValueError(f"MultiHeadLatentAttention: segment_ids must be int [B, T] = [{B}, {T}], "
                             f"got {segment_ids.dtype}{list(segment_ids.shape)}")
        if cache is not None:
            self._check_cache(cache, B)
        if positions is None and cache is not None:
            positions = cache.lengths.astype(jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)
        positions = self._positions(positions, B, T)
        q_nope, q_pe = self.queries(x, positions)
        c, k_pe = self._latent(x, positions)
        latents = None if cache is None else MLALatents(c, k_pe.astype(self.dtype))
        if return_max_logit and cache is not None:
            raise ValueError("MultiHeadLatentAttention: return_max_logit is for training (no cache)")
        if cache is None and (context_size() > 1 or return_max_logit):
            y, max_logit = self._latent_attention(q_nope, q_pe, c, k_pe, segment_ids, return_max_logit)
            return (y, None, max_logit) if return_max_logit else (y, None)
        if cache is None and self._absorbed_is_cheaper():
            # lowered for CPU: the absorbed form; lowered from this CPU machine for TPU/GPU: the expanded one
            y = jax.lax.platform_dependent(
                cpu=lambda: self._latent_attention(q_nope, q_pe, c, k_pe, segment_ids, False)[0],
                default=lambda: self.o_proj(self._expanded(q_nope, q_pe, c, k_pe, segment_ids).reshape(B, T, -1)
                                            .astype(self.dtype)))
            return y, None
        if cache is None or cache.capacity == 0:
            o = self._expanded(q_nope, q_pe, c, k_pe, segment_ids)
        else:
            o, lse = self._expanded(q_nope, q_pe, c, k_pe, segment_ids, return_lse=True)
            o, _ = merge_attention(o, lse, *self._over_cache(q_nope, q_pe, cache, segment_ids, cache_form))
        return self.o_proj(o.reshape(B, T, -1).astype(self.dtype)), latents

    def _expanded(self, q_nope, q_pe, c, k_pe, segment_ids, return_lse=False):
        """Causal attention among x's own tokens with per-head K/V from kv_b_proj: o [B, T, H, d_v] (and its
        log-sum-exp [B, T, H] with return_lse)."""
        B, T = c.shape[:2]
        kv = self.kv_b_proj(c).reshape(B, T, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv[..., :self.nope_dim], kv[..., self.nope_dim:]
        k_pe = jnp.broadcast_to(k_pe[:, :, None, :].astype(k_nope.dtype), (B, T, self.num_heads, self.rope_dim))
        q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1)
        k = jnp.concatenate([k_nope, k_pe], axis=-1)
        return attention(q, k, v.astype(q.dtype), scale=self.scale, q_segment_ids=segment_ids, return_lse=return_lse)

    def absorbed_weights(self):
        """W_UK [H, n, R] and W_UV [H, R, d_v] (compute dtype) split from kv_b_proj (kernel [R, H*(n + d_v)]):
        the up-projections the absorbed form folds into the query and the output."""
        w = self.kv_b_proj.kernel[...].astype(self.dtype).reshape(self.kv_lora_rank, self.num_heads, -1)
        w_uk = jnp.transpose(w[..., :self.nope_dim], (1, 2, 0))
        w_uv = jnp.transpose(w[..., self.nope_dim:], (1, 0, 2))
        return w_uk, w_uv

    def _over_cache(self, q_nope, q_pe, cache: MLACache, segment_ids, form: str = "auto"):
        """x's queries over the cached latents. Cached entry s is visible to query t iff s < cache.lengths and t is
        in the row's first real segment (the one x continues). Returns o [B, T, H, d_v] and its log-sum-exp
        [B, T, H] (-inf where a query sees no cached entry). form: "absorbed" (latent space), "expanded" (cache
        decompressed a block at a time) or "auto" (the cheaper for x's length, `expanded_pays_off`)."""
        dt = self.dtype
        w_uk, w_uv = self.absorbed_weights()
        q_mask = None
        if segment_ids is not None:
            seg = segment_ids.astype(jnp.int32)
            q_mask = (seg == _first_real(seg)[:, None]) & (seg != 0)
        if form == "auto":
            form = "expanded" if expanded_pays_off(
                q_nope.shape[1], heads=self.num_heads, nope_dim=self.nope_dim, rope_dim=self.rope_dim,
                v_dim=self.v_dim, kv_lora_rank=self.kv_lora_rank) else "absorbed"
        # The paged pool is read as it is stored (the compute dtype): a cast here would copy the whole pool.
        ckv = cache.ckv if cache.is_paged else cache.ckv.astype(dt)
        kpe = None if cache.is_paged else cache.kpe.astype(dt)
        paged = dict(page_table=cache.page_table, layer=cache.layer)
        if form == "expanded":
            return decompressed_latent_attention(q_nope.astype(dt), q_pe.astype(dt), ckv, kpe, cache.lengths, w_uk,
                                                 w_uv, scale=self.scale, q_mask=q_mask, cache_rows=cache.rows,
                                                 **paged)
        if form != "absorbed":
            raise ValueError(f"MultiHeadLatentAttention: form must be 'auto', 'absorbed' or 'expanded', got {form!r}")
        # Heads lead the per-head products (a batch dim of both operands) and act as extra query rows against the
        # one shared latent key/value (multi-query): the cache is never broadcast over heads.
        q_lat = _dot("hbtn,hnr->hbtr", jnp.transpose(q_nope, (2, 0, 1, 3)), w_uk).astype(dt)
        # Serving reads the cache this way only (never differentiated): each row's work follows its own cached
        # length and its real queries, so a decode step over a slot cache costs what its live slots hold.
        o_lat, lse = latent_attention_rows(jnp.transpose(q_lat, (1, 2, 0, 3)), q_pe.astype(dt), ckv, kpe,
                                           cache.lengths, scale=self.scale, q_mask=q_mask, cache_rows=cache.rows,
                                           **paged)
        o = _dot("hbtr,hrv->hbtv", jnp.transpose(o_lat, (2, 0, 1, 3)), w_uv)  # [H, B, T, d_v]
        return jnp.transpose(o, (1, 2, 0, 3)).astype(dt), lse

    # ---- context parallelism and MuonClip's max logit (training) --------------------------------------------------
    def _absorbed_is_cheaper(self) -> bool:
        """Whether training attention (no cache) runs in the absorbed form on one context shard: a CPU path
        (k2jax.layers.linear.cpu_path "mla_absorbed"), taken when the absorbed form costs no more FLOPs, 2 R <= n + d_v.
        Per head and key the absorbed scores and values cost R + P and R, the expanded ones n + P and d_v, and the
        up-projections cost the same either way (kv_b_proj over the keys, or W_UK / W_UV over queries and outputs,
        T H R (n + d_v) each); at equal FLOPs the absorbed form reads one shared key/value head for all H query
        heads (multi-query). The default config (R = n = d_v = 32): the training step 0.94x (in-process A/B,
        docs/results.md). At Kimi Linear's sizes (R = 512, n = d_v = 128) the expanded form stays: absorbed costs
        ~3x. On TPU/GPU the expanded form keeps the kernels' expanded-only paths (Triton): the choice is a
        `jax.lax.platform_dependent`, so a program lowered here for TPU/GPU gets the expanded form."""
        return 2 * self.kv_lora_rank <= self.nope_dim + self.v_dim and cpu_path("mla_absorbed")

    def _latent_attention(self, q_nope, q_pe, c, k_pe, segment_ids, return_max_logit: bool = True):
        """Training attention through the attention op in the absorbed form (k2jax.layers.context_parallel.
        latent_attention): with the tokens split over `context` (config.context_layout), local queries against
        all-gathered latents; on one context shard, plain. [B, T, ...] -> (y [B, T, hidden], max logit f32 [B, H]
        or None without return_max_logit)."""
        if context_size() > 1:
            context_parallel.check_context_length(c.shape[1], self.context_layout)
        w_uk, w_uv = self.absorbed_weights()
        out = context_parallel.latent_attention(q_nope, q_pe, c, k_pe, segment_ids, w_uk, w_uv, scale=self.scale,
                                                layout=self.context_layout, return_max_logit=return_max_logit)
        o, max_logit = out if return_max_logit else (out, None)
        return self.o_proj(o), max_logit


def _first_real(seg):
    """The first nonzero id of each row of seg int [B, T] (0 for an all-padding row): the segment a cache
    continues."""
    idx = jnp.argmax(seg != 0, axis=1)
    return jnp.take_along_axis(seg, idx[:, None], axis=1)[:, 0]

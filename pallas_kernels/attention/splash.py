"""TPU attention through JAX's own Pallas splash attention kernel (jax.experimental.pallas.ops.tpu.splash_attention).

Splash takes per-batch-row [heads, T, D] inputs, a static mask (causal with a static offset, or full) whose
all-masked blocks it skips, and dynamic segment ids (q and kv apart). It accepts a value head dim that differs from
the key's (MLA's 192 / 128, or 576 / 512 absorbed), multi-query keys (Hkv == 1, MLA's absorbed form) and grouped
heads, and has its own forward and backward kernels (custom VJP). What this wrapper adds:
- the scale, folded into q (splash has none);
- T and S padded up to whole kernel blocks, the padding in segment 0 so no real query sees it;
- our padding rule: splash only compares ids, so queries that see no key (segment 0, or a segment absent from the
  keys at or before them) would get an average of masked values; they are set to 0 (`rows_with_keys`).
Not covered (callers fall back to `attention_blocked`): a q_offset that is traced, differs per batch row or is
negative, since splash's causal offset is part of its static mask (a negative one would leave whole query blocks
with no key); and max_logit, which splash does not report (the dispatch
computes it with `attention_max_logit` beside the kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from pallas_kernels.attention.checks import check_attention_inputs, check_block, rows_with_keys, segments_or_ones

LANES = 128  # splash's blocks are multiples of the TPU lane width
DEFAULT_BLOCK = 512


def attention_splash(q, k, v, *, scale=None, causal=True, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
                     block=DEFAULT_BLOCK, interpret=None):
    """Splash attention with the semantics, shapes and return of `attention_reference` (without max_logit).

    q: [B, T, H, Dk]; k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv]; q_segment_ids int [B, T], kv_segment_ids int [B, S]
    (0 = padding); q_offset: a Python int >= 0 (a static causal offset). block: kernel block size for queries and keys,
    a multiple of 128, capped at T and S rounded up to 128.
    interpret: None = the compiled kernel when lowered for TPU, interpreted elsewhere (a CPU correctness check);
    True = always interpreted; False = always compiled. Returns o [B, T, H, Dv] in v's dtype.
    """
    shape, kv_segment_ids, q_offset_rows, scale = check_attention_inputs(
        q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale, op="attention_splash")
    if shape.static_offset is None or shape.static_offset < 0:
        raise ValueError(f"attention_splash: q_offset must be a Python int >= 0 (splash's causal offset is part of "
                         f"its static mask), got {q_offset!r}; use attention_blocked for a traced, per-row or "
                         f"negative offset")
    if interpret not in (None, True, False):
        raise ValueError(f"attention_splash: interpret must be None, True or False, got {interpret!r}")
    block = check_block(block, "block", op="attention_splash", multiple=LANES)
    B, T, S, H, Hkv = shape.B, shape.T, shape.S, shape.H, shape.Hkv
    bq, bkv = min(block, _round_up(T, LANES)), min(block, _round_up(S, LANES))
    Tp, Sp = _round_up(T, bq), _round_up(S, bkv)
    mqa = Hkv == 1
    make = functools.partial(_splash_kernel, H=H, Tp=Tp, Sp=Sp, bq=bq, bkv=bkv, causal=bool(causal),
                             offset=shape.static_offset, mqa=mqa)

    dtype = q.dtype
    qh = jnp.swapaxes(_pad_time(q * jnp.asarray(scale, dtype), Tp), 1, 2)  # [B, H, Tp, Dk]
    kh = jnp.swapaxes(_pad_time(k.astype(dtype), Sp), 1, 2)  # [B, Hkv, Sp, Dk]
    vh = jnp.swapaxes(_pad_time(v.astype(dtype), Sp), 1, 2)
    if mqa:
        kh, vh = kh[:, 0], vh[:, 0]
    padded = Tp > T or Sp > S
    q_seg = kv_seg = None
    if q_segment_ids is not None or padded:
        q_seg = _pad_time(segments_or_ones(q_segment_ids, B, T), Tp)
        kv_seg = _pad_time(segments_or_ones(kv_segment_ids, B, S), Sp)

    def run(interpret, qh, kh, vh, q_seg, kv_seg):
        kernel = make(interpret=interpret)
        if q_seg is None:
            return jax.vmap(kernel)(qh, kh, vh)
        return jax.vmap(lambda a, b, c, sq, skv: kernel(a, b, c, segment_ids=splash_kernel.SegmentIds(sq, skv)))(
            qh, kh, vh, q_seg, kv_seg)

    args = (qh, kh, vh, q_seg, kv_seg)
    if interpret is not None:
        o = run(interpret, *args)
    else:
        o = jax.lax.platform_dependent(*args, tpu=functools.partial(run, False),
                                       default=functools.partial(run, True))
    o = jnp.swapaxes(o, 1, 2)[:, :T].astype(v.dtype)  # [B, T, H, Dv]
    if q_segment_ids is not None:
        seen = rows_with_keys(segments_or_ones(q_segment_ids, B, T), segments_or_ones(kv_segment_ids, B, S),
                              q_offset_rows, causal)
        o = jnp.where(seen[:, :, None, None], o, jnp.zeros((), o.dtype))
    return o


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_time(x, n):
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _splash_kernel(*, H, Tp, Sp, bq, bkv, causal, offset, mqa, interpret):
    """The splash kernel object (its block-sparsity tables are built here, at trace time, from the static mask)."""
    one = splash_mask.CausalMask((Tp, Sp), offset=offset) if causal else splash_mask.FullMask((Tp, Sp))
    sizes = splash_kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                     block_kv_dkv=bkv, block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
    make = splash_kernel.make_splash_mqa_single_device if mqa else splash_kernel.make_splash_mha_single_device
    return make(splash_mask.MultiHeadMask([one] * H), block_sizes=sizes, interpret=interpret)

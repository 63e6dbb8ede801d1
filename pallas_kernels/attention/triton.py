"""GPU attention through JAX's own Pallas Triton flash attention (jax.experimental.pallas.ops.gpu.attention.mha).

Why this kernel: it is the one GPU attention kernel that lowers for cuda from a CPU machine on both supported JAX
versions (0.10 and 0.12) with causal masking, segment ids and a Triton backward. `jax.nn.dot_product_attention`
with implementation="cudnn" needs cuDNN at trace time ("cuDNN is not detected" on CPU) and has no segment ids
short of a dense [T, S] mask; Pallas Mosaic GPU attention has no causal backward; tokamax's public
`dot_product_attention` has no segment ids either (a dense mask only). JAX 0.11+ marks this module deprecated in
favour of tokamax; the import below silences that one warning. It is the same kernel family the KDA GPU path uses.

What the kernel needs, and what this wrapper does about it:
- equal head dims for q, k and v: v is zero-padded from Dv to Dk (as Hugging Face does for MLA on FlashAttention-2)
  and the output sliced back;
- T a multiple of its blocks: T is padded with segment-0 rows and keys;
- one segment-id array shared by queries and keys: only self-attention with the same ids for both;
- equal head counts for q and k (no grouped or multi-query heads);
- causal by index: q_offset must be 0 when causal.
Not covered (the dispatch falls back to `attention_blocked`): Hkv != H (MLA's absorbed form), S != T, different
q/kv segment ids, a nonzero or traced q_offset with causal masking, and max_logit (computed beside the kernel).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from pallas_kernels.attention.checks import check_attention_inputs, check_block, segments_or_ones

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*pallas.ops.gpu.attention is deprecated", category=DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

DEFAULT_BLOCK = 64  # forward q and k blocks; the head dim is padded to a power of two (192 -> 256) inside
BACKWARD_BLOCK = 32


def triton_supports(shape, *, causal: bool, same_segments: bool) -> bool:
    """Whether `attention_triton` covers a call of this AttentionShape (see the module docstring)."""
    return (shape.Hkv == shape.H and shape.S == shape.T and same_segments
            and (not causal or shape.static_offset == 0))


def attention_triton(q, k, v, *, scale=None, causal=True, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
                     block=DEFAULT_BLOCK, interpret=None):
    """Triton flash attention with the semantics, shapes and return of `attention_reference` (without max_logit).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv] (self-attention: S == T, Hkv == H); q_segment_ids int [B, T] (0 = padding;
    kv_segment_ids None or the same array); q_offset 0 when causal. block: forward block size (a multiple of 32).
    interpret: None = the compiled kernel when lowered for cuda, interpreted elsewhere (a CPU correctness check);
    True = always interpreted; False = always compiled. Returns o [B, T, H, Dv] in v's dtype.
    """
    shape, kv_segment_ids, _, scale = check_attention_inputs(
        q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale, op="attention_triton")
    if not triton_supports(shape, causal=causal, same_segments=kv_segment_ids is q_segment_ids):
        raise ValueError(
            f"attention_triton: needs self-attention with equal head counts (got T={shape.T}, S={shape.S}, "
            f"H={shape.H}, Hkv={shape.Hkv}), one segment-id array for q and kv, and q_offset 0 when causal (got "
            f"{q_offset!r}); use attention_blocked")
    if interpret not in (None, True, False):
        raise ValueError(f"attention_triton: interpret must be None, True or False, got {interpret!r}")
    block = check_block(block, "block", op="attention_triton", multiple=BACKWARD_BLOCK)
    B, T, Dk, Dv = shape.B, shape.T, shape.Dk, shape.Dv
    Tp = -(-T // block) * block
    pad = lambda x, d: jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0), (0, d - x.shape[3])])  # noqa: E731
    dtype = q.dtype
    qp, kp, vp = pad(q, Dk), pad(k.astype(dtype), Dk), pad(v.astype(dtype), Dk)
    seg = None
    if q_segment_ids is not None or Tp > T:
        seg = jnp.pad(segments_or_ones(q_segment_ids, B, T), [(0, 0), (0, Tp - T)])
    sizes = triton_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=BACKWARD_BLOCK,
                                        block_kv_dkv=BACKWARD_BLOCK, block_q_dq=BACKWARD_BLOCK,
                                        block_kv_dq=BACKWARD_BLOCK)

    def run(interpret, qp, kp, vp, seg):
        return triton_attention.mha(qp, kp, vp, seg, sm_scale=float(scale), causal=bool(causal), block_sizes=sizes,
                                    interpret=interpret)

    args = (qp, kp, vp, seg)
    if interpret is not None:
        o = run(interpret, *args)
    else:
        o = jax.lax.platform_dependent(*args, cuda=functools.partial(run, False),
                                       default=functools.partial(run, True))
    o = o[:, :T, :, :Dv].astype(v.dtype)
    if q_segment_ids is not None:  # padding queries see padding keys inside the kernel; ours output 0
        o = jnp.where((q_segment_ids != 0)[:, :, None, None], o, jnp.zeros((), o.dtype))
    return o

"""`attention`: one signature over the attention implementations, chosen per platform at lowering time.

impl="auto" lowers, with `jax.lax.platform_dependent` (never `jax.default_backend()`, so one jitted function lowers
for any platform):
- TPU: splash attention (`attention_splash`), unless q_offset is traced, per-row or negative;
- cuda: Pallas Triton flash attention (`attention_triton`) for expanded self-attention (Hkv == H, S == T, one
  segment-id array, q_offset 0 when causal); MLA's absorbed form (Hkv == 1) and cache continuation use the XLA form;
- everything else (CPU, and what a kernel lacks): the blocked XLA form (`attention_blocked`).
With return_max_logit, the kernel branches compute max_logit with `attention_max_logit` (one extra pass of q k^T
blocks, no softmax, no gradient), the XLA branch inside its own loop. With return_lse (the log-sum-exp that
merges partial attentions) every platform runs the XLA form: the kernels do not report it.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.attention.blocked import attention_blocked, attention_max_logit
from pallas_kernels.attention.checks import check_attention_inputs
from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.attention.splash import attention_splash
from pallas_kernels.attention.triton import attention_triton, triton_supports

IMPLS = ("auto", "xla", "reference", "splash", "triton")


def attention(q, k, v, *, scale=None, causal=True, q_segment_ids=None, kv_segment_ids=None, q_offset=0, impl="auto",
              block_q=None, block_k=None, return_max_logit=False, return_lse=False):
    """Softmax attention with causal masking by absolute position, packed segments and multi-query heads.

    q: [B, T, H, Dk]; k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv] with Hkv dividing H (Hkv == H: MLA's expanded form,
    Dk = 192, Dv = 128; Hkv == 1: the absorbed form, q and k in the latent + RoPE space, Dk = 576, Dv = 512).
    scale: default Dk ** -0.5. causal: query t sees keys s <= q_offset + t. q_offset: int or int [B], the absolute
    position of q's first token among the keys (a chunk of queries continuing a cache). q_segment_ids int [B, T],
    kv_segment_ids int [B, S] (None: the same as q's, needs S == T): a query sees only keys of its own segment, id 0
    is padding (never seen; padding queries output 0).
    impl: "auto" (see the module docstring), "xla" (`attention_blocked`), "reference" (materialises [T, S]),
    "splash" / "triton" (the kernels; interpreted off TPU / GPU). block_q, block_k: the XLA form's blocks (None:
    `default_blocks`, by the batch, heads and lengths).
    Returns o [B, T, H, Dv] in v's dtype (softmax in float32; rows that see no key give 0), and with
    return_max_logit also max_logit float32 [B, H]: the largest scaled logit over visible pairs (-inf where none),
    which carries no gradient, and with return_lse lse float32 [B, T, H]: each query's log-sum-exp of its visible
    scaled logits (-inf where none), differentiable (impl "auto" then runs the XLA form; "splash" and "triton"
    cannot report it).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention: impl must be one of {IMPLS}, got {impl!r}")
    masking = dict(scale=scale, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    blocks = dict(block_q=block_q, block_k=block_k)
    returns = dict(return_max_logit=return_max_logit, return_lse=return_lse)
    if impl == "reference":
        return attention_reference(q, k, v, q_offset=q_offset, **returns, **masking)
    if impl == "xla" or (impl == "auto" and return_lse):
        return attention_blocked(q, k, v, q_offset=q_offset, **returns, **masking, **blocks)
    if return_lse:
        raise ValueError(f"attention: impl={impl!r} cannot return the log-sum-exp; use 'auto' or 'xla'")
    if impl in ("splash", "triton"):
        kernel = attention_splash if impl == "splash" else attention_triton
        o = kernel(q, k, v, q_offset=q_offset, **masking)
        if not return_max_logit:
            return o
        return o, attention_max_logit(q, k, q_offset=q_offset, **masking, **blocks)

    shape, kv_ids, _, _ = check_attention_inputs(q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale,
                                                 op="attention")
    static_offset = shape.static_offset  # the kernels need q_offset as a Python int
    same_ids = kv_ids is q_segment_ids  # also when both are None
    use_splash = static_offset is not None and static_offset >= 0
    use_triton = triton_supports(shape, causal=causal, same_segments=same_ids)

    def xla(q, k, v, q_seg, kv_seg, offset):
        offset = static_offset if offset is None else offset
        return attention_blocked(q, k, v, scale=scale, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                 q_offset=offset, return_max_logit=return_max_logit, **blocks)

    def kernel_branch(kernel, q, k, v, q_seg, kv_seg, offset):
        ids = dict(scale=scale, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=static_offset)
        o = kernel(q, k, v, interpret=False, **ids)
        return (o, attention_max_logit(q, k, **ids, **blocks)) if return_max_logit else o

    # platform_dependent traces every branch with the same operands. kv ids travel as None when they are q's (the
    # Triton kernel takes one array), the offset as None when it is static.
    args = (q, k, v, q_segment_ids, None if same_ids else kv_ids, q_offset if static_offset is None else None)
    if not (use_splash or use_triton):
        return xla(*args)
    branches = {"default": xla}
    if use_splash:
        branches["tpu"] = functools.partial(kernel_branch, attention_splash)
    if use_triton:
        branches["cuda"] = functools.partial(kernel_branch, attention_triton)
    return jax.lax.platform_dependent(*args, **branches)

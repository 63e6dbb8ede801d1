"""Softmax attention for MLA (expanded and absorbed forms) in O(T) memory, each implementation beside the reference
it is tested against. Layout [B, T, heads, D] (q [B, T, H, Dk], k [B, S, Hkv, Dk], v [B, S, Hkv, Dv]).

- `attention_reference`: plain softmax attention, materialises [T, S]; ground truth.
- `attention_blocked`: flash attention in XLA (online softmax over key blocks, custom_vjp recomputing blocks),
  any backend; `attention_max_logit`: its max-logit pass alone; `visited_blocks`: which block pairs it computes.
- `attention_splash`: JAX's Pallas TPU splash attention kernel; `attention_triton`: JAX's Pallas Triton (GPU) flash
  attention kernel (both interpreted on CPU).
- `attention`: dispatch (`impl="auto"`: splash on TPU, Triton on GPU where it fits, the XLA form elsewhere).
- `latent_attention`: MLA's absorbed form over a latent cache (queries of new tokens against cached c / k_pe, read
  in blocks in the cache's own layout), `latent_attention_rows`: the same for serving, each row reading its own
  sequence of a slot cache up to its own length (work follows the live tokens), `decompressed_latent_attention`:
  the same over the cache in the expanded form (blocks of the cache up-projected to per-head K/V: fewer flops for a
  long piece of queries; `expanded_pays_off` says when), and `merge_attention`, which joins two partial attentions
  by their log-sum-exp.
"""

from pallas_kernels.attention.blocked import attention_blocked, attention_max_logit, visited_blocks
from pallas_kernels.attention.dispatch import IMPLS, attention
from pallas_kernels.attention.latent import (
    decompressed_latent_attention,
    expanded_pays_off,
    latent_attention,
    latent_attention_rows,
    merge_attention,
)
from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.attention.splash import attention_splash
from pallas_kernels.attention.triton import attention_triton

__all__ = ["IMPLS", "attention", "attention_blocked", "attention_max_logit", "attention_reference",
           "attention_splash", "attention_triton", "decompressed_latent_attention", "expanded_pays_off",
           "latent_attention", "latent_attention_rows", "merge_attention", "visited_blocks"]

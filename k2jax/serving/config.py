"""`ServeConfig`: the engine and HTTP settings of serve.py, declared in k2jax.config's system (constraints next to
each field); the per-client limits are its `limits` (k2jax.serving.limits.ServerLimits)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from k2jax.config import Allowed, Config, NonEmptyStr, NonNegativeNumber, PositiveInt
from k2jax.serving.limits import ServerLimits


class ServeConfig(Config):
    """How serve.py runs a model: engine size, parallelism, HTTP address and client limits (not the model itself,
    which is a ModelConfig, nor a request's sampling settings)."""

    section = "serve"

    slots: PositiveInt = 8  # concurrent sequences (the decode batch)
    max_len: PositiveInt | None = None  # context per sequence (prompt + generated); None: the engine's default
    min_bucket: PositiveInt = 16  # smallest prompt-length bucket
    # Tokens one prefill call takes (rows x length bucket): a longer prompt is prefilled in pieces of at most this
    # many (the largest length bucket within it), one piece per engine step, so decoding slots keep going.
    max_prefill_tokens: PositiveInt = 8192
    # Device memory (GiB) of the paged MLA latent pool the live sequences use (pages of prefix_page_size tokens);
    # None: slots x max_len tokens (every slot full at once). Less lets memory follow the tokens in use: a slot that
    # grows into a full pool preempts the most recently admitted request, which is recomputed later, exactly.
    kv_cache_gb: NonNegativeNumber | None = None
    # Device memory (GiB) of the prefix cache (k2jax.serving.prefix_store) beyond the live sequences: requests
    # resume from cached prefixes (MLA latent pages shared with the sequences, KDA state snapshots) and prefill only
    # the rest; 0 = off.
    prefix_cache_gb: NonNegativeNumber = 1.0
    prefix_page_size: PositiveInt = 16
    # A prompt's prefill also stops to cache its prefix every this many tokens (long shared system prompts).
    snapshot_every: PositiveInt = 1024
    warmup: bool = True  # compile every length bucket up front (else lazily, on first use)
    int4_experts: bool = False  # serve the routed experts from INT4 weights
    tensor_parallel: PositiveInt = 1  # devices on the 'tensor' mesh axis
    expert_parallel: PositiveInt = 1  # devices on the 'expert' mesh axis
    host: NonEmptyStr = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535), Allowed("a port number in [0, 65535]")] = 8000
    limits: ServerLimits = Field(default_factory=ServerLimits)

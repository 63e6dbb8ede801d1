"""`ServerLimits`: what one client may ask of the HTTP endpoint (k2jax.serving.server), declared in k2jax.config's
system. Its own module, free of the web stack, so that serve.py can show the defaults without the `serve` extra
installed."""

from __future__ import annotations

from k2jax.config import Config, NonNegativeInt, PositiveInt, PositiveNumber


class ServerLimits(Config):
    """What one client may ask of the endpoint.

    max_body_bytes: larger request bodies get 413 before they are parsed; max_waiting: requests queued for a slot
    (beyond the busy slots) after which new ones get 429 with `Retry-After: retry_after_s`; request_timeout_s: a
    request not finished by then is aborted and answered 504 (a stream ends with an error event);
    default_max_tokens: a chat request that names no max_tokens generates at most this many tokens, fewer if the
    prompt leaves less room in the context (completions default to 16 tokens, as OpenAI's, cut the same way).
    Mutable: the server reads the object per request, and an assignment is validated (ConfigError) like a field
    given to the constructor.
    """

    model_config = {"frozen": False, "validate_assignment": True}
    section = "limits"

    max_body_bytes: PositiveInt = 4 * 2 ** 20
    max_waiting: NonNegativeInt = 64
    request_timeout_s: PositiveNumber = 600.0
    default_max_tokens: PositiveInt = 512
    retry_after_s: NonNegativeInt = 1

    def validate(self) -> None:
        """ConfigError (a ValueError) naming the first invalid limit; every field is validated when it is set, so
        this only re-checks."""
        type(self)(**self.field_values())

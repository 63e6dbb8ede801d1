"""`ServerLimits`: what one client may ask of the HTTP endpoint (k2jax.serving.server). Its own module, free of the web
stack, so that serve.py can show the defaults without the `serve` extra installed."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ServerLimits:
    """What one client may ask of the endpoint.

    max_body_bytes: larger request bodies get 413 before they are parsed; max_waiting: requests queued for a slot
    (beyond the busy slots) after which new ones get 429 with `Retry-After: retry_after_s`; request_timeout_s: a
    request not finished by then is aborted and answered 504 (a stream ends with an error event);
    default_max_tokens: a chat request that names no max_tokens generates at most this many tokens, fewer if the
    prompt leaves less room in the context (completions default to 16 tokens, as OpenAI's, cut the same way).
    """

    max_body_bytes: int = 4 * 2 ** 20
    max_waiting: int = 64
    request_timeout_s: float = 600.0
    default_max_tokens: int = 512
    retry_after_s: int = 1

    def validate(self) -> None:
        """ValueError naming the first invalid limit."""
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name, ok, allowed in (
                ("max_body_bytes", is_int(self.max_body_bytes) and self.max_body_bytes >= 1, "an integer >= 1"),
                ("max_waiting", is_int(self.max_waiting) and self.max_waiting >= 0, "an integer >= 0"),
                ("request_timeout_s", isinstance(self.request_timeout_s, (int, float)) and self.request_timeout_s > 0,
                 "a number > 0"),
                ("default_max_tokens", is_int(self.default_max_tokens) and self.default_max_tokens >= 1,
                 "an integer >= 1"),
                ("retry_after_s", is_int(self.retry_after_s) and self.retry_after_s >= 0, "an integer >= 0")):
            if not ok:
                raise ValueError(f"ServerLimits.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

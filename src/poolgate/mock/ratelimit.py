"""Per-key, per-minute windows for requests and tokens, reported as `anthropic-ratelimit-*` headers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from poolgate.mock.config import MockKey

WINDOW_SECONDS = 60.0


@dataclass(slots=True)
class Window:
    started: float = 0.0
    started_wall: float = 0.0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def roll(self, now: float) -> None:
        if now - self.started >= WINDOW_SECONDS:
            self.started, self.started_wall = now, time.time()
            self.requests = self.input_tokens = self.output_tokens = 0

    def retry_after(self, now: float) -> float:
        return max(0.0, self.started + WINDOW_SECONDS - now)

    def exhausted(self, limits: MockKey) -> bool:
        return (
            self.requests >= limits.requests_per_minute
            or self.input_tokens + self.output_tokens >= limits.tokens_per_minute
            or self.input_tokens >= limits.input_tokens_per_minute
            or self.output_tokens >= limits.output_tokens_per_minute
        )

    def too_long(self, limits: MockKey, input_tokens: int) -> str | None:
        """The 429's message for a request whose `input_tokens` (those a limit counts: cache reads are not) do not
        fit in what is left of the minute's input-token or token window, as the API refuses one before it runs;
        None when they fit."""
        for per_minute, used, what in (
            (limits.input_tokens_per_minute, self.input_tokens, "input tokens"),
            (limits.tokens_per_minute, self.input_tokens + self.output_tokens, "tokens"),
        ):
            if used + input_tokens > per_minute:
                return (
                    f"This request would exceed the rate limit of {per_minute:,} {what} per minute. Please reduce the "
                    "prompt length or the maximum tokens requested, or try again later."
                )
        return None

    def headers(self, limits: MockKey) -> dict[str, str]:
        reset = datetime.fromtimestamp(self.started_wall + WINDOW_SECONDS, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        tokens = self.input_tokens + self.output_tokens
        rows = (
            ("requests", limits.requests_per_minute, self.requests),
            ("tokens", limits.tokens_per_minute, tokens),
            ("input-tokens", limits.input_tokens_per_minute, self.input_tokens),
            ("output-tokens", limits.output_tokens_per_minute, self.output_tokens),
        )
        headers = {}
        for kind, limit, used in rows:
            headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{kind}-remaining"] = str(max(0, limit - used))
            headers[f"anthropic-ratelimit-{kind}-reset"] = reset
        return headers

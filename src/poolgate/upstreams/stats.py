"""Per-upstream running statistics: time to first byte and error rate (the router scores on them), and the
whole answer's latency (for operators: a JSON answer's time to first byte is nearly all of it, a stream's is
not).

All are exponentially weighted. The error rate also fades with time (half-life `ERROR_HALF_LIFE`): an
account that failed once and was then passed over gets no traffic to prove itself with, so time alone
must clear its record, and soon: at the default weights one failure puts an account behind the others for
two half-lives. (With 30 s, one stray 529 or reset took an account out of rotation for a minute, and a
pool-wide blip of a few seconds left all traffic on one account for two.) An account failing often enough
to matter fails again before its record fades.

So does what routing makes of a slow time to first byte (`latency_weight`, half-life `LATENCY_HALF_LIFE`):
a JSON answer's first byte comes when it is complete, so one long answer (1.5 s among answers of a
millisecond) put its account behind the others, which then sent it nothing to measure again: it was out of
a round-robin for good.
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight of the newest sample: ~10 recent requests dominate, old behaviour fades within a few dozen.
ALPHA = 0.2
ERROR_HALF_LIFE = 5.0
LATENCY_HALF_LIFE = 10.0


@dataclass(slots=True)
class UpstreamStats:
    ttfb_ms: float | None = None
    # Request sent → answer complete.
    latency_ms: float | None = None
    # Input tokens per request as token rate limits count them (uncached input and cache writes: the API's
    # input-token limits leave cache reads out): what a request in flight whose prompt was not analysed is
    # taken to count (see `UpstreamState.counted_tokens`).
    counted_input_tokens: float | None = None
    # Requests sent to it, each once whatever came of it (`UpstreamState.request_sent`): counted as answered and
    # again as failed, an answer whose body then broke was two.
    requests: int = 0
    _error_rate: float = 0.0
    _error_at: float = 0.0
    _ttfb_at: float = 0.0

    def error_rate(self, now: float) -> float:
        if not self._error_rate:
            return 0.0
        return self._error_rate * 0.5 ** (max(0.0, now - self._error_at) / ERROR_HALF_LIFE)

    def latency_weight(self, now: float) -> float:
        """How much of its time to first byte above the fastest account's still counts against it: all of it
        when just measured, half after `LATENCY_HALF_LIFE` without a new answer."""
        since = now - self._ttfb_at
        # Not `max()`, a call of ~1,400 instructions (CPython 3.11): routing asks for every candidate.
        return 0.5 ** ((since if since > 0.0 else 0.0) / LATENCY_HALF_LIFE)

    def answered(self, ttfb_ms: float, now: float) -> None:
        self.ttfb_ms = ttfb_ms if self.ttfb_ms is None else self.ttfb_ms + ALPHA * (ttfb_ms - self.ttfb_ms)
        self._ttfb_at = now
        if self._error_rate:
            self._error_rate, self._error_at = self.error_rate(now) * (1 - ALPHA), now

    def completed(self, latency_ms: float) -> None:
        """An answered request's whole answer has arrived."""
        previous = self.latency_ms
        self.latency_ms = latency_ms if previous is None else previous + ALPHA * (latency_ms - previous)

    def failed(self, now: float) -> None:
        rate = self.error_rate(now)
        self._error_rate, self._error_at = rate + ALPHA * (1.0 - rate), now

    def counted_input(self, tokens: int) -> None:
        if tokens > 0:
            previous = self.counted_input_tokens
            self.counted_input_tokens = tokens if previous is None else previous + ALPHA * (tokens - previous)

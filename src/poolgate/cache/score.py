"""What sending a request to a candidate would cost in prompt tokens, given that candidate's warm cache.

Costs are in *input-token equivalents* (one uncached input token = 1.0), so they compare across
candidates of the same request without knowing the model's price: a cache write costs 1.25 (5-minute
TTL) or 2 (1-hour TTL), a read 0.1.
"""

from __future__ import annotations

import msgspec

from poolgate.cache.breakpoints import PromptPrefix, TtlClass
from poolgate.cache.warmth import CacheHit

WRITE_MULTIPLIER: dict[TtlClass, float] = {"5m": 1.25, "1h": 2.0}
READ_MULTIPLIER = 0.1
# How far a pending (unconfirmed) entry is trusted: the request before may still turn out uncached.
PENDING_CONFIDENCE = 0.6


class CacheScore(msgspec.Struct, frozen=True, gc=False):
    """The predicted split of one request's prompt on one candidate, and how sure the prediction is.
    (A Struct: the router makes one per scored candidate of every request, and a routing trace writes it
    as it is, under the short names.)"""

    read_tokens: int = msgspec.field(name="read")
    write_tokens: int = msgspec.field(name="write")
    uncached_tokens: int = msgspec.field(name="uncached")
    confidence: float
    # Input-token equivalents, confidence-weighted against a cold cache.
    expected_cost: float = msgspec.field(name="cost")


def _write_multiplier(prefix: PromptPrefix) -> float:
    """Explicit markers make Anthropic write (at a premium); inferred breakpoints stand for providers that
    cache prefixes by themselves, at no extra charge."""
    last = prefix.breakpoints[-1] if prefix.breakpoints else None
    return WRITE_MULTIPLIER[last.ttl] if last is not None and last.explicit else 1.0


class PromptCosts(msgspec.Struct, frozen=True, gc=False):
    """One request's cache facts that do not depend on the candidate, worked out once per request."""

    cacheable: int
    uncached: int
    write_multiplier: float
    cold: float  # the cost where nothing is warm: the cacheable part is written, the rest is plain input

    @classmethod
    def of(cls, prefix: PromptPrefix) -> PromptCosts:
        cacheable = prefix.cacheable_tokens
        uncached = max(0, prefix.prompt_tokens - cacheable)
        multiplier = _write_multiplier(prefix)
        return cls(cacheable, uncached, multiplier, cacheable * multiplier + prefix.prompt_tokens - cacheable)

    def score(self, hit: CacheHit | None) -> CacheScore:
        """The request's cache score on a candidate where `hit` is the longest warm prefix (None: nothing)."""
        cacheable, cold = self.cacheable, self.cold
        if hit is None:
            return CacheScore(0, cacheable, self.uncached, 1.0, cold)
        read = min(hit.tokens, cacheable)
        write = cacheable - read
        warm = read * READ_MULTIPLIER + write * self.write_multiplier + self.uncached
        confidence = 1.0 if hit.confirmed else PENDING_CONFIDENCE
        return CacheScore(read, write, self.uncached, confidence, confidence * warm + (1 - confidence) * cold)

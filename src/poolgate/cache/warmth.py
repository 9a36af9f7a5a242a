"""Which prompt prefixes are warm in which upstream account's cache, learned from what it answered.

The upstream never says what it holds; it only reports, per response, how many prompt tokens it wrote to
and read from its cache. That is enough: tokens written or read mean the request's breakpoints are now
cached there (for their TTL, refreshed by every read); neither means nothing was cached (prefix under the
model's minimum, or no markers). While a request is in flight its prefix counts as *pending* on the
account it went to, so that a burst of requests sharing a prefix (subagents, parallel tool calls) follows
the first one instead of writing the same prefix everywhere.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from poolgate.cache.breakpoints import CacheBreakpoint, PromptPrefix, TtlClass

TTL_SECONDS: dict[TtlClass, float] = {"5m": 300.0, "1h": 3600.0}
# How long an unconfirmed (in-flight) entry may stand in for a confirmed one.
PENDING_SECONDS = 60.0


@dataclass(slots=True)
class WarmCacheEntry:
    prefix_hash: bytes
    ttl: TtlClass
    tokens: int
    expires_at: float  # monotonic
    confirmed: bool


@dataclass(frozen=True, slots=True)
class CacheHit:
    """The longest warm prefix a request would read: its hash, size and whether it is confirmed."""

    prefix_hash: bytes
    tokens: int
    confirmed: bool


class WarmCache:
    """One upstream's warm prefixes: prefix hash → entry, least recently used dropped past the cap."""

    __slots__ = ("_cap", "_entries")

    def __init__(self, cap: int = 10_000) -> None:
        self._cap = cap
        self._entries: OrderedDict[bytes, WarmCacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prefix: PromptPrefix, now: float) -> CacheHit | None:
        """As the upstream does it: from the last breakpoint back, the first boundary holding an entry.

        O(breakpoints × look-back) dictionary probes; nothing is modified (a lookup is not a use).
        """
        entries = self._entries
        for breakpoint in reversed(prefix.breakpoints):
            for prefix_hash, tokens in breakpoint.lookback:
                entry = entries.get(prefix_hash)
                if entry is not None and entry.expires_at > now:
                    return CacheHit(prefix_hash, tokens, entry.confirmed)
        return None

    def sent(self, prefix: PromptPrefix, now: float) -> None:
        """A request went to this upstream: its breakpoints are pending until the answer says more."""
        for breakpoint in prefix.breakpoints:
            entry = self._entries.get(breakpoint.prefix_hash)
            if entry is None or entry.expires_at <= now:
                self._put(breakpoint, now + PENDING_SECONDS, confirmed=False)

    def answered(self, prefix: PromptPrefix, cache_write_tokens: int, cache_read_tokens: int, now: float) -> None:
        """The upstream's usage for a request sent here: confirm what it cached, forget what it did not."""
        if cache_write_tokens == 0 and cache_read_tokens == 0:
            for breakpoint in prefix.breakpoints:
                entry = self._entries.get(breakpoint.prefix_hash)
                if entry is not None and not entry.confirmed:
                    del self._entries[breakpoint.prefix_hash]
            return
        if cache_read_tokens:
            # The entry that was read had its TTL refreshed upstream.
            hit = self.lookup(prefix, now)
            if hit is not None:
                entry = self._entries[hit.prefix_hash]
                entry.expires_at = now + TTL_SECONDS[entry.ttl]
                entry.confirmed = True
                self._entries.move_to_end(hit.prefix_hash)
        for breakpoint in prefix.breakpoints:
            self._put(breakpoint, now + TTL_SECONDS[breakpoint.ttl], confirmed=True)

    def forget(self) -> None:
        self._entries.clear()

    def entries(self) -> list[WarmCacheEntry]:
        return list(self._entries.values())

    def _put(self, breakpoint: CacheBreakpoint, expires_at: float, confirmed: bool) -> None:
        self._entries[breakpoint.prefix_hash] = WarmCacheEntry(
            breakpoint.prefix_hash, breakpoint.ttl, breakpoint.prefix_token_count, expires_at, confirmed
        )
        self._entries.move_to_end(breakpoint.prefix_hash)
        while len(self._entries) > self._cap:
            self._entries.popitem(last=False)

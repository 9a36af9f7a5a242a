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

import msgspec

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


class CacheHit(msgspec.Struct, frozen=True, gc=False):
    """The longest warm prefix a request would read: its hash, size and whether it is confirmed."""

    prefix_hash: bytes
    tokens: int
    confirmed: bool


class WarmIndex:
    """Pool-wide: prefix hash → the accounts holding it, kept in step by every account's `WarmCache`, so
    the warm accounts of a request are found with one walk of its breakpoints, not one walk per account."""

    __slots__ = ("_holders",)

    def __init__(self) -> None:
        self._holders: dict[bytes, dict[str, WarmCacheEntry]] = {}

    def add(self, upstream_id: str, entry: WarmCacheEntry) -> None:
        holders = self._holders.get(entry.prefix_hash)
        if holders is None:
            self._holders[entry.prefix_hash] = {upstream_id: entry}
        else:
            holders[upstream_id] = entry

    def remove(self, upstream_id: str, prefix_hash: bytes) -> None:
        holders = self._holders.get(prefix_hash)
        if holders is not None:
            holders.pop(upstream_id, None)
            if not holders:
                del self._holders[prefix_hash]

    def levels(self, prefix: PromptPrefix) -> list[WarmLevel]:
        """The request's boundaries some account holds, longest first, each with its holders. Walked per
        account (`hit`), a level list answers what `WarmCache.lookup` would find there."""
        levels: list[WarmLevel] = []
        holders_of = self._holders
        for prefix_hash, tokens in prefix.lookups:
            holders = holders_of.get(prefix_hash)
            if holders:
                confirmed, pending = CacheHit(prefix_hash, tokens, True), CacheHit(prefix_hash, tokens, False)
                levels.append(WarmLevel(holders, confirmed, pending))
        return levels


class WarmLevel(msgspec.Struct, frozen=True):
    """One boundary of a request and the accounts holding it (live: read it before anything awaits), with
    the hit a holder's confirmed or pending entry makes (shared: one per level, not one per holder)."""

    holders: dict[str, WarmCacheEntry]
    confirmed: CacheHit
    pending: CacheHit


def hit(levels: list[WarmLevel], upstream_id: str, now: float) -> CacheHit | None:
    """The longest unexpired boundary `upstream_id` holds."""
    for level in levels:
        entry = level.holders.get(upstream_id)
        if entry is not None and entry.expires_at > now:
            return level.confirmed if entry.confirmed else level.pending
    return None


class WarmCache:
    """One upstream's warm prefixes: prefix hash → entry, least recently used dropped past the cap."""

    __slots__ = ("_cap", "_entries", "_index", "_upstream_id")

    def __init__(self, cap: int = 10_000, index: WarmIndex | None = None, upstream_id: str = "") -> None:
        self._cap = cap
        self._entries: OrderedDict[bytes, WarmCacheEntry] = OrderedDict()
        # The pool's index of every account's entries (see `WarmIndex`); None for a cache on its own.
        self._index = index
        self._upstream_id = upstream_id

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prefix: PromptPrefix, now: float) -> CacheHit | None:
        """As the upstream does it: from the last breakpoint back, the first boundary holding an entry.

        At most one dictionary probe per boundary; nothing is modified (a lookup is not a use).
        """
        entries = self._entries
        for prefix_hash, tokens in prefix.lookups:
            entry = entries.get(prefix_hash)
            if entry is not None and entry.expires_at > now:
                return CacheHit(prefix_hash, tokens, entry.confirmed)
        return None

    def confirmed_tokens(self, prefix: PromptPrefix, now: float) -> int:
        """The tokens of the longest boundary the upstream is known to hold (its answer said so): what the request
        reads for sure. A pending entry, a request in flight's, may yet turn out not cached."""
        entries = self._entries
        for prefix_hash, tokens in prefix.lookups:
            entry = entries.get(prefix_hash)
            if entry is not None and entry.confirmed and entry.expires_at > now:
                return tokens
        return 0

    def sent(self, prefix: PromptPrefix, now: float) -> None:
        """A request went to this upstream: its breakpoints are pending until the answer says more."""
        for breakpoint in prefix.breakpoints:
            entry = self._entries.get(breakpoint.prefix_hash)
            if entry is None or entry.expires_at <= now:
                self._put(breakpoint, now + PENDING_SECONDS, False, now)

    def answered(self, prefix: PromptPrefix, cache_write_tokens: int, cache_read_tokens: int, now: float) -> None:
        """The upstream's usage for a request sent here: confirm what it cached, forget what it did not."""
        if cache_write_tokens == 0 and cache_read_tokens == 0:
            for breakpoint in prefix.breakpoints:
                entry = self._entries.get(breakpoint.prefix_hash)
                if entry is not None and not entry.confirmed:
                    self._drop(breakpoint.prefix_hash)
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
            self._put(breakpoint, now + TTL_SECONDS[breakpoint.ttl], True, now)

    def forget(self) -> None:
        """The account left the pool: its entries leave the pool's index, and so do those that requests still
        in flight to it learn when answered (nothing would ever drop them: this cache takes no more puts
        that would expire them)."""
        for prefix_hash in list(self._entries):
            self._drop(prefix_hash)
        self._index = None

    def entries(self) -> list[WarmCacheEntry]:
        return list(self._entries.values())

    def live(self, now: float) -> int:
        """How many prefixes are warm (what metrics and the admin API show): expired ones are dropped first;
        they counted until the cap pushed them out, for ever on an account no longer sent anything."""
        self._expire(now)
        return len(self._entries)

    def _expire(self, now: float) -> None:
        """Drop the least recently used entries while they have expired. An entry's expiry follows its last
        use, so the expired ones gather at the front (one behind a longer-lived one waits its turn); each is
        dropped once, so the cost is spread over the puts."""
        entries = self._entries
        while entries:
            prefix_hash, entry = next(iter(entries.items()))
            if entry.expires_at > now:
                return
            self._drop(prefix_hash)

    def _put(self, breakpoint: CacheBreakpoint, expires_at: float, confirmed: bool, now: float) -> None:
        entries = self._entries
        entry = entries.get(breakpoint.prefix_hash)
        if entry is not None:
            # Updated in place: the pool's index holds this same entry (a conversation's shared prefix is
            # re-confirmed by every one of its turns).
            entry.ttl, entry.tokens = breakpoint.ttl, breakpoint.prefix_token_count
            entry.expires_at, entry.confirmed = expires_at, confirmed
            entries.move_to_end(breakpoint.prefix_hash)
            return
        entry = WarmCacheEntry(
            breakpoint.prefix_hash, breakpoint.ttl, breakpoint.prefix_token_count, expires_at, confirmed
        )
        entries[breakpoint.prefix_hash] = entry
        if self._index is not None:
            self._index.add(self._upstream_id, entry)
        self._expire(now)
        while len(self._entries) > self._cap:
            self._drop(next(iter(self._entries)))

    def _drop(self, prefix_hash: bytes) -> None:
        del self._entries[prefix_hash]
        if self._index is not None:
            self._index.remove(self._upstream_id, prefix_hash)

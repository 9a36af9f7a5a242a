"""The pool: upstream accounts with their live state (health, in-flight), kept across reloads."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from poolgate.api.model_ids import snapshot
from poolgate.cache.breakpoints import PromptPrefix
from poolgate.cache.warmth import WarmCache, WarmIndex
from poolgate.lifecycle.context import Upstream
from poolgate.upstreams.health import HealthState, doubt
from poolgate.upstreams.quota import QuotaPicture, quota_blocked_until
from poolgate.upstreams.ratelimits import (
    HeadroomFloor,
    RateLimitObservation,
    exhausted_until,
    headroom,
    headroom_floor,
)
from poolgate.upstreams.stats import UpstreamStats

# Two used-up windows whose resets are this close are one, as the log tells of them (`new_quota_wall`).
QUOTA_WALL_SLACK_SECONDS = 60.0
# How long an account that answered 403 for a model (no permission: a model or feature its organization may not
# use) is left out of that model's requests: no retry soon changes that, and one request then finds out.
MODEL_DENIED_SECONDS = 600.0
# Models an account is held out of at once. The model is the caller's to choose: an account answering 403 to
# every request (an organization that may use nothing) was held out of one more model per made-up id, each hold
# kept until that id came back after it ended. Past the bound, the hold that ends soonest goes: the account
# costs one more 403 for that model.
MAX_DENIED_MODELS = 256


@dataclass(slots=True)
class UpstreamState:
    upstream: Upstream
    health: HealthState = field(default_factory=HealthState)
    in_flight: int = 0
    # Their send times (monotonic) in the order sent (`request_sent`, `request_done`): `observe` counts `unseen`
    # from them.
    sent_times: list[float] = field(default_factory=list)
    # Of those, the ones sent after the request whose rate-limit report is current (`reported_sent_at`): the
    # API counts a request as it arrives, so the ones sent before are in the windows' `remaining` already (all
    # of them counted again made an account with 4 of 10 requests left read as full, and a session left its
    # warm cache); these are not yet.
    unseen: int = 0
    reported_sent_at: float = 0.0
    # What its token windows will count of the requests in flight (`counted_tokens`, summed): a warm session's
    # turns cost them a few new tokens each, not their whole prompt.
    tokens_in_flight: int = 0
    # The latest `anthropic-ratelimit-*` observation per kind (requests, tokens, …).
    ratelimits: dict[str, RateLimitObservation] = field(default_factory=dict)
    stats: UpstreamStats = field(default_factory=UpstreamStats)
    # Subscription (OAuth) accounts: the 5-hour / 7-day quota as the last answers reported it.
    quota: QuotaPicture | None = None
    # Prompt prefixes warm in this account's cache.
    warm: WarmCache = field(default_factory=WarmCache)
    # Until when the latest observations say a window is used up (0: none is), kept with `ratelimits`
    # so the router's filter reads one number per candidate.
    ratelimited_until: float = 0.0
    # What those observations guarantee until the next ones (see `HeadroomFloor`); None before any.
    headroom_floor: HeadroomFloor | None = None
    # Taken out of the pool by a reload: requests routed before it pass over it (its credential is gone).
    removed: bool = False
    # The end of the last used-up subscription window the log warned of, by the model family it holds out ("" for
    # every model; at most one per family, `quota.model_family`): see `UpstreamState.new_quota_wall`.
    quota_warned: dict[str, float] = field(default_factory=dict)
    # Models it answered 403 for (`deny`), by the model an id names (an alias and its dated id are one), until
    # when (monotonic): its other models' requests go on.
    denied: dict[str, float] = field(default_factory=dict)

    def request_sent(self, sent_at: float, counted_tokens: int) -> None:
        """A request sent to it at `sent_at` (monotonic: no earlier than the one sent before), of which its token
        windows will count `counted_tokens`."""
        self.in_flight += 1
        self.stats.requests += 1
        self.sent_times.append(sent_at)
        self.unseen += 1
        self.tokens_in_flight += counted_tokens

    def request_done(self, sent_at: float, counted_tokens: int) -> None:
        """The request `request_sent` took in is answered, failed or given up."""
        self.in_flight -= 1
        self.sent_times.remove(sent_at)
        if sent_at > self.reported_sent_at:  # not counted by the current report
            self.unseen -= 1
        self.tokens_in_flight -= counted_tokens

    def observe(self, observations: dict[str, RateLimitObservation], sent_at: float) -> None:
        """Take in the rate-limit windows of the answer to a request sent at `sent_at` (kinds it did not report
        keep their last value), unless that request was sent before the one whose report is current: its
        report counts fewer requests, however late its answer came (a slow answer after a quick one to a
        later request put back room the account no longer had, and the next request got its 429)."""
        if sent_at < self.reported_sent_at:
            return
        self.reported_sent_at = sent_at
        sent_times = self.sent_times
        self.unseen = len(sent_times) - bisect_right(sent_times, sent_at)
        ratelimits = self.ratelimits
        ratelimits.update(observations)
        until = 0.0
        for obs in ratelimits.values():  # a loop, not max() over a generator: this runs for every answer
            reset_at = obs.reset_at
            if obs.remaining == 0 and reset_at is not None and reset_at > until:
                until = reset_at
        if until > self.ratelimited_until:
            doubt()
        self.ratelimited_until = until
        self.headroom_floor = headroom_floor(ratelimits)

    def in_service(self) -> bool:
        """Whether requests may still go to it: a reload since a request was routed may have removed the account
        (its credential is gone) or disabled it (the operator's say that it take no new request), and the
        request's failover passes over it as routing would have."""
        return not self.removed and self.upstream.enabled

    def deny(self, model: str, until: float) -> None:
        """Leave the account out of `model`'s requests until `until` (monotonic): it answered one 403. Its
        alias's or dated id's too: the same model, which each cost a 403 of every account to find out."""
        denied = self.denied
        named = snapshot(model)
        # Set anew at the end: every hold lasts MODEL_DENIED_SECONDS, so the dict's order is the order they end in.
        denied.pop(named, None)
        denied[named] = until
        if len(denied) > MAX_DENIED_MODELS:
            del denied[next(iter(denied))]
        doubt()

    def holds_out(self, model: str) -> bool:
        """Whether a hold (`deny`) of `model`, ended or not, is still kept."""
        return snapshot(model) in self.denied

    def denied_until(self, model: str, now: float) -> float | None:
        """Until when it is out of `model`'s requests (`deny`), if it is now; a hold that ended is forgotten."""
        named = snapshot(model)
        until = self.denied.get(named)
        if until is None:
            return None
        if until > now:
            return until
        del self.denied[named]
        return None

    def lift(self, model: str) -> None:
        """End a hold of `model`: the account answered a request for it."""
        self.denied.pop(snapshot(model), None)

    def usable_again_at(self, now: float, model: str = "") -> float:
        """When its live state holds the account out no longer (monotonic; `now` or earlier: it does not now):
        a park, a cooldown, a used-up rate-limit window, a rejected subscription quota window (for a request
        for `model`: a per-model weekly window binds only its own model's)."""
        health = self.health
        return max(
            health.parked_until,
            health.retry_at if not health.healthy else 0.0,
            exhausted_until(self.ratelimits, now) or 0.0,
            quota_blocked_until(self.quota, now, model=model) or 0.0,
            (self.denied_until(model, now) or 0.0) if self.denied else 0.0,
        )

    def new_quota_wall(self, family: str, until: float) -> bool:
        """Whether a 429 of a used-up window holding out `family`'s requests (`""`: every model's) till `until` is
        news to the log, and so noted: the requests in flight when a window runs out each get its 429 (40
        concurrent clients logged the same warning 40 times); a reset a minute or more from the last one told
        is another window's, or the next time."""
        if abs(until - self.quota_warned.get(family, -math.inf)) < QUOTA_WALL_SLACK_SECONDS:
            return False
        self.quota_warned[family] = until
        return True

    def counted_tokens(self, prefix: PromptPrefix | None, now: float) -> int:
        """What the account's token windows will count of a request sent to it now: its prompt less what the
        account holds cached for it (confirmed: the API's input-token limits leave cache reads out), or, for a
        prompt not analysed, what they counted of its requests on average."""
        if prefix is None:
            return round(self.stats.counted_input_tokens or 0.0)
        # Not `min()`, a call of ~1,400 instructions (CPython 3.11): every attempt asks.
        cached, cacheable = self.warm.confirmed_tokens(prefix, now), prefix.cacheable_tokens
        return prefix.prompt_tokens - (cacheable if cacheable < cached else cached)

    def tokens_per_request_in_flight(self) -> float:
        """The mean of `tokens_in_flight`, as `ratelimits.headroom` takes it."""
        return self.tokens_in_flight / self.in_flight if self.in_flight else 0.0

    def reported_headroom(self, now: float, unusable: str | None) -> tuple[float, float | None]:
        """Its tightest rate-limit window's share left and the tokens left (`ratelimits.headroom`), as the admin
        API and the metrics report them, `unusable` being why the router would not send it a request now: no
        share while it holds the account out as `rate_limited` (a window used up until its reset, or parked
        after a 429), which the estimate's linear refill showed as some (a fifth, for an account out for 47 s
        more), or as `insufficient_quota` (a subscription's window used up for hours, shown with all its room:
        its answers carry no rate-limit windows)."""
        share, tokens_left = headroom(self.ratelimits, now, self.unseen, self.tokens_per_request_in_flight())
        return (0.0 if unusable in _NO_ROOM else share), tokens_left

    def set_quota(self, picture: QuotaPicture | None) -> None:
        """A subscription account's quota as its answers or a poll report it (an account with one is always
        looked at by the router's quota filter)."""
        if picture is not None and self.quota is None:
            doubt()
        self.quota = picture


# Why the router holds an account out that say it has no room left.
_NO_ROOM = frozenset({"rate_limited", "insufficient_quota"})


def same_endpoint(old: Upstream, new: Upstream) -> bool:
    """Whether `new` still points where `old` did: the same kind of account at the same address."""
    return old.kind == new.kind and old.base_url == new.base_url


def serves_model(globs: tuple[str, ...], model: str) -> bool:
    return not globs or any(fnmatchcase(model, glob) for glob in globs)


@dataclass(frozen=True, slots=True)
class ModelCandidates:
    """The enabled accounts that serve one model, in configuration order, and the enabled ones that do not
    (the router's `model` stage): fixed between pool changes, so worked out once per model."""

    states: tuple[UpstreamState, ...]
    ids: tuple[str, ...]
    unserved: tuple[str, ...]


# Distinct model names remembered per pool version; callers choose the name, so the memo is bounded.
MODEL_MEMO_SIZE = 256


class Pool:
    def __init__(self, cache_entries: int = 10_000) -> None:
        self._states: dict[str, UpstreamState] = {}
        self._cache_entries = cache_entries
        self.warm_index = WarmIndex()
        # The kinds of account present (routing skips per-account checks for a kind that is not).
        self.kinds: frozenset[str] = frozenset()
        self._serving: dict[str, ModelCandidates] = {}
        # Bumped by every `replace`: what others remember about the pool's accounts is stale after it.
        self.version = 0

    def replace(self, upstreams: Iterable[Upstream], renewed: Collection[str] = ()) -> None:
        """Swap in a new set of upstreams; an upstream that stays keeps its health and counters. One `renewed`
        (given another credential), or sent elsewhere (another kind or base URL), is another account under
        the same id: it starts afresh, as a new one does (the old one's 401s kept the new key out for a
        cooldown; its parks, for the old key's reset)."""
        states: dict[str, UpstreamState] = {}
        for upstream in upstreams:
            old = self._states.get(upstream.id)
            if old is None or upstream.id in renewed or not same_endpoint(old.upstream, upstream):
                warm = WarmCache(self._cache_entries, self.warm_index, upstream.id)
                states[upstream.id] = UpstreamState(upstream, warm=warm)
            else:
                old.upstream = upstream
                states[upstream.id] = old
        for upstream_id, gone in self._states.items():
            if states.get(upstream_id) is not gone:
                gone.warm.forget()
                gone.removed = True
        self._states = states
        self.kinds = frozenset(state.upstream.kind for state in states.values())
        self._serving = {}
        self.version += 1

    def serving(self, model: str) -> ModelCandidates:
        """The enabled accounts that serve `model` (memoised until the pool changes)."""
        found = self._serving.get(model)
        if found is None:
            served: list[UpstreamState] = []
            unserved: list[str] = []
            for state in self._states.values():
                if state.upstream.enabled:
                    if serves_model(state.upstream.models, model):
                        served.append(state)
                    else:
                        unserved.append(state.upstream.id)
            found = ModelCandidates(tuple(served), tuple(state.upstream.id for state in served), tuple(unserved))
            if len(self._serving) >= MODEL_MEMO_SIZE:
                self._serving.clear()
            self._serving[model] = found
        return found

    def states(self) -> list[UpstreamState]:
        return list(self._states.values())

    def get(self, upstream_id: str) -> UpstreamState | None:
        return self._states.get(upstream_id)

    def __len__(self) -> int:
        return len(self._states)

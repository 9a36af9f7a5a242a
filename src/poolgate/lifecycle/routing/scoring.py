"""Scoring the candidates the filters kept: lower is better, each term in [0, ~1] before its weight.

Terms: `cache` (the extra prompt cost of this candidate over the cheapest, from its warm prompt cache),
`headroom` (how close its tightest rate-limit window is to empty; far past 1 when the request would not
fit), `latency` (time to first byte over the fastest candidate's), `errors` (recent error rate), `load`
(requests in flight per unit of weight), `spread` (for a new session: the candidate's excess over its fair
share of bound sessions), for subscription accounts `quota` (pressure on its 5-hour / 7-day windows),
`metered` (a metered key while subscription capacity is left) and `drain` (a window that resets later
than another's, relative to what is left), and `weight` (a lower configured weight scores worse).
Flat-fee channels with monthly quota left count as paid-for like subscriptions (the `metered` term), and
among metered upstreams one priced higher for the model (price overrides, channel pricing) gets `cost`. `load`
and `weight`
are off by default: the terminal strategy (`least-connections`, weighted `round-robin`) already
spreads load and honours weights, and would be overruled otherwise. Weights come from configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import msgspec

from poolgate.billing.book import ChannelBook
from poolgate.cache.breakpoints import PromptPrefix
from poolgate.cache.score import CacheScore, PromptCosts
from poolgate.cache.warmth import CacheHit
from poolgate.config import ScoreWeights
from poolgate.lifecycle.sign import OAUTH_KIND
from poolgate.upstreams.pool import UpstreamState
from poolgate.upstreams.quota import drain_priority, quota_pressure
from poolgate.upstreams.ratelimits import LOW_HEADROOM, headroom

# The headroom term of a candidate whose token window cannot take this request's prompt: large enough to
# outweigh any cache saving, so a warm but exhausted account is passed over.
SHORT_OF_TOKENS = 3.0
LATENCY_FLOOR_MS = 500.0


# The score's terms, in the order `CandidateScore.values` holds them.
TERMS = ("cache", "headroom", "load", "latency", "errors", "weight", "spread", "quota", "metered", "drain", "cost")


class CandidateScore(msgspec.Struct, gc=False):
    upstream_id: str
    total: float
    # The weighted terms in `TERMS` order (a tuple: one is made per scored candidate of every request, and
    # the named view is only needed when a trace is read).
    values: tuple[float, ...]
    # The unweighted headroom term (`SHORT_OF_TOKENS`: the request would not fit).
    headroom_raw: float
    cache: CacheScore | None

    @property
    def terms(self) -> dict[str, float]:
        """The weighted terms by name."""
        return dict(zip(TERMS, self.values, strict=True))

    @property
    def lacks_headroom(self) -> bool:
        return self.headroom_raw >= SHORT_OF_TOKENS

    def as_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"total": round(self.total, 4)}
        for name, value in zip(TERMS, self.values, strict=True):
            if value:
                data[name] = round(value, 4)
        if self.cache is not None:
            data["cache"] = self.cache.as_dict()
        return data


def is_paid_for(state: UpstreamState, billing: ChannelBook | None = None, now_wall: float = 0.0) -> bool:
    """Capacity that costs nothing extra per request: a Claude subscription account, or a flat-fee channel
    with quota left this month."""
    if state.upstream.kind == OAUTH_KIND:
        return True
    return billing is not None and billing.prepaid(state.upstream.id, now_wall)


def cost_terms(
    kept: Sequence[UpstreamState], paid: Sequence[bool], billing: ChannelBook, model: str
) -> list[float] | None:
    """Per candidate: how much more a metered one charges for the model than the cheapest metered one
    (0 for the cheapest, 1 for twice its price or more, or an unknown price); 0 for paid-for capacity."""
    units = [
        None if flag else billing.unit_cost(model, state.upstream.id) for state, flag in zip(kept, paid, strict=True)
    ]
    known = [unit for unit, flag in zip(units, paid, strict=True) if not flag and unit is not None]
    if not known:
        return None
    cheapest = min(known)
    terms = []
    for unit, flag in zip(units, paid, strict=True):
        if flag:
            terms.append(0.0)
        elif unit is None:
            terms.append(1.0)
        else:
            terms.append(min(1.0, (unit - cheapest) / cheapest) if cheapest else (1.0 if unit else 0.0))
    return terms


def headroom_term(state: UpstreamState, now: float, prompt_tokens: int) -> float:
    per_request = state.stats.prompt_tokens if state.stats.prompt_tokens is not None else prompt_tokens
    floor = state.headroom_floor
    if floor is not None and floor.clear(state.in_flight, per_request, prompt_tokens):
        return 0.0
    share, tokens_left = headroom(state.ratelimits, now, state.in_flight, per_request)
    if tokens_left is not None and tokens_left < prompt_tokens:
        return SHORT_OF_TOKENS
    return 0.0 if share >= LOW_HEADROOM else (LOW_HEADROOM - share) / LOW_HEADROOM


def spread_terms(kept: Sequence[UpstreamState], sessions: Mapping[str, int]) -> list[float]:
    """For a new session: how far each candidate is above its fair share of the sessions already bound.

    Sessions share most of their prompt prefix (Claude Code's tools and system prompt), so the first
    account to serve one is warm for the next, and cache savings alone would pile every new session onto
    it until its rate limits give out. A session is long and its own conversation is what it caches:
    spreading sessions evenly, as pinning them would, costs one shared-prefix write per account."""
    counts = [sessions.get(state.upstream.id, 0) for state in kept]
    total = sum(counts)
    if not total:
        return [0.0] * len(kept)
    fair = total / len(kept)
    fewest = min(counts)
    # Within a tenth of a fair share of the least-loaded is "even"; beyond, the term starts at 1, which
    # (at equal weights) outweighs the cache term of a shared prefix.
    return [0.0 if count - fewest <= 0.1 * fair else 1.0 + (count - fewest) / max(1.0, fair) for count in counts]


def score_candidates(
    kept: Sequence[UpstreamState],
    prefix: PromptPrefix | None,
    now: float,
    weights: ScoreWeights,
    spread: Sequence[float] | None = None,
    now_wall: float = 0.0,
    quota_threshold: float = 0.8,
    billing: ChannelBook | None = None,
    model: str = "",
    hits: Mapping[str, CacheHit] | None = None,
    paid_possible: bool = True,
) -> list[CandidateScore]:
    """One score per candidate, in the order given. Pure apart from reading the candidates' live state.
    `spread` is given for a session's first request (see `spread_terms`); `hits` are the pool's warm
    entries for this prompt (`WarmIndex.levels` / `hit`), else each candidate's own cache is looked up.
    `paid_possible` False says no candidate is paid-for capacity (no subscription, no flat-fee channel).

    Two plain loops (facts, then terms) rather than a comprehension per fact: this runs for every request."""
    w = weights
    prompt_tokens = prefix.prompt_tokens if prefix is not None else 0
    costs_of = PromptCosts.of(prefix) if prefix is not None and prefix.breakpoints and w.cache else None
    nothing_warm = costs_of.score(None) if costs_of is not None else None
    cold = costs_of.cold if costs_of is not None else 0.0
    count = len(kept)
    caches: list[CacheScore | None] = [None] * count
    ttfbs: list[float | None] = [None] * count
    paid = [False] * count
    pressures = [0.0] * count
    drains = [0.0] * count
    cheapest = math.inf
    fastest = math.inf
    busiest = heaviest = 0.0
    paid_left = False
    for index, state in enumerate(kept):
        upstream = state.upstream
        if costs_of is not None:
            assert prefix is not None
            found = hits.get(upstream.id) if hits is not None else state.warm.lookup(prefix, now)
            cache = nothing_warm if found is None else costs_of.score(found)
            caches[index] = cache
            if cache is not None and cache.expected_cost < cheapest:
                cheapest = cache.expected_cost
        ttfb = ttfbs[index] = state.stats.ttfb_ms
        if ttfb is not None and ttfb < fastest:
            fastest = ttfb
        if w.load:
            busiest = max(busiest, state.in_flight / upstream.weight)
        heaviest = max(heaviest, upstream.weight)
        if state.quota is not None:
            pressures[index] = quota_pressure(state.quota, now_wall, quota_threshold)
        if paid_possible and is_paid_for(state, billing, now_wall):
            paid[index] = True
            paid_left = paid_left or pressures[index] < 1.0
            drains[index] = drain_priority(state.quota, now_wall)
    fastest = 0.0 if fastest is math.inf else fastest
    # Relative to the fastest, and to no less than LATENCY_FLOOR_MS (a few milliseconds are noise, not a
    # signal); an account not yet measured counts as fast, so it gets tried.
    latency_scale = max(fastest, LATENCY_FLOOR_MS)
    busiest += 1.0
    most_urgent = max(drains, default=0.0)
    costs = (
        cost_terms(kept, paid, billing, model)
        if billing is not None and billing.priced_by_upstream and w.cost and model
        else None
    )
    scores = []
    for index, state in enumerate(kept):
        cache = caches[index]
        raw_headroom = headroom_term(state, now, prompt_tokens) if state.ratelimits else 0.0
        flat = paid[index]
        ttfb = ttfbs[index]
        values = (
            w.cache * (cache.expected_cost - cheapest) / cold if cache is not None and cold else 0.0,
            w.headroom * raw_headroom,
            w.load * state.in_flight / state.upstream.weight / busiest if w.load else 0.0,
            w.latency * min(1.0, (ttfb - fastest) / latency_scale) if ttfb is not None else 0.0,
            w.errors * state.stats.error_rate(now),
            w.weight * (1.0 - state.upstream.weight / heaviest) if w.weight else 0.0,
            w.spread * spread[index] if spread else 0.0,
            w.quota * pressures[index],
            w.metered if paid_left and not flat else 0.0,
            w.drain * (most_urgent - drains[index]) if flat else 0.0,
            w.cost * costs[index] if costs is not None else 0.0,
        )
        scores.append(CandidateScore(state.upstream.id, sum(values), values, raw_headroom, cache))
    return scores

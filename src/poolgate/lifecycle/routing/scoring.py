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
from dataclasses import dataclass

import msgspec

from poolgate.billing.book import ChannelBook
from poolgate.cache.breakpoints import PromptPrefix
from poolgate.cache.score import CacheScore, PromptCosts
from poolgate.cache.warmth import CacheHit
from poolgate.config import ScoreWeights
from poolgate.lifecycle.sign import OAUTH_KIND
from poolgate.upstreams.pool import UpstreamState
from poolgate.upstreams.quota import drain_priority, quota_pressure
from poolgate.upstreams.ratelimits import LOW_HEADROOM, headroom_floor

# The headroom term of a candidate with no room for this request: a window with nothing left once the requests
# sent since its report are counted, or a token window that cannot take its prompt. Large enough to outweigh any cache
# saving, so a warm but exhausted account is passed over.
NO_ROOM = 3.0
LATENCY_FLOOR_MS = 500.0


# The score's terms, in the order `CandidateScore` holds them.
TERMS = ("cache", "headroom", "load", "latency", "errors", "weight", "spread", "quota", "metered", "drain", "cost")


@dataclass(frozen=True, slots=True)
class Weights:
    """`routing.score_weights` as scoring reads them, every request: a field of a pydantic model costs ~430
    instructions a read (its `__getattr__` hook keeps CPython from specialising it: 13 reads, ~5,600
    instructions a request), one of this class a few."""

    cache: float
    headroom: float
    load: float
    latency: float
    errors: float
    weight: float
    spread: float
    quota: float
    metered: float
    drain: float
    cost: float

    @classmethod
    def of(cls, weights: ScoreWeights) -> Weights:
        return cls(**{term: getattr(weights, term) for term in TERMS})


class CandidateScore(msgspec.Struct, gc=False, omit_defaults=True):
    """A candidate's score: the sum of its weighted terms. A Struct shaped like its JSON: one is made per
    scored candidate of every request, and the routing trace of every request writes it as it is. A term
    that is 0 is None (left out of the trace; `terms` reads it as 0)."""

    upstream_id: str
    total: float
    cache: float | None = None
    headroom: float | None = None
    load: float | None = None
    latency: float | None = None
    errors: float | None = None
    weight: float | None = None
    spread: float | None = None
    quota: float | None = None
    metered: float | None = None
    drain: float | None = None
    cost: float | None = None
    # The unweighted headroom term (`NO_ROOM`: the request would not fit).
    headroom_raw: float | None = None
    # What the `cache` term was worked out from.
    cache_prediction: CacheScore | None = None

    @property
    def terms(self) -> dict[str, float]:
        """The weighted terms by name."""
        return {name: getattr(self, name) or 0.0 for name in TERMS}

    @property
    def lacks_headroom(self) -> bool:
        return self.headroom_raw is not None and self.headroom_raw >= NO_ROOM


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
    (0 for the cheapest, 1 for twice its price or more, or an unknown price: one in another currency than USD
    is, or by characters, duration or images, see `ChannelBook.unit_cost`); 0 for paid-for capacity."""
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


def headroom_term(state: UpstreamState, now: float, prompt_tokens: int, cached_tokens: int = 0) -> float:
    """`cached_tokens`: the part of the prompt the account is known to hold in its cache, which its token
    windows do not count (the API's input-token limits leave cache reads out): a warm session's account
    with room for the few new tokens of its next turn was judged full by the whole prompt."""
    counted = prompt_tokens - cached_tokens
    per_request = state.tokens_per_request_in_flight()
    floor = state.headroom_floor
    if floor is None:  # observations not taken in through `UpstreamState.observe`
        floor = headroom_floor(state.ratelimits)
    elif floor.clear(state.unseen, per_request, counted):
        return 0.0
    share, tokens_left = floor.headroom(state.ratelimits, now, state.unseen, per_request)
    # A window used up by the requests sent since its report is as full as one reported used up: a session's
    # burst of concurrent turns all went to its account, which refused what its window could not hold.
    if share <= 0.0 or (tokens_left is not None and tokens_left < counted):
        return NO_ROOM
    return 0.0 if share >= LOW_HEADROOM else (LOW_HEADROOM - share) / LOW_HEADROOM


def room_term(state: UpstreamState, prefix: PromptPrefix | None, now: float) -> float:
    """`headroom_term` for the request: for its whole prompt (most requests have room for it), else for what
    the account's token windows count of it, less what the account holds cached (looked up only then)."""
    if prefix is None:
        return headroom_term(state, now, 0)
    term = headroom_term(state, now, prefix.prompt_tokens)
    if term < NO_ROOM:
        return term
    cached = prefix.prompt_tokens - state.counted_tokens(prefix, now)
    return headroom_term(state, now, prefix.prompt_tokens, cached) if cached > 0 else term


def spread_terms(
    kept: Sequence[UpstreamState], sessions: Mapping[str, int], among: Sequence[bool] | None = None
) -> list[float]:
    """For a new session: how far each candidate is above its fair share of the sessions already bound.

    Sessions share most of their prompt prefix (Claude Code's tools and system prompt), so the first
    account to serve one is warm for the next, and cache savings alone would pile every new session onto
    it until its rate limits give out. A session is long and its own conversation is what it caches:
    spreading sessions evenly, as pinning them would, costs one shared-prefix write per account.

    Sessions are counted per unit of the account's weight, as the terminal strategies count requests: counted
    whole, every new session went to the account with the fewest, and an account of weight 3 got no more of
    Claude Code's traffic (every request of which has a session) than one of weight 1.

    `among`: spread over these candidates only (the paid-for ones while they have capacity left), the others
    0: spreading onto a metered key sessions that idle subscriptions could take spends money for nothing."""
    total = 0
    weights = 0
    loads: list[float] = []
    for index, state in enumerate(kept):
        count = sessions.get(state.upstream.id, 0)
        weight = state.upstream.weight
        loads.append(count / weight)
        if among is None or among[index]:
            total += count
            weights += weight
    if not total:
        return [0.0] * len(kept)
    fair = total / weights
    fewest = min([load for index, load in enumerate(loads) if among is None or among[index]])
    # Within a tenth of a fair share of the least-loaded is "even"; beyond, the term starts at 1, which
    # (at equal weights) outweighs the cache term of a shared prefix.
    return [
        0.0
        if (among is not None and not among[index]) or load - fewest <= 0.1 * fair
        else 1.0 + (load - fewest) / max(1.0, fair)
        for index, load in enumerate(loads)
    ]


def score_candidates(
    kept: Sequence[UpstreamState],
    prefix: PromptPrefix | None,
    now: float,
    weights: Weights,
    sessions: Mapping[str, int] | None = None,
    now_wall: float = 0.0,
    quota_threshold: float = 0.8,
    billing: ChannelBook | None = None,
    model: str = "",
    hits: Sequence[CacheHit | None] | None = None,
    paid_possible: bool = True,
) -> list[CandidateScore]:
    """One score per candidate, in the order given. Pure apart from reading the candidates' live state.
    `sessions` (the sessions bound per account) is given for a session's first request, for the `spread`
    term (see `spread_terms`); `hits` are, in the candidates'
    order, their longest warm prefixes for this prompt from the pool's index (`WarmIndex.levels` / `hit`);
    without them each candidate's own cache is looked up.
    `paid_possible` False says no candidate is paid-for capacity (no subscription, no flat-fee channel).

    The facts that are relative to the other candidates first, then one loop of terms; a term whose weight
    is 0, or that no candidate can have (subscription and flat-fee terms in a pool of API keys), is not
    computed: this runs for every request."""
    if not kept:
        return []
    w = weights
    caches: list[CacheScore] | None = None
    cold = cheapest = 0.0
    if prefix is not None and prefix.breakpoints and w.cache:
        costs_of = PromptCosts.of(prefix)
        caches = cache_scores(kept, prefix, costs_of, now, hits)
        cold = costs_of.cold
        cheapest = min([cache.expected_cost for cache in caches])
    # Loops and comparisons, not `min()`/`max()` (~1,400 instructions a call on CPython 3.11): this runs for
    # every request.
    ttfbs = [state.stats.ttfb_ms for state in kept]
    fastest = math.inf
    busiest = heaviest = 0.0
    for state, ttfb in zip(kept, ttfbs, strict=True):
        if ttfb is not None and ttfb < fastest:
            fastest = ttfb
        share = state.upstream.weight
        busiest = load if (load := state.in_flight / share) > busiest else busiest
        heaviest = share if share > heaviest else heaviest
    if fastest == math.inf:
        fastest = 0.0
    # Relative to the fastest, and to no less than LATENCY_FLOOR_MS (a few milliseconds are noise, not a
    # signal); an account not yet measured counts as fast, so it gets tried.
    latency_scale = fastest if fastest > LATENCY_FLOOR_MS else LATENCY_FLOOR_MS
    busiest = 1.0 + busiest if w.load else 1.0
    heaviest = heaviest if w.weight else 1
    # Quota windows are a subscription account's: none without paid-for capacity.
    pressures: list[float] | None = None
    paid: list[bool] | None = None
    drains: list[float] = []
    paid_left = False
    most_urgent = 0.0
    if paid_possible:
        pressures = [
            quota_pressure(state.quota, now_wall, quota_threshold, model=model) if state.quota is not None else 0.0
            for state in kept
        ]
        paid = [is_paid_for(state, billing, now_wall) for state in kept]
        paid_left = any(flag and pressure < 1.0 for flag, pressure in zip(paid, pressures, strict=True))
        drains = [
            drain_priority(state.quota, now_wall) if flag else 0.0 for state, flag in zip(kept, paid, strict=True)
        ]
        most_urgent = max(drains, default=0.0)
    spread: list[float] | None = None
    if sessions is not None and w.spread:
        # While paid-for capacity is left, new sessions spread over it; a metered key waits its turn.
        among = (
            [flag and pressure < 1.0 for flag, pressure in zip(paid, pressures, strict=True)]
            if paid_left and paid is not None and pressures is not None
            else None
        )
        spread = spread_terms(kept, sessions, among)
    costs = (
        cost_terms(kept, paid or [False] * len(kept), billing, model)
        if billing is not None and billing.priced_by_upstream and w.cost and model
        else None
    )
    w_cache, w_headroom, w_load, w_latency, w_errors = w.cache, w.headroom, w.load, w.latency, w.errors
    w_weight, w_spread, w_quota, w_metered, w_drain, w_cost = w.weight, w.spread, w.quota, w.metered, w.drain, w.cost
    scores = []
    for index, state in enumerate(kept):
        cache = caches[index] if caches is not None else None
        raw_headroom = room_term(state, prefix, now) if state.ratelimits else 0.0
        flat = paid is not None and paid[index]
        ttfb = ttfbs[index]
        cache_term = w_cache * (cache.expected_cost - cheapest) / cold if cache is not None and cold else 0.0
        headroom_value = w_headroom * raw_headroom
        load = w_load * state.in_flight / state.upstream.weight / busiest if w_load else 0.0
        latency = (
            w_latency
            * (slower if (slower := (ttfb - fastest) / latency_scale) < 1.0 else 1.0)
            * state.stats.latency_weight(now)
            if ttfb is not None and ttfb > fastest
            else 0.0
        )
        errors = w_errors * state.stats.error_rate(now)
        weight = w_weight * (1.0 - state.upstream.weight / heaviest) if w_weight else 0.0
        spread_value = w_spread * spread[index] if spread else 0.0
        quota = w_quota * pressures[index] if pressures is not None else 0.0
        metered = w_metered if paid_left and not flat else 0.0
        drain = w_drain * (most_urgent - drains[index]) if flat else 0.0
        cost = w_cost * costs[index] if costs is not None else 0.0
        scores.append(
            CandidateScore(
                state.upstream.id,
                # One sum in term order: totals that tie must tie exactly (a regrouped sum differs in the last
                # bit, which reorders ties).
                cache_term
                + headroom_value
                + load
                + latency
                + errors
                + weight
                + spread_value
                + quota
                + metered
                + drain
                + cost,
                cache_term or None,
                headroom_value or None,
                load or None,
                latency or None,
                errors or None,
                weight or None,
                spread_value or None,
                quota or None,
                metered or None,
                drain or None,
                cost or None,
                raw_headroom or None,
                cache,
            )
        )
    return scores


def cache_scores(
    kept: Sequence[UpstreamState],
    prefix: PromptPrefix,
    costs: PromptCosts,
    now: float,
    hits: Sequence[CacheHit | None] | None,
) -> list[CacheScore]:
    """Each candidate's `CacheScore` for the request: from `hits` (the pool's warm index, in the candidates'
    order), else from its own warm cache. Worked out once per distinct hit: most candidates share one
    (nothing warm, or Claude Code's shared tools and system prompt)."""
    by_hit: dict[CacheHit | None, CacheScore] = {}
    scores = []
    for index, state in enumerate(kept):
        found = hits[index] if hits is not None else state.warm.lookup(prefix, now)
        score = by_hit.get(found)
        if score is None:
            score = by_hit[found] = costs.score(found)
        scores.append(score)
    return scores

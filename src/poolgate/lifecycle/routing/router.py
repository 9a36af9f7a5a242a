"""route: request + live pool state → `RouteDecision` (ordered candidates) and its `RoutingTrace`."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from poolgate.api.errors import ApiError, no_upstream
from poolgate.billing.book import ChannelBook
from poolgate.cache.breakpoints import PromptPrefix
from poolgate.cache.warmth import WarmLevel, hit
from poolgate.config import PinConfig, RoutingConfig
from poolgate.lifecycle.routing.affinity import SessionAffinity
from poolgate.lifecycle.routing.filters import (
    FILTERS,
    Filter,
    FilterResult,
    billing_filter,
    credential_filter,
    pin_filter,
    pin_for,
)
from poolgate.lifecycle.routing.scoring import (
    SHORT_OF_TOKENS,
    CandidateScore,
    headroom_term,
    is_paid_for,
    score_candidates,
    spread_terms,
)
from poolgate.lifecycle.routing.strategy import TerminalStrategy, make_strategy
from poolgate.lifecycle.routing.trace import RoutingTrace, StageDecision, TerminalDecision
from poolgate.lifecycle.sign import OAUTH_KIND
from poolgate.upstreams.pool import Pool, UpstreamState
from poolgate.upstreams.quota import quota_blocked_until
from poolgate.upstreams.ratelimits import exhausted_until


def _pinned(candidates: Sequence[UpstreamState], model: str, now: float, pin: PinConfig) -> FilterResult:
    return pin_filter(candidates, pin)


def _credentials(
    candidates: Sequence[UpstreamState], model: str, now: float, problem: Callable[[str], str | None]
) -> FilterResult:
    return credential_filter(candidates, problem)


def _still(ids: tuple[str, ...], kept: list[UpstreamState], dropped: list[Any]) -> tuple[str, ...]:
    """The ids a stage kept: the ones before it when it dropped none (most stages, most of the time)."""
    return ids if not dropped else tuple([state.upstream.id for state in kept])


def _decided(name: str, ids: tuple[str, ...], dropped: list[Any], began: float) -> StageDecision:
    """A stage's entry in the trace: the ids it kept, why it dropped the others, its time since `began`
    (µs, to a tenth)."""
    return StageDecision(name, ids, dict(dropped), round((time.perf_counter() - began) * 1e6, 1))


class RouteRefused(ApiError):
    """No candidate is left: the answer for the client, plus the trace that explains it."""

    def __init__(self, error: ApiError, trace: RoutingTrace) -> None:
        super().__init__(error.status, error.message, error.error_type, error.headers)
        self.trace = trace


@dataclass(frozen=True, slots=True)
class RouteDecision:
    order: tuple[UpstreamState, ...]
    trace: RoutingTrace


class Router:
    """Filters drop the candidates that cannot serve; scoring ranks the rest; the terminal strategy breaks
    ties; a session's own account goes first while it is usable and has headroom."""

    def __init__(
        self,
        pool: Pool,
        config: RoutingConfig,
        strategy: TerminalStrategy | None = None,
        credential_problem: Callable[[str], str | None] | None = None,
        quota_threshold: float = 0.8,
        billing: ChannelBook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        # Channel billing: flat-fee quotas (a filter), paid-for capacity and prices (scoring).
        self._billing = billing
        # Wall-clock time (subscription windows, calendar months); injectable for tests.
        self._clock = clock
        self._config = config
        # The signer's view: an account whose credential cannot be used (OAuth `needs_reauth`).
        self._credential_problem = credential_problem
        self._quota_threshold = quota_threshold
        self._strategy = strategy or make_strategy(config.strategy)
        self._retry_after = config.no_upstream_retry_after_seconds
        self.affinity = SessionAffinity(idle_ttl=config.session_idle_seconds)
        self._rng = random.Random()
        # The filter stages every request goes through, in order (a matching pin goes first).
        self._stages: tuple[tuple[str, Filter], ...] = FILTERS
        if credential_problem is not None:
            self._stages += (("credentials", partial(_credentials, problem=credential_problem)),)

    def route(
        self,
        model: str,
        now: float | None = None,
        session_id: str | None = None,
        prefix: PromptPrefix | None = None,
        caller: str | None = None,
    ) -> RouteDecision:
        now = time.monotonic() if now is None else now
        trace = RoutingTrace(stages=[])
        candidates = [state for state in self._pool.states() if state.upstream.enabled]
        stages = self._stages
        pin = pin_for(self._config.pins, model, caller) if self._config.pins else None
        if pin is not None:
            stages = (("pin", partial(_pinned, pin=pin)), *stages)
        ids = tuple([state.upstream.id for state in candidates])
        for name, stage in stages:
            began = time.perf_counter()
            kept, dropped = stage(candidates, model, now)
            ids = _still(ids, kept, dropped)
            trace.add(_decided(name, ids, dropped, began))
            candidates = kept
        now_wall = self._clock()
        if self._billing is not None and self._billing.limited:
            began = time.perf_counter()
            candidates, dropped, blocked = billing_filter(candidates, self._billing, now_wall)
            ids = _still(ids, candidates, dropped)
            trace.add(_decided("billing", ids, dropped, began))
            if blocked is not None:
                trace.terminal = TerminalDecision(strategy=self._strategy.name, chosen=None, order=())
                raise RouteRefused(ApiError(503, blocked, "api_error"), trace)
        order, sticky = self._order(
            candidates, now, session_id, prefix if self._config.cache_aware else None, trace, model, now_wall
        )
        trace.terminal = TerminalDecision(
            strategy=self._strategy.name,
            chosen=order[0].upstream.id if order else None,
            order=tuple([state.upstream.id for state in order]),
            sticky=sticky,
        )
        if not order:
            raise RouteRefused(self._refusal(model, trace, now), trace)
        return RouteDecision(tuple(order), trace)

    def _order(
        self,
        kept: list[UpstreamState],
        now: float,
        session_id: str | None,
        prefix: PromptPrefix | None,
        trace: RoutingTrace,
        model: str = "",
        now_wall: float | None = None,
    ) -> tuple[list[UpstreamState], bool]:
        if len(kept) <= 1:
            return kept, False
        began = time.perf_counter()
        now_wall = self._clock() if now_wall is None else now_wall
        sample = self._config.score_sample
        sampling = 0 < sample < len(kept) and not (self._billing is not None and self._billing.priced_by_upstream)
        preferred = self.affinity.preferred(session_id, now) if self._config.session_stickiness else None
        if preferred is not None:
            # Most requests continue a session whose account is fine: no need to score the others.
            home = next((state for state in kept if state.upstream.id == preferred), None)
            prompt_tokens = prefix.prompt_tokens if prefix is not None else 0
            if home is not None and headroom_term(home, now, prompt_tokens) < SHORT_OF_TOKENS:
                others = [state for state in kept if state is not home]
                rest = self._shuffled(others) if sampling else self._strategy.order(others)
                trace.scoring_us = (time.perf_counter() - began) * 1e6
                return [home, *rest], True
        levels = (
            self._pool.warm_index.levels(prefix)
            if prefix is not None and prefix.breakpoints and self._config.score_weights.cache
            else []
        )
        unscored: list[UpstreamState] = []
        if sampling:
            kept, unscored = self._sample(kept, sample, levels, preferred, now, now_wall)
            trace.sampled = True
        hits = {
            upstream_id: found
            for state in kept
            if (found := hit(levels, upstream_id := state.upstream.id, now)) is not None
        }
        spread = (
            spread_terms(kept, self.affinity.sessions)
            if session_id is not None and preferred is None and self._config.session_stickiness
            else None
        )
        scores = score_candidates(
            kept,
            prefix,
            now,
            self._config.score_weights,
            spread,
            now_wall,
            self._quota_threshold,
            billing=self._billing,
            model=model,
            hits=hits,
        )
        by_id: dict[str, CandidateScore] = {score.upstream_id: score for score in scores}
        best = min(score.total for score in scores)
        margin = best + self._config.tie_margin
        tied = [state for state, score in zip(kept, scores, strict=True) if score.total <= margin]
        rest = sorted(
            (state for state, score in zip(kept, scores, strict=True) if score.total > margin),
            key=lambda state: by_id[state.upstream.id].total,
        )
        order = [*self._strategy.order(tied), *rest, *unscored]
        sticky = False
        if preferred is not None:
            for index, state in enumerate(order):
                if state.upstream.id == preferred:
                    if not by_id[preferred].lacks_headroom:
                        order.insert(0, order.pop(index))
                        sticky = True
                    break
        if spread is not None and order:
            # Count the new session where it goes now, not when it is answered: the first turns of many
            # sessions arrive together, and each must see the others to spread.
            self.affinity.bind(session_id, order[0].upstream.id, now)
        trace.scores = scores
        trace.scoring_us = (time.perf_counter() - began) * 1e6
        return order, sticky

    def _sample(
        self,
        kept: list[UpstreamState],
        size: int,
        levels: list[WarmLevel],
        preferred: str | None,
        now: float,
        now_wall: float,
    ) -> tuple[list[UpstreamState], list[UpstreamState]]:
        """The candidates worth scoring for this request — the accounts warmest for its prompt, the
        session's own, paid-for capacity — topped up to `size` with a weighted random sample of the rest;
        and the others, shuffled, as the failover tail."""
        warmest: set[str] = set()
        for level in levels:  # longest first
            if len(warmest) >= size:
                break
            # A prefix more accounts hold than we score (Claude Code's shared tools and system prompt) tells
            # nothing about where this request belongs; picking its first holders would herd traffic.
            if len(level.holders) <= size:
                warmest.update(upstream_id for upstream_id, entry in level.holders.items() if entry.expires_at > now)
        billing = self._billing
        # Paid-for capacity is subscriptions and flat-fee channels: without either, no account needs asking.
        paid_possible = OAUTH_KIND in self._pool.kinds or (billing is not None and billing.flat_fee)
        chosen: list[UpstreamState] = []
        rest: list[UpstreamState] = []
        for state in kept:
            upstream_id = state.upstream.id
            if (
                upstream_id in warmest
                or upstream_id == preferred
                or (paid_possible and is_paid_for(state, billing, now_wall))
            ):
                chosen.append(state)
            else:
                rest.append(state)
        need = size - len(chosen)
        if need <= 0 or not rest:
            return chosen, self._shuffled(rest)
        weights = [state.upstream.weight for state in rest]
        if need >= len(rest):
            picked = rest
        elif min(weights) == max(weights):
            picked = self._rng.sample(rest, need)
        else:
            # Weighted draws with replacement; a repeat only makes the sample a little smaller.
            picked = list({id(state): state for state in self._rng.choices(rest, weights, k=need)}.values())
        picked_ids = {state.upstream.id for state in picked}
        return chosen + picked, self._shuffled([state for state in rest if state.upstream.id not in picked_ids])

    def _shuffled(self, states: list[UpstreamState]) -> list[UpstreamState]:
        """A failover tail for large pools: a random rotation (cheap, and no account is everyone's second)."""
        if len(states) <= 1:
            return states
        start = self._rng.randrange(len(states))
        return states[start:] + states[:start]

    def _refusal(self, model: str, trace: RoutingTrace, now: float) -> ApiError:
        reasons = trace.dropped()
        if not reasons:
            return no_upstream(self._retry_after, "No upstream accounts are configured or enabled")
        if all(reason == "model_not_supported" for reason in reasons.values()):
            return ApiError(404, f"model: {model} is not served by any upstream of this gateway")
        explained = ", ".join(f"{upstream}: {reason}" for upstream, reason in sorted(reasons.items()))
        return no_upstream(self._next_usable_in(now), f"No upstream account can serve this request ({explained})")

    def _next_usable_in(self, now: float) -> int:
        """Seconds until the first parked or cooling-down upstream may be tried again."""
        waits = [
            max(
                state.health.parked_until,
                state.health.retry_at if not state.health.healthy else 0.0,
                exhausted_until(state.ratelimits, now) or 0.0,
                quota_blocked_until(state.quota, now) or 0.0,
            )
            - now
            for state in self._pool.states()
            if state.upstream.enabled
        ]
        positive = [wait for wait in waits if wait > 0]
        return max(1, math.ceil(min(positive))) if positive else self._retry_after

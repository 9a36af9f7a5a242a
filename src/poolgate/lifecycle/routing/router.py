"""route: request + live pool state → `RouteDecision` (ordered candidates) and its `RoutingTrace`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from poolgate.api.errors import ApiError, no_upstream
from poolgate.lifecycle.routing.affinity import SessionAffinity
from poolgate.lifecycle.routing.filters import FILTERS
from poolgate.lifecycle.routing.strategy import TerminalStrategy
from poolgate.lifecycle.routing.trace import RoutingTrace, StageDecision, TerminalDecision
from poolgate.upstreams.pool import Pool, UpstreamState
from poolgate.upstreams.ratelimits import exhausted_until


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
    def __init__(
        self, pool: Pool, strategy: TerminalStrategy, retry_after: int, affinity: SessionAffinity | None = None
    ) -> None:
        self._pool = pool
        self._strategy = strategy
        self._retry_after = retry_after
        self.affinity = affinity or SessionAffinity()

    def route(self, model: str, now: float | None = None, session_id: str | None = None) -> RouteDecision:
        now = time.monotonic() if now is None else now
        trace = RoutingTrace(stages=[])
        candidates = [state for state in self._pool.states() if state.upstream.enabled]
        for name, stage in FILTERS:
            began = time.perf_counter()
            kept, dropped = stage(candidates, model, now)
            trace.add(
                StageDecision(
                    name=name,
                    kept=tuple(state.upstream.id for state in kept),
                    dropped=tuple(dropped),
                    duration_us=(time.perf_counter() - began) * 1e6,
                )
            )
            candidates = kept
        order = self._strategy.order(candidates)
        sticky = False
        preferred = self.affinity.preferred(session_id, now)
        if preferred is not None:
            for index, state in enumerate(order):
                if state.upstream.id == preferred:
                    order.insert(0, order.pop(index))
                    sticky = True
                    break
        trace.terminal = TerminalDecision(
            strategy=self._strategy.name,
            chosen=order[0].upstream.id if order else None,
            order=tuple(state.upstream.id for state in order),
            sticky=sticky,
        )
        if not order:
            raise RouteRefused(self._refusal(model, trace, now), trace)
        return RouteDecision(tuple(order), trace)

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
            )
            - now
            for state in self._pool.states()
            if state.upstream.enabled
        ]
        positive = [wait for wait in waits if wait > 0]
        return max(1, math.ceil(min(positive))) if positive else self._retry_after

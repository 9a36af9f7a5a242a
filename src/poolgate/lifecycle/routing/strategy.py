"""Terminal strategies: order the kept candidates; the first is the pick, the rest are failover order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from poolgate.config import Strategy
from poolgate.upstreams.pool import UpstreamState


class TerminalStrategy(Protocol):
    name: str

    def order(self, kept: Sequence[UpstreamState]) -> list[UpstreamState]: ...


class FirstPick:
    """Configuration order: a primary with ordered fallbacks. An order, not a share: weights do not apply."""

    name = "first-pick"

    def order(self, kept: Sequence[UpstreamState]) -> list[UpstreamState]:
        return list(kept)


# Round-robin positions kept beyond those of the accounts being ordered before the rest are let go.
PRUNE_AT = 1024


class WeightedRoundRobin:
    """Smooth weighted round-robin (as in nginx): weights respected, picks spread evenly, no bursts."""

    name = "round-robin"

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def order(self, kept: Sequence[UpstreamState]) -> list[UpstreamState]:
        if len(kept) <= 1:
            return list(kept)
        if len(self._current) > PRUNE_AT + 4 * len(kept):
            # Accounts removed from the pool (or never routed to again) would otherwise stay here for good.
            self._current = {state.upstream.id: self._current.get(state.upstream.id, 0) for state in kept}
        total = 0
        best: UpstreamState | None = None
        best_weight = 0
        for state in kept:
            weight = state.upstream.weight
            total += weight
            current = self._current.get(state.upstream.id, 0) + weight
            self._current[state.upstream.id] = current
            if best is None or current > best_weight:
                best, best_weight = state, current
        assert best is not None
        self._current[best.upstream.id] -= total
        order = [best]
        order += [state for state in kept if state is not best]
        return order


class WeightedRandom:
    """A weighted random order (Efraimidis–Spirakis sampling without replacement)."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def order(self, kept: Sequence[UpstreamState]) -> list[UpstreamState]:
        keyed = [(self._rng.random() ** (1.0 / state.upstream.weight), state) for state in kept]
        keyed.sort(key=lambda item: item[0], reverse=True)
        return [state for _, state in keyed]


def _load(state: UpstreamState) -> float:
    """Requests in flight per unit of weight."""
    return state.in_flight / state.upstream.weight


class LeastConnections:
    """Fewest requests in flight per unit of weight; the least loaded take turns by weighted round-robin, as
    in nginx's least_conn (sequential requests find every account at 0 in flight: breaking that tie by
    configuration order sent them all to the first)."""

    name = "least-connections"

    def __init__(self) -> None:
        self._turns = WeightedRoundRobin()

    def order(self, kept: Sequence[UpstreamState]) -> list[UpstreamState]:
        ranked = sorted(kept, key=_load)
        if len(ranked) < 2 or _load(ranked[1]) > _load(ranked[0]):  # one least loaded
            return ranked
        least = _load(ranked[0])
        first = self._turns.order([state for state in ranked if _load(state) == least])[0]
        return [first, *(state for state in ranked if state is not first)]


def make_strategy(name: Strategy) -> TerminalStrategy:
    strategies: dict[str, type[TerminalStrategy]] = {
        "first-pick": FirstPick,
        "round-robin": WeightedRoundRobin,
        "random": WeightedRandom,
        "least-connections": LeastConnections,
    }
    return strategies[name]()

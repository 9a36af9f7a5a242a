"""Terminal strategies: order the kept candidates; the first is the pick, the rest are failover order."""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Sequence
from operator import itemgetter
from typing import Protocol

from poolgate.config import Strategy
from poolgate.upstreams.pool import UpstreamState


class TerminalStrategy(Protocol):
    name: str

    def order(self, kept: Sequence[UpstreamState], drawn: UpstreamState | None = None) -> list[UpstreamState]:
        """`kept` in the order to try them. `drawn` is what `draw` chose from a whole pool of which only a
        sample was scored: when it is among `kept`, the weighted choice is made already and it goes first
        (weighing `kept` again would count the weights twice)."""
        ...

    def draw(self, cum_weights: Sequence[int]) -> int:
        """The position of the account this strategy chooses from a whole pool, given the running totals of
        its weights: a pool too large to score whole scores this one and a sample (`Router._sample`)."""
        ...


def _others(kept: Sequence[UpstreamState], drawn: UpstreamState) -> list[UpstreamState] | None:
    """`kept` but `drawn`; None when `drawn` is not among them."""
    others = [state for state in kept if state is not drawn]
    return others if len(others) < len(kept) else None


class FirstPick:
    """Configuration order: a primary with ordered fallbacks. An order, not a share: weights do not apply."""

    name = "first-pick"

    def order(self, kept: Sequence[UpstreamState], drawn: UpstreamState | None = None) -> list[UpstreamState]:
        return list(kept)  # `drawn` is the pool's first account: first here too when among `kept`

    def draw(self, cum_weights: Sequence[int]) -> int:
        return 0


def stride(total: int) -> int:
    """A step through `total` tickets that visits each once per round and keeps consecutive ones far apart:
    the first number from total/φ² on that shares no factor with `total`."""
    step = max(1, round(total * 0.381966))
    while math.gcd(step, total) != 1:
        step += 1
    return step


# Round-robin positions kept beyond those of the accounts being ordered before the rest are let go.
PRUNE_AT = 1024


class WeightedRoundRobin:
    """Smooth weighted round-robin (as in nginx): weights respected, picks spread evenly, no bursts."""

    name = "round-robin"

    def __init__(self) -> None:
        self._current: dict[str, int] = {}
        # `draw`'s walk over a whole pool's tickets (smooth round-robin would be a pass over every account).
        self._ticket = 0
        self._total = 0
        self._stride = 1

    def draw(self, cum_weights: Sequence[int]) -> int:
        """Each account holds as many tickets as its weight (consecutive ones); a round of `stride` steps
        visits every ticket once, so each round gives every account exactly its weight's share, and the long
        stride spreads an account's picks over the round instead of giving them in a row."""
        total = cum_weights[-1]
        if total != self._total:
            self._total, self._stride = total, stride(total)
        self._ticket = (self._ticket + self._stride) % total
        return bisect_right(cum_weights, self._ticket)

    def order(self, kept: Sequence[UpstreamState], drawn: UpstreamState | None = None) -> list[UpstreamState]:
        if drawn is not None and (others := _others(kept, drawn)) is not None:
            return [drawn, *others]
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

    def draw(self, cum_weights: Sequence[int]) -> int:
        return bisect_right(cum_weights, self._rng.random() * cum_weights[-1])

    def order(self, kept: Sequence[UpstreamState], drawn: UpstreamState | None = None) -> list[UpstreamState]:
        if drawn is not None and (others := _others(kept, drawn)) is not None:
            return [drawn, *self.order(others)]
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

    def draw(self, cum_weights: Sequence[int]) -> int:
        return self._turns.draw(cum_weights)

    def order(self, kept: Sequence[UpstreamState], drawn: UpstreamState | None = None) -> list[UpstreamState]:
        if len(kept) < 2:
            return list(kept)
        loads = [_load(state) for state in kept]
        least = min(loads)
        tied = [state for state, load in zip(kept, loads, strict=True) if load == least]
        if len(tied) == len(kept):  # all alike (sequential requests: none in flight): turns, no sort
            return self._turns.order(kept, drawn)
        ranked = [state for _, state in sorted(zip(loads, kept, strict=True), key=itemgetter(0))]
        if len(tied) == 1:
            return ranked
        first = self._turns.order(tied, drawn)[0]
        return [first, *(state for state in ranked if state is not first)]


def make_strategy(name: Strategy) -> TerminalStrategy:
    strategies: dict[str, type[TerminalStrategy]] = {
        "first-pick": FirstPick,
        "round-robin": WeightedRoundRobin,
        "random": WeightedRandom,
        "least-connections": LeastConnections,
    }
    return strategies[name]()

"""A retry budget: failover may add at most a share of extra upstream load, so an outage of the whole
pool never turns into a retry storm (the idea of Finagle's and Envoy's retry budgets).

Every request deposits `ratio` of a retry; time deposits `min_per_second` so that a quiet gateway can
still fail over; each retry withdraws one. The balance is capped, so a long healthy spell cannot bank an
unbounded burst. An assured retry (the relay's call: a first failover to an account that has not failed) is
never refused, but withdraws what there is, so a failing pool's retries stop sooner.
"""

from __future__ import annotations

# Seconds of the time-based floor, and requests' worth of the ratio, that the balance can hold.
CAP_SECONDS = 10.0
CAP_REQUESTS = 100.0


class RetryBudget:
    __slots__ = ("_balance", "_cap", "_last", "_min_per_second", "_ratio")

    def __init__(self, ratio: float, min_per_second: float, now: float) -> None:
        self._ratio = ratio
        self._min_per_second = min_per_second
        self._cap = max(1.0, min_per_second * CAP_SECONDS + ratio * CAP_REQUESTS)
        self._balance = self._cap
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            # Capped by a comparison, not `min()`, whose call costs ~1,400 instructions more (CPython 3.11): this
            # and `request` run for every request.
            balance = self._balance + (now - self._last) * self._min_per_second
            self._balance = balance if balance < self._cap else self._cap
            self._last = now

    def request(self, now: float) -> None:
        """A new client request: it earns a share of a retry."""
        self._refill(now)
        balance = self._balance + self._ratio
        self._balance = balance if balance < self._cap else self._cap

    def try_retry(self, now: float, assured: bool = False) -> bool:
        """Spend one retry if the budget allows it; an `assured` one goes anyway (spending one if there is)."""
        self._refill(now)
        if self._balance >= 1.0:
            self._balance -= 1.0
            return True
        return assured

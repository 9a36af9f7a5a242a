"""observe: lifecycle events fan out to observers; an observer never blocks or fails a request.

Observers follow the mitmproxy-addon model: a small object implementing only the hooks it cares about
(`request_finished(event)` for `RequestFinished`). `Observers`, the composite, calls each in order; an
observer that raises is counted and logged (its first failure with the traceback, then one line every
`log_every` failures) and the next observer still runs. Hooks run on the event loop after the answer has
been sent, for a batch of requests at a time (see `Gateway._account`): they must be quick (hand work to a
queue, as the usage writer does), never await.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import msgspec

from poolgate.lifecycle.context import Outcome, Principal, Usage, UsageRecord
from poolgate.telemetry.logging import field

if TYPE_CHECKING:
    from poolgate.lifecycle.routing.trace import RoutingTrace

log = logging.getLogger("poolgate.observe")

LOG_EVERY = 100


class RequestFinished(msgspec.Struct, frozen=True):
    """A request that ended, well or badly: what every observer gets.

    `record` is the usage record as the ledger stores it (tokens, cost, timings, outcome); the rest is the
    live context that is not stored as such: the caller (with its claims, e.g. `chain`), the routing trace
    as an object, the provider (the upstream's kind), the usage counters, and for a failure the message the
    client was told (the record keeps its type only)."""

    record: UsageRecord
    principal: Principal | None
    route: RoutingTrace | None
    provider: str | None
    usage: Usage
    error_message: str | None = None

    @property
    def request_id(self) -> str:
        return self.record.request_id

    @property
    def ok(self) -> bool:
        """The request's outcome is `ok`: answered in full. A stream that failed or that its client left after
        its 200 is not ok, as a request its client left before the answer began (499) is not."""
        return self.record.outcome == Outcome.ok

    @property
    def error_type(self) -> str | None:
        """The Anthropic error type the request ended with (an upstream's, the gateway's, or a stream's
        in-band `error` event); None for a success."""
        return self.record.error_type

    @property
    def upstream_id(self) -> str | None:
        return self.record.upstream_id

    @property
    def model(self) -> str | None:
        return self.record.model

    @property
    def chain(self) -> str | None:
        return self.principal.claims.chain if self.principal is not None else None

    @property
    def latency_ms(self) -> float:
        return self.record.duration_ms

    @property
    def cost_micro_usd(self) -> int | None:
        """The cost in µUSD; None when unknown, and for a channel priced in another currency (its amount is
        `record.cost_micro_usd`, in micro-units of `record.currency`), as `poolgate_cost_micro_usd_total`
        leaves it out: µcredits read as µUSD reported credits as dollars."""
        record = self.record
        return record.cost_micro_usd if record.currency == "USD" else None


ObserveEvent = RequestFinished


class Observer(Protocol):
    def request_finished(self, event: RequestFinished) -> None: ...


class Observers:
    """The composite observer: every observer's hook in order; an exception is counted and logged, never
    raised, so a broken observer cannot break serving or starve the ones after it. An observer without a
    hook is simply not called for that event."""

    def __init__(self, observers: list[Observer] | None = None, log_every: int = LOG_EVERY) -> None:
        self._observers: list[Observer] = []
        self._finished: list[tuple[str, Callable[[RequestFinished], None]]] = []
        self._log_every = max(1, log_every)
        self.errors = 0
        self.errors_by_observer: dict[str, int] = {}
        for observer in observers or ():
            self.add(observer)

    def add(self, observer: Observer, first: bool = False) -> None:
        """Raises TypeError for an `async def` hook: called, it would only make a coroutine that never runs
        (hooks are never awaited: they run after the answer, on the event loop, and must not block it)."""
        if inspect.iscoroutinefunction(getattr(observer, "request_finished", None)):
            raise TypeError(
                f"observer {type(observer).__name__}: request_finished is `async def`, and hooks are never"
                " awaited; make it a plain method that hands slow work to a queue or a task"
            )
        if first:
            self._observers.insert(0, observer)
        else:
            self._observers.append(observer)
        self._hooks()

    def remove(self, observer: Observer) -> None:
        self._observers.remove(observer)
        self._hooks()

    def _hooks(self) -> None:
        self._finished = [
            (type(observer).__name__, hook)
            for observer in self._observers
            if callable(hook := getattr(observer, "request_finished", None))
        ]

    def request_finished(self, event: RequestFinished) -> None:
        for name, hook in self._finished:
            try:
                hook(event)
            # A CancelledError is an observer's bug like any other here (`.result()` of a cancelled task):
            # nothing awaits the hooks that could be cancelled, and let through it lost the rest of the batch.
            except (Exception, asyncio.CancelledError) as exc:
                self._failed(name, exc)

    def _failed(self, name: str, exc: BaseException) -> None:
        self.errors += 1
        count = self.errors_by_observer.get(name, 0) + 1
        self.errors_by_observer[name] = count
        if count == 1:
            log.error(
                "observer %s failed on request_finished (ignored; further failures logged every %d)",
                name,
                self._log_every,
                exc_info=exc,
            )
        elif count % self._log_every == 0:
            log.error("observer %s failed on request_finished %d times so far; latest: %r", name, count, exc)


class LogObserver:
    """One line per finished request: ids, upstream, status, tokens, cost, timings. Never credentials."""

    def __init__(self) -> None:
        self._log = logging.getLogger("poolgate.access")

    def request_finished(self, event: RequestFinished) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        record = event.record
        self._log.info(
            "%s %s key=%s upstream=%s model=%s status=%d outcome=%s in=%d out=%d cache_w=%d cache_r=%d "
            "cost_micro=%s ttfb_ms=%s ms=%.1f attempts=%d%s",
            record.request_id,
            record.endpoint,
            field(record.principal_name),
            field(record.upstream_id),
            field(record.model),
            record.status,
            record.outcome,
            record.input_tokens,
            record.output_tokens,
            record.cache_creation_input_tokens,
            record.cache_read_input_tokens,
            logged_cost(record),
            f"{record.ttfb_ms:.1f}" if record.ttfb_ms is not None else "-",
            record.duration_ms,
            record.attempts,
            what_failed(record, event.route),
        )


def logged_cost(record: UsageRecord) -> str:
    """The access log's `cost_micro=`: the cost in micro-units, `unknown` for none, and ` currency=credits`
    after it for a price in another currency than USD, so that a sum over the log adds no credits to dollars."""
    if record.cost_micro_usd is None:
        return "unknown"
    if record.currency == "USD":
        return str(record.cost_micro_usd)
    return f"{record.cost_micro_usd} currency={field(record.currency)}"


def what_failed(record: UsageRecord, route: RoutingTrace | None) -> str:
    """The end of a failed request's access log line, its error type (` error=overloaded_error`), and that of a
    request that failed over: the accounts it tried before the one that answered, or each one it tried when
    none did (` failed=k0:529:overloaded_error,k1:429:rate_limit_error`), and ` retry_budget=denied` when the retry
    budget stopped its failover; nothing for a plain success."""
    error = "" if record.error_type is None else " error=" + field(record.error_type)
    if route is None or not route.failed:
        return error
    failed = " failed=" + field(",".join(f"{f.upstream_id}:{f.status}:{f.error_type}" for f in route.failed))
    return error + failed + (" retry_budget=denied" if route.retry_budget_denied else "")

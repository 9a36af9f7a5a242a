"""Prometheus metrics: what happened to requests (an observer, counted as they finish) and the pool's live
state (read at scrape time, so the hot path pays nothing for it).

Labels are bounded: upstream ids and kinds come from configuration, and a model is only a label once an
upstream has served it (a caller cannot mint label values with made-up model names).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from poolgate.lifecycle.observe import RequestFinished
from poolgate.upstreams.health import unusable_reason
from poolgate.upstreams.pool import Pool
from poolgate.upstreams.ratelimits import headroom

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# Model calls take from a second to several minutes; time to first byte from ~100 ms to a minute.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
TTFB_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
TOKEN_KINDS = ("input", "output", "cache_creation", "cache_read")
_Child = Counter | Histogram


class Metrics:
    def __init__(self, pool: Pool, credential_problem: Callable[[str], str | None], observer_errors: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "poolgate_requests",
            "Finished requests by endpoint, upstream, model, status and outcome",
            ("endpoint", "upstream", "model", "status", "outcome"),
            registry=self.registry,
        )
        self._tokens = Counter(
            "poolgate_tokens",
            "Tokens by upstream, model and kind",
            ("upstream", "model", "kind"),
            registry=self.registry,
        )
        self._cost = Counter(
            "poolgate_cost_micro_usd",
            "Priced cost of finished requests in micro-USD (requests with an unknown price are not counted)",
            ("upstream", "model"),
            registry=self.registry,
        )
        self._duration = Histogram(
            "poolgate_request_duration_seconds",
            "Request duration, first byte received to last byte sent",
            ("endpoint",),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._ttfb = Histogram(
            "poolgate_time_to_first_byte_seconds",
            "Time from the request's arrival to the first byte of the answer",
            ("upstream",),
            buckets=TTFB_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_PoolCollector(pool, credential_problem, observer_errors))
        # The labelled children, by label values: `labels()` validates and locks on every call, and the
        # label sets are few and bounded (see the module docstring).
        self._children: dict[tuple[object, ...], _Child] = {}

    def _child(self, metric: Counter | Histogram, *values: str) -> _Child:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def request_finished(self, event: RequestFinished) -> None:
        record = event.record
        upstream = record.upstream_id or "-"
        model = (record.model or "-") if record.upstream_id is not None else "-"
        self._child(self._requests, record.endpoint, upstream, model, str(record.status), record.outcome).inc()
        self._child(self._duration, record.endpoint).observe(record.duration_ms / 1000)
        if record.ttfb_ms is not None:
            self._child(self._ttfb, upstream).observe(record.ttfb_ms / 1000)
        counts = (
            record.input_tokens,
            record.output_tokens,
            record.cache_creation_input_tokens,
            record.cache_read_input_tokens,
        )
        for kind, count in zip(TOKEN_KINDS, counts, strict=True):
            if count:
                self._child(self._tokens, upstream, model, kind).inc(count)
        cost = record.cost_micro_usd
        if cost:
            self._child(self._cost, upstream, model).inc(cost)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    """Gauges of every account's live state, computed when Prometheus scrapes."""

    def __init__(
        self, pool: Pool, credential_problem: Callable[[str], str | None], observer_errors: Callable[[], int]
    ) -> None:
        self._pool = pool
        self._credential_problem = credential_problem
        self._observer_errors = observer_errors

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        wall = time.time()
        labels = ("upstream", "kind")
        usable = GaugeMetricFamily("poolgate_upstream_usable", "1 when the account can take requests", labels=labels)
        in_flight = GaugeMetricFamily("poolgate_upstream_in_flight", "Requests in flight", labels=labels)
        room = GaugeMetricFamily(
            "poolgate_upstream_headroom", "Share left of the tightest rate-limit window (estimated)", labels=labels
        )
        errors = GaugeMetricFamily("poolgate_upstream_error_rate", "Recent error rate (EWMA)", labels=labels)
        ttfb = GaugeMetricFamily("poolgate_upstream_ttfb_seconds", "Time to first byte (EWMA)", labels=labels)
        warm = GaugeMetricFamily("poolgate_upstream_warm_cache_entries", "Prompt prefixes warm", labels=labels)
        reauth = GaugeMetricFamily(
            "poolgate_account_needs_reauth", "1 when a subscription account needs a new login", labels=labels
        )
        utilisation = GaugeMetricFamily(
            "poolgate_subscription_utilization",
            "A subscription window's utilisation (0..1) as last reported",
            labels=("upstream", "window"),
        )
        for state in self._pool.states():
            values = [state.upstream.id, state.upstream.kind]
            problem = self._credential_problem(state.upstream.id)
            ok = state.upstream.enabled and problem is None and unusable_reason(state.health, now) is None
            usable.add_metric(values, 1.0 if ok else 0.0)
            in_flight.add_metric(values, state.in_flight)
            share, _ = headroom(state.ratelimits, now, state.in_flight, state.stats.prompt_tokens or 0.0)
            room.add_metric(values, share)
            errors.add_metric(values, state.stats.error_rate(now))
            if state.stats.ttfb_ms is not None:
                ttfb.add_metric(values, state.stats.ttfb_ms / 1000)
            warm.add_metric(values, len(state.warm))
            reauth.add_metric(values, 1.0 if problem == "needs_reauth" else 0.0)
            if state.quota is not None:
                for name, window in state.quota.windows.items():
                    live = window.resets_at is None or window.resets_at > wall
                    if window.utilization is not None and live:
                        utilisation.add_metric([state.upstream.id, name], window.utilization)
        observer = GaugeMetricFamily("poolgate_observer_errors", "Observer hooks that raised (never fail requests)")
        observer.add_metric([], self._observer_errors())
        yield from (usable, in_flight, room, errors, ttfb, warm, reauth, utilisation, observer)

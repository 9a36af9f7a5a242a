"""Prometheus metrics: what happened to requests (an observer, counted as they finish) and the pool's live
state (read at scrape time, so the hot path pays nothing for it).

Labels are bounded: upstream ids and kinds come from configuration, and a model is only a label once an
upstream has served it (a caller cannot mint label values with made-up model names), and only the first
`MAX_MODELS` models served are (an upstream that answers any model id, as some Anthropic-compatible ones
do, would let callers mint them after all); later ones count as `(other)` until a restart. An upstream's
failed attempts are labelled with Anthropic's error types only, and `connection_error` for an account that
gave no answer (see `CONNECTION_ERROR`).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from functools import partial

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from poolgate.api.errors import ERROR_TYPE_BY_STATUS
from poolgate.billing.book import PRICING_FAILED
from poolgate.lifecycle.observe import RequestFinished
from poolgate.lifecycle.routing.trace import CONNECTION_ERROR
from poolgate.upstreams.pool import Pool

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# Model calls take from a second to several minutes; time to first byte from ~100 ms to a minute.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
TTFB_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
# Distinct model labels: far more than any pool serves (Anthropic lists a few tens of ids and aliases). The
# label of requests no upstream answered (`-`) is not one of them; `(other)` can be no model's id.
MAX_MODELS = 200
NO_MODEL = "-"
OTHER_MODEL = "(other)"
# The error types an upstream's failed attempt is counted under; any other is `other`.
ERROR_TYPES = frozenset({*ERROR_TYPE_BY_STATUS.values(), CONNECTION_ERROR})


class _Histogram:
    """One labelled histogram: its bounds, counts per bucket (not cumulative; the last is +Inf) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, total = [], 0
        # Bounds spelled as prometheus_client spells them ("1.0", "+Inf"): dashboards match on `le`.
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            cumulative.append((bound, float(total)))
        return cumulative


class Metrics:
    """Request metrics, counted in plain dicts as requests finish and turned into Prometheus families only
    when scraped: the event loop is the only writer (no locks), and a request pays a few dict updates
    rather than prometheus_client's locked counters and bucket loops."""

    def __init__(
        self,
        pool: Pool,
        credential_problem: Callable[[str], str | None],
        unusable: Callable[[float], dict[str, str | None]],
        observer_errors: Callable[[], int],
        keepalives_skipped: Callable[[], Mapping[str, int]] = dict,
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        # Counts by label values.
        self._requests: Counter[tuple[str, ...]] = Counter()
        self._tokens: Counter[tuple[str, ...]] = Counter()
        self._cost: Counter[tuple[str, ...]] = Counter()
        self._pricing_failures: Counter[tuple[str, ...]] = Counter()
        self._failed_attempts: Counter[tuple[str, ...]] = Counter()
        self._retry_budget_denied = 0
        self._duration: defaultdict[str, _Histogram] = defaultdict(partial(_Histogram, DURATION_BUCKETS))
        self._ttfb: defaultdict[str, _Histogram] = defaultdict(partial(_Histogram, TTFB_BUCKETS))
        self._models: set[str] = set()
        self.registry.register(_RequestCollector(self))
        self.registry.register(_PoolCollector(pool, credential_problem, unusable, observer_errors, keepalives_skipped))

    def request_finished(self, event: RequestFinished) -> None:
        record = event.record
        upstream = record.upstream_id or "-"
        model = self._model_label(record.model, record.upstream_id is not None and record.status == 200)
        self._requests[(record.endpoint, upstream, model, str(record.status), record.outcome)] += 1
        self._duration[record.endpoint].observe(record.duration_ms / 1000)
        if record.ttfb_ms is not None:
            self._ttfb[upstream].observe(record.ttfb_ms / 1000)
        # Kind by kind rather than in a loop over them: this runs for every request.
        tokens = self._tokens
        if record.input_tokens:
            tokens[(upstream, model, "input")] += record.input_tokens
        if record.output_tokens:
            tokens[(upstream, model, "output")] += record.output_tokens
        if record.cache_creation_input_tokens:
            tokens[(upstream, model, "cache_creation")] += record.cache_creation_input_tokens
        if record.cache_read_input_tokens:
            tokens[(upstream, model, "cache_read")] += record.cache_read_input_tokens
        if record.cost_micro_usd and record.currency == "USD":  # a channel priced in credits is not dollars
            self._cost[(upstream, model)] += record.cost_micro_usd
        elif record.pricing_version == PRICING_FAILED:
            self._pricing_failures[(upstream,)] += 1
        route = event.route
        if route is not None:
            if route.retry_budget_denied:
                self._retry_budget_denied += 1
            for failed in route.failed or ():
                # The type is the upstream's word: only Anthropic's own name a series.
                kind = failed.error_type if failed.error_type in ERROR_TYPES else "other"
                self._failed_attempts[(failed.upstream_id, str(failed.status), kind)] += 1

    def _model_label(self, model: str | None, served: bool) -> str:
        """A request's model label: the model's once an upstream has served it, whether or not this request
        was answered. Only an answered request makes a model a label: an upstream's 404 for a made-up model id
        is not "served", and labelling it would let any caller add series without bound."""
        if not model:
            return NO_MODEL
        if model in self._models:
            return model
        if not served:
            return NO_MODEL
        if len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return OTHER_MODEL

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    """The request counters and histograms, as Prometheus families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield _counter(
            "poolgate_requests",
            "Finished requests by endpoint, upstream, model, status and outcome",
            ("endpoint", "upstream", "model", "status", "outcome"),
            m._requests,
        )
        yield _counter(
            "poolgate_tokens", "Tokens by upstream, model and kind", ("upstream", "model", "kind"), m._tokens
        )
        yield _counter(
            "poolgate_cost_micro_usd",
            "Priced cost of finished requests in micro-USD (requests with an unknown price are not counted)",
            ("upstream", "model"),
            m._cost,
        )
        yield _counter(
            "poolgate_pricing_failures",
            "Requests whose pricing failed (a fault in the gateway): their cost is unknown; one on a budget was"
            " charged its reservation",
            ("upstream",),
            m._pricing_failures,
        )
        yield _counter(
            "poolgate_upstream_failed_attempts",
            "Attempts an upstream answered with an error or did not answer, by upstream, status and error type:"
            " those failed over from as well as a request's last",
            ("upstream", "status", "error_type"),
            m._failed_attempts,
        )
        yield CounterMetricFamily(
            "poolgate_retry_budget_denied",
            "Requests whose failover the retry budget stopped, accounts left untried (the pool failing as a whole)",
            value=m._retry_budget_denied,
        )
        yield _histogram(
            "poolgate_request_duration_seconds",
            "Request duration, first byte received to last byte sent",
            "endpoint",
            m._duration,
        )
        yield _histogram(
            "poolgate_time_to_first_byte_seconds",
            "Time from the request's arrival to the first byte of the answer",
            "upstream",
            m._ttfb,
        )


def _counter(
    name: str, documentation: str, labels: tuple[str, ...], counts: Counter[tuple[str, ...]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in list(counts.items()):
        family.add_metric(values, count)
    return family


def _histogram(name: str, documentation: str, label: str, histograms: dict[str, _Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=(label,))
    for value, histogram in list(histograms.items()):
        family.add_metric([value], histogram.buckets(), histogram.sum)
    return family


class _PoolCollector(Collector):
    """Gauges of every account's live state, computed when Prometheus scrapes."""

    def __init__(
        self,
        pool: Pool,
        credential_problem: Callable[[str], str | None],
        unusable: Callable[[float], dict[str, str | None]],
        observer_errors: Callable[[], int],
        keepalives_skipped: Callable[[], Mapping[str, int]],
    ) -> None:
        self._pool = pool
        self._credential_problem = credential_problem
        self._unusable = unusable
        self._observer_errors = observer_errors
        self._keepalives_skipped = keepalives_skipped

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        wall = time.time()
        reasons = self._unusable(now)
        labels = ("upstream", "kind")
        usable = GaugeMetricFamily("poolgate_upstream_usable", "1 when the account can take requests", labels=labels)
        in_flight = GaugeMetricFamily("poolgate_upstream_in_flight", "Requests in flight", labels=labels)
        room = GaugeMetricFamily(
            "poolgate_upstream_headroom",
            "Share left of the tightest rate-limit window (estimated; 0 while rate-limited)",
            labels=labels,
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
            usable.add_metric(values, 1.0 if reasons.get(state.upstream.id) is None else 0.0)
            in_flight.add_metric(values, state.in_flight)
            share, _ = state.reported_headroom(now, reasons.get(state.upstream.id))
            room.add_metric(values, share)
            errors.add_metric(values, state.stats.error_rate(now))
            if state.stats.ttfb_ms is not None:
                ttfb.add_metric(values, state.stats.ttfb_ms / 1000)
            warm.add_metric(values, state.warm.live(now))
            reauth.add_metric(values, 1.0 if problem == "needs_reauth" else 0.0)
            if state.quota is not None:
                for name, window in state.quota.windows.items():
                    live = window.resets_at is None or window.resets_at > wall
                    if window.utilization is not None and live:
                        utilisation.add_metric([state.upstream.id, name], window.utilization)
        # A count that only goes up: a counter (`_total`), so that rate() and increase() read it.
        observer = CounterMetricFamily("poolgate_observer_errors", "Observer hooks that raised (never fail requests)")
        observer.add_metric([], self._observer_errors())
        # Why cache keepalives were not sent (a few fixed reasons: `CacheKeepalive` names them).
        skipped = CounterMetricFamily("poolgate_keepalive_skipped", "Cache keepalives not sent", labels=("reason",))
        for reason, count in sorted(self._keepalives_skipped().items()):
            skipped.add_metric([reason], count)
        yield from (usable, in_flight, room, errors, ttfb, warm, reauth, utilisation, observer, skipped)

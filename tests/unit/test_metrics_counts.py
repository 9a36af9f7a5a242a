"""/metrics counts what finished: per-label request and token counters, cost, and histograms whose
buckets hold every observation at or below their bound (Prometheus' `le`)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace
from prometheus_client.parser import text_string_to_metric_families

from poolgate.lifecycle.observe import RequestFinished
from poolgate.telemetry.metrics import DURATION_BUCKETS, MAX_MODELS, TTFB_BUCKETS, Metrics
from poolgate.upstreams.pool import Pool
from tests.unit.test_observe import event


def metrics() -> Metrics:
    return Metrics(Pool(16), lambda upstream_id: None, lambda now: {}, lambda: 0)


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = m.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def finished(
    duration_ms: float, upstream: str | None = "a", ttfb_ms: float | None = None, **fields: object
) -> RequestFinished:
    base = event()
    record = replace(base.record, upstream_id=upstream, duration_ms=duration_ms, ttfb_ms=ttfb_ms, **fields)
    return replace(base, record=record)


def test_requests_tokens_and_cost_are_counted_by_their_labels() -> None:
    m = metrics()
    for _ in range(3):
        m.request_finished(finished(5.0, input_tokens=10, output_tokens=2, cost_micro_usd=7, currency="USD"))
    m.request_finished(finished(5.0, upstream=None, status=529, outcome="no_upstream"))
    got = samples(m)
    served = (("endpoint", "messages"), ("model", "m"), ("outcome", "ok"), ("status", "200"), ("upstream", "a"))
    refused = (
        ("endpoint", "messages"),
        ("model", "m"),  # served before: a label already
        ("outcome", "no_upstream"),
        ("status", "529"),
        ("upstream", "-"),
    )
    assert got[("poolgate_requests_total", served)] == 3
    assert got[("poolgate_requests_total", refused)] == 1
    assert got[("poolgate_tokens_total", (("kind", "input"), ("model", "m"), ("upstream", "a")))] == 30
    assert got[("poolgate_tokens_total", (("kind", "output"), ("model", "m"), ("upstream", "a")))] == 6
    # Kinds with no tokens are not invented.
    assert ("poolgate_tokens_total", (("kind", "cache_read"), ("model", "m"), ("upstream", "a"))) not in got
    assert got[("poolgate_cost_micro_usd_total", (("model", "m"), ("upstream", "a")))] == 21


def test_a_cost_in_another_currency_is_not_counted_as_dollars() -> None:
    """A channel priced in credits: its 975 credits were added to the µUSD counter."""
    m = metrics()
    m.request_finished(finished(5.0, cost_micro_usd=7, currency="USD"))
    m.request_finished(finished(5.0, cost_micro_usd=975, currency="credits"))
    assert samples(m)[("poolgate_cost_micro_usd_total", (("model", "m"), ("upstream", "a")))] == 7


def test_a_model_id_no_upstream_served_never_becomes_a_label() -> None:
    """An upstream's 404 for a made-up model carries its upstream id; a caller must not be able to mint
    series (and gateway memory) by sending model ids at random."""
    m = metrics()
    for index in range(50):
        m.request_finished(
            finished(5.0, model=f"made-up-{index}", status=404, outcome="client_error", error_type="not_found_error")
        )
    got = samples(m)
    assert not any("made-up" in value for _, labels in got for _, value in labels)
    refused = (
        ("endpoint", "messages"),
        ("model", "-"),
        ("outcome", "client_error"),
        ("status", "404"),
        ("upstream", "a"),
    )
    assert got[("poolgate_requests_total", refused)] == 50


def test_a_failed_request_for_a_model_already_served_is_counted_under_that_model() -> None:
    m = metrics()
    m.request_finished(finished(5.0))
    m.request_finished(finished(5.0, upstream="b", status=529, outcome="upstream_error", error_type="overloaded_error"))
    m.request_finished(finished(5.0, model="never-served", status=404, outcome="client_error"))
    got = samples(m)
    failed = (("endpoint", "messages"), ("model", "m"), ("outcome", "upstream_error"), ("status", "529"))
    unknown = (("endpoint", "messages"), ("model", "-"), ("outcome", "client_error"), ("status", "404"))
    assert got[("poolgate_requests_total", (*failed, ("upstream", "b")))] == 1
    assert got[("poolgate_requests_total", (*unknown, ("upstream", "a")))] == 1


def test_an_upstream_that_serves_any_model_id_cannot_make_labels_without_bound() -> None:
    """Some Anthropic-compatible upstreams answer whatever model they are asked for: 2,000 made-up ids made
    10,000 series and a 1 MB scrape. Requests no upstream answered keep their `-` past the cap."""
    m = metrics()
    for index in range(MAX_MODELS + 50):
        m.request_finished(finished(5.0, model=f"served-{index}", input_tokens=1, cost_micro_usd=1, currency="USD"))
    m.request_finished(finished(5.0, upstream=None, status=529, outcome="no_upstream"))
    got = samples(m)
    models = {value for _, labels in got for name, value in labels if name == "model"}
    assert models == {f"served-{index}" for index in range(MAX_MODELS)} | {"(other)", "-"}

    def requests(model: str) -> float:
        return sum(
            value
            for (name, labels), value in got.items()
            if name == "poolgate_requests_total" and ("model", model) in labels
        )

    assert requests("(other)") == 50 and requests("-") == 1  # counted all the same


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1_000_000, allow_nan=False), min_size=1, max_size=40))
def test_histogram_buckets_are_cumulative_counts_at_or_below_each_bound(durations_ms: list[float]) -> None:
    m = metrics()
    for duration in durations_ms:
        m.request_finished(finished(duration, ttfb_ms=duration))
    got = samples(m)
    seconds = [duration / 1000 for duration in durations_ms]
    for name, bounds, labels in (
        ("poolgate_request_duration_seconds", DURATION_BUCKETS, (("endpoint", "messages"),)),
        ("poolgate_time_to_first_byte_seconds", TTFB_BUCKETS, (("upstream", "a"),)),
    ):
        for bound in bounds:
            key = (f"{name}_bucket", tuple(sorted((*labels, ("le", str(float(bound)))))))
            assert got[key] == sum(1 for value in seconds if value <= bound)
        assert got[(f"{name}_bucket", tuple(sorted((*labels, ("le", "+Inf")))))] == len(seconds)
        assert got[(f"{name}_count", labels)] == len(seconds)
        assert abs(got[(f"{name}_sum", labels)] - sum(seconds)) <= 1e-6 * max(1.0, sum(seconds))

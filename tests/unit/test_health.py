"""Upstream health: thresholds, immediate 5xx, escalating cooldowns, half-open probes, parking."""

from __future__ import annotations

from poolgate.config import HealthConfig
from poolgate.upstreams.health import (
    Failure,
    HealthState,
    begin_attempt,
    end_probe,
    park,
    record_answer,
    record_failure,
    record_success,
    refuses_failover,
    unusable_reason,
)

CONFIG = HealthConfig(failure_threshold=3, cooldown_seconds=2.0)


def test_three_consecutive_failures_make_an_upstream_unhealthy() -> None:
    state = HealthState()
    for _ in range(2):
        record_failure(state, Failure.connect, 0.0, CONFIG)
        assert unusable_reason(state, 0.0) is None
    record_failure(state, Failure.connect, 0.0, CONFIG)
    assert unusable_reason(state, 0.0) == "unhealthy"


def test_a_server_error_makes_it_unhealthy_at_once() -> None:
    state = HealthState()
    record_failure(state, Failure.server_error, 0.0, CONFIG)
    assert unusable_reason(state, 1.0) == "unhealthy"


def test_cooldowns_grow_base_5x_15x_and_a_success_resets_everything() -> None:
    state = HealthState()
    now = 0.0
    for expected in (2.0, 10.0, 30.0, 30.0):
        record_failure(state, Failure.server_error, now, CONFIG)
        assert unusable_reason(state, now + expected - 0.01) == "unhealthy"
        assert unusable_reason(state, now + expected) is None
        now += expected
        begin_attempt(state, now)  # the half-open probe
        assert unusable_reason(state, now) == "unhealthy", "only one probe at a time"
    record_success(state)
    assert state.healthy and state.consecutive_failures == 0
    record_failure(state, Failure.server_error, now, CONFIG)
    assert state.retry_at == now + 2.0


def test_a_failed_probe_sends_it_back_to_cooldown() -> None:
    state = HealthState()
    for _ in range(3):
        record_failure(state, Failure.overloaded, 0.0, CONFIG)
    begin_attempt(state, 2.0)
    record_failure(state, Failure.overloaded, 2.0, CONFIG)
    assert unusable_reason(state, 2.0 + 9.9) == "unhealthy"


def test_a_probe_without_a_verdict_frees_the_half_open_slot() -> None:
    """A probe that got neither a success nor a failure (a 429, the client left) must not keep the account
    "probing", out of rotation, for good; while it runs, no second probe is let through."""
    state = HealthState()
    record_failure(state, Failure.server_error, 0.0, CONFIG)
    probe = begin_attempt(state, 2.0)
    assert probe
    assert not begin_attempt(state, 2.0) and unusable_reason(state, 2.0) == "unhealthy"
    end_probe(state, probe)
    assert unusable_reason(state, 2.0) is None and begin_attempt(state, 2.0)


def test_an_old_probe_ending_late_leaves_the_newer_probes_slot() -> None:
    """A stream that was an account's probe makes it healthy with its first event and may run for minutes; if
    the account fails and cools down meanwhile, the probe then in flight is the only one: the old stream's end
    must not let a second probe through beside it."""
    state = HealthState()
    record_failure(state, Failure.server_error, 0.0, CONFIG)
    streaming = begin_attempt(state, 2.0)
    record_answer(state, sent_at=2.0)  # its first event: healthy again
    record_failure(state, Failure.server_error, 3.0, CONFIG)  # another request's 500: out again
    newer = begin_attempt(state, 100.0)
    assert newer and newer != streaming
    end_probe(state, streaming)  # the long stream ends, long after its verdict
    assert not begin_attempt(state, 100.0) and unusable_reason(state, 100.0) == "unhealthy"
    end_probe(state, newer)
    assert unusable_reason(state, 100.0) is None


def test_failures_of_requests_sent_before_it_went_unhealthy_do_not_escalate_its_cooldown() -> None:
    """Ten requests in flight when the account breaks fail together: one episode (base cooldown), not a
    15x cooldown from a single burst."""
    state = HealthState()
    for _ in range(10):
        record_failure(state, Failure.server_error, 0.0, CONFIG)
    assert state.episodes == 1
    assert unusable_reason(state, 2.0) is None


def test_a_parked_upstream_is_rate_limited_until_the_time_given() -> None:
    state = HealthState()
    park(state, 50.0)
    assert unusable_reason(state, 49.9) == "rate_limited"
    assert unusable_reason(state, 50.0) is None
    assert state.healthy


def test_a_request_failing_over_may_try_an_account_whose_probe_is_in_flight() -> None:
    """The single probe limits first attempts; a failover to an account past its cooldown goes ahead (and a
    parked or still cooling account is refused either way)."""
    state = HealthState()
    record_failure(state, Failure.server_error, 0.0, CONFIG)
    assert refuses_failover(state, 1.0) == "unhealthy"  # still cooling down
    assert begin_attempt(state, 2.0)
    assert unusable_reason(state, 2.0) == "unhealthy" and refuses_failover(state, 2.0) is None
    park(state, 5.0)
    assert refuses_failover(state, 3.0) == "rate_limited"


def test_a_misconfigured_base_url_takes_the_account_out_at_once() -> None:
    """A redirect, or a 200 that is not the API's answer: no second try will find the API there."""
    state = HealthState()
    assert record_failure(state, Failure.misconfigured, 0.0, CONFIG) is True
    assert unusable_reason(state, 1.0) == "unhealthy"


def test_a_streams_first_event_passes_the_probe_but_a_break_after_it_continues_the_streak() -> None:
    state = HealthState()
    for _ in range(3):
        record_failure(state, Failure.connect, 0.0, CONFIG)
    assert begin_attempt(state, 2.0)
    assert record_answer(state), "the probe's stream began: healthy again"
    assert unusable_reason(state, 2.0) is None
    # Its stream breaks: the fourth failure in a row, and a longer cooldown than the first.
    assert record_failure(state, Failure.connect, 3.0, CONFIG)
    assert unusable_reason(state, 3.0 + 9.9) == "unhealthy"
    assert not state.healthy


def test_streams_in_flight_that_break_one_after_the_other_are_one_episode() -> None:
    """Thirty streams on one account that broke mid-way: each first event after the account went unhealthy
    made it healthy again, and the next break a new episode (the cooldown went to 15×, 75 s, for one burst)."""
    state = HealthState()
    for _ in range(3):  # the first three breaks take it out
        record_failure(state, Failure.connect, 1.0, CONFIG)
    assert not state.healthy and state.episodes == 1
    for _ in range(10):  # streams sent at 0.5, before it went out: their first events, then their breaks
        assert record_answer(state, sent_at=0.5) is False
        assert record_failure(state, Failure.connect, 1.1, CONFIG) is False
    assert not state.healthy and state.episodes == 1
    # The probe, sent after its cooldown, is a stream like any other: its first event passes it.
    assert begin_attempt(state, 3.5)
    assert record_answer(state, sent_at=3.5)


def test_a_stream_that_ends_whole_clears_the_streak() -> None:
    state = HealthState()
    for _ in range(2):
        record_failure(state, Failure.connect, 0.0, CONFIG)
    record_answer(state)
    record_success(state)
    for _ in range(2):
        record_failure(state, Failure.connect, 1.0, CONFIG)
    assert unusable_reason(state, 1.0) is None

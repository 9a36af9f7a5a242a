"""`LineBound`: at most a few lines of a kind per interval, and a summary of the rest once it is over."""

from __future__ import annotations

import logging

import pytest

from poolgate.telemetry.logging import MAX_KINDS, UNTRACKED_KINDS, BoundedLog, LineBound

LINES = 3
INTERVAL = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def bound(clock: Clock) -> LineBound:
    return LineBound(LINES, INTERVAL, clock)


@pytest.fixture
def log(bound: LineBound, caplog: pytest.LogCaptureFixture) -> BoundedLog:
    caplog.set_level(logging.INFO, logger="bounded")
    return BoundedLog(logging.getLogger("bounded"), bound)


def test_a_kind_is_its_format_not_its_arguments(log: BoundedLog, caplog: pytest.LogCaptureFixture) -> None:
    for n in range(10):
        log.warning("refused %d", n)
        log.warning("another kind %d", n)
    assert caplog.messages == [line for n in range(LINES) for line in (f"refused {n}", f"another kind {n}")]


def test_what_an_interval_suppressed_is_told_by_a_flush_once_it_is_over(
    log: BoundedLog, bound: LineBound, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(LINES + 5):
        log.error("upstream %s failed", "up-1")
    bound.flush()  # the interval is not over: nothing to tell yet
    assert len(caplog.messages) == LINES
    clock.now += INTERVAL + 2
    bound.flush()
    bound.flush()  # told once
    assert caplog.messages[LINES:] == ["… and 5 more like 'upstream %s failed' suppressed in the last 62 s"]
    log.error("upstream %s failed", "up-2")  # a new interval
    assert caplog.messages[-1] == "upstream up-2 failed"


def test_the_summary_comes_before_the_next_line_of_its_kind_at_the_suppressed_lines_level(
    log: BoundedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(LINES + 1):
        log.error("failed %d", 1)
    clock.now += INTERVAL
    log.error("failed %d", 2)
    assert caplog.messages[LINES:] == ["… and 1 more like 'failed %d' suppressed in the last 60 s", "failed 2"]
    assert {(r.levelno, r.name) for r in caplog.records} == {(logging.ERROR, "bounded")}


def test_an_interval_that_suppressed_nothing_is_not_summed_up(
    log: BoundedLog, bound: LineBound, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    log.warning("once")
    clock.now += INTERVAL
    bound.flush()
    bound.flush(everything=True)
    assert caplog.messages == ["once"]


def test_at_shutdown_every_suppressed_line_is_told(
    log: BoundedLog, bound: LineBound, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(LINES + 1):
        log.warning("refused")
    clock.now += 7
    bound.flush(everything=True)
    assert caplog.messages[-1] == "… and 1 more like 'refused' suppressed in the last 7 s"


def test_a_line_below_the_loggers_level_uses_up_nothing(log: BoundedLog, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(LINES + 1):
        log.debug("detail")
    log.warning("detail")
    assert caplog.messages == ["detail"]


def test_kinds_past_the_most_tracked_at_once_are_bounded_as_one(
    log: BoundedLog, bound: LineBound, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A format with a figure in it makes a kind per figure: neither the kinds kept nor the lines written
    grow with the figures a client chooses."""
    for n in range(MAX_KINDS):
        log.warning(f"kind {n}")
    for n in range(LINES + 4):
        log.warning(f"untracked {n}")
    assert caplog.messages[MAX_KINDS:] == [f"untracked {n}" for n in range(LINES)]
    clock.now += INTERVAL  # the tracked kinds' interval is over: they make room
    log.warning("a new kind")
    assert caplog.messages[MAX_KINDS + LINES :] == [
        f"… and 4 more like {UNTRACKED_KINDS!r} suppressed in the last {INTERVAL:.0f} s",
        "a new kind",
    ]


def test_the_record_names_the_callers_line(log: BoundedLog, caplog: pytest.LogCaptureFixture) -> None:
    log.warning("where")
    [record] = caplog.records
    assert (record.filename, record.funcName) == ("test_line_bound.py", "test_the_record_names_the_callers_line")


def test_what_an_ended_kind_suppressed_is_told_also_when_a_line_past_the_most_tracked_ends_it(
    log: BoundedLog, bound: LineBound, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A line of a new kind while every kind is tracked takes out those whose interval is over; when that
    left the table full all the same (a logger's untracked kind counts beyond it), the line went to the
    untracked kind and what the ended ones had suppressed was never told."""
    for _ in range(LINES + 2):
        log.warning("early")
    clock.now += INTERVAL / 2
    for n in range(MAX_KINDS - 1):
        log.warning(f"kind {n}")
    log.warning("untracked 0")  # the table full: the logger's untracked kind, one past the most
    clock.now += INTERVAL / 2  # only "early" has ended
    log.warning("untracked 1")
    bound.flush(everything=True)
    assert caplog.messages.count(f"… and 2 more like 'early' suppressed in the last {INTERVAL:.0f} s") == 1

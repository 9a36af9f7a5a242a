"""The composite observer: failures are counted, logged once then every N, and never stop the others."""

from __future__ import annotations

import logging

import msgspec
import pytest

from poolgate.lifecycle.context import Usage, UsageRecord
from poolgate.lifecycle.observe import Observers, RequestFinished


def event(request_id: str = "req_1") -> RequestFinished:
    record = UsageRecord(
        request_id=request_id,
        started_at=0.0,
        principal_id=None,
        principal_name=None,
        endpoint="messages",
        model="m",
        stream=False,
        upstream_id=None,
        status=200,
        outcome="ok",
        error_type=None,
        input_tokens=0,
        output_tokens=0,
        cache_creation_input_tokens=0,
        cache_read_input_tokens=0,
        ttfb_ms=None,
        duration_ms=1.0,
        attempts=1,
        session_id=None,
    )
    return RequestFinished(record=record, principal=None, route=None, provider=None, usage=Usage())


class Flaky:
    def request_finished(self, event: RequestFinished) -> None:
        raise ValueError(f"cannot handle {event.request_id}")


class Counting:
    seen = 0

    def request_finished(self, event: RequestFinished) -> None:
        self.seen += 1


def test_failures_are_counted_and_logged_once_then_every_n(caplog: pytest.LogCaptureFixture) -> None:
    counting = Counting()
    observers = Observers([Flaky(), counting], log_every=100)  # type: ignore[list-item]
    with caplog.at_level(logging.ERROR, logger="poolgate.observe"):
        for index in range(250):
            observers.request_finished(event(f"req_{index}"))
    assert counting.seen == 250
    assert observers.errors == 250 and observers.errors_by_observer == {"Flaky": 250}
    lines = [r for r in caplog.records if r.name == "poolgate.observe"]
    assert len(lines) == 3  # the first failure (with its traceback), the 100th and the 200th
    assert lines[0].exc_info is not None and "200 times" in lines[2].getMessage()


def test_an_observer_is_only_called_for_hooks_it_has() -> None:
    class Silent:
        pass

    counting = Counting()
    observers = Observers([Silent(), counting])  # type: ignore[list-item]
    observers.request_finished(event())
    observers.remove(counting)
    observers.request_finished(event())
    assert counting.seen == 1 and observers.errors == 0


def test_an_observer_with_an_async_hook_is_refused_when_added() -> None:
    """Hooks are never awaited: an `async def` one would silently never run."""

    class Exporter:
        async def request_finished(self, event: RequestFinished) -> None:
            pass

    observers = Observers()
    with pytest.raises(TypeError, match="Exporter: request_finished is `async def`"):
        observers.add(Exporter())
    observers.request_finished(event())
    assert observers.errors == 0


@pytest.mark.parametrize(
    ("status", "outcome", "ok"),
    [
        (200, "ok", True),
        (200, "client_disconnected", False),  # a stream its client left after its headers
        (499, "client_disconnected", False),  # a JSON request its client left while it waited
        (200, "stream_error", False),
        (529, "upstream_error", False),
    ],
)
def test_ok_means_the_request_was_answered_in_full(status: int, outcome: str, ok: bool) -> None:
    finished = event()
    record = msgspec.structs.replace(finished.record, status=status, outcome=outcome)
    assert msgspec.structs.replace(finished, record=record).ok is ok

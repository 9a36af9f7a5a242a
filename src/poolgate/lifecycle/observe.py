"""observe: lifecycle events fan out to observers; an observer never blocks or fails a request.

Observers follow the mitmproxy-addon model: a small object implementing only the hooks it cares about.
"""

from __future__ import annotations

import logging
from typing import Protocol

from poolgate.lifecycle.context import UsageRecord

log = logging.getLogger("poolgate.observe")


class Observer(Protocol):
    def request_finished(self, record: UsageRecord) -> None: ...


class Observers:
    """Calls every observer's hook in order; an exception is counted and logged, never raised."""

    def __init__(self, observers: list[Observer] | None = None) -> None:
        self._observers: list[Observer] = list(observers or [])
        self.errors = 0

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def request_finished(self, record: UsageRecord) -> None:
        for observer in self._observers:
            try:
                observer.request_finished(record)
            except Exception:
                self.errors += 1
                log.exception("observer %s failed on request_finished", type(observer).__name__)


class LogObserver:
    """One line per finished request: ids, upstream, status, tokens, timings. Never credentials."""

    def __init__(self) -> None:
        self._log = logging.getLogger("poolgate.access")

    def request_finished(self, record: UsageRecord) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        self._log.info(
            "%s %s key=%s upstream=%s model=%s status=%d outcome=%s in=%d out=%d cache_w=%d cache_r=%d "
            "ttfb_ms=%s ms=%.1f attempts=%d",
            record.request_id,
            record.endpoint,
            record.principal_name,
            record.upstream_id,
            record.model,
            record.status,
            record.outcome,
            record.input_tokens,
            record.output_tokens,
            record.cache_creation_input_tokens,
            record.cache_read_input_tokens,
            f"{record.ttfb_ms:.1f}" if record.ttfb_ms is not None else "-",
            record.duration_ms,
            record.attempts,
        )

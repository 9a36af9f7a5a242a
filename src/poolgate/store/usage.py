"""Usage records: a batched background writer (the hot path never waits on the database) and reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import fields

from sqlalchemy import Engine, func, select

from poolgate.lifecycle.context import UsageRecord
from poolgate.store.db import usage

log = logging.getLogger("poolgate.usage")
RECORD_FIELDS = tuple(field.name for field in fields(UsageRecord))


class UsageWriter:
    """Collects records in memory and writes them in batches from a worker thread.

    `stop()` drains everything still queued, so a clean shutdown (SIGTERM) loses nothing.
    """

    def __init__(self, engine: Engine, flush_interval: float = 0.5, batch_size: int = 500) -> None:
        self._engine = engine
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._pending: list[UsageRecord] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.written = 0

    def request_finished(self, record: UsageRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= self._batch_size:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="poolgate-usage-writer")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self._flush()

    async def flush(self) -> None:
        """Write everything submitted so far (tests and shutdown)."""
        await self._flush()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._batch_size], self._pending[self._batch_size :]
            try:
                await asyncio.to_thread(self._write, batch)
                self.written += len(batch)
            except Exception:
                # Keep the records and try again on the next tick rather than lose them.
                log.exception("writing %d usage records failed; will retry", len(batch))
                self._pending[:0] = batch
                if self._stopping:
                    raise
                return

    def _write(self, batch: list[UsageRecord]) -> None:
        # Straight to the driver's executemany: SQLAlchemy's per-row parameter processing would cost more
        # CPU (and GIL time taken from the event loop) than the insert itself.
        rows = [tuple(getattr(record, name) for name in RECORD_FIELDS) for record in batch]
        with self._engine.begin() as conn:
            conn.exec_driver_sql(self._insert_sql(conn.dialect.paramstyle), rows)

    @staticmethod
    def _insert_sql(paramstyle: str) -> str:
        marker = "?" if paramstyle == "qmark" else "%s"
        return f"INSERT INTO usage ({', '.join(RECORD_FIELDS)}) VALUES ({', '.join([marker] * len(RECORD_FIELDS))})"


GROUPINGS = {"key": usage.c.principal_name, "upstream": usage.c.upstream_id, "model": usage.c.model}


def summarize(engine: Engine, by: str, since: float | None = None) -> list[dict[str, object]]:
    """Totals per key, upstream or model."""
    column = GROUPINGS[by]
    query = (
        select(
            column.label("group"),
            func.count().label("requests"),
            func.sum((usage.c.status >= 400).cast(usage.c.attempts.type)).label("errors"),
            func.sum(usage.c.input_tokens).label("input_tokens"),
            func.sum(usage.c.output_tokens).label("output_tokens"),
            func.sum(usage.c.cache_creation_input_tokens).label("cache_creation_input_tokens"),
            func.sum(usage.c.cache_read_input_tokens).label("cache_read_input_tokens"),
            func.avg(usage.c.ttfb_ms).label("avg_ttfb_ms"),
        )
        .group_by(column)
        .order_by(func.count().desc())
    )
    if since is not None:
        query = query.where(usage.c.started_at >= since)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def count_records(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(usage)).scalar_one())

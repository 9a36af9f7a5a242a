"""Usage records: a batched background writer (the hot path never waits on the database) and reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from operator import attrgetter
from pathlib import Path

from sqlalchemy import Engine, case, func, select, update

from poolgate.lifecycle.budgets import SpendRow
from poolgate.lifecycle.context import UsageRecord
from poolgate.lifecycle.observe import RequestFinished
from poolgate.store.db import usage
from poolgate.store.reports import day_start
from poolgate.store.writer_process import WriterProcess, insert_rows

log = logging.getLogger("poolgate.usage")
RECORD_FIELDS: tuple[str, ...] = UsageRecord.__struct_fields__
# A record as the row the store takes, its fields in RECORD_FIELDS order (one C call per record).
_ROW_OF = attrgetter(*RECORD_FIELDS)
# Requests callers sent (their cost counts towards their budgets), as opposed to the gateway's own.
CALLER_ENDPOINTS = ("messages", "count_tokens")


class UsageWriter:
    """Collects records in memory and hands them, in batches, to a writer process (or, where a child
    process cannot be had, to a worker thread).

    `stop()` drains everything still queued, so a clean shutdown (SIGTERM) loses nothing.
    """

    def __init__(
        self,
        engine: Engine,
        dead_letter: Path,
        flush_interval: float = 0.5,
        batch_size: int = 500,
        use_process: bool = True,
    ) -> None:
        self._dead_letter = dead_letter
        self._engine = engine
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._use_process = use_process
        self._process: WriterProcess | None = None
        self._pending: list[UsageRecord] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # One hand-over at a time: the pipe (a multiprocessing Connection) is not safe for two threads.
        self._handoff = asyncio.Lock()
        self.written = 0

    def request_finished(self, event: RequestFinished) -> None:
        self.submit(event.record)

    def submit(self, record: UsageRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= self._batch_size:
            self._wake.set()

    def start(self) -> None:
        if self._use_process:
            try:
                self._process = WriterProcess(
                    self._engine.url.render_as_string(hide_password=False), RECORD_FIELDS, self._dead_letter
                )
            except OSError as exc:
                log.warning("no usage writer process (%s); writing from a thread instead", exc)
        self._task = asyncio.create_task(self._run(), name="poolgate-usage-writer")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self._flush()
        if self._process is not None:
            async with self._handoff:
                await asyncio.to_thread(self._process.stop, 30.0)

    async def flush(self) -> None:
        """Write everything submitted so far and wait until it is in the database (tests, shutdown)."""
        await self._flush()
        if self._process is not None:
            async with self._handoff:
                await asyncio.to_thread(self._process.sync)

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            await self._flush(drain=False)

    async def _flush(self, drain: bool = True) -> None:
        """Hand pending records over in batches. A periodic flush (`drain=False`) takes only those pending
        when it began: records that arrive during a hand-over wait for the next tick. Chasing them instead
        kept a worker thread handing over back to back under load, ~30 times a second, each time contending
        with the event loop for the GIL: seven times the futex calls, and in paired wrk rounds up to ~10 % more
        CPU per request at c=16 (within the noise at c=64)."""
        async with self._handoff:
            due = len(self._pending)
            while self._pending and (drain or due > 0):
                batch, self._pending = self._pending[: self._batch_size], self._pending[self._batch_size :]
                due -= len(batch)
                rows = list(map(_ROW_OF, batch))
                if self._process is not None:
                    try:
                        # From a thread: a batch larger than the pipe's buffer blocks until the writer has read
                        # it, and the writer reads only once it has inserted the batch before. The event loop
                        # stalled for that whole insert under load (tens of ms, every flush).
                        await asyncio.to_thread(self._process.send, rows)
                        self.written += len(rows)
                        continue
                    except OSError as exc:
                        log.error("the usage writer process is gone (%s); writing from a thread instead", exc)
                        gone, self._process = self._process, None
                        # Reaped, not left a zombie for the gateway's lifetime (`stop` only waits for a dead one).
                        await asyncio.to_thread(gone.stop, 5.0)
                try:
                    await asyncio.to_thread(insert_rows, self._engine, RECORD_FIELDS, rows)
                    self.written += len(rows)
                except Exception:
                    # Keep the records and try again on the next tick rather than lose them.
                    log.exception("writing %d usage records failed; will retry", len(batch))
                    self._pending[:0] = batch
                    if self._stopping:
                        raise
                    return


def spend_rows(engine: Engine) -> list[SpendRow]:
    """The cost ledger per (principal, session, UTC day), to seed budgets at start. Requests the gateway made
    on its own (cache keepalives, warm-ups) are not a caller's spend, and at run time no budget pays for
    them either, so they are left out here as well. A request's spend is its cost in USD, or what its budget
    was charged instead (a pricing failure's reservation)."""
    day = day_start(engine)
    spent = func.coalesce(usage.c.charged_micro_usd, case((usage.c.currency == "USD", usage.c.cost_micro_usd)))
    query = (
        select(
            usage.c.principal_id,
            usage.c.session_id,
            day.label("day"),
            func.sum(spent).label("total"),
        )
        .where(usage.c.principal_id.is_not(None), spent > 0, usage.c.endpoint.in_(CALLER_ENDPOINTS))
        .group_by(usage.c.principal_id, usage.c.session_id, day)
    )
    with engine.connect() as conn:
        return [
            SpendRow(row.principal_id, row.session_id, float(row.day), int(row.total))
            for row in conn.execute(query)
            if row.total
        ]


def count_records(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(usage)).scalar_one())


# Rows per statement when dropping traces: a short hold on the database between the usage writer's batches.
FORGET_BATCH = 5000


def forget_trace_batch(engine: Engine, since: float, before: float) -> tuple[int, float]:
    """Drop the routing traces of the first `FORGET_BATCH` requests that started in [since, before) and still
    have one, from their usage rows (the rows stay: they are the ledger). Returns how many were dropped and
    where the next batch starts: a read finds them (it holds no lock) and a short transaction clears them,
    and the next batch starts at the last one's start rather than walking the cleared rows again."""
    with engine.connect() as conn:
        found = conn.execute(
            select(usage.c.request_id, usage.c.started_at)
            .where(usage.c.started_at >= since, usage.c.started_at < before, usage.c.route.is_not(None))
            .order_by(usage.c.started_at)
            .limit(FORGET_BATCH)
        ).all()
    if not found:
        return 0, before
    with engine.begin() as conn:
        conn.execute(update(usage).where(usage.c.request_id.in_([row.request_id for row in found])).values(route=None))
    # Rows that started at the same time as the last one found may be left: start at it, not after it.
    return len(found), found[-1].started_at if len(found) == FORGET_BATCH else before


def find_route(engine: Engine, request_id: str) -> dict[str, object] | None:
    """A request's usage record with its routing trace, by request id."""
    with engine.connect() as conn:
        row = conn.execute(select(usage).where(usage.c.request_id == request_id)).first()
    return dict(row._mapping) if row is not None else None


def last_routes(engine: Engine, limit: int) -> list[dict[str, object]]:
    with engine.connect() as conn:
        rows = conn.execute(select(usage).order_by(usage.c.started_at.desc()).limit(limit)).all()
    return [dict(row._mapping) for row in rows]

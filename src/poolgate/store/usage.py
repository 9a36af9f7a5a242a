"""Usage records: a batched background writer (the hot path never waits on the database) and reports."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import time
from collections.abc import Iterator
from operator import attrgetter
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, case, delete, func, select, update

from poolgate.lifecycle.budgets import DAY, SESSION_RETENTION_DAYS, SpendRow, day_of
from poolgate.lifecycle.context import UsageRecord
from poolgate.lifecycle.observe import RequestFinished
from poolgate.store.db import StoreFileGone, spend_days, traces, usage
from poolgate.store.writer_process import (
    WriterProcess,
    append_private,
    as_utf8,
    failure,
    insert_rows,
    refused_alone,
    set_aside,
    transient,
)

log = logging.getLogger("poolgate.usage")
RECORD_FIELDS: tuple[str, ...] = UsageRecord.__struct_fields__
# A record as the row the store takes, its fields in RECORD_FIELDS order (one C call per record).
_ROW_OF = attrgetter(*RECORD_FIELDS)
# Next to the database: usage records it would not take (see `UsageWriter`), read back at the next start.
SET_ASIDE_FILE = "usage-unwritten.jsonl"
# How long a stopping gateway waits for its writer process to take and confirm the last records before
# ending it and writing them itself.
STUCK_SECONDS = 30.0


class UsageWriter:
    """Collects records in memory and hands them, in batches, to a writer process (or, where a child
    process cannot be had, to a worker thread).

    `stop()` drains everything still queued, so a clean shutdown (SIGTERM) loses nothing: what neither the
    writer process nor this process can insert by then is set aside in the `dead_letter` file (read back at
    the next start, see `restore_set_aside`), and what cannot be set aside either (a full disk) is logged.
    """

    def __init__(
        self,
        engine: Engine,
        dead_letter: Path,
        flush_interval: float = 0.5,
        batch_size: int = 500,
        use_process: bool = True,
        stuck_seconds: float = STUCK_SECONDS,
    ) -> None:
        self._dead_letter = dead_letter
        self._stuck_seconds = stuck_seconds
        self._engine = engine
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._use_process = use_process
        self._process: WriterProcess | None = None
        self._pending: list[UsageRecord] = []
        # Rows this process must write itself: batches a writer process did not confirm before it died, and
        # batches whose insert failed here (tried again on the next tick).
        self._unwritten: list[list[tuple[Any, ...]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # One hand-over at a time: the pipe (a multiprocessing Connection) is not safe for two threads.
        self._handoff = asyncio.Lock()
        # Rows stored, set aside, and only logged (lost but for the log), here and by writer processes gone.
        self._written = 0
        self._set_aside = 0
        self._lost = 0

    @property
    def written(self) -> int:
        """Records stored in the database so far."""
        return self._written + (self._process.confirmed if self._process is not None else 0)

    @property
    def set_aside(self) -> int:
        """Records the database would not take, kept in the set-aside file for the next start."""
        return self._set_aside + (self._process.set_aside if self._process is not None else 0)

    @property
    def lost(self) -> int:
        """Records neither stored nor set aside (a full disk): the log's CRITICAL lines are their only copy."""
        return self._lost

    def outcome(self) -> str:
        """What became of the records, for the gateway's last log line."""
        said = [f"{self.written} usage records written"]
        if self.set_aside:
            said.append(f"{self.set_aside} set aside in {self._dead_letter} (stored at the next start)")
        if self.lost:
            said.append(f"{self.lost} neither written nor set aside (logged at CRITICAL: their only copy)")
        return "; ".join(said)

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
        # One deadline for the writer process to take and confirm everything: one that takes no more rows (a
        # full disk, a database locked for long) blocks a hand-over, which its end fails, and what it did not
        # confirm is written from here.
        process = self._process
        deadline = (
            asyncio.get_running_loop().call_later(self._stuck_seconds, self._end_stuck, process)
            if process is not None
            else None
        )
        try:
            if self._task is not None:
                await self._task
            await self._flush()
            if self._process is not None:
                async with self._handoff:
                    await self._lost_writer(self._stuck_seconds)
        finally:
            if deadline is not None:
                deadline.cancel()
        await self._write_here()

    def _end_stuck(self, process: WriterProcess) -> None:
        log.error("the usage writer process has not taken all records in %.0fs; stopping it", self._stuck_seconds)
        process.kill()

    async def flush(self) -> None:
        """Write everything submitted so far and wait until it is in the database (tests, shutdown)."""
        await self._flush()
        if self._process is not None:
            async with self._handoff:
                try:
                    await asyncio.to_thread(self._process.sync)
                except OSError as exc:
                    log.error("the usage writer process is gone (%s); writing from a thread instead", exc)
                    await self._lost_writer(5.0)
            await self._write_here()

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
                if self._process is None:
                    self._unwritten.append(rows)
                    continue
                try:
                    # From a thread: a batch larger than the pipe's buffer blocks until the writer has read
                    # it, and the writer reads only once it has inserted the batch before. The event loop
                    # stalled for that whole insert under load (tens of ms, every flush).
                    await asyncio.to_thread(self._process.send, rows)
                except OSError as exc:
                    log.error("the usage writer process is gone (%s); writing from a thread instead", exc)
                    await self._lost_writer(5.0)  # these rows among what it did not confirm
        await self._write_here()

    async def _lost_writer(self, timeout: float) -> None:
        """The writer process is ended (reaped, not left a zombie); what it did not confirm is this process's
        to write. Called with the hand-over lock held."""
        gone, self._process = self._process, None
        if gone is None:
            return
        unconfirmed = await asyncio.to_thread(gone.stop, timeout)
        self._written += gone.confirmed
        self._set_aside += gone.set_aside
        self._unwritten[:0] = unconfirmed

    async def _write_here(self) -> None:
        """Insert, from a worker thread, the rows no writer process took. A failed insert is tried again on
        the next tick; once stopping, there is none: the rows are set aside (or, failing that, logged)."""
        async with self._handoff:
            while self._unwritten:
                rows = self._unwritten[0]
                try:
                    # A writer process may have stored some of them without living to confirm it.
                    await asyncio.to_thread(insert_rows, self._engine, RECORD_FIELDS, rows, True)
                    self._written += len(rows)
                except UnicodeEncodeError:
                    self._unwritten[0] = as_utf8(rows)
                    continue
                except Exception as exc:
                    if not (isinstance(exc, StoreFileGone) or transient(exc)):
                        # The rows' own fault, not the database's: each stored on its own, and those it refuses
                        # (which no retry would store) set aside at once.
                        refused, why = await asyncio.to_thread(
                            refused_alone, self._engine, RECORD_FIELDS, rows, exc, True
                        )
                        self._written += len(rows) - len(refused)
                        if refused:
                            await self._keep_apart(refused, why)
                    elif not self._stopping and not isinstance(exc, StoreFileGone):
                        log.error("writing %d usage records failed (%s); will retry", len(rows), failure(exc))
                        return
                    else:
                        # The rest would wait out the same busy database one by one: all set aside at once.
                        rows = [row for batch in self._unwritten for row in batch]
                        self._unwritten = [rows]
                        await self._keep_apart(rows, exc)
                self._unwritten.pop(0)

    async def _keep_apart(self, rows: list[tuple[Any, ...]], exc: BaseException) -> None:
        """Rows set aside, or (failing that) logged, and counted as either."""
        if await asyncio.to_thread(self._set_aside_or_log, rows, exc):
            self._set_aside += len(rows)
        else:
            self._lost += len(rows)

    def _set_aside_or_log(self, rows: list[tuple[Any, ...]], exc: BaseException) -> bool:
        """Whether the rows were set aside; those that could not be are logged."""
        if set_aside(self._dead_letter, RECORD_FIELDS, rows, exc):
            return True
        # Nowhere left to keep them: the log (a journal, a terminal) is the last copy.
        for row in rows:
            log.critical(
                "usage record not stored: %s", orjson.dumps(dict(zip(RECORD_FIELDS, row, strict=True))).decode()
            )
        return False


def restore_set_aside(engine: Engine, dead_letter: Path) -> int:
    """Records an earlier run set aside (the database would not take them then) go into the database now,
    before budgets read the ledger; returns how many. The file is moved aside first, so that a gateway
    sharing it goes on appending to a new one meanwhile; it is deleted once its records are stored, and its
    records go back into it should they fail again. A file an earlier restore moved aside and did not finish
    (it died) is taken too; the inserts skip records stored already. Lines that are not records (a write cut
    short by a crash) are kept in `<file>.unreadable`."""
    taken = dead_letter.with_name(f"{dead_letter.name}.{os.getpid()}.restoring")
    with contextlib.suppress(FileNotFoundError):
        os.rename(dead_letter, taken)
    files = sorted(dead_letter.parent.glob(f"{glob.escape(dead_letter.name)}.*.restoring"))
    rows, unreadable = [], []
    for path in files:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # another gateway starting on this store took it
            continue
        for line in data.splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("request_id"), str):
                rows.append(tuple(record.get(name) for name in RECORD_FIELDS))
            elif line.strip():
                unreadable.append(line)
    restored = len(rows)
    try:
        if rows:
            insert_rows(engine, RECORD_FIELDS, rows, skip_stored=True)
    except Exception as exc:
        # Only those the database refuses go back (an earlier build set aside a whole batch with one of them).
        refused, why = refused_alone(engine, RECORD_FIELDS, rows, exc, skip_stored=True)
        if refused and not set_aside(dead_letter, RECORD_FIELDS, refused, why):
            log.error("could not restore %d set-aside usage records; they are still in %s", len(refused), files)
            return 0  # the unreadable lines too: kept apart by the start that deletes their files
        restored -= len(refused)
    if unreadable:
        kept = dead_letter.with_name(dead_letter.name + ".unreadable")
        append_private(kept, b"".join(line + b"\n" for line in unreadable))
        log.warning("%d lines of %s are not usage records: kept in %s", len(unreadable), dead_letter, kept)
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if restored:
        log.warning("restored %d usage records set aside by an earlier run (from %s)", restored, dead_letter)
    return restored


def spend_rows(engine: Engine, now: float | None = None) -> Iterator[SpendRow]:
    """The cost ledger per (principal, session, UTC day), to seed budgets at start; what is older than the
    sessions budgets keep (`SESSION_RETENTION_DAYS`) as one row per principal at day 0, all a `total` budget
    reads of it. Read from `spend_days`, which the usage writer keeps as rows enter the ledger (summing the ledger
    itself took seconds at every start on a large store), row by row: a year of sessions, each its own row,
    took hundreds of MB at every start. Requests the gateway made on its own (cache keepalives, warm-ups)
    are not a caller's spend, and at run time no budget pays for them either, so they are left out there as
    well. A request's spend is its cost in USD, or what its budget was charged instead (the reservation of a
    request whose cost is unknown)."""
    cutoff = day_of(time.time() if now is None else now) - SESSION_RETENTION_DAYS * DAY
    recent = spend_days.c.day >= cutoff
    day = case((recent, spend_days.c.day), else_=0)
    # A session's spend is kept while the session is (its latest spend within the retention), its older days
    # at day 0 as well; "" is the requests without a session id, None the spend of no session kept.
    kept = select(spend_days.c.session_id).where(recent).distinct()
    session = case((recent | spend_days.c.session_id.in_(kept), spend_days.c.session_id), else_=None)
    query = select(
        spend_days.c.principal_id, session.label("session_id"), day.label("day"), func.sum(spend_days.c.micro_usd)
    ).group_by(spend_days.c.principal_id, session, day)
    with engine.connect() as conn:
        for principal_id, session_id, day_start, total in conn.execute(query):
            yield SpendRow(principal_id, session_id, float(day_start), int(total))


def count_records(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(usage)).scalar_one())


# Usage rows with their routing traces: in `traces`, or in the row itself where an older build stored it.
_USAGE_WITH_TRACES = usage.outerjoin(traces, traces.c.request_id == usage.c.request_id)
_RECORDS_WITH_TRACES = select(
    *(column for column in usage.c if column.name != "route"),
    func.coalesce(traces.c.route, usage.c.route).label("route"),
).select_from(_USAGE_WITH_TRACES)


# Rows per statement when dropping traces: a short hold on the database between the usage writer's batches.
FORGET_BATCH = 5000


def forget_trace_batch(engine: Engine, since: float, before: float) -> tuple[int, float]:
    """Drop the routing traces of the first `FORGET_BATCH` requests that started in [since, before) and still
    have one: deleted from `traces`, and set to null in the usage rows of older builds (the rows stay: they
    are the ledger). Returns how many this call dropped and where the next batch starts: a read finds them (it
    holds no lock) and a short transaction clears them, and the next batch starts at the last one's start
    rather than walking the cleared rows again."""
    with engine.connect() as conn:
        found = conn.execute(
            select(usage.c.request_id, usage.c.started_at)
            .select_from(_USAGE_WITH_TRACES)
            .where(
                usage.c.started_at >= since,
                usage.c.started_at < before,
                traces.c.request_id.is_not(None) | usage.c.route.is_not(None),
            )
            .order_by(usage.c.started_at)
            .limit(FORGET_BATCH)
        ).all()
    if not found:
        return 0, before
    request_ids = [row.request_id for row in found]
    with engine.begin() as conn:
        deleted = conn.execute(delete(traces).where(traces.c.request_id.in_(request_ids))).rowcount
        cleared = conn.execute(
            update(usage).where(usage.c.request_id.in_(request_ids), usage.c.route.is_not(None)).values(route=None)
        ).rowcount
    # Rows that started at the same time as the last one found may be left: start at it, not after it.
    # What this transaction dropped, not what the read found: another gateway on the store may have dropped some
    # in between (two instances' logs added up to more than was dropped).
    return deleted + cleared, found[-1].started_at if len(found) == FORGET_BATCH else before


def find_route(engine: Engine, request_id: str) -> dict[str, object] | None:
    """A request's usage record with its routing trace, by request id."""
    with engine.connect() as conn:
        row = conn.execute(_RECORDS_WITH_TRACES.where(usage.c.request_id == request_id)).first()
    return dict(row._mapping) if row is not None else None


def last_routes(engine: Engine, limit: int) -> list[dict[str, object]]:
    """The latest `limit` requests with their traces, the latest first by arrival: by request id, which is in
    the order requests came (to the millisecond, then at random), as `TraceRing.last` orders them, and is the
    table's primary key."""
    with engine.connect() as conn:
        rows = conn.execute(_RECORDS_WITH_TRACES.order_by(usage.c.request_id.desc()).limit(limit)).all()
    return [dict(row._mapping) for row in rows]

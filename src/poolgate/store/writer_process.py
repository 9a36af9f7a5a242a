"""A child process that inserts usage rows, so that database work never competes for the gateway's GIL.

Measured in `bench/`: inserting from a thread of the gateway process cost about a fifth of its
throughput, mostly in GIL hand-offs rather than in SQLite itself. The gateway sends msgpack-encoded
batches over a socket pair; the child retries failed inserts, sets aside (in a JSON-lines file next to the
database) what it still cannot write, and confirms each batch once it is stored either way, saying which. The gateway
keeps every batch until it is confirmed: should the child die (the OOM killer, a `kill -9`), the gateway
writes what it had not confirmed itself (its inserts ignore rows the child stored but did not live to
confirm), so nothing handed over is lost.

The child is a plain interpreter that imports this module, not a `multiprocessing` spawn: a spawned child
imports the parent's `__main__` again (the `poolgate` console script, hence the whole CLI and gateway: 75 MB
for a process that needs only SQLAlchemy) and brings a resource-tracker process of its own (12 MB).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection, Pipe
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import orjson
from sqlalchemy import Connection as DatabaseConnection
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from poolgate.store.db import StoreFileGone, check_store_file, spend_days_of_last_rows
from poolgate.store.pacing import Pacing

# What stops a gateway gracefully, and what a terminal (Ctrl-C, closing it: SIGHUP) or systemd sends to the
# whole process group: the writer ignores them all, to outlive the gateway's drain.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP = b"\x00stop"
SYNC = b"\x00sync"
ACK = b"ok"  # a batch is stored
SET_ASIDE = b"aside "  # + how many of a batch's rows are set aside (the database would not take them), the rest stored
DONE = b"done"  # everything sent before a SYNC or STOP is
RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
# When rows can be neither inserted nor set aside (a full disk), how long before the next round of tries.
HOLD_SECONDS = 5.0
# How long an exiting gateway waits for the writer to finish what it was sent.
EXIT_TIMEOUT = 30.0
# The writer's niceness over the gateway's. Its work comes in bursts (a flush every half second: ~7 ms of
# SQLite in a loop, more in situ, for the ~800 records of a busy gateway), and a request arriving meanwhile on
# the gateway's core shared the core with it: the slow requests of a sequential client (its p99) were those.
# Less favoured, it runs while the gateway waits on the network and gives way when a request comes; on a
# saturated core it still gets a quarter of it when it asks (nice 5 against 0), several times what it needs.
NICENESS = 5
# Rows per insert statement while the writer gives way. Even at nice 5 the scheduler often let the writer run on
# for a while after the gateway woke, and a batch was one statement: a request of a sequential client arriving
# during a flush still waited up to milliseconds. In pieces, yielding the core between them (`os.sched_yield`),
# the p99 at concurrency 1 fell by ~0.6–0.8 ms (paired wrk rounds, bench/README.md "Findings of 2026-12-07,
# evening") — but only while the core has time to spare (see `Pacing`): on a saturated core every yield is a
# switch between processes, which cost the gateway ~2 % (pieces of 50) to ~4.5 % (of 10) more CPU per request.
INSERT_PIECE = 25
# A yield that took this long ran another process's whole slice: the core is busy after all.
YIELD_BUSY = 0.001
# The child's program: argv[1] is its end of the socket pair, the rest the parent's import path.
_BOOT = "import sys; sys.path[:] = sys.argv[2:]; from poolgate.store.writer_process import main; main(int(sys.argv[1]))"

log = logging.getLogger("poolgate.usage")
Row = TypeVar("Row", bound=Sequence[Any])


def insert_rows(
    engine: Engine,
    fields: Sequence[str],
    rows: Sequence[Sequence[Any]],
    skip_stored: bool = False,
    give_way: bool = False,
) -> None:
    """Straight to the driver's executemany: SQLAlchemy's per-row parameter processing costs more than the
    insert itself. A row's routing trace (its `route` field) goes into the `traces` table, in the same
    transaction. `skip_stored`: rows whose request id is stored already are left as they are (a batch a
    writer stored but did not live to confirm, a set-aside file read twice). `give_way`: yield the core between
    pieces of INSERT_PIECE rows. Raises StoreFileGone, once per batch, for a store file deleted or replaced
    meanwhile."""
    ledger_fields = [name for name in fields if name != "route"]
    ledger_row = itemgetter(*(fields.index(name) for name in ledger_fields))
    with engine.begin() as conn:
        check_store_file(conn)
        statement = _insert_statement(conn, "usage", ledger_fields, skip_stored)
        inserted = _insert_in_pieces(conn, statement, list(map(ledger_row, rows)), give_way)
        if inserted > 0:  # the spend per caller, session and day budgets are seeded from, in the same transaction
            conn.exec_driver_sql(spend_days_of_last_rows(_marker(conn)), (inserted,))
        if "route" in fields:
            request_id, route = fields.index("request_id"), fields.index("route")
            traced = [(row[request_id], row[route]) for row in rows if row[route] is not None]
            if traced:
                statement = _insert_statement(conn, "traces", ("request_id", "route"), skip_stored)
                _insert_in_pieces(conn, statement, traced, give_way)


def _insert_in_pieces(conn: DatabaseConnection, statement: str, rows: list[tuple[Any, ...]], give_way: bool) -> int:
    """`rows` inserted in one statement, or INSERT_PIECE at a time yielding the core between pieces
    (`give_way`), until a yield finds the core busy (it came back after a whole slice of another process's,
    YIELD_BUSY seconds or more: a load that began since `Pacing` decided); the number inserted."""
    inserted = 0
    start = 0
    while give_way and start < len(rows):
        if start:
            before = time.monotonic()
            os.sched_yield()
            give_way = time.monotonic() - before < YIELD_BUSY
        inserted += conn.exec_driver_sql(statement, rows[start : start + INSERT_PIECE]).rowcount
        start += INSERT_PIECE
    if start < len(rows):
        inserted += conn.exec_driver_sql(statement, rows[start:] if start else rows).rowcount
    return inserted


def _marker(conn: DatabaseConnection) -> str:
    """The driver's placeholder for a parameter."""
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def _insert_statement(conn: DatabaseConnection, table: str, fields: Sequence[str], skip_stored: bool) -> str:
    columns, values = ", ".join(fields), ", ".join([_marker(conn)] * len(fields))
    if not skip_stored:
        return f"INSERT INTO {table} ({columns}) VALUES ({values})"
    if conn.dialect.name == "sqlite":
        return f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({values})"
    return f"INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT DO NOTHING"


def failure(exc: BaseException) -> str:
    """What went wrong, in one line: a database error without the statement and its parameters (a batch's
    worth of callers' rows) that SQLAlchemy appends to its message."""
    reason = getattr(exc, "orig", None) or exc
    text = str(reason)
    return f"{type(reason).__name__}: {text.splitlines()[0]}" if text.strip() else type(reason).__name__


def append_private(path: Path, data: bytes) -> None:
    """Append to a file only its owner may read: caller names, session ids and traces, like the database it
    stands in for (also a file an older version made with the umask's mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    with open(fd, "ab") as handle:
        handle.write(data)


def set_aside(dead_letter: Path, fields: Sequence[str], rows: Sequence[Sequence[Any]], why: BaseException) -> bool:
    """Append rows the database would not take (`why`) to the JSON-lines file next to it (the gateway reads it
    back into the database at its next start), and say so. False when the file cannot be written either (a
    full disk)."""
    try:
        lines = _json_lines(fields, rows)
    except TypeError:  # half a surrogate pair in a string (see `as_utf8`): JSON is UTF-8
        lines = _json_lines(fields, as_utf8(rows))
    try:
        # On a line of its own: a write cut short before (a full disk, a writer ended mid-write) left half a
        # line, which would otherwise swallow the first record of this one.
        append_private(dead_letter, b"\n" + lines)
    except OSError as exc:
        log.error("could not set aside %d usage records in %s either (%s)", len(rows), dead_letter, exc)
        return False
    log.error("could not write %d usage records (%s); saved them to %s", len(rows), failure(why), dead_letter)
    return True


def _json_lines(fields: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    return b"".join(orjson.dumps(dict(zip(fields, row, strict=True))) + b"\n" for row in rows)


def transient(exc: BaseException) -> bool:
    """Whether a failed insert may succeed if tried again: the database's state (locked, busy, its disk), not the
    rows' (a number no integer column holds, a sum past one, a constraint)."""
    return isinstance(exc, OperationalError | sqlite3.OperationalError) and "integer overflow" not in str(exc)


def refused_alone(
    engine: Engine, fields: Sequence[str], rows: Sequence[Row], exc: BaseException, skip_stored: bool = False
) -> tuple[list[Row], BaseException]:
    """After the database refused `rows` together (`exc`): the rows it refuses on its own, and why the last one
    was; the others are stored, each in a transaction of its own. One record it cannot take (a count past any
    integer column) took the rest of its batch, other callers' records, with it, to the set-aside file and back
    at every start. All of them, as refused by `exc`, when the failure is the database's (`transient`, a store
    file gone): inserted one by one, they would wait out the busy database row by row."""
    if len(rows) < 2 or transient(exc) or isinstance(exc, StoreFileGone):
        return list(rows), exc
    refused: list[Row] = []
    why = exc
    for row in rows:
        try:
            insert_rows(engine, fields, [row], skip_stored=skip_stored)
        except Exception as alone:
            refused.append(row)
            why = alone
    return refused, why


def _insert_or_set_aside(
    engine: Engine, fields: Sequence[str], rows: Sequence[Sequence[Any]], dead_letter: Path, give_way: bool = False
) -> int:
    """Insert, retrying transient failures; rows that still cannot be written go to a JSON-lines file next to
    the database rather than being dropped, each on its own (the others stored, see `refused_alone`); returns
    how many were set aside. Rows that can go nowhere (a full disk) are held, and tried again every
    HOLD_SECONDS: unconfirmed, they are the gateway's to write should it stop meanwhile."""
    while True:
        for delay in (*RETRY_DELAYS, None):
            try:
                insert_rows(engine, fields, rows, give_way=give_way)
                return 0
            except Exception as exc:
                # A store file gone will not come back by waiting, nor will rows the database refuses.
                if delay is not None and transient(exc):
                    log.warning(
                        "writing %d usage records failed (%s); retrying in %.1fs", len(rows), failure(exc), delay
                    )
                    time.sleep(delay)
                    continue
                refused, why = refused_alone(engine, fields, rows, exc)
                if not refused:
                    return 0
                if set_aside(dead_letter, fields, refused, why):
                    return len(refused)
                rows = refused  # the others are stored
                break
        log.error("holding %d usage records; trying again in %.0fs", len(rows), HOLD_SECONDS)
        time.sleep(HOLD_SECONDS)


@contextmanager
def _ignored_from_birth(*signals: signal.Signals) -> Iterator[None]:
    """Start the child with these signals ignored from its first instruction, not only once `_child` runs:
    a spawned interpreter takes a second or more to import on a busy core, and a process-group signal in
    that window would kill it with rows already in its pipe. Ignored dispositions survive exec (handlers do
    not); the signals are blocked meanwhile so one meant for the gateway is delivered after, not lost."""
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    except (ValueError, OSError):
        yield
        return
    previous: dict[signal.Signals, Any] = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, signal.SIG_IGN)
    except ValueError:  # not the main thread: dispositions cannot change here
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _null(_: None) -> None:
    return None


def _child(conn: Connection) -> None:
    """The writer's life: its settings arrive first (a database URL may hold a password: not on the
    command line, where `ps` shows it), then batches until STOP or the gateway is gone (EOF)."""
    from poolgate.store.db import open_engine
    from poolgate.telemetry.logging import setup_logging

    # Ctrl-C and systemd signal the whole process group: the writer must outlive that signal until the
    # gateway has drained its last batch and sent STOP (or gone away: EOF).
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # Not on Windows; a sandbox refusing it leaves the writer at the gateway's priority, working the same.
    if hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(NICENESS)
    # sqlite3 binds ints, floats and strings as they are, but looks every None and bool up in its adapter
    # registry, raising and clearing an AttributeError on the way (callgrind: a fifth of this process's work
    # per record). Registered, each is one lookup and a call. (This process is the writer's alone.)
    sqlite3.register_adapter(bool, int)
    sqlite3.register_adapter(type(None), _null)

    setup_logging("info")
    url, fields, dead_letter = msgspec.msgpack.decode(conn.recv_bytes(), type=tuple[str, tuple[str, ...], str])
    engine = open_engine(url, warn_exposed=False)  # the gateway has warned of the store's files
    decoder = msgspec.msgpack.Decoder(list[tuple[Any, ...]])
    pacing = Pacing()
    # The gateway gone (its end closed, or reset when it was killed): everything it sent has been handled.
    # Only the pipe's errors mean that: an error storing the rows still ends the writer with its traceback.
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if data in (STOP, SYNC):
            if not _answered(conn, DONE) or data == STOP:
                return
            continue
        aside = _insert_or_set_aside(engine, fields, decoder.decode(data), Path(dead_letter), pacing.give_way)
        pacing.batch_done()
        if not _answered(conn, SET_ASIDE + str(aside).encode() if aside else ACK):
            return


def _answered(conn: Connection, answer: bytes) -> bool:
    """Send the gateway an answer; False when it is gone."""
    try:
        conn.send_bytes(answer)
    except OSError:
        return False
    return True


def as_utf8(rows: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """`rows` with every string one UTF-8 can encode: half of a surrogate pair (JSON can write one, and Python's
    own JSON reader, PyJWT's, takes it) replaced by `?`. Stored so rather than refused: one such string ended the
    writer's periodic task, and every record after it waited in memory."""
    return [
        tuple(value.encode("utf-8", "replace").decode() if isinstance(value, str) else value for value in row)
        for row in rows
    ]


class WriterProcess:
    """The gateway's handle on the child. Not thread-safe: one call at a time (the gateway makes them from
    worker threads, one hand-over at a time)."""

    def __init__(self, url: str, fields: tuple[str, ...], dead_letter: Path) -> None:
        self._conn, child_conn = Pipe()
        self._encoder = msgspec.msgpack.Encoder()
        # Batches sent and not yet confirmed, oldest first (the child confirms in order).
        self._unconfirmed: deque[list[tuple[Any, ...]]] = deque()
        self.confirmed = 0  # rows stored
        self.set_aside = 0  # rows confirmed as set aside
        child_fd = child_conn.fileno()
        try:
            with _ignored_from_birth(*STOP_SIGNALS):
                # This process's import path, as multiprocessing passes it: the child imports the same poolgate.
                self._process = subprocess.Popen(
                    [sys.executable, "-c", _BOOT, str(child_fd), *sys.path],
                    pass_fds=(child_fd,),
                    stdin=subprocess.DEVNULL,
                )
        finally:
            child_conn.close()
        self._conn.send_bytes(self._encoder.encode((url, fields, str(dead_letter))))
        # Should the gateway exit without `stop()` (an unhandled error), it still waits until the child has
        # written what it was handed, as `stop()` does.
        atexit.register(self.stop, EXIT_TIMEOUT)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def send(self, rows: list[tuple[Any, ...]]) -> None:
        """Hand rows over; raises OSError when the child is gone (the caller then takes back what was not
        confirmed, these rows included, with `stop`, and writes it itself)."""
        try:
            data = self._encoder.encode(rows)
        except UnicodeEncodeError:
            rows = as_utf8(rows)
            data = self._encoder.encode(rows)
        self._unconfirmed.append(rows)
        try:
            self._conn.send_bytes(data)
            while self._conn.poll():
                self._confirm(self._conn.recv_bytes())
        except EOFError as exc:
            raise OSError("the usage writer process closed its end") from exc

    def _confirm(self, answer: bytes) -> bool:
        """Take one answer of the child's; True when it is DONE (everything sent before is stored)."""
        if answer == ACK:
            self.confirmed += len(self._unconfirmed.popleft())
            return False
        if answer.startswith(SET_ASIDE):
            batch = len(self._unconfirmed.popleft())
            aside = int(answer[len(SET_ASIDE) :])
            self.set_aside += aside
            self.confirmed += batch - aside
            return False
        return True

    def sync(self) -> None:
        """Block until the child has written everything sent before (call from a thread); OSError when the
        child is gone."""
        try:
            self._conn.send_bytes(SYNC)
            while not self._confirm(self._conn.recv_bytes()):
                pass
        except EOFError as exc:
            raise OSError("the usage writer process closed its end") from exc

    def stop(self, timeout: float) -> list[list[tuple[Any, ...]]]:
        """Ask the child to finish and exit, waiting up to `timeout` for it to confirm all it was sent; a
        child that does not (stuck on a full disk, a database locked for long, or dead) is killed. Returns
        the batches it did not confirm: the caller's to write."""
        atexit.unregister(self.stop)
        done = False
        deadline = time.monotonic() + timeout
        try:
            self._conn.send_bytes(STOP)
            while not done and self._conn.poll(max(0.0, deadline - time.monotonic())):
                done = self._confirm(self._conn.recv_bytes())
        except (OSError, EOFError):
            pass
        if not done:
            self._process.kill()  # it ignores SIGTERM
        try:
            self._process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._conn.close()
        return list(self._unconfirmed)

    def kill(self) -> None:
        """End a child that takes no more rows: a hand-over blocked on it fails (OSError) and returns."""
        self._process.kill()


def main(fd: int) -> None:
    """The child's entry point (see `_BOOT`): `fd` is its end of the socket pair."""
    _child(Connection(fd))

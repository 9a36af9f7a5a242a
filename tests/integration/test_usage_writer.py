"""The usage writer process: what is handed to it gets written, whatever signals the process group gets."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import sqlite3
import subprocess
import sys
import termios
import time
from pathlib import Path

import msgspec
import orjson
import pytest
from msgspec.structs import replace
from sqlalchemy import create_engine

from poolgate.mock import MockServer
from poolgate.store import writer_process
from poolgate.store.db import migrate, open_engine
from poolgate.store.usage import RECORD_FIELDS, SET_ASIDE_FILE, UsageWriter, count_records, restore_set_aside
from tests.conftest import MODEL, gateway_config, start_gateway, user
from tests.unit.test_observe import event


async def test_a_group_signal_while_the_writer_is_still_starting_loses_nothing(tmp_path: Path) -> None:
    """Ctrl-C or systemd signal the whole process group, possibly within the second the spawned writer
    needs to import: it must ignore SIGINT and SIGTERM from birth, not only once its code runs."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    writer = UsageWriter(engine, tmp_path / "dead-letter.jsonl", flush_interval=0.01)
    writer.start()
    assert writer._process is not None and writer._process.pid is not None
    os.kill(writer._process.pid, signal.SIGTERM)
    os.kill(writer._process.pid, signal.SIGINT)
    for index in range(50):
        writer.submit(event(f"req_{index}").record)
    await writer.stop()
    assert count_records(engine) == 50
    assert not (tmp_path / "dead-letter.jsonl").exists()


async def test_the_writer_process_gives_way_to_the_gateway_on_a_shared_core(tmp_path: Path) -> None:
    """The writer's inserts come in bursts (a flush every half second): at the gateway's priority they
    slowed the requests that arrived during one (the p99 of a sequential client). It runs less favoured."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    writer = UsageWriter(engine, tmp_path / "dead-letter.jsonl", flush_interval=0.01)
    writer.start()
    try:
        writer.submit(event("req_nice").record)
        await writer.flush()  # stored: the child's own code has run
        assert count_records(engine) == 1
        assert writer._process is not None and writer._process.pid is not None
        own, its = os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, writer._process.pid)
        assert its > own or own == 19  # nicer than the gateway, unless the gateway is as nice as can be
        assert its == min(own + writer_process.NICENESS, 19)
    finally:
        await writer.stop()


async def test_handing_a_batch_to_a_busy_writer_never_stalls_the_event_loop(tmp_path: Path) -> None:
    """A batch larger than the pipe's buffer waits until the writer reads it, and the writer reads only
    after inserting the batch before; requests must be served meanwhile."""
    path = tmp_path / "usage.db"
    engine = open_engine(f"sqlite:///{path}")
    migrate(engine)
    writer = UsageWriter(engine, tmp_path / "dead-letter.jsonl", flush_interval=3600)
    writer.start()
    # Hold SQLite's write lock: the writer's next insert waits (up to its busy timeout, 5 s).
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    handing_over: asyncio.Task[None] | None = None
    try:
        writer.submit(event("req_first").record)
        await writer._flush()  # the writer takes this one and blocks inserting it
        big = "r" * 2000  # 500 such records are ~1 MB: far more than a pipe holds
        for index in range(500):
            writer.submit(replace(event(f"req_{index}").record, route=big))
        handing_over = asyncio.create_task(writer._flush())
        await asyncio.sleep(0.5)
        # The loop ran (this line is reached) while the hand-over is still waiting on the pipe.
        assert not handing_over.done()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        if handing_over is not None:
            await handing_over
        await writer.stop()
    assert count_records(engine) == 501
    assert not (tmp_path / "dead-letter.jsonl").exists()


async def test_a_periodic_flush_hands_over_what_was_pending_then_waits_for_the_next_tick(tmp_path: Path) -> None:
    """Records keep arriving while a batch is handed over (a busy gateway). The periodic flush must not
    chase them with hand-over after hand-over (a worker thread contending with the event loop for the GIL
    without pause); they wait for the next tick, and a draining flush still writes every one."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    writer = UsageWriter(engine, tmp_path / "dead-letter.jsonl", flush_interval=3600)
    writer.start()
    assert writer._process is not None
    loop = asyncio.get_running_loop()
    handed_over: list[int] = []
    send = writer._process.send

    def busy_send(rows: list[tuple[object, ...]]) -> None:
        handed_over.append(len(rows))
        # Three requests finish while this batch is on its way (while the test lasts: a writer that chased
        # them would otherwise never stop).
        for index in range(3 if len(handed_over) < 5 else 0):
            loop.call_soon_threadsafe(writer.submit, event(f"req_during_{len(handed_over)}_{index}").record)
        send(rows)

    writer._process.send = busy_send  # type: ignore[method-assign]
    try:
        for index in range(5):
            writer.submit(event(f"req_{index}").record)
        await writer._flush(drain=False)
        assert handed_over == [5]
        assert len(writer._pending) == 3
        await writer._flush(drain=False)
        assert handed_over == [5, 3]
    finally:
        writer._process.send = send  # type: ignore[method-assign]
        await writer.stop()
    assert count_records(engine) == 5 + 3 * len(handed_over)
    assert not (tmp_path / "dead-letter.jsonl").exists()


# A script of a user's own that runs the gateway's writer, at module level: no `if __name__ == "__main__"`.
SCRIPT = """
import asyncio, os, signal, sys, time
from pathlib import Path
from poolgate.store.db import migrate, open_engine
from poolgate.store.usage import UsageWriter
from tests.unit.test_observe import event

async def main(how: str) -> None:
    data = Path(sys.argv[1])
    engine = open_engine(f"sqlite:///{data / 'usage.db'}")
    migrate(engine)
    writer = UsageWriter(engine, data / "dead-letter.jsonl", flush_interval=3600)
    writer.start()
    assert writer._process is not None
    for index in range(20):
        writer.submit(event(f"req_{index}").record)
    await writer._flush()  # handed to the writer process
    if how == "fail":
        raise RuntimeError("the gateway fails")  # and the writer is never stopped
    if how == "kill":
        time.sleep(1)  # the writer's confirmations arrive, unread
        os.kill(os.getpid(), signal.SIGKILL)
    await writer.stop()

asyncio.run(main(sys.argv[2]))
"""


def run_script(tmp_path: Path, how: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "my_gateway.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path), how],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_gateway_that_dies_of_an_error_still_exits_and_what_it_handed_over_is_written(tmp_path: Path) -> None:
    """The writer ignores SIGTERM (a group signal must not kill it), so nothing may wait for SIGTERM to end
    it: without a clean stop the process used to hang at exit, joining the writer forever."""
    done = run_script(tmp_path, "fail")
    assert done.returncode == 1 and "the gateway fails" in done.stderr
    assert count_records(open_engine(f"sqlite:///{tmp_path / 'usage.db'}")) == 20


def test_a_script_of_ones_own_needs_no_main_guard_for_the_writer_process(tmp_path: Path) -> None:
    """The README's way to add observers is a script that runs the gateway. A writer started by
    multiprocessing imported that script again in the child, which ran it again unless it was guarded by
    `if __name__ == "__main__":`; the writer is a plain interpreter that imports only the store's code."""
    done = run_script(tmp_path, "stop")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "writing from a thread" not in done.stderr, done.stderr[-2000:]
    assert count_records(open_engine(f"sqlite:///{tmp_path / 'usage.db'}")) == 20


def test_a_gateway_killed_leaves_its_writer_to_end_without_a_traceback(tmp_path: Path) -> None:
    """`kill -9` of a gateway: its writer, finding its connection reset (confirmations the gateway had not read),
    ended with a traceback in the gateway's log, after writing what it had been handed."""
    done = run_script(tmp_path, "kill")
    assert done.returncode == -signal.SIGKILL
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert count_records(open_engine(f"sqlite:///{tmp_path / 'usage.db'}")) == 20


async def test_a_writer_process_that_died_is_reaped_and_nothing_is_lost(tmp_path: Path) -> None:
    """Killed (the OOM killer, an operator), the writer was replaced by a thread but left a zombie process
    under the gateway until it exited."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    writer = UsageWriter(engine, tmp_path / "dead-letter.jsonl", flush_interval=3600)
    writer.start()
    assert writer._process is not None and writer._process.pid is not None
    pid = writer._process.pid
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):  # until it is dead (a zombie until reaped)
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            break
        await asyncio.sleep(0.05)
    for index in range(20):
        writer.submit(event(f"req_{index}").record)
    await writer.flush()
    assert writer._process is None and not Path(f"/proc/{pid}").exists()
    await writer.stop()
    assert count_records(engine) == 20


@pytest.mark.parametrize("by", ["writer process", "thread"])
async def test_a_record_holding_a_string_utf8_cannot_encode_is_stored_and_the_writer_goes_on(
    tmp_path: Path, by: str
) -> None:
    """Half of a surrogate pair (`"\\ud800"`: JSON can write it, Python's JSON reader takes it) is no UTF-8: one
    such string in a record ended the writer's periodic task (and made stop fail), and every record after it waited
    in memory. Stored with it replaced, and the records after it as ever."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    writer = UsageWriter(engine, tmp_path / "dead-letter.jsonl", flush_interval=0.01)
    writer.start()
    if by == "thread":
        assert writer._process is not None
        await asyncio.to_thread(writer._process.stop, 5.0)
        writer._process = None
    writer.submit(replace(event("req_odd").record, principal_name="dana\ud800"))
    for _ in range(500):  # until a periodic flush has taken it (the task that died), not the stop's drain
        if not writer._pending:
            break
        await asyncio.sleep(0.01)
    for index in range(5):
        writer.submit(event(f"req_{index}").record)
    await writer.stop()
    with engine.connect() as conn:
        names = dict(conn.exec_driver_sql("SELECT request_id, principal_name FROM usage").all())
    assert len(names) == 6 and names["req_odd"] == "dana?"


def test_records_the_store_cannot_take_are_set_aside_where_only_the_owner_can_read_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database and its key are 0600; the file its records go to when it fails was 0644 under the usual
    umask, with the callers' names, session ids and traces in it."""
    monkeypatch.setattr(writer_process, "RETRY_DELAYS", ())
    engine = create_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")  # no usage table: every insert fails
    dead_letter = tmp_path / "usage-unwritten.jsonl"
    record = event().record
    fields = tuple(msgspec.structs.asdict(record))
    rows = [tuple(msgspec.structs.asdict(record).values())] * 2
    dead_letter.touch(0o644)  # as an older version left it
    previous = os.umask(0o022)
    try:
        # Confirmed to the gateway as set aside, not as stored.
        assert writer_process._insert_or_set_aside(engine, fields, rows, dead_letter) == 2
        assert writer_process._insert_or_set_aside(engine, fields, rows[:1], dead_letter) == 1
    finally:
        os.umask(previous)
    assert dead_letter.stat().st_mode & 0o777 == 0o600
    lines = [line for line in dead_letter.read_bytes().splitlines() if line]
    assert len(lines) == 3 and orjson.loads(lines[0])["request_id"] == record.request_id


def unread_by_the_writer(writer: UsageWriter) -> int:
    """Bytes sent to the writer process that it has not read yet (the socket's send queue)."""
    assert writer._process is not None
    queued = fcntl.ioctl(writer._process._conn.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(queued, sys.byteorder)


async def wait_taken_by_the_writer(writer: UsageWriter) -> None:
    """Until every record submitted has been read by the writer process (not only handed to the socket)."""
    for _ in range(1000):
        process = writer._process
        if not writer._pending and process is not None and process._unconfirmed and not unread_by_the_writer(writer):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the writer process did not take the records")


async def test_rows_a_writer_process_took_but_had_not_stored_when_it_was_killed_are_written_all_the_same(
    tmp_path: Path,
) -> None:
    """The writer waited on a locked database with rows it had been handed, and was killed (the OOM killer,
    `kill -9`): the gateway took a thread for the rows to come, but those rows were gone."""
    path = tmp_path / "usage.db"
    engine = open_engine(f"sqlite:///{path}")
    migrate(engine)
    writer = UsageWriter(engine, tmp_path / "dead-letter.jsonl", flush_interval=0.02)
    writer.start()
    assert writer._process is not None and writer._process.pid is not None
    writer.submit(event("req_first").record)
    await writer.flush()  # the writer is up, its database open
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer's next insert waits
    try:
        for index in range(10):
            writer.submit(event(f"req_{index}").record)
        await wait_taken_by_the_writer(writer)  # it has them, and waits on the lock to insert them
        os.kill(writer._process.pid, signal.SIGKILL)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    for index in range(10, 15):
        writer.submit(event(f"req_{index}").record)
    await writer.stop()
    assert count_records(engine) == 16 and writer.written == 16
    assert not (tmp_path / "dead-letter.jsonl").exists()


async def test_a_writer_process_that_takes_no_more_rows_is_ended_at_stop_and_its_rows_written_here(
    tmp_path: Path,
) -> None:
    """A writer that cannot go on (rows it can neither insert nor set aside: a full disk) holds its rows and
    reads no more: the gateway's stop waited on it, then lost what it held."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    writer = UsageWriter(engine, tmp_path / "dead-letter.jsonl", flush_interval=0.02, stuck_seconds=1.0)
    writer.start()
    assert writer._process is not None and writer._process.pid is not None
    pid = writer._process.pid
    os.kill(pid, signal.SIGSTOP)  # it takes nothing more, and confirms nothing
    big = "r" * 2000  # 500 such records are ~1 MB: far more than the socket holds, so a hand-over blocks
    try:
        for index in range(500):
            writer.submit(replace(event(f"req_{index}").record, route=big))
        for _ in range(1000):  # until a hand-over is under way, blocked on the stopped writer
            if not writer._pending:
                break
            await asyncio.sleep(0.01)
        for index in range(500, 520):  # and some more, as the gateway's last requests at its shutdown
            writer.submit(event(f"req_{index}").record)
        await writer.stop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert count_records(engine) == 520
    assert not Path(f"/proc/{pid}").exists()  # ended and reaped


async def test_at_stop_rows_that_can_be_neither_written_nor_set_aside_are_logged_not_lost_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database that refuses the rows at shutdown and no room for the set-aside file (a full disk): the stop
    raised, uvicorn reported a failed shutdown and skipped the rest of it, and the rows were gone."""
    engine = create_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")  # no usage table: every insert fails
    unwritable = tmp_path / "missing-directory" / "usage-unwritten.jsonl"
    writer = UsageWriter(engine, unwritable, flush_interval=3600, use_process=False)
    writer.start()
    for index in range(3):
        writer.submit(event(f"req_lost_{index}").record)
    await writer.stop()
    logged = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
    assert len(logged) == 3 and all(f"req_lost_{i}" in line for i, line in enumerate(logged))


@pytest.mark.parametrize("room_to_set_aside", [True, False])
async def test_at_stop_records_written_set_aside_and_lost_are_counted_apart(
    tmp_path: Path, room_to_set_aside: bool
) -> None:
    """The shutdown's "stopped; N usage records written" counted records only logged at CRITICAL (a full disk:
    neither the database nor the set-aside file took them) as written."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    folder = tmp_path if room_to_set_aside else tmp_path / "missing-directory"
    writer = UsageWriter(engine, folder / "usage-unwritten.jsonl", flush_interval=3600, use_process=False)
    writer.start()
    for index in range(2):
        writer.submit(event(f"req_stored_{index}").record)
    await writer.flush()
    with engine.begin() as conn:  # the database takes no more
        conn.exec_driver_sql("DROP TABLE usage")
    for index in range(3):
        writer.submit(event(f"req_not_stored_{index}").record)
    await writer.stop()
    assert writer.written == 2
    assert (writer.set_aside, writer.lost) == ((3, 0) if room_to_set_aside else (0, 3))
    said = writer.outcome()
    assert said.startswith("2 usage records written")
    assert ("3 set aside" in said) is room_to_set_aside and ("3 neither written nor set aside" in said) is not (
        room_to_set_aside
    )


async def test_a_record_holding_a_string_utf8_cannot_encode_is_set_aside_when_the_store_fails(tmp_path: Path) -> None:
    """Such a record (see above) that the database would not take for another reason went to the set-aside file,
    whose JSON writer takes UTF-8 only: the stop failed with its traceback, and the records with it were lost."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    dead_letter = tmp_path / "usage-unwritten.jsonl"
    writer = UsageWriter(engine, dead_letter, flush_interval=3600, use_process=False)
    writer.start()
    with engine.begin() as conn:  # the database takes nothing
        conn.exec_driver_sql("DROP TABLE usage")
    writer.submit(replace(event("req_odd").record, principal_name="dana\ud800"))
    writer.submit(event("req_plain").record)
    await writer.stop()
    assert (writer.set_aside, writer.lost) == (2, 0)
    lines = [orjson.loads(line) for line in dead_letter.read_bytes().splitlines() if line]
    assert [(line["request_id"], line["principal_name"]) for line in lines] == [
        ("req_odd", "dana?"),
        ("req_plain", event().record.principal_name),
    ]


def test_rows_that_can_go_nowhere_are_held_until_there_is_room_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer process died (an uncaught OSError) when the set-aside file could not be written either."""
    monkeypatch.setattr(writer_process, "RETRY_DELAYS", ())
    engine = create_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")
    room = tmp_path / "room"
    dead_letter = room / "usage-unwritten.jsonl"
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        room.mkdir(exist_ok=True)  # the disk has room again

    monkeypatch.setattr(writer_process.time, "sleep", sleep)
    record = event().record
    fields = tuple(msgspec.structs.asdict(record))
    writer_process._insert_or_set_aside(engine, fields, [tuple(msgspec.structs.asdict(record).values())], dead_letter)
    assert waits == [writer_process.HOLD_SECONDS]
    assert orjson.loads(dead_letter.read_bytes())["request_id"] == record.request_id


LOCKED = sqlite3.OperationalError("database is locked")  # why a record is set aside


async def test_records_set_aside_by_an_earlier_run_reach_the_ledger_at_the_next_start(tmp_path: Path) -> None:
    """Records set aside while the database was out of reach stayed in their file: `poolgate usage` and the
    budgets seeded at start never counted them."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    dead_letter = tmp_path / SET_ASIDE_FILE
    records = [event(f"req_aside_{index}").record for index in range(3)]
    assert writer_process.set_aside(
        dead_letter, RECORD_FIELDS, [tuple(msgspec.structs.asdict(r).values()) for r in records], LOCKED
    )
    with dead_letter.open("ab") as handle:
        handle.write(b'{"request_id": "req_cut_sh')  # a write a crash cut short
    assert restore_set_aside(engine, dead_letter) == 3
    assert count_records(engine) == 3 and not dead_letter.exists()
    assert (tmp_path / f"{SET_ASIDE_FILE}.unreadable").read_bytes() == b'{"request_id": "req_cut_sh\n'
    # A write cut short (a full disk, a writer ended mid-write) swallows nothing of the next one; a file an
    # earlier restore moved aside and did not finish is taken as well.
    with dead_letter.open("ab") as handle:
        handle.write(b'{"request_id": "req_half')
    assert writer_process.set_aside(
        dead_letter, RECORD_FIELDS, [tuple(msgspec.structs.asdict(event("req_after").record).values())], LOCKED
    )
    leftover = tmp_path / f"{SET_ASIDE_FILE}.999999.restoring"
    writer_process.set_aside(
        leftover, RECORD_FIELDS, [tuple(msgspec.structs.asdict(event("req_left").record).values())], LOCKED
    )
    assert restore_set_aside(engine, dead_letter) == 2 and count_records(engine) == 5
    assert not leftover.exists()
    # Read twice (two gateways starting on one store): stored once.
    writer_process.set_aside(dead_letter, RECORD_FIELDS, [tuple(msgspec.structs.asdict(records[0]).values())], LOCKED)
    assert restore_set_aside(engine, dead_letter) == 1 and count_records(engine) == 5
    assert restore_set_aside(engine, dead_letter) == 0


# A cost past the store's 64-bit integers (10**15 web searches at $0.01 each, before counts were bounded).
UNSTORABLE = 10**19


@pytest.mark.parametrize("use_process", [True, False])
async def test_a_record_the_store_cannot_take_is_set_aside_alone_and_its_batch_stored(
    tmp_path: Path, use_process: bool
) -> None:
    """One record the database refuses (a number no integer column holds) took its whole batch, other callers'
    records with it, to the set-aside file, and back there at every start: their spend was gone from the
    ledger and from their budgets. Only that record is set aside; the others are stored, and counted so."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    dead_letter = tmp_path / SET_ASIDE_FILE
    writer = UsageWriter(engine, dead_letter, flush_interval=3600, use_process=use_process)
    writer.start()
    for index in range(5):
        record = replace(event(f"req_{index}").record, principal_id="key_a", started_at=time.time(), currency="USD")
        writer.submit(replace(record, cost_micro_usd=UNSTORABLE if index == 2 else 7))
    await writer.stop()
    assert count_records(engine) == 4 and (writer.written, writer.set_aside, writer.lost) == (4, 1, 0)
    [aside] = [orjson.loads(line) for line in dead_letter.read_bytes().splitlines() if line]
    assert aside["request_id"] == "req_2"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT sum(micro_usd) FROM spend_days").scalar() == 4 * 7
    # At the next start, the others in a set-aside file are restored and the one the store cannot take kept.
    good = replace(
        event("req_aside_good").record, principal_id="key_a", started_at=time.time(), currency="USD", cost_micro_usd=5
    )
    writer_process.set_aside(dead_letter, RECORD_FIELDS, [tuple(msgspec.structs.asdict(good).values())], LOCKED)
    assert restore_set_aside(engine, dead_letter) == 1 and count_records(engine) == 5
    [kept] = [orjson.loads(line) for line in dead_letter.read_bytes().splitlines() if line]
    assert kept["request_id"] == "req_2"


def test_a_restore_that_stores_nothing_keeps_the_unreadable_lines_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore whose records the database would not take, nor the set-aside file (a full disk), leaves them
    in their file for the next start: the lines that are no records were copied to `.unreadable` at every such
    start all the same, once more each time."""
    from poolgate.store import usage as usage_store

    dead_letter = tmp_path / SET_ASIDE_FILE
    writer_process.set_aside(
        dead_letter, RECORD_FIELDS, [tuple(msgspec.structs.asdict(event().record).values())], LOCKED
    )
    with dead_letter.open("ab") as handle:
        handle.write(b'{"request_id": "req_cut_sh')  # a write a crash cut short
    broken = create_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")  # every insert fails
    monkeypatch.setattr(usage_store, "set_aside", lambda *_: False)  # and so does setting them aside again
    for _ in range(2):
        assert restore_set_aside(broken, dead_letter) == 0
    monkeypatch.undo()
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    assert restore_set_aside(engine, dead_letter) == 1
    assert (tmp_path / f"{SET_ASIDE_FILE}.unreadable").read_bytes() == b'{"request_id": "req_cut_sh\n'


async def test_stop_ends_a_stuck_writer_also_when_its_last_hand_over_is_the_one_that_blocks(tmp_path: Path) -> None:
    """Records that came while the last periodic hand-over was under way are handed over by `stop` itself;
    with the writer stuck, that hand-over blocked for good (only the periodic one had a deadline)."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    writer = UsageWriter(engine, tmp_path / "dead-letter.jsonl", flush_interval=0.02, stuck_seconds=1.0)
    writer.start()
    process = writer._process
    assert process is not None and process.pid is not None
    writer.submit(event("req_first").record)
    await writer.flush()  # the writer is up
    os.kill(process.pid, signal.SIGSTOP)  # and now takes nothing more
    real_send = process.send

    def slow_send(rows: list[tuple[object, ...]]) -> None:  # a large batch's hand-over, under way a while
        time.sleep(0.5)
        real_send(rows)

    process.send = slow_send  # type: ignore[method-assign]
    try:
        for index in range(5):
            writer.submit(event(f"req_{index}").record)
        while writer._pending:  # the periodic hand-over has them
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(writer.stop())
        big = "r" * 2000  # ~1 MB: more than the socket holds
        for index in range(5, 505):
            writer.submit(replace(event(f"req_{index}").record, route=big))
        await asyncio.wait_for(stopping, 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    assert count_records(engine) == 506


async def test_records_after_the_store_file_was_deleted_are_set_aside_and_said_not_counted_written(
    tmp_path: Path, mock: MockServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """`rm poolgate.db` (and its -wal and -shm) while the gateway ran: every later record went into the deleted
    file, which the gateway still held open, without a word, and the stop line counted them written."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        async with gw.client() as client:
            for _ in range(3):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            await gw.gateway.writer.flush()
            for name in ("poolgate.db", "poolgate.db-wal", "poolgate.db-shm"):
                (tmp_path / name).unlink(missing_ok=True)
            after = [
                (await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())).headers[
                    "request-id"
                ]
                for _ in range(5)
            ]
    finally:
        await gw.stop()
    writer = gw.gateway.writer
    assert (writer.written, writer.set_aside) == (3, 5), writer.outcome()
    kept = (tmp_path / SET_ASIDE_FILE).read_bytes().splitlines()
    assert sorted(orjson.loads(line)["request_id"] for line in kept if line.strip()) == sorted(after)
    logged = capfd.readouterr().err
    store = re.escape(str(tmp_path / "poolgate.db"))
    said = rf"ERROR poolgate.usage: could not write \d+ usage records \(StoreFileGone: {store} was deleted or replaced"
    assert re.search(said, logged), logged

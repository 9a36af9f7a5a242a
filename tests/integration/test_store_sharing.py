"""Processes that share one store, as the README's "Scaling out" has instances do: they start together."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from poolgate.mock import MockServer
from poolgate.store.crypto import MASTER_KEY_FILE
from poolgate.store.db import MIGRATIONS, close_engine, open_engine
from poolgate.store.writer_process import STOP_SIGNALS
from tests.conftest import gateway_config, start_gateway

# Each process waits for the same instant, then takes the master key and opens (and migrates) the store.
_OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from poolgate.store.crypto import load_master_key
from poolgate.store.db import open_engine
data, at = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, at - time.time()))
key = load_master_key(data)
open_engine("sqlite:///" + str(data / "poolgate.db")).dispose()
print(key.decode())
"""
PROCESSES = 6


def open_at_once(data: Path) -> list[str]:
    """The master key each process read; fails on any process that failed."""
    at = time.time() + 2.0  # after every interpreter has started
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AT_ONCE, str(data), repr(at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    keys = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        keys.append(out.strip())
    return keys


def test_processes_starting_together_on_a_new_store_agree_on_it(tmp_path: Path) -> None:
    """Two processes creating one store at once: one failed ("table meta already exists", "UNIQUE constraint
    failed: meta.key", "database is locked"), or read the master key file while the other was still writing
    it ("POOLGATE_MASTER_KEY is not a valid key")."""
    for round_ in range(3):
        data = tmp_path / f"store-{round_}"
        keys = open_at_once(data)
        assert len(set(keys)) == 1 and keys[0] == (data / MASTER_KEY_FILE).read_text().strip()
        assert [p.name for p in data.iterdir() if p.name.startswith(".master")] == []  # no key file left over


def test_processes_starting_together_on_an_older_store_migrate_it_once(tmp_path: Path) -> None:
    """A new version deployed to every instance at once: the others failed with "duplicate column name"."""
    database = tmp_path / "poolgate.db"
    for _ in range(3):
        open_engine(f"sqlite:///{database}").dispose()
        older = create_engine(f"sqlite:///{database}")
        with older.begin() as conn:  # a store at schema v6: v7 adds this column, v9 the rest
            for added_later in ("TABLE spend_days", "TABLE traces"):
                conn.execute(text(f"DROP {added_later}"))
            conn.execute(text("ALTER TABLE usage DROP COLUMN charged_micro_usd"))
            conn.execute(text("UPDATE meta SET value = '6' WHERE key = 'schema_version'"))
        older.dispose()
        open_at_once(tmp_path)
        current = create_engine(f"sqlite:///{database}")
        assert "charged_micro_usd" in {column["name"] for column in inspect(current).get_columns("usage")}
        with current.connect() as conn:
            assert conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == str(
                len(MIGRATIONS)
            )
        current.dispose()


def test_a_store_another_process_holds_locked_longer_than_the_busy_timeout_still_opens(tmp_path: Path) -> None:
    """Switching a new store to WAL waits for another process's write (a migration on a slow machine) beyond
    SQLite's 5 s busy timeout: it failed with "database is locked" when instances started together."""
    database = tmp_path / "poolgate.db"
    holder = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
    holder.execute("CREATE TABLE other (x INTEGER)")  # a store still in SQLite's default journal mode
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(5.5, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        open_engine(f"sqlite:///{database}").dispose()
    finally:
        release.join()
        holder.close()
    with sqlite3.connect(database) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_current_store_opens_without_waiting_for_another_processs_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening took SQLite's write lock to check the schema version: a CLI report waited behind a busy
    gateway's writes (seconds under load), and a user who may only read the store could not open it."""
    import poolgate.store.db as db

    database = tmp_path / "poolgate.db"
    open_engine(f"sqlite:///{database}").dispose()  # a store at the current version
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a gateway writing
    monkeypatch.setattr(db, "MIGRATION_WAIT_SECONDS", 0.5)  # waiting for it at all fails here
    try:
        engine = open_engine(f"sqlite:///{database}")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM usage")).scalar() == 0
        engine.dispose()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# Another process using the store a moment: it opens it, reads, writes and closes it.
_USE_A_MOMENT = """
import sqlite3, sys
store = sqlite3.connect(sys.argv[1])
store.execute("INSERT INTO meta VALUES ('visitor', '1')")
store.commit()
store.close()
"""


def test_a_process_with_several_connections_keeps_its_hold_on_the_store(tmp_path: Path) -> None:
    """Each new pooled connection read the file's header through a descriptor of its own: closing it dropped
    every POSIX lock the process held on the file, SQLite's own among them. The next process to close the store
    took itself for the last one and deleted the -wal and -shm files under the gateway, whose later records
    went into deleted files (and revocations were no longer seen)."""
    database = tmp_path / "poolgate.db"
    engine = open_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as first, engine.connect() as second:  # the pool opens a second connection
            first.execute(text("SELECT count(*) FROM meta"))
            second.execute(text("SELECT count(*) FROM meta"))
        subprocess.run([sys.executable, "-c", _USE_A_MOMENT, str(database)], check=True, timeout=60)
        assert database.with_name("poolgate.db-wal").exists()
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO meta VALUES ('after', '1')"))
        # What this process writes after the visit is in the store others read.
        with sqlite3.connect(database) as other:
            assert other.execute("SELECT count(*) FROM meta WHERE key IN ('visitor', 'after')").fetchone() == (2,)
    finally:
        engine.dispose()


def test_a_clean_stop_does_not_hold_the_other_processes_writes_off_while_someone_reads(tmp_path: Path) -> None:
    """A stopping gateway's checkpoint waited out its whole busy timeout (5 s) for a reader of the store (a
    backup, a long report) while holding off every writer: the other gateways' records and the CLI's changes
    waited as long, or failed "database is locked"."""
    database = tmp_path / "poolgate.db"
    stopping = open_engine(f"sqlite:///{database}")
    with stopping.begin() as conn:
        conn.execute(text("INSERT INTO meta VALUES ('before', '1')"))
    reader = sqlite3.connect(database, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM meta").fetchall()  # a read snapshot, held
    stop = threading.Thread(target=close_engine, args=(stopping,))
    stop.start()
    time.sleep(0.1)  # the checkpoint under way (had it not begun, the write below would not wait at all)
    writer = sqlite3.connect(database, timeout=2.0)
    try:
        writer.execute("INSERT INTO meta VALUES ('meanwhile', '1')")
        writer.commit()
    finally:
        writer.close()
        stop.join()
        reader.close()


def test_every_new_store_a_process_opens_is_in_wal_mode(tmp_path: Path) -> None:
    """A process remembers the files it found in WAL mode by device and inode: a new store the file system
    gave the inode of one deleted before was taken for that one, and left in rollback-journal mode (its
    readers and writers then block each other)."""
    database = tmp_path / "poolgate.db"
    for _ in range(5):  # inodes are reused at once on most file systems: some new store gets an old one
        engine = open_engine(f"sqlite:///{database}")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()
        for path in tmp_path.glob("poolgate.db*"):
            path.unlink()


async def test_gateways_in_one_process_stopped_in_any_order_leave_the_stop_signals_as_they_found_them(
    tmp_path: Path, mock: MockServer
) -> None:
    """Each put back the handler it found at its start: the first of two gateways stopped first, the second
    put back the first's, which took every later SIGTERM and Ctrl-C for a server already stopped (the test
    run could not be stopped but by SIGKILL)."""
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    config = gateway_config(tmp_path, mock.url)
    first = await start_gateway(config)
    second = await start_gateway(config)
    assert signal.getsignal(signal.SIGTERM) == second._server.handle_exit
    await first.stop()
    assert signal.getsignal(signal.SIGTERM) == second._server.handle_exit  # the one still running has them
    await second.stop()
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == before

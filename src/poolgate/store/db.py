"""Durable storage: the schema, its migrations, and the engine (SQLite by default)."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

log = logging.getLogger(__name__)

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

gateway_keys = Table(
    "gateway_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    # Caller claims as JSON (models, quotas, budget); null = no limits.
    Column("settings", Text),
)

upstreams = Table(
    "upstreams",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("base_url", String(512), nullable=False),
    Column("secret", LargeBinary, nullable=False),
    Column("weight", Integer, nullable=False, default=1),
    Column("models", Text, nullable=False, default="[]"),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", Float, nullable=False),
)

usage = Table(
    "usage",
    metadata,
    Column("request_id", String(40), primary_key=True),
    Column("started_at", Float, nullable=False, index=True),
    Column("principal_id", String(64), index=True),
    Column("principal_name", String(64)),
    Column("endpoint", String(32), nullable=False),
    Column("model", String(128)),
    Column("stream", Boolean, nullable=False),
    Column("upstream_id", String(64)),
    Column("status", Integer, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("error_type", String(64)),
    Column("input_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("cache_creation_input_tokens", Integer, nullable=False),
    Column("cache_read_input_tokens", Integer, nullable=False),
    Column("ttfb_ms", Float),
    Column("duration_ms", Float, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("session_id", String(128)),
    # Routing traces up to schema v8 (later ones are in `traces`): still read, and dropped as they were.
    Column("route", Text),
    # The cost ledger (v5): tokens by type and what the request cost, next to its usage.
    Column("cache_creation_1h_input_tokens", Integer),
    # Micro-units of `currency`; null = the price was unknown (or the row predates pricing), never 0.
    Column("cost_micro_usd", BigInteger),
    Column("currency", String(16)),
    Column("pricing_version", String(64)),
    # Added in schema v6: server-side web searches (billed per search).
    Column("web_search_requests", Integer),
    # Added in schema v7: a budget charge that is not the cost (see `UsageRecord.charged_micro_usd`).
    Column("charged_micro_usd", BigInteger),
)

# Routing traces (v9), apart from their usage rows: dropped after `store.trace_retention_days` by deleting
# their rows, whose pages SQLite reuses for new ones. A trace set to null inside its usage row left a hole no
# new row filled (rows are appended at the table's end): a store grew by every request's trace for ever.
traces = Table(
    "traces",
    metadata,
    Column("request_id", String(40), primary_key=True),
    Column("route", Text, nullable=False),  # the RoutingTrace as JSON
)

# Spend per principal, session ("" for none, as budgets' `NO_SESSION`) and UTC day (v9), kept as rows enter
# `usage` (see `spend_days_of_last_rows`): budgets are seeded from it at every start, which summed the whole
# ledger before (seconds on a large store, the port closed meanwhile).
spend_days = Table(
    "spend_days",
    metadata,
    Column("principal_id", String(64), primary_key=True),
    Column("session_id", String(128), primary_key=True),
    Column("day", BigInteger, primary_key=True),  # the UTC day's first second (epoch)
    Column("micro_usd", BigInteger, nullable=False),
)

# Subscription (OAuth) accounts: the tokens live encrypted in `upstreams.secret`; this is what may be shown.
oauth_accounts = Table(
    "oauth_accounts",
    metadata,
    Column("upstream_id", String(64), primary_key=True),
    Column("state", String(16), nullable=False, default="active"),  # active | refreshing | needs_reauth
    Column("state_reason", Text),
    Column("subscription_type", String(32)),
    Column("label", String(256)),
    Column("scopes", Text, nullable=False, default=""),
    Column("expires_at", Float),
    Column("refreshed_at", Float),
    Column("updated_at", Float, nullable=False),
)

# The last subscription quota picture per account (JSON, wall-clock times), for `poolgate accounts list`
# and for a restarted gateway to remember which account is parked until a reset.
quota_snapshots = Table(
    "quota_snapshots",
    metadata,
    Column("upstream_id", String(64), primary_key=True),
    Column("picture", Text, nullable=False),
    Column("observed_at", Float, nullable=False),
)

# Channels' usage in the current calendar month (UTC), so that a restart resets neither a flat-fee quota nor
# a tiered price's tier (the table keeps its first name: it held flat-fee counters only before).
flat_fee_counters = Table(
    "flat_fee_counters",
    metadata,
    Column("upstream_id", String(64), primary_key=True),
    Column("month", String(7), nullable=False),  # YYYY-MM
    Column("requests", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Requests callers sent (their cost counts towards their budgets), as opposed to the gateway's own.
CALLER_ENDPOINTS = ("messages", "count_tokens")

SCHEMA_VERSION_KEY = "schema_version"
REVISION_KEY = "revision"
TRACES_FORGOTTEN_KEY = "traces_forgotten_before"


def _v1(conn: Connection) -> None:
    metadata.create_all(conn)


def _add_columns(conn: Connection, table: str, columns: tuple[tuple[str, str], ...]) -> None:
    """Add the columns a table lacks: a database created at a later version already has them (create_all)."""
    present = {column["name"] for column in inspect(conn).get_columns(table)}
    for name, sql_type in columns:
        if name not in present:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))


def _v2_usage_route(conn: Connection) -> None:
    """Routing traces in usage records."""
    _add_columns(conn, "usage", (("route", "TEXT"),))


def _v3_key_settings(conn: Connection) -> None:
    """Caller claims on gateway keys. A database created at v3 already has the column (create_all)."""
    if not inspect(conn).has_table("gateway_keys"):
        gateway_keys.create(conn)
    else:
        _add_columns(conn, "gateway_keys", (("settings", "TEXT"),))


def _v4_oauth_accounts(conn: Connection) -> None:
    """Subscription accounts and their last quota pictures. Idempotent: create_all may have made them."""
    oauth_accounts.create(conn, checkfirst=True)
    quota_snapshots.create(conn, checkfirst=True)


_V5_USAGE_COLUMNS = (
    ("cache_creation_1h_input_tokens", "INTEGER"),
    ("cost_micro_usd", "BIGINT"),
    ("currency", "VARCHAR(16)"),
    ("pricing_version", "VARCHAR(64)"),
)


def _v5_cost_ledger(conn: Connection) -> None:
    """Cost next to each usage record, and flat-fee counters. Idempotent: create_all may have made them."""
    if not inspect(conn).has_table("usage"):
        usage.create(conn)
    _add_columns(conn, "usage", _V5_USAGE_COLUMNS)
    flat_fee_counters.create(conn, checkfirst=True)


def _v6_web_searches(conn: Connection) -> None:
    """Web searches next to the tokens of each usage record."""
    _add_columns(conn, "usage", (("web_search_requests", "INTEGER"),))


def _v7_budget_charges(conn: Connection) -> None:
    """Budget charges that are not the cost, next to it."""
    _add_columns(conn, "usage", (("charged_micro_usd", "BIGINT"),))


def _v8_base_urls_without_v1(conn: Connection) -> None:
    """Stored upstreams' base URLs without a trailing `/v1`, which older builds accepted (every request to
    such an account was the API's 404 from `/v1/v1/messages`, with nothing said), rewritten as the
    configuration's check would have had them written."""
    # Imported here: the configuration imports this module.
    from poolgate.config import without_api_version

    if not inspect(conn).has_table("upstreams"):  # a store of usage records alone stores no upstream
        return
    for upstream_id, base_url in conn.execute(select(upstreams.c.id, upstreams.c.base_url)).all():
        fixed = without_api_version(base_url)
        if fixed != base_url:
            conn.execute(upstreams.update().where(upstreams.c.id == upstream_id).values(base_url=fixed))
            # Not the URLs themselves: an older build's may hold credentials (user:password@host).
            log.warning(
                "stored upstream %s: dropped the /v1 its base_url ended in (poolgate appends /v1/messages itself;"
                " every request to it was the API's 404)",
                upstream_id,
            )


def _spend_of(row: str) -> str:
    """SQL for what a usage row (`row`: its name and a dot, or "") spent of its caller's budget, in µUSD:
    what the budget was charged where that was not the cost, else the cost in USD."""
    return f"COALESCE({row}charged_micro_usd, CASE WHEN {row}currency = 'USD' THEN {row}cost_micro_usd END)"


def _caller_spend(row: str) -> str:
    """SQL for whether a usage row is a caller's spend: the gateway's own requests (keepalives, warm-ups)
    are no budget's, nor is what cost nothing or an unknown price."""
    endpoints = ", ".join(f"'{endpoint}'" for endpoint in CALLER_ENDPOINTS)
    return f"{row}principal_id IS NOT NULL AND {row}endpoint IN ({endpoints}) AND {_spend_of(row)} > 0"


def _utc_day(row: str) -> str:
    return f"CAST({row}started_at / 86400 AS INTEGER) * 86400"


def spend_days_of_last_rows(marker: str) -> str:
    """SQL adding to `spend_days` the spend of the ledger's last rows, as many as its one parameter (`marker`:
    the driver's placeholder) says: a batch the same transaction has just inserted. The transaction holds the
    store's write lock, so the batch's rows have the highest rowids, one after another (a row an
    `INSERT OR IGNORE` of a restored set-aside file skipped takes none), and nothing updates or deletes a row's
    cost. Per batch, not per row: a trigger's statement for each row cost ~16,000 instructions a request."""
    return f"""INSERT INTO spend_days (principal_id, session_id, day, micro_usd)
    SELECT principal_id, COALESCE(session_id, ''), {_utc_day("")}, SUM({_spend_of("")}) FROM usage
    WHERE rowid > (SELECT max(rowid) FROM usage) - {marker} AND {_caller_spend("")} GROUP BY 1, 2, 3
    ON CONFLICT (principal_id, session_id, day) DO UPDATE SET micro_usd = micro_usd + excluded.micro_usd"""


def _v9_traces_apart_and_spend_days(conn: Connection) -> None:
    """Routing traces in a table of their own. The traces older builds stored in the usage rows stay there
    (moving them would rewrite the whole ledger: minutes on a large store) until the retention drops them.
    Spend per principal, session and day, summed from the ledger once here (a few seconds for a million
    rows), then kept as rows are inserted (by a trigger until v10, see `spend_days_of_last_rows`)."""
    traces.create(conn, checkfirst=True)
    spend_days.create(conn, checkfirst=True)
    started = time.monotonic()
    conn.execute(spend_days.delete())  # summed afresh: idempotent, as the other steps
    summed = conn.exec_driver_sql(
        f"""INSERT INTO spend_days (principal_id, session_id, day, micro_usd)
        SELECT principal_id, COALESCE(session_id, ''), {_utc_day("")}, SUM({_spend_of("")}) FROM usage
        WHERE {_caller_spend("")} GROUP BY 1, 2, 3"""
    ).rowcount
    if summed:
        log.info(
            "summed the ledger's spend per caller, session and day (%d rows) in %.1fs",
            summed,
            time.monotonic() - started,
        )


def _v10_spend_days_per_batch(conn: Connection) -> None:
    """`spend_days` kept by the usage writer per batch (`spend_days_of_last_rows`), no longer by a trigger per
    row (v9 created it)."""
    conn.exec_driver_sql("DROP TRIGGER IF EXISTS usage_spend_days")


# Append-only: each entry migrates from version i to i + 1.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _v1,
    _v2_usage_route,
    _v3_key_settings,
    _v4_oauth_accounts,
    _v5_cost_ledger,
    _v6_web_searches,
    _v7_budget_charges,
    _v8_base_urls_without_v1,
    _v9_traces_apart_and_spend_days,
    _v10_spend_days_per_batch,
]


# How long a statement waits for another process's lock on the store before it fails "database is locked".
BUSY_TIMEOUT_SECONDS = 5.0


def _sqlite_pragmas(database: Path | None) -> Callable[[Any, Any], None]:
    """The settings each new connection to the SQLite file `database` (None: in memory) is given."""

    def set_up(dbapi_connection: Any, record: Any) -> None:
        identity = None if database is None else file_identity(database)
        if database is not None:
            record.info[OPENED_FILE] = (database, identity)
        cursor = dbapi_connection.cursor()
        # First: switching a new database to WAL takes its lock, which another process may hold at that moment.
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_SECONDS * 1000:.0f}")
        # WAL lets the CLI read and write while a gateway holds the database open. The switch can also fail at
        # once, busy timeout or not (SQLite refuses to wait when the waiting could deadlock), or outlast it
        # while another process migrates the new store: it is tried again. A file in WAL mode stays in it: not
        # switched again, as that would wait out every lock for as long, where a command fails after the busy
        # timeout (a store another process holds exclusively kept every command waiting a minute). The mode is
        # looked at once per file and process, before any connection of the process holds a lock on the file
        # (see `in_wal_mode`): the first connection's set-up, the others' waiting for it.
        with _WAL_CHECK:
            if identity is None or identity not in _WAL_FILES:
                if not in_wal_mode(database):
                    _while_locked(lambda: cursor.execute("PRAGMA journal_mode=WAL"))
                if identity is not None:
                    _WAL_FILES.add(identity)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return set_up


# The SQLite files (device, inode) this process has put or found in WAL mode.
_WAL_FILES: set[tuple[int, int]] = set()
_WAL_CHECK = threading.Lock()


# In a connection's `info`: the SQLite file it opened, and that file's identity then (see `check_store_file`).
OPENED_FILE = "poolgate_opened_file"


class StoreFileGone(Exception):
    """The store's file was deleted or replaced while the store was open."""


def file_identity(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` (its device and inode); None: none is."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


def check_store_file(conn: Connection) -> None:
    """Raises StoreFileGone when the file the connection opened is no longer at its path (deleted, or
    replaced by another): SQLite goes on writing into the file it holds open, which nothing will read
    again, and says nothing."""
    opened = conn.info.get(OPENED_FILE)
    if opened is not None and file_identity(opened[0]) != opened[1]:
        raise StoreFileGone(f"{opened[0]} was deleted or replaced while the store was open")


# Bytes 18 and 19 of a SQLite file's header, its format's write and read versions, are 2 in WAL mode
# (https://www.sqlite.org/fileformat.html#the_database_header).
_WAL_FORMAT = b"\x02\x02"


def in_wal_mode(database: Path | None) -> bool:
    """Whether the SQLite file is in WAL mode, from its header: SQLite's own answer (`PRAGMA journal_mode`)
    waits, as every read does, for a lock another process may hold. Only for a file this process holds no
    connection to: closing a descriptor of a file drops every POSIX lock the process holds on it, SQLite's
    among them — the shared lock that tells another process closing the store that it is not the last one
    (which then deleted the -wal and -shm files under this one: its later writes went into deleted files,
    and a checkpoint could corrupt the store)."""
    if database is None:
        return False
    try:
        with database.open("rb") as file:
            return file.read(20)[18:] == _WAL_FORMAT
    except OSError:
        return False


def sqlite_file(url: str) -> Path | None:
    """The database file a SQLite URL names (without its query: `?timeout=30`); None for an in-memory
    database (`sqlite://`, `:memory:`, `file::memory:?uri=true`, `mode=memory`) or a URL that names none."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = (parsed.database or "").removeprefix("file:")
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        return None
    return Path(database)


def sqlite_url(url: str, database: Path) -> str:
    """`url` naming `database` instead (its query, and a `file:` URI's prefix, kept; the path escaped)."""
    parsed = make_url(url)
    prefix = "file:" if (parsed.database or "").startswith("file:") else ""
    return parsed.set(database=prefix + str(database)).render_as_string(hide_password=False)


def sqlite_file_url(path: Path) -> str:
    """The URL of the SQLite file at `path` (a `?` or `%` in a directory's name is the name's, not a query)."""
    return URL.create("sqlite", database=str(path)).render_as_string()


def open_engine(url: str, warn_exposed: bool = True) -> Engine:
    """`warn_exposed`: warn of store files others may read (see `_private_file`); the usage writer's child
    does not, as the gateway that started it has (each warning came twice in one log)."""
    database = sqlite_file(url) if url.startswith("sqlite") else None
    if database is not None:
        _private_file(database, warn_exposed)
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas(database))
    migrate(engine)
    return engine


def _private_file(path: Path, warn_exposed: bool = True) -> None:
    """The store holds key hashes, usage and (encrypted) secrets: readable by its owner only. A new data
    directory is made 0700 and the database file 0600 (SQLite gives its -wal and -shm files the database
    file's mode); an existing one is left as its owner set it, and warned of if others may read it (older
    builds made them 0644, which an upgrade kept without a word). Not the directory: what it lets others reach
    is the files, as their own modes allow."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        # A new file may reuse the (device, inode) of a store deleted before: not in WAL mode for that.
        with _WAL_CHECK:
            _WAL_FILES.discard(file_identity(path))
    for file in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))):
        if warn_exposed and file.exists():
            warn_if_accessible_by_others(
                file,
                "whoever can read it can read the gateway keys' hashes, the usage records and the encrypted"
                " upstream secrets",
            )


# Paths already warned of as accessible by others: once per process, not at every reload or engine.
_warned_accessible: set[Path] = set()


def warn_if_accessible_by_others(path: Path, exposes: str) -> None:
    """Warned of as ssh does of a private key: not refused, nor changed (its owner may mean it)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077 and path not in _warned_accessible:
        _warned_accessible.add(path)
        log.warning(
            "%s is accessible by group or others (mode %04o): %s; run `chmod %s %s`",
            path,
            mode,
            exposes,
            "700" if path.is_dir() else "600",
            path,
        )


def close_engine(engine: Engine) -> None:
    """Fold SQLite's write-ahead log into the database file and close the engine's connections: after a clean
    stop the file alone holds the whole store (a copy of `poolgate.db` alone missed every row still in
    `-wal`). Another process reading the store at that moment may keep the log from being emptied: the
    checkpoint waits for it only briefly, as it holds off every writer meanwhile (the other gateways sharing
    the store, the CLI: they waited out the whole busy timeout while a backup or a long report read)."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_SECONDS * 1000:.0f}")
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()


# How long the checkpoint of a clean stop waits for readers of the store's log (see `close_engine`).
CHECKPOINT_WAIT_SECONDS = 0.2


def damage_found(engine: Engine) -> str | None:
    """What SQLite's quick check finds wrong in the store's file (its first finding, and how many more);
    None: nothing. One line: a row of the check may hold many findings, a line each, under a heading
    ("*** in database main ***")."""
    with engine.connect() as conn:
        findings = conn.exec_driver_sql("PRAGMA quick_check").scalars().all()
    if findings == ["ok"]:
        return None
    lines = [line for finding in findings for line in str(finding).splitlines() if not line.startswith("*** ")]
    return lines[0] + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")


def read_meta(conn: Connection, key: str) -> str | None:
    return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar_one_or_none()


def _write_meta(conn: Connection, key: str, value: str) -> None:
    if read_meta(conn, key) is None:
        conn.execute(meta.insert().values(key=key, value=value))
    else:
        conn.execute(meta.update().where(meta.c.key == key).values(value=value))


# How long a process waits for another one's migration of the same store (adding columns is quick, v9's sum
# of the ledger ~9 s for 1.5M rows; the SQLite busy timeout alone is 5 s).
MIGRATION_WAIT_SECONDS = 60.0


class StoreVersionError(Exception):
    """The store's schema is not one this build can use."""


def migrate(engine: Engine) -> None:
    """Bring the schema to the current version. Processes that open one store at once (instances started
    together, the CLI while a gateway starts) take turns: SQLite's write lock is taken before the version
    is read (`BEGIN IMMEDIATE`), so the second finds the first's work done instead of creating the same
    tables or columns again. A store at the current version is only read: no write lock, so a report by an
    auditor who may only read the store works, and commands do not queue behind a busy gateway's writes.
    A StoreVersionError refuses a store of a newer schema (see `schema_version`)."""
    with engine.connect() as conn:
        if schema_version(conn) == len(MIGRATIONS):
            return
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            _lock_for_writing(conn)
        meta.create(conn, checkfirst=True)
        version = schema_version(conn)
        for step in MIGRATIONS[version:]:
            step(conn)
        if version < len(MIGRATIONS):
            _write_meta(conn, SCHEMA_VERSION_KEY, str(len(MIGRATIONS)))
        conn.commit()
    # An upgrade's migration is a one-way change to the store (a new store's making is none).
    if 0 < version < len(MIGRATIONS):
        log.info("migrated the store from schema v%d to v%d", version, len(MIGRATIONS))


def schema_version(conn: Connection) -> int:
    """The store's schema version; 0 for a new store (no `meta` table yet). A StoreVersionError for one this
    build cannot use: a newer build's store was opened without a word, and its older reading of the rows
    (the keys' limits, ignored by a build that predates them) served as if nothing were amiss."""
    if not inspect(conn).has_table(meta.name):
        return 0
    stored = read_meta(conn, SCHEMA_VERSION_KEY) or "0"
    try:
        version = int(stored)
    except ValueError:
        raise StoreVersionError(
            f"its schema version {stored!r} is not a number (the meta table was changed by hand?): restore a backup"
        ) from None
    if version > len(MIGRATIONS):
        raise StoreVersionError(
            f"it was migrated by a newer poolgate (schema v{version}; this build knows up to v{len(MIGRATIONS)}): "
            "run that version, or restore a backup"
        )
    return version


def _lock_for_writing(conn: Connection) -> None:
    _while_locked(lambda: conn.exec_driver_sql("BEGIN IMMEDIATE"))


def _while_locked(take: Callable[[], object]) -> None:
    """`take` a lock on the store, again while another process holds it, for up to MIGRATION_WAIT_SECONDS."""
    deadline = time.monotonic() + MIGRATION_WAIT_SECONDS
    while True:
        try:
            take()
            return
        except (OperationalError, sqlite3.OperationalError) as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def bump_revision(conn: Connection) -> None:
    """Tell running gateways that keys or upstreams changed (they poll this value)."""
    _write_meta(conn, REVISION_KEY, repr(time.time()))


def read_revision(engine: Engine) -> str:
    with engine.connect() as conn:
        return read_meta(conn, REVISION_KEY) or ""


def read_traces_forgotten_before(engine: Engine) -> float:
    """Up to when routing traces have been dropped (epoch seconds; 0: never)."""
    with engine.connect() as conn:
        return float(read_meta(conn, TRACES_FORGOTTEN_KEY) or 0.0)


def write_traces_forgotten_before(engine: Engine, before: float) -> None:
    with engine.begin() as conn:
        _write_meta(conn, TRACES_FORGOTTEN_KEY, repr(before))

"""The store a CLI command uses: its configuration loaded (`load`), the store opened, or refused in one line
when it cannot be used (`engine_for`, `records_engine`, `existing_engine`, `secret_box`, `cannot_open`), and
which keys and upstreams the config file defines rather than the store (a change to one is made there)."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TypeVar

import typer
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError, StatementError

from poolgate.cli.output import err, fail, shown
from poolgate.config import ConfigError, GatewayConfig, load_config
from poolgate.store import repo
from poolgate.store.crypto import MASTER_KEY_FILE, SecretBox, SecretBoxError
from poolgate.store.db import BUSY_TIMEOUT_SECONDS, StoreVersionError, open_engine

# The data directory of the store the running command uses (set by `load`), for its errors to name.
data_dir_in_use: ContextVar[Path | None] = ContextVar("data_dir_in_use", default=None)


def load(config_path: Path | None, data_dir: Path | None = None, secrets_needed: bool = False) -> GatewayConfig:
    """The configuration for a command; only `serve` and `config check` need the file's secrets set (see
    `parse_config`)."""
    try:
        config = load_config(config_path, secrets_needed=secrets_needed, data_dir=data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    data_dir_in_use.set(config.data_dir)
    return config


def cannot_open(data_dir: Path | None, why: str) -> typer.Exit:
    """The one line every command answers a store it cannot use with (README: CLI)."""
    return fail(f"cannot open the store{f' ({data_dir})' if data_dir else ''}: {why}")


def store_problem(exc: BaseException) -> str:
    """Why the store failed, in the driver's words: SQLAlchemy's own message adds the statement and its
    parameters, which may be a key's hash or a secret."""
    reason = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
    if isinstance(reason, OSError):
        return os_problem(reason)
    if "database is locked" in str(reason):
        return (
            f"it is busy: another process has held it locked for over {BUSY_TIMEOUT_SECONDS:g} s ({reason}); try again"
        )
    return str(reason)


def os_problem(exc: OSError) -> str:
    """What the system refused, as one line naming the path and the reason (`/srv/pg: Permission denied`):
    `str(exc)` read as Python's (`[Errno 13] Permission denied: '/srv/pg'`)."""
    if not exc.strerror:
        return str(exc)
    if exc.filename is None:
        return exc.strerror
    path = Path(os.fsdecode(exc.filename))
    if exc.errno == errno.ENOENT and path.parent.is_dir() and not path.exists():
        # Opening the store makes what is missing: a directory that exists and still answers "No such file"
        # (/proc, /sys) takes no new entries, which "No such file or directory" alone did not say.
        return f"{path} cannot be made in {path.parent} ({exc.strerror})"
    return f"{path}: {exc.strerror}"


@contextmanager
def opening_store(config: GatewayConfig) -> Iterator[None]:
    """Opening the store (and its master key): a store that cannot be opened is one line naming it, in
    every command (only `serve` said so; the others showed a page of traceback)."""
    try:
        yield
    except (OSError, SQLAlchemyError, sqlite3.Error, StoreVersionError) as exc:
        # A read-only or missing data directory, a data_dir that is a file, a damaged or read-only database,
        # a master.key that is a directory, an unreachable database, a newer build's schema.
        raise cannot_open(config.data_dir, store_problem(exc)) from None


def engine_for(config: GatewayConfig, reading: bool = False) -> Engine:
    """The store, opened (and migrated); `reading`: for a command that only reads it."""
    with opening_store(config):
        refuse_an_unusable_store(config, reading)
        return open_engine(config.store_url())


def refuse_an_unusable_store(config: GatewayConfig, reading: bool) -> None:
    """What opening the store would fail on obscurely, or get wrong, refused in one line before it is tried."""
    refuse_a_file_for_a_directory(config)
    refuse_a_lost_store(config, reading)


def refuse_a_file_for_a_directory(config: GatewayConfig) -> None:
    """A data directory that is a file, or lies under one, cannot be made: `config check` said ok for it (it
    makes no store), and the others each showed the OSError of whatever they tried to make in it first."""
    for directory in (config.data_dir, config.store_file().parent):
        in_the_way = file_in_the_way(directory)
        if in_the_way is not None:
            raise cannot_open(config.data_dir, f"{in_the_way} is a file, not a directory")


def file_in_the_way(directory: Path) -> Path | None:
    """The file standing at directory or at the nearest of its parents that exists; None: it can be made."""
    for path in (directory, *directory.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def refuse_a_lost_store(config: GatewayConfig, reading: bool) -> None:
    """An empty store file is no store: SQLite takes it for a new database, and opening it writes a new,
    empty schema. Emptied or missing next to its master key (a failed restore, a crash, a deleted file) it
    lost a store's keys, upstreams and ledger, which every caller's 401 and an empty report then hid; and a
    command that only reads never makes a store (see `existing_engine`). A new data directory's file is
    made, and written, before the master key."""
    store_file = config.store_file()
    key_file = config.data_dir / MASTER_KEY_FILE
    if not store_file.exists() and key_file.exists():
        raise cannot_open(
            config.data_dir,
            f"{store_file} is missing, next to an existing {key_file}: "
            "restore the store from its backup, or remove the key file to start afresh",
        )
    if not store_file.is_file() or store_file.stat().st_size > 0:
        return
    if key_file.exists():
        raise cannot_open(
            config.data_dir,
            f"{store_file} is empty, next to an existing {key_file}: "
            "restore the store from its backup, or remove both to start afresh",
        )
    if reading:
        raise cannot_open(config.data_dir, f"{store_file} is empty: restore it from its backup")


def existing_engine(config: GatewayConfig) -> Engine | None:
    """The store, for commands that only read it: None when the embedded one does not exist yet, rather than
    creating it (a mistyped --data-dir used to leave a new, empty store behind and report nothing)."""
    with opening_store(config):  # a data directory that cannot be searched fails `exists`
        refuse_an_unusable_store(config, reading=True)  # not "no store" for a file in the way, or a lost store
        if not config.store_file().exists():
            return None
    return engine_for(config, reading=True)


def records_engine(config: GatewayConfig, defined_in_file: str | None = None) -> Engine:
    """The store whose records a report reads or a command changes; an error when there is none (rather than
    a new, empty store and "no key named …" for a mistyped --data-dir). `defined_in_file`: the key or upstream
    a change names, when the config file defines it: with no store yet, that is the answer, not a data
    directory to check (a config-only setup was told to check its --data-dir)."""
    engine = existing_engine(config)
    if engine is None:
        if defined_in_file is not None:
            raise fail(
                f"{defined_in_file!r} is defined in the config file: change it there (nothing is stored in "
                f"{config.data_dir} yet)"
            )
        where = f"{config.data_dir} (no {config.store_file()})" if not config.store.url else config.store_file()
        raise fail(
            f"no store in {where}: nothing has run with this data directory — check --data-dir, --config or the "
            "configuration's data_dir (or store.url)"
        )
    return engine


T = TypeVar("T")


def stored_rows(listing: Callable[[Engine], list[T]], config: GatewayConfig) -> list[T]:
    """What a listing finds in the store; nothing (and a note) when there is no store yet."""
    engine = existing_engine(config)
    if engine is None:
        err.print(
            f"(no store in {shown(str(config.data_dir))} yet: nothing stored there)", highlight=False, soft_wrap=True
        )
        return []
    return listing(engine)


def secret_box(config: GatewayConfig) -> SecretBox:
    """The box for the store's secrets, checked against one it already holds: a different master key (an
    unset POOLGATE_MASTER_KEY creating a new key file, a wrong one) would encrypt new secrets that the
    gateway cannot read, and take it down at its next start."""
    engine = engine_for(config)
    try:
        with opening_store(config):
            return repo.store_box(engine, config.data_dir)
    except SecretBoxError as exc:
        raise fail(str(exc)) from None


# Keys and upstreams the config file defines are changed there: a command that would change a stored one says so.
IN_CONFIG_FILE = " (it is defined in the config file: change it there)"


def in_config_file(config: GatewayConfig, upstream_id: str) -> bool:
    return any(configured.id == upstream_id for configured in config.upstreams)


def configured_upstream(config: GatewayConfig, upstream_id: str) -> str | None:
    """`upstream_id` when the config file defines it (see `records_engine`), else None."""
    return upstream_id if in_config_file(config, upstream_id) else None

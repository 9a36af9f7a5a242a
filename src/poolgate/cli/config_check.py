"""`poolgate config check`: a configuration file validated without starting anything, against the store
`serve` would use, read as it is: what would stop `serve` fails the check with `serve`'s line, and what
`serve` would warn of (no enabled upstreams, pins and prices naming no upstream, unusable stored keys) is
warned of."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import Engine, create_engine, inspect, select

from poolgate.cli.options import DataDirOption, config_file
from poolgate.cli.output import console, counted, fail, warn
from poolgate.cli.store import cannot_open, load, opening_store, refuse_an_unusable_store
from poolgate.cli.upstreams import NO_UPSTREAMS, needs_login
from poolgate.config import ConfigError, GatewayConfig
from poolgate.lifecycle.authn import build_issuers, unreadable_settings
from poolgate.lifecycle.routing.filters import pin_problems
from poolgate.store import repo
from poolgate.store.accounts import OAuthAccountRow, list_oauth_accounts
from poolgate.store.crypto import MASTER_KEY_ENV, MASTER_KEY_FILE, SecretBoxError, open_box
from poolgate.store.db import damage_found, gateway_keys, oauth_accounts, schema_version

config_app = typer.Typer(no_args_is_help=True, help="Validate configuration files.")


@config_app.command("check")
def config_check(
    path: Annotated[
        Path | None,
        typer.Argument(
            metavar="FILE",
            envvar="POOLGATE_CONFIG",
            help="The YAML file to validate.",
            show_default=False,
            readable=False,
            parser=config_file,
        ),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Validate a configuration file (default: $POOLGATE_CONFIG) without starting anything."""
    if path is None:
        raise fail("give the file to check: `poolgate config check FILE`, or set POOLGATE_CONFIG")
    # The store `serve` would use (POOLGATE_DATA_DIR included): its upstreams and keys are checked too.
    config = load(path, data_dir, secrets_needed=True)
    try:
        build_issuers(config.callers)  # reads the JWT key files as `serve` does: one without a usable key stops it
    except ConfigError as exc:
        raise fail(str(exc)) from None
    # Pins and prices may name upstreams stored with `poolgate upstreams add`: only those in neither place are
    # wrong. Whether each is enabled, for pins: the file's shadow stored ones of the same id, as in the gateway.
    enabled = {upstream.id: upstream.enabled for upstream in config.upstreams}
    configured = set(enabled)
    stored_keys: set[str] = set()
    served_from_store: set[str] = set()  # stored upstreams the gateway serves: no file's of the id, decryptable
    problems = []
    with opening_store(config):
        refuse_an_unusable_store(config, reading=False)
        exists = config.store_file().exists()
    if not exists:
        refuse_a_store_serve_could_not_make(config)
    # Read as it is: a check neither migrates a store nor switches its journal (`open_engine` would).
    engine = create_engine(config.store_url()) if exists else None
    try:
        if engine is not None:
            # Whatever would stop `serve` from opening the store stops the check, with the same line: a
            # deploy gate passed a store serve then refused (a damaged or missing master key, damaged pages).
            with opening_store(config):
                with engine.connect() as conn:
                    schema_version(conn)  # a newer build's store, which serve would refuse
                damage = damage_found(engine)
                if damage is not None:
                    raise cannot_open(config.data_dir, f"its file is damaged: {damage}")
                unreadable = repo.check_store_box(engine, config.data_dir)
            stored = {row.upstream.id: row.upstream.enabled for row in repo.list_upstreams(engine)}
            enabled = {**stored, **enabled}
            served_from_store = set(stored) - configured - set(unreadable)
            live_keys = [row for row in keys_as_stored(engine) if not row.revoked_at]
            stored_keys = {row.name for row in live_keys}
            problems += unusable_key_problems(live_keys)
            problems += [
                f"stored upstream {upstream_id} is left out: its secret cannot be decrypted with this master key"
                for upstream_id in unreadable
            ]
            problems += [
                needs_login(row.upstream.id)
                for row in stored_accounts(engine)
                if row.state == "needs_reauth" and row.upstream.enabled and row.upstream.id not in configured
            ]
    except SecretBoxError as exc:
        raise fail(str(exc)) from None
    finally:
        if engine is not None:
            engine.dispose()
    if not any(enabled.values()):
        problems.append(NO_UPSTREAMS)
    problems += pin_problems(config.routing.pins, enabled) + config.prices.unknown_upstreams(enabled)
    problems += config.oauth.warmup_problems(enabled)
    # The stored ones count too: after `upstreams add`, "0 upstreams" (the file's) said the gateway had none.
    from_store = f" ({len(served_from_store)} stored)" if served_from_store else ""
    # Counted among them, as the gateway holds them: said, as "3 upstreams" of which none served looked fine.
    disabled = sum(1 for upstream_id in configured | served_from_store if not enabled.get(upstream_id, True))
    from_store += f", {disabled} disabled" if disabled else ""
    console.print(
        f"[green]ok[/green]: {path} — {counted(len(configured | served_from_store), 'upstream')}{from_store}, "
        f"strategy {config.routing.strategy}, data in {config.data_dir}"
        + (f", store {config.store_file()}" if config.store.url else ""),
        highlight=False,
    )
    # `keys create` refuses a config-file key's name, but the file may gain the name later: then `keys list`
    # shows two callers of one name, and their usage rows are told apart by id only.
    problems += [
        f"key name {key.name!r} is also a stored key's (`poolgate keys list`): rename one of them"
        for key in config.keys
        if key.name in stored_keys
    ]
    for problem in problems:
        warn(problem)


def stored_accounts(engine: Engine) -> list[OAuthAccountRow]:
    """The subscription accounts of a store `config check` reads as it is: none in one an older build made
    before there were any (the table comes with the upgrade `serve` runs)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(oauth_accounts.name):
            return []
    return list_oauth_accounts(engine)


def keys_as_stored(engine: Engine) -> list[repo.KeyRow]:
    """The gateway keys of a store `config check` reads as it is: without limits in one an older build made
    before keys had any (the column comes with schema v3, in the upgrade `serve` runs)."""
    with engine.connect() as conn:
        present = {column["name"] for column in inspect(conn).get_columns(gateway_keys.name)}
        columns = [column for column in gateway_keys.c if column.name in present]
        rows = conn.execute(select(*columns).order_by(gateway_keys.c.created_at)).all()
    return [repo.KeyRow(**row._mapping) for row in rows]


def unusable_key_problems(keys: list[repo.KeyRow]) -> list[str]:
    """The stored keys the gateway refuses (401 "unusable"): limits an older build accepted and this one
    cannot read. A warning, not a failure: the gateway serves every other caller."""
    return [
        f"stored key {row.name} ({row.id}) is unusable, every request with it a 401: its limits cannot be read"
        f" ({problem}); give it new ones with `poolgate keys set {row.id}`"
        for row in keys
        if (problem := unreadable_settings(row.settings)) is not None
    ]


def refuse_a_store_serve_could_not_make(config: GatewayConfig) -> None:
    """With no store yet, `serve` makes one: what it would refuse then fails the check, with its line (an
    invalid POOLGATE_MASTER_KEY, a data_dir under /proc passed). Tried without leaving a store or a key file."""
    with opening_store(config):
        for directory in {config.data_dir, config.store_file().parent}:
            writable_directory_could_be_made(directory)
        if os.environ.get(MASTER_KEY_ENV) or (config.data_dir / MASTER_KEY_FILE).exists():
            try:
                open_box(config.data_dir, None)
            except SecretBoxError as exc:
                raise fail(str(exc)) from None


def writable_directory_could_be_made(directory: Path) -> None:
    """Raises the OSError, naming `directory`, that making it (and its parents) and writing in it would meet:
    a directory is made and removed again where the first missing one would be, or in it when it exists."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryDirectory(dir=existing, prefix=".poolgate-check-"):
            pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(directory)) from None

"""The `poolgate` command: the app, its own options and the wiring of its commands (each group in a module of
its own: cli/config_check, keys, upstreams, accounts, route; `usage` in cli/usage), the one line a store or an
option value that fails any command is said in, and the commands that run a process, each on a socket it
listens on: serve, demo, mock-upstream; and version."""

from __future__ import annotations

import errno
import io
import os
import socket
import sqlite3
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.exc import SQLAlchemyError
from typer.core import TyperGroup

from poolgate import __version__
from poolgate.cli.accounts import accounts_app
from poolgate.cli.config_check import config_app
from poolgate.cli.keys import keys_app
from poolgate.cli.options import ConfigOption, DataDirOption, bad_value, config_file, data_directory, listen_address
from poolgate.cli.output import console, counted, err, fail, warn
from poolgate.cli.route import route_app
from poolgate.cli.store import (
    cannot_open,
    data_dir_in_use,
    load,
    opening_store,
    refuse_an_unusable_store,
    store_problem,
)
from poolgate.cli.upstreams import NO_UPSTREAMS, needs_login, upstreams_app
from poolgate.cli.usage import usage
from poolgate.config import ConfigError, GatewayConfig
from poolgate.store import repo
from poolgate.store.crypto import SecretBoxError
from poolgate.store.db import StoreVersionError, open_engine


class StoreErrorsInOneLine(TyperGroup):
    """Every command: a store that fails it after it was opened (a lock held by another process, a write to
    a read-only store, damaged pages a report reads) is one line, as one that cannot be opened is. Its
    traceback was a page ending with the SQL and its parameters: for `keys create`, the new key's prefix
    and hash. And a bad option value is one line too (see `bad_value`)."""

    # `ctx` is of the base class's Context, not a `typer.Context`: click's, or (in newer typers) that of typer's
    # private copy of click, which has no public name. Handed on as it came.
    def invoke(self, ctx: Any) -> Any:
        started = data_dir_in_use.set(None)
        try:
            return super().invoke(ctx)
        except (SQLAlchemyError, sqlite3.Error, StoreVersionError) as exc:
            data_dir = data_dir_in_use.get()
            raise cannot_open(data_dir, store_problem(exc)) from None
        except typer.BadParameter as exc:
            # A missing argument or option (a subclass) keeps typer's usage box: it shows what to give.
            if type(exc) is not typer.BadParameter:
                raise
            raise fail(bad_value(exc)) from None
        finally:
            data_dir_in_use.reset(started)


# An unexpected error's traceback must never show local variables: they hold API keys and tokens (typer's
# default for this changed between versions).
app = typer.Typer(
    cls=StoreErrorsInOneLine,
    no_args_is_help=True,
    add_completion=False,
    help="poolgate: one endpoint for a pool of accounts.",
    pretty_exceptions_show_locals=False,
)
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")
app.add_typer(upstreams_app, name="upstreams")
app.add_typer(route_app, name="route")
app.add_typer(accounts_app, name="accounts")


def listening(host: str, port: int, option: str = "--port") -> socket.socket:
    """A socket listening on host:port, or the error that says why not (a port in use, most often); `option`
    is the one that sets the port, named in the hint."""
    return listening_on(reserved(host, port, option), option)


def reserved(host: str, port: int, option: str = "--port") -> socket.socket:
    """A socket bound to host:port, not listening yet (see `serve.reserve`), or the error that says why not."""
    from poolgate.serve import reserve

    try:
        return reserve(host, port)
    except OSError as exc:
        raise cannot_listen(exc, option) from None


def listening_on(sock: socket.socket, option: str = "--port") -> socket.socket:
    """A reserved socket, listening; or the error that says why not."""
    from poolgate.serve import listen

    try:
        return listen(sock)
    except OSError as exc:
        raise cannot_listen(exc, option) from None


def cannot_listen(exc: OSError, option: str) -> typer.Exit:
    """The one line for a socket that cannot listen, with a hint where one helps (a port in use): the option
    that sets that port (the demo's mock has its own, and "try --port 0" left its port taken)."""
    hint = f" (try {option} 0 for any free port)" if exc.errno == errno.EADDRINUSE else ""
    # `bind` puts the address into the strerror; another OSError (the data directory's) names its file.
    return fail(f"{exc if exc.filename else exc.strerror or exc}{hint}")


# ----- serve / demo / mock ---------------------------------------------------------------------------


@app.command()
def serve(
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[
        str | None, typer.Option(help="Listen address (overrides server.host).", parser=listen_address)
    ] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (overrides server.port).", min=0, max=65535)] = None,
) -> None:
    """Run the gateway."""
    from poolgate.app import Gateway
    from poolgate.serve import run
    from poolgate.serve import serve as serve_gateway
    from poolgate.telemetry.logging import setup_logging

    config = load(config_path, data_dir, secrets_needed=True)
    setup_logging(config.server.log_level)
    _warn_if_stale()
    listen_host = config.server.host if host is None else host
    # Bound first, for a port in use to be said at once; listening once the store is open, which may take
    # as long as another process holds it (a TCP health check took a port that answered nothing for up).
    sock = reserved(listen_host, config.server.port if port is None else port)
    try:
        with opening_store(config):
            refuse_an_unusable_store(config, reading=False)
            gateway = Gateway(config)
    except (SecretBoxError, ConfigError) as exc:
        raise fail(str(exc)) from None
    listening_on(sock)
    actual_port = sock.getsockname()[1]
    issuers = f"{counted(gateway.authn.issuer_count, 'JWT issuer')}, " if gateway.authn.issuer_count else ""
    disabled = sum(1 for state in gateway.pool.states() if not state.upstream.enabled)
    err.print(
        f"poolgate {__version__} listening on http://{listen_host}:{actual_port} "
        f"({counted(len(gateway.pool), 'upstream')}{f', {disabled} disabled' if disabled else ''}, "
        f"{counted(gateway.authn.key_count, 'gateway key')}, "
        f"{issuers}data in {config.data_dir})",
        highlight=False,
    )
    # Callers with a JWT from a configured issuer need no gateway key.
    if gateway.authn.key_count == 0 and not gateway.authn.issuer_count:
        err.print("[yellow]no gateway keys yet:[/yellow] create one with `poolgate keys create NAME`")
    if not any(state.upstream.enabled for state in gateway.pool.states()):
        warn(NO_UPSTREAMS)
    for state in gateway.pool.states():
        # The store keeps the mark, and the account starts out of routing: the log said so once, maybe days ago.
        if state.upstream.enabled and gateway.signer.account_state(state.upstream.id) == "needs_reauth":
            warn(needs_login(state.upstream.id))
    run(lambda: serve_gateway(gateway, config, sock))


@app.command()
def demo(
    # No envvar: POOLGATE_DATA_DIR names the real gateway's store, which the demo must never use.
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            help="The demo's own store (POOLGATE_DATA_DIR and POOLGATE_CONFIG are not read).",
            parser=data_directory,
        ),
    ] = Path("./poolgate-demo"),
    port: Annotated[int, typer.Option(help="Gateway port (0 = any free port).", min=0, max=65535)] = 8080,
    mock_port: Annotated[int, typer.Option(help="The mock upstream's port (0 = any free port).", min=0, max=65535)] = 0,
) -> None:
    """Run the gateway in front of the bundled mock upstream, in a store of its own. Ctrl-C stops it.

    The mock serves three fake API keys; the gateway key printed is for this run only."""
    from poolgate.cli.demo import HOST, DemoError, only_demo, run_demo

    config = GatewayConfig(data_dir=data_dir)
    _warn_if_stale()
    data_dir_in_use.set(data_dir)  # named by a store error in what follows, as `load` has it for the others
    try:
        with ExitStack() as held:
            # The store's problems are its one line, as in every command (a data directory that is a file was
            # its lock file's OSError; a damaged master key, a traceback); the serving that follows is not.
            with opening_store(config):
                refuse_an_unusable_store(config, reading=False)
                held.enter_context(only_demo(data_dir))
                engine = open_engine(config.store_url())
                repo.store_box(engine, data_dir)  # its master key, checked before anything starts
            # Bound after the store is held: a second demo on it is told so, not that its port is taken.
            run_demo(engine, data_dir, listening(HOST, port), listening(HOST, mock_port, "--mock-port"), console)
    except (DemoError, SecretBoxError) as exc:
        raise fail(str(exc)) from None


def _warn_if_stale() -> None:
    """A checkout pulled (or edited) after its editable install runs the modules compiled from the old source."""
    from poolgate.compiled import stale_warning

    stale = stale_warning()
    if stale:
        warn(stale)


@app.command("mock-upstream")
def mock_upstream(
    host: Annotated[str, typer.Option(help="Listen address.", parser=listen_address)] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port.", min=0, max=65535)] = 9000,
    accept_any_key: Annotated[bool, typer.Option(help="Answer any API key instead of the demo keys.")] = False,
    unlimited: Annotated[bool, typer.Option(help="No per-key rate limits (for benchmarks).")] = False,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML: keys (with limits and a standing fault each), models, output_tokens.",
            readable=False,
            parser=config_file,
        ),
    ] = None,
) -> None:
    """Run the mock Anthropic upstream alone (for tests, benchmarks and trying things out)."""
    from poolgate.mock import MockConfig, MockKey, run_mock
    from poolgate.mock.config import MockConfigError, load_mock_config

    try:
        config = load_mock_config(config_file) if config_file is not None else MockConfig.demo()
    except MockConfigError as exc:
        raise fail(str(exc)) from None
    config.accept_any_key = config.accept_any_key or accept_any_key
    if unlimited:
        config.default_key = replace(MockKey.unlimited(), fault=config.default_key.fault)
        config.keys = {key: replace(MockKey.unlimited(), fault=limits.fault) for key, limits in config.keys.items()}

    def ready(url: str) -> None:
        keys = ", ".join(config.keys)
        accepted = f"any (configured: {keys})" if config.accept_any_key and keys else keys or "any"
        err.print(f"mock upstream on {url}; keys: {accepted}", highlight=False)

    run_mock(config, listening(host, port), ready)


@app.command()
def version() -> None:
    """Print the version, the store schema this build migrates stores to, and whether it runs compiled."""
    from poolgate.compiled import compiled_modules, stale_warning
    from poolgate.store.db import MIGRATIONS

    # The schema tells builds apart that the version number does not (an upgrade's migration, a store a newer
    # build refuses: see `store.db.schema_version`).
    compiled = compiled_modules()
    build = f"{len(compiled)} modules compiled with mypyc" if compiled else "pure Python"
    console.print(f"poolgate {__version__} (store schema v{len(MIGRATIONS)}, {build})")
    stale = stale_warning()
    if stale:
        warn(stale)


def _version_option(given: bool) -> None:
    if given:
        version()
        raise typer.Exit()


@app.callback()
def _options(
    _version: Annotated[
        bool,
        # `poolgate --version` is what most tools take: it was "No such option".
        typer.Option("--version", is_eager=True, callback=_version_option, help="Print the version and exit."),
    ] = False,
) -> None:
    """Options of `poolgate` itself, before any command (its help is the app's)."""


# `poolgate usage` (cli/usage.py): a command of the app's own, registered after `version`, where `poolgate --help`
# lists it.
app.command()(usage)


# How much of a value that is not UTF-8 text its error quotes.
QUOTED_CHARACTERS = 80


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A character the terminal's encoding lacks (a Latin-1 one: `keys list`'s `…`, a table's borders) shows
        # as `?`: the command died with a UnicodeEncodeError traceback instead, its output cut off.
        sys.stdout.reconfigure(errors="replace")
    try:
        app()
    except UnicodeEncodeError as exc:
        if not _typed_undecodable(exc):
            raise
        fail(f"{exc.object[:QUOTED_CHARACTERS]!r} is not UTF-8 text: type it in UTF-8 (the terminal's encoding?)")
        raise SystemExit(1) from None


def _typed_undecodable(exc: UnicodeEncodeError) -> bool:
    """Whether what could not be encoded is a byte that is no UTF-8 (a terminal in Latin-1 types `é` as 0xE9),
    which reaches Python as half of a surrogate pair: a name or value to store or send. Not a character the
    terminal's encoding lacks (the same terminal cannot show `…`), which is the output's, not the input's."""
    return all("\ud800" <= character <= "\udfff" for character in exc.object[exc.start : exc.end])

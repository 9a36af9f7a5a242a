"""`poolgate demo`: the mock upstream with three fake API keys, the gateway in front, a gateway key for the run.

The demo keeps a store of its own (`./poolgate-demo` unless --data-dir says otherwise) and never reads the
real gateway's POOLGATE_CONFIG, POOLGATE_DATA_DIR or POOLGATE__* settings: demo traffic must never reach a
real (paid) account, and a demo key must never open the real gateway.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import secrets
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from sqlalchemy import Engine, select

from poolgate.app import Gateway
from poolgate.config import AdminConfig, GatewayConfig, ServerConfig, UpstreamConfig
from poolgate.mock import MockConfig, start_mock
from poolgate.serve import run, serve
from poolgate.store import repo
from poolgate.store.db import close_engine, usage
from poolgate.telemetry.logging import setup_logging

HOST = "127.0.0.1"
DEMO_MODEL = "claude-sonnet-5"


class DemoError(Exception):
    """The demo cannot start as asked; the message says why and what to do."""


KEY_PREFIX = "demo-"
UPSTREAM_PREFIX = "mock-"


def refuse_foreign_store(engine: Engine, data_dir: Path) -> None:
    """Only the demo's own store, or a new one: the gateway serves every upstream stored in its data
    directory, so a real account stored there would get demo traffic; and a store with keys or traffic of
    a real gateway is that gateway's (the demo's key would open it, its keys the demo, and demo traffic would
    land in its ledger)."""
    stored = [row.upstream.id for row in repo.list_upstreams(engine)]
    if stored:
        raise DemoError(
            f"{data_dir} holds stored upstreams ({', '.join(stored)}) and the demo serves only its mock: "
            f"remove them (`poolgate upstreams remove ID --data-dir {data_dir}`) or give the demo another --data-dir"
        )
    keys = [row.name for row in repo.list_keys(engine) if not row.name.startswith(KEY_PREFIX)]
    with engine.connect() as conn:
        served = conn.execute(
            select(usage.c.upstream_id).where(usage.c.upstream_id.not_like(f"{UPSTREAM_PREFIX}%")).limit(1)
        ).first()
    if keys or served:
        what = f"gateway keys ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})" if keys else "usage records"
        raise DemoError(
            f"{data_dir} is not a demo store (it holds {what} of a real gateway): give the demo a --data-dir of its own"
        )


def sdk_example(python: str, sdk_installed: bool) -> str:
    """The SDK one-liner for the interpreter running poolgate (a plain `python` may be another one), with
    the install command first when the SDK is missing (`pip install poolgate` does not bring it)."""
    python = shlex.quote(python)
    install = f"  {python} -m pip install anthropic\n" if not sdk_installed else ""
    heading = "reads the same two variables" + ("" if sdk_installed else " (not installed here: install it first)")
    return (
        f"[bold]The anthropic SDK[/bold] {heading}:\n{escape(install)}"
        f"""  {escape(python)} -c "import anthropic; m = anthropic.Anthropic().messages.create(model='{DEMO_MODEL}', \\
max_tokens=64, messages=[{{'role': 'user', 'content': 'Say hi'}}]); print(m.content[0].text)\""""
    )


def poolgate_command(python: str) -> str:
    """How to run this install's `poolgate`: by its name when that finds it on PATH, else by its path (after
    the README's install into .venv, a bare `poolgate` was "command not found")."""
    own = Path(python).parent / "poolgate"
    found = shutil.which("poolgate")
    if not own.exists() or (found is not None and Path(found).resolve() == own.resolve()):
        return "poolgate"
    return shlex.quote(str(own))


@dataclass(frozen=True)
class DemoRun:
    """Where a running demo's parts are, and the credentials of the run."""

    gateway_url: str
    key: str
    admin_token: str
    mock_url: str
    mock_keys: tuple[str, ...]
    data_dir: Path


def instructions(run: DemoRun, python: str, sdk_installed: bool) -> str:
    gateway_url, key, admin_token, mock_url = run.gateway_url, run.key, run.admin_token, run.mock_url
    body = '{"model":"' + DEMO_MODEL + '","max_tokens":64,"messages":[{"role":"user","content":"Say hi"}]}'
    # Absolute, as the program path is: the line is for another terminal, in any directory.
    report = f"{poolgate_command(python)} usage --data-dir {shlex.quote(str(run.data_dir.resolve()))}"
    fault = '{"status": 529, "times": 3}'
    return f"""
[bold green]poolgate demo is running[/bold green]
  gateway        {gateway_url}
  mock upstream  {mock_url}  ({len(run.mock_keys)} fake API keys: {", ".join(run.mock_keys)})
  gateway key    {key}  (for this run only: revoked when the demo stops)
  admin token    {admin_token}  (for this run only)

[bold]Point Claude Code at it[/bold] (in another terminal):
  export ANTHROPIC_BASE_URL={gateway_url}
  export ANTHROPIC_API_KEY={key}
  claude -p "say hi"      (interactive `claude` asks once whether to use this key: No is preselected, choose Yes)

{sdk_example(python, sdk_installed)}

[bold]curl[/bold]:
  curl -s {gateway_url}/v1/messages -H "x-api-key: {key}" -H "anthropic-version: 2023-06-01" \\
    -H "content-type: application/json" -d '{body}'

[bold]Each account's live state[/bold] (the admin API; /metrics and /admin/routes take the same token):
  curl -s {gateway_url}/admin/upstreams -H "authorization: Bearer {admin_token}"

[bold]Make an account fail[/bold] (the mock's fault injection; clear them all with DELETE {mock_url}/_mock/faults):
  curl -s {mock_url}/_mock/faults/{run.mock_keys[0]} -H "content-type: application/json" -d '{fault}'

Usage so far: {escape(report)}    Ctrl-C stops the demo.
"""


def revoke_left_over_keys(engine: Engine, console: Console) -> None:
    """A demo killed (kill -9, the OOM killer, a closed laptop) never revoked its key for the run, and the
    next demo on the store served it: each run's key is for that run only."""
    for row in repo.list_keys(engine):
        if row.name.startswith(KEY_PREFIX) and row.revoked_at is None:
            repo.revoke_key(engine, row.id)
            console.print(f"Revoked {row.name} ({row.prefix}…), left behind by a demo that did not stop cleanly.")


def demo_config(data_dir: Path, port: int, mock_url: str, api_keys: list[str], admin_token: str) -> GatewayConfig:
    """Built in code, not loaded: no config file or POOLGATE__* override of the real gateway applies."""
    return GatewayConfig(
        data_dir=data_dir,
        server=ServerConfig(host=HOST, port=port, log_level="warning"),
        admin=AdminConfig(token=admin_token),
        upstreams=tuple(
            UpstreamConfig(id=f"{UPSTREAM_PREFIX}{i}", base_url=mock_url, api_key=key)
            for i, key in enumerate(api_keys, start=1)
        ),
    )


@contextlib.contextmanager
def only_demo(data_dir: Path) -> Iterator[None]:
    """One demo at a time on a store, held by a lock the system lets go of when the process ends however it
    ends: a second demo would take the first one's key for one left behind (see `revoke_left_over_keys`)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(data_dir / "demo.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(
                f"another poolgate demo is running on {data_dir}: stop it first, or give this one --data-dir"
            ) from None
        yield


def run_demo(engine: Engine, data_dir: Path, sock: socket.socket, mock_sock: socket.socket, console: Console) -> None:
    """The demo on its store, opened (its master key checked) and held by `only_demo`, serving on `sock`, its
    mock upstream on `mock_sock`."""
    refuse_foreign_store(engine, data_dir)
    revoke_left_over_keys(engine, console)
    setup_logging("warning")
    mock_config = MockConfig.demo()
    gateway_url = f"http://{HOST}:{sock.getsockname()[1]}"
    sdk_installed = importlib.util.find_spec("anthropic") is not None

    async def main() -> None:
        mock = await start_mock(mock_config, sock=mock_sock)
        try:
            admin_token = secrets.token_urlsafe(24)
            config = demo_config(data_dir, sock.getsockname()[1], mock.url, list(mock_config.keys), admin_token)
            gateway = Gateway(config, engine)
            # Unique even for two runs in one second (a key's name outlives its revocation).
            name = time.strftime(f"{KEY_PREFIX}%Y%m%d-%H%M%S-") + secrets.token_hex(2)
            row, key = repo.create_key(engine, name)
            try:
                gateway.reload()
                console.print(
                    instructions(
                        DemoRun(gateway_url, key, admin_token, mock.url, tuple(mock_config.keys), data_dir),
                        sys.executable,
                        sdk_installed,
                    ),
                    highlight=False,
                    soft_wrap=True,
                )
                await serve(gateway, config, sock)
            finally:
                # An unlimited key nobody can see again is of no use after the run: only a risk. Then the log is
                # folded into the file, as a stopping gateway does (the revocation was left in -wal alone).
                repo.revoke_key(engine, row.id)
                close_engine(engine)
        finally:
            await mock.stop()
        console.print("poolgate demo stopped.")

    run(main)

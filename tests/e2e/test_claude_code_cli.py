"""The real Claude Code CLI, offline, pointed at the gateway in front of the mock upstream."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from poolgate.store.db import usage
from tests.conftest import RunningGateway
from tests.e2e.subprocesses import communicate_within

LOCAL_CLI = Path(__file__).parent / "node_modules" / ".bin" / "claude"


def claude_cli() -> str | None:
    if LOCAL_CLI.exists():
        return str(LOCAL_CLI)
    return shutil.which("claude")


async def run_claude(cli: str, home: Path, env_extra: dict[str, str], prompt: str) -> tuple[int, str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        **env_extra,
    }
    process = await asyncio.create_subprocess_exec(
        cli, "-p", prompt, env=env, cwd=home, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await communicate_within(process, 120)
    return process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def installed_cli() -> str:
    cli = claude_cli()
    if cli is None:
        pytest.skip("the Claude Code CLI is not installed (cd tests/e2e && npm install @anthropic-ai/claude-code)")
    return cli


@pytest.mark.parametrize("credential", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])
async def test_claude_code_answers_through_the_gateway(gw: RunningGateway, tmp_path: Path, credential: str) -> None:
    cli = installed_cli()
    home = tmp_path / "home"
    home.mkdir()
    code, out, err = await run_claude(cli, home, {"ANTHROPIC_BASE_URL": gw.url, credential: gw.key}, "say hi")
    assert code == 0, f"claude exited {code}: {err[-2000:]}"
    assert "poolgate mock upstream" in out, out
    await gw.gateway.flush_usage()
    with gw.gateway.engine.connect() as conn:
        rows = conn.execute(select(usage).where(usage.c.endpoint == "messages")).all()
    assert rows and all(row.status == 200 for row in rows)
    assert any(row.session_id for row in rows), "Claude Code's session id is recorded"


async def test_later_claude_code_sessions_read_the_prompt_earlier_ones_cached(
    gw: RunningGateway, tmp_path: Path
) -> None:
    """Each `claude -p` is a new session with its own attribution block; the first three spread over the
    mock's three accounts (each writes the tools and system prompt), the ones after read them from cache."""
    cli = installed_cli()
    home = tmp_path / "home"
    home.mkdir()
    env = {"ANTHROPIC_BASE_URL": gw.url, "ANTHROPIC_API_KEY": gw.key}
    # Different prompts: the attribution block's suffix is derived from the first prompt's text.
    for prompt in ("say hi", "list the files", "what is 2+2", "tell me a joke", "name a colour"):
        code, _, err = await run_claude(cli, home, env, prompt)
        assert code == 0, f"claude exited {code}: {err[-2000:]}"
    await gw.gateway.flush_usage()
    with gw.gateway.engine.connect() as conn:
        rows = conn.execute(
            select(usage)
            .where(
                usage.c.endpoint == "messages",
                usage.c.cache_creation_input_tokens + usage.c.cache_read_input_tokens > 0,
            )
            .order_by(usage.c.started_at)
        ).all()
    assert len(rows) == 5, rows  # one cached prompt per session
    assert [row.cache_read_input_tokens > 0 for row in rows] == [False, False, False, True, True], rows


async def test_claude_code_gives_up_at_once_on_a_wrong_gateway_key(
    gw: RunningGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Claude Code retries a 401 ten times over three minutes, silently, unless the answer says
    `x-should-retry: false`: a mistyped or revoked gateway key looked like a hang."""
    cli = installed_cli()
    home = tmp_path / "home"
    home.mkdir()
    env = {"ANTHROPIC_BASE_URL": gw.url, "ANTHROPIC_API_KEY": "pg-mistyped-0123456789"}
    code, out, err = await run_claude(cli, home, env, "say hi")
    assert code != 0 and "Invalid gateway key" in out + err, (out + err)[-2000:]
    refusals = [r for r in caplog.records if r.name == "poolgate.authn" and "rejected unknown" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]  # one request, no retries

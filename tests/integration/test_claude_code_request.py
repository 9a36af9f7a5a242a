"""A Claude Code-shaped request goes through byte for byte, with the headers the upstream needs."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from sqlalchemy import select

from poolgate.config import RoutingConfig
from poolgate.mock import MockServer
from poolgate.store.db import usage
from tests import claude_code
from tests.conftest import MOCK_KEYS, RunningGateway, gateway_config, start_gateway


async def post(
    gw: RunningGateway, stream: bool, session_id: str = claude_code.SESSION_ID, **body: str
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(
            f"{gw.url}/v1/messages?beta=true",
            data=claude_code.body(stream, session_id=session_id, **body),
            headers=claude_code.headers(gw.key, session_id),
        ) as response,
    ):
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


async def test_claude_code_request_is_relayed_byte_for_byte(gw: RunningGateway, mock: MockServer) -> None:
    status, headers, answer = await post(gw, stream=True)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert answer.startswith(b"event: message_start")
    assert mock.stats.last_request_body == claude_code.body(True)
    sent = {name.lower(): value for name, value in mock.stats.last_request_headers.items()}
    expected = claude_code.headers("")
    for name in ("anthropic-version", "anthropic-beta", "x-claude-code-session-id", "user-agent", "x-app"):
        assert sent[name] == expected[next(k for k in expected if k.lower() == name)]
    assert sent["x-stainless-lang"] == "js"
    assert sent["x-api-key"] in MOCK_KEYS
    assert sent.get("accept-encoding", "identity") == "identity"
    assert "authorization" not in sent


async def test_claude_code_session_is_recorded_from_the_header(gw: RunningGateway, mock: MockServer) -> None:
    await post(gw, stream=False)
    await gw.gateway.flush_usage()
    with gw.gateway.engine.connect() as conn:
        row = conn.execute(select(usage)).one()
    assert row.session_id == claude_code.SESSION_ID
    assert row.model == "claude-sonnet-4-6"
    assert row.input_tokens + row.cache_creation_input_tokens + row.cache_read_input_tokens > 10_000


async def test_the_second_turn_reads_the_prefix_the_first_turn_cached(tmp_path: Path, mock: MockServer) -> None:
    # first-pick keeps both turns on one account: an account's prompt cache is its own.
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    try:
        for _ in range(2):
            status, _, _ = await post(running, stream=False)
            assert status == 200
        await running.gateway.flush_usage()
        with running.gateway.engine.connect() as conn:
            first, second = conn.execute(select(usage).order_by(usage.c.started_at)).all()
    finally:
        await running.stop()
    assert first.cache_creation_input_tokens > 0 and first.cache_read_input_tokens == 0
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert second.cache_creation_input_tokens == 0


async def test_new_sessions_read_the_prompt_earlier_sessions_cached_whatever_their_attribution_block(
    tmp_path: Path, mock: MockServer
) -> None:
    """Claude Code's attribution block (`system[0]`) differs from session to session. The API leaves it out
    of the cached prefix, and so do the mock and the gateway's cache model: once new sessions have been
    spread over the three accounts (one write of the shared tools and system prompt each), the next ones
    read that prompt from the cache of the account they land on."""
    running = await start_gateway(gateway_config(tmp_path, mock.url))  # the default routing
    try:
        for index in range(6):
            status, _, _ = await post(
                running,
                stream=True,
                session_id=f"session-{index}",
                billing=f"x-anthropic-billing-header: cc_version=2.1.0.{index:03x}; cc_entrypoint=cli;",
                prompt=f"Task {index}: please say hi.",
            )
            assert status == 200
        await running.gateway.flush_usage()
        with running.gateway.engine.connect() as conn:
            rows = conn.execute(select(usage).order_by(usage.c.started_at)).all()
    finally:
        await running.stop()
    spread, later = rows[:3], rows[3:]
    assert {row.upstream_id for row in spread} == {"up-0", "up-1", "up-2"}
    assert all(row.cache_creation_input_tokens > 10_000 and row.cache_read_input_tokens == 0 for row in spread)
    for row in later:
        # The tools and system prompt come from the cache; only the new turn is written.
        assert row.cache_read_input_tokens > 10_000 and row.cache_creation_input_tokens < 1_000, row


async def test_the_upstream_sees_the_client_s_user_agent_or_none_never_aiohttp_s(
    gw: RunningGateway, mock: MockServer
) -> None:
    """aiohttp adds its own User-Agent to a request without one: the upstream sees the client's, or none."""
    body = claude_code.body(False)
    for agent in ("claude-cli/2.1.0 (external, cli)", None):
        headers = {"x-api-key": gw.key, "content-type": "application/json", "anthropic-version": "2023-06-01"}
        if agent is not None:
            headers["user-agent"] = agent
        async with (
            aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as session,
            session.post(f"{gw.url}/v1/messages", data=body, headers=headers) as response,
        ):
            assert response.status == 200, await response.text()
        sent = {name.lower(): value for name, value in mock.stats.last_request_headers.items()}
        assert sent.get("user-agent") == agent

"""Sessions stick to their account, and every routing decision can be explained afterwards."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import aiohttp
import anthropic
import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from poolgate.cli.main import app
from poolgate.config import AdminConfig, HealthConfig, RoutingConfig
from poolgate.mock import Fault, MockServer
from poolgate.store.db import MIGRATIONS, open_engine, read_traces_forgotten_before
from tests.conftest import MOCK_KEYS, MODEL, RunningGateway, gateway_config, key_of, start_gateway, user


async def test_a_session_stays_on_its_account_while_round_robin_spreads_the_rest(gw: RunningGateway) -> None:
    async with gw.client() as client:
        sticky = [
            (
                await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, messages=user(), extra_headers={"X-Claude-Code-Session-Id": "s-1"}
                )
            ).headers["x-poolgate-upstream"]
            for _ in range(6)
        ]
        spread = {
            (await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())).headers[
                "x-poolgate-upstream"
            ]
            for _ in range(6)
        }
    assert len(set(sticky)) == 1
    assert len(spread) == 3


async def test_a_session_moves_when_its_account_fails_and_then_stays_on_the_new_one(
    gw: RunningGateway, mock: MockServer
) -> None:
    headers = {"X-Claude-Code-Session-Id": "s-2", "x-poolgate-trace": "1"}
    async with gw.client() as client:
        first = await client.messages.with_raw_response.create(
            model=MODEL, max_tokens=8, messages=user(), extra_headers=headers
        )
        home = first.headers["x-poolgate-upstream"]
        mock.set_fault(key_of(home), Fault(status=500))
        moved = [
            (
                await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, messages=user(), extra_headers=headers
                )
            ).headers
            for _ in range(3)
        ]
    assert {h["x-poolgate-upstream"] for h in moved} == {moved[0]["x-poolgate-upstream"]} != {home}
    route = json.loads(moved[-1]["x-poolgate-route"])
    assert route["terminal"]["sticky"] is True
    stages = {stage["name"]: stage for stage in route["stages"]}
    assert stages["health"]["dropped"] == {home: "unhealthy"}


async def test_an_operator_can_keep_traces_from_callers_who_ask_for_them(tmp_path: Path, mock: MockServer) -> None:
    """A trace names the pool's accounts, their scores and what failed upstream. With
    `routing.trace_on_request: false` a caller's `x-poolgate-trace: 1` is ignored, on an answer and on a refusal,
    while `route explain` still has the trace; `routing.expose_trace` still sends it with every answer."""
    asked = {"x-poolgate-trace": "1"}
    for expose in (False, True):
        config = gateway_config(
            tmp_path / f"expose-{expose}",
            mock.url,
            routing=RoutingConfig(trace_on_request=False, expose_trace=expose),
            health=HealthConfig(cooldown_seconds=30, panic=False),
        )
        gw = await start_gateway(config)
        try:
            async with gw.client() as client:
                answered = await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, messages=user(), extra_headers=asked
                )
                # A 5xx makes an account unhealthy at once: the next request finds none (no panic mode).
                for key in MOCK_KEYS:
                    mock.set_fault(key, Fault(status=500, times=1))
                with pytest.raises(anthropic.APIStatusError):
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                with pytest.raises(anthropic.APIStatusError) as refused:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user(), extra_headers=asked)
            assert refused.value.status_code == 529
            assert ("x-poolgate-route" in answered.headers) is expose
            assert ("x-poolgate-route" in refused.value.response.headers) is expose
            await gw.gateway.flush_usage()
            explained = CliRunner().invoke(
                app, ["route", "explain", answered.headers["request-id"], "--data-dir", str(config.data_dir)]
            )
            assert explained.exit_code == 0 and answered.headers["x-poolgate-upstream"] in explained.output
        finally:
            await gw.stop()


async def test_route_explain_shows_each_stage_and_the_choice(gw: RunningGateway, mock: MockServer) -> None:
    mock.set_fault(MOCK_KEYS[0], Fault(status=500, times=1))
    async with gw.client() as client:
        answered = [
            await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user()) for _ in range(3)
        ]
    raw = answered[-1]
    await gw.gateway.flush_usage()
    data_dir = str(gw.gateway.config.data_dir)
    # The first request failed over from up-0: the trace says what up-0 answered.
    failed_over = CliRunner().invoke(
        app, ["route", "explain", answered[0].headers["request-id"], "--data-dir", data_dir]
    )
    assert "tried up-0: 500 api_error" in failed_over.output
    assert (
        "tried"
        not in CliRunner().invoke(app, ["route", "explain", raw.headers["request-id"], "--data-dir", data_dir]).output
    )
    result = CliRunner().invoke(app, ["route", "explain", raw.headers["request-id"], "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    for needle in ("model", "health", "ratelimit", "up-0 (unhealthy)", "round-robin", "failover order"):
        assert needle in result.output
    # Each scored candidate with its total (up-0 was dropped before scoring).
    scores_table = result.output.split("┃ scored", 1)[1].split("└", 1)[0]
    scored = [line.split("│")[1].strip() for line in scores_table.splitlines() if line.startswith("│")]
    assert sorted(scored) == ["up-1", "up-2"]
    last = CliRunner().invoke(app, ["route", "last", "-n", "3", "--data-dir", data_dir])
    assert last.exit_code == 0 and last.output.count("req_pg_") == 3
    missing = CliRunner().invoke(app, ["route", "explain", "req_pg_nope", "--data-dir", data_dir])
    assert missing.exit_code == 1 and "no usage record" in missing.output


async def test_route_last_and_the_admin_api_list_the_latest_request_first(tmp_path: Path, mock: MockServer) -> None:
    """`route last` printed the oldest first while `GET /admin/routes` lists the newest first. Without `-n` it
    shows the latest 5 (README). Both by arrival: a stream that came first and finished last was the admin API's
    latest (its ring is filled as requests finish) and `route last`'s oldest."""
    admin_token = "admin-token-0123456789abcdef"
    running = await start_gateway(gateway_config(tmp_path, mock.url, admin=AdminConfig(token=admin_token)))
    for key in MOCK_KEYS:  # streams only: the JSON answers below come at once
        mock.set_fault(key, Fault(tokens_per_second=10, times=1))
    try:
        async with running.client() as client:
            slow = asyncio.create_task(
                client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user(), stream=True)
            )
            await asyncio.sleep(0.05)  # the stream's request first
            sent = [
                (await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())).headers[
                    "request-id"
                ]
                for _ in range(6)
            ]
            stream = await slow
            async for _ in await stream.parse():
                pass
        async with aiohttp.ClientSession() as http:
            url = f"{running.url}/admin/routes?last=3"
            async with http.get(url, headers={"x-admin-token": admin_token}) as answer:
                listed = [route["request_id"] for route in (await answer.json())["routes"]]
            async with http.get(f"{running.url}/admin/routes?limit=3", headers={"x-admin-token": admin_token}) as wrong:
                misspelt = wrong.status, (await wrong.json())["error"]["message"]
        await running.gateway.flush_usage()
        last = CliRunner().invoke(app, ["route", "last", "-n", "3", "--data-dir", str(tmp_path)])
        latest = CliRunner().invoke(app, ["route", "last", "--data-dir", str(tmp_path)])
    finally:
        await running.stop()
    assert last.exit_code == 0, last.output
    assert re.findall(r"req_pg_\w+", last.output) == listed == sent[::-1][:3]
    assert re.findall(r"req_pg_\w+", latest.output) == sent[::-1][:5]
    # Not twenty traces for a parameter it does not take.
    assert misspelt == (400, "Unknown query parameter 'limit': GET /admin/routes takes last=N only")


async def test_traces_past_their_retention_are_dropped_and_their_ledger_rows_kept(gw: RunningGateway) -> None:
    """`store.trace_retention_days` (30): the traces, most of a row's size, go; the cost rows stay."""
    async with gw.client() as client:
        ids = [
            (await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())).headers[
                "request-id"
            ]
            for _ in range(2)
        ]
    await gw.gateway.flush_usage()
    with gw.gateway.engine.begin() as conn:  # the first request is 31 days old
        conn.execute(
            text("UPDATE usage SET started_at = started_at - 31 * 86400 WHERE request_id = :id"), {"id": ids[0]}
        )
    assert await gw.gateway.forget_old_traces() == 1
    # The next run, of this gateway or a restarted one, looks only at what is newly old.
    assert read_traces_forgotten_before(gw.gateway.engine) > time.time() - 30 * 86400 - 60
    assert await gw.gateway.forget_old_traces() == 0
    data_dir = str(gw.gateway.config.data_dir)
    old, new = (CliRunner().invoke(app, ["route", "explain", id_, "--data-dir", data_dir]).output for id_ in ids)
    assert "routing trace was dropped (older than store.trace_retention_days: 30)" in old
    assert "round-robin" in new and "trace was dropped" not in new
    with gw.gateway.engine.connect() as conn:
        costs = conn.execute(text("SELECT cost_micro_usd FROM usage WHERE request_id = :id"), {"id": ids[0]}).scalars()
        assert next(costs) > 0


def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    with old.begin() as conn:
        conn.execute(text("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value VARCHAR(256) NOT NULL)"))
        conn.execute(text("INSERT INTO meta VALUES ('schema_version', '1')"))
        # The usage table as v1 made it.
        conn.execute(
            text(
                "CREATE TABLE usage (request_id VARCHAR(40) PRIMARY KEY, started_at FLOAT NOT NULL, "
                "principal_id VARCHAR(64), principal_name VARCHAR(64), endpoint VARCHAR(32) NOT NULL, "
                "model VARCHAR(128), stream BOOLEAN NOT NULL, upstream_id VARCHAR(64), status INTEGER NOT NULL, "
                "outcome VARCHAR(32) NOT NULL, error_type VARCHAR(64), input_tokens INTEGER NOT NULL, "
                "output_tokens INTEGER NOT NULL, cache_creation_input_tokens INTEGER NOT NULL, "
                "cache_read_input_tokens INTEGER NOT NULL, ttfb_ms FLOAT, duration_ms FLOAT NOT NULL, "
                "attempts INTEGER NOT NULL, session_id VARCHAR(128))"
            )
        )
        conn.execute(
            text(
                "INSERT INTO usage VALUES ('req_old', 1.0, 'key_a', 'alice', 'messages', 'm', 0, 'up-0', 200, 'ok', "
                "NULL, 1, 1, 0, 0, NULL, 1.0, 1, NULL)"
            )
        )
    engine = open_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT request_id, route FROM usage")).one() == ("req_old", None)
        version = conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar_one()
    assert version == str(len(MIGRATIONS))

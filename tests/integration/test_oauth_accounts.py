"""Subscription (OAuth) accounts end to end: the CLI imports or logs in an account (PKCE against the mock's token
endpoint), the gateway serves it with a Bearer token and the subscription dialect, the token manager refreshes
once under a stampede and marks dead grants `needs_reauth`, and the mock reports unified quota headers.

Tests at the end go through the relay and the router: refresh-and-retry on 401, routing around
`needs_reauth` and parked accounts, subscription-first preference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
import yaml
from aiohttp import web
from typer.testing import CliRunner

from poolgate.cli import accounts as accounts_cli
from poolgate.cli.main import app as cli_app
from poolgate.config import GatewayConfig, OAuthConfig, RoutingConfig, UpstreamConfig
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.sign import NeedsReauth, RefreshUnavailable
from poolgate.mock import Fault, MockConfig, MockKey, MockServer, start_mock
from poolgate.mock.oauth import MockOAuthConfig, UnifiedHeaders
from poolgate.store import accounts as store
from poolgate.store import db
from poolgate.store.crypto import SecretBox, load_master_key
from poolgate.store.db import open_engine
from poolgate.store.writer_process import failure
from poolgate.telemetry.logging import LINE_BOUND, LINES_PER_KIND
from poolgate.upstreams import tokens
from poolgate.upstreams.accounts import warmup_slot
from poolgate.upstreams.dialects.anthropic_oauth import CLAUDE_CODE_IDENTITY, OAUTH_BETA
from poolgate.upstreams.oauth import (
    OAuthCredentials,
    PkcePair,
    authorize_url,
    credentials_from_document,
    s256_challenge,
)
from poolgate.upstreams.quota import (
    FIVE_HOUR,
    SEVEN_DAY,
    parse_unified_headers,
    quota_blocked_until,
)
from tests.conftest import MOCK_KEYS, MODEL, RunningGateway, gateway_config, start_gateway, usage_rows, user
from tests.integration.test_log_bound import Clock as LineClock
from tests.integration.test_relay_details import endless_upstream, written_when_read
from tests.integration.test_serve_process import start_serve

runner = CliRunner()
CC_SYSTEM = [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3; cc_entrypoint=cli;"},
    {"type": "text", "text": CLAUDE_CODE_IDENTITY, "cache_control": {"type": "ephemeral"}},
]


def cli(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> str:
    result = runner.invoke(cli_app, list(args), input=input, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def oauth_config(mock: MockServer) -> OAuthConfig:
    return OAuthConfig(
        authorize_url=f"{mock.url}/oauth/authorize",
        token_url=f"{mock.url}/v1/oauth/token",
        refresh_backoff_seconds=0.01,
        request_timeout_seconds=5,
    )


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    config = MockConfig(
        keys={key: MockKey() for key in MOCK_KEYS},
        min_cacheable_tokens=256,
        oauth=MockOAuthConfig(five_hour_budget_tokens=200_000),
    )
    server = await start_mock(config, host="127.0.0.1", port=0)
    yield server
    await server.stop()


def add_account(config: GatewayConfig, mock: MockServer, account_id: str, upstream_id: str, **kwargs: Any) -> str:
    """A mock subscription account stored as a gateway upstream; returns its refresh token."""
    tokens = mock.state.oauth.create_account(account_id, **kwargs)
    credentials = credentials_from_document(tokens)
    engine = open_engine(config.store_url())
    box = SecretBox(load_master_key(config.data_dir))
    store.add_oauth_account(engine, box, Upstream(upstream_id, store.KIND, mock.url), credentials)
    engine.dispose()
    return str(tokens["refresh_token"])


async def oauth_gateway(
    tmp_path: Path, mock: MockServer, api_keys: tuple[str, ...] = (), **overrides: Any
) -> RunningGateway:
    config = gateway_config(tmp_path, mock.url, keys=api_keys, oauth=oauth_config(mock), **overrides)
    return await start_gateway(config)


def oauth_requests(mock: MockServer, account_id: str) -> int:
    return mock.stats.requests_by_key.get(f"oauth:{account_id}", 0)


# ----- import, serve, sign ---------------------------------------------------------------------------


async def test_an_imported_claude_code_credentials_file_serves_through_the_gateway(
    tmp_path: Path, mock: MockServer
) -> None:
    tokens = mock.state.oauth.create_account("acct-a", subscription_type="max")
    credentials_file = tmp_path / "credentials.json"
    credentials_file.write_text(
        json.dumps(
            {
                "claudeAiOauth": {
                    "accessToken": tokens["access_token"],
                    "refreshToken": tokens["refresh_token"],
                    "expiresAt": int((time.time() + tokens["expires_in"]) * 1000),
                    "scopes": tokens["scope"].split(),
                    "subscriptionType": "max",
                }
            }
        )
    )
    d = str(tmp_path)
    output = cli("accounts", "import", str(credentials_file), "--id", "sub-a", "--base-url", mock.url, "--data-dir", d)
    assert "sub-a" in output and "max" in output
    assert tokens["access_token"].encode() not in (tmp_path / "poolgate.db").read_bytes()
    assert (
        "already exists"
        in runner.invoke(
            cli_app, ["accounts", "import", str(credentials_file), "--id", "sub-a", "--data-dir", d]
        ).output
    )
    # The same file under another id (or none) would share one refresh token: each refresh would revoke the
    # other account's (a file names no account or e-mail to tell, its tokens do).
    for other in (["--id", "sub-b"], []):
        again = runner.invoke(cli_app, ["accounts", "import", str(credentials_file), *other, "--data-dir", d])
        assert again.exit_code != 0 and "already account 'sub-a'" in again.output, again.output
    # Without its refresh token too: the same access token made a second pool entry for one subscription.
    stripped = tmp_path / "access-only.json"
    document = json.loads(credentials_file.read_text())
    del document["claudeAiOauth"]["refreshToken"]
    stripped.write_text(json.dumps(document))
    again = runner.invoke(cli_app, ["accounts", "import", str(stripped), "--id", "sub-c", "--data-dir", d])
    assert again.exit_code != 0 and "already account 'sub-a'" in again.output, again.output

    gw = await oauth_gateway(tmp_path, mock)
    try:
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(
                model=MODEL,
                max_tokens=16,
                system="Answer briefly.",
                messages=user(),
                extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
            )
        message = await raw.parse()
        assert message.content and raw.headers["x-poolgate-upstream"] == "sub-a"
        sent = mock.stats.last_request_headers
        assert sent["Authorization"] == f"Bearer {tokens['access_token']}" and "x-api-key" not in {
            name.lower() for name in sent
        }
        assert sent["anthropic-beta"] == f"interleaved-thinking-2025-05-14,{OAUTH_BETA}"
        system = orjson.loads(mock.stats.last_request_body)["system"]
        assert system == [
            {"type": "text", "text": CLAUDE_CODE_IDENTITY},
            {"type": "text", "text": "Answer briefly."},
        ]
        assert oauth_requests(mock, "acct-a") == 1
    finally:
        await gw.stop()

    listing = json.loads(cli("accounts", "list", "--json", "--data-dir", d))
    assert [(row["id"], row["state"], row["subscription_type"]) for row in listing] == [("sub-a", "active", "max")]
    assert "sub-a" in cli("accounts", "list", "--data-dir", d)
    cli("accounts", "remove", "sub-a", "--data-dir", d)
    assert json.loads(cli("accounts", "list", "--json", "--data-dir", d)) == []


def test_import_refuses_a_dead_token_and_a_bare_pair_keeps_the_accounts_plan(tmp_path: Path) -> None:
    d = str(tmp_path)
    dead = tmp_path / "dead.json"
    dead.write_text(json.dumps({"claudeAiOauth": {"accessToken": "sk-ant-oat01-x", "expiresAt": 1000}}))
    refused = runner.invoke(cli_app, ["accounts", "import", str(dead), "--data-dir", d])
    assert refused.exit_code != 0 and "can never serve" in refused.output
    first = tmp_path / "first.json"
    first.write_text(
        json.dumps(
            {
                "claudeAiOauth": {
                    "accessToken": "sk-ant-oat01-a",
                    "refreshToken": "sk-ant-ort01-a",
                    "expiresAt": int((time.time() + 3600) * 1000),
                    "subscriptionType": "max",
                }
            }
        )
    )
    cli("accounts", "import", str(first), "--id", "sub-m", "--data-dir", d)
    # A FILE names its own expiry: an --expires-in next to it was ignored without a word.
    ignored = runner.invoke(cli_app, ["accounts", "import", str(first), "--expires-in", "5", "--data-dir", d])
    assert ignored.exit_code != 0 and "go with --access-token-env" in ignored.output
    pair = tmp_path / "pair.json"
    pair.write_text(
        json.dumps({"access_token": "sk-ant-oat01-b", "refresh_token": "sk-ant-ort01-b", "expires_in": 3600})
    )
    cli("accounts", "import", str(pair), "--id", "sub-m", "--replace", "--data-dir", d)
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", d))
    assert row["id"] == "sub-m" and row["subscription_type"] == "max"
    # Tokens naming the account's e-mail keep its plan; another subscription's (another e-mail) do not take it.
    for n, email, plan in ((3, "m@example.com", "max"), (4, "c@example.com", None)):
        tokens = {
            "access_token": f"sk-ant-oat01-{n}",
            "refresh_token": f"sk-ant-ort01-{n}",
            "account": {"email": email},
        }
        pair.write_text(json.dumps(tokens))
        cli("accounts", "import", str(pair), "--id", "sub-m", "--replace", "--data-dir", d)
        [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", d))
        assert (row["label"], row["subscription_type"]) == (email, plan)


@pytest.mark.parametrize(("encoding", "mark"), [("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe")])
def test_a_credentials_file_windows_wrote_with_a_byte_order_mark_is_imported(
    tmp_path: Path, encoding: str, mark: bytes
) -> None:
    """PowerShell's `Out-File` and `>` write UTF-16 or UTF-8 with a byte order mark: such a file of Claude Code's
    credentials was refused as "not JSON"."""
    document = {
        "claudeAiOauth": {
            "accessToken": "sk-ant-oat01-w",
            "refreshToken": "sk-ant-ort01-w",
            "expiresAt": int((time.time() + 3600) * 1000),
            "subscriptionType": "pro",
        }
    }
    written = tmp_path / "credentials.json"
    written.write_bytes(mark + json.dumps(document).encode(encoding))
    cli("accounts", "import", str(written), "--id", "sub-w", "--data-dir", str(tmp_path))
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert (row["id"], row["subscription_type"]) == ("sub-w", "pro")


def test_replace_applies_the_settings_given_and_keeps_the_others(tmp_path: Path) -> None:
    """`--replace --base-url U --weight W --model G` printed "imported" and left the account where it was,
    with its weight and models, without a word."""
    d = str(tmp_path)
    pair = tmp_path / "pair.json"

    def settings() -> tuple[str, int, tuple[str, ...]]:
        engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
        [row] = store.list_oauth_accounts(engine)
        engine.dispose()
        return row.upstream.base_url, row.upstream.weight, row.upstream.models

    for n, options in enumerate(
        [
            (),
            ("--replace", "--weight", "7", "--model", "claude-opus*"),
            ("--replace",),
            ("--replace", "--base-url", "http://proxy:8080"),
        ]
    ):
        pair.write_text(json.dumps({"access_token": f"sk-ant-oat01-{n}", "refresh_token": f"sk-ant-ort01-{n}"}))
        cli("accounts", "import", str(pair), "--id", "sub", *options, "--data-dir", d)
        if n == 0:
            assert settings() == ("https://api.anthropic.com", 1, ())
    assert settings() == ("http://proxy:8080", 7, ("claude-opus*",))
    refused = runner.invoke(
        cli_app, ["accounts", "import", str(pair), "--id", "sub", "--replace", "--base-url", "", "--data-dir", d]
    )
    assert refused.exit_code != 0 and "--base-url" in refused.output


def test_one_persons_subscriptions_in_two_organizations_are_two_accounts(tmp_path: Path) -> None:
    """A personal plan and a Team seat of one login (one account uuid and e-mail, two organizations) are two
    subscriptions, as the gateway takes them at a reload: the second was refused as the first's account (and
    a login's tokens replaced the first's). The same organization's tokens again are still its account."""
    d = str(tmp_path)

    def answer(name: str, organization: str | None) -> str:
        path = tmp_path / f"{name}.json"
        document: dict[str, Any] = {
            "access_token": f"sk-ant-oat01-{name}",
            "refresh_token": f"sk-ant-ort01-{name}",
            "expires_in": 28800,
            "account": {"uuid": "user-dana", "email_address": "dana@example.com"},
        }
        if organization is not None:
            document["organization"] = {"uuid": organization}
        path.write_text(json.dumps(document))
        return str(path)

    cli("accounts", "import", answer("personal", "org-personal"), "--id", "dana", "--data-dir", d)
    cli("accounts", "import", answer("team", "org-team"), "--id", "dana-team", "--data-dir", d)
    again = runner.invoke(cli_app, ["accounts", "import", answer("personal-2", "org-personal"), "--data-dir", d])
    assert again.exit_code != 0 and "already account 'dana'" in again.output
    # A bare pair given to an account keeps its organization: the Team seat is still not its subscription.
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"access_token": "sk-ant-oat01-bare", "refresh_token": "sk-ant-ort01-bare"}))
    cli("accounts", "import", str(bare), "--id", "dana", "--replace", "--data-dir", d)
    cli("accounts", "import", answer("team-2", "org-team"), "--id", "dana-team", "--replace", "--data-dir", d)
    rows = json.loads(cli("accounts", "list", "--json", "--data-dir", d))
    assert [(row["id"], row["label"]) for row in rows] == [
        ("dana", "dana@example.com"),
        ("dana-team", "dana@example.com"),
    ]
    assert stored_refresh_token(tmp_path, "dana") == "sk-ant-ort01-bare"
    assert stored_refresh_token(tmp_path, "dana-team") == "sk-ant-ort01-team-2"


def test_import_refuses_a_token_holding_a_line_break_and_never_shows_it(tmp_path: Path) -> None:
    """A token with CR/LF inside was imported, and every request routed to its account was a 500 from the
    gateway (a header cannot hold it). Whitespace around a token (a trailing newline) is only trimmed."""
    d = str(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"access_token": "sk-ant-oat01-abc\r\nx-evil: 1", "expires_in": 3600}))
    refused = runner.invoke(cli_app, ["accounts", "import", str(broken), "--data-dir", d])
    assert refused.exit_code != 0 and "access_token: holds a control character" in refused.output
    assert "x-evil" not in refused.output and "sk-ant-oat01-abc" not in refused.output
    env = {"CC_AT": "sk-ant-oat01-good\n", "CC_RT": "sk-ant-ort01-a\nb"}
    args = ["accounts", "import", "--access-token-env", "CC_AT", "--refresh-token-env", "CC_RT", "--data-dir", d]
    refused = runner.invoke(cli_app, args, env=env)
    assert refused.exit_code != 0 and "refresh_token: holds a control character" in refused.output
    cli(*args, "--id", "sub-nl", env={**env, "CC_RT": "sk-ant-ort01-ab\r\n"})
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    stored = store.load_oauth_credentials(engine, SecretBox(load_master_key(tmp_path)), "sub-nl")
    engine.dispose()
    assert stored is not None and (stored.access_token, stored.refresh_token) == (
        "sk-ant-oat01-good",
        "sk-ant-ort01-ab",
    )


def test_import_refuses_the_token_of_a_config_file_subscription_upstream(tmp_path: Path) -> None:
    """A `claude setup-token` token as a config file upstream's `api_key`, imported as well: only the stored
    accounts were looked at, and one subscription went into the pool twice (its quota counted as two)."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path}\nupstreams:\n"
        "  - {id: cc-setup, kind: anthropic_oauth, api_key: sk-ant-oat01-config-file-token}\n"
    )
    env = {"CC_AT": "sk-ant-oat01-config-file-token"}
    args = ["accounts", "import", "--access-token-env", "CC_AT", "--id", "st2", "--config", str(config)]
    refused = runner.invoke(cli_app, args, env=env)
    assert refused.exit_code == 1 and "already the config file's upstream 'cc-setup'" in refused.output
    assert "sk-ant-oat01-config" not in refused.output
    assert cli(*args, env={"CC_AT": "sk-ant-oat01-another-token"})  # another subscription's is imported


@contextlib.asynccontextmanager
async def token_endpoint(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """A token endpoint of the test's own answering with `handler`: its URL."""
    app = web.Application()
    app.router.add_post("/v1/oauth/token", handler)
    endpoint = web.AppRunner(app)
    await endpoint.setup()
    await web.TCPSite(endpoint, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{endpoint.addresses[0][1]}/v1/oauth/token"
    finally:
        await endpoint.cleanup()


async def test_a_token_endpoint_answer_with_a_broken_token_is_a_failed_refresh(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolgate.oauth")

    async def broken_answer(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "sk-ant-oat01-x\r\nx-evil: 1", "refresh_token": "r", "expires_in": 9})

    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-x", "sub-x", expires_in=-60)
    async with token_endpoint(broken_answer) as token_url:
        oauth = oauth_config(mock).model_copy(update={"token_url": token_url})
        gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), oauth=oauth))
        try:
            with pytest.raises(RefreshUnavailable):
                await gw.gateway.signer.prepare("sub-x")
            assert gw.gateway.signer.unusable_reason("sub-x") == "refresh_failing"
            # As `accounts list` says it while the refresh retries (it said "refreshing", the account out).
            listed = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
            assert [(row["id"], row["state"]) for row in listed] == [("sub-x", "refresh_failing")]
            account = gw.gateway.signer.tokens.get("sub-x")
            assert account is not None and "x-evil" not in account.credentials.access_token
        finally:
            await gw.stop()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "access_token: holds a control character" in logged and "x-evil" not in logged


async def test_claude_code_requests_reach_the_account_byte_for_byte(tmp_path: Path, mock: MockServer) -> None:
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-b", "sub-b")
    gw = await oauth_gateway(tmp_path, mock)
    body = (
        b'{"model": "' + MODEL.encode() + b'",  "max_tokens": 8,\n "messages": [{"role": "user", "content": "hi"}],'
        b' "system": ' + orjson.dumps(CC_SYSTEM) + b', "metadata": {"user_id": "u"}}'
    )
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{gw.url}/v1/messages?beta=true",
                data=body,
                headers={"x-api-key": gw.key, "content-type": "application/json", "anthropic-version": "2023-06-01"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
        assert mock.stats.last_request_body == body
        assert mock.stats.last_request_headers["anthropic-beta"] == OAUTH_BETA
    finally:
        await gw.stop()


async def test_a_malformed_system_gets_the_400_an_api_key_gets_naming_the_clients_own_entry(
    tmp_path: Path, mock: MockServer
) -> None:
    """The identity block replaced an object `system` (the client's prompt silently gone, a 200), and shifted
    a bad list entry's index in the upstream's 400 (`system.1` for the client's `system[0]`)."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-sys", "sub-sys")
    gw = await oauth_gateway(tmp_path, mock)
    try:
        async with aiohttp.ClientSession() as session:
            for system, named in (
                ({"type": "text", "text": "Talk like a pirate"}, "system: "),
                (123, "system: "),
                ([7, {"type": "text", "text": "Rules"}], "system.0: "),
            ):
                request = {"model": MODEL, "max_tokens": 8, "messages": user(), "system": system}
                async with session.post(
                    f"{gw.url}/v1/messages", json=request, headers={"x-api-key": gw.key}
                ) as response:
                    answer = await response.json()
                assert response.status == 400 and answer["error"]["type"] == "invalid_request_error"
                assert answer["error"]["message"].startswith(named), answer
                assert orjson.loads(mock.stats.last_request_body)["system"] == system  # as the client sent it
    finally:
        await gw.stop()


async def test_a_setup_token_in_the_config_file_serves_as_a_bearer_token(tmp_path: Path, mock: MockServer) -> None:
    tokens = mock.state.oauth.create_account("acct-setup", scopes=("user:inference",), expires_in=365 * 86400)
    upstream = UpstreamConfig(id="setup", kind="anthropic_oauth", base_url=mock.url, api_key=tokens["access_token"])
    gw = await oauth_gateway(tmp_path, mock, upstreams=(upstream,))
    try:
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.headers["x-poolgate-upstream"] == "setup"
        assert mock.stats.last_request_headers["Authorization"] == f"Bearer {tokens['access_token']}"
        assert oauth_requests(mock, "acct-setup") == 1 and mock.stats.oauth_token_calls == 0
    finally:
        await gw.stop()


async def test_a_rejected_setup_token_in_the_config_file_is_the_operators_to_fix(
    tmp_path: Path, mock: MockServer
) -> None:
    """Nothing refreshes a config file's token: its 401 was a retryable 529 "token expired", logged nowhere,
    and the account stayed first in line. It is a rejected credential, as an API key's."""
    upstream = UpstreamConfig(
        id="setup", kind="anthropic_oauth", base_url=mock.url, api_key="sk-ant-oat01-revoked-or-unknown"
    )
    gw = await oauth_gateway(tmp_path, mock, upstreams=(upstream,))
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.InternalServerError) as rejected:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert "rejected the gateway's credential" in rejected.value.message
        assert rejected.value.response.headers["x-should-retry"] == "false"
        state = gw.gateway.pool.get("setup")
        assert state is not None and state.health.consecutive_failures == 1
    finally:
        await gw.stop()


async def test_env_given_tokens_are_imported_too(tmp_path: Path, mock: MockServer) -> None:
    tokens = mock.state.oauth.create_account("acct-env")
    env = {"CC_ACCESS": tokens["access_token"], "CC_REFRESH": tokens["refresh_token"]}
    args = ["--access-token-env", "CC_ACCESS", "--refresh-token-env", "CC_REFRESH", "--expires-in", "3600"]
    output = cli("accounts", "import", *args, "--subscription-type", "pro", "--data-dir", str(tmp_path), env=env)
    assert "imported subscription account claude-pro-" in output
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["subscription_type"] == "pro" and row["expires_at"] > time.time() + 3000


async def test_login_runs_the_pkce_flow_against_the_configured_endpoints(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkce = PkcePair("v" * 64, s256_challenge("v" * 64))
    monkeypatch.setattr(accounts_cli, "new_pkce", lambda: pkce)
    monkeypatch.setattr(accounts_cli, "new_state", lambda: "fixed-state")
    config = oauth_config(mock)
    # What the person does in the browser: open the URL, log in (here as mock account "acct-login").
    url = authorize_url(config, pkce, "fixed-state") + "&account=acct-login"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        pasted = await response.text()
    assert response.status == 200 and pasted.endswith("#fixed-state")
    env = {
        "POOLGATE__OAUTH__TOKEN_URL": config.token_url,
        "POOLGATE__OAUTH__AUTHORIZE_URL": config.authorize_url,
    }
    args = ["accounts", "login", "--id", "sub-login", "--base-url", mock.url, "--data-dir", str(tmp_path)]
    result = await asyncio.to_thread(runner.invoke, cli_app, args, input=pasted + "\n", env=env)
    assert result.exit_code == 0, result.output
    assert (
        "client_id=9d1c250a-e61b-44d9-88ed-5944d1962f5e" in result.output
        and "code_challenge_method=S256" in result.output
    )
    assert "logged in subscription account sub-login" in result.output
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["id"] == "sub-login" and row["label"] == "acct-login@example.com" and row["state"] == "active"
    assert mock.stats.oauth_token_calls_by_grant == {"authorization_code": 1}
    # The code is single use: a second exchange fails with the endpoint's reason.
    again = await asyncio.to_thread(runner.invoke, cli_app, [*args, "--replace"], input=pasted + "\n", env=env)
    assert again.exit_code != 0 and "invalid_grant" in again.output


# ----- refresh: single flight, rotation, reauth ------------------------------------------------------


async def test_a_stampede_of_200_prepares_on_an_expired_token_makes_one_token_call(
    tmp_path: Path, mock: MockServer
) -> None:
    config = gateway_config(tmp_path, mock.url, keys=())
    old_refresh = add_account(config, mock, "acct-c", "sub-c", expires_in=-60)
    gw = await oauth_gateway(tmp_path, mock)
    try:
        mock.state.oauth.token_delay_seconds = 0.05  # keep the refresh in flight while the stampede arrives
        await asyncio.gather(*(gw.gateway.signer.prepare("sub-c") for _ in range(200)))
        assert mock.stats.oauth_token_calls == 1
        stored = store.load_oauth_credentials(gw.gateway.engine, gw.gateway.box, "sub-c")
        assert stored is not None and stored.refresh_token != old_refresh
        assert stored.expires_at is not None and stored.expires_at > time.time() + 3600
        # The rotated token serves; the old refresh token is dead at the token endpoint.
        async with gw.client() as client:
            message = await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert message.content and oauth_requests(mock, "acct-c") == 1
        status, payload = mock.state.oauth.token(
            {"grant_type": "refresh_token", "refresh_token": old_refresh, "client_id": OAuthConfig().client_id}
        )
        assert (status, payload["error"]) == (400, "invalid_grant")
        # A gateway that restarts finds the rotated pair, not the dead one.
        engine = open_engine(gw.gateway.config.store_url())
        assert store.load_oauth_credentials(engine, gw.gateway.box, "sub-c") == stored
        engine.dispose()
    finally:
        await gw.stop()


async def test_200_concurrent_requests_on_an_expired_token_cause_one_refresh(tmp_path: Path, mock: MockServer) -> None:
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-s", "sub-s", expires_in=-60)
    gw = await oauth_gateway(tmp_path, mock)
    try:
        mock.state.oauth.token_delay_seconds = 0.05
        async with gw.client() as client:
            answers = await asyncio.gather(
                *(client.messages.create(model=MODEL, max_tokens=8, messages=user()) for _ in range(200))
            )
        assert all(answer.content for answer in answers)
        assert mock.stats.oauth_token_calls == 1
        assert oauth_requests(mock, "acct-s") == 200
    finally:
        await gw.stop()


async def test_a_refresh_whose_access_token_is_refused_keeps_the_refresh_token_it_rotated_to(
    tmp_path: Path, mock: MockServer
) -> None:
    """The token endpoint rotated the grant but answered an access token with a line break in it: the refused
    answer's new refresh token was dropped, the next refresh presented the spent one and got `invalid_grant`,
    and the account needed a new login. The new one is saved, and the next refresh goes on from it."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-rot", "sub-rot", expires_in=-60)
    gw = await oauth_gateway(tmp_path, mock)
    try:
        async with aiohttp.ClientSession() as http:
            faults = {"broken_access_tokens": 1}
            async with http.post(f"{mock.url}/_mock/oauth/token-faults", json=faults) as response:
                assert response.status == 200
        with pytest.raises(RefreshUnavailable):
            await gw.gateway.signer.prepare("sub-rot")  # its first attempt was refused: the request fails over
        account = gw.gateway.signer.tokens.get("sub-rot")
        assert account is not None and account.flight is not None
        await account.flight  # the retry, with the refresh token the refused answer rotated to
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await gw.stop()
    assert raw.headers["x-poolgate-upstream"] == "sub-rot" and oauth_requests(mock, "acct-rot") == 1
    assert mock.stats.oauth_token_calls_by_grant["refresh_token"] == 2
    assert stored_refresh_token(tmp_path, "sub-rot") == mock.state.oauth.accounts["acct-rot"].refresh_token
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["state"] == "active"


async def test_transient_token_endpoint_failures_are_retried_with_backoff(tmp_path: Path, mock: MockServer) -> None:
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-t", "sub-t", expires_in=-60)
    gw = await oauth_gateway(tmp_path, mock)
    try:
        mock.state.oauth.token_faults = [503, 429]
        with pytest.raises(RefreshUnavailable):
            await gw.gateway.signer.prepare("sub-t")  # not held through the retries: the request fails over
        assert mock.stats.oauth_token_calls == 1  # refused once; the retries come after, not before, it failed over
        assert gw.gateway.signer.unusable_reason("sub-t") == "refresh_failing"
        account = gw.gateway.signer.tokens.get("sub-t")
        assert account is not None and account.flight is not None
        await account.flight  # the retries go on in the background
        assert mock.stats.oauth_token_calls == 3 and gw.gateway.signer.account_state("sub-t") == "active"
        assert gw.gateway.signer.unusable_reason("sub-t") is None
    finally:
        await gw.stop()


async def test_a_slow_token_endpoint_holds_requests_only_briefly_and_they_go_to_another_account(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token endpoint that took its time (it hung up to `oauth.request_timeout_seconds`, 30 s) held every
    request routed to the account whose token it was renewing for all that time, while the other account
    was idle: with 40 streaming clients, 26 stalled for 22 s. Past a short wait they fail over, and the
    account is out of routing as `refresh_failing` until the refresh ends."""
    monkeypatch.setattr(tokens, "MAX_REFRESH_WAIT_SECONDS", 0.1, raising=False)
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-slow", "sub-slow")
    add_account(config, mock, "acct-other", "sub-other")
    # The token endpoint answers once the test lets it, not after a delay: a busy machine slower than the delay
    # to send the six requests below found the refresh over and the account back among them.
    answer_now = asyncio.Event()
    token_calls = 0

    async def held(request: web.Request) -> web.Response:
        nonlocal token_calls
        token_calls += 1
        await answer_now.wait()
        status, payload = mock.state.oauth.token(await request.json())
        return web.json_response(payload, status=status)

    async with token_endpoint(held) as token_url:
        # Nor does the gateway give up on the call meanwhile.
        update = {"token_url": token_url, "request_timeout_seconds": 120}
        oauth = oauth_config(mock).model_copy(update=update)
        routing = RoutingConfig(strategy="round-robin")
        gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), oauth=oauth, routing=routing))
        try:
            mock.state.oauth.expire("acct-slow")  # the gateway still believes its token valid for hours
            served = []
            async with gw.client() as client:
                for _ in range(6):
                    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                    served.append(raw.headers["x-poolgate-upstream"])
                assert token_calls == 1  # its 401 began the refresh
                assert served == ["sub-other"] * 6
                assert gw.gateway.signer.unusable_reason("sub-slow") == "refresh_failing"
                account = gw.gateway.signer.tokens.get("sub-slow")
                assert account is not None and account.flight is not None
                answer_now.set()
                await account.flight  # the refresh ends as it would have: the account serves again
                assert gw.gateway.signer.unusable_reason("sub-slow") is None and token_calls == 1
                for _ in range(4):
                    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                    served.append(raw.headers["x-poolgate-upstream"])
            assert "sub-slow" in served[6:]
        finally:
            answer_now.set()  # a stop waits for the token call in flight
            await gw.stop()


async def test_a_burst_meeting_a_slow_token_endpoint_writes_a_bounded_number_of_skip_lines(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every request of a burst routed to an account whose refresh then took too long is passed over to another
    account, and each wrote an INFO line at `poolgate serve`'s default level: as many lines as requests."""
    caplog.set_level(logging.INFO, logger="poolgate.relay")
    LINE_BOUND.reset(LineClock())
    # Long enough for the whole burst to be routed to the account before its requests give up on the refresh,
    # on a busy machine too (sixteen requests through new connections), and short of the token endpoint's delay.
    monkeypatch.setattr(tokens, "MAX_REFRESH_WAIT_SECONDS", 3.0, raising=False)
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-slow", "sub-a-slow", expires_in=-60)
    add_account(config, mock, "acct-other", "sub-b-other")
    gw = await oauth_gateway(tmp_path, mock, routing=RoutingConfig(strategy="first-pick"))
    burst = LINES_PER_KIND + 5
    try:
        mock.state.oauth.token_delay_seconds = 5.0
        async with gw.client() as client:
            create = client.messages.with_raw_response.create
            answers = await asyncio.gather(*(create(model=MODEL, max_tokens=8, messages=user()) for _ in range(burst)))
        assert [answer.headers["x-poolgate-upstream"] for answer in answers] == ["sub-b-other"] * burst
    finally:
        await gw.stop()
    skipped = [
        r.getMessage()
        for r in caplog.records
        if r.name == "poolgate.relay" and r.getMessage().startswith("upstream sub-a-slow skipped for request")
    ]
    assert len(skipped) == LINES_PER_KIND
    summary = "… and 5 more like 'upstream %s skipped for request %s: %s' for sub-a-slow suppressed in the last 0 s"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.getMessage().startswith("… and")]
    assert said == [summary]


async def test_a_token_endpoint_refusal_other_than_invalid_grant_is_retried_and_never_needs_a_new_login(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A WAF's 403, a mistyped token URL's 404 or a 401 `invalid_client` marked a working account
    `needs_reauth` in the store, for good: only `invalid_grant` says the grant is dead."""
    caplog.set_level(logging.INFO, logger="poolgate.oauth")
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-waf", "sub-waf", expires_in=-60)
    gw = await oauth_gateway(tmp_path, mock)
    try:
        mock.state.oauth.token_faults = [403, 404, 401]
        with pytest.raises(RefreshUnavailable):
            await gw.gateway.signer.prepare("sub-waf")
        assert gw.gateway.signer.unusable_reason("sub-waf") == "refresh_failing"
        account = gw.gateway.signer.tokens.get("sub-waf")
        assert account is not None and account.flight is not None
        await account.flight
        assert mock.stats.oauth_token_calls == 4 and gw.gateway.signer.account_state("sub-waf") == "active"
        await gw.gateway.signer.prepare("sub-waf")
    finally:
        await gw.stop()
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["state"] == "active"
    # What failed is in the log: the status and the token URL the operator configured, never a token.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"token endpoint {mock.url}/v1/oauth/token answered HTTP 403" in logged
    assert account.credentials.access_token not in logged and str(account.credentials.refresh_token) not in logged


async def test_a_stop_during_a_token_refresh_saves_the_pair_the_refresh_brings(
    tmp_path: Path, mock: MockServer
) -> None:
    """A stop cancelled the refresh in flight: the token endpoint had rotated the grant, the new pair was
    never saved, and after the restart the account needed a new login."""
    config = gateway_config(tmp_path, mock.url, keys=())
    original = add_account(config, mock, "acct-stop", "sub-stop", expires_in=200)  # inside the refresh margin
    gw = await oauth_gateway(tmp_path, mock)
    try:
        mock.state.oauth.token_delay_seconds = 0.5
        async with gw.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())  # refreshes in the background
    finally:
        await gw.stop()
    stored = store.load_oauth_credentials(gw.gateway.engine, gw.gateway.box, "sub-stop")
    assert stored is not None and stored.refresh_token != original
    assert stored.refresh_token == mock.state.oauth.accounts["acct-stop"].refresh_token
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["state"] == "active"


async def test_tokens_replaced_while_a_refresh_is_under_way_are_not_overwritten_by_its_rotated_pair(
    tmp_path: Path, mock: MockServer
) -> None:
    """`accounts import --replace` while the running gateway refreshed the account's token: the refresh's save,
    landing a moment later, wrote the old tokens' rotated pair over the new ones, in the store and in the
    gateway, which served the account on the old subscription. The tokens replaced since the refresh began are
    kept, and used."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-old", "sub-r", expires_in=-60)  # expired: a request waits for the refresh
    gw = await oauth_gateway(tmp_path, mock)
    try:
        mock.state.oauth.token_delay_seconds = 0.5
        async with gw.client() as client:
            request = asyncio.create_task(
                client.messages.create(model=MODEL, max_tokens=8, system=CC_SYSTEM, messages=user())  # type: ignore[arg-type]
            )
            for _ in range(500):  # the refresh under way
                if mock.stats.oauth_token_calls:
                    break
                await asyncio.sleep(0.01)
            tokens = mock.state.oauth.create_account("acct-new")
            pair = tmp_path / "pair.json"
            pair.write_text(
                json.dumps({"access_token": tokens["access_token"], "refresh_token": tokens["refresh_token"]})
            )
            cli("accounts", "import", str(pair), "--id", "sub-r", "--replace", "--data-dir", str(tmp_path))
            await request
            await client.messages.create(model=MODEL, max_tokens=8, system=CC_SYSTEM, messages=user())  # type: ignore[arg-type]
    finally:
        await gw.stop()
    assert stored_refresh_token(tmp_path, "sub-r") == tokens["refresh_token"]
    assert (oauth_requests(mock, "acct-old"), oauth_requests(mock, "acct-new")) == (0, 2)


async def test_invalid_grant_marks_the_account_needs_reauth_in_the_store_and_the_cli(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-d", "sub-d", expires_in=-60)
    mock.state.oauth.revoke("acct-d")
    gw = await oauth_gateway(tmp_path, mock)
    try:
        results = await asyncio.gather(*(gw.gateway.signer.prepare("sub-d") for _ in range(20)), return_exceptions=True)
        assert all(isinstance(result, NeedsReauth) for result in results)
        assert mock.stats.oauth_token_calls == 1
        assert gw.gateway.signer.unusable_reason("sub-d") == "needs_reauth"
        with pytest.raises(NeedsReauth):
            await gw.gateway.signer.prepare("sub-d")
        assert mock.stats.oauth_token_calls == 1
        # Nothing is asked of its usage endpoint either (it was, and logged so, every minute).
        with caplog.at_level(logging.INFO, logger="poolgate"):
            for minutes in (1, 2):
                await gw.gateway.quota_keeper.tick(time.monotonic() + minutes * 3600, time.time())
        assert "usage endpoint not available" not in caplog.text
    finally:
        await gw.stop()
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["state"] == "needs_reauth" and "invalid_grant" in row["state_reason"]
    assert "needs_reauth" in cli("accounts", "list", "--data-dir", str(tmp_path))
    assert "sub-d needs a new login" in cli("upstreams", "list", "--data-dir", str(tmp_path))
    # A restart remembers it: the account starts out of routing, without a request or a token call to learn it.
    restarted = await oauth_gateway(tmp_path, mock)
    try:
        assert restarted.gateway.signer.unusable_reason("sub-d") == "needs_reauth"
        with pytest.raises(NeedsReauth):
            await restarted.gateway.signer.prepare("sub-d")
        assert mock.stats.oauth_token_calls == 1
    finally:
        await restarted.stop()
    # Logging in again (here: importing fresh tokens with --replace) makes it active again.
    tokens = mock.state.oauth.create_account("acct-d")
    pair = tmp_path / "pair.json"
    pair.write_text(json.dumps(tokens))
    cli("accounts", "import", str(pair), "--id", "sub-d", "--replace", "--data-dir", str(tmp_path))
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["state"] == "active" and row["state_reason"] is None
    assert "needs a new login" not in cli("upstreams", "list", "--data-dir", str(tmp_path))


# ----- quota: the mock's unified headers, the usage endpoint, persistence ------------------------------


async def test_a_usage_poll_whose_token_the_upstream_revoked_refreshes_it_once_and_reads_the_quota(
    tmp_path: Path, mock: MockServer
) -> None:
    """The usage endpoint's 401 (the access token revoked before its time) was only logged, at every poll: a
    parked account stayed out for its window's whole length, whatever room it had again meanwhile."""
    tokens = mock.state.oauth.create_account("acct-u")
    config = gateway_config(tmp_path, mock.url, keys=())
    engine = open_engine(config.store_url())
    box = SecretBox(load_master_key(config.data_dir))
    store.add_oauth_account(engine, box, Upstream("sub-u", store.KIND, mock.url), credentials_from_document(tokens))
    engine.dispose()
    gw = await oauth_gateway(tmp_path, mock)
    try:
        upstream = Upstream("sub-u", store.KIND, mock.url)
        account = gw.gateway.signer.tokens.get("sub-u")
        assert account is not None
        generation = account.generation
        mock.state.oauth.expire("acct-u")
        usage = await gw.gateway.signer.fetch_usage(upstream, time.monotonic(), time.time())
        assert usage is not None and usage.source == "usage_endpoint"
        assert account.generation == generation + 1  # one refresh
    finally:
        await gw.stop()


async def test_a_token_the_usage_endpoint_refuses_is_not_asked_again_every_minute(
    tmp_path: Path, mock: MockServer
) -> None:
    """A setup token (`user:inference` only) gets 403 from the usage endpoint: an idle account was asked (and
    an INFO line written) every minute for as long as the gateway ran. Asked once per token."""
    scopes = ("user:inference",)
    tokens = mock.state.oauth.create_account("acct-setup", scopes=scopes, expires_in=365 * 86400)
    config = gateway_config(tmp_path, mock.url, keys=())
    engine = open_engine(config.store_url())
    box = SecretBox(load_master_key(config.data_dir))
    setup_token = credentials_from_document({"access_token": tokens["access_token"], "expires_in": 365 * 86400})
    store.add_oauth_account(engine, box, Upstream("sub-setup", store.KIND, mock.url), setup_token)
    gw = await oauth_gateway(tmp_path, mock)
    try:
        keeper, now, wall = gw.gateway.quota_keeper, time.monotonic(), time.time()
        for minute in range(1, 5):  # idle, its picture missing: due for a poll every minute
            await keeper.tick(now + 60 * minute, wall + 60 * minute)
        assert mock.stats.oauth_usage_calls == 1
        # Another token is asked again.
        tokens = mock.state.oauth.create_account("acct-setup", scopes=scopes, expires_in=365 * 86400)
        other = credentials_from_document({"access_token": tokens["access_token"], "expires_in": 365 * 86400})
        store.add_oauth_account(engine, box, Upstream("sub-setup", store.KIND, mock.url), other, replace=True)
        gw.gateway.reload()
        for minute in range(5, 8):
            await keeper.tick(now + 60 * minute, wall + 60 * minute)
        assert mock.stats.oauth_usage_calls == 2
    finally:
        await gw.stop()
        engine.dispose()


async def test_unified_quota_headers_grow_with_use_and_a_rejected_window_parks_until_its_reset(
    tmp_path: Path, mock: MockServer
) -> None:
    tokens = mock.state.oauth.create_account("acct-q")
    headers = {
        "authorization": f"Bearer {tokens['access_token']}",
        "anthropic-beta": OAUTH_BETA,
        "anthropic-version": "2023-06-01",
    }
    body = {"model": MODEL, "max_tokens": 16, "system": CC_SYSTEM, "messages": user("x " * 3000)}
    utilisations = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"{mock.url}/v1/messages", json=body, headers=headers) as response:
                assert response.status == 200
                picture = parse_unified_headers(response.headers, time.monotonic(), time.time())
            assert picture is not None and picture.status == "allowed"
            utilisations.append(picture.windows[FIVE_HOUR].utilization)
        assert utilisations[0] < utilisations[1] < utilisations[2]
        assert picture.windows[SEVEN_DAY].utilization is not None
        assert quota_blocked_until(picture, time.monotonic()) is None

        async with session.post(
            f"{mock.url}/_mock/oauth/accounts/acct-q/window",
            json={"window": "five_hour", "status": "rejected", "reset_in_seconds": 7200},
        ) as response:
            assert response.status == 200
        async with session.post(f"{mock.url}/v1/messages", json=body, headers=headers) as response:
            assert response.status == 429 and response.headers["x-should-retry"] == "true"
            assert 7000 < int(response.headers["retry-after"]) <= 7200
            error = await response.json()
            now_mono = time.monotonic()
            rejected = parse_unified_headers(response.headers, now_mono, time.time())
        assert error["error"]["type"] == "rate_limit_error"
        assert rejected is not None and rejected.status == "rejected"
        until = quota_blocked_until(rejected, now_mono)
        assert until is not None and 7000 < until - now_mono <= 7200

    # The usage endpoint says the same in percent; the signer reads it for an idle account.
    config = gateway_config(tmp_path, mock.url, keys=())
    engine = open_engine(config.store_url())
    box = SecretBox(load_master_key(config.data_dir))
    store.add_oauth_account(engine, box, Upstream("sub-q", store.KIND, mock.url), credentials_from_document(tokens))
    gw = await oauth_gateway(tmp_path, mock)
    try:
        upstream = Upstream("sub-q", store.KIND, mock.url)
        usage = await gw.gateway.signer.fetch_usage(upstream, time.monotonic(), time.time())
        assert usage is not None and usage.source == "usage_endpoint"
        # The rejected window as the API reports one: used up (a poll must not call the account free again).
        assert usage.windows[FIVE_HOUR].utilization == 1.0
        # What the gateway will do after each response: remember the picture for `accounts list`.
        store.save_quota_picture(engine, "sub-q", rejected)
        pictures = store.load_quota_pictures(engine)
        assert quota_blocked_until(pictures["sub-q"], time.monotonic()) is not None
    finally:
        await gw.stop()
        engine.dispose()
    listing = cli("accounts", "list", "--data-dir", str(tmp_path), env={"COLUMNS": "200"})
    assert "parked until" in listing and "rejected" in listing and "quota seen" in listing
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["quota"]["windows"]["five_hour"]["status"] == "rejected"
    # The JSON says what the table says (it said "active", with no word of the park).
    assert (row["state"], row["state_reason"]) == ("parked", "insufficient_quota")
    assert row["parked_until"] == row["quota"]["windows"]["five_hour"]["resets_at"]


async def test_the_mock_refuses_subscription_requests_the_real_api_would_refuse(mock: MockServer) -> None:
    tokens = mock.state.oauth.create_account("acct-r")
    good = {
        "authorization": f"Bearer {tokens['access_token']}",
        "anthropic-beta": OAUTH_BETA,
        "anthropic-version": "2023-06-01",
    }
    body = {"model": MODEL, "max_tokens": 8, "system": CC_SYSTEM, "messages": user()}
    async with aiohttp.ClientSession() as session:

        async def post(headers: dict[str, str], payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            async with session.post(f"{mock.url}/v1/messages", json=payload, headers=headers) as response:
                return response.status, await response.json()

        assert (await post(good, body))[0] == 200
        status, error = await post({**good, "anthropic-beta": "other"}, body)
        assert status == 401 and error["error"]["type"] == "authentication_error"
        status, error = await post(good, {**body, "system": "You are a pirate."})
        assert status == 400 and "Claude Code" in error["error"]["message"]
        status, error = await post({**good, "authorization": "Bearer sk-ant-oat01-unknown"}, body)
        assert status == 401
        mock.state.oauth.expire("acct-r")
        status, error = await post(good, body)
        assert status == 401 and "expired" in error["error"]["message"]
        # API keys are untouched, in either header.
        version = {"anthropic-version": "2023-06-01"}
        assert (await post({"x-api-key": MOCK_KEYS[0], **version}, body))[0] == 200
        assert (await post({"authorization": f"Bearer {MOCK_KEYS[1]}", **version}, body))[0] == 200


# ----- needs the relay/router wiring -----------------------------------------------------------------


async def test_a_401_refreshes_once_and_retries_the_same_request(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-401", "sub-401")
    gw = await oauth_gateway(tmp_path, mock)
    try:
        mock.state.oauth.expire("acct-401")  # the gateway still believes the token valid for hours
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.http_response.status_code == 200 and raw.headers["x-poolgate-upstream"] == "sub-401"
        assert mock.stats.oauth_token_calls == 1
        assert mock.stats.requests_by_key.get("oauth:acct-401", 0) == 1  # the retry, after the 401
        # A token that a refresh cured is routine: no warning, no failure on the account's health or error rate.
        assert not [r for r in caplog.records if "rejected the gateway's credential" in r.getMessage()]
        state = gw.gateway.pool.get("sub-401")
        assert state is not None and state.health.consecutive_failures == 0
        assert state.stats.error_rate(time.monotonic()) == 0.0
    finally:
        await gw.stop()


async def test_a_rejected_token_the_token_endpoint_cannot_replace_for_now_is_a_529_to_retry(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream rejected a token its expiry called valid while the token endpoint had a passing outage:
    the client got the 500 "rejected the gateway's credential" with `x-should-retry: false` (Claude Code gave
    up on a transient failure), and the access log said `500:api_error` for what the account answered 401."""
    caplog.set_level(logging.INFO, logger="poolgate.access")
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-out", "sub-out")
    gw = await oauth_gateway(tmp_path, mock)
    try:
        mock.state.oauth.expire("acct-out")
        mock.state.oauth.token_faults = [503] * 3
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert refused.value.status_code == 529 and refused.value.response.headers["retry-after"] == "5"
        assert refused.value.response.headers.get("x-should-retry") != "false"
        assert gw.gateway.signer.unusable_reason("sub-out") == "refresh_failing"
        account = gw.gateway.signer.tokens.get("sub-out")
        assert account is not None and account.flight is not None
        await account.flight  # the refresh retries in the background and gets a new token
        async with gw.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await gw.stop()
    refused_line = next(r.getMessage() for r in caplog.records if r.name == "poolgate.access")
    assert "status=529" in refused_line and refused_line.endswith("failed=sub-out:401:authentication_error")


async def test_a_subscription_account_out_of_its_window_is_logged_once_with_when_it_is_back(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of routing for half an hour, and only the access log's failed attempt said so."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-full", "sub-full")
    mock.state.oauth.set_window("acct-full", "five_hour", status="rejected", reset_in=1800)
    gw = await oauth_gateway(tmp_path, mock, api_keys=MOCK_KEYS[:1])
    try:
        async with gw.client() as client:
            for _ in range(4):  # the API key's account answers whatever the subscription did
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await gw.stop()
    warned = [r.getMessage() for r in caplog.records if "usage window is used up" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("upstream sub-full: ") and "out of routing for 30 min" in warned[0]


async def test_a_window_used_up_under_concurrent_requests_is_logged_once(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Every request in flight when the window ran out got its 429, and each logged the same warning: 20
    concurrent clients, 20 warnings of the same window (and one per in-flight Opus request for a weekly one,
    then one per Opus model id)."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-busy", "sub-busy")
    mock.state.oauth.set_window("acct-busy", "seven_day_opus", status="rejected", reset_in=86400)
    mock.set_fault("oauth:acct-busy", Fault(ttfb_ms=300))  # every request is in flight before the first 429
    gw = await oauth_gateway(tmp_path, mock, api_keys=MOCK_KEYS[:1])
    try:
        async with gw.client() as client:
            for models in (("claude-opus-4-8", "claude-opus-4-6"), (MODEL,)):
                if models == (MODEL,):
                    mock.state.oauth.set_window("acct-busy", "five_hour", status="rejected", reset_in=1800)
                answers = await asyncio.gather(
                    *(
                        client.messages.create(model=models[n % len(models)], max_tokens=8, messages=user())
                        for n in range(20)
                    )
                )
                assert all(answer.content for answer in answers)  # the API key's account answers them
    finally:
        await gw.stop()
    assert oauth_requests(mock, "acct-busy") >= 30
    warned = [r.getMessage() for r in caplog.records if "is used up" in r.getMessage()]
    assert len(warned) == 2, warned
    assert "weekly window for opus models is used up" in warned[0]
    assert "usage window is used up: out of routing for 30 min" in warned[1]


async def test_an_account_whose_token_refresh_is_failing_makes_the_no_account_529_a_short_wait(
    tmp_path: Path, mock: MockServer
) -> None:
    """With another account parked for half an hour, the 529 said `retry-after: 1799` and `x-should-retry:
    false` while the account whose refresh was failing was back seconds later."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-full", "sub-full")
    add_account(config, mock, "acct-blip", "sub-blip")
    mock.state.oauth.set_window("acct-full", "five_hour", status="rejected", reset_in=1800)
    oauth = oauth_config(mock).model_copy(update={"refresh_retries": 0, "refresh_backoff_seconds": 30})
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), oauth=oauth))
    try:
        async with gw.client() as client:
            for _ in range(3):  # the full account answers its 429 once and is parked
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            mock.state.oauth.expire("acct-blip")
            mock.state.oauth.token_faults = [503]
            with pytest.raises(anthropic.APIStatusError) as first:  # its 401, and a refresh that fails
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert gw.gateway.signer.unusable_reason("sub-blip") == "refresh_failing"
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        for answer in (first.value, refused.value):
            # The request that found the token dead is answered as the ones after it are (it named no account).
            assert answer.status_code == 529 and "sub-blip: refresh_failing" in answer.message
            assert "sub-full: insufficient_quota" in answer.message
            assert answer.response.headers["retry-after"] == "5"
            assert answer.response.headers.get("x-should-retry") != "false"
    finally:
        await gw.stop()
    # `accounts list` says so too (it said "active", the reason in a footnote).
    states = {
        row["id"]: row["state"] for row in json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    }
    assert states == {"sub-blip": "refresh_failing", "sub-full": "parked"}


async def test_traffic_moves_off_a_needs_reauth_account_without_client_errors(tmp_path: Path, mock: MockServer) -> None:
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-dead", "sub-dead", expires_in=-60)
    add_account(config, mock, "acct-live", "sub-live")
    mock.state.oauth.revoke("acct-dead")
    gw = await oauth_gateway(tmp_path, mock)
    try:
        async with gw.client() as client:
            for _ in range(6):
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                assert raw.headers["x-poolgate-upstream"] == "sub-live"
        assert gw.gateway.signer.account_state("sub-dead") == "needs_reauth"
        assert mock.stats.oauth_token_calls == 1
    finally:
        await gw.stop()


async def test_an_account_revoked_mid_way_is_out_as_needs_reauth_not_as_unhealthy(
    tmp_path: Path, mock: MockServer
) -> None:
    """A 401 that a refresh answers with invalid_grant: the account needs a new login, which is what
    routing, readiness and the client's answer say (it read "unhealthy" while a health cooldown ran)."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-gone", "sub-gone")  # its token looks valid for hours
    mock.state.oauth.revoke("acct-gone")
    gw = await oauth_gateway(tmp_path, mock)
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert refused.value.status_code == 503 and "needs_reauth" in str(refused.value)
        state = gw.gateway.pool.get("sub-gone")
        assert state is not None and state.health.healthy and state.health.consecutive_failures == 0
        assert gw.gateway.router.unusable_accounts(time.monotonic())[state.upstream.id] == "needs_reauth"
        assert gw.gateway.readiness()["ready"] is False
    finally:
        await gw.stop()


async def test_the_request_that_finds_a_grant_dead_is_answered_as_the_requests_after_it(
    tmp_path: Path, mock: MockServer
) -> None:
    """The first got a 500 "rejected the gateway's credential" with `x-should-retry: false`, the next a 529
    naming the account `needs_reauth` with a retry-after to retry in vain: one state, two answers. Both are a
    503 naming it now, not to be retried while no other account can serve: a 529 Claude Code retries whatever
    `x-should-retry` says, and then shows "Repeated 529 Overloaded errors", not which account needs a login."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-gone", "sub-gone")  # its token looks valid for hours
    mock.state.oauth.revoke("acct-gone")
    gw = await oauth_gateway(tmp_path, mock)
    try:
        answers = []
        async with gw.client() as client:
            for _ in range(2):
                with pytest.raises(anthropic.APIStatusError) as refused:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                error = refused.value
                message = error.response.json()["error"]["message"]
                answers.append((error.status_code, message, error.response.headers.get("x-should-retry")))
        assert answers[0] == answers[1]
        assert answers[0][0] == 503 and "(sub-gone: needs_reauth)" in answers[0][1] and answers[0][2] == "false"
        assert error.response.json()["error"]["type"] == "api_error" and "retry-after" not in error.response.headers
    finally:
        await gw.stop()


async def test_the_request_that_finds_a_grant_dead_gets_the_pools_wait_as_the_requests_after_it(
    tmp_path: Path, mock: MockServer
) -> None:
    """With the other account parked for hours, the request that found the grant dead was told to retry in
    5 s (naming only the dead account), the next one to come back in three hours, not to retry."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-full", "sub-full")
    add_account(config, mock, "acct-gone", "sub-gone")  # its token looks valid for hours
    mock.state.oauth.set_window("acct-full", "five_hour", status="rejected", reset_in=3 * 3600)
    gw = await oauth_gateway(tmp_path, mock)
    try:
        answers = []
        async with gw.client() as client:
            for _ in range(3):  # the full account answers its 429 once and is parked
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            mock.state.oauth.revoke("acct-gone")
            for _ in range(2):
                with pytest.raises(anthropic.APIStatusError) as refused:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                headers = refused.value.response.headers
                message = refused.value.response.json()["error"]["message"]
                # The message ends with when the first account is back, to the second.
                answers.append((refused.value.status_code, message.split(";")[0], headers.get("x-should-retry")))
                assert int(headers["retry-after"]) > 3600, headers
        assert answers[0] == answers[1], answers
        assert answers[0] == (
            529,
            "No upstream account can serve this request (sub-full: insufficient_quota, sub-gone: needs_reauth)",
            "false",
        )
    finally:
        await gw.stop()


async def test_a_rejected_five_hour_window_parks_the_account_until_its_reset(tmp_path: Path, mock: MockServer) -> None:
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-full", "sub-full")
    add_account(config, mock, "acct-spare", "sub-spare")
    mock.state.oauth.set_window("acct-full", "five_hour", status="rejected", reset_in=3600)
    gw = await oauth_gateway(tmp_path, mock, routing=RoutingConfig(strategy="round-robin", expose_trace=True))
    try:
        async with gw.client() as client:
            for _ in range(6):
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                assert raw.headers["x-poolgate-upstream"] == "sub-spare"
        assert oauth_requests(mock, "acct-full") <= 1  # one 429 at most, then parked
        assert "insufficient_quota" in raw.headers["x-poolgate-route"]
    finally:
        await gw.stop()
    # What it learnt is saved at shutdown (not only every few seconds): a restart right away keeps it parked.
    seen = oauth_requests(mock, "acct-full")
    again = await oauth_gateway(tmp_path, mock, routing=RoutingConfig(strategy="round-robin"))
    try:
        async with again.client() as client:
            for _ in range(4):
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                assert raw.headers["x-poolgate-upstream"] == "sub-spare"
        assert oauth_requests(mock, "acct-full") == seen
    finally:
        await again.stop()


async def test_an_upstream_given_the_id_of_a_removed_used_up_subscription_account_serves_at_once(
    tmp_path: Path, mock: MockServer
) -> None:
    """`upstreams remove` then `upstreams add` (README's way to replace an account) left the removed account's
    quota picture in the store, and the API key stored under its id was held out as `insufficient_quota`
    (529s) till the old subscription's reset. A picture an older build left so holds out neither an API key
    nor another subscription account given that id."""
    d = str(tmp_path)
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-gone", "sub-x")
    mock.state.oauth.set_window("acct-gone", "five_hour", status="rejected", reset_in=3600)

    async def answer() -> int:
        gw = await oauth_gateway(tmp_path, mock)
        try:
            async with gw.client() as client:
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                return raw.http_response.status_code
        except anthropic.APIStatusError as exc:
            return exc.status_code
        finally:
            await gw.stop()

    assert await answer() == 429
    engine = open_engine(config.store_url())
    left_behind = store.load_quota_pictures(engine)["sub-x"]  # saved at shutdown
    cli("upstreams", "remove", "sub-x", "--data-dir", d)
    assert "sub-x" not in store.load_quota_pictures(engine)
    cli("upstreams", "add", "sub-x", "--api-key", MOCK_KEYS[0], "--base-url", mock.url, "--data-dir", d)
    assert await answer() == 200
    store.save_quota_picture(engine, "sub-x", left_behind)  # as an older build's `upstreams remove` left it
    assert await answer() == 200
    cli("upstreams", "remove", "sub-x", "--data-dir", d)
    store.save_quota_picture(engine, "sub-x", left_behind)
    add_account(config, mock, "acct-new", "sub-x")
    engine.dispose()
    assert await answer() == 200


async def test_usage_figures_that_lift_a_rejection_bring_the_account_back_before_its_429s_retry_after(
    tmp_path: Path, mock: MockServer
) -> None:
    """Newer usage-endpoint figures showing the window free lifted the rejection (and `accounts list` said
    active), but the 429 that reported it had parked the account for its whole retry-after (30 min)."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-full", "sub-full")
    add_account(config, mock, "acct-spare", "sub-spare")
    mock.state.oauth.set_window("acct-full", "five_hour", status="rejected", reset_in=1800)
    gw = await oauth_gateway(tmp_path, mock, routing=RoutingConfig(strategy="round-robin"))
    try:
        async with gw.client() as client:
            for _ in range(4):
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                assert raw.headers["x-poolgate-upstream"] == "sub-spare"
            mock.state.oauth.set_window("acct-full", "five_hour", utilization=0.0)  # extra usage bought
            # Idle until its picture went stale, the account's quota is read from the usage endpoint.
            stale = time.monotonic() + gw.gateway.config.oauth.max_quota_staleness_seconds + 1
            await gw.gateway.quota_keeper.tick(stale, time.time())
            served = set()
            for _ in range(4):
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                served.add(raw.headers["x-poolgate-upstream"])
        assert "sub-full" in served
    finally:
        await gw.stop()


async def test_a_rate_limit_429_is_not_lifted_by_usage_figures(tmp_path: Path, mock: MockServer) -> None:
    """Usage figures say nothing about a rate limit: only the park a rejected window took ends with them."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-busy", "sub-busy")
    add_account(config, mock, "acct-spare", "sub-spare")
    mock.set_fault("oauth:acct-busy", Fault(status=429, retry_after=600, times=1))
    gw = await oauth_gateway(tmp_path, mock, routing=RoutingConfig(strategy="round-robin"))
    try:
        async with gw.client() as client:
            for _ in range(2):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert oauth_requests(mock, "acct-busy") == 1
            stale = time.monotonic() + gw.gateway.config.oauth.max_quota_staleness_seconds + 1
            await gw.gateway.quota_keeper.tick(stale, time.time())
            for _ in range(4):
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                assert raw.headers["x-poolgate-upstream"] == "sub-spare"
    finally:
        await gw.stop()


async def test_an_account_given_another_subscriptions_tokens_leaves_the_old_ones_used_up_quota_behind(
    tmp_path: Path, mock: MockServer
) -> None:
    """`--replace` with another subscription's tokens under the same id: the running gateway kept the old
    subscription's picture, the account parked for the hours until its rejected window's reset (529s)."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-old", "sub-a1")
    mock.state.oauth.set_window("acct-old", "five_hour", status="rejected", reset_in=3 * 3600)
    gw = await oauth_gateway(tmp_path, mock)
    try:
        async with gw.client() as client:
            for _ in range(2):  # its 429, then the gateway's own 529 while it is parked
                with pytest.raises(anthropic.APIStatusError) as refused:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert refused.value.status_code == 529 and "sub-a1: insufficient_quota" in refused.value.message
            await gw.gateway.quota_keeper.save()  # as every few seconds: the store holds the picture too
            pair = tmp_path / "pair.json"
            pair.write_text(json.dumps(mock.state.oauth.create_account("acct-new")))
            cli("accounts", "import", str(pair), "--id", "sub-a1", "--replace", "--data-dir", str(tmp_path))
            gw.gateway.reload()
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert oauth_requests(mock, "acct-new") == 1
    finally:
        await gw.stop()
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["state"] == "active" and row["label"] == "acct-new@example.com", row


async def test_subscription_accounts_serve_before_api_keys_which_take_over_when_they_are_parked(
    tmp_path: Path, mock: MockServer
) -> None:
    config = gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1])
    add_account(config, mock, "acct-first", "sub-first")
    gw = await oauth_gateway(tmp_path, mock, api_keys=MOCK_KEYS[:1])
    try:
        async with gw.client() as client:
            for _ in range(5):
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                assert raw.headers["x-poolgate-upstream"] == "sub-first"
            mock.state.oauth.set_window("acct-first", "seven_day", status="rejected", reset_in=86400)
            for _ in range(3):
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                assert raw.headers["x-poolgate-upstream"] == "up-0"
    finally:
        await gw.stop()


async def test_a_sessions_turn_failed_over_from_its_used_up_subscription_goes_to_another_before_an_api_key(
    tmp_path: Path, mock: MockServer
) -> None:
    """A continuing session's failover order was the strategy's order of the other accounts, unscored: its
    subscription account's used-up window sent the turn to the metered key configured first, although another
    subscription account was free, and the session stayed on the key, billed per token."""
    config = gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1])
    add_account(config, mock, "acct-home", "sub-home")
    add_account(config, mock, "acct-free", "sub-free")
    gw = await oauth_gateway(tmp_path, mock, api_keys=MOCK_KEYS[:1], routing=RoutingConfig(strategy="first-pick"))
    headers = {"X-Claude-Code-Session-Id": "session-sub"}
    served = []
    try:
        async with gw.client() as client:
            for turn in range(3):
                if turn == 1:
                    mock.state.oauth.set_window("acct-home", "five_hour", status="rejected", reset_in=3600)
                raw = await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, messages=user(f"turn {turn}"), extra_headers=headers
                )
                served.append(raw.headers["x-poolgate-upstream"])
    finally:
        await gw.stop()
    assert served == ["sub-home", "sub-free", "sub-free"]
    assert mock.stats.requests_by_key.get(MOCK_KEYS[0], 0) == 0


OPUS = "claude-opus-4-8"


async def test_a_used_up_opus_week_keeps_the_account_serving_other_models(tmp_path: Path, mock: MockServer) -> None:
    """A subscription whose weekly Opus window was used up answers every request with `7d_opus-status:
    rejected` (and, when it binds, the aggregate `rejected`), Sonnet ones it serves included: the whole account
    was parked until the week's reset, its Sonnet and Haiku quota left unused and their requests billed to the
    metered key (or, without one, refused with a 529 for days). Only Opus requests go elsewhere now."""
    config = gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1])
    add_account(config, mock, "acct-opus", "sub-opus")
    mock.state.oauth.set_window("acct-opus", "seven_day_opus", status="rejected", reset_in=3 * 86400)
    gw = await oauth_gateway(tmp_path, mock, api_keys=MOCK_KEYS[:1])
    served = []
    try:
        async with gw.client() as client:
            for model in (MODEL, MODEL, OPUS, MODEL, OPUS, "claude-haiku-4-5"):
                raw = await client.messages.with_raw_response.create(model=model, max_tokens=8, messages=user())
                assert raw.http_response.status_code == 200
                served.append((model, raw.headers["x-poolgate-upstream"]))
    finally:
        await gw.stop()
    assert served == [
        (MODEL, "sub-opus"),
        (MODEL, "sub-opus"),
        (OPUS, "up-0"),  # known used up from the Sonnet answers' headers: not even tried
        (MODEL, "sub-opus"),
        (OPUS, "up-0"),
        ("claude-haiku-4-5", "sub-opus"),
    ]
    assert mock.stats.requests_by_key.get(MOCK_KEYS[0], 0) == 2
    # Without a metered key, an Opus request is told when the week resets; the others are served.
    alone = await oauth_gateway(tmp_path, mock)
    try:
        async with alone.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=OPUS, max_tokens=8, messages=user())
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await alone.stop()
    assert refused.value.status_code == 529 and "(sub-opus: insufficient_quota); the first" in refused.value.message
    assert int(refused.value.response.headers["retry-after"]) > 2 * 86400
    # `accounts list` says so, and not that the account is parked.
    listing = cli("accounts", "list", "--data-dir", str(tmp_path), env={"COLUMNS": "250"})
    assert "opus: 100% rejected · resets" in listing and "parked" not in listing
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["state"] == "active" and row["quota"]["windows"]["seven_day_opus"]["status"] == "rejected"


async def test_an_opus_week_lifted_early_serves_opus_again_once_an_answer_says_so(tmp_path: Path) -> None:
    """Answers carrying every window: the Opus 429 holds Opus requests out till the week's reset (days).
    The week is then lifted (a plan upgrade, extra usage bought) and the next Sonnet answer says `7d_opus`
    `allowed`: the hold stood regardless, and Opus went elsewhere (or got 529s) till the old reset, no Opus
    request reaching the account to be told otherwise."""
    served, first = await serve_with_opus_week_used_up(tmp_path, "every_window", (OPUS, MODEL, LIFT, MODEL, OPUS))
    assert served == [(OPUS, "sub-spare"), (MODEL, "sub-first"), (MODEL, "sub-first"), (OPUS, "sub-first")]
    assert first == {OPUS: 2, MODEL: 2}


# In the models `serve_with_opus_week_used_up` requests: the first account's Opus week is lifted here.
LIFT = "lift the Opus week"


async def serve_with_opus_week_used_up(
    tmp_path: Path, unified_headers: UnifiedHeaders, models: tuple[str, ...]
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """`models` requested in turn from two subscription accounts, the first one preferred (first-pick) and
    its Opus week used up (until a `LIFT` among them), answering with the mock's `unified_headers`: where each
    went, and what the first one saw of them by model."""
    oauth = MockOAuthConfig(unified_headers=unified_headers)
    mock = await start_mock(MockConfig(keys={}, oauth=oauth), host="127.0.0.1", port=0)
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-first", "sub-first")
    add_account(config, mock, "acct-spare", "sub-spare")
    mock.state.oauth.set_window("acct-first", "seven_day_opus", status="rejected", reset_in=3 * 86400)
    gw = await oauth_gateway(tmp_path, mock, routing=RoutingConfig(strategy="first-pick"))
    served = []
    try:
        async with gw.client() as client:
            for model in models:
                if model == LIFT:
                    mock.state.oauth.set_window("acct-first", "seven_day_opus", utilization=0.0)
                    continue
                raw = await client.messages.with_raw_response.create(model=model, max_tokens=8, messages=user())
                served.append((model, raw.headers["x-poolgate-upstream"]))
    finally:
        await gw.stop()
        await mock.stop()
    return served, mock.state.oauth.accounts["acct-first"].requests_by_model


async def test_an_opus_rejection_told_by_the_aggregate_alone_outlives_the_sonnet_answers_after_it(
    tmp_path: Path,
) -> None:
    """An account whose Opus week is used up, answering with the aggregate headers alone: its Opus 429 says
    `rejected` (claim `seven_day_opus`, no per-window status), its Sonnet answers `allowed`. Each Sonnet answer
    replaced the rejection, and the next Opus request went to the account again for another 429 (failed over,
    so only latency for the client, and a useless request upstream), once after every Sonnet answer."""
    models = (OPUS, MODEL, OPUS, MODEL, OPUS, "claude-opus-4-6", MODEL, OPUS)
    served, first = await serve_with_opus_week_used_up(tmp_path, "aggregate", models)
    assert first == {OPUS: 1, MODEL: 3}, first
    assert [upstream for model, upstream in served if model == MODEL] == ["sub-first"] * 3
    assert [upstream for model, upstream in served if model != MODEL] == ["sub-spare"] * 5
    # `accounts list` tells of it as of a used-up Opus week, and not that the account is parked.
    listing = cli("accounts", "list", "--data-dir", str(tmp_path), env={"COLUMNS": "250"})
    assert "opus: rejected · resets" in listing and "parked" not in listing


async def test_an_opus_rejection_naming_no_window_parks_the_whole_account(tmp_path: Path) -> None:
    """Without a representative claim, the 429 does not say which window is used up (the 5-hour one would
    refuse every model): the account is parked for its retry-after, Sonnet requests going elsewhere too."""
    served, first = await serve_with_opus_week_used_up(tmp_path, "status", (OPUS, MODEL, OPUS, MODEL))
    assert first == {OPUS: 1}, first
    assert {upstream for _, upstream in served} == {"sub-spare"}


def test_oauth_credentials_never_print_tokens() -> None:
    credentials = OAuthCredentials("sk-ant-oat01-secret", "sk-ant-ort01-secret", None)
    assert "secret" not in repr(credentials) and "secret" not in str(credentials)


async def test_a_warm_up_starts_an_idle_accounts_five_hour_window_once(tmp_path: Path, mock: MockServer) -> None:
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-w", "sub-w")
    add_account(config, mock, "acct-x", "sub-x")
    a_minute_ago = datetime.fromtimestamp(time.time() - 60, UTC).strftime("%H:%M")
    oauth = oauth_config(mock).model_copy(update={"warmup_at": (a_minute_ago,), "warmup_accounts": ("sub-w",)})
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), oauth=oauth))
    try:
        keeper = gw.gateway.quota_keeper
        await keeper.tick(time.monotonic(), time.time())
        await keeper.tick(time.monotonic(), time.time())  # the window runs now: no second warm-up
        assert oauth_requests(mock, "acct-w") == 1 and oauth_requests(mock, "acct-x") == 0
        body = orjson.loads(mock.stats.last_request_body)
        assert body["max_tokens"] == 1 and body["model"] == oauth.warmup_model
        rows = await usage_rows(gw)
        assert [(row["endpoint"], row["upstream_id"], row["status"]) for row in rows] == [("warmup", "sub-w", 200)]
    finally:
        await gw.stop()


async def test_warm_ups_day_after_day_keep_one_slot_per_account(tmp_path: Path, mock: MockServer) -> None:
    """The keeper remembers the slot each account was warmed up for last, not every slot it ever was: one
    entry per account and configured time a day used to stay for as long as the gateway ran."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-w", "sub-w")
    oauth = oauth_config(mock).model_copy(update={"warmup_at": ("06:00",)})
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), oauth=oauth))
    try:
        keeper = gw.gateway.quota_keeper
        # Days to come: the 5-hour window each warm-up starts (now, at the mock) has ended by the next one.
        tomorrow = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=2)
        for day in range(5):
            wall = (tomorrow + timedelta(days=day, hours=6, minutes=1)).timestamp()
            await keeper.tick(time.monotonic(), wall)
            await keeper.tick(time.monotonic(), wall + 60)  # the same slot: no second warm-up
        assert oauth_requests(mock, "acct-w") == 5
        assert len(keeper._warmed) == 1
    finally:
        await gw.stop()


def test_warm_up_slots_follow_the_configured_times_and_skip_a_running_window() -> None:
    config = OAuthConfig(warmup_at=("07:00", "23:30"))
    day = datetime(2026, 11, 25, tzinfo=UTC).timestamp()
    assert warmup_slot(config, "a", None, day + 6 * 3600) is None
    assert warmup_slot(config, "a", None, day + 7 * 3600 + 60) == day + 7 * 3600
    assert warmup_slot(config, "a", None, day + 12 * 3600 + 1) is None  # more than five hours later
    assert warmup_slot(config, "a", None, day + 3600) == day - 1800  # yesterday's 23:30
    running = parse_unified_headers(
        {
            "anthropic-ratelimit-unified-5h-reset": str(int(day + 9 * 3600)),
            "anthropic-ratelimit-unified-5h-utilization": "0.1",
        },
        0.0,
        day + 7 * 3600,
    )
    assert running is not None and warmup_slot(config, "a", running, day + 7 * 3600 + 60) is None


async def test_logging_in_the_same_subscription_again_finds_its_account_instead_of_adding_one(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two accounts of one subscription would revoke each other's tokens (each login rotates the grant):
    a second login is refused with the account it already is, and `--replace` gives that one the tokens."""
    pkce = PkcePair("v" * 64, s256_challenge("v" * 64))
    monkeypatch.setattr(accounts_cli, "new_pkce", lambda: pkce)
    monkeypatch.setattr(accounts_cli, "new_state", lambda: "fixed-state")
    config = oauth_config(mock)
    env = {"POOLGATE__OAUTH__TOKEN_URL": config.token_url, "POOLGATE__OAUTH__AUTHORIZE_URL": config.authorize_url}

    async def login(*extra: str) -> Any:
        url = authorize_url(config, pkce, "fixed-state") + "&account=acct-twice"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            pasted = await response.text()
        args = ["accounts", "login", "--base-url", mock.url, "--data-dir", str(tmp_path), *extra]
        return await asyncio.to_thread(runner.invoke, cli_app, args, input=pasted + "\n", env=env)

    first = await login()
    assert first.exit_code == 0, first.output
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    for extra in ((), ("--id", "another")):
        again = await login(*extra)
        assert again.exit_code != 0 and f"already account {row['id']!r}" in again.output
        # The refused login's exchange rotated the subscription's tokens: the account has the live ones now
        # (it kept the ones the exchange had killed, and needed a login of its own at its next refresh).
        assert stored_refresh_token(tmp_path, row["id"]) == mock.state.oauth.accounts["acct-twice"].refresh_token
    assert [r["id"] for r in json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))] == [row["id"]]
    replaced = await login("--replace")
    assert replaced.exit_code == 0, replaced.output
    [after] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert after["id"] == row["id"] and after["label"] == "acct-twice@example.com"


async def login_as(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch, account: str, *args: str
) -> tuple[Any, str]:
    """`accounts login ARGS` with the code of a browser login as mock `account` pasted: (result, pasted)."""
    pkce = PkcePair("v" * 64, s256_challenge("v" * 64))
    monkeypatch.setattr(accounts_cli, "new_pkce", lambda: pkce)
    monkeypatch.setattr(accounts_cli, "new_state", lambda: "fixed-state")
    config = oauth_config(mock)
    async with aiohttp.ClientSession() as session:
        url = authorize_url(config, pkce, "fixed-state") + f"&account={account}"
        async with session.get(url) as response:
            pasted = await response.text()
    env = {"POOLGATE__OAUTH__TOKEN_URL": config.token_url, "POOLGATE__OAUTH__AUTHORIZE_URL": config.authorize_url}
    result = await asyncio.to_thread(runner.invoke, cli_app, ["accounts", "login", *args], input=pasted + "\n", env=env)
    return result, pasted


def stored_refresh_token(data_dir: Path, upstream_id: str) -> str | None:
    engine = open_engine(f"sqlite:///{data_dir / 'poolgate.db'}")
    try:
        credentials = store.load_oauth_credentials(engine, SecretBox(load_master_key(data_dir)), upstream_id)
    finally:
        engine.dispose()
    return credentials.refresh_token if credentials is not None else None


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        (("--id", "sub bob", "--replace"), "--id: letters, digits"),
        (("--id", "cfg-key", "--replace"), "'cfg-key' is an upstream of the config file"),
        (("--id", "sub-bob"), "'sub-bob' already exists (--replace to re-authenticate it)"),
        (("--id", "sub-bob", "--replace", "--base-url", "ftp://bob"), "--base-url"),
    ],
)
async def test_a_login_the_store_would_refuse_is_refused_before_it_rotates_the_subscriptions_tokens(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], refusal: str
) -> None:
    """`--id`, `--base-url` and the config file's ids were checked after the code exchange, which rotates the
    subscription's tokens: a typo in a re-login's --id threw the new pair away, and the stored account's
    refresh token was dead (`needs_reauth` at its next refresh)."""
    config_file = tmp_path / "poolgate.yaml"
    config_file.write_text(
        f"data_dir: {tmp_path}\nupstreams:\n  - {{id: cfg-key, base_url: '{mock.url}', api_key: sk-ant-api03-cfg}}\n"
    )
    live = add_account(gateway_config(tmp_path, mock.url, keys=()), mock, "acct-bob", "sub-bob")
    base_url = () if "--base-url" in args else ("--base-url", mock.url)
    result, _ = await login_as(tmp_path, mock, monkeypatch, "acct-bob", *args, *base_url, "--config", str(config_file))
    assert result.exit_code != 0 and refusal in result.output, result.output
    assert "/oauth/authorize" not in result.output  # refused before the login
    assert mock.stats.oauth_token_calls_by_grant == {}
    assert stored_refresh_token(tmp_path, "sub-bob") == live


async def test_a_login_the_busy_store_cannot_take_leaves_its_tokens_in_a_private_file_to_import(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store was busy after the code exchange: the new tokens were lost, and the re-logged account's stored
    refresh token was dead (rotated by the exchange)."""
    monkeypatch.setattr(db, "BUSY_TIMEOUT_SECONDS", 0.05)
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-bob", "sub-bob")
    stopped = await start_gateway(config)  # a gateway has opened the store (and recorded its key check)
    await stopped.stop()
    args = ("--id", "sub-bob", "--replace", "--base-url", mock.url, "--data-dir", str(tmp_path))
    holder = sqlite3.connect(tmp_path / "poolgate.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # a gateway writing, for longer than the busy timeout
        result, _ = await login_as(tmp_path, mock, monkeypatch, "acct-bob", *args)
    finally:
        holder.close()
    assert result.exit_code != 0 and "it is busy" in result.output, result.output
    [saved] = tmp_path.glob("login-tokens-*.json")
    assert str(saved) in result.output.replace("\n", "") and saved.stat().st_mode & 0o777 == 0o600
    live = mock.state.oauth.accounts["acct-bob"].refresh_token
    assert stored_refresh_token(tmp_path, "sub-bob") != live  # the exchange rotated it
    cli("accounts", "import", str(saved), "--id", "sub-bob", "--replace", "--data-dir", str(tmp_path))
    assert stored_refresh_token(tmp_path, "sub-bob") == live
    [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
    assert row["label"] == "acct-bob@example.com" and row["state"] == "active"


async def test_a_login_with_standard_input_closed_says_what_it_waited_for_and_what_to_do_instead(
    tmp_path: Path, mock: MockServer
) -> None:
    """`poolgate accounts login </dev/null` (a script, CI) printed click's bare "Aborted.": nothing said a
    code was expected, nor that `accounts import` is the way without a terminal."""
    env = {**os.environ, "POOLGATE__OAUTH__TOKEN_URL": oauth_config(mock).token_url}
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "poolgate"),
        *("accounts", "login", "--base-url", mock.url, "--data-dir", str(tmp_path)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 1, stderr
    assert b"/oauth/authorize" in stdout
    [error] = [line for line in stderr.decode().splitlines() if line.startswith("error:")]
    assert error.startswith("error: no code was pasted (standard input ended)"), stderr
    assert "code#state" in error and "poolgate accounts import FILE" in error and "--access-token-env" in error
    assert "Aborted" not in stderr.decode()
    assert mock.stats.oauth_token_calls_by_grant == {}


async def test_a_subscription_account_removed_while_a_request_waits_for_its_refresh_fails_the_request_over(
    tmp_path: Path, mock: MockServer
) -> None:
    """The account goes (`poolgate upstreams remove`, reloaded) while its token refresh is in flight: the
    request waiting for that refresh goes to the next account instead of ending as if its client had left."""
    from poolgate.store import repo

    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-gone", "sub-gone", expires_in=-60)
    gw = await oauth_gateway(tmp_path, mock, api_keys=MOCK_KEYS[:1])
    try:
        mock.state.oauth.token_delay_seconds = 0.5
        async with gw.client() as client:
            answer = asyncio.create_task(
                client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            )
            for _ in range(1000):  # the request waits for the subscription account's refresh (a bounded wait)
                if mock.stats.oauth_token_calls:
                    break
                await asyncio.sleep(0.01)
            assert mock.stats.oauth_token_calls == 1
            repo.remove_upstream(gw.gateway.engine, "sub-gone")
            gw.gateway.reload()
            raw = await asyncio.wait_for(answer, 10)
        assert raw.headers["x-poolgate-upstream"] == "up-0"
    finally:
        await gw.stop()


@pytest.mark.one_window
async def test_requests_in_flight_on_a_removed_subscription_account_are_priced_as_its_subscription(
    tmp_path: Path, mock: MockServer
) -> None:
    """`accounts remove` (reloaded) while requests were in flight on the account: they were priced at metered
    API prices (the account's flat-fee channel had left the book), a cost in the ledger and on budgets."""
    from poolgate.store import repo

    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-x", "sub-x")
    gw = await oauth_gateway(tmp_path, mock)
    try:
        mock.set_fault("oauth:acct-x", Fault(ttfb_ms=500))
        async with gw.client() as client:
            answer = asyncio.create_task(
                client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            )
            for _ in range(1000):  # the request is with the account (a bounded wait)
                if oauth_requests(mock, "acct-x"):
                    break
                await asyncio.sleep(0.01)
            assert oauth_requests(mock, "acct-x") == 1
            repo.remove_upstream(gw.gateway.engine, "sub-x")
            gw.gateway.reload()
            raw = await asyncio.wait_for(answer, 10)
        assert raw.headers["x-poolgate-upstream"] == "sub-x"
        [row] = await usage_rows(gw)
        assert row["upstream_id"] == "sub-x" and row["status"] == 200
        assert row["cost_micro_usd"] == 0 and row["pricing_version"] == "flat_fee"
    finally:
        await gw.stop()


def test_accounts_list_shows_the_config_files_subscription_accounts_too(tmp_path: Path) -> None:
    """A setup token in the config file served, but `accounts list` said there were no subscription accounts."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path}\n"
        "upstreams: [{id: cc-setup, kind: anthropic_oauth, api_key: '${SETUP_TOKEN_UNSET_HERE}'}]\n"
    )
    cli("keys", "create", "someone", "--config", str(config), "--raw")  # a store, so that nothing says there is none
    listed = runner.invoke(cli_app, ["accounts", "list", "--config", str(config)])
    assert listed.exit_code == 0 and "cc-setup" in listed.output and "long-lived (config file)" in listed.output
    assert "no subscription accounts yet" not in listed.output
    [row] = json.loads(cli("accounts", "list", "--json", "--config", str(config)))
    assert {k: row[k] for k in ("id", "source", "state", "enabled", "parked_until")} == {
        "id": "cc-setup",
        "source": "config file",
        "state": "active",
        "enabled": True,
        "parked_until": None,
    }
    # A gateway saw its 5-hour window rejected and saved the picture: parked, as a stored account would be
    # (it was listed as active, with no quota, while the gateway answered 529 insufficient_quota).
    reset = int(time.time() + 3600)
    picture = parse_unified_headers(
        {
            "anthropic-ratelimit-unified-status": "rejected",
            "anthropic-ratelimit-unified-5h-status": "rejected",
            "anthropic-ratelimit-unified-5h-utilization": "1.0",
            "anthropic-ratelimit-unified-5h-reset": str(reset),
        },
        time.monotonic(),
        time.time(),
    )
    assert picture is not None
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    store.save_quota_picture(engine, "cc-setup", picture)
    engine.dispose()
    [row] = json.loads(cli("accounts", "list", "--json", "--config", str(config)))
    assert row["state"] == "parked" and row["parked_until"] == reset and row["state_reason"] == "insufficient_quota"
    listed = runner.invoke(cli_app, ["accounts", "list", "--config", str(config)])
    assert "parked" in listed.output and "100% rejected" in listed.output


async def test_a_refresh_that_failed_for_good_has_its_reason_stored_before_its_requests_are_let_go(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The requests waiting on a refresh were let go at its failed attempt, before the account's state was
    stored: `accounts list` read right after showed no reason (a CI run failed on it)."""

    async def unavailable(request: web.Request) -> web.Response:
        return web.json_response({"error": "temporarily_unavailable"}, status=503)

    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-s", "sub-s", expires_in=-60)
    async with token_endpoint(unavailable) as token_url:
        oauth = oauth_config(mock).model_copy(update={"token_url": token_url, "refresh_retries": 0})
        gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), oauth=oauth))
        store_of = gw.gateway.signer.tokens.store
        assert store_of is not None
        set_state = store_of.set_state

        async def slow_set_state(*args: Any) -> None:  # a busy store
            await asyncio.sleep(0.3)
            await set_state(*args)

        monkeypatch.setattr(store_of, "set_state", slow_set_state)
        try:
            with pytest.raises(RefreshUnavailable):
                await gw.gateway.signer.prepare("sub-s")
            [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
        finally:
            await gw.stop()
    assert "temporarily_unavailable" in (row["state_reason"] or ""), row


async def test_a_token_endpoint_quoting_the_refresh_token_in_its_error_never_stores_or_shows_it(
    tmp_path: Path, mock: MockServer
) -> None:
    """A token endpoint (or a proxy before it) that quotes the refresh token it was sent in its error
    (`error_description`) had it kept in plain text in the store's `state_reason` and shown by `accounts list`
    while the grant was still alive (a 503 says nothing about the grant), as for a dead one (`invalid_grant`)."""
    seen: list[str] = []

    async def quoting(request: web.Request) -> web.Response:
        presented = (await request.json())["refresh_token"]
        seen.append(presented)
        status, error = (400, "invalid_grant") if len(seen) > 1 else (503, "temporarily_unavailable")
        return web.json_response({"error": error, "error_description": f"no refresh for {presented}"}, status=status)

    config = gateway_config(tmp_path, mock.url, keys=())
    refresh_token = add_account(config, mock, "acct-q", "sub-q", expires_in=-60)
    async with token_endpoint(quoting) as token_url:
        oauth = oauth_config(mock).model_copy(update={"token_url": token_url, "refresh_retries": 0})
        gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), oauth=oauth))
        try:
            for expected in (RefreshUnavailable, NeedsReauth):
                with pytest.raises(expected) as raised:
                    await gw.gateway.signer.prepare("sub-q")
                assert refresh_token not in str(raised.value)
                [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
                assert "[redacted]" in row["state_reason"] and refresh_token not in row["state_reason"]
                assert refresh_token not in cli("accounts", "list", "--data-dir", str(tmp_path))
                await asyncio.sleep(0.1)  # past the backoff: the next prepare calls the token endpoint again
        finally:
            await gw.stop()
    assert seen == [refresh_token, refresh_token]
    with sqlite3.connect(tmp_path / "poolgate.db") as db_file:
        reasons = [str(reason) for (reason,) in db_file.execute("SELECT state_reason FROM oauth_accounts")]
    assert reasons and not any(refresh_token in reason for reason in reasons)


async def test_a_token_endpoint_answer_too_malformed_to_read_never_stores_or_shows_the_refresh_token_it_quotes(
    tmp_path: Path, mock: MockServer
) -> None:
    """An answer aiohttp cannot read is quoted in what it raises (a header line too long: its first 100 bytes):
    a token endpoint (or a proxy before it) echoing the refresh token there had it kept in plain text in the
    store's `state_reason` and shown by `accounts list`, as one quoting it in its error's JSON did before."""

    async def echoing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))[15:])
        presented = orjson.loads(await reader.readexactly(length))["refresh_token"].encode()
        writer.write(b"HTTP/1.1 503 Unavailable\r\nx-echo: " + presented + b" " + b"a" * 9000 + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    endpoint = await asyncio.start_server(echoing, "127.0.0.1", 0)
    token_url = f"http://127.0.0.1:{endpoint.sockets[0].getsockname()[1]}/v1/oauth/token"
    config = gateway_config(tmp_path, mock.url, keys=())
    refresh_token = add_account(config, mock, "acct-e", "sub-e", expires_in=-60)
    oauth = oauth_config(mock).model_copy(update={"token_url": token_url, "refresh_retries": 0})
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), oauth=oauth))
    try:
        with pytest.raises(RefreshUnavailable) as raised:
            await gw.gateway.signer.prepare("sub-e")
        assert "unreachable" in str(raised.value) and refresh_token not in str(raised.value)
        [row] = json.loads(cli("accounts", "list", "--json", "--data-dir", str(tmp_path)))
        assert "[redacted]" in row["state_reason"] and refresh_token not in row["state_reason"]
    finally:
        await gw.stop()
        endpoint.close()


async def test_a_token_endpoint_answer_that_never_ends_is_read_no_further_than_a_mib(
    tmp_path: Path, mock: MockServer
) -> None:
    """A token endpoint's answer was read whole for `oauth.request_timeout_seconds` (30 s): one that never
    ended filled the gateway's memory meanwhile. Read up to a cap, it is a failed refresh, retried."""
    runner, url, written = await endless_upstream(b'{"access_token": "', "application/json", b"x")
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-e", "sub-e", expires_in=-60)
    # A back-off longer than the test: read after the answer's end is waited for, one of `oauth_config`'s
    # 0.01 s had run out now and then on a busy machine, and the account was rightly back in routing.
    update = {"token_url": f"{url}/v1/oauth/token", "refresh_retries": 0, "refresh_backoff_seconds": 60}
    oauth = oauth_config(mock).model_copy(update=update)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), oauth=oauth))
    try:
        with pytest.raises(RefreshUnavailable, match="with over 1 MiB"):
            await gw.gateway.signer.prepare("sub-e")
        assert await written_when_read(written) < 64
        assert gw.gateway.signer.unusable_reason("sub-e") == "refresh_failing"
    finally:
        await gw.stop()
        await runner.cleanup()


async def test_a_token_endpoint_that_cannot_be_reached_is_said_why(tmp_path: Path, mock: MockServer) -> None:
    """`unreachable: ClientConnectorError` was all a failed refresh (logged, and kept as the account's state)
    said: a refused connection, a name that does not resolve, an untrusted certificate read alike."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-u", "sub-u", expires_in=-60)
    update = {
        "token_url": f"http://127.0.0.1:{port}/v1/oauth/token",
        "refresh_retries": 0,
        "refresh_backoff_seconds": 60,
    }
    gw = await start_gateway(
        gateway_config(tmp_path, mock.url, keys=(), oauth=oauth_config(mock).model_copy(update=update))
    )
    try:
        with pytest.raises(
            RefreshUnavailable, match=rf"unreachable: ClientConnectorError: Cannot connect to host 127\.0\.0\.1:{port}"
        ):
            await gw.gateway.signer.prepare("sub-u")
    finally:
        await gw.stop()
    # One that says nothing is its class alone ("unreachable: TimeoutError", not "TimeoutError: ").
    assert failure(TimeoutError()) == "TimeoutError"


async def test_a_gateway_started_with_an_account_that_needs_a_new_login_says_so(
    tmp_path: Path, mock: MockServer
) -> None:
    """The store keeps `needs_reauth`, and a gateway starts with the account out of routing: its log said so once,
    maybe days before, and `serve` and `config check` showed nothing amiss (every request a 503, its only
    account an enabled one)."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-n", "sub-n")
    engine = open_engine(config.store_url())
    store.set_oauth_state(engine, "sub-n", "needs_reauth", "refresh failed: invalid_grant")
    engine.dispose()
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path)}))
    checked = runner.invoke(cli_app, ["config", "check", str(path)])
    assert checked.exit_code == 0 and "warning: subscription account sub-n needs a new login" in checked.output
    process, _ = await start_serve(path, dict(os.environ))
    try:
        assert process.stderr is not None
        said = b""
        while b"needs a new login" not in said:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, said
            said += line
        assert b"warning: subscription account sub-n needs a new login" in said
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)


async def test_rotated_tokens_the_busy_store_refused_are_saved_once_it_takes_them(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pair a refresh brought while the store was busy past its timeout (three tries) was kept in memory, for
    good: the stored refresh token was spent, and the next start found the account needing a new login. It is
    saved at the next bookkeeping tick the store takes it, or at shutdown."""
    config = gateway_config(tmp_path, mock.url, keys=())
    add_account(config, mock, "acct-b", "sub-b", expires_in=-60)
    busy = True
    save = store.save_oauth_credentials

    def busy_save(*args: Any) -> None:
        if busy:
            raise sqlite3.OperationalError("database is locked")
        save(*args)

    monkeypatch.setattr(store, "save_oauth_credentials", busy_save)
    gw = await oauth_gateway(tmp_path, mock)
    try:
        await gw.gateway.signer.prepare("sub-b")  # refreshed: the new pair is in memory only
        live = mock.state.oauth.accounts["acct-b"].refresh_token
        assert stored_refresh_token(tmp_path, "sub-b") != live
        busy = False
        await gw.gateway.quota_keeper.tick(time.monotonic(), time.time())
        assert stored_refresh_token(tmp_path, "sub-b") == live
        busy = True
        account = gw.gateway.signer.tokens.get("sub-b")
        assert account is not None  # another rotation the store refuses: its token rejected by an upstream
        assert await gw.gateway.signer.tokens.refresh_after_401("sub-b", account.generation)
        live = mock.state.oauth.accounts["acct-b"].refresh_token
        assert stored_refresh_token(tmp_path, "sub-b") != live
        busy = False
    finally:
        await gw.stop()
    assert stored_refresh_token(tmp_path, "sub-b") == live

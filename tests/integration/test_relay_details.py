"""Relay details real clients and operators depend on, through the HTTP surface: a rejected upstream key,
header hygiene, the attempt bound, the session inside `metadata.user_id`, the model list of a mixed pool,
the mock's fault injection from its admin API and its config, and the master key from the environment."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import aiohttp
import anthropic
import orjson
import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from sqlalchemy import select
from yarl import URL

from poolgate.app import build_app
from poolgate.config import RoutingConfig, UpstreamConfig
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.usage import JSON_CAP
from poolgate.mock import Fault, MockConfig, MockKey, MockServer, start_mock
from poolgate.store import repo
from poolgate.store.crypto import MASTER_KEY_ENV, MASTER_KEY_FILE, SecretBox, SecretBoxError, load_master_key
from poolgate.store.db import meta, open_engine, usage
from poolgate.upstreams import models as models_module
from poolgate.upstreams.health import park
from tests import claude_code
from tests.conftest import (
    MOCK_KEYS,
    MODEL,
    RunningGateway,
    gateway_config,
    serve_upstream,
    start_gateway,
    usage_rows,
    user,
)
from tests.integration.test_mock_fidelity import assert_limits_read_as_the_api
from tests.integration.test_request_heads import cap_send_buffers, message_request, small_window_client


async def test_an_upstream_that_rejects_its_key_is_skipped_and_never_reported_as_the_callers_401(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick"))
    gw = await start_gateway(config)
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=401))
        async with gw.client() as client:
            served = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            assert served.headers["x-poolgate-upstream"] == "up-1"
            for key in MOCK_KEYS:
                mock.set_fault(key, Fault(status=401))
            with pytest.raises(anthropic.InternalServerError) as failed:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert "rejected the gateway's credential" in str(failed.value)
        # Under which of the account's request ids (what Anthropic's support asks of a rejected key).
        assert failed.value.response.headers["x-poolgate-upstream-request-id"].startswith("req_")
        # The account the answer names is the one its usage record names (the first rejection named another).
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            recorded = conn.execute(select(usage.c.upstream_id).order_by(usage.c.started_at.desc())).scalars().first()
        assert failed.value.response.headers["x-poolgate-upstream"] == recorded
        # Retrying cannot help until the operator acts: Claude Code retried it ten times (three minutes).
        assert failed.value.response.headers["x-should-retry"] == "false"
        # Each rejection counts towards the account's health (three in a row make it unhealthy).
        assert gw.gateway.pool.get("up-0").health.consecutive_failures == 2  # type: ignore[union-attr]
        # The operator has to act: every rejection names its account in the log.
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        for upstream_id in ("up-0", "up-1", "up-2"):
            assert f"upstream {upstream_id} rejected the gateway's credential (HTTP 401)" in warned
        # Rejections make the accounts unhealthy (three in a row): out until the operator acts, not for a
        # while, so the next requests are not retryable either (they were, from the fourth on).
        async with gw.client() as client:
            for _ in range(4):
                with pytest.raises(anthropic.APIStatusError) as again:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                assert again.value.response.headers.get("x-should-retry") == "false", again.value
    finally:
        await gw.stop()


async def test_an_account_whose_stored_key_holds_a_control_character_is_failed_over_from_and_counted(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A key stored with its file's newline (before `upstreams add` stripped it) made every request routed to
    its account a 500 "Internal error in the gateway" with a traceback: no failover, the account never
    unhealthy. It is that account's failure, as a rejected key is: the next account answers, the log names
    the account (never the key), and with no other account the client is told why, not to retry."""
    secret = MOCK_KEYS[0] + "\n"
    config = gateway_config(tmp_path, mock.url, keys=(), routing=RoutingConfig(strategy="first-pick"))
    gw = await start_gateway(config)
    try:
        for upstream_id, key in (("newline", secret), ("good", MOCK_KEYS[1])):
            repo.add_upstream(
                gw.gateway.engine, gw.gateway.box, Upstream(upstream_id, "anthropic_api_key", mock.url), key
            )
        gw.gateway.reload()
        async with gw.client() as client:
            served = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            assert served.headers["x-poolgate-upstream"] == "good"
            repo.set_upstream_enabled(gw.gateway.engine, "good", False)
            gw.gateway.reload()
            with pytest.raises(anthropic.InternalServerError) as failed:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert "control character" in str(failed.value)
        assert failed.value.response.headers["x-should-retry"] == "false"
        health = gw.gateway.pool.get("newline").health  # type: ignore[union-attr]
        assert health.consecutive_failures == 2
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "newline" in r.getMessage()]
        assert len(warned) == 2 and all("control character" in line for line in warned)
        assert not [r for r in caplog.records if r.exc_info or MOCK_KEYS[0] in r.getMessage()]
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            outcomes = conn.execute(select(usage.c.outcome).order_by(usage.c.started_at)).scalars().all()
        assert outcomes == ["ok", "upstream_error"]
    finally:
        await gw.stop()


async def headers_upstream_received(gw: RunningGateway, mock: MockServer, sent: dict[str, str]) -> dict[str, str]:
    """The headers the upstream received (names in lower case) for a request sent with `sent`."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    async with aiohttp.ClientSession() as session, session.post(f"{gw.url}/v1/messages", data=body, headers=sent) as r:
        assert r.status == 200
    return {name.lower(): value for name, value in mock.stats.last_request_headers.items()}


async def test_hop_by_hop_and_caller_credentials_stay_behind(gw: RunningGateway, mock: MockServer) -> None:
    sent = {
        "x-api-key": gw.key,
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "connection": "keep-alive, x-private-hop",
        "x-private-hop": "only for the next hop",
        "keep-alive": "timeout=5",
        "te": "trailers",
        "proxy-authorization": "Basic c2VjcmV0",
        "x-claude-code-session-id": "kept",
        # The gateway's own admin credential and switches, and who the client is.
        "x-admin-token": "admintoken-0123456789abcdef",
        "x-poolgate-cost": "1",
        "x-poolgate-route": "a header of the gateway's, whichever",
        "true-client-ip": "198.51.100.7",
        "cf-connecting-ip": "198.51.100.7",
        "x-client-ip": "198.51.100.7",
        "x-forwarded-port": "443",
        "via": "1.1 edge",
    }
    received = await headers_upstream_received(gw, mock, sent)
    for gone in ("x-private-hop", "keep-alive", "te", "proxy-authorization", "x-admin-token"):
        assert gone not in received, gone
    assert not [name for name in received if name.startswith("x-poolgate-")]
    for gone in ("true-client-ip", "cf-connecting-ip", "x-client-ip", "x-forwarded-port", "via"):
        assert gone not in received, gone
    assert received.get("connection", "keep-alive").lower() == "keep-alive"  # aiohttp's own, not the caller's
    assert received["x-api-key"] in MOCK_KEYS and gw.key not in received.values()
    assert received["anthropic-version"] == "2023-06-01" and received["x-claude-code-session-id"] == "kept"


async def test_headers_that_stay_behind_stay_behind_also_written_with_underscores(
    gw: RunningGateway, mock: MockServer
) -> None:
    """CGI-style servers (WSGI, Rack, PHP, nginx with `underscores_in_headers on`) read `x_api_key` as
    `x-api-key`: an upstream behind such a proxy took the caller's `x_api_key` for the account's credential,
    and `x_forwarded_for` for the client's address, which the gateway never passes on."""
    sent = {
        "x-api-key": gw.key,
        "content-type": "application/json",
        "x_api_key": gw.key,
        "x_forwarded_for": "198.51.100.7",
        "x_real_ip": "198.51.100.7",
        "x_admin_token": "admintoken-0123456789abcdef",
        "x_poolgate_route": "a header of the gateway's",
        "x_custom_header": "kept",
    }
    received = await headers_upstream_received(gw, mock, sent)
    for gone in ("x_api_key", "x_forwarded_for", "x_real_ip", "x_admin_token", "x_poolgate_route"):
        assert gone not in received, gone
    assert gw.key not in received.values()
    assert received["x_custom_header"] == "kept"


async def test_a_callers_proxy_header_stays_behind(gw: RunningGateway, mock: MockServer) -> None:
    """httpoxy: a CGI-style server reads a `Proxy` header as `HTTP_PROXY`, which its HTTP clients take for the
    proxy to send their own requests through. An Anthropic-compatible proxy of that kind used as base_url would
    send the account's key on, through the caller's proxy."""
    sent = {"x-api-key": gw.key, "content-type": "application/json", "proxy": "http://198.51.100.7:3128"}
    received = await headers_upstream_received(gw, mock, sent)
    assert "proxy" not in received


async def test_what_an_authenticating_proxy_in_front_adds_stays_behind(gw: RunningGateway, mock: MockServer) -> None:
    """`x-forwarded-*` stayed behind only as the client-address headers listed (`-for`, `-host`, …): behind an
    authenticating proxy (oauth2-proxy, or nginx's `auth_request` passing on its `x-auth-request-*`), the
    user's name, e-mail and access token reached the upstream."""
    sent = {
        "x-api-key": gw.key,
        "content-type": "application/json",
        "x-forwarded-user": "alice",
        "x-forwarded-email": "alice@example.com",
        "x-forwarded-access-token": "ya29.a-users-own-token",
        "x_forwarded_groups": "admins",
        "x-auth-request-access-token": "ya29.a-users-own-token",
        "x-forwardedness": "kept",
    }
    received = await headers_upstream_received(gw, mock, sent)
    assert not [name for name in received if name.replace("_", "-").startswith(("x-forwarded-", "x-auth-request-"))]
    assert received["x-forwardedness"] == "kept"


async def test_a_header_value_outside_ascii_reaches_the_upstream_as_the_client_sent_it(
    gw: RunningGateway, mock: MockServer
) -> None:
    """A UTF-8 value (`curl -H 'x-user: José'`; aiohttp sends these bytes too) went upstream double-encoded,
    `JosÃ©`; one a client wrote in latin-1 goes as the UTF-8 of its characters (aiohttp writes only UTF-8)."""
    sent = {"x-api-key": gw.key, "content-type": "application/json", "x-user": "José ✓"}
    received = await headers_upstream_received(gw, mock, sent)
    assert received["x-user"] == "José ✓"


async def refused_by_every_account(gw: RunningGateway, mock: MockServer, fault: Fault) -> anthropic.APIStatusError:
    """The error a request gets when every mock key answers with `fault`."""
    for key in MOCK_KEYS:
        mock.set_fault(key, fault)
    async with gw.client() as client:
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    return refused.value


async def test_max_attempts_bounds_how_many_accounts_a_request_tries(tmp_path: Path, mock: MockServer) -> None:
    config = gateway_config(tmp_path, mock.url, routing=RoutingConfig(max_attempts=2))
    gw = await start_gateway(config)
    try:
        overloaded = await refused_by_every_account(gw, mock, Fault(status=529))
        assert overloaded.status_code == 529
        assert mock.stats.requests_total == 2
    finally:
        await gw.stop()


@pytest.mark.parametrize(
    "user_id",
    [
        '{"device_id": "d1", "account_uuid": "", "session_id": "4f1c2b7e-session"}',
        "user_0123abcd_account__session_4f1c2b7e-session",
    ],
)
async def test_the_session_inside_metadata_user_id_is_the_requests_session(gw: RunningGateway, user_id: str) -> None:
    async with gw.client() as client:
        answered = await client.messages.with_raw_response.create(
            model=MODEL, max_tokens=8, messages=user(), metadata={"user_id": user_id}
        )
    await gw.gateway.flush_usage()
    with gw.gateway.engine.connect() as conn:
        session = conn.execute(
            select(usage.c.session_id).where(usage.c.request_id == answered.headers["request-id"])
        ).scalar_one()
    assert session == "4f1c2b7e-session"


async def test_models_are_the_union_of_the_pools_lists_cut_to_each_upstreams_globs(tmp_path: Path) -> None:
    first = await start_mock(MockConfig(keys={"sk-first": MockKey()}, models=("claude-sonnet-5", "claude-haiku-4-5")))
    second = await start_mock(MockConfig(keys={"sk-second": MockKey()}, models=("claude-opus-4-1", "claude-sonnet-9")))
    upstreams = (
        UpstreamConfig(id="first", base_url=first.url, api_key="sk-first"),
        UpstreamConfig(id="second", base_url=second.url, api_key="sk-second", models=("claude-opus-*",)),
    )
    gw = await start_gateway(gateway_config(tmp_path, first.url, upstreams=upstreams))
    try:
        async with gw.client() as client:
            listed = await client.models.list()
        assert sorted(model.id for model in listed.data) == ["claude-haiku-4-5", "claude-opus-4-1", "claude-sonnet-5"]
    finally:
        await gw.stop()
        await first.stop()
        await second.stop()


async def test_the_mock_takes_faults_from_its_config_and_its_admin_api() -> None:
    mock = await start_mock(MockConfig(keys={"sk-faulty": MockKey(fault=Fault(status=529, times=1))}))
    headers = {"x-api-key": "sk-faulty", "anthropic-version": "2023-06-01", "content-type": "application/json"}
    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    try:
        async with aiohttp.ClientSession() as session:

            async def status() -> tuple[int, str | None]:
                async with session.post(f"{mock.url}/v1/messages", data=body, headers=headers) as response:
                    return response.status, response.headers.get("retry-after")

            assert await status() == (529, None)  # from the config, once
            assert await status() == (200, None)
            fault = {"status": 429, "retry_after": 3, "times": 1}
            async with session.post(f"{mock.url}/_mock/faults/sk-faulty", json=fault) as response:
                assert response.status == 200
            assert await status() == (429, "3")
            async with session.post(f"{mock.url}/_mock/faults/sk-faulty", json={"status": 500}) as response:
                assert response.status == 200
            async with session.delete(f"{mock.url}/_mock/faults") as response:
                assert response.status == 200
            assert await status() == (200, None)
            async with session.post(f"{mock.url}/_mock/faults/sk-faulty", json={"status": "bad"}) as response:
                assert response.status == 400
    finally:
        await mock.stop()


def test_the_master_key_can_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set POOLGATE_MASTER_KEY (a secret manager's) and no key file is written; secrets stored with it need
    it to be read back."""
    key = Fernet.generate_key()
    monkeypatch.setenv(MASTER_KEY_ENV, key.decode())
    assert load_master_key(tmp_path) == key and not (tmp_path / MASTER_KEY_FILE).exists()
    stored = SecretBox(load_master_key(tmp_path)).encrypt("sk-ant-api03-secret")
    monkeypatch.delenv(MASTER_KEY_ENV)
    generated = load_master_key(tmp_path)
    assert generated != key and (tmp_path / MASTER_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert SecretBox(key).decrypt(stored) == "sk-ant-api03-secret"


def test_a_gateway_names_a_lost_or_damaged_key_file_and_makes_no_new_key_for_stored_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `master.key` gone, the gateway wrote a new one (which can never read the stored secrets) and then
    blamed a "different" key; a damaged file was reported as an invalid POOLGATE_MASTER_KEY (unset), whose
    advice, generate a new key, loses every stored secret."""
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    config = gateway_config(tmp_path, "http://127.0.0.1:9", keys=())
    engine = open_engine(config.store_url())
    repo.add_upstream(
        engine, SecretBox(load_master_key(tmp_path)), Upstream("stored", "anthropic_api_key", "http://u"), "sk-ant-x"
    )
    key_file = tmp_path / MASTER_KEY_FILE
    key = key_file.read_bytes()
    key_file.unlink()
    with pytest.raises(SecretBoxError, match="holds encrypted secrets but there is no master key"):
        build_app(config, engine)
    assert not key_file.exists()
    key_file.write_bytes(b"garbage\n")
    with pytest.raises(SecretBoxError, match=f"{key_file} is not a valid master key") as refused:
        build_app(config, engine)
    assert MASTER_KEY_ENV not in str(refused.value)
    key_file.write_bytes(key)
    build_app(config, engine)  # the key restored: it starts


def test_a_master_key_is_made_where_the_file_system_has_no_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is linked into place once written whole; an SMB share or FUSE mount refuses hard links, and
    the first start failed there."""
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)

    def no_links(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("os.link", no_links)
    key = load_master_key(tmp_path)
    assert (tmp_path / MASTER_KEY_FILE).read_bytes().strip() == key and load_master_key(tmp_path) == key
    assert [p.name for p in tmp_path.iterdir()] == [MASTER_KEY_FILE]  # nothing else left behind


async def test_a_compressed_answer_from_an_upstream_that_ignores_identity_is_relayed_whole(tmp_path: Path) -> None:
    """The gateway asks upstreams for `identity`; one that gzips anyway is decompressed, its usage read and
    the client given the plain body with a true length."""
    mock = await start_mock(MockConfig(keys={"sk-gzip": MockKey()}, compress="always"))
    upstreams = (UpstreamConfig(id="gzip", base_url=mock.url, api_key="sk-gzip"),)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
        sent = {"x-api-key": gw.key, "content-type": "application/json", "accept-encoding": "gzip, br"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.post(f"{gw.url}/v1/messages", data=body, headers=sent) as response,
        ):
            raw = await response.read()
            assert response.status == 200 and "content-encoding" not in response.headers
            assert int(response.headers.get("content-length", len(raw))) == len(raw)
        answer = orjson.loads(raw)
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            [row] = conn.execute(select(usage.c.output_tokens, usage.c.input_tokens)).all()
        assert answer["type"] == "message" and row.output_tokens == answer["usage"]["output_tokens"] > 0
    finally:
        await gw.stop()
        await mock.stop()


async def test_a_429_without_retry_after_parks_its_account_until_the_announced_reset(
    tmp_path: Path, mock: MockServer
) -> None:
    """No `retry-after`, no window at zero: the account is parked until the reset its rate-limit headers
    announce (the mock's minute window), not for a second, so it does not collect 429 after 429."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=429, times=1))
        async with gw.client() as client:
            served = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert served.headers["x-poolgate-upstream"] == "up-1"
        health = gw.gateway.pool.get("up-0").health  # type: ignore[union-attr]
        parked_for = health.parked_until - time.monotonic()
        assert 1.5 < parked_for <= 61
    finally:
        await gw.stop()


async def test_a_failing_account_that_says_when_to_come_back_is_left_alone_until_then(
    tmp_path: Path, mock: MockServer
) -> None:
    gw = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=503, retry_after=30, times=1))
        async with gw.client() as client:
            served = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert served.headers["x-poolgate-upstream"] == "up-1"
        state = gw.gateway.pool.get("up-0")
        assert state is not None and 25 < state.health.parked_until - time.monotonic() <= 30
        # Said as what it is (it was "rate_limited", as for a 429).
        assert gw.gateway.router.unusable_accounts(time.monotonic())[state.upstream.id] == "parked"
    finally:
        await gw.stop()


async def test_each_account_keeps_its_latency_and_its_time_to_first_byte(gw: RunningGateway, mock: MockServer) -> None:
    """For a stream the two differ (the answer arrives over time); both are running averages per account."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(tokens_per_second=400))
    async with gw.client() as client, client.messages.stream(model=MODEL, max_tokens=16, messages=user()) as stream:
        await stream.get_final_message()
    [stats] = [state.stats for state in gw.gateway.pool.states() if state.stats.requests]
    assert stats.ttfb_ms is not None and stats.latency_ms is not None
    assert stats.latency_ms > stats.ttfb_ms + 10  # 16 tokens at 400 a second: ~40 ms after the headers


async def test_the_gateways_own_requests_skip_an_account_out_of_a_rate_limit_window(
    gw: RunningGateway, mock: MockServer
) -> None:
    """A warm-up (or cache keepalive) is not sent where the account's last answer said a window is used up."""
    state = gw.gateway.pool.get("up-0")
    assert state is not None
    state.ratelimited_until = time.monotonic() + 30
    assert await gw.gateway.internal.warm_up("up-0") is False and mock.stats.requests_total == 0
    state.ratelimited_until = 0.0
    assert await gw.gateway.internal.warm_up("up-0") is True and mock.stats.requests_total == 1


async def broken_upstream(answer: bytes) -> tuple[asyncio.Server, str]:
    """A misbehaving upstream the mock cannot play: reads a request, writes `answer` raw, hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
            0,
        )
        await reader.readexactly(length)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_an_upstream_errors_details_reach_the_client_without_the_accounts_key(
    tmp_path: Path, mock: MockServer
) -> None:
    """The API says what went wrong in `error.details.error_code` where the type is as wide as a 404, and the SDKs
    branch on it (`error.error_code`): the anthropic SDK's tool runner recovers a message thread the account no
    longer holds on `thread_not_found` by sending the whole conversation again. The gateway passed on the type and
    the message only, and the runner failed with the 404."""
    key = "sk-thread-account-0123456789"
    details = {"error_code": "thread_not_found", "seen_with": key}
    body = orjson.dumps(
        {"type": "error", "error": {"type": "not_found_error", "message": "No thread", "details": details}}
    )
    head = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    server, url = await broken_upstream(head + body)
    gw = await start_gateway(
        gateway_config(tmp_path, mock.url, upstreams=(UpstreamConfig(id="threads", base_url=url, api_key=key),))
    )
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.NotFoundError) as error:
                await client.messages.create(model=MODEL, max_tokens=16, messages=user())
        assert error.value.error_code == "thread_not_found"  # type: ignore[attr-defined]
        told = error.value.body["error"]["details"]  # type: ignore[index]
        assert told == {"error_code": "thread_not_found", "seen_with": "[redacted]"}
    finally:
        await gw.stop()
        server.close()


def before_the_mock(upstream_id: str, url: str, mock: MockServer) -> tuple[UpstreamConfig, UpstreamConfig]:
    """An account at `url` and, after it, one on the mock (the order first-pick tries them in)."""
    return (
        UpstreamConfig(id=upstream_id, base_url=url, api_key=f"sk-{upstream_id}"),
        UpstreamConfig(id="api", base_url=mock.url, api_key=MOCK_KEYS[0]),
    )


async def first_pick(tmp_path: Path, mock: MockServer, upstreams: tuple[UpstreamConfig, ...]) -> RunningGateway:
    return await start_gateway(
        gateway_config(tmp_path, mock.url, upstreams=upstreams, routing=RoutingConfig(strategy="first-pick"))
    )


def answer_of(status: int, extra_headers: bytes = b"", body: bytes = b"", media_type: bytes = b"text/html") -> bytes:
    """An HTTP answer as a server writes it, for `broken_upstream`."""
    head = b"HTTP/1.1 %d Status\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (status, media_type, len(body))
    return head + extra_headers + b"\r\n" + body


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\nnot json at all",
        b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{"ok": true}',
        # A proxy carrying an error in a 200 (quoting the key, here): it reached the client as a success.
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 71\r\n\r\n"
        b'{"type":"error","error":{"type":"authentication_error","message":"no"}}',
        # Python's http.server, a static site: the method is not one they serve (the API takes it).
        answer_of(501, body=b"<p>Error code: 501</p><p>Message: Unsupported method ('POST').</p>"),
        answer_of(405, body=b"<h1>405 Not Allowed</h1>"),
    ],
)
async def test_an_answer_that_is_no_api_answer_is_failed_over_from_not_relayed(
    tmp_path: Path, mock: MockServer, answer: bytes
) -> None:
    """A web server at a wrong base_url answers 200 to anything: relayed to the client as a success, recorded
    `ok` and free, and the account stayed in the pool. A page refusing the method (501, 405) was relayed as the
    upstream's server error, which Claude Code retried for minutes, or as the client's own error."""
    server, url = await broken_upstream(answer)
    upstreams = before_the_mock("elsewhere", url, mock)
    gw = await first_pick(tmp_path, mock, upstreams)
    alone = await start_gateway(gateway_config(tmp_path / "alone", mock.url, upstreams=upstreams[:1]))
    try:
        async with gw.client() as client:
            for stream in (False, True):
                raw = await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, messages=user(), stream=stream
                )
                assert raw.headers["x-poolgate-upstream"] == "api"
        elsewhere = gw.gateway.pool.get("elsewhere")
        assert elsewhere is not None and not elsewhere.health.healthy
        async with alone.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert refused.value.status_code == 502 and "base_url is misconfigured" in refused.value.message
            # Every account is misconfigured: no retry helps (Claude Code retried such a 502 for minutes).
            assert refused.value.response.headers["x-should-retry"] == "false"
            # Unhealthy for it since: not tried again, panic mode or not (no wait cures it), the operator's 503.
            for call in (
                client.messages.create(model=MODEL, max_tokens=8, messages=user()),
                client.messages.count_tokens(model=MODEL, messages=user()),  # no token count either
            ):
                with pytest.raises(anthropic.APIStatusError) as refused:
                    await call
                assert refused.value.status_code == 503 and "elsewhere: misconfigured base_url" in refused.value.message
                assert refused.value.response.headers["x-should-retry"] == "false"
        rows = await usage_rows(alone)
        assert [row["status"] for row in rows[:2]] == [502, 503]
    finally:
        await gw.stop()
        await alone.stop()
        server.close()


PROXY_407 = b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic\r\ncontent-length: 0\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        # A proxy on the way to the API asking for credentials of its own.
        PROXY_407,
        # A web server's page where the API should be, and a proxy's refusal of a body it finds too large.
        b"HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\ncontent-length: 22\r\n\r\n<h1>404 Not Found</h1>",
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: text/html\r\ncontent-length: 13\r\n\r\n<h1>413</h1>\n",
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 23\r\n\r\n"
        b'{"message":"no route"}\n',
    ],
    ids=["407", "html-404", "html-413", "json-400-not-an-api-error"],
)
async def test_a_4xx_that_is_no_api_error_is_failed_over_not_the_clients(
    tmp_path: Path, mock: MockServer, answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """An intermediary's 407 or page was relayed as the client's own error (`invalid_request_error`
    "Upstream answered HTTP 407", recorded `client_error`), with no failover although another account would
    serve, and nothing logged. A 407 takes the account out (it cannot serve until the proxy is given
    credentials); a page does not (a request too large for a proxy every account sits behind must not take the
    pool out): it counts in the account's error rate, and with no other account the client gets it."""
    server, url = await broken_upstream(answer)
    upstreams = before_the_mock("behind-proxy", url, mock)
    gw = await first_pick(tmp_path, mock, upstreams)
    alone = await start_gateway(gateway_config(tmp_path / "alone", mock.url, upstreams=upstreams[:1]))
    status = int(answer.split()[1])
    try:
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.headers["x-poolgate-upstream"] == "api"
        behind_proxy = gw.gateway.pool.get("behind-proxy")
        assert behind_proxy is not None and behind_proxy.health.healthy is (answer != PROXY_407)
        assert behind_proxy.stats.error_rate(time.monotonic()) > 0
        assert f"upstream behind-proxy answered HTTP {status}" in caplog.text
        async with alone.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        if answer == PROXY_407:
            assert refused.value.status_code == 502 and "base_url is misconfigured" in refused.value.message
        else:
            assert refused.value.status_code == status
        assert refused.value.response.headers["x-poolgate-upstream"] == "behind-proxy"
        [row] = await usage_rows(alone)
        assert (row["status"], row["outcome"]) == (refused.value.status_code, "upstream_error")
    finally:
        await gw.stop()
        await alone.stop()
        server.close()


async def test_an_api_error_about_the_request_is_still_the_clients(tmp_path: Path, mock: MockServer) -> None:
    """Only an answer that is no API error is the path's: the API's own 4xx about the request is relayed as
    it said, with no failover and the account left as it was."""
    error = b'{"type":"error","error":{"type":"not_found_error","message":"model: claude-nope"}}'
    server, url = await broken_upstream(answer_of(404, body=error, media_type=b"application/json"))
    upstreams = before_the_mock("first", url, mock)
    gw = await first_pick(tmp_path, mock, upstreams)
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.NotFoundError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert "model: claude-nope" in refused.value.message
        assert refused.value.response.headers["x-poolgate-upstream"] == "first"
        first = gw.gateway.pool.get("first")
        assert first is not None and first.health.healthy and first.health.consecutive_failures == 0
    finally:
        await gw.stop()
        server.close()


ECHOED_KEY = "sk-ant-api03-echoed-in-headers"
# An answer of each kind the client gets an upstream's headers with: a message, a stream, an API error.
_ECHOED_ANSWERS = {
    "message": (200, "application/json", orjson.dumps({"type": "message", "usage": {"input_tokens": 1}})),
    "stream": (
        200,
        "text/event-stream",
        b"event: message_start\ndata: "
        + orjson.dumps({"type": "message_start", "message": {"model": MODEL, "usage": {"input_tokens": 1}}})
        + b'\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n',
    ),
    "error": (400, "application/json", b'{"type":"error","error":{"type":"invalid_request_error","message":"no"}}'),
}


@pytest.mark.parametrize("kind", list(_ECHOED_ANSWERS))
async def test_an_upstream_quoting_its_key_in_the_headers_passed_on_does_not_hand_it_to_the_client(
    tmp_path: Path, kind: str
) -> None:
    """A proxy used as a base_url may put the key it was sent in its request id or its retry advice, the
    upstream headers every answer passes on (`x-poolgate-upstream-request-id`, `retry-after`,
    `x-should-retry`): each went to the caller as it came, the account's key with it, where the same key in
    the body was hidden."""
    status, media_type, body = _ECHOED_ANSWERS[kind]

    async def answer(request: web.Request) -> web.Response:
        key = request.headers["x-api-key"]
        echoed = {"request-id": f"req_{key}", "retry-after": key, "x-should-retry": key}
        return web.Response(status=status, body=body, headers={"content-type": media_type, **echoed})

    app = web.Application()
    app.router.add_post("/v1/messages", answer)
    runner, url = await serve_upstream(app)
    gw = await start_gateway(gateway_config(tmp_path, url, keys=(ECHOED_KEY,)))
    try:
        async with aiohttp.ClientSession() as session:
            request = {"model": MODEL, "max_tokens": 8, "messages": user(), "stream": kind == "stream"}
            async with session.post(f"{gw.url}/v1/messages", json=request, headers={"x-api-key": gw.key}) as sent:
                await sent.read()
        assert sent.status == status
        assert sent.headers["x-poolgate-upstream-request-id"] == "req_[redacted]"
        assert not [value for value in sent.headers.values() if ECHOED_KEY in value]
    finally:
        await gw.stop()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        # What aiohttp says of an answer it cannot read quotes it (a header line too long, a malformed status).
        (b"HTTP/1.1 200 OK\r\nx-echo: sk-echoing " + b"a" * 9000 + b"\r\n\r\n", "upstream echoing gave no answer"),
        (b"HTTP/1.1 2OO sk-echoing\r\ncontent-length: 0\r\n\r\n", "upstream echoing gave no answer"),
        # The warning for an account whose base_url is not the API's quotes the header that says where it leads
        # (a redirect's location, a proxy's realm, the server's name, the request id) or the answer's media type.
        (answer_of(302, b"location: https://elsewhere/?key=sk-echoing\r\n"), "upstream echoing answered"),
        (answer_of(407, b"proxy-authenticate: Basic realm=sk-echoing\r\n"), "upstream echoing answered"),
        (answer_of(405, b"server: sk-echoing\r\n"), "upstream echoing answered"),
        (
            answer_of(
                404,
                b"request-id: sk-echoing\r\n",
                b'{"type":"error","error":{"type":"not_found_error","message":"Not Found"}}',
            ),
            "upstream echoing answered",
        ),
        (answer_of(404, media_type=b"text/html; sk-echoing"), "upstream echoing answered"),
        (answer_of(200, media_type=b"text/html; sk-echoing"), "upstream echoing answered"),
    ],
)
async def test_an_answer_quoting_the_accounts_key_is_logged_without_it(
    tmp_path: Path, mock: MockServer, answer: bytes, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream that echoed the key it was sent into what the gateway's warnings quote of its answer had it
    written to the log. (The log's own redaction knows Anthropic's keys, not another provider's.)"""
    server, url = await broken_upstream(answer)
    gw = await first_pick(tmp_path, mock, before_the_mock("echoing", url, mock))
    try:
        async with gw.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert said in caplog.text
        assert "sk-echoing" not in caplog.text
        if said.endswith("answered"):  # the value quoted, less the key
            assert "[redacted]" in caplog.text
    finally:
        await gw.stop()
        server.close()


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/claude-sonnet-4-5"])
async def test_an_upstream_quoting_its_key_in_its_models_does_not_hand_it_to_the_client(
    tmp_path: Path, path: str
) -> None:
    """A proxy used as a base_url may quote the key it was sent in what it answers to the model list or the lookup
    of one model (a display name, say): both went to every caller as they came, where the same key in a Messages
    answer was hidden."""

    def model(request: web.Request, model_id: str) -> dict[str, str]:
        return {"type": "model", "id": model_id, "display_name": f"via {request.headers['x-api-key']}"}

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"data": [model(request, MODEL)], "has_more": False})

    async def lookup(request: web.Request) -> web.Response:
        return web.json_response(model(request, request.match_info["id"]))

    app = web.Application()
    app.router.add_get("/v1/models", listing)
    app.router.add_get("/v1/models/{id}", lookup)
    runner, url = await serve_upstream(app)
    gw = await start_gateway(gateway_config(tmp_path, url, keys=(ECHOED_KEY,)))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gw.url}{path}", headers={"x-api-key": gw.key}) as sent,
        ):
            answer = await sent.text()
        assert sent.status == 200
        assert ECHOED_KEY not in answer
        assert "via [redacted]" in answer
    finally:
        await gw.stop()
        await runner.cleanup()


@pytest.mark.parametrize("media_type", [b"content-type: Application/JSON\r\n", b"content-type: text/plain\r\n", b""])
async def test_a_json_answer_reaches_the_client_as_application_json_whatever_the_upstream_called_it(
    tmp_path: Path, media_type: bytes
) -> None:
    """Relayed with the upstream's own media type, the API's answer was a string to the TypeScript SDK (and
    Claude Code's), which reads a body as JSON only under a lower-case `application/json`."""
    answer = b'{"id":"msg_1","type":"message","content":[],"usage":{"input_tokens":3,"output_tokens":2}}'
    head = b"HTTP/1.1 200 OK\r\n%scontent-length: %d\r\n\r\n" % (media_type, len(answer))
    server, url = await broken_upstream(head + answer)
    gw = await start_gateway(gateway_config(tmp_path, url, keys=("sk-loose",)))
    try:
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.headers.get_list("content-type") == ["application/json"]
        assert (await raw.parse()).usage.output_tokens == 2
    finally:
        await gw.stop()
        server.close()


@pytest.mark.parametrize(
    ("media_type", "answer", "stream"),
    [
        # An upstream that ignores `stream: true`: no streaming client can read it (Claude Code: "empty or
        # malformed response").
        (b"application/json", b'{"type":"message","content":[],"usage":{"input_tokens":1,"output_tokens":1}}', True),
        # Relayed as a 200 success, the SDK handed its caller the raw events as a string.
        (b"text/event-stream", b'event: message_start\ndata: {"type":"message_start","message":{}}\n\n', False),
    ],
)
async def test_an_answer_in_the_other_form_than_asked_for_is_failed_over_from(
    tmp_path: Path, mock: MockServer, media_type: bytes, answer: bytes, stream: bool
) -> None:
    server, url = await broken_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (media_type, len(answer), answer)
    )
    upstreams = before_the_mock("other-form", url, mock)
    gw = await first_pick(tmp_path, mock, upstreams)
    try:
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, messages=user(), stream=stream
            )
        assert raw.headers["x-poolgate-upstream"] == "api"
    finally:
        await gw.stop()
        server.close()


async def test_a_json_answer_broken_off_midway_fails_over_before_the_client_gets_a_byte(
    tmp_path: Path, mock: MockServer
) -> None:
    """A JSON answer is read whole before it is relayed: an upstream that hangs up in the middle of one is a
    failure to fail over from (the client gets the next account's whole answer), not a truncated body."""
    half = b'{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"te'
    server, url = await broken_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 377\r\n\r\n" + half
    )
    upstreams = (
        UpstreamConfig(id="broken", base_url=url, api_key="sk-broken"),
        UpstreamConfig(id="up-1", base_url=mock.url, api_key=MOCK_KEYS[1]),
    )
    config = gateway_config(tmp_path, mock.url, upstreams=upstreams, routing=RoutingConfig(strategy="first-pick"))
    gw = await start_gateway(config)
    try:
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.headers["x-poolgate-upstream"] == "up-1" and (await raw.parse()).type == "message"
        assert gw.gateway.pool.get("broken").health.consecutive_failures == 1  # type: ignore[union-attr]
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            [row] = conn.execute(select(usage.c.status, usage.c.outcome, usage.c.attempts)).all()
        assert tuple(row) == (200, "ok", 2)
    finally:
        await gw.stop()
        server.close()


async def test_a_json_answer_too_large_to_relay_still_says_which_account_answered(tmp_path: Path) -> None:
    """Every answer an upstream gave names its account and upstream request id; the 502 for one over 16 MiB
    named neither, so an operator could not tell which account sent it."""
    body = b'{"type":"message","content":[{"type":"text","text":"' + b"x" * JSON_CAP + b'"}]}'
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_huge\r\ncontent-length: %d\r\n\r\n"
    server, url = await broken_upstream(head % len(body) + body)
    gw = await start_gateway(gateway_config(tmp_path, url, keys=("sk-huge",)))
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert refused.value.status_code == 502 and "exceeds 16 MiB" in refused.value.message
        headers = refused.value.response.headers
        assert (headers["x-poolgate-upstream"], headers["x-poolgate-upstream-request-id"]) == ("up-0", "req_huge")
    finally:
        await gw.stop()
        server.close()


async def test_requests_the_shutdown_cannot_wait_for_are_told_so_and_accounted(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """When the shutdown grace runs out, a stream in flight ends with an in-band `error` event and a request
    still waiting for its answer gets a 503 in Anthropic's shape; both are recorded as `interrupted`, the
    stream with the tokens it had reported. The log says so in a warning (uvicorn's own line was an ERROR,
    for the documented end of a graceful stop)."""
    from poolgate.config import ServerConfig

    config = gateway_config(tmp_path, mock.url, server=ServerConfig(shutdown_grace_seconds=0.5))
    gw = await start_gateway(config)
    mock.set_fault(MOCK_KEYS[0], Fault(tokens_per_second=2))
    mock.set_fault(MOCK_KEYS[1], Fault(ttfb_ms=5000))
    mock.set_fault(MOCK_KEYS[2], Fault(ttfb_ms=5000))
    body = {"model": MODEL, "max_tokens": 50, "messages": user()}
    headers = {"x-api-key": gw.key, "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as session:
        stream = await session.post(f"{gw.url}/v1/messages", json={**body, "stream": True}, headers=headers)
        await stream.content.readany()  # message_start has passed
        waiting = asyncio.create_task(session.post(f"{gw.url}/v1/messages", json=body, headers=headers))
        # Both with the mock before the stop begins: a request that reached the gateway only after it was
        # answered at once (shutting down, not "still running"), and one not yet connected was refused.
        await until_in_flight(mock, 2)
        await gw.stop()
        streamed = await stream.read()
        answer = await waiting
        assert answer.status == 503 and answer.headers["request-id"]
        assert (await answer.json())["error"]["type"] == "overloaded_error"
    assert b"event: error" in streamed and b"shutting down" in streamed
    with open_engine(config.store_url()).connect() as conn:
        rows = {row.stream: row for row in conn.execute(select(usage))}
    assert rows[True].outcome == rows[False].outcome == "interrupted"
    assert rows[True].status == 200 and rows[True].input_tokens > 0
    assert rows[False].status == 503
    [ended] = [r for r in caplog.records if r.name == "uvicorn.error" and "grace" in r.getMessage()]
    assert ended.levelname == "WARNING" and "ending 2 request(s) still running" in ended.getMessage()


async def test_a_stream_whose_client_takes_nothing_more_when_the_grace_ends_is_still_accounted(
    tmp_path: Path, mock: MockServer
) -> None:
    """The in-band error the end of the grace sends waits for a client whose buffers are full, and the usage
    writer was stopped meanwhile: the request left no usage record. It is accounted before its client is told."""
    from poolgate.config import ServerConfig

    config = gateway_config(tmp_path, mock.url, server=ServerConfig(shutdown_grace_seconds=0.5))
    gw = await start_gateway(config)
    mock.state.config.output_tokens = 100_000  # more than the sockets can buffer for a client that never reads
    cap_send_buffers(gw, 32 * 1024)
    _, writer = await asyncio.open_connection(sock=small_window_client(gw))
    try:
        body = orjson.dumps({"model": MODEL, "max_tokens": 100_000, "stream": True, "messages": user()})
        writer.write(message_request(gw, body))
        await writer.drain()
        for _ in range(250):  # until the answer is under way, then until it has filled what the sockets hold
            if mock.stats.in_flight:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        await gw.stop()
    finally:
        writer.close()
    with open_engine(config.store_url()).connect() as conn:
        rows = [tuple(row) for row in conn.execute(select(usage.c.status, usage.c.outcome))]
    assert rows == [(200, "interrupted")]


async def test_a_fault_in_the_gateway_is_a_500_in_anthropics_shape_and_is_accounted(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    gw.gateway.router.route = broken  # type: ignore[method-assign]
    async with gw.client() as client:
        with pytest.raises(anthropic.InternalServerError) as failed:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    assert failed.value.body["error"] == {"type": "api_error", "message": "Internal error in the gateway"}  # type: ignore[index]
    assert "a bug" not in str(failed.value.body) and "Traceback" not in str(failed.value.body)
    assert any(record.exc_info and "failed in the gateway" in record.getMessage() for record in caplog.records)
    await gw.gateway.flush_usage()
    with gw.gateway.engine.connect() as conn:
        [row] = conn.execute(select(usage.c.status, usage.c.outcome)).all()
    assert tuple(row) == (500, "gateway_error")


async def test_when_every_account_answers_429_the_record_blames_the_upstreams(tmp_path: Path, mock: MockServer) -> None:
    gw = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        for key in MOCK_KEYS:
            mock.set_fault(key, Fault(status=429, retry_after=1))
        async with gw.client() as client:
            with pytest.raises(anthropic.RateLimitError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            [row] = conn.execute(select(usage.c.status, usage.c.outcome, usage.c.attempts)).all()
        assert tuple(row) == (429, "upstream_error", 3)
    finally:
        await gw.stop()


async def test_an_upstream_header_outside_latin_1_is_passed_on_as_its_bytes(tmp_path: Path, mock: MockServer) -> None:
    answer = (
        b'{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[],'
        b'"usage":{"input_tokens":3,"output_tokens":1}}'
    )
    server, url = await broken_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_\xe2\x9c\x93\r\n"
        + b"content-length: %d\r\n\r\n" % len(answer)
        + answer
    )
    upstreams = (UpstreamConfig(id="odd", base_url=url, api_key="sk-odd"),)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.status_code == 200
        assert (b"x-poolgate-upstream-request-id", b"req_\xe2\x9c\x93") in raw.headers.raw
    finally:
        await gw.stop()
        server.close()


@asynccontextmanager
async def listing(tmp_path: Path, ids: tuple[str, ...]) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """A client of a gateway in front of one account whose model list is `ids`."""
    upstream = await start_mock(MockConfig(keys={"sk-m": MockKey()}, models=ids))
    upstreams = (UpstreamConfig(id="m", base_url=upstream.url, api_key="sk-m"),)
    gw = await start_gateway(gateway_config(tmp_path, upstream.url, upstreams=upstreams))
    try:
        async with gw.client() as client:
            yield client
    finally:
        await gw.stop()
        await upstream.stop()


async def test_the_model_list_pages_like_the_apis_and_a_model_can_be_retrieved(tmp_path: Path) -> None:
    """`limit`, `after_id` and `before_id` as the API takes them (the SDK's auto-pagination walks them),
    and `GET /v1/models/{id}` (`models.retrieve`)."""
    ids = tuple(f"claude-sonnet-4-{n}" for n in range(1, 8))
    async with listing(tmp_path, ids) as client:
        first = await client.models.list(limit=3)
        assert [m.id for m in first.data] == list(ids[:3]) and first.has_more and first.last_id == ids[2]
        walked = [model.id async for model in client.models.list(limit=2)]
        assert walked == list(ids)
        last = await client.models.list(limit=5, after_id=ids[4])
        assert [m.id for m in last.data] == list(ids[5:]) and not last.has_more
        back = await client.models.list(limit=2, before_id=ids[4])
        assert [m.id for m in back.data] == list(ids[2:4]) and back.has_more
        assert (await client.models.retrieve(ids[3])).id == ids[3]
        with pytest.raises(anthropic.NotFoundError):
            await client.models.retrieve("claude-nonexistent-9")
        with pytest.raises(anthropic.BadRequestError):
            await client.models.list(limit=0)


async def test_the_gateway_reads_a_model_list_limit_as_the_api_does(tmp_path: Path) -> None:
    """The gateway pages its own list: `int()` read "１" as 1 and "1_0" as 10 where the API answers 400."""
    ids = tuple(f"claude-sonnet-4-{n}" for n in range(1, 9))
    async with listing(tmp_path, ids) as client:
        await assert_limits_read_as_the_api(client, ids, "limit: Input should be a valid integer")


async def test_an_account_that_is_down_does_not_make_its_models_unknown_for_minutes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup no account answered was remembered as "no such model" for 5 minutes (404s while requests for
    the model were served), and a list an account did not answer for left its models out as long."""
    monkeypatch.setattr(models_module, "INCOMPLETE_SECONDS", 0.0)
    down = socket.socket()
    down.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused until the mock takes it
    opus_url = f"http://127.0.0.1:{down.getsockname()[1]}"
    sonnet = await start_mock(MockConfig(keys={"sk-s": MockKey()}, models=("claude-sonnet-5",)))
    opus: MockServer | None = None
    upstreams = (
        UpstreamConfig(id="opus", base_url=opus_url, api_key="sk-o", models=("claude-opus-*",)),
        UpstreamConfig(id="sonnet", base_url=sonnet.url, api_key="sk-s", models=("claude-sonnet-*",)),
    )
    gw = await start_gateway(gateway_config(tmp_path, sonnet.url, upstreams=upstreams))
    try:
        async with gw.client() as client:
            assert [model.id for model in (await client.models.list()).data] == ["claude-sonnet-5"]
            with pytest.raises(anthropic.APIStatusError) as unanswered:
                await client.models.retrieve("claude-opus-4-8")
            assert unanswered.value.status_code == 529 and "retry-after" in unanswered.value.response.headers
            assert "No upstream account answered" in unanswered.value.message
            opus = await start_mock(MockConfig(keys={"sk-o": MockKey()}, models=("claude-opus-5",)), sock=down)
            assert (await client.models.retrieve("claude-opus-4-8")).id == "claude-opus-4-8"
            assert sorted(model.id for model in (await client.models.list()).data) == [
                "claude-opus-5",
                "claude-sonnet-5",
            ]
    finally:
        await gw.stop()
        await sonnet.stop()
        if opus is not None:
            await opus.stop()
        down.close()


async def test_accounts_parked_by_rate_limits_still_list_their_models(gw: RunningGateway) -> None:
    """Only accounts down (cooling down after failures) are left out of the list: a pool whose accounts all
    took a 429 listed no models at all."""
    for state in gw.gateway.pool.states():
        park(state.health, time.monotonic() + 60)
    async with gw.client() as client:
        assert MODEL in [model.id for model in (await client.models.list()).data]


async def take_the_pool_down(client: anthropic.AsyncAnthropic, mock: MockServer, keys: tuple[str, ...]) -> None:
    """One request that every account answers 500: each cools down (for the config's 30 s)."""
    for key in keys:
        mock.set_fault(key, Fault(status=500, times=1))
    with pytest.raises(anthropic.InternalServerError):
        await client.messages.create(model=MODEL, max_tokens=8, messages=user())


async def test_the_model_list_of_a_pool_that_is_down_is_a_529_not_an_empty_list(
    tmp_path: Path, mock: MockServer
) -> None:
    """With every account cooling down none was asked for its list, and the gateway answered 200 with no
    models (a client reads it as "this gateway serves nothing"), kept 15 s after the pool was back."""
    keys = MOCK_KEYS[:2]
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=keys, routing=RoutingConfig(max_attempts=2)))
    try:
        async with gw.client() as client:
            await take_the_pool_down(client, mock, keys)
            with pytest.raises(anthropic.APIStatusError) as down:
                await client.models.list()
            assert down.value.status_code == 529 and down.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
            assert down.value.response.headers["retry-after"]
            # A request served (panic mode: the account due first) makes its account healthy: the list is
            # asked for at once.
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert MODEL in [model.id for model in (await client.models.list()).data]
    finally:
        await gw.stop()


async def test_a_pool_that_is_down_still_lists_the_models_it_last_listed(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models_module, "CACHE_SECONDS", 0.0)  # the list is past its time at every call
    keys = MOCK_KEYS[:2]
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=keys, routing=RoutingConfig(max_attempts=2)))
    try:
        async with gw.client() as client:
            listed = [model.id for model in (await client.models.list()).data]
            assert MODEL in listed
            await take_the_pool_down(client, mock, keys)
            assert [model.id for model in (await client.models.list()).data] == listed
            assert (await client.models.retrieve(MODEL)).id == MODEL
    finally:
        await gw.stop()


async def test_the_model_list_kept_for_a_pool_that_is_down_follows_the_accounts_it_has(
    tmp_path: Path, mock: MockServer
) -> None:
    """The list kept while no account answers is cut to what the accounts still enabled serve: with every account
    disabled, then removed, it went on listing their models while messages got "no upstream"."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=()))
    try:
        engine = gw.gateway.engine
        repo.add_upstream(engine, gw.gateway.box, Upstream("only", "anthropic_api_key", mock.url), MOCK_KEYS[0])
        gw.gateway.reload()
        async with gw.client() as client:
            assert MODEL in [model.id for model in (await client.models.list()).data]
            repo.set_upstream_enabled(engine, "only", False)
            gw.gateway.reload()
            assert (await client.models.list()).data == []
            repo.remove_upstream(engine, "only")
            gw.gateway.reload()
            assert (await client.models.list()).data == []
    finally:
        await gw.stop()


async def test_a_revoked_key_replaced_under_the_same_id_serves_at_once(tmp_path: Path, mock: MockServer) -> None:
    """`upstreams remove` and `add` of one id, to replace a key the API revoked, read by one reload: the new key
    inherited the old one's 401s and parks, and every request was refused for the old key's cooldown (a
    reload between the two commands forgot the old account). Another account it is, afresh."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=()))
    try:
        engine, box = gw.gateway.engine, gw.gateway.box
        repo.add_upstream(engine, box, Upstream("team", "anthropic_api_key", mock.url), "sk-ant-api03-revoked-key")
        gw.gateway.reload()
        async with gw.client() as client:
            for _ in range(3):  # the failures that make an account unhealthy
                with pytest.raises(anthropic.InternalServerError, match="rejected the gateway's credential"):
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            old = gw.gateway.pool.get("team")
            assert old is not None and not old.health.healthy
            repo.remove_upstream(engine, "team")
            repo.add_upstream(engine, box, Upstream("team", "anthropic_api_key", mock.url), MOCK_KEYS[0])
            gw.gateway.reload()
            served = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            assert served.headers["x-poolgate-upstream"] == "team"
            # Parked by the new key's own 429: replaced again, the third key is not held to it either.
            new = gw.gateway.pool.get("team")
            assert new is not None and new.health.healthy
            park(new.health, time.monotonic() + 600)
            repo.remove_upstream(engine, "team")
            repo.add_upstream(engine, box, Upstream("team", "anthropic_api_key", mock.url), MOCK_KEYS[1])
            gw.gateway.reload()
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            # A change that is no new credential keeps what the account learned.
            third = gw.gateway.pool.get("team")
            park(third.health, time.monotonic() + 600)  # type: ignore[union-attr]
            repo.set_upstream_enabled(engine, "team", False)
            gw.gateway.reload()
            repo.set_upstream_enabled(engine, "team", True)
            gw.gateway.reload()
            assert gw.gateway.pool.get("team") is third
            with pytest.raises(anthropic.APIStatusError, match="team: rate_limited"):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await gw.stop()


async def test_a_model_lookup_asks_the_next_account_when_one_does_not_answer(tmp_path: Path, mock: MockServer) -> None:
    down = socket.socket()
    down.bind(("127.0.0.1", 0))
    upstreams = (
        UpstreamConfig(id="down", base_url=f"http://127.0.0.1:{down.getsockname()[1]}", api_key=MOCK_KEYS[0]),
        UpstreamConfig(id="up", base_url=mock.url, api_key=MOCK_KEYS[1]),
    )
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        async with gw.client() as client:
            assert (await client.models.retrieve("claude-opus-4-8")).id == "claude-opus-4-8"  # unlisted
    finally:
        await gw.stop()
        down.close()


async def test_a_caller_cannot_turn_made_up_model_ids_into_a_flood_of_upstream_lookups(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models_module, "LOOKUPS_PER_MINUTE", 3)
    gw = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        async with gw.client() as client:
            for n in range(3):
                with pytest.raises(anthropic.NotFoundError):
                    await client.models.retrieve(f"claude-made-up-{n}")
            with pytest.raises(anthropic.RateLimitError) as refused:
                await client.models.retrieve("claude-made-up-3")
            assert int(refused.value.response.headers["retry-after"]) > 0
            # What was looked up already is answered from memory: no lookup, no refusal.
            with pytest.raises(anthropic.NotFoundError):
                await client.models.retrieve("claude-made-up-0")
        _, other = repo.create_key(gw.gateway.engine, "another-caller")
        gw.gateway.reload()
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=other, max_retries=0) as client:
            assert (await client.models.retrieve("claude-opus-4-8")).id == "claude-opus-4-8"  # its own minute
    finally:
        await gw.stop()


async def test_a_model_id_that_is_a_dot_segment_is_never_asked_of_an_account(tmp_path: Path) -> None:
    """`/v1/models/%2e%2e` is the id `..`: looked up as `/v1/models/..`, which the HTTP client resolves, it
    reached the account as `GET /v1/` with its credential (and `.` or an empty id as its model list), and
    each used up one of the caller's lookups."""
    asked: list[str] = []

    async def record(request: web.Request) -> web.Response:
        asked.append(request.path)
        if request.path == "/v1/models":
            return web.json_response({"data": [], "has_more": False, "first_id": None, "last_id": None})
        return web.json_response({"type": "error", "error": {"type": "not_found_error", "message": "-"}}, status=404)

    app = web.Application()
    app.router.add_get("/{path:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    gw = await start_gateway(
        gateway_config(tmp_path, url, upstreams=(UpstreamConfig(id="r", base_url=url, api_key="sk-r"),))
    )
    try:
        async with aiohttp.ClientSession(headers={"x-api-key": gw.key}) as session:
            for model_id in ("%2e%2e", ".", ""):
                # As written: aiohttp resolves dot segments in a URL it is given unencoded.
                async with session.get(URL(f"{gw.url}/v1/models/{model_id}", encoded=True)) as answer:
                    assert answer.status == 404 and (await answer.json())["error"]["type"] == "not_found_error"
    finally:
        await gw.stop()
        await runner.cleanup()
    assert [path for path in asked if path != "/v1/models"] == []


async def test_a_model_id_in_the_path_is_percent_decoded_once(gw: RunningGateway) -> None:
    """`%252D` is `%2D` (as any server reads it), not `-`: decoded twice, a client asking for the id
    `claude-sonnet%2D4-5` was answered with the model `claude-sonnet-4-5`."""
    async with aiohttp.ClientSession(headers={"x-api-key": gw.key}) as session:
        async with session.get(URL(f"{gw.url}/v1/models/claude-sonnet%252D4-5", encoded=True)) as answer:
            assert answer.status == 404
            assert (await answer.json())["error"]["message"] == "model: claude-sonnet%2D4-5"
        async with session.get(URL(f"{gw.url}/v1/models/claude-sonnet%2D4-5", encoded=True)) as answer:
            assert answer.status == 200 and (await answer.json())["id"] == "claude-sonnet-4-5"


@pytest.mark.parametrize(
    ("method", "path", "api"),
    [
        ("POST", "/v1/messages/batches", "the Message Batches API"),
        ("GET", "/v1/messages/batches/msgbatch_01abc", "the Message Batches API"),
        ("GET", "/v1/files", "the Files API"),
        ("POST", "/v1/complete", "the Text Completions API"),
    ],
)
async def test_an_anthropic_api_the_gateway_does_not_relay_is_named_in_its_404(
    gw: RunningGateway, method: str, path: str, api: str
) -> None:
    """ "Not found: GET /v1/messages/batches/msgbatch_01abc" read as "that batch does not exist", and "Not
    found: POST /v1/complete" (an older SDK's `completions.create`) as a gateway set up wrong."""
    async with aiohttp.ClientSession() as session, session.request(method, f"{gw.url}{path}") as response:
        assert response.status == 404
        error = (await response.json())["error"]
    assert error["type"] == "not_found_error" and f"poolgate does not serve {api}" in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/models", "GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
        ("POST", "/readyz", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
        ("GET", "/v1/messages", "POST"),
        ("PUT", "/v1/messages/count_tokens", "POST"),
    ],
)
async def test_a_wrong_method_on_a_known_path_is_a_405_saying_which_are_allowed(
    gw: RunningGateway, method: str, path: str, allowed: str
) -> None:
    async with aiohttp.ClientSession() as session, session.request(method, f"{gw.url}{path}") as response:
        assert response.status == 405 and response.headers["allow"] == allowed
        assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_the_model_list_never_follows_an_upstreams_redirect(tmp_path: Path) -> None:
    """aiohttp would send the account's x-api-key along to wherever a redirect points."""
    seen: list[bytes] = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"data":[]}')
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(elsewhere, "127.0.0.1", 0)
    where = f"http://127.0.0.1:{target.sockets[0].getsockname()[1]}/v1/models"
    redirect, url = await broken_upstream(
        b"HTTP/1.1 302 Found\r\nlocation: " + where.encode() + b"\r\ncontent-length: 0\r\n\r\n"
    )
    upstreams = (UpstreamConfig(id="moved", base_url=url, api_key="sk-ant-api03-must-stay-home"),)
    gw = await start_gateway(gateway_config(tmp_path, url, upstreams=upstreams))
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as unanswered:
                await client.models.list()
        assert unanswered.value.status_code == 529 and seen == []  # no account answered, none was followed
    finally:
        await gw.stop()
        redirect.close()
        target.close()


async def test_a_body_still_arriving_when_the_shutdown_can_wait_no_longer_is_told_so_and_accounted(
    tmp_path: Path, mock: MockServer
) -> None:
    """The cancellation reached the request while it read its body: it escaped as a traceback, a plain-text
    500 and no usage record. Now: 503 in Anthropic's shape, recorded `interrupted`."""
    from poolgate.config import ServerConfig

    config = gateway_config(tmp_path, mock.url, server=ServerConfig(shutdown_grace_seconds=0.3))
    gw = await start_gateway(config)
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\nx-api-key: %s\r\ncontent-type: application/json\r\n"
        b'content-length: 1000\r\n\r\n{"model": "' % gw.key.encode()
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    await gw.stop()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503") and b"overloaded_error" in answer
    with open_engine(config.store_url()).connect() as conn:
        [row] = list(conn.execute(select(usage)))
    assert (row.outcome, row.status) == ("interrupted", 503)


@pytest.mark.parametrize("change", ["upstreams remove", "upstreams disable"])
async def test_an_account_removed_or_disabled_while_a_request_fails_over_is_passed_over_for_the_next(
    tmp_path: Path, mock: MockServer, change: str
) -> None:
    """A request routed before a reload removed one of its candidates fails over past it (its credential is
    gone with it) to the next, without spending an attempt on it, rather than failing in the gateway. So does
    one routed before a reload disabled it: a disabled account gets no new request, and the operator who
    disabled it (an account billing too much, one being retired) found the failovers of requests in flight
    still sent there."""
    config = gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1], routing=RoutingConfig(strategy="first-pick"))
    gw = await start_gateway(config)
    try:
        for upstream_id, key in (("stored-b", MOCK_KEYS[1]), ("stored-c", MOCK_KEYS[2])):
            upstream = Upstream(upstream_id, "anthropic_api_key", mock.url)
            repo.add_upstream(gw.gateway.engine, gw.gateway.box, upstream, key)
        gw.gateway.reload()
        # The first candidate answers 529 after a while; meanwhile the second is removed.
        mock.set_fault(MOCK_KEYS[0], Fault(status=529, ttfb_ms=300, times=1))
        async with gw.client() as client:
            answer = asyncio.create_task(
                client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            )
            await until_in_flight(mock)
            if change == "upstreams remove":
                repo.remove_upstream(gw.gateway.engine, "stored-b")
            else:
                repo.set_upstream_enabled(gw.gateway.engine, "stored-b", False)
            gw.gateway.reload()
            raw = await answer
        assert raw.headers["x-poolgate-upstream"] == "stored-c"
        assert mock.stats.requests_by_key.get(MOCK_KEYS[1], 0) == 0
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            [row] = conn.execute(select(usage.c.upstream_id, usage.c.attempts)).all()
        assert tuple(row) == ("stored-c", 2)
    finally:
        await gw.stop()


async def until_in_flight(mock: MockServer, count: int = 1) -> None:
    """Until the mock holds `count` requests (routed, sent and waiting for their answers), at most 10 s (a
    busy machine's while: it only bounds a failure)."""
    for _ in range(1000):
        if mock.stats.in_flight == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{mock.stats.in_flight} requests in flight at the mock, not {count}")


async def test_an_account_removed_while_a_cached_request_runs_leaves_nothing_in_the_warm_index(
    tmp_path: Path, mock: MockServer
) -> None:
    """What the answer of a request still in flight to a removed account says was cached there stayed in the
    pool's warm index for good: nothing expires the entries of an account that takes no more requests."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=()))
    try:
        repo.add_upstream(
            gw.gateway.engine, gw.gateway.box, Upstream("stored-b", "anthropic_api_key", mock.url), MOCK_KEYS[1]
        )
        gw.gateway.reload()
        mock.set_fault(MOCK_KEYS[1], Fault(ttfb_ms=300, times=1))
        async with aiohttp.ClientSession() as session:
            answer = asyncio.create_task(
                session.post(
                    f"{gw.url}/v1/messages", data=claude_code.body(stream=False), headers=claude_code.headers(gw.key)
                )
            )
            await until_in_flight(mock)
            repo.remove_upstream(gw.gateway.engine, "stored-b")
            gw.gateway.reload()
            async with await answer as response:
                assert response.status == 200
                assert (await response.json())["usage"]["cache_creation_input_tokens"] > 0
        assert len(gw.gateway.pool.warm_index._holders) == 0  # the only account that cached anything is gone
    finally:
        await gw.stop()


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/models"])
async def test_a_fault_before_routing_is_a_500_in_anthropics_shape_too(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """A fault while authenticating (a key library's unexpected exception) reached the server, which
    answered a plain-text "Internal Server Error" that no SDK can read."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    gw.gateway.authn.authenticate = broken  # type: ignore[method-assign]
    async with gw.client() as client:
        with pytest.raises(anthropic.InternalServerError) as failed:
            if path == "/v1/models":
                await client.models.list()
            else:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    assert failed.value.body["error"] == {"type": "api_error", "message": "Internal error in the gateway"}  # type: ignore[index]
    assert failed.value.response.headers["request-id"]
    assert any(record.exc_info and "failed in the gateway" in record.getMessage() for record in caplog.records)


async def test_a_rejected_credential_does_not_hide_what_the_other_accounts_answered(
    tmp_path: Path, mock: MockServer
) -> None:
    """Two accounts overloaded and the last one's key revoked: the client got the revoked key's 500 (no
    retry-after) rather than the others' 529 with theirs; and the record said `no_upstream` for a request that
    three accounts had answered."""
    config = gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick"))
    gw = await start_gateway(config)
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=529, retry_after=2))
        mock.set_fault(MOCK_KEYS[1], Fault(status=529, retry_after=2))
        mock.set_fault(MOCK_KEYS[2], Fault(status=401))
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as failed:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        await gw.gateway.flush_usage()
        with open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}").connect() as conn:
            [row] = conn.execute(usage.select()).mappings().all()
    finally:
        await gw.stop()
    assert failed.value.status_code == 529 and failed.value.response.headers["retry-after"] == "2"
    assert row["attempts"] == 3 and row["status"] == 529 and row["outcome"] == "upstream_error"


async def test_a_rejected_credential_is_retryable_while_accounts_are_left_untried(
    tmp_path: Path, mock: MockServer
) -> None:
    """`x-should-retry: false` went with every rejected credential, also when the attempts stopped at
    `max_attempts` with accounts left: the client gave up where its retry would have been served."""
    config = gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick", max_attempts=1))
    gw = await start_gateway(config)
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=401))
        async with gw.client() as client:
            with pytest.raises(anthropic.InternalServerError) as failed:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert "x-should-retry" not in failed.value.response.headers
            assert await client.messages.create(model=MODEL, max_tokens=8, messages=user())  # the retry
    finally:
        await gw.stop()


@pytest.mark.parametrize(
    ("first", "out_as", "back_within"),
    [(Fault(status=500, times=1), "unhealthy", 30), (Fault(status=429, retry_after=5, times=1), "rate_limited", 5)],
)
@pytest.mark.parametrize(
    ("rejection", "named"), [(401, "credential rejected"), (407, "misconfigured base_url")], ids=["401", "407"]
)
async def test_a_rejected_credential_while_another_account_is_out_for_a_while_is_the_pools_529(
    tmp_path: Path,
    mock: MockServer,
    caplog: pytest.LogCaptureFixture,
    first: Fault,
    out_as: str,
    back_within: int,
    rejection: int,
    named: str,
) -> None:
    """One account cooling down after a 500 (or parked after a 429) and the only other one rejecting its key
    (or answering from a wrong base_url): the client got that account's 500 (502) with no `retry-after`, once
    with `x-should-retry: false` too, and gave up on a pool that was back seconds later. It gets the 529
    routing gives when no account can take a request: each account and why, and when the first is back."""
    keys = MOCK_KEYS[:2]
    config = gateway_config(tmp_path, mock.url, keys=keys, routing=RoutingConfig(strategy="first-pick"))
    gw = await start_gateway(config)
    try:
        mock.set_fault(keys[0], first)
        async with gw.client() as client:
            assert await client.messages.create(model=MODEL, max_tokens=8, messages=user())  # up-1 served it
            mock.set_fault(keys[1], Fault(status=rejection, times=1))
            with pytest.raises(anthropic.APIStatusError) as failed:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        headers = failed.value.response.headers
        assert failed.value.status_code == 529
        assert failed.value.body["error"] == {  # type: ignore[index]
            "type": "overloaded_error",
            "message": f"No upstream account can serve this request (up-0: {out_as}, up-1: {named})",
        }
        assert 1 <= int(headers["retry-after"]) <= back_within and headers.get("x-should-retry") != "false"
        assert headers["x-poolgate-upstream"] == "up-1"
        # Still the operator's to fix: the log names the account, and the answer counts against its health.
        assert any(r.levelname == "WARNING" and "upstream up-1 " in r.getMessage() for r in caplog.records)
        assert gw.gateway.pool.get("up-1").health.consecutive_failures == 1  # type: ignore[union-attr]
    finally:
        await gw.stop()


async def test_a_429_that_said_nothing_tells_the_client_when_the_first_account_is_back(
    tmp_path: Path, mock: MockServer
) -> None:
    """Every account answered 429 without `retry-after`: the client got none either, and backed off blindly,
    although the gateway had parked each account until a known time."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        refused = await refused_by_every_account(gw, mock, Fault(status=429))
        assert refused.status_code == 429 and all(state.health.parked_until for state in gw.gateway.pool.states())
        retry_after = int(refused.response.headers["retry-after"])
        assert 1 <= retry_after <= 60 and refused.response.headers.get("x-should-retry") != "false"
    finally:
        await gw.stop()


@pytest.mark.parametrize("status", [429, 529])
async def test_a_429_or_529_after_failover_tells_the_client_when_the_first_account_is_back(
    tmp_path: Path, mock: MockServer, status: int
) -> None:
    """Three accounts answered 429 (or 529) with `retry-after` 3, 40 and 20: the client was told the last one's
    20 s, although the first was back after 3."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    try:
        for key, wait in zip(MOCK_KEYS, (3, 40, 20), strict=True):
            mock.set_fault(key, Fault(status=status, retry_after=wait, times=1))
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert refused.value.status_code == status
        assert 1 <= int(refused.value.response.headers["retry-after"]) <= 3
    finally:
        await gw.stop()


@pytest.mark.parametrize("status", [429, 529, 503])
async def test_a_retry_after_given_as_an_http_date_is_waited_for_as_one_in_seconds(tmp_path: Path, status: int) -> None:
    """RFC 9110 allows an HTTP-date, which CDNs and proxies send: it was read as none, so a 429 parked its
    account for a second and told the client to retry after 1, and a 529 or 503 parked nothing."""
    back_at = format_datetime(datetime.now(UTC) + timedelta(seconds=40), usegmt=True).encode()
    error = b'{"type":"error","error":{"type":"api_error","message":"later"}}'
    server, url = await broken_upstream(
        answer_of(status, b"retry-after: %s\r\n" % back_at, error, media_type=b"application/json")
    )
    gw = await start_gateway(gateway_config(tmp_path, url, keys=("sk-dated",)))
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert refused.value.status_code == status
        assert 30 <= int(refused.value.response.headers["retry-after"]) <= 40
        state = gw.gateway.pool.get("up-0")
        assert state is not None and 30 < state.health.parked_until - time.monotonic() <= 40
    finally:
        await gw.stop()
        server.close()


@pytest.mark.parametrize(("ahead", "held"), [(timedelta(seconds=30), True), (timedelta(days=365 * 70), False)])
async def test_a_used_up_window_is_waited_for_until_its_reset_unless_the_reset_is_beyond_belief(
    tmp_path: Path, ahead: timedelta, held: bool
) -> None:
    """A window reported used up holds its account out until its `-reset`. One of year 2099 did so until then
    (nothing asked the account again to hear better): every request a 529 with `retry-after: 2274402699`,
    until a restart. Beyond a week (what a `retry-after` may say) a reset is taken as none known."""
    reset = (datetime.now(UTC) + ahead).strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    body = orjson.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 1},
        }
    )
    window = b"anthropic-ratelimit-requests-limit: 50\r\nanthropic-ratelimit-requests-remaining: 0\r\n"
    answer = answer_of(200, window + b"anthropic-ratelimit-requests-reset: %s\r\n" % reset, body, b"application/json")
    server, url = await broken_upstream(answer)
    gw = await start_gateway(gateway_config(tmp_path, url, keys=("sk-used-up",)))
    try:
        async with gw.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            if held:
                with pytest.raises(anthropic.APIStatusError) as refused:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                assert refused.value.status_code == 529
                assert 1 <= int(refused.value.response.headers["retry-after"]) <= 30
            else:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await gw.stop()
        server.close()


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, 30), (429, None), (529, 30), (503, 30)], ids=["429", "429-silent", "529", "503"]
)
async def test_an_error_with_an_account_left_untried_tells_the_client_to_retry_soon(
    tmp_path: Path, mock: MockServer, status: int, retry_after: int | None
) -> None:
    """The attempts stopped at `max_attempts` with an account untried and usable: the client was told to wait
    for the last account tried (or, when it said nothing, told nothing), and its retry was served at once."""
    routing = RoutingConfig(strategy="first-pick", max_attempts=2)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    try:
        for key in MOCK_KEYS[:2]:
            mock.set_fault(key, Fault(status=status, retry_after=retry_after, times=1))
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert refused.value.status_code == status
            retry = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert refused.value.response.headers["retry-after"] == str(routing.no_upstream_retry_after_seconds)
        assert retry.headers["x-poolgate-upstream"] == "up-2"
    finally:
        await gw.stop()


def test_the_first_key_a_store_is_opened_with_is_the_one_every_process_must_bring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway whose key comes from POOLGATE_MASTER_KEY and whose upstreams are in its config file left a
    store with no secret to check a key against: a CLI command without the variable made a new key file and
    stored a secret no gateway could read. The store now keeps a value encrypted with its key from the start."""
    key = Fernet.generate_key()
    monkeypatch.setenv(MASTER_KEY_ENV, key.decode())
    config = gateway_config(tmp_path, "http://127.0.0.1:9", keys=("sk-ant-api03-configured",))
    engine = open_engine(config.store_url())
    build_app(config, engine)
    monkeypatch.delenv(MASTER_KEY_ENV)
    with pytest.raises(SecretBoxError, match="there is no master key"):
        repo.store_box(engine, tmp_path)
    assert not (tmp_path / MASTER_KEY_FILE).exists()
    monkeypatch.setenv(MASTER_KEY_ENV, Fernet.generate_key().decode())
    with pytest.raises(SecretBoxError, match="master key differs"):
        repo.store_box(engine, tmp_path)
    monkeypatch.setenv(MASTER_KEY_ENV, key.decode())
    repo.store_box(engine, tmp_path)  # the store's own key: opened


def test_of_two_processes_opening_a_new_store_at_once_with_different_keys_the_second_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each found no check value and recorded its own; the one whose insert lost went on with a key the
    store's check value was not made with."""
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    first = SecretBox(Fernet.generate_key())
    opened = repo.open_box

    def while_the_other_records_its_own(data_dir: Path, stored: bytes | None) -> SecretBox:
        box = opened(data_dir, stored)
        with engine.begin() as conn:
            conn.execute(meta.insert().values(key=repo.KEY_CHECK, value=first.encrypt(repo.KEY_CHECK_TEXT).decode()))
        return box

    monkeypatch.setattr(repo, "open_box", while_the_other_records_its_own)
    monkeypatch.setenv(MASTER_KEY_ENV, Fernet.generate_key().decode())
    with pytest.raises(SecretBoxError, match="master key differs"):
        repo.store_box(engine, tmp_path)


async def test_a_stored_upstream_no_key_can_read_is_left_out_and_the_rest_of_a_reload_is_taken(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One upstream stored with another master key made every reload fail: keys revoked since still got
    200s until a restart (which then refused to start)."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1]))
    try:
        other = SecretBox(Fernet.generate_key())
        repo.add_upstream(gw.gateway.engine, other, Upstream("foreign", "anthropic_api_key", mock.url), MOCK_KEYS[1])
        repo.revoke_key(gw.gateway.engine, repo.list_keys(gw.gateway.engine)[0].id)
        async with gw.client() as client:
            for _ in range(100):  # the reload runs every 0.2 s here
                try:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                except anthropic.AuthenticationError:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the revoked key was still accepted")
        assert gw.gateway.pool.get("foreign") is None and gw.gateway.pool.get("up-0") is not None
        assert any("foreign is left out" in r.getMessage() for r in caplog.records)
    finally:
        await gw.stop()


async def test_a_stream_sent_before_its_account_went_out_does_not_bring_it_back(
    tmp_path: Path, mock: MockServer
) -> None:
    """Thirty streams breaking mid-way on one account: each first event that came after the account had gone
    out made it healthy again, and the next break began a new, longer episode (75 s for one burst). Here a
    stream slow to begin is sent before a server error takes its account out: its first event is no probe."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1]))
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(ttfb_ms=500, tokens_per_second=5, times=1))
        async with gw.client() as client:

            async def first_event_then_leave() -> None:
                async with client.messages.stream(model=MODEL, max_tokens=64, messages=user()) as stream:
                    await anext(aiter(stream))

            slow = asyncio.ensure_future(first_event_then_leave())
            await until_in_flight(mock)
            mock.set_fault(MOCK_KEYS[0], Fault(status=500, times=1))
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            health = gw.gateway.pool.get("up-0").health  # type: ignore[union-attr]
            assert not health.healthy
            await slow  # its first event came after the 500
        assert not health.healthy and health.episodes == 1
    finally:
        await gw.stop()


# What an upstream that never ends its body offers: far more than any cap, yet a bound on a run of the test.
ENDLESS_MIB = 256


async def endless_upstream(opening: bytes, media_type: str, filler: bytes) -> tuple[web.AppRunner, str, list[int]]:
    """An upstream answering every request with `opening`, then MiBs of `filler` until ENDLESS_MIB or the
    reader hangs up; the list gets how many MiB of it each answer had written when it ended."""
    written: list[int] = []
    mebibyte = filler * ((1 << 20) // len(filler))

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": media_type})
        await response.prepare(request)
        await response.write(opening)
        sent = 0
        try:
            while sent < ENDLESS_MIB:
                await response.write(mebibyte)
                sent += 1
        except ConnectionError:
            pass
        finally:
            written.append(sent)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner, url = await serve_upstream(app)
    return runner, url, written


async def written_when_read(written: list[int]) -> int:
    """How many MiB the upstream's answer had written when the gateway stopped reading it."""
    for _ in range(1000):
        if written:
            return written[0]
        await asyncio.sleep(0.01)
    raise AssertionError("the upstream's answer never ended")


async def test_a_model_list_that_never_ends_is_read_no_further_than_a_few_mib(tmp_path: Path) -> None:
    """An account's `/v1/models` answer was read whole into memory for up to 10 s (a base_url serving a large
    file, an upstream that never ends its body): one request took the gateway from 90 MB to 2.2 GB."""
    runner, url, written = await endless_upstream(b'{"data": [', "application/json", b" ")
    gw = await start_gateway(gateway_config(tmp_path, url, keys=("sk-ant-api03-endless",)))
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.models.list()
        assert refused.value.status_code == 529
        # The cap (4 MiB) and what the sockets' buffers hold on the way.
        assert await written_when_read(written) < 64
    finally:
        await gw.stop()
        await runner.cleanup()


async def test_a_model_lookup_answered_with_a_padded_object_is_not_kept(tmp_path: Path) -> None:
    """A lookup of a model the list does not name is answered by the account and remembered (1,024 of them): an
    upstream padding each answer to the 4 MiB read cap could make that 4 GiB. One model object is a few hundred
    bytes; an answer over 64 KiB is no answer (a 529, as for an account that gave none), so nothing is kept."""
    sizes = {"claude-lean": 0, "claude-padded": 1 << 20}

    async def answer(request: web.Request) -> web.Response:
        model_id = request.match_info.get("model_id")
        if model_id not in sizes:
            return web.json_response({"data": [], "has_more": False, "first_id": None, "last_id": None})
        return web.json_response({"type": "model", "id": model_id, "display_name": "x" * sizes[model_id]})

    app = web.Application()
    app.router.add_get("/v1/models", answer)
    app.router.add_get("/v1/models/{model_id}", answer)
    runner, url = await serve_upstream(app)
    gw = await start_gateway(gateway_config(tmp_path, url, keys=("sk-ant-api03-padded",)))
    try:
        async with gw.client() as client:
            assert (await client.models.retrieve("claude-lean")).id == "claude-lean"
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.models.retrieve("claude-padded")
        assert refused.value.status_code == 529
    finally:
        await gw.stop()
        await runner.cleanup()


async def test_what_an_upstream_sends_after_its_streams_end_is_read_no_further_than_a_little(tmp_path: Path) -> None:
    """After a stream's `message_stop` the rest of the upstream's body was read whole for a second, to keep
    the connection: an upstream going on sending put hundreds of MB in memory per request."""
    stream = b"".join(
        b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps({"type": name, **data}))
        for name, data in (
            (
                "message_start",
                {"message": {"id": "m", "model": MODEL, "usage": {"input_tokens": 3, "output_tokens": 1}}},
            ),
            ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
            ("message_stop", {}),
        )
    )
    # Comments: whole events, so that the answer ends at `message_stop` whichever read brings them.
    runner, url, written = await endless_upstream(stream, "text/event-stream", b": more\n\n")
    gw = await start_gateway(gateway_config(tmp_path, url, keys=("sk-ant-api03-endless",)))
    try:
        async with gw.client() as client, client.messages.stream(model=MODEL, max_tokens=8, messages=user()) as answer:
            final = await answer.get_final_message()
        assert final.stop_reason == "end_turn" and final.usage.output_tokens == 2
        assert await written_when_read(written) < 64
    finally:
        await gw.stop()
        await runner.cleanup()

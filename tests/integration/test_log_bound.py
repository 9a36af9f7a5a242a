"""The lines a client or an upstream can make the gateway log, one per request, are bounded per kind."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import anthropic
import pytest

from poolgate.config import AdminConfig, UpstreamConfig
from poolgate.mock import MockServer
from poolgate.telemetry.logging import LINE_BOUND, LINE_BOUND_SECONDS, LINES_PER_KIND
from tests.conftest import MODEL, gateway_config, start_gateway, user
from tests.integration.test_relay_details import answer_of, before_the_mock, broken_upstream
from tests.integration.test_upstream_connections import IdleClosingUpstream, start_pool

WRONG_KEYS = 200
REFUSED_KEY = "rejected %s gateway key %s…"
NO_API_ERROR = "upstream %s answered HTTP %d with no API error (content-type %r): is its base_url the API's?"


class Clock:
    """The bound's clock, moved by the test: no waiting for an interval to pass."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def warnings(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


async def test_a_client_spraying_wrong_keys_writes_a_bounded_number_of_lines_then_a_summary(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    LINE_BOUND.reset(clock)
    admin_token = "admin-secret-0123456789"
    running = await start_gateway(gateway_config(tmp_path, mock.url, admin=AdminConfig(token=admin_token)))
    body = {"model": MODEL, "max_tokens": 8, "messages": user()}

    async def wrong_key(session: aiohttp.ClientSession, n: int) -> int:
        headers = {"x-api-key": f"pg-wrong-key-{n:08d}"}
        async with session.post(f"{running.url}/v1/messages", json=body, headers=headers) as response:
            return response.status

    try:
        async with aiohttp.ClientSession() as session:
            statuses = await asyncio.gather(*(wrong_key(session, n) for n in range(WRONG_KEYS // 2)))
            # Another kind of refusal, amid the spray, is logged all the same.
            async with session.get(f"{running.url}/metrics", headers={"x-admin-token": "wrong"}) as scrape:
                assert scrape.status == 401
            statuses += await asyncio.gather(*(wrong_key(session, n) for n in range(WRONG_KEYS // 2, WRONG_KEYS)))
            assert statuses == [401] * WRONG_KEYS  # every request is refused, logged or not
            refused = warnings(caplog, "poolgate.authn")
            assert len(refused) == LINES_PER_KIND
            assert set(refused) == {"rejected unknown gateway key pg-wr…"}
            assert warnings(caplog, "poolgate.admin") == ["/metrics refused: a wrong admin token"]

            # The interval over, the next refusal is logged, after what the interval suppressed.
            clock.now += LINE_BOUND_SECONDS
            caplog.clear()
            assert await wrong_key(session, WRONG_KEYS) == 401
            assert warnings(caplog, "poolgate.authn") == [
                f"… and {WRONG_KEYS - LINES_PER_KIND} more like {REFUSED_KEY!r} suppressed in the last"
                f" {LINE_BOUND_SECONDS:.0f} s",
                "rejected unknown gateway key pg-wr…",
            ]
    finally:
        await running.stop()


async def test_an_upstream_answering_every_request_with_a_page_writes_a_bounded_number_of_lines(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A web server's 404 page at an account's base_url is each request's (it takes no account out): a line per
    request, for as long as nobody fixes the base_url."""
    LINE_BOUND.reset(Clock())
    server, url = await broken_upstream(answer_of(404, body=b"<h1>404 Not Found</h1>"))
    running = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=before_the_mock("page", url, mock)[:1]))
    try:
        async with running.client() as client:
            for _ in range(LINES_PER_KIND + 5):
                with pytest.raises(anthropic.NotFoundError):
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await running.stop()  # tells what was suppressed before its last line
        server.close()
    logged = warnings(caplog, "poolgate.relay")
    assert (
        logged[:LINES_PER_KIND]
        == ["upstream page answered HTTP 404 with no API error (content-type 'text/html'): is its base_url the API's?"]
        * LINES_PER_KIND
    )
    assert logged[LINES_PER_KIND:] == [f"… and 5 more like {NO_API_ERROR!r} for page suppressed in the last 0 s"]


async def test_an_account_failing_every_request_does_not_hide_what_another_accounts_lines_say(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Upstream lines are bounded per account: with one bound for all, two accounts at a wrong base_url shared
    ten lines, and the second account's problem could go unsaid behind the first's."""
    LINE_BOUND.reset(Clock())
    server, url = await broken_upstream(answer_of(404, body=b"<h1>404 Not Found</h1>"))
    upstreams = tuple(UpstreamConfig(id=name, base_url=url, api_key=f"sk-{name}") for name in ("page-a", "page-b"))
    running = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        async with running.client() as client:
            for _ in range(LINES_PER_KIND + 5):  # each request tries both accounts
                with pytest.raises(anthropic.NotFoundError):
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await running.stop()
        server.close()
    logged = warnings(caplog, "poolgate.relay")
    for name in ("page-a", "page-b"):
        said = [line for line in logged if line.startswith(f"upstream {name} answered")]
        assert len(said) == LINES_PER_KIND, name
        summary = f"… and 5 more like {NO_API_ERROR!r} for {name} suppressed in the last 0 s"
        assert logged.count(summary) == 1, name


async def test_malformed_requests_are_bounded_per_kind_of_fault(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """What a client's malformed request is told by the server (each kind of fault its own) is bounded too."""
    LINE_BOUND.reset(Clock())
    running = await start_gateway(gateway_config(tmp_path, mock.url))
    port = int(running.url.rsplit(":", 1)[1])

    async def send(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return answer

    try:
        for _ in range(LINES_PER_KIND + 3):
            assert b" 400 " in (await send(b"NOT HTTP AT ALL\r\n\r\n")).split(b"\r\n")[0]
        two_hosts = b"GET /healthz HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n"
        assert b" 400 " in (await send(two_hosts)).split(b"\r\n")[0]
    finally:
        await running.stop()
    logged = warnings(caplog, "uvicorn.error")
    assert logged == [
        *["Invalid HTTP request received (from 127.0.0.1)"] * LINES_PER_KIND,
        "A request must carry one Host header; this one has 2 (from 127.0.0.1)",
        "… and 3 more like 'Invalid HTTP request received (from %s)' suppressed in the last 0 s",
    ]


async def test_a_fault_whose_message_holds_a_figure_the_client_chose_is_one_kind(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A head's Host header count is the client's to choose: a kind per count let one client write the lines
    of a few hundred kinds a minute (the most tracked at once, 10 lines each), not 10."""
    LINE_BOUND.reset(Clock())
    running = await start_gateway(gateway_config(tmp_path, mock.url))
    port = int(running.url.rsplit(":", 1)[1])
    try:
        for hosts in range(2, LINES_PER_KIND + 7):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\n" + b"host: a\r\n" * hosts + b"\r\n")
            assert b" 400 " in (await reader.read()).split(b"\r\n")[0]
            writer.close()
            await writer.wait_closed()
    finally:
        await running.stop()
    told = "A request must carry one Host header; this one has {} (from 127.0.0.1)"
    assert warnings(caplog, "uvicorn.error") == [
        *[told.format(hosts) for hosts in range(2, 2 + LINES_PER_KIND)],
        "… and 5 more like 'A request must carry one Host header; this one has %s (from %s)' suppressed in the"
        " last 0 s",
    ]


CLOSED_POOLED = "upstream %s closed a pooled connection as a request went out on it"
SKIPPED = "upstream %s skipped for request %s: %s"


def infos(caplog: pytest.LogCaptureFixture, logger: str, msg: str) -> list[str]:
    """What the lines of one kind (`msg`, the format) and their summaries said, at INFO."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == logger
        and r.levelno == logging.INFO
        and (r.msg == msg or (isinstance(r.args, tuple) and msg in r.args))
    ]


async def test_an_upstream_closing_every_pooled_connection_writes_a_bounded_number_of_lines(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream whose keep-alive timeout crosses every request on a used connection (each is sent again on a
    new one, and served) wrote an INFO line for every second request, at `poolgate serve`'s default level."""
    caplog.set_level(logging.INFO, logger="poolgate.relay")
    LINE_BOUND.reset(Clock())
    upstream = IdleClosingUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    gw = await start_pool(tmp_path, mock, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        async with gw.client() as client:
            for _ in range(2 * (LINES_PER_KIND + 5)):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert upstream.requests.count(1) == LINES_PER_KIND + 5  # one closed pooled connection every second request
    finally:
        await gw.stop()
        server.close()
    assert infos(caplog, "poolgate.relay", CLOSED_POOLED) == [
        *["upstream closing closed a pooled connection as a request went out on it"] * LINES_PER_KIND,
        f"… and 5 more like {CLOSED_POOLED!r} for closing suppressed in the last 0 s",
    ]

"""Connections to upstreams, through the HTTP surface: a pooled connection the upstream closed while it sat
idle costs its account nothing, a dead peer is probed for, a whole answer whose framing broke after it is
relayed, and why an account gave no answer is logged."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anthropic
import pytest

from poolgate.config import AdminConfig, RoutingConfig, UpstreamConfig
from poolgate.lifecycle.attempt_errors import SHORT_OF_RESOURCES
from poolgate.mock import MockServer
from poolgate.upstreams import connections
from poolgate.upstreams.connections import KEEPALIVE_IDLE_SECONDS, KEEPALIVE_INTERVAL_SECONDS, KEEPALIVE_PROBES
from tests.conftest import MOCK_KEYS, MODEL, RunningGateway, gateway_config, start_gateway, usage_rows, user
from tests.integration.test_relay_details import broken_upstream

USAGE = {"input_tokens": 11, "output_tokens": 7}
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": [], "usage": USAGE}
EVENTS = [
    {"type": "message_start", "message": {**MESSAGE, "usage": {"input_tokens": 11, "output_tokens": 1}}},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}},
    {"type": "message_stop"},
]


def answer_to(body: bytes) -> bytes:
    """A Messages answer, streamed if the request asked for a stream."""
    if json.loads(body).get("stream"):
        media_type = b"text/event-stream"
        content = b"".join(
            b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json.dumps(event).encode()) for event in EVENTS
        )
    else:
        media_type, content = b"application/json", json.dumps(MESSAGE).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (media_type, len(content), content)


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """The body of the next request on a connection; None once the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = next(int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    return await reader.readexactly(length)


class IdleClosingUpstream:
    """An upstream whose keep-alive timeout crosses every request that comes on a connection already used: it
    reads the request and hangs up without a word (the race a server closing idle connections after a few
    seconds loses now and then, made certain). With `answers=False` it hangs up on every request so."""

    def __init__(self, answers: bool = True, works_for: float = 0.0) -> None:
        self.answers = answers
        # How long it works on a request on a used connection before it hangs up (a load balancer dropping a
        # long generation: the upstream may have begun on it, and billed it).
        self.works_for = works_for
        self.requests: list[int] = []  # per request read: how many its connection had carried before
        self.peers: list[tuple[str, int]] = []  # the gateway's end of each connection

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        carried = 0
        self.peers.append(writer.get_extra_info("peername"))
        while (body := await read_request(reader)) is not None:
            self.requests.append(carried)
            if carried or not self.answers:
                if carried:
                    await asyncio.sleep(self.works_for)
                break
            writer.write(answer_to(body))
            await writer.drain()
            carried += 1
        writer.close()


@pytest.fixture
async def idle_closing() -> AsyncIterator[tuple[IdleClosingUpstream, str]]:
    upstream = IdleClosingUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    yield upstream, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()


ADMIN_TOKEN = "admin-secret-0123456789"


async def start_pool(tmp_path: Path, mock: MockServer, url: str) -> RunningGateway:
    """The given upstream first, the mock behind it."""
    upstreams = (
        UpstreamConfig(id="closing", base_url=url, api_key="sk-closing"),
        UpstreamConfig(id="api", base_url=mock.url, api_key=MOCK_KEYS[0]),
    )
    routing = RoutingConfig(strategy="first-pick")
    admin = AdminConfig(token=ADMIN_TOKEN)
    return await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams, routing=routing, admin=admin))


@pytest.mark.parametrize("stream", [False, True])
async def test_a_pooled_connection_the_upstream_closed_while_idle_costs_its_account_nothing(
    tmp_path: Path, mock: MockServer, idle_closing: tuple[IdleClosingUpstream, str], stream: bool
) -> None:
    """The request is sent again on a new connection to the same account: no failover, no failed attempt, no
    error against the account (four such requests in a burst took a healthy account out; with one account,
    the client got a 529 "unreachable")."""
    upstream, url = idle_closing
    gw = await start_pool(tmp_path, mock, url)
    try:
        async with gw.client() as client:
            for _ in range(4):
                raw = await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, messages=user(), stream=stream
                )
                assert raw.headers["x-poolgate-upstream"] == "closing"
                await raw.read()
        # Every second request went out on the pooled connection first, then on a new one (kept out of the pool).
        assert upstream.requests == [0, 1, 0, 0, 1, 0]
        closing = gw.gateway.pool.get("closing")
        assert closing is not None and closing.health.consecutive_failures == 0
        assert closing.stats.error_rate(0) == 0
        rows = await usage_rows(gw)
        assert [(row["status"], row["outcome"], row["attempts"]) for row in rows] == [(200, "ok", 1)] * 4
        assert [row["input_tokens"] for row in rows] == [11] * 4
    finally:
        await gw.stop()


async def test_a_new_connection_the_upstream_hangs_up_on_is_not_sent_again(tmp_path: Path, mock: MockServer) -> None:
    """An upstream that read the request on a new connection may have begun on it: the request fails over
    and the account is charged, as before."""
    upstream = IdleClosingUpstream(answers=False)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    gw = await start_pool(tmp_path, mock, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.headers["x-poolgate-upstream"] == "api" and upstream.requests == [0]
        closing = gw.gateway.pool.get("closing")
        assert closing is not None and closing.health.consecutive_failures == 1
        [row] = await usage_rows(gw)
        assert row["attempts"] == 2
    finally:
        await gw.stop()
        server.close()


async def test_a_pooled_connection_dropped_after_the_upstream_worked_on_the_request_is_not_sent_again(
    tmp_path: Path, mock: MockServer
) -> None:
    """A pooled connection that broke a second after the request went out was taken for one closed while
    idle: the request was sent again to the same account, generated and billed twice, with one attempt on
    record. Only a close that crosses the request (within a round trip) is; this one fails over, charged."""
    upstream = IdleClosingUpstream(works_for=1.0)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    gw = await start_pool(tmp_path, mock, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        async with gw.client() as client:
            first = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            second = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert first.headers["x-poolgate-upstream"] == "closing" and second.headers["x-poolgate-upstream"] == "api"
        assert upstream.requests == [0, 1], "the dropped request was not sent to the account again"
        rows = await usage_rows(gw)
        assert [row["attempts"] for row in rows] == [1, 2]
    finally:
        await gw.stop()
        server.close()


def own_socket_at(address: tuple[str, int]) -> socket.socket:
    """A duplicate of this process's socket bound to `address` (Linux: its descriptors are in /proc)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            found = socket.socket(fileno=os.dup(int(fd)))
        except OSError:  # not a socket
            continue
        try:
            if found.family == socket.AF_INET and found.getsockname() == address:
                return found
        except OSError:
            pass
        found.close()
    raise AssertionError(f"no socket of this process is bound to {address}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds its sockets in /proc")
async def test_upstream_connections_probe_a_silent_peer(
    tmp_path: Path, mock: MockServer, idle_closing: tuple[IdleClosingUpstream, str]
) -> None:
    """A connection a NAT or firewall dropped without a word is found dead in 30 s, not at the end of
    `first_byte_seconds` (10 minutes): the gateway's upstream sockets have TCP keepalive on."""
    upstream, url = idle_closing
    gw = await start_pool(tmp_path, mock, url)
    try:
        async with gw.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        [peer] = upstream.peers
        with own_socket_at(peer) as gateways_end:
            assert gateways_end.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert gateways_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_SECONDS
            assert gateways_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL_SECONDS
            assert gateways_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES
    finally:
        await gw.stop()


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("base_url", "cause"),
    [
        # https:// to a plain-HTTP port (as is a TLS-inspecting proxy's certificate the gateway does not trust):
        # the handshake fails.
        ("https://{mock}", "SSL"),
        ("http://127.0.0.1:{closed}", "Connect call failed"),
    ],
)
async def test_why_an_account_gave_no_answer_is_logged_without_its_credential(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture, base_url: str, cause: str
) -> None:
    """The client's 529 says only "unreachable": the log says why, for the operator to fix."""
    url = base_url.format(mock=mock.url.removeprefix("http://"), closed=closed_port())
    upstreams = (UpstreamConfig(id="broken", base_url=url, api_key=MOCK_KEYS[0]),)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert refused.value.status_code == 529 and "unreachable" in refused.value.message
    finally:
        await gw.stop()
    [line] = [
        record.getMessage()
        for record in caplog.records
        if record.name == "poolgate.relay" and record.levelno == logging.WARNING and "no answer" in record.getMessage()
    ]
    assert line.startswith("upstream broken gave no answer: Upstream account unreachable (ClientConnector")
    assert cause in line and MOCK_KEYS[0] not in line


async def test_an_answer_the_gateway_cannot_read_is_not_called_unreachable(tmp_path: Path, mock: MockServer) -> None:
    """An account behind a proxy that compresses with brotli whatever `accept-encoding` says answered, and the
    client's 529 said it was unreachable (the log said why)."""
    server, url = await broken_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: br\r\n"
        b"content-length: 4\r\n\r\n\x8b\x02\x80{"
    )
    upstreams = (UpstreamConfig(id="brotli", base_url=url, api_key="sk-brotli"),)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await gw.stop()
        server.close()
    assert refused.value.status_code == 529 and "unreachable" not in refused.value.message
    assert "answer could not be read" in refused.value.message


WHOLE = json.dumps(MESSAGE).encode()
COUNT = b'{"input_tokens": 42}'


@pytest.mark.parametrize(
    ("answer", "count_tokens"),
    [
        # A chunked body without its last chunk, then the connection closed.
        (b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(WHOLE), WHOLE), False),
        # A content-length 10 bytes past the body's end.
        (b"content-length: %d\r\n\r\n%s" % (len(WHOLE) + 10, WHOLE), False),
        (b"content-length: %d\r\n\r\n%s" % (len(COUNT) + 10, COUNT), True),
    ],
)
async def test_a_whole_json_answer_whose_framing_broke_after_it_is_relayed_not_generated_again(
    tmp_path: Path, mock: MockServer, answer: bytes, count_tokens: bool
) -> None:
    """The answer and its usage came whole: failing over had another account generate (and bill) it again,
    and the ledger lost the first account's tokens."""
    server, url = await broken_upstream(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + answer)
    gw = await start_pool(tmp_path, mock, url)
    try:
        async with gw.client() as client:
            if count_tokens:
                raw = await client.messages.with_raw_response.count_tokens(model=MODEL, messages=user())
                assert (await raw.parse()).input_tokens == 42
            else:
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                assert (await raw.parse()).usage.output_tokens == 7
        assert raw.headers["x-poolgate-upstream"] == "closing" and mock.stats.requests_total == 0
        closing = gw.gateway.pool.get("closing")
        assert closing is not None and closing.health.consecutive_failures == 0
        [row] = await usage_rows(gw)
        assert (row["status"], row["outcome"], row["attempts"]) == (200, "ok", 1)
        assert row["input_tokens"] == (0 if count_tokens else 11)  # a token count is free
    finally:
        await gw.stop()
        server.close()


HALF = WHOLE[: len(WHOLE) // 2]
FIRST_EVENT = b"event: message_start\ndata: %s\n\n" % json.dumps(EVENTS[0]).encode()


@pytest.mark.parametrize(
    ("answer", "stream"),
    [
        (b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(WHOLE), HALF), False),
        # Broken after its first event: the client's stream ends on an error event.
        (b"text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (len(FIRST_EVENT) + 100, FIRST_EVENT), True),
    ],
)
async def test_an_answer_that_broke_after_its_headers_is_one_request_to_its_account(
    tmp_path: Path, mock: MockServer, answer: bytes, stream: bool
) -> None:
    """/admin/upstreams counted it as answered and again as failed: two requests for the one sent."""
    server, url = await broken_upstream(b"HTTP/1.1 200 OK\r\ncontent-type: " + answer)
    gw = await start_pool(tmp_path, mock, url)
    try:
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, messages=user(), stream=stream
            )
            await raw.read()
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{gw.url}/admin/upstreams", headers={"x-admin-token": ADMIN_TOKEN}) as listed,
        ):
            accounts = {account["id"]: account for account in (await listed.json())["upstreams"]}
        assert accounts["closing"]["requests"] == 1 and accounts["closing"]["error_rate"] > 0
    finally:
        await gw.stop()
        server.close()


async def test_a_connection_this_host_has_no_files_for_blames_no_account(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of open files, no upstream connection can be made: the gateway's 529, no account tried after the
    first, none counted as failing, and the usage record names none (it named the first, as its 529)."""

    def no_files(addr_info: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(connections, "keepalive_socket", no_files)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        (row,) = await usage_rows(gw)
        states = list(gw.gateway.pool.states())
    finally:
        await gw.stop()
    assert (refused.value.status_code, refused.value.body["error"]["message"]) == (529, SHORT_OF_RESOURCES)  # type: ignore[index]
    assert refused.value.response.headers.get("retry-after") is not None
    assert (row["upstream_id"], row["attempts"], row["status"], row["outcome"]) == (None, 0, 529, "no_upstream")
    assert all(state.health.consecutive_failures == 0 and state.health.healthy for state in states)


# A process of its own: whether a class's instances share their dict keys is the process's state for good.
BURST = """
import asyncio, sys
from poolgate.mock import MockConfig, MockKey, start_mock
from poolgate.upstreams.connections import prime, upstream_session

async def main(primed):
    mock = await start_mock(MockConfig(keys={"k": MockKey()}))
    session = upstream_session()
    if primed:
        await prime(session)
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01", "content-type": "application/json"}
    body = b'{"model": "claude-sonnet-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'

    async def one():  # as the relay sends a request (`Relay._request`)
        response = await session._request(
            "POST", mock.url + "/v1/messages", headers=headers, data=body, allow_redirects=False
        )
        await response.read()
        return response

    await asyncio.gather(*(one() for _ in range(8)))  # the first requests, at once
    later = await one()
    await session.close()
    await mock.stop()
    return sys.getsizeof(later.__dict__)

print(asyncio.run(main(sys.argv[1] == "primed")))
"""


@pytest.mark.parametrize("primed", [False, True])
def test_a_burst_of_first_upstream_requests_costs_nothing_for_the_rest_of_the_process(primed: bool) -> None:
    """CPython 3.11 stops sharing the keys of a class's instance dicts once several instances are made before
    the first has set all its attributes: a gateway whose first upstream requests came at once gave every aiohttp
    response after a dict of its own (1.5 KB, not 0.3; ~10k instructions a request more), for as long as it ran.
    The gateway primes its session with one request alone at startup (`connections.prime`)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", BURST, "primed" if primed else "burst"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    size = int(done.stdout.split()[-1])
    # Unprimed, the burst leaves the dicts unshared (what the priming is for); primed, they stay shared.
    assert (size < 512) == primed, size

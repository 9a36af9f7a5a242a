"""Request heads are bounded: a gateway exposed to the network must not buffer a header of any size, nor
keep a connection open for a client that trickles its head in a byte at a time (slowloris), nor wait for ever
for the rest of a body that stopped arriving, or for a client that stopped reading its answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from poolgate.config import ServerConfig
from poolgate.mock import Fault, MockServer
from poolgate.store.db import usage
from tests.conftest import MOCK_KEYS, MODEL, RunningGateway, gateway_config, start_gateway, user


@pytest.fixture
async def bounded(tmp_path: Path, mock: MockServer) -> AsyncIterator[RunningGateway]:
    server = ServerConfig(
        max_head_bytes=16 * 1024, head_timeout_seconds=0.5, body_timeout_seconds=0.5, send_timeout_seconds=0.5
    )
    running = await start_gateway(gateway_config(tmp_path, mock.url, server=server))
    yield running
    await running.stop()


async def connect(gw: RunningGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


# What `curl --http2 http://…` adds to a request.
UPGRADE = b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"


def message_request(gw: RunningGateway, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
        b"x-api-key: %s\r\nanthropic-version: 2023-06-01\r\ncontent-length: %d\r\n%s\r\n%s"
        % (gw.key.encode(), len(body), extra, body)
    )


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    pairs = (line.split(":", 1) for line in lines if line)
    headers = {name.strip().lower().encode(): value.strip().encode() for name, value in pairs}
    body = await asyncio.wait_for(reader.readexactly(int(headers[b"content-length"])), 10)
    return int(status_line.split()[1]), headers, body


async def recorded(gw: RunningGateway, *columns: Any, wait: bool = False) -> list[Any]:
    """The usage records' `columns`; with `wait`, asked again (a bounded while) until there is one."""
    for _ in range(200 if wait else 1):
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            rows = list(conn.execute(select(*columns)).all())
        if rows:
            break
        await asyncio.sleep(0.05)
    return rows


async def nothing_in_flight_at(mock: MockServer) -> None:
    """Until the mock holds no request (bounded): it sees an upstream connection the gateway closed go on a later
    turn of its loop, not by the time the request is accounted."""
    for _ in range(200):
        if mock.stats.in_flight == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{mock.stats.in_flight} requests still in flight at the mock")


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 10) == b""


async def test_a_head_over_the_bound_is_431_in_anthropics_shape_and_the_connection_closes(
    bounded: RunningGateway,
) -> None:
    reader, writer = await connect(bounded)
    writer.write(message_request(bounded, b"{}", b"x-padding: " + b"a" * 40_000 + b"\r\n"))
    status, headers, body = await read_answer(reader)
    assert status == 431 and headers[b"connection"] == b"close"
    error = orjson.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "exceeds 16 KiB" in error["error"]["message"]
    assert await closed(reader)
    writer.close()


async def test_a_head_sent_across_many_reads_is_bounded_too(bounded: RunningGateway) -> None:
    """The bound counts what was buffered, not what one read held: a header sent in small pieces."""
    reader, writer = await connect(bounded)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nx-padding: ")
    for _ in range(40):
        try:
            writer.write(b"a" * 1000)
            await writer.drain()
        except ConnectionError:  # refused and closed: the answer is waiting in the reader
            break
        await asyncio.sleep(0.001)
    status, _, _ = await read_answer(reader)
    assert status == 431
    writer.close()


async def test_a_head_over_the_bound_is_431_however_its_reads_split_it(bounded: RunningGateway) -> None:
    """The read a head begins in is not added up as it arrives (it may hold the request before it too), but
    the whole head is measured once it is complete: a 30 KB head sent as 20 KB, then 10 KB, passed a 16 KiB
    bound (and a 140 KB one the default 64 KiB: uvloop reads up to 250 KB at a time)."""
    reader, writer = await connect(bounded)
    head = message_request(bounded, b"{}", b"x-padding: " + b"a" * 30_000 + b"\r\n")
    writer.write(head[:20_000])
    await writer.drain()
    await asyncio.sleep(0.1)  # the first part is read alone
    writer.write(head[20_000:])
    status, _, body = await read_answer(reader)
    assert status == 431, body
    assert await closed(reader)
    writer.close()


async def test_a_head_not_complete_in_time_is_408_and_the_connection_closes(bounded: RunningGateway) -> None:
    reader, writer = await connect(bounded)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\n")
    # A byte now and then: each used to keep the connection open for ever.
    for _ in range(30):
        await asyncio.sleep(0.1)
        if reader.at_eof() or writer.is_closing():
            break
        writer.write(b"x")
        await writer.drain()
        if len(reader._buffer):  # type: ignore[attr-defined]  # the answer has come
            break
    status, _, body = await read_answer(reader)
    error = orjson.loads(body)["error"]
    # The head timeout configured (0.5 s) is what ended it, not the default 30 s.
    assert status == 408 and error["type"] == "timeout_error" and "within 0.5 s" in error["message"]
    assert await closed(reader)
    writer.close()


async def test_large_bodies_in_the_same_read_as_their_head_are_not_counted_as_head(bounded: RunningGateway) -> None:
    """A Claude Code request of a few hundred KiB arrives with its head in one read, twice on one
    connection: both are answered (the bound is on heads, not on bodies)."""
    reader, writer = await connect(bounded)
    padding = "lorem ipsum " * 20_000  # ~240 KB
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user(padding)})
    for _ in range(2):
        writer.write(message_request(bounded, body))
        status, headers, answer = await read_answer(reader)
        assert status == 200, answer
        assert headers.get(b"connection") != b"close"
    # Headers close to the bound pass as well.
    writer.write(message_request(bounded, body, b"x-padding: " + b"a" * 7_000 + b"\r\n"))
    status, _, _ = await read_answer(reader)
    assert status == 200
    writer.close()


def slow_upstream(mock: MockServer, **fault: Any) -> None:
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(**fault))


async def test_answers_slower_than_the_head_timeout_are_not_cut(bounded: RunningGateway, mock: MockServer) -> None:
    """The head timeout is for heads: a JSON answer, a stream and an idle keep-alive connection may all
    outlast it (a 408 was once written into answers running longer than it)."""
    reader, writer = await connect(bounded)
    slow_upstream(mock, ttfb_ms=1200)
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user()})
    writer.write(message_request(bounded, body))
    status, _, answer = await read_answer(reader)
    assert status == 200 and orjson.loads(answer)["type"] == "message"
    await asyncio.sleep(1.2)  # idle on a kept-alive connection, past the head timeout
    slow_upstream(mock, tokens_per_second=10)
    stream = orjson.dumps({"model": MODEL, "max_tokens": 12, "stream": True, "messages": user()})
    writer.write(message_request(bounded, stream))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    streamed = b""
    while b"message_stop" not in streamed:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, "the stream was cut"
        streamed += chunk
    # Not a bare b"408": the message id is random hex, and held those three digits one run in ~200.
    assert b"HTTP/1.1 408" not in streamed and b"event: error" not in streamed
    writer.close()


async def test_a_refused_head_is_answered_after_the_requests_before_it(
    bounded: RunningGateway, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """HTTP/1.1 answers in order: a pipelined head over the bound is refused after the answer to the slow
    request before it, which is not broken by the refusal."""
    slow_upstream(mock, ttfb_ms=300)
    reader, writer = await connect(bounded)
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user()})
    writer.write(
        message_request(bounded, body) + message_request(bounded, body, b"x-padding: " + b"a" * 20_000 + b"\r\n")
    )
    first, _, answer = await read_answer(reader)
    second, _, _ = await read_answer(reader)
    assert (first, second) == (200, 431) and orjson.loads(answer)["type"] == "message"
    assert await closed(reader)
    writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_trailers_of_a_chunked_body_are_bounded(bounded: RunningGateway) -> None:
    """Trailer fields after a chunked body went into the request's headers without bound (hundreds of MB
    per connection, without a key): over the head bound the connection is closed."""
    reader, writer = await connect(bounded)
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\ntransfer-encoding: chunked\r\n"
        b"content-type: application/json\r\n\r\n2\r\n{}\r\n0\r\n"
    )
    try:
        for index in range(200):
            writer.write(b"x-t%d: %s\r\n" % (index, b"b" * 1000))
            await writer.drain()
    except ConnectionError:
        pass
    with contextlib.suppress(ConnectionResetError):  # closed with the client's data unread: a reset
        assert await closed(reader)
    assert writer.transport.is_closing() or reader.at_eof() or reader.exception() is not None
    writer.close()


async def test_a_known_callers_request_with_trailers_over_the_bound_is_answered_431_and_accounted(
    bounded: RunningGateway,
) -> None:
    """Its request can never be read whole: the connection was closed without an answer, and the request
    recorded as the client's disconnect although the client had not left."""
    reader, writer = await connect(bounded)
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\ntransfer-encoding: chunked\r\nx-api-key: %s\r\n"
        b"content-type: application/json\r\n\r\n2\r\n{}\r\n0\r\nx-t: %s\r\nx-u: 1\r\n\r\n"
        % (bounded.key.encode(), b"b" * 20_000)
    )
    status, _, body = await read_answer(reader)
    assert status == 431 and orjson.loads(body)["error"]["type"] == "invalid_request_error"
    writer.close()
    [row] = await recorded(bounded, usage.c.status, usage.c.outcome, wait=True)
    assert tuple(row) == (431, "client_error")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"FOO / HTTP/1.1\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n",
    ],
)
async def test_a_malformed_request_gets_400_in_anthropics_shape(bounded: RunningGateway, request_bytes: bytes) -> None:
    reader, writer = await connect(bounded)
    writer.write(request_bytes)
    status, headers, body = await read_answer(reader)
    assert status == 400 and headers[b"content-type"] == b"application/json"
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"
    # RFC 9110 (6.6.1): a server with a clock dates every 4xx, as the gateway's other answers are dated.
    assert parsedate_to_datetime(headers[b"date"].decode()).year >= 2024
    writer.close()


# A body framed two ways, or framed in a way servers read differently: a proxy in front of the gateway that read it
# the other way would take the rest for a request of its own (request smuggling).
_BODY = b'{"model":"claude-sonnet-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
_CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_BODY), _BODY)
_SMUGGLED = b"GET /metrics HTTP/1.1\r\nhost: gateway\r\n\r\n"


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"content-length: %d\r\ntransfer-encoding: chunked\r\n" % len(_CHUNKED), _CHUNKED),
        (
            b"content-length: %d\r\ncontent-length: %d\r\n" % (len(_BODY), len(_BODY) + len(_SMUGGLED)),
            _BODY + _SMUGGLED,
        ),
        (b"content-length: %d, %d\r\n" % (len(_BODY), len(_BODY)), _BODY),
        (b"content-length: +%d\r\n" % len(_BODY), _BODY),
        (b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n", _CHUNKED),
        (b"transfer-encoding: chunked, identity\r\n", _CHUNKED),
        (b"transfer-encoding : chunked\r\n", _CHUNKED),
        (b"transfer-encoding: chunked\r\n", _CHUNKED.replace(b"\r\n", b"\n")),
        (b"transfer-encoding: chunked\r\n", b"1" + b"0" * 16 + _CHUNKED),
    ],
)
async def test_a_body_framed_ambiguously_is_refused_before_any_upstream_sees_it(
    bounded: RunningGateway, mock: MockServer, framing: bytes, body: bytes
) -> None:
    reader, writer = await connect(bounded)
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\nx-api-key: %s\r\ncontent-type: application/json\r\n%s\r\n%s"
        % (bounded.key.encode(), framing, body)
    )
    status, _, answer = await read_answer(reader)
    writer.close()
    assert status == 400 and orjson.loads(answer)["error"]["type"] == "invalid_request_error"
    assert mock.stats.requests_total == 0


@pytest.mark.parametrize(("hosts", "says"), [(b"", "has none"), (b"host: gateway\r\nhost: elsewhere\r\n", "has 2")])
async def test_an_http_1_1_request_without_its_one_host_header_is_refused_before_any_upstream_sees_it(
    bounded: RunningGateway, mock: MockServer, hosts: bytes, says: str
) -> None:
    """RFC 9112 has a server answer 400 to an HTTP/1.1 request without a Host header or with two (a proxy in
    front and the server behind may each read another one): both were relayed upstream and answered 200."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user()})
    reader, writer = await connect(bounded)
    writer.write(message_request(bounded, body).replace(b"host: gateway\r\n", hosts))
    status, headers, answer = await read_answer(reader)
    error = orjson.loads(answer)["error"]
    assert (status, error["type"], headers[b"connection"]) == (400, "invalid_request_error", b"close")
    assert f"one Host header; this one {says}" in error["message"]
    assert await closed(reader)
    assert mock.stats.requests_total == 0
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "says"),
    [
        # httptools lets these versions through: they were served as HTTP/1.1 (an HTTP/0.9 client reads no head).
        (b"GET /healthz HTTP/2.0\r\nhost: gateway\r\n\r\n", "not HTTP/2.0"),
        (b"GET /healthz HTTP/0.9\r\n\r\n", "not HTTP/0.9"),
        # RFC 9112 (6.1): an HTTP/1.0 request framed with Transfer-Encoding is faulty; it was de-chunked and served.
        (
            b"POST /v1/messages HTTP/1.0\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            + _CHUNKED,
            "cannot be framed with Transfer-Encoding",
        ),
    ],
)
async def test_a_request_in_an_http_version_it_cannot_be_served_in_is_refused_before_any_upstream_sees_it(
    bounded: RunningGateway, mock: MockServer, request_bytes: bytes, says: str
) -> None:
    reader, writer = await connect(bounded)
    writer.write(request_bytes.replace(b"\r\n\r\n", b"\r\nx-api-key: %s\r\n\r\n" % bounded.key.encode(), 1))
    status, headers, answer = await read_answer(reader)
    error = orjson.loads(answer)["error"]
    assert (status, error["type"], headers[b"connection"]) == (400, "invalid_request_error", b"close")
    assert says in error["message"]
    assert await closed(reader)
    assert mock.stats.requests_total == 0
    writer.close()


async def test_an_http_1_0_request_needs_no_host_header(bounded: RunningGateway) -> None:
    reader, writer = await connect(bounded)
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    status, _, _ = await read_answer(reader)
    assert status == 200
    writer.close()


async def test_an_http_1_0_client_asking_for_100_continue_gets_its_answer_only(bounded: RunningGateway) -> None:
    """HTTP/1.0 knows no 1xx (RFC 9110 has servers send none to it): its client read the `100 Continue` the
    server wrote as its answer."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user()})
    request = message_request(bounded, body, b"expect: 100-continue\r\n").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    reader, writer = await connect(bounded)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    writer.close()


async def answered_and_accounted(gw: RunningGateway, reader: asyncio.StreamReader, status: int) -> str:
    """The one answer on a connection, which then closes; the request is accounted under its request id."""
    answered, headers, body = await read_answer(reader)
    assert answered == status and orjson.loads(body)["error"]["type"] == "invalid_request_error"
    assert await closed(reader)
    [row] = await recorded(gw, usage.c.request_id, usage.c.status, usage.c.outcome)
    assert (row.request_id, row.status, row.outcome) == (headers[b"request-id"].decode(), status, "client_error")
    return orjson.loads(body)["error"]["message"]


async def test_a_malformed_chunked_body_is_answered_at_once(bounded: RunningGateway) -> None:
    """The request whose body cannot be parsed can never be answered: 400 and close, not a wait for ever; and
    it is accounted as that 400 (it was a 499 `client_disconnected` under another request id)."""
    reader, writer = await connect(bounded)
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\nx-api-key: %s\r\ntransfer-encoding: chunked\r\n\r\n"
        b'5\r\n{"mod\r\nZZ\r\n' % bounded.key.encode()
    )
    await answered_and_accounted(bounded, reader, 400)
    writer.close()


@pytest.mark.parametrize("reads", [1, 2])
async def test_a_request_with_a_body_asking_to_upgrade_is_refused_and_its_body_never_read_as_a_request(
    bounded: RunningGateway, reads: int
) -> None:
    """`curl --http2 http://…` asks to switch to h2c. httptools handed what followed the head to the new
    protocol: the body was lost (a 400 "body is empty" for a valid request), and when it came in a later read
    it was parsed as requests of its own, here a hidden `GET /healthz` answered 200 (a desync)."""
    hidden = b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n"
    head = message_request(bounded, hidden, UPGRADE)[: -len(hidden)]
    reader, writer = await connect(bounded)
    if reads == 1:
        writer.write(head + hidden)
    else:
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(0.2)
        with contextlib.suppress(ConnectionError):
            writer.write(hidden)
    assert "cannot ask to switch protocols" in await answered_and_accounted(bounded, reader, 400)
    writer.close()


async def test_requests_without_a_body_asking_to_upgrade_are_served_as_http_1_1(
    bounded: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """No upgrade is made (RFC 9110 lets a server ignore one); what follows the request in the same read is
    the next request (it was handed to the new protocol and dropped), however many there are (each was parsed
    one call deeper: a few hundred in one read ended the connection in a RecursionError), and a
    `content-length: 00` is no body either."""
    reader, writer = await connect(bounded)
    writer.write(
        b"GET /v1/models HTTP/1.1\r\nhost: gateway\r\nx-api-key: %s\r\n%s\r\n" % (bounded.key.encode(), UPGRADE)
        + b"GET /healthz HTTP/1.1\r\nhost: gateway\r\ncontent-length: 00\r\n%s\r\n" % UPGRADE * 1200
    )
    models, _, body = await read_answer(reader)
    assert models == 200 and orjson.loads(body)["data"]
    for _ in range(1200):
        health, _, _ = await read_answer(reader)
        assert health == 200
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    writer.close()


@pytest.mark.parametrize("unreadable", ["upgrade", "malformed chunk"])
async def test_a_request_whose_body_cannot_be_read_is_answered_in_its_turn(
    bounded: RunningGateway, mock: MockServer, unreadable: str
) -> None:
    """HTTP/1.1 answers in order: a request pipelined behind a slow one got its 400 first, and the slow one's
    answer was lost (billed all the same)."""
    slow_upstream(mock, ttfb_ms=300)
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user()})
    if unreadable == "upgrade":
        behind = message_request(bounded, body, UPGRADE)
    else:
        behind = (
            b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\nx-api-key: %s\r\ntransfer-encoding: chunked\r\n\r\n"
            b'5\r\n{"mod\r\nZZ\r\n' % bounded.key.encode()
        )
    reader, writer = await connect(bounded)
    writer.write(message_request(bounded, body) + behind)
    first, first_headers, answer = await read_answer(reader)
    assert first == 200 and orjson.loads(answer)["type"] == "message"
    second, second_headers, _ = await read_answer(reader)
    assert second == 400 and await closed(reader)
    writer.close()
    rows = dict(await recorded(bounded, usage.c.request_id, usage.c.status))
    assert rows == {first_headers[b"request-id"].decode(): 200, second_headers[b"request-id"].decode(): 400}


async def test_a_refused_upgrade_lets_the_client_finish_sending_its_body(bounded: RunningGateway) -> None:
    """Closing at once reset the connection of a client still sending its (well-formed) body: it may then
    never read its 400."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user("x" * 2_000_000)})
    request = message_request(bounded, body, UPGRADE)
    reader, writer = await connect(bounded)
    writer.write(request[: len(request) - len(body) + 1000])
    status, _, _ = await read_answer(reader)
    assert status == 400
    for start in range(len(request) - len(body) + 1000, len(request), 65536):
        writer.write(request[start : start + 65536])
        await writer.drain()  # no ConnectionResetError / BrokenPipeError
    assert await closed(reader)
    writer.close()


async def test_blank_lines_do_not_hold_a_connection_open(bounded: RunningGateway) -> None:
    """Line breaks before a request begin none: a connection sending only those (or nothing) is closed once
    no request has begun within the head timeout."""
    reader, writer = await connect(bounded)
    try:
        for _ in range(40):
            writer.write(b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof():
                break
    except ConnectionError:
        pass
    assert await closed(reader)  # within `closed`'s wait: by the 0.5 s head timeout, not the default 30 s
    writer.close()


@pytest.mark.parametrize(
    "sent",
    ["half the body", "the head alone", "the head expecting 100-continue"],
)
async def test_a_body_that_stops_arriving_is_408_its_connection_closes_and_it_is_accounted(
    bounded: RunningGateway, sent: str
) -> None:
    """However the body stalls, after part of it or before any of it (a head with its content-length alone,
    or one that waits for `100 Continue` and then sends nothing: both used to hold the connection for
    ever), the caller is answered 408 and the request is accounted under the answer's request id."""
    reader, writer = await connect(bounded)
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user("cut off")})
    if sent == "half the body":
        writer.write(message_request(bounded, body)[: -len(body) // 2])
    elif sent == "the head alone":
        writer.write(message_request(bounded, body)[: -len(body)])
    else:
        writer.write(message_request(bounded, body, b"expect: 100-continue\r\n")[: -len(body)])
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    status, headers, answer = await read_answer(reader)
    assert status == 408 and headers[b"connection"] == b"close"
    error = orjson.loads(answer)["error"]
    assert error["type"] == "timeout_error" and "nothing of it for 0.5 s" in error["message"]
    assert await closed(reader)
    writer.close()
    [row] = await recorded(bounded, usage.c.request_id, usage.c.status, usage.c.outcome)
    assert (row.request_id, row.status, row.outcome) == (headers[b"request-id"].decode(), 408, "client_error")


async def test_a_request_refused_while_its_body_is_read_is_timed_from_its_arrival(bounded: RunningGateway) -> None:
    """A stalled body's 408 comes a body timeout after the request began: its usage record (and with it the
    access log, the duration histogram and `usage --since`) starts at its arrival and lasts until then."""
    reader, writer = await connect(bounded)
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user("cut off")})
    began = time.time()
    writer.write(message_request(bounded, body)[: -len(body) // 2])
    status, _, _ = await read_answer(reader)
    answered = time.time()
    writer.close()
    assert status == 408
    [row] = await recorded(bounded, usage.c.started_at, usage.c.duration_ms)
    assert began <= row.started_at <= answered - 0.5  # the body timeout passed between them
    assert row.duration_ms >= 500


async def test_an_accepted_request_is_timed_from_its_arrival_too(gw: RunningGateway) -> None:
    """It was timed from after its body had come, while one refused was timed from its arrival: a slow upload
    was in neither its duration nor its time to first byte."""
    reader, writer = await connect(gw)
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user("slowly")})
    sent = message_request(gw, body)
    writer.write(sent[: -len(body) // 2])
    await asyncio.sleep(2.0)
    writer.write(sent[-len(body) // 2 :])
    status, _, _ = await read_answer(reader)
    writer.close()
    assert status == 200
    [row] = await recorded(gw, usage.c.duration_ms, usage.c.ttfb_ms)
    # Most of the two seconds between the two halves (not all: the head may be read a moment after it was
    # sent, later on a busy machine).
    assert row.duration_ms >= 1000 and row.ttfb_ms >= 1000


async def test_a_pipelined_head_behind_a_long_answer_is_timed_from_its_own_start(
    bounded: RunningGateway, mock: MockServer
) -> None:
    """A request's head pipelined behind a stream that lasts longer than the body timeout, its body not yet
    sent: the 408 used to be written into the middle of the stream before it (which then broke as a gateway
    error, and the 408 went unrecorded). The stream ends whole; the queued request gets its own 408 after
    it, counted from when it began."""
    slow_upstream(mock, tokens_per_second=10)  # 16 tokens: a stream of ~1.6 s
    reader, writer = await connect(bounded)
    streamed = orjson.dumps({"model": MODEL, "max_tokens": 16, "stream": True, "messages": user()})
    queued = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user("queued")})
    writer.write(message_request(bounded, streamed))
    await asyncio.sleep(0.1)
    writer.write(message_request(bounded, queued)[: -len(queued)])  # the head alone, pipelined
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    stream = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 10)  # the chunked stream's end
    assert b"event: message_stop" in stream and b"HTTP/1.1 408" not in stream and b"event: error" not in stream
    status, headers, _ = await read_answer(reader)
    assert status == 408
    assert await closed(reader)
    writer.close()
    rows = await recorded(bounded, usage.c.request_id, usage.c.status, usage.c.outcome)
    assert sorted((row.status, row.outcome) for row in rows) == [(200, "ok"), (408, "client_error")]
    assert headers[b"request-id"].decode() in {row.request_id for row in rows}


async def test_a_stalled_body_is_answered_even_while_the_client_goes_on_sending(bounded: RunningGateway) -> None:
    """A client still writing when it is refused gets the 408 and then a clean end, not a reset connection
    (which can destroy the answer before the client reads it): the gateway stops answering, drops what
    still comes, and closes only when the client does (or after a linger)."""
    reader, writer = await connect(bounded)
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user("x" * 3000)})
    writer.write(message_request(bounded, body)[: -len(body) // 2])
    status, _, _ = await read_answer(reader)
    assert status == 408
    for _ in range(3):  # the rest of a large upload, too late: a closed socket would answer it with a reset
        writer.write(b"x" * (1 << 20))
        await writer.drain()
        await asyncio.sleep(0.1)
    assert await closed(reader)
    writer.close()


@pytest.mark.parametrize(
    ("key", "declared", "status"),
    [(b"pg-not-a-key", 50_000_000, 401), (None, 1 << 40, 413)],
    ids=["no-key", "over-the-limit"],
)
async def test_a_request_answered_before_its_body_is_read_ends_its_connection(
    bounded: RunningGateway, key: bytes | None, declared: int, status: int
) -> None:
    """A caller without a key (or with a body over the limit) is answered before its body is read. The
    server then read and dropped whatever the client went on sending, to reach a next request, for up to
    the keep-alive timeout (75 s): gigabytes a connection, from anyone. The answer is followed by the end of
    the connection (a lingering close: what the client still sends is dropped unread, and it reads its
    answer whole), and says so (`connection: close`, as every answer that ends its connection); a request
    whose body was read and refused keeps its connection."""
    reader, writer = await connect(bounded)
    head = message_request(bounded, b"").replace(b"content-length: 0", b"content-length: %d" % declared)
    if key is not None:
        head = head.replace(bounded.key.encode(), key)
    writer.write(head + b"x" * 65_536)
    answered, headers, _ = await read_answer(reader)
    assert answered == status and headers[b"connection"] == b"close"
    for _ in range(3):  # the client goes on sending: dropped, not an error
        writer.write(b"x" * (1 << 20))
        await writer.drain()
    assert await closed(reader)
    writer.close()
    # Refused after its body was read: the same connection serves the next request.
    reader, writer = await connect(bounded)
    writer.write(message_request(bounded, b'{"model": 1}'))
    answered, headers, _ = await read_answer(reader)
    assert answered == 400 and b"connection" not in headers
    writer.write(message_request(bounded, orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})))
    answered, headers, _ = await read_answer(reader)
    assert answered == 200 and b"connection" not in headers
    writer.close()


async def test_a_body_arriving_slowly_but_steadily_is_served(bounded: RunningGateway) -> None:
    """The body timeout is on silence, not on the whole upload: parts a little apart, well past the timeout
    in all, make a request like any other."""
    reader, writer = await connect(bounded)
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user("x" * 3000)})
    request = message_request(bounded, body)
    head_end = len(request) - len(body)
    writer.write(request[:head_end])
    # 0.1 s apart: a fifth of the 0.5 s timeout, so a busy machine's pause of up to 0.4 s between two parts
    # is still no silence of a timeout.
    parts = [body[i : i + 300] for i in range(0, len(body), 300)]
    for part in parts:
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(part)
    status, _, answer = await read_answer(reader)
    assert status == 200, answer
    assert len(parts) * 0.1 > 0.5  # longer in all than the timeout
    writer.close()


def cap_send_buffers(gw: RunningGateway, size: int) -> None:
    """The gateway's connections get a send buffer of `size` (doubled by the kernel) instead of one growing
    to `tcp_wmem`'s maximum (4 MB): they inherit the listening socket's."""
    for listener in gw._server.servers[0].sockets:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def small_window_client(gw: RunningGateway) -> socket.socket:
    """A non-blocking socket connected to `gw` whose kernel buffers only a few KB of the answer for it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = gw.url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_stops_reading_its_answer_loses_its_connection_and_its_upstream_request(
    bounded: RunningGateway, mock: MockServer, stream: bool
) -> None:
    """A client that takes nothing more of a long answer (its buffers full) used to hold the request and
    its upstream connection for ever: after `send_timeout_seconds` without progress its connection is
    closed, and the request ends as the client's disconnect (its upstream request cancelled, unless the
    sockets already hold the rest of the answer). An answer's end waiting for the client when it was cut off
    was dropped by the server without a word, and the request recorded as delivered (`ok`): a JSON answer's
    one write always is such an end."""
    mock.state.config.output_tokens = 100_000  # megabytes of events: more than the sockets can buffer …
    # … once the gateway's send buffer cannot grow to `tcp_wmem`'s 4 MB, as the whole answer (2.7 MB) then
    # sometimes fitted.
    cap_send_buffers(bounded, 32 * 1024)
    reader, writer = await asyncio.open_connection(sock=small_window_client(bounded))
    body = orjson.dumps({"model": MODEL, "max_tokens": 100_000, "stream": stream, "messages": user()})
    writer.write(message_request(bounded, body))
    await writer.drain()
    # Never read: wait (bounded) for the gateway to give up on the client.
    [row] = await recorded(bounded, usage.c.outcome, usage.c.output_tokens, wait=True)
    assert row.outcome == "client_disconnected" and row.output_tokens > 0
    await nothing_in_flight_at(mock)
    with contextlib.suppress(ConnectionError):  # what was buffered for the client, then the end
        while await asyncio.wait_for(reader.read(1 << 20), 10):
            pass
    writer.close()


@pytest.mark.parametrize(("stream", "tokens"), [(False, 60_000), (True, 15_000)])  # ~400 KB each
async def test_a_client_reading_its_answer_slowly_but_steadily_receives_all_of_it(
    bounded: RunningGateway, mock: MockServer, stream: bool, tokens: int
) -> None:
    """A client on a slow link (mobile, VPN) reading a large answer: the kernel makes room for the server
    only once about a third of the socket's send buffer is free, and a client that took less than that in a
    send timeout was cut off while it still read. A connection is closed only when its client took nothing
    for the whole timeout."""
    mock.state.config.output_tokens = tokens
    cap_send_buffers(bounded, 128 * 1024)  # a third of it is more than the client reads per timeout (0.5 s)
    sock = small_window_client(bounded)
    loop = asyncio.get_running_loop()
    body = orjson.dumps({"model": MODEL, "max_tokens": tokens, "stream": stream, "messages": user()})
    await loop.sock_sendall(sock, message_request(bounded, body, b"connection: close\r\n"))
    received = bytearray()
    with contextlib.suppress(ConnectionError):
        for _ in range(1000):  # 4 KB every 50 ms (40 KB per timeout) until the server closes (or cuts)
            await asyncio.sleep(0.05)
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
            if not chunk:
                break
            received += chunk
    sock.close()
    head, _, answer = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    if stream:
        assert b"event: message_stop" in answer and answer.endswith(b"\r\n0\r\n\r\n")
    else:
        assert orjson.loads(answer)["usage"]["output_tokens"] == tokens
    rows = await recorded(bounded, usage.c.status, usage.c.outcome, wait=True)
    assert [tuple(row) for row in rows] == [(200, "ok")]


@pytest.mark.parametrize("queued", [False, True])
async def test_an_unreadable_request_expecting_100_continue_is_accounted_and_nothing_follows_its_answer(
    bounded: RunningGateway, mock: MockServer, caplog: pytest.LogCaptureFixture, queued: bool
) -> None:
    """Its request's first read wrote `100 Continue` after the refusal had ended the connection's output: a
    RuntimeError, an error logged and no usage record."""
    if queued:
        slow_upstream(mock, ttfb_ms=300)
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user()})
    reader, writer = await connect(bounded)
    refused = message_request(bounded, body, UPGRADE + b"expect: 100-continue\r\n")
    writer.write((message_request(bounded, body) if queued else b"") + refused)
    if queued:
        assert (await read_answer(reader))[0] == 200
    status, headers, _ = await read_answer(reader)
    assert status == 400 and await closed(reader)
    writer.close()
    rows = await recorded(bounded, usage.c.request_id, usage.c.status)
    assert (headers[b"request-id"].decode(), 400) in rows and len(rows) == (2 if queued else 1)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_a_client_gone_is_seen_by_its_running_request_also_with_one_queued_behind_it(
    bounded: RunningGateway, mock: MockServer
) -> None:
    """uvicorn tells only the newest request of a connection that its client left: with one pipelined behind
    it, the running request went on upstream to the end and was accounted as delivered."""
    slow_upstream(mock, ttfb_ms=1500)
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user()})
    _, writer = await connect(bounded)
    writer.write(message_request(bounded, body) * 2)
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()
    rows = await recorded(bounded, usage.c.status, usage.c.outcome, wait=True)
    assert [tuple(row) for row in rows] == [(499, "client_disconnected")]  # well before the upstream's 1.5 s
    await nothing_in_flight_at(mock)


async def test_a_connection_queues_a_bounded_number_of_pipelined_requests(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn resumed reading on every answer: a client pipelining tiny requests without reading its answers
    had them all parsed and queued (150,000 on one connection, ~360 MiB). (The answers to them fill the
    socket buffers while the client does not read: a send timeout shorter than its pause closed the
    connection, depending on how far the kernel had grown the buffers.)"""
    from poolgate.serve import BoundedHeadProtocol

    server = ServerConfig(max_head_bytes=16 * 1024, send_timeout_seconds=30)
    bounded = await start_gateway(gateway_config(tmp_path, mock.url, server=server))

    deepest = 0
    parsed = BoundedHeadProtocol.on_headers_complete

    def counting(self: BoundedHeadProtocol) -> None:
        nonlocal deepest
        parsed(self)
        deepest = max(deepest, len(self.pipeline))

    monkeypatch.setattr(BoundedHeadProtocol, "on_headers_complete", counting)
    one = b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n"
    reader, writer = await connect(bounded)

    async def send() -> None:
        for _ in range(8):
            writer.write(one * 5000)
            await writer.drain()

    sender = asyncio.create_task(send())
    await asyncio.sleep(1.0)  # reading nothing meanwhile
    try:
        for _ in range(8 * 5000):
            assert (await read_answer(reader))[0] == 200
        await sender
        writer.close()
    finally:
        await bounded.stop()
    assert deepest < 8000  # the bound (32) and one read's worth of tiny requests


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_gone_before_its_quick_answer_is_recorded_as_gone(
    bounded: RunningGateway, mock: MockServer, stream: bool
) -> None:
    """A client that sends its request and closes at once: the answer, quicker than the disconnect watcher
    starts, was relayed to nobody (the server dropped it) and recorded `200 ok`."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "stream": stream, "messages": user()})
    for _ in range(3):
        _, writer = await connect(bounded)
        writer.write(message_request(bounded, body))
        await writer.drain()
        writer.close()
    rows = []
    for _ in range(200):  # bounded: until the three requests are accounted
        rows = await recorded(bounded, usage.c.status, usage.c.outcome)
        if len(rows) == 3:
            break
        await asyncio.sleep(0.02)
    assert [outcome for _, outcome in rows] == ["client_disconnected"] * 3
    # The upstream answered (its tokens are paid for, and priced): its status stays, as for a stream cut short.
    assert [status for status, _ in rows] == [200] * 3


async def test_a_body_in_a_transfer_coding_other_than_chunked_is_refused_for_what_it_is(
    bounded: RunningGateway,
) -> None:
    """The server undoes `chunked` only: a gzip transfer coding reached the gateway as compressed bytes,
    refused as "not valid JSON (byte 0)", which sent the client looking in the wrong place."""
    import gzip

    packed = gzip.compress(orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user()}))
    reader, writer = await connect(bounded)
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\ntransfer-encoding: gzip, chunked\r\nx-api-key: %s\r\n"
        b"content-type: application/json\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (bounded.key.encode(), len(packed), packed)
    )
    status, _, body = await read_answer(reader)
    error = orjson.loads(body)["error"]
    assert status == 415 and error["type"] == "invalid_request_error" and "gzip, chunked" in error["message"]
    writer.close()


async def test_an_answers_head_goes_out_with_the_first_of_its_body(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn wrote an answer's head, then its body: two sends and two packets for every quick answer and
    every stream. A JSON answer and an error go out in one write, a stream's head with its first event."""
    from poolgate.serve import BoundedHeadProtocol

    writes: list[bytes] = []

    class Recording:
        def __init__(self, transport: asyncio.Transport) -> None:
            self._transport = transport

        def write(self, data: bytes) -> None:
            writes.append(bytes(data))
            self._transport.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._transport, name)

    made = BoundedHeadProtocol.connection_made

    def recording(self: BoundedHeadProtocol, transport: asyncio.Transport) -> None:
        made(self, Recording(transport))  # type: ignore[arg-type]

    monkeypatch.setattr(BoundedHeadProtocol, "connection_made", recording)
    gw = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        reader, writer = await connect(gw)
        for body in (orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user()}), b"{not json"):
            writes.clear()
            writer.write(message_request(gw, body))
            status, _, answer = await read_answer(reader)
            assert status == (200 if body.startswith(b'{"') else 400)
            assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 ") and writes[0].endswith(answer)
        writes.clear()
        streamed = orjson.dumps({"model": MODEL, "max_tokens": 16, "stream": True, "messages": user()})
        writer.write(message_request(gw, streamed))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"text/event-stream" in head and writes[0].startswith(head)
        assert b"event: message_start" in writes[0][len(head) :]
        writer.close()
    finally:
        await gw.stop()


async def test_a_head_whose_body_is_not_sent_at_once_is_not_held_for_it() -> None:
    """The server holds an answer's head back only for the rest of the event loop's turn, for the body to go
    with it: an application that starts its answer and then waits (for an upstream, say) has its head sent."""
    import uvicorn

    from poolgate.serve import BoundedHeadProtocol

    head_read = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await head_read.wait()  # until the client has the head
        await send({"type": "http.response.body", "body": b"after the head", "more_body": False})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=BoundedHeadProtocol.bounded(ServerConfig()), lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        writer.write(b"GET / HTTP/1.1\r\nhost: gateway\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in head
        head_read.set()
        assert await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10) == b"e\r\nafter the head\r\n0\r\n\r\n"
        writer.close()
    finally:
        head_read.set()  # lets the request end, whatever happened to the test
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


async def test_connections_to_the_gateway_send_without_waiting_for_acks(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under asyncio's own event loop (no uvloop: Windows, or a gateway embedded in another program; these
    tests), the listening socket's protocol number was 0, so the loop never set TCP_NODELAY on the
    connections: each answer sent in two writes waited ~40 ms for the client's delayed ACK (Nagle)."""
    from poolgate.serve import BoundedHeadProtocol

    nodelay: list[int] = []
    made = BoundedHeadProtocol.connection_made

    def checking(self: BoundedHeadProtocol, transport: asyncio.Transport) -> None:
        made(self, transport)
        nodelay.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(BoundedHeadProtocol, "connection_made", checking)
    gw = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        reader, writer = await connect(gw)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
        assert (await read_answer(reader))[0] == 200
        writer.close()
    finally:
        await gw.stop()
    assert nodelay == [1]


BROWSER = b"origin: http://localhost:5173\r\nanthropic-dangerous-direct-browser-access: true\r\n"


@pytest.mark.parametrize(
    ("refused", "browser"),
    [("body stalled", True), ("head too large", True), ("head too slow", True), ("body stalled", False)],
)
async def test_a_browser_that_opted_in_can_read_the_servers_own_refusals(
    bounded: RunningGateway, refused: str, browser: bool
) -> None:
    """The server's own answers (a 408 to a stalled upload, a 431 or 408 to a head) had no CORS headers, which
    every answer of the gateway's to a browser that opted in has: its page saw a network error, not the answer
    (nor its request id). Those of a head are given what the head said before it was refused."""
    reader, writer = await connect(bounded)
    opt_in = BROWSER if browser else b""
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": user("cut off")})
    if refused == "body stalled":
        writer.write(message_request(bounded, body, opt_in)[: -len(body) // 2])
    elif refused == "head too large":
        writer.write(message_request(bounded, b"{}", opt_in + b"x-padding: " + b"a" * 40_000 + b"\r\n"))
    else:
        writer.write(b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\n" + opt_in + b"x-slow: ")
    status, headers, _ = await read_answer(reader)
    writer.close()
    assert status == {"body stalled": 408, "head too large": 431, "head too slow": 408}[refused]
    if not browser:
        assert b"access-control-allow-origin" not in headers
        return
    assert headers[b"access-control-allow-origin"] == b"*"
    exposed = {name.strip() for name in headers[b"access-control-expose-headers"].split(b",")}
    assert {b"request-id", b"retry-after", b"x-should-retry"} <= exposed


async def test_an_http_1_0_client_gets_its_stream_without_chunked_framing_and_the_end_of_the_connection_ends_it(
    bounded: RunningGateway,
) -> None:
    """HTTP/1.0 has no chunked transfer coding (RFC 9112, 6.1: a server must not send one to it): a stream, an
    answer of no known length, went to an HTTP/1.0 client (`ab`, a proxy speaking 1.0) chunked, its events
    interleaved with chunk sizes the client took for text. It goes as it is, ended by the connection's close."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 16, "stream": True, "messages": user()})
    reader, writer = await connect(bounded)
    writer.write(message_request(bounded, body).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    answer = await asyncio.wait_for(reader.read(), 10)  # up to the close
    head, _, events = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert events.startswith(b"event: message_start\n") and events.endswith(b'data: {"type":"message_stop"}\n\n')
    [row] = await recorded(bounded, usage.c.status, usage.c.outcome, usage.c.output_tokens, wait=True)
    assert (row.status, row.outcome, row.output_tokens) == (200, "ok", 16)
    writer.close()

"""Request heads are bounded: a gateway exposed to the network must not buffer a header of any size, nor
keep a connection open for a client that trickles its head in a byte at a time (slowloris)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from poolgate.config import ServerConfig
from poolgate.mock import MockServer
from tests.conftest import MODEL, RunningGateway, gateway_config, start_gateway, user


@pytest.fixture
async def bounded(tmp_path: Path, mock: MockServer) -> AsyncIterator[RunningGateway]:
    server = ServerConfig(max_head_bytes=16 * 1024, head_timeout_seconds=0.5)
    running = await start_gateway(gateway_config(tmp_path, mock.url, server=server))
    yield running
    await running.stop()


async def connect(gw: RunningGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


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


async def test_a_head_not_complete_in_time_is_408_and_the_connection_closes(bounded: RunningGateway) -> None:
    reader, writer = await connect(bounded)
    began = time.monotonic()
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
    assert status == 408 and time.monotonic() - began < 5
    assert orjson.loads(body)["error"]["type"] == "timeout_error"
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

"""Minimal ASGI plumbing for the hot path: reading bodies, answering, headers."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import Any

import orjson

from poolgate.api.errors import ApiError, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"


# A request's header fields by name (lower-case, as in ASGI scopes), each with the first value sent.
Fields = dict[bytes, bytes]


# The key of an `http.response.start` message for lines of its head the app rendered itself, each
# `name: value\r\n` (the policy's quota and budget headers, see `policy.Admission`: names and figures of its own
# making): `poolgate serve`'s request cycle (which says so, `takes_head_lines`) writes them last into the head,
# as they are, in one piece; for another server `delivery.TrackedSend` hands them over as header pairs.
HEAD_LINES = "poolgate.head_lines"


def header_pairs(lines: bytes) -> list[tuple[bytes, bytes]]:
    """Head lines (`name: value\r\n` each) as ASGI header pairs."""
    return [(name, value) for name, _, value in (line.partition(b": ") for line in lines.split(b"\r\n") if line)]


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of a header (names in ASGI scopes are already lower-case)."""
    for key, value in headers:
        if key == name:
            return value
    return None


def fields_of(headers: list[tuple[bytes, bytes]]) -> Fields:
    """A request's headers by name, each the first value sent (as `header` reads it). Built once per
    request, in C: a request's ten lookups, each a Python loop over its headers (most of them for headers it
    does not carry, read to the end), cost ~400 bytecodes."""
    fields = dict(headers)
    if len(fields) != len(headers):  # a name repeats: the first of its values, not the last
        fields = dict(reversed(headers))
    return fields


def connection_lost(send: Send) -> bool:
    """Whether the server knows already that the client is gone: uvicorn's request cycle says so (the
    `send` it hands over is its method) the moment the connection is lost; other servers tell only by an
    `http.disconnect`, which the disconnect watcher reads (from `delivery.WATCH_AFTER` on)."""
    return getattr(getattr(send, "__self__", None), "disconnected", False) is True


def server_flow(send: Send) -> Any:
    """uvicorn's flow control of the request cycle whose method `send` is (None under another server)."""
    return getattr(getattr(send, "__self__", None), "flow", None)


async def read_body(receive: Receive, limit: int, declared: bytes | None) -> bytes:
    """Read the whole request body, refusing it as soon as it is known to exceed `limit`. A body that stops
    arriving is the server's to time out (see `serve.BoundedHeadProtocol`): timing each receive here cost
    ~5 µs per request, though the usual body is whole in the first message."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"Request body exceeds the gateway limit of {limit} bytes")
        except ValueError:
            raise ApiError(400, "Invalid content-length header") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"Request body exceeds the gateway limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# What HTTP forbids in a field value (tab aside), and the server refuses to write.
FORBIDDEN_IN_HEADER = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


def header_text(value: bytes) -> str:
    """A header value as text: outside ASCII, UTF-8 where it is UTF-8 (`curl -H 'x-user: José'`; read as latin-1,
    its `é` was `Ã©`: in the session id the ledger kept, in a key in the log, and in the text aiohttp writes on
    as UTF-8, two bytes become four). Bytes that are not UTF-8 (a client writing latin-1) are read as latin-1."""
    if value.isascii():
        return value.decode("latin-1")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def header_bytes(value: str) -> bytes:
    """An upstream's header value as the bytes it sent: aiohttp decodes them as UTF-8 with surrogateescape
    (a value outside latin-1, a stray ✓ in a request id, made the answer a bare 500), less control
    characters, which aiohttp lets through and the server refuses to write (the client got its connection
    closed without an answer)."""
    if not value.isprintable():  # rare, and cheap to rule out: tab, control characters, undecodable bytes
        value = FORBIDDEN_IN_HEADER.sub("", value)
    return value.encode("utf-8", "surrogateescape")


class ClientDisconnected(Exception):
    """The client went away before the request was answered."""


# Where the server leaves the request id and `ApiError` it answered a request with itself (a body that
# stopped arriving, one that cannot be read) before the request sees its client gone: the request is accounted
# with that answer.
SERVER_ANSWER = "poolgate.server_answer"


async def respond(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    content_type: bytes = JSON,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, status: int, payload: object, headers: list[tuple[bytes, bytes]]) -> None:
    await respond(send, status, orjson.dumps(payload), headers)


async def respond_error(send: Send, error: ApiError, request_id: str) -> None:
    headers = [(b"request-id", request_id.encode()), *error.headers]
    await respond(send, error.status, error_body(error.error_type, error.message, request_id, error.details), headers)


class _Done:
    """An awaitable that is already done (awaiting it costs no coroutine)."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield


# What a plain function standing in for an `async def` (a `send`, say) hands back when it has nothing to await.
DONE = _Done()

"""Minimal ASGI plumbing for the hot path: reading bodies, answering, headers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from poolgate.api.errors import ApiError, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of a header (names in ASGI scopes are already lower-case)."""
    for key, value in headers:
        if key == name:
            return value
    return None


async def read_body(receive: Receive, limit: int, declared: bytes | None, idle_timeout: float) -> bytes:
    """Read the whole request body, refusing it as soon as it is known to exceed `limit`, or once no more of it
    has come for `idle_timeout` seconds (408, and the connection closes: the rest may still be on its way).
    The usual body is whole in the first message: only one in several parts pays for a timer per part."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"Request body exceeds the gateway limit of {limit} bytes")
        except ValueError:
            raise ApiError(400, "Invalid content-length header") from None
    chunks: list[bytes] = []
    size = 0
    message = await receive()
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"Request body exceeds the gateway limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
        try:
            async with asyncio.timeout(idle_timeout):
                message = await receive()
        except TimeoutError:
            raise ApiError(
                408,
                f"The request body stopped arriving: nothing of it for {idle_timeout:g} s",
                headers=[(b"connection", b"close")],
            ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def header_bytes(value: str) -> bytes:
    """An upstream's header value as the bytes it sent: aiohttp decodes them as UTF-8 with surrogateescape
    (a value outside latin-1, a stray ✓ in a request id, made the answer a bare 500)."""
    return value.encode("utf-8", "surrogateescape")


class ClientDisconnected(Exception):
    """The client went away before the request was answered."""


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
    await respond(send, error.status, error_body(error.error_type, error.message, request_id), headers)

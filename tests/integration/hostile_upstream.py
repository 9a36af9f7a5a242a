"""A hostile upstream for tests: a raw asyncio server on 127.0.0.1 that answers each request with exactly the
bytes a test scripts, framing faults included (a chunk shorter than announced, a content-length past the body
or short of it, a head dripping a byte at a time, a stream with bare CRs), which no HTTP server library writes.
Requests on one connection are read in turn (keep-alive), so a test sees which connection each request came on
and whether a fault poisoned the connection's next request."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


class Hold:
    """In a script: the connection is held open, nothing more written, until the server stops."""


class Close:
    """In a script: the connection is closed there (whatever the framing said was still to come)."""


HOLD = Hold()
CLOSE = Close()
# A script's step: bytes written at once (and drained), a pause in seconds, or the connection's fate.
Step = bytes | float | Hold | Close

MODEL = "claude-sonnet-4-5"
INPUT_TOKENS, OUTPUT_TOKENS = 11, 7
MESSAGE: dict[str, Any] = {
    "id": "msg_hostile",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS},
}
JSON_BODY = json.dumps(MESSAGE).encode()


def event(payload: dict[str, Any], name: str | None = None, end: bytes = b"\n") -> bytes:
    """One SSE event (`name`: its `event:` line, the payload's type unless given; `end`: its line end)."""
    kind = payload["type"] if name is None else name
    lines = ([b"event: " + kind.encode()] if kind else []) + [b"data: " + json.dumps(payload).encode()]
    return b"".join(line + end for line in lines) + end


OPENING_USAGE = {"input_tokens": INPUT_TOKENS, "output_tokens": 1}
MESSAGE_START = {
    "type": "message_start",
    "message": {**MESSAGE, "content": [], "stop_reason": None, "usage": OPENING_USAGE},
}
BLOCK_START = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
DELTA = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
BLOCK_STOP = {"type": "content_block_stop", "index": 0}
FINAL_USAGE = {"output_tokens": OUTPUT_TOKENS}
MESSAGE_DELTA = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": FINAL_USAGE}
MESSAGE_STOP = {"type": "message_stop"}
EVENTS = (MESSAGE_START, BLOCK_START, DELTA, BLOCK_STOP, MESSAGE_DELTA, MESSAGE_STOP)


def sse(events: Iterable[dict[str, Any]] = EVENTS, end: bytes = b"\n") -> bytes:
    """A stream's body: each event (`event`), its lines ended by `end`."""
    return b"".join(event(payload, end=end) for payload in events)


SSE_BODY = sse()


def head(status: int = 200, media_type: bytes = b"application/json", length: int | None = None, *extra: bytes) -> bytes:
    """A response head: a content-length when `length` is given, `extra` header lines as they are."""
    lines = [b"HTTP/1.1 %d %s" % (status, b"OK" if status < 300 else b"Status"), b"content-type: " + media_type]
    if length is not None:
        lines.append(b"content-length: %d" % length)
    return b"\r\n".join([*lines, *extra]) + b"\r\n\r\n"


def chunked(*pieces: bytes, last: bool = True) -> bytes:
    """A chunked body of `pieces`, each a chunk; `last`: with its terminal chunk."""
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces if piece)
    return body + (b"0\r\n\r\n" if last else b"")


def answer(stream: bool) -> bytes:
    """A whole, well-framed Messages answer: a stream or JSON."""
    body = SSE_BODY if stream else JSON_BODY
    return head(200, b"text/event-stream" if stream else b"application/json", len(body)) + body


def drip(data: bytes, every: float, size: int = 1) -> list[Step]:
    """`data` written `size` bytes at a time, `every` seconds apart."""
    steps: list[Step] = []
    for at in range(0, len(data), size):
        steps += [data[at : at + size], every]
    return steps[:-1]


@dataclass
class Request:
    connection: int  # which connection it came on (0: the first the server accepted)
    on_connection: int  # how many requests that connection had carried before it
    body: dict[str, Any]


@dataclass
class HostileUpstream:
    """Answers the n-th request with `scripts[n]`, the ones after the scripts with a whole answer (`answer`).
    A script that ends without `CLOSE` or `HOLD` leaves the connection open for its next request."""

    scripts: list[Sequence[Step]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    # What the server read on a connection after a request that it could not take for one (none: every byte
    # read was a request's).
    garbage: list[bytes] = field(default_factory=list)
    url: str = ""
    # How many scripts were written to their end (the connection left open for its next request).
    played: int = 0
    _connections: int = 0
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection, carried = self._connections, 0
        self._connections += 1
        try:
            while (body := await self._read_request(reader)) is not None:
                self.requests.append(Request(connection, carried, body))
                carried += 1
                n = len(self.requests) - 1
                script = self.scripts[n] if n < len(self.scripts) else [answer(bool(body.get("stream")))]
                if not await self._play(script, writer):
                    return
                self.played += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        """The JSON body of the next request on a connection; None once it is closed or holds no request."""
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                self.garbage.append(exc.partial)
            return None
        lines = raw.split(b"\r\n")
        if not lines[0].startswith((b"POST ", b"GET ")):
            self.garbage.append(raw)
            return None
        length = next((int(line[15:]) for line in lines if line.lower().startswith(b"content-length:")), 0)
        data = await reader.readexactly(length)
        return json.loads(data) if data else {}

    async def _play(self, script: Sequence[Step], writer: asyncio.StreamWriter) -> bool:
        """Writes a script; False when it left the connection closed (or held until the server stops)."""
        for step in script:
            if isinstance(step, Close):
                return False
            if isinstance(step, Hold):
                await self._stopping.wait()
                return False
            if isinstance(step, float):
                await asyncio.sleep(step)
            else:
                writer.write(step)
                await writer.drain()
        return True


@contextlib.asynccontextmanager
async def hostile_upstream(*scripts: Sequence[Step]) -> AsyncIterator[HostileUpstream]:
    """A `HostileUpstream` serving on a free port of 127.0.0.1 (its `url`), stopped on the way out."""
    upstream = HostileUpstream(list(scripts))
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield upstream
    finally:
        upstream._stopping.set()
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)

"""Reading a stream's Server-Sent Events as far as the relay needs: where whole events end in what has come
so far (the relay holds back the rest, so that a break never glues an `error` event to half an event), and a
stream's first event, read whole before the client gets a byte so that an opening error can still fail over.
"""

from __future__ import annotations

import re

import aiohttp

# The first event is read whole before the client gets a byte, and an event is held back until it is whole
# (a break in the middle of one ends the stream on an `error` event of its own, not glued to half an event)
# unless it grows past this: far more than any event carries (a web fetch's result is tens of KB).
EVENT_CAP = 1024 * 1024
# An event ends with a blank line; SSE lines end with \n, \r\n or \r.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
BOM = b"\xef\xbb\xbf"
# What every real answer opens with: a stream that does is relayed without a closer look.
USUAL_OPENING = b"event: message_start"


def whole_events(data: bytes, since: int = 0) -> int:
    """How many bytes of `data` are whole events: up to the end of its last blank line (0: none). `since`:
    no event ends before this offset (what was held back of a long event is not searched again)."""
    if data.endswith(b"\n\n"):  # the usual read: whole events, as the API sends them
        return len(data)
    ends = [match.end() for match in _EVENT_END.finditer(data, max(0, since - 3))]
    return ends[-1] if ends else 0


def first_event(head: bytes) -> tuple[bytes, bytes] | None:
    """The first event a stream's bytes dispatch, as (its `event` field, its data), once it is whole; None
    before. Blocks of comments only (`: keepalive`) and blank lines dispatch nothing, as in a browser."""
    event, data = b"", []
    for line in _LINE_END.split(head.removeprefix(BOM))[:-1]:  # the last piece has no line end yet
        if line:
            if line.startswith(b"event:"):
                event = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
        elif event or data:
            return event, b"\n".join(data)
    return None


async def read_first_event(content: aiohttp.StreamReader) -> bytes:
    """A stream's bytes up to the end of its first event at least (the first read usually holds it whole),
    all of it if it ends sooner, or `EVENT_CAP` bytes."""
    head = await content.readany()
    while head and len(head) < EVENT_CAP and not (head.startswith(USUAL_OPENING) and head.find(b"\n\n") >= 0):
        if first_event(head) is not None:
            break
        chunk = await content.readany()
        if not chunk:
            break
        head += chunk
    return head

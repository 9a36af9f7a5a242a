"""The gateway writes an answer's head itself (`serve._OneWriteCycle._head_of`, cheaper per header than
uvicorn's `send`): it must be the head uvicorn writes, with the same framing, and refuse what uvicorn refuses."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from poolgate.api.http import HEAD_LINES
from poolgate.serve import _OneWriteCycle

DEFAULT_HEADERS = [(b"date", b"Mon, 07 Dec 2026 00:52:44 GMT")]
# Names a gateway's answers carry, in the cases clients and upstreams write them, and framing ones.
NAMES = [
    b"content-type",
    b"Content-Type",
    b"request-id",
    b"x-poolgate-quota-remaining-requests-per-minute",
    b"Retry-After",
    b"content-length",
    b"Content-Length",
    b"transfer-encoding",
    b"connection",
    b"Connection",
]
VALUES = [b"application/json", b"chunked", b"CHUNKED", b"close", b"keep-alive, Close", b"12", b"0", b"a\tb"]
# Single bytes that make a value or a name invalid, or not.
ODD = [b"\r", b"\n", b"\r\n", b"\x00", b"\x7f", b"\x1f", b"\t", b" ", b":", b"\xe9"]

names = st.one_of(
    st.sampled_from(NAMES),
    st.builds(bytes.__add__, st.sampled_from(NAMES), st.sampled_from(ODD)),
    st.binary(max_size=8),
)
values = st.one_of(
    st.sampled_from(VALUES),
    st.builds(bytes.__add__, st.sampled_from(VALUES), st.sampled_from(ODD)),
    st.binary(max_size=12),
)


def cycle(kind: type[RequestResponseCycle], method: str, keep_alive: bool, written: list[bytes]) -> Any:
    transport = SimpleNamespace(write=written.append)
    scope = {"method": method, "http_version": "1.1", "headers": [], "path": "/v1/messages", "query_string": b""}
    flow = SimpleNamespace(write_paused=False)
    logger = logging.getLogger("test.head")
    made = kind(
        scope,  # type: ignore[arg-type]
        transport,  # type: ignore[arg-type]
        flow,  # type: ignore[arg-type]
        logger,
        logger,
        False,
        DEFAULT_HEADERS,
        asyncio.Event(),
        False,
        keep_alive,
        lambda: None,
    )
    made.more_body = False  # an answer to a request read whole, as answers are but the ones below
    return made


def uvicorns_head(message: dict[str, Any], method: str, keep_alive: bool) -> tuple[Any, ...]:
    written: list[bytes] = []
    server = cycle(RequestResponseCycle, method, keep_alive, written)
    step = server.send(message)
    try:
        step.send(None)
    except StopIteration:
        pass
    except (RuntimeError, ValueError):
        return ("refused",)
    return (b"".join(written), server.chunked_encoding, server.expected_content_length, server.keep_alive)


def gateways_head(message: dict[str, Any], method: str, keep_alive: bool) -> tuple[Any, ...]:
    server = cycle(_OneWriteCycle, method, keep_alive, [])
    try:
        head = server._head_of(message)
    except (RuntimeError, ValueError):
        return ("refused",)
    return (head, server.chunked_encoding, server.expected_content_length, server.keep_alive)


@settings(max_examples=400)
@given(
    headers=st.lists(st.tuples(names, values), max_size=8),
    status=st.sampled_from([200, 204, 304, 400, 429, 529]),
    method=st.sampled_from(["POST", "GET", "HEAD"]),
    keep_alive=st.booleans(),
)
def test_an_answers_head_is_the_one_uvicorn_writes_and_an_invalid_header_is_refused_as_uvicorn_refuses_it(
    headers: list[tuple[bytes, bytes]], status: int, method: str, keep_alive: bool
) -> None:
    message = {"type": "http.response.start", "status": status, "headers": headers}
    assert gateways_head(message, method, keep_alive) == uvicorns_head(message, method, keep_alive)


def test_an_answer_begun_before_the_body_came_whole_says_its_connection_ends() -> None:
    """A 401 before the body, a 413: the connection ends after it (a lingering close, see `on_response_complete`),
    which the answer says, without ending it at once (`keep_alive` as it was: closed at once, the client's data
    still coming would reset the connection before it read its answer)."""
    server = cycle(_OneWriteCycle, "POST", True, [])
    server.more_body = True
    head = server._head_of({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"5")]})
    assert b"\r\nconnection: close\r\n" in head and server.keep_alive


def test_a_value_with_a_line_break_is_refused_not_written_as_a_second_header() -> None:
    """A header value smuggling a CR LF (response splitting) is refused, whichever header carries it."""
    for value in (b"x\r\nset-cookie: a=b", b"x\nset-cookie: a=b", b"x\rset-cookie: a=b"):
        message = {"type": "http.response.start", "status": 200, "headers": [(b"request-id", value)]}
        assert gateways_head(message, "POST", True) == ("refused",)
    fine = {"type": "http.response.start", "status": 200, "headers": [(b"request-id", b"req_1")]}
    assert gateways_head(fine, "POST", True)[0].endswith(b"request-id: req_1\r\ntransfer-encoding: chunked\r\n\r\n")


# What the policy renders into head lines (`api.http.HEAD_LINES`): its own names; figures, dates, amounts.
RENDERED_NAMES = [
    b"x-poolgate-quota-limit-requests-per-minute",
    b"x-poolgate-quota-remaining-output-tokens-per-day",
    b"x-poolgate-budget-spent-usd",
]
rendered_values = st.from_regex(rb"\A[0-9A-Za-z:.-]{0,24}\Z")


def lines_of(head: tuple[Any, ...]) -> tuple[Any, ...]:
    """A head's status line and its header lines in any order, and the framing it leaves."""
    if head == ("refused",):
        return head
    status, *fields = head[0].split(b"\r\n")
    return (status, sorted(fields), *head[1:])


async def drained() -> None:
    """A paused flow's drain, which the client resumed at once."""


@settings(max_examples=300)
@given(
    headers=st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=4),
    rendered=st.lists(st.tuples(st.sampled_from(RENDERED_NAMES), rendered_values), min_size=1, max_size=4),
    status=st.sampled_from([200, 204, 429]),
    keep_alive=st.booleans(),
    paused=st.booleans(),
)
def test_head_lines_the_app_rendered_go_out_as_the_same_headers_would(
    headers: list[tuple[bytes, bytes]],
    rendered: list[tuple[bytes, bytes]],
    status: int,
    keep_alive: bool,
    paused: bool,
) -> None:
    """The policy's quota and budget headers, rendered as lines, make a head of the same header lines (after
    the others) as the same headers given as pairs, also when uvicorn's own send writes it (a client not
    reading when the answer starts)."""
    lines = b"".join(b"%s: %s\r\n" % pair for pair in rendered)
    with_lines = {"type": "http.response.start", "status": status, "headers": headers, HEAD_LINES: lines}
    as_pairs = {"type": "http.response.start", "status": status, "headers": [*headers, *rendered]}
    expected = uvicorns_head(as_pairs, "POST", keep_alive)
    if not paused:
        assert lines_of(gateways_head(with_lines, "POST", keep_alive)) == lines_of(expected)
        return
    written: list[bytes] = []
    server = cycle(_OneWriteCycle, "POST", keep_alive, written)
    server.flow.write_paused = True
    server.flow.drain = drained
    try:
        server.send(with_lines).send(None)
    except StopIteration:
        pass
    except (RuntimeError, ValueError):
        assert expected == ("refused",)
        return
    assert (b"".join(written), server.chunked_encoding, server.expected_content_length, server.keep_alive) == expected

"""Upstreams that misbehave at the HTTP and SSE framing level (a head or a body dripping a byte at a time, bytes
after an answer's end on a kept-alive connection, garbled usage), against `HostileUpstream`: what the client
gets, what the usage record says, what happens to the account, and whether the next request is fine."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiohttp
import pytest

from poolgate.billing.book import USAGE_UNREPORTED
from poolgate.config import RoutingConfig, UpstreamConfig, UpstreamTimeouts
from poolgate.lifecycle.sse import EVENT_CAP
from poolgate.mock import MockServer
from tests.conftest import MOCK_KEYS, RunningGateway, gateway_config, start_gateway, usage_rows
from tests.integration.hostile_upstream import (
    BLOCK_START,
    BLOCK_STOP,
    CLOSE,
    DELTA,
    EVENTS,
    HOLD,
    INPUT_TOKENS,
    JSON_BODY,
    MESSAGE,
    MESSAGE_DELTA,
    MESSAGE_START,
    MESSAGE_STOP,
    MODEL,
    OUTPUT_TOKENS,
    SSE_BODY,
    HostileUpstream,
    Step,
    chunked,
    drip,
    event,
    head,
    hostile_upstream,
    sse,
)

# Short, so that a fault past them costs the test a second; the drips below outlast them several times over. The
# idle timeout is longer: only the first byte's deadline can cut what trickles in before the client's first byte.
TIMEOUTS = UpstreamTimeouts(connect_seconds=1, first_byte_seconds=1, idle_seconds=30)


@contextlib.asynccontextmanager
async def hostile_first(
    tmp_path: Path, mock: MockServer, *scripts: Sequence[Step], alone: bool = False
) -> AsyncIterator[tuple[HostileUpstream, RunningGateway]]:
    """A gateway whose first account (first-pick) is a `HostileUpstream` playing `scripts`, the mock behind it
    (`alone`: no other account)."""
    async with hostile_upstream(*scripts) as upstream:
        hostile = UpstreamConfig(id="hostile", base_url=upstream.url, api_key="sk-ant-api03-hostile-0123456789")
        behind = () if alone else (UpstreamConfig(id="api", base_url=mock.url, api_key=MOCK_KEYS[0]),)
        upstreams = (hostile, *behind)
        config = gateway_config(
            tmp_path, mock.url, upstreams=upstreams, routing=RoutingConfig(strategy="first-pick"), timeouts=TIMEOUTS
        )
        gw = await start_gateway(config)
        try:
            yield upstream, gw
        finally:
            await gw.stop()


async def ask(gw: RunningGateway, stream: bool) -> tuple[int, bytes, str]:
    """A Messages request as a client sends it: its status, body and the account that answered."""
    headers = {"x-api-key": gw.key, "anthropic-version": "2023-06-01"}
    body = {"model": MODEL, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gw.url}/v1/messages", json=body, headers=headers) as r,
    ):
        return r.status, await r.read(), r.headers.get("x-poolgate-upstream", "")


def streamed(stream: bool) -> tuple[bytes, bytes]:
    """A whole answer's media type and body."""
    return (b"text/event-stream", SSE_BODY) if stream else (b"application/json", JSON_BODY)


def dripping_head(stream: bool) -> list[Step]:
    media_type, body = streamed(stream)
    # ~4 s for the head, a byte every 50 ms: each byte well within any silence the gateway allows.
    return [*drip(head(200, media_type, len(body), b"x-pad: " + b"p" * 20), 0.05), body]


def dripping_json() -> list[Step]:
    return [head(200, b"application/json", len(JSON_BODY)), *drip(JSON_BODY, 0.1, 8)]  # ~3 s for the body


def comments_before_the_first_event() -> list[Step]:
    # A proxy's keepalive comments, one every 100 ms for ~3 s, before the stream's first event.
    prelude = [step for _ in range(30) for step in (b": keepalive\n\n", 0.1)]
    return [head(200, b"text/event-stream", None, b"connection: close"), *prelude, SSE_BODY]


def endless_interim_answers() -> list[Step]:
    # `103 Early Hints`, one every 100 ms for ~3 s (each a whole answer to aiohttp, which reads on), then the answer.
    hints: list[Step] = [b"HTTP/1.1 103 Early Hints\r\n\r\n", 0.1]
    return [*hints * 30, head(200, b"application/json", len(JSON_BODY)) + JSON_BODY]


@pytest.mark.parametrize(
    ("script", "stream"),
    [
        pytest.param(dripping_head(False), False, id="head-json"),
        pytest.param(dripping_head(True), True, id="head-stream"),
        pytest.param(dripping_json(), False, id="json-body"),
        pytest.param(comments_before_the_first_event(), True, id="comments-before-first-event"),
        pytest.param(endless_interim_answers(), False, id="interim-answers-for-ever"),
    ],
)
async def test_an_answer_trickling_in_before_the_clients_first_byte_is_bounded_by_the_first_byte_timeout(
    tmp_path: Path, mock: MockServer, script: list[Step], stream: bool
) -> None:
    """aiohttp's read timeout is a silence: a head (or a JSON body, or a stream's keepalive comments) arriving a
    byte at a time kept the request waiting as long as the upstream pleased, the client with nothing, well past
    `first_byte_seconds`. The wait for the client's first byte is bounded as a whole: past it, failover."""
    async with hostile_first(tmp_path, mock, script) as (upstream, gw):
        status, _, served_by = await ask(gw, stream)
        [row] = await usage_rows(gw)
        hostile = gw.gateway.pool.get("hostile")
        route = gw.gateway.traces.get(row["request_id"])
    assert (status, served_by) == (200, "api") and len(upstream.requests) == 1
    assert (row["status"], row["outcome"], row["attempts"], row["upstream_id"]) == (200, "ok", 2, "api")
    assert route is not None
    [failed] = route["failed"]  # type: ignore[misc]
    assert (failed["upstream_id"], failed["status"], failed["error_type"]) == ("hostile", 529, "timeout_error")
    assert failed["message"] == "Upstream account did not answer within 1 s"
    assert hostile is not None and hostile.health.consecutive_failures == 1


async def test_a_whole_json_answer_whose_framing_stalls_is_relayed_at_the_first_byte_deadline(
    tmp_path: Path, mock: MockServer
) -> None:
    """The first byte's deadline cuts a JSON body's wait, yet an answer that came whole before its framing
    stalled (a chunked body without its last chunk, held open) is relayed, as when the framing breaks: failing
    over had another account generate and bill it again."""
    script = [head(200, b"application/json", None, b"transfer-encoding: chunked"), chunked(JSON_BODY, last=False)]
    async with hostile_first(tmp_path, mock, [*script, HOLD]) as (_, gw):
        status, body, served_by = await ask(gw, False)
        [row] = await usage_rows(gw)
    assert (status, served_by, body) == (200, "hostile", JSON_BODY) and mock.stats.requests_total == 0
    assert (row["status"], row["outcome"], row["attempts"], row["output_tokens"]) == (200, "ok", 1, OUTPUT_TOKENS)


RATE_LIMITED = json.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}).encode()


@pytest.mark.parametrize(("status", "extra"), [(429, b"retry-after: 600"), (500, b"x-pad: 0")])
async def test_an_error_whose_body_trickles_past_the_first_byte_deadline_keeps_its_status(
    tmp_path: Path, mock: MockServer, status: int, extra: bytes
) -> None:
    """An error's head came in time, its body a byte at a time past the deadline: the attempt was taken for
    one never answered, so a 429's `retry-after` parked nothing (the next request went to the account again,
    and waited for it again). What the head said stands; the body is not waited for."""
    script = [head(status, b"application/json", len(RATE_LIMITED), extra), *drip(RATE_LIMITED, 0.1, 4)]
    async with hostile_first(tmp_path, mock, script, script) as (upstream, gw):
        first = await ask(gw, False)
        second = await ask(gw, False)
        rows = await usage_rows(gw)
        hostile = gw.gateway.pool.get("hostile")
        route = gw.gateway.traces.get(rows[0]["request_id"])
    assert (first[0], first[2], second[0], second[2]) == (200, "api", 200, "api")
    assert route is not None
    [failed] = route["failed"]  # type: ignore[misc]
    assert (failed["upstream_id"], failed["status"]) == ("hostile", status)
    assert hostile is not None
    if status == 429:  # parked by its retry-after: the second request did not go there
        assert len(upstream.requests) == 1 and hostile.health.parked_until > 0
        assert hostile.health.consecutive_failures == 0
    else:  # a server error: a failure of its health, as one that came whole
        assert hostile.health.consecutive_failures == 1 and not hostile.health.healthy


# Counts a proxy garbled: a string, a fraction, a negative number, one beyond any count.
GARBLED = {
    "input_tokens": "11",
    "output_tokens": 7.5,
    "cache_read_input_tokens": -1,
    "cache_creation_input_tokens": 1e30,
}


def with_usage(usage: dict[str, object], stream: bool) -> list[Step]:
    """A whole answer whose every usage object is `usage`."""
    if not stream:
        body = json.dumps({**MESSAGE, "usage": usage}).encode()
        return [head(200, b"application/json", len(body)) + body]
    start = {**MESSAGE_START, "message": {**MESSAGE_START["message"], "usage": usage}}
    body = sse([start, BLOCK_START, DELTA, BLOCK_STOP, {**MESSAGE_DELTA, "usage": usage}, MESSAGE_STOP])
    return [head(200, b"text/event-stream", len(body)) + body]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_whose_usage_counts_are_garbled_has_an_unknown_cost_not_zero(
    tmp_path: Path, mock: MockServer, stream: bool
) -> None:
    """A usage object none of whose counts could be read was taken for a report of zero tokens: the answer was
    recorded free, where one without usage is an unknown cost (`usage-unreported`), never 0."""
    async with hostile_first(tmp_path, mock, with_usage(GARBLED, stream)) as (_, gw):
        for _ in range(2):  # the second a whole answer, priced
            assert (await ask(gw, stream))[0] == 200
        garbled, whole = await usage_rows(gw)
    assert (garbled["outcome"], garbled["input_tokens"]) == ("ok", 0)
    assert (garbled["pricing_version"], garbled["cost_micro_usd"]) == (USAGE_UNREPORTED, None)
    assert whole["pricing_version"] != USAGE_UNREPORTED and whole["cost_micro_usd"] > 0


async def test_a_streams_final_output_count_garbled_is_estimated_as_one_left_out(
    tmp_path: Path, mock: MockServer
) -> None:
    """A `message_delta` whose output count was not a number was taken for the final count all the same: the
    output stayed at `message_start`'s 1 token, where a count left out is estimated from the content passed."""
    final = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
    scripts = [
        sse([MESSAGE_START, BLOCK_START, DELTA, BLOCK_STOP, last, MESSAGE_STOP])
        for last in (
            {**final, "usage": {"output_tokens": "7"}},
            final,
        )
    ]
    async with hostile_first(tmp_path, mock, *([head(200, b"text/event-stream", len(s)) + s] for s in scripts)) as (
        _,
        gw,
    ):
        for _ in scripts:
            assert (await ask(gw, True))[0] == 200
        garbled, left_out = await usage_rows(gw)
    assert garbled["output_tokens"] == left_out["output_tokens"] > 1
    assert garbled["input_tokens"] == left_out["input_tokens"] == INPUT_TOKENS


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([CLOSE], id="closed-without-a-byte"),
        pytest.param([b"HTTP/1.1 200 OK\r\ncontent-ty", CLOSE], id="closed-mid-head"),
    ],
)
async def test_an_account_that_hangs_up_before_its_answer_is_not_called_unreachable(
    tmp_path: Path, mock: MockServer, script: list[Step]
) -> None:
    """It took the connection and the request, then closed it: the trace, the access log and (when no account
    answers) the client's 529 said "unreachable", which sent the operator after its address or its firewall."""
    async with hostile_first(tmp_path, mock, script) as (upstream, gw):
        status, _, served_by = await ask(gw, False)
        [row] = await usage_rows(gw)
        route = gw.gateway.traces.get(row["request_id"])
    assert (status, served_by, len(upstream.requests)) == (200, "api", 1)
    assert route is not None
    [failed] = route["failed"]  # type: ignore[misc]
    assert (failed["status"], failed["error_type"]) == (529, "connection_error")
    assert failed["message"] == "Upstream account closed the connection before its answer"


@pytest.mark.parametrize("status", [600, 999])
async def test_an_upstream_status_beyond_http_s_reaches_the_client_as_a_502(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """HTTP's syntax allows any three digits, and a proxy may use them: relayed as the client's status, it was
    refused by the server (no such status line), the client's connection dropped without an answer and a
    traceback logged. It is a bad gateway's answer: a 502 with the account's error."""
    error = b'{"type":"error","error":{"type":"api_error","message":"odd"}}'
    answer = b"HTTP/1.1 %d Odd\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        len(error),
        error,
    )
    async with hostile_first(tmp_path, mock, [answer], alone=True) as (_, gw):
        answered, body, served_by = await ask(gw, False)
        [row] = await usage_rows(gw)
    assert (answered, served_by) == (502, "hostile")
    assert json.loads(body)["error"] == {"type": "api_error", "message": "odd"}
    assert (row["status"], row["outcome"], row["error_type"]) == (502, "upstream_error", "api_error")
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def framed(stream: bool, *extra: bytes, version: bytes = b"HTTP/1.1", before: bytes = b"") -> list[Step]:
    """A whole answer with `extra` header lines, on an HTTP `version`, after the interim answers `before`."""
    media_type, body = streamed(stream)
    answer = head(200, media_type, len(body), *extra).replace(b"HTTP/1.1", version, 1) + body
    return [before + answer]


def unframed(stream: bool) -> list[Step]:
    """An HTTP/1.0 answer without a length: its body ends with the connection."""
    media_type, body = streamed(stream)
    return [b"HTTP/1.0 200 OK\r\ncontent-type: " + media_type + b"\r\n\r\n" + body, CLOSE]


def events_as(stream: bytes, *steps: Step) -> list[Step]:
    """A stream's `stream` bytes (`steps`: what is written after its head, default the bytes at once)."""
    return [head(200, b"text/event-stream", len(stream)), *(steps or (stream,))]


def gzipped(stream: bool) -> list[Step]:
    media_type, body = streamed(stream)
    packed = gzip.compress(body)
    return [head(200, media_type, len(packed), b"content-encoding: gzip") + packed]


def with_extensions(stream: bool) -> list[Step]:
    """A chunked body with a chunk extension and a trailer, both allowed and meaningless here."""
    media_type, body = streamed(stream)
    chunk = b"%x;ext=1\r\n%s\r\n0\r\nx-trailer: t\r\n\r\n" % (len(body), body)
    return [head(200, media_type, None, b"transfer-encoding: chunked") + chunk]


BIG = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x" * (1 << 20)}}
CRLF, CR = sse(end=b"\r\n"), sse(end=b"\r")
DECORATED = b": hello\n\nretry: 1000\n\n" + b"".join(b"id: %d\n: c\n" % n + event(e) for n, e in enumerate(EVENTS))
NAMELESS = b"".join(event(e, name="") for e in EVENTS)
TWICE = sse([MESSAGE_START, *EVENTS])
LONG = sse([MESSAGE_START, BLOCK_START, BIG, BLOCK_STOP, MESSAGE_DELTA, MESSAGE_STOP])
# Framings of a whole answer that HTTP allows, for both kinds of answer; then SSE's, for a stream.
FRAMINGS: dict[str, Callable[[bool], list[Step]]] = {
    "100-continue": lambda stream: framed(stream, before=b"HTTP/1.1 100 Continue\r\n\r\n"),
    "103-early-hints": lambda stream: framed(stream, before=b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"),
    "obs-fold": lambda stream: framed(stream, b"x-folded: a\r\n  b"),
    "gzip-despite-identity": gzipped,
    "chunk-extension-and-trailer": with_extensions,
    "http-1.0-no-length": unframed,
}
STREAM_FRAMINGS: dict[str, list[Step]] = {
    "a-byte-per-write": events_as(SSE_BODY, *drip(SSE_BODY, 0.0005)),
    "crlf": events_as(CRLF),
    "bare-cr": events_as(CR),
    "bare-cr-a-byte-per-write": events_as(CR, *drip(CR, 0.0005)),
    "comments-retry-id": events_as(DECORATED),
    "no-event-lines": events_as(NAMELESS),
    "two-message-starts": events_as(TWICE),
    "a-data-line-over-1-mib": events_as(LONG),
    "invalid-utf-8": events_as(SSE_BODY.replace(b'"hi"', b'"h\xff\xfei"')),
}


def whole(body: bytes, stream: bool) -> bool:
    """Whether a client's answer is the account's whole answer."""
    return b"message_stop" in body and b'"error"' not in body if stream else json.loads(body) == MESSAGE


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_in_any_framing_an_http_client_must_read_is_relayed_whole(
    tmp_path: Path, mock: MockServer, stream: bool
) -> None:
    """Framings HTTP and SSE allow, however unusual, one request each in turn on one account: the client gets
    the account's answer whole, its usage is recorded, and the account stays healthy (each answer is the next
    request on the account after the one before: none left its connection unfit for it)."""
    framings = {name: script(stream) for name, script in FRAMINGS.items()} | (STREAM_FRAMINGS if stream else {})
    async with hostile_first(tmp_path, mock, *framings.values()) as (upstream, gw):
        answers = {name: await ask(gw, stream) for name in framings}
        rows = await usage_rows(gw)
        hostile = gw.gateway.pool.get("hostile")
    relayed = {name: (status, served_by, whole(body, stream)) for name, (status, body, served_by) in answers.items()}
    assert relayed == dict.fromkeys(framings, (200, "hostile", True))
    recorded = [(row["status"], row["outcome"], row["input_tokens"], row["output_tokens"]) for row in rows]
    assert recorded == [(200, "ok", INPUT_TOKENS, OUTPUT_TOKENS)] * len(framings)
    assert hostile is not None and hostile.health.consecutive_failures == 0 and len(upstream.requests) == len(framings)


def broken(stream: bool, fault: str) -> list[Step]:
    """An answer whose framing or head no HTTP client can read (`fault`), then the connection closed."""
    media_type, body = streamed(stream)
    faults = {
        "bad-chunk-size": head(200, media_type, None, b"transfer-encoding: chunked") + b"zz\r\n" + body,
        "transfer-encoding-and-content-length": head(200, media_type, 5, b"transfer-encoding: chunked") + body,
        "negative-content-length": head(200, media_type, None, b"content-length: -1") + body,
        "two-content-lengths": head(200, media_type, len(body), b"content-length: 5") + body,
        "content-length-short-of-the-body": head(200, media_type, len(body) - 20) + body,
        "header-over-8-kib": head(200, media_type, len(body), b"x-huge: " + b"h" * 100_000) + body,
        "nul-in-a-header": head(200, media_type, len(body), b"x-bad: a\x00b") + body,
        "brotli-despite-identity": head(200, media_type, 10, b"content-encoding: br") + b"\x00" * 10,
        "gzip-that-is-not": head(200, media_type, 10, b"content-encoding: gzip") + b"\x00" * 10,
        "four-digit-status": b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
        "http-2-status-line": b"HTTP/2 200\r\ncontent-length: 0\r\n\r\n",
        "closed-mid-head": b"HTTP/1.1 200 OK\r\ncontent-ty",
    }
    return [faults[fault], CLOSE]


UNREADABLE = (
    "bad-chunk-size",
    "transfer-encoding-and-content-length",
    "negative-content-length",
    "two-content-lengths",
    "content-length-short-of-the-body",
    "header-over-8-kib",
    "nul-in-a-header",
    "brotli-despite-identity",
    "gzip-that-is-not",
    "four-digit-status",
    "http-2-status-line",
    "closed-mid-head",
)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_no_http_client_can_read_is_failed_over_from_and_the_next_is_fine(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    """Alone in the pool, an account answering what no HTTP client can read (each fault in turn, each followed
    by a whole answer): its request is answered with the pool's 529 in Anthropic's shape (never a 500 of the
    gateway's, nor a traceback logged) and counted as the account's failure; the broken connection is not
    reused, and the account's next request is answered."""
    scripts = [step for fault in UNREADABLE for step in (broken(stream, fault), framed(stream))]
    async with hostile_first(tmp_path, mock, *scripts, alone=True) as (upstream, gw):
        answers = {fault: [await ask(gw, stream) for _ in range(2)] for fault in UNREADABLE}
        rows = await usage_rows(gw)
        hostile = gw.gateway.pool.get("hostile")
    told = {
        fault: (failed, json.loads(refusal)["error"]["type"], answered, whole(body, stream))
        for fault, [(failed, refusal, _), (answered, body, _)] in answers.items()
    }
    assert told == dict.fromkeys(UNREADABLE, (529, "overloaded_error", 200, True))
    recorded = [(row["status"], row["outcome"], row["upstream_id"]) for row in rows]
    assert recorded == [(529, "upstream_error", "hostile"), (200, "ok", "hostile")] * len(UNREADABLE)
    assert [request.on_connection for request in upstream.requests[1::2]] == [0] * len(UNREADABLE)
    assert hostile is not None and hostile.health.healthy and hostile.stats.error_rate(0) > 0
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "late", [pytest.param(b"GARBAGE\r\n\r\n", id="garbage"), pytest.param(b"", id="a-whole-answer-more")]
)
async def test_bytes_after_an_answers_end_never_reach_the_next_request_on_its_connection(
    tmp_path: Path, mock: MockServer, stream: bool, late: bytes
) -> None:
    """An upstream (or a proxy) that writes more after an answer's end, while its kept-alive connection waits
    in the pool: read as the next request's answer, they would poison it (a whole answer more would be relayed
    to another caller). The connection is dropped; the next request goes on a new one and gets its own answer."""
    media_type, body = streamed(stream)
    late = late or head(200, media_type, len(body)) + body.replace(b'"hi"', b'"not yours"')
    async with hostile_first(tmp_path, mock, [*framed(stream), 0.05, late], alone=True) as (upstream, gw):
        first = await ask(gw, stream)
        for _ in range(100):  # until the late bytes were written, and read by the gateway's connection
            if upstream.played:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        second = await ask(gw, stream)
        rows = await usage_rows(gw)
        hostile = gw.gateway.pool.get("hostile")
    for status, answer, served_by in (first, second):
        assert (status, served_by) == (200, "hostile") and b"not yours" not in answer and b'"hi"' in answer
    assert [(request.connection, request.on_connection) for request in upstream.requests] == [(0, 0), (1, 0)]
    assert [(row["status"], row["outcome"]) for row in rows] == [(200, "ok")] * 2
    assert hostile is not None and hostile.health.consecutive_failures == 0


@pytest.mark.parametrize(
    "junk",
    [
        pytest.param((b"<div>" + b"x" * 100 + b"</div>\n") * 20_000, id="a-page-of-lines"),
        pytest.param(gzip.compress(b"\0" * (64 << 20)), id="a-gzip-bomb"),
    ],
)
async def test_a_stream_whose_first_mib_holds_no_event_is_failed_over_from_not_relayed(
    tmp_path: Path, mock: MockServer, junk: bytes
) -> None:
    """A 200 `text/event-stream` that opens with more than an event's worth of bytes dispatching no event (a
    page served as a stream, a proxy's gzip bomb despite `accept-encoding: identity`) was relayed as the
    stream: the client got a 200 and megabytes of what no SDK reads (a gigabyte of NULs from a 1 MB bomb).
    It is no API answer: failed over, as a 200 with a body that is not one."""
    encoding = (b"content-encoding: gzip",) if junk.startswith(b"\x1f\x8b") else ()
    script = [head(200, b"text/event-stream", len(junk), *encoding) + junk]
    async with hostile_first(tmp_path, mock, script) as (_, gw):
        status, body, served_by = await ask(gw, True)
        [row] = await usage_rows(gw)
        hostile = gw.gateway.pool.get("hostile")
    assert (status, served_by) == (200, "api") and len(body) < EVENT_CAP
    assert (row["status"], row["outcome"], row["attempts"]) == (200, "ok", 2)
    assert hostile is not None and not hostile.health.healthy

"""A stream's answer starts with its first event: what it opens with decides between relaying and failing over,
and events reach the client whole. Against a scripted upstream that writes exactly the bytes each test says."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from sqlalchemy import select

from poolgate.api.errors import error_event
from poolgate.config import RoutingConfig, ServerConfig, UpstreamConfig
from poolgate.lifecycle.observe import RequestFinished
from poolgate.lifecycle.relay import MIDSTREAM_BREAK
from poolgate.lifecycle.sse import EVENT_CAP
from poolgate.store.db import open_engine, usage
from tests.conftest import RunningGateway, gateway_config, serve_upstream, start_gateway, usage_rows
from tests.integration.test_observers import Recorder

KEYS = ("sk-ant-api03-scripted-a", "sk-ant-api03-scripted-b")
START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":"message","role":"assistant",'
    b'"model":"x","content":[],"stop_reason":null,"usage":{"input_tokens":11,"output_tokens":1}}}\n\n'
)
REST = (
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":7}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
OVERLOADED = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
BOM = b"\xef\xbb\xbf"
BREAK = b"BREAK"  # in a script: the connection is cut there


@dataclass
class Scripted:
    """Per upstream key, the chunks its streams write (an asyncio.Event waits for the test)."""

    scripts: dict[str, list[bytes | asyncio.Event]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    # Per key, the status and headers its answers have other than a 200 and these.
    statuses: dict[str, int] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    # Per key, an answer written as these bytes (what aiohttp's server would refuse to write), then closed.
    raw: dict[str, bytes] = field(default_factory=dict)

    content_type: str = "text/event-stream"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = request.headers["x-api-key"]
        await request.read()
        self.calls[key] = self.calls.get(key, 0) + 1
        if key in self.raw:
            assert request.transport is not None
            request.transport.write(self.raw[key])
            request.transport.close()
            raise asyncio.CancelledError  # nothing more for aiohttp to write
        response = web.StreamResponse(
            status=self.statuses.get(key, 200),
            headers={"content-type": self.content_type, "request-id": "req_scripted", **self.headers.get(key, {})},
        )
        await response.prepare(request)
        for step in self.scripts[key]:
            if isinstance(step, asyncio.Event):
                await asyncio.wait_for(step.wait(), 10)
            elif step == BREAK:
                assert request.transport is not None
                request.transport.close()
                return response
            else:
                await response.write(step)
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def scripted_gateway(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Scripted, RunningGateway]]:
    """A gateway (its config's `overrides` given) in front of a `Scripted` upstream's two keys; the gateway is
    stopped on the way out unless the test did."""
    upstream = Scripted()
    app = web.Application()
    app.router.add_post("/v1/messages", upstream.handle)
    runner, url = await serve_upstream(app)
    upstreams = tuple(UpstreamConfig(id=f"up-{i}", base_url=url, api_key=key) for i, key in enumerate(KEYS))
    routing = RoutingConfig(strategy="first-pick", cache_aware=False)
    gw = await start_gateway(gateway_config(tmp_path, url, upstreams=upstreams, routing=routing, **overrides))
    try:
        yield upstream, gw
    finally:
        if not gw._task.done():
            await gw.stop()
        await runner.cleanup()


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[Scripted, RunningGateway]]:
    async with scripted_gateway(tmp_path) as running:
        yield running


STREAM_BODY = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 64,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


async def stream(gw: RunningGateway) -> tuple[int, bytes, str]:
    headers = {"x-api-key": gw.key, "anthropic-version": "2023-06-01"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gw.url}/v1/messages", json=STREAM_BODY, headers=headers) as r,
    ):
        return r.status, await r.read(), r.headers.get("x-poolgate-upstream", "")


async def stream_observed(
    scripted: tuple[Scripted, RunningGateway], status: int, script: list[bytes]
) -> tuple[int, bytes, str, RequestFinished]:
    """`stream` from the first account answering `status` with `script`, and what the observers were told of it."""
    upstream, gw = scripted
    upstream.scripts = {KEYS[0]: script}
    upstream.statuses = {KEYS[0]: status}
    recorder = Recorder()
    gw.gateway.observers.add(recorder)
    answered, body, served_by = await stream(gw)
    gw.gateway.account_now()
    [finished] = recorder.events
    return answered, body, served_by, finished


@pytest.mark.parametrize(
    "opening",
    [
        [OVERLOADED],
        [OVERLOADED.replace(b"\n", b"\r\n")[:30], OVERLOADED.replace(b"\n", b"\r\n")[30:]],  # CRLF, split
        [OVERLOADED.replace(b"\n", b"\r")],  # bare CR line ends are SSE too
        [b"\xef\xbb\xbf: a comment first\n" + OVERLOADED],
        [b": keepalive\n\n", b"\n" + OVERLOADED],  # blocks that dispatch nothing come before it
        [b": keepalive\n\n"],  # comments, then the end
        [OVERLOADED.replace(b"overloaded_error", b"api_error")],
        [START[:20], BREAK],  # broke within its first event
        [],  # a 200 that ended without one event
    ],
)
async def test_a_stream_that_opens_without_an_answer_fails_over_and_the_next_is_relayed_unchanged(
    scripted: tuple[Scripted, RunningGateway], opening: list[bytes]
) -> None:
    upstream, gw = scripted
    upstream.scripts = {KEYS[0]: list(opening), KEYS[1]: [START, REST[:50], REST[50:]]}
    assert await stream(gw) == (200, START + REST, "up-1")
    state = gw.gateway.pool.get("up-0")
    assert state is not None and state.stats.requests == 1 and state.stats.ttfb_ms is None, "a failure, not an answer"


@pytest.mark.parametrize("opening", [[BOM + START], [BOM[:2], BOM[2:] + START]], ids=["whole", "split"])
async def test_a_stream_that_opens_with_a_byte_order_mark_reaches_the_client_without_it(
    scripted: tuple[Scripted, RunningGateway], opening: list[bytes]
) -> None:
    """SSE allows a BOM before the first event, and the gateway's usage scanner skipped it, but the client got
    it: the Python SDK's `get_final_message` failed on it (an AssertionError)."""
    upstream, gw = scripted
    upstream.scripts = {KEYS[0]: [*opening, REST]}
    assert await stream(gw) == (200, START + REST, "up-0")
    async with (
        gw.client() as client,
        client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=STREAM_BODY["messages"]) as answer,
    ):
        final = await answer.get_final_message()
    assert final.content[0].type == "text" and final.usage.output_tokens == 7


@pytest.mark.parametrize("kind", [b"invalid_request_error", b'["overloaded_error"]', b"{}"])
async def test_an_opening_error_another_account_would_give_too_is_relayed(
    scripted: tuple[Scripted, RunningGateway], kind: bytes
) -> None:
    """Only overload and server errors fail over; an odd `type` (a list made the gateway answer 500) does not."""
    upstream, gw = scripted
    quoted = kind if kind[:1] in (b"[", b"{") else b'"' + kind + b'"'
    event = b'event: error\ndata: {"type":"error","error":{"type":' + quoted + b',"message":"no"}}\n\n'
    upstream.scripts = {KEYS[0]: [event]}
    assert await stream(gw) == (200, event, "up-0")


@pytest.mark.parametrize(
    ("status", "kind", "recorded"),
    [
        (200, b'"' + b"x" * 5000 + b'"', "api_error"),  # mid-stream, of any length
        (200, b'"api_error\\nx-forged: 1"', "api_error"),
        (200, b'["overloaded_error"]', "api_error"),
        (400, b'"' + b"y" * 5000 + b'"', "invalid_request_error"),  # a relayed error answer
        (400, b'{"nested": true}', "invalid_request_error"),
        (400, b'"insufficient_quota"', "insufficient_quota"),  # what an error type looks like is kept
    ],
)
async def test_an_upstream_error_type_that_is_not_one_is_recorded_as_the_statuss_type(
    scripted: tuple[Scripted, RunningGateway], status: int, kind: bytes, recorded: str
) -> None:
    """An upstream's `error.type` goes to the usage record, the access log and the metrics' labels: a type
    of 5,000 characters, with a line break or not a string at all was taken as it was (or as its `str()`)."""
    upstream, gw = scripted
    error = b'{"type":"error","error":{"type":' + kind + b',"message":"no"}}'
    upstream.scripts = {KEYS[0]: [START, b"event: error\ndata: " + error + b"\n\n"] if status == 200 else [error]}
    upstream.statuses = {KEYS[0]: status}
    answered, body, _ = await stream(gw)
    assert answered == status
    if status != 200:
        assert orjson.loads(body)["error"]["type"] == recorded
    [row] = await usage_rows(gw)
    assert row["error_type"] == recorded


async def test_a_break_mid_event_ends_the_stream_on_whole_events_and_an_error_event(
    scripted: tuple[Scripted, RunningGateway],
) -> None:
    """The in-band error was glued to half an event (`data: {"type":"content_blo` + `event: error…`), which
    the client's SSE parser reads as one broken event."""
    upstream, gw = scripted
    first_two = REST.index(b"event: content_block_stop")
    upstream.scripts = {KEYS[0]: [START, REST[: first_two + 25], BREAK]}
    status, body, answered_by = await stream(gw)
    assert (status, answered_by) == (200, "up-0")
    assert body == START + REST[:first_two] + error_event("api_error", MIDSTREAM_BREAK)


@pytest.mark.parametrize("cut", [0, 25], ids=["between-events", "mid-event"])
async def test_a_stream_closed_cleanly_before_its_end_ends_on_an_error_event_and_is_recorded_as_one(
    scripted: tuple[Scripted, RunningGateway], cut: int
) -> None:
    """An upstream that closed its stream properly, but before `message_stop`: the client got half an event
    and no error (the SDK returned a message with `stop_reason` None), and the ledger said `ok`."""
    upstream, gw = scripted
    first_two = REST.index(b"event: content_block_stop")
    upstream.scripts = {KEYS[0]: [START, REST[: first_two + cut]]}
    status, body, _ = await stream(gw)
    assert status == 200
    assert body == START + REST[:first_two] + error_event("api_error", "The upstream ended the stream before its end")
    [row] = await usage_rows(gw)
    assert row["outcome"] == "stream_error" and row["error_type"] == "api_error"


async def test_a_stream_whose_last_event_lacks_its_blank_line_is_whole(
    scripted: tuple[Scripted, RunningGateway],
) -> None:
    upstream, gw = scripted
    upstream.scripts = {KEYS[0]: [START, REST.rstrip(b"\n")]}
    assert await stream(gw) == (200, START + REST.rstrip(b"\n"), "up-0")
    [row] = await usage_rows(gw)
    assert row["outcome"] == "ok" and row["output_tokens"] == 7


async def test_a_stream_is_one_whatever_the_case_of_its_media_type(scripted: tuple[Scripted, RunningGateway]) -> None:
    """`Text/Event-Stream` (an Anthropic-compatible upstream, a proxy) was read whole, up to 16 MiB, given a
    content-length, and recorded with no usage at all."""
    upstream, gw = scripted
    upstream.content_type = "Text/Event-Stream; charset=utf-8"
    go_on = asyncio.Event()
    upstream.scripts = {KEYS[0]: [START, go_on, REST]}
    headers = {"x-api-key": gw.key, "anthropic-version": "2023-06-01"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gw.url}/v1/messages", json=STREAM_BODY, headers=headers) as response,
    ):
        assert "content-length" not in response.headers
        assert await asyncio.wait_for(response.content.readexactly(len(START)), 5) == START  # before the rest
        go_on.set()
        assert await response.read() == REST
    [row] = await usage_rows(gw)
    assert (row["input_tokens"], row["output_tokens"], row["outcome"]) == (11, 7, "ok")


async def test_events_reach_the_client_as_they_come_whatever_their_line_ends(
    scripted: tuple[Scripted, RunningGateway],
) -> None:
    """With bare CR line ends the first event was held until 64 KiB or the stream's end."""
    upstream, gw = scripted
    events = (START + REST).replace(b"\n", b"\r")
    go_on = asyncio.Event()
    upstream.scripts = {KEYS[0]: [events[:300], go_on, events[300:]]}
    headers = {"x-api-key": gw.key, "anthropic-version": "2023-06-01"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gw.url}/v1/messages", json=STREAM_BODY, headers=headers) as r,
    ):
        first = await asyncio.wait_for(r.content.readany(), 10)  # before the upstream has sent the rest
        go_on.set()
        rest = await r.read()
    assert first and events.startswith(first) and first + rest == events
    # And its usage is read as from any other (a stream of bare CRs was recorded with no tokens: free).
    [row] = await usage_rows(gw)
    assert (row["input_tokens"], row["output_tokens"], row["outcome"]) == (11, 7, "ok")


async def test_a_stream_ends_for_the_client_at_its_end_however_long_the_upstream_takes_to_close(
    scripted: tuple[Scripted, RunningGateway],
) -> None:
    """The relay read on until the upstream closed: one that held its connection open after `message_stop`
    for longer than the idle timeout turned a whole answer into a broken one (an error event after the
    end, recorded `stream_error`, the account counted as failing)."""
    upstream, gw = scripted
    closing = asyncio.Event()
    upstream.scripts = {KEYS[0]: [START + REST, closing]}
    began = time.perf_counter()
    try:
        status, body, _ = await asyncio.wait_for(stream(gw), 5)  # long before the upstream closes
        answered_ms = (time.perf_counter() - began) * 1000
        state = gw.gateway.pool.get("up-0")
        assert state is not None
        for _ in range(250):  # the relay reads the rest for a second at most (for the connection's reuse)
            if not state.in_flight:
                break
            await asyncio.sleep(0.02)
    finally:
        closing.set()
    assert (status, body) == (200, START + REST)
    [row] = await usage_rows(gw)
    assert (row["input_tokens"], row["output_tokens"], row["outcome"]) == (11, 7, "ok")
    assert state.health.consecutive_failures == 0
    # The request took as long as its answer did: the second spent reading the rest is not its duration.
    assert row["duration_ms"] <= answered_ms


async def test_a_whole_stream_whose_upstream_is_slow_to_close_when_the_grace_ends_stays_ok(tmp_path: Path) -> None:
    """The relay reads the rest of an upstream's answer after the client has had all of it (for the
    connection's reuse): the end of the shutdown grace meanwhile recorded the answer `interrupted`, an error."""
    closing = asyncio.Event()
    async with scripted_gateway(tmp_path, server=ServerConfig(shutdown_grace_seconds=0.2)) as (upstream, gw):
        upstream.scripts = {KEYS[0]: [START + REST, closing]}
        try:
            status, body, _ = await asyncio.wait_for(stream(gw), 5)
            await gw.stop()  # well within the second the rest is read for
        finally:
            closing.set()
        assert (status, body) == (200, START + REST)
        with open_engine(gw.gateway.config.store_url()).connect() as conn:
            rows = [
                tuple(row) for row in conn.execute(select(usage.c.outcome, usage.c.error_type, usage.c.output_tokens))
            ]
    assert rows == [("ok", None, 7)]


ERROR = OVERLOADED  # an error event mid-stream, after some content


@pytest.mark.parametrize(
    ("events", "cut", "outcome"),
    [
        (START + REST, len(START + REST) - 1, "ok"),  # the last event's blank line comes in a later read
        (START + REST, len(START + REST) - 3, "ok"),  # its data line is cut mid-JSON
        (START + REST[: REST.index(b"event: content_block_stop")] + ERROR, -40, "stream_error"),
    ],
)
async def test_a_streams_last_event_split_across_reads_reaches_the_client_whole(
    scripted: tuple[Scripted, RunningGateway], events: bytes, cut: int, outcome: str
) -> None:
    """The end was decided on the last event's first bytes (`message_stop` or `"type":"error"` seen): the
    client's answer ended on half an event, which an SDK read as a normal end (an overloaded error passed
    unseen), and the request was recorded `ok`."""
    upstream, gw = scripted
    later = asyncio.Event()
    upstream.scripts = {KEYS[0]: [events[:cut], later, events[cut:]]}
    asyncio.get_running_loop().call_later(0.3, later.set)
    status, body, _ = await asyncio.wait_for(stream(gw), 5)
    assert (status, body) == (200, events)
    [row] = await usage_rows(gw)
    assert row["outcome"] == outcome


@pytest.mark.parametrize("status", [200, 529])
async def test_a_control_character_in_an_upstream_header_does_not_cost_the_client_its_answer(
    scripted: tuple[Scripted, RunningGateway], status: int
) -> None:
    """aiohttp lets a control character through in a header value; passed on as it was, the server refused
    to write the answer and closed the client's connection with nothing (for a 200 and for an error)."""
    upstream, gw = scripted
    body = START + REST if status == 200 else OVERLOADED
    head = b"HTTP/1.1 %d X\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n" % (status, len(body))
    answer = head + b"request-id: req_\x01scripted\r\nretry-after: 1\x7f\r\nconnection: close\r\n\r\n" + body
    upstream.raw = {KEYS[0]: answer, KEYS[1]: answer}
    headers = {"x-api-key": gw.key, "anthropic-version": "2023-06-01"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gw.url}/v1/messages", json=STREAM_BODY, headers=headers) as r,
    ):
        relayed = await r.read()
        assert r.status == status and r.headers["x-poolgate-upstream-request-id"] == "req_scripted"
    assert relayed == body if status == 200 else b"overloaded_error" in relayed
    [row] = await usage_rows(gw)
    assert row["status"] == status and row["outcome"] == ("ok" if status == 200 else "upstream_error")


async def test_an_upstream_that_redirects_is_failed_over_from_and_never_passed_on(
    scripted: tuple[Scripted, RunningGateway], caplog: pytest.LogCaptureFixture
) -> None:
    """A base URL the API redirects from (http:// for https://, a missing path) is an account that cannot
    serve: its 301 was relayed to the client as the answer, recorded `ok`, the account left healthy."""
    upstream, gw = scripted
    upstream.scripts = {KEYS[0]: [b"<html>moved</html>"], KEYS[1]: [START + REST]}
    upstream.statuses = {KEYS[0]: 301}
    upstream.headers = {KEYS[0]: {"location": "https://elsewhere.example/v1/messages", "content-type": "text/html"}}
    status, body, served_by = await stream(gw)
    assert (status, body, served_by) == (200, START + REST, "up-1")
    assert not gw.gateway.pool.get("up-0").health.healthy  # type: ignore[union-attr]
    assert any("301" in r.getMessage() and "elsewhere.example" in r.getMessage() for r in caplog.records)
    # With no other account to take it, the client gets an error in Anthropic's shape, never the redirect.
    upstream.scripts[KEYS[1]] = upstream.scripts[KEYS[0]]
    upstream.statuses[KEYS[1]] = 301
    upstream.headers[KEYS[1]] = upstream.headers[KEYS[0]]
    gw.gateway.pool.get("up-0").health.healthy = True  # type: ignore[union-attr]
    status, body, _ = await stream(gw)
    error = orjson.loads(body)
    assert status == 502 and error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "301" in error["error"]["message"] and "elsewhere" not in error["error"]["message"]


# The account's organization, as the API names it in its rate-limit errors.
ORGANIZATION = "6c2b1234-1234-1234-1234-123456789abc"


def quoting_the_key(error_type: str) -> bytes:
    """An error as an Anthropic-compatible proxy in front of the API may word it: quoting the key it was sent
    (and the account's organization, as the API does)."""
    message = f"invalid x-api-key {KEYS[0]} for this route (key {KEYS[0]}, org {ORGANIZATION})"
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


@pytest.mark.parametrize(
    ("status", "script"),
    [
        (400, [quoting_the_key("invalid_request_error")]),  # passed through as the upstream's answer
        (200, [START, b"event: error\ndata: " + quoting_the_key("invalid_request_error") + b"\n\n"]),  # mid-stream
        (200, [START, b"event: error\ndata: " + quoting_the_key("invalid_request_error")]),  # ... without its end
        # ... and with an event after it in the same read (the API ends a stream at its error; a proxy may not)
        (200, [START, b"event: error\ndata: " + quoting_the_key("invalid_request_error") + b"\n\n" + PING]),
        # ... two of them, or one followed by an event that mentions "error" (not only the last is the error)
        (200, [START, (b"event: error\ndata: " + quoting_the_key("invalid_request_error") + b"\n\n") * 2]),
        (
            200,
            [
                START,
                b"event: error\ndata: "
                + quoting_the_key("invalid_request_error")
                + b'\n\nevent: ping\ndata: {"type": "ping", "note": "error"}\n\n',
            ],
        ),
    ],
)
async def test_an_upstream_error_quoting_the_accounts_key_reaches_the_client_without_it(
    scripted: tuple[Scripted, RunningGateway], status: int, script: list[bytes]
) -> None:
    """The account's credential is the pool's: an upstream message that quoted it was passed on verbatim; so
    are its ids, which a JSON error lost and a stream's in-band error kept. The observers are told the message
    the client got (a stream's in-band error's too: it was left out)."""
    answered, body, served_by, event = await stream_observed(scripted, status, script)
    assert (answered, served_by) == (status, "up-0")
    assert KEYS[0].encode() not in body and ORGANIZATION.encode() not in body
    told = "invalid x-api-key [redacted] for this route (key [redacted], org …)"
    assert told.encode() in body
    assert (event.error_type, event.error_message) == ("invalid_request_error", told)


@pytest.mark.parametrize(
    ("status", "script", "type_told"),
    [
        (400, [quoting_the_key(f"key_{KEYS[0]}")], "invalid_request_error"),
        (200, [START, b"event: error\ndata: " + quoting_the_key(f"key_{KEYS[0]}") + b"\n\n"], "api_error"),
    ],
)
async def test_an_upstream_error_type_quoting_the_accounts_key_is_told_as_the_statuss(
    scripted: tuple[Scripted, RunningGateway], status: int, script: list[bytes], type_told: str
) -> None:
    """A short key fits in what passes for an error type (64 characters of letters, digits and `_.-`): quoted
    there, it reached the caller, the access log, `route explain` and the usage record, where the same key in
    the message was hidden."""
    answered, body, _, event = await stream_observed(scripted, status, script)
    assert answered == status and KEYS[0].encode() not in body
    assert event.error_type == type_told


async def test_a_uuid_the_model_wrote_reaches_the_client_as_written_before_an_upstream_error(
    scripted: tuple[Scripted, RunningGateway],
) -> None:
    """Only the error event loses the account's ids: a text the model wrote before it, in the same read, is the
    caller's answer, UUIDs and all."""
    upstream, gw = scripted
    text = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"id %s"}}\n\n' % ORGANIZATION.encode()
    )
    upstream.scripts = {
        KEYS[0]: [START + text + b"event: error\ndata: " + quoting_the_key("overloaded_error") + b"\n\n"]
    }
    upstream.statuses = {KEYS[0]: 200}
    _, body, _ = await stream(gw)
    assert text in body and body.count(ORGANIZATION.encode()) == 1 and b"org \xe2\x80\xa6)" in body


@pytest.mark.parametrize(
    "event",
    [
        # Its data over two lines (valid SSE), and without the `type` the usage scanner goes by.
        b'event: error\ndata: {"type": "error",\ndata: "error": {"type": "api_error", "message": "key %s"}}\n\n',
        b'event: error\ndata: {"error": {"type": "api_error", "message": "key %s"}}\n\n',
    ],
)
async def test_the_accounts_key_is_hidden_in_any_event_not_only_those_read_as_errors(
    scripted: tuple[Scripted, RunningGateway], event: bytes
) -> None:
    _, body, _, finished = await stream_observed(scripted, 200, [START, event % KEYS[0].encode()])
    assert KEYS[0].encode() not in body and b"key [redacted]" in body
    if b'"type": "error"' in event:
        # Read as the upstream's error (its data's lines joined, as SSE does): no break of the gateway's after it.
        assert body.count(b"event: error") == 1
        assert (finished.error_type, finished.error_message) == ("api_error", "key [redacted]")


async def test_the_accounts_key_is_hidden_across_the_pieces_of_an_event_too_long_to_hold(
    scripted: tuple[Scripted, RunningGateway],
) -> None:
    """An event over 1 MiB (none is) goes on in pieces as it comes: a key quoted across the point where one
    piece ended reached the client whole once the client joined them."""
    upstream, gw = scripted
    head = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"text":"'
    first, second = asyncio.Event(), asyncio.Event()
    key = KEYS[0].encode()
    long = head + b"x" * (EVENT_CAP - len(head) - 5)  # the key's first 10 bytes take it over the cap
    upstream.scripts = {KEYS[0]: [START, long, first, key[:10], second, key[10:] + b'"}}\n\n' + REST]}
    answer = asyncio.create_task(stream(gw))
    for gate in (first, second):  # each piece read on its own
        await asyncio.sleep(0.3)
        gate.set()
    _, body, _ = await answer
    assert key not in body and b"[redacted]" in body


async def test_the_accounts_key_is_hidden_in_a_json_answer_as_in_a_streams(
    scripted: tuple[Scripted, RunningGateway],
) -> None:
    """A stream's events lose the account's key wherever it is, but a JSON answer quoting it (a proxy used as
    base_url that echoes what it was sent) passed it on: a caller had only to leave out `stream`."""
    upstream, gw = scripted
    upstream.content_type = "application/json"
    answer = {
        "id": "m",
        "type": "message",
        "role": "assistant",
        "model": "x",
        "content": [{"type": "text", "text": f"sent with x-api-key: {KEYS[0]}"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
    upstream.scripts = {KEYS[0]: [orjson.dumps(answer)]}
    async with gw.client() as client:
        message = await client.messages.create(
            model="claude-sonnet-4-5", max_tokens=8, messages=STREAM_BODY["messages"]
        )
    assert message.content[0].text == "sent with x-api-key: [redacted]"  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 2)

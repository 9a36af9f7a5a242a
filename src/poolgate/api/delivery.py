"""Delivery of a Messages answer to its ASGI client: whether it started, ended and reached the client
(`TrackedSend`, which also holds a JSON answer back until its cost headers are known), the watch that cancels
a request whose client has gone (`DisconnectWatcher`, started late by `WatchSchedule`), and what a client is
told of a request the gateway could not finish (`cut_short`). `Gateway._messages` wraps each request's `send`
and `receive` in them; the relay writes the answer through `TrackedSend`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from poolgate.api.errors import ApiError, error_event
from poolgate.api.http import (
    DONE,
    HEAD_LINES,
    Message,
    Send,
    connection_lost,
    header,
    header_pairs,
    respond_error,
    server_flow,
)
from poolgate.lifecycle.context import RequestContext

CostHeaders = Callable[[int, bytes], list[tuple[bytes, bytes]]]


class TrackedSend:
    """Wraps ASGI `send` to know whether the response has started and finished.

    With `cost_headers` set (a JSON answer whose caller asked for its cost), the start of the answer is
    held back with its body until the body is complete, so that headers computed from it can go first."""

    __slots__ = (
        "_held",
        "_held_body",
        "cost_headers",
        "extra_headers",
        "finished",
        "head_lines",
        "send",
        "started",
        "undelivered",
    )

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.finished = False
        # The connection was lost before the answer's end was handed to the server (which drops it then).
        self.undelivered = False
        self.extra_headers: list[tuple[bytes, bytes]] = []
        # Header lines rendered already (see `api.http.HEAD_LINES`).
        self.head_lines = b""
        self.cost_headers: CostHeaders | None = None
        self._held: Message | None = None
        self._held_body: list[bytes] = []

    def __call__(self, message: Message) -> Awaitable[None]:
        # A plain function handing back the server's own `send` coroutine: no coroutine of its own per send.
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            if self.extra_headers:
                message["headers"] = [*message["headers"], *self.extra_headers]
            if self.head_lines:
                if getattr(getattr(self.send, "__self__", None), "takes_head_lines", False):
                    message[HEAD_LINES] = self.head_lines
                else:
                    message["headers"] = [*message["headers"], *header_pairs(self.head_lines)]
            if self.cost_headers is not None and not _is_event_stream(message["headers"]):
                self._held = message
                return DONE
        elif kind == "http.response.body":
            if self._held is not None:
                self._held_body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return DONE
                return self._release()
            if not message.get("more_body", False):
                self.finished = True
                self.undelivered = connection_lost(self.send)
                if may_hold_back(self.send, message):
                    return self._send_end(message)
        return self.send(message)

    async def _send_end(self, message: Message) -> None:
        """The answer's end, delivered or not: known once the client has taken what is buffered for it. A
        client that took nothing of its answer for the send timeout is cut off with it unsent (the server
        dropped an end waiting for it without a word, and left what it had buffered unsent): such answers,
        a JSON answer's one write always among them, were recorded as delivered, `ok`."""
        await self.send(message)
        flow = server_flow(self.send)
        if flow is not None and flow.write_paused:
            await flow.drain()  # until the client takes it, or is cut off (`serve._send_timed_out`)
        self.undelivered = connection_lost(self.send)

    async def _release(self) -> None:
        start, self._held = self._held, None
        assert start is not None and self.cost_headers is not None
        body = b"".join(self._held_body)
        self._held_body = []
        start["headers"] = [*start["headers"], *self.cost_headers(start["status"], body)]
        await self.send(start)
        self.finished = True
        await self._send_end({"type": "http.response.body", "body": body, "more_body": False})


def may_hold_back(send: Send, message: Message) -> bool:
    """Whether uvicorn may hold an answer's end back for the client: its buffer for the client is full (it
    waits for room before writing), or this end fills it. An end it takes at once is the client's unless the
    connection is gone already (`connection_lost`), and costs no coroutine of its own (`_send_end`)."""
    flow = server_flow(send)
    return flow is not None and (flow.write_paused or len(message.get("body", b"")) + HEAD_ROOM >= SERVER_BUFFER_BYTES)


# What uvicorn buffers for a client before it pauses writing (its `flow_control.HIGH_WATER_LIMIT`).
SERVER_BUFFER_BYTES = 64 * 1024
# The answer's head, which the server may write with its end (`serve._OneWriteCycle`): a few hundred bytes, a
# routing trace's header a few KB more.
HEAD_ROOM = 16 * 1024


def _is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    value = header(headers, b"content-type")
    return value is not None and value[:17].lower() == b"text/event-stream"


# Disconnect watching starts this far into a request, give or take a tick (see `WatchSchedule`).
WATCH_AFTER = 0.25
WATCH_TICK = WATCH_AFTER / 4


class DisconnectWatcher:
    """Cancels the request's task the moment the client disconnects, which closes the upstream request.

    Watching costs a task per request, so it starts only once a request has run for `WATCH_AFTER` seconds
    (see `WatchSchedule`): quick answers never pay for it, and model calls (seconds long) are watched all the
    same; a client gone sooner is noticed when the watch starts. Measured (paired wrk rounds, c=64, where
    the gateway's own queueing made most quick answers outlast 50 ms): 250 ms instead of 50 ms is ~5 % more
    throughput.
    """

    __slots__ = ("_receive", "_schedule", "_task", "_tracked", "_watcher", "disconnected")

    def __init__(
        self, receive: Callable[[], Awaitable[Message]], tracked: TrackedSend, schedule: WatchSchedule
    ) -> None:
        self.disconnected = False
        self._receive = receive
        # Asked for once: each ask costs a `getpid` system call on Python 3.11 (~0.3 µs).
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task(loop)
        self._tracked = tracked
        self._watcher: asyncio.Task[None] | None = None
        self._schedule = schedule
        schedule.add(self, loop)

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                # The server also reports "disconnect" once the response is complete; that is no cancel.
                if not self._tracked.finished and self._task is not None:
                    self.disconnected = True
                    self._task.cancel()
                return

    def stop(self) -> None:
        self._schedule.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()


class WatchSchedule:
    """Starts watching each request once it has run `WATCH_AFTER` seconds, with one timer for all requests
    in flight (ticking every `WATCH_TICK` while any is waiting) rather than a timer per request: arming and
    cancelling one was ~2 % of a quick answer's CPU. Requests wait in arrival order, which is due order."""

    def __init__(self) -> None:
        self._due: dict[DisconnectWatcher, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, watcher: DisconnectWatcher, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            # Served from another event loop than before (an app restarted in-process): the old loop's
            # timer, and the requests it was to watch, are gone with it.
            self._due, self._timer, self._loop = {}, None, loop
        self._due[watcher] = loop.time() + WATCH_AFTER
        if self._timer is None:
            self._timer = loop.call_later(WATCH_AFTER, self._tick)

    def discard(self, watcher: DisconnectWatcher) -> None:
        self._due.pop(watcher, None)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = []
        for watcher, at in self._due.items():
            if at > now:
                break
            due.append(watcher)
        for watcher in due:
            del self._due[watcher]
            watcher.start()
        self._timer = loop.call_later(WATCH_TICK, self._tick) if self._due else None


async def cut_short(send: TrackedSend, ctx: RequestContext, request_id: str, error: ApiError) -> None:
    """Tell the client of a request the gateway could not finish (see `accounting.ended_by`): an error answer if nothing
    was sent yet, else an in-band `error` event that ends the stream. The client may be gone already:
    nothing more to do then."""
    try:
        if not send.started:
            await respond_error(send, error, request_id)
        elif ctx.stream and not send.finished:
            body = error_event(error.error_type, error.message)
            await send({"type": "http.response.body", "body": body, "more_body": False})
    except Exception:  # the connection is going or gone; the request is accounted either way
        pass

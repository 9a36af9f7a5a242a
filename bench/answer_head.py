"""What writing an answer's head costs: uvicorn's `send` against the gateway's own (`serve._OneWriteCycle._head_of`).

    python bench/answer_head.py     # ~20 s

uvicorn checks each header of an answer with two regular-expression searches (its name, its value) and lowers its
name; the gateway's request cycle checks each name once (a memo) and all the values in one `bytes.translate` of
the head. Timed in this process, pinned to one core, for a plain answer's headers (request id, content type,
account, the account's request id, content length; uvicorn adds `date`) and for the same with a caller's nine
quota and budget headers: µs per head, best of 7 runs, less the cost of making the request cycle. The gateway
sends those nine as head lines its policy rendered (`api.http.HEAD_LINES`, written as they are): timed so too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import timeit
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from poolgate.api.http import HEAD_LINES
from poolgate.serve import _OneWriteCycle

PLAIN = [
    (b"request-id", b"req_pg_01a24dfd2105e78e69a57d11"),
    (b"content-type", b"application/json"),
    (b"x-poolgate-upstream", b"a"),
    (b"x-poolgate-upstream-request-id", b"req_mock_af6fa8352d0560944f33008e"),
    (b"content-length", b"566"),
]
POLICY = [
    *PLAIN,
    (b"x-poolgate-quota-limit-requests-per-minute", b"1000000000"),
    (b"x-poolgate-quota-remaining-requests-per-minute", b"999999999"),
    (b"x-poolgate-quota-reset-requests-per-minute", b"2026-12-07T00:53:00Z"),
    (b"x-poolgate-quota-limit-output-tokens-per-day", b"1000000000000"),
    (b"x-poolgate-quota-remaining-output-tokens-per-day", b"1000000000000"),
    (b"x-poolgate-quota-reset-output-tokens-per-day", b"2026-12-08T00:00:00Z"),
    (b"x-poolgate-budget-limit-usd", b"1000000.00"),
    (b"x-poolgate-budget-spent-usd", b"0.00"),
    (b"x-poolgate-budget-reset", b"2027-01-01T00:00:00Z"),
]
CALLS, RUNS = 20_000, 7


def request_cycle(kind: type[RequestResponseCycle]) -> Any:
    """A request cycle of `kind` for a POST kept alive, writing nowhere."""
    scope = {"method": "POST", "http_version": "1.1", "headers": [], "path": "/v1/messages", "query_string": b""}
    logger = logging.getLogger("bench.answer_head")
    return kind(
        scope,  # type: ignore[arg-type]
        SimpleNamespace(write=lambda data: None),  # type: ignore[arg-type]
        SimpleNamespace(write_paused=False),  # type: ignore[arg-type]
        logger,
        logger,
        False,
        [(b"date", b"Mon, 07 Dec 2026 00:52:44 GMT")],
        asyncio.Event(),
        False,
        True,
        lambda: None,
    )


def uvicorns(headers: list[tuple[bytes, bytes]]) -> None:
    step = request_cycle(RequestResponseCycle).send({"type": "http.response.start", "status": 200, "headers": headers})
    with contextlib.suppress(StopIteration):  # it ends without suspending: its head is written at once
        step.send(None)


def gateways(headers: list[tuple[bytes, bytes]], lines: bytes = b"") -> None:
    message: dict[str, object] = {"type": "http.response.start", "status": 200, "headers": headers}
    if lines:
        message[HEAD_LINES] = lines
    request_cycle(_OneWriteCycle)._head_of(message)


def microseconds(call: Callable[[], object]) -> float:
    return min(timeit.repeat(call, number=CALLS, repeat=RUNS)) / CALLS * 1e6


async def main() -> None:
    os.sched_setaffinity(0, {1} if os.cpu_count() and os.cpu_count() > 1 else {0})  # type: ignore[operator]
    for name, headers in (("plain answer", PLAIN), ("with quota and budget headers", POLICY)):
        base = microseconds(lambda: request_cycle(_OneWriteCycle))
        uvicorn = microseconds(lambda h=headers: uvicorns(h)) - base  # type: ignore[misc]
        gateway = microseconds(lambda h=headers: gateways(h)) - base  # type: ignore[misc]
        line = f"{name:30} uvicorn {uvicorn:5.2f} µs   gateway {gateway:5.2f} µs"
        if headers is POLICY:
            rendered = b"".join(b"%s: %s\r\n" % header for header in POLICY[len(PLAIN) :])
            as_lines = microseconds(lambda r=rendered: gateways(PLAIN, r)) - base  # type: ignore[misc]
            line += f"   gateway, the nine as head lines {as_lines:5.2f} µs"
        print(line)


if __name__ == "__main__":
    asyncio.run(main())

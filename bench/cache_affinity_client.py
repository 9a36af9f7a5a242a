"""The cache-affinity client: every session a task, its turns sequential, usage read from the SSE stream."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson

from cache_affinity_workload import Request, Workload, headers

ATTEMPTS = 3  # Claude Code retries 5xx and 429 by itself; so does this client, a bounded number of times
RETRY_PAUSE = 0.2
UPSTREAM_HEADER = "x-poolgate-upstream"


@dataclass
class Turn:
    session: int
    turn: int
    upstream: str  # the upstream that answered: x-poolgate-upstream, or the key the client chose itself
    started: float
    finished: float
    attempts: int = 1
    error: str | None = None  # set when every attempt failed
    input_tokens: int = 0
    creation_5m: int = 0
    creation_1h: int = 0
    read: int = 0
    output_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.creation_5m + self.creation_1h + self.read


@dataclass(frozen=True)
class Target:
    """Where a session's turn goes: a base URL, an API key, and the upstream id to record for it."""

    url: str
    api_key: str
    upstream: str | None  # None: read it from the gateway's x-poolgate-upstream header


Route = Callable[[Request], Target]
Hook = Callable[[Turn], Awaitable[None]]


def read_usage(turn: Turn, body: bytes) -> str | None:
    """Fill the turn's usage from message_start/message_delta; the error type of an `error` event, if any."""
    for line in body.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            event = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return "bad_sse"
        kind = event.get("type")
        if kind == "message_start":
            usage = event["message"]["usage"]
            split = usage.get("cache_creation") or {}
            creation = usage.get("cache_creation_input_tokens") or 0
            turn.creation_1h = split.get("ephemeral_1h_input_tokens") or 0
            turn.creation_5m = creation - turn.creation_1h
            turn.input_tokens = usage.get("input_tokens") or 0
            turn.read = usage.get("cache_read_input_tokens") or 0
        elif kind == "message_delta":
            turn.output_tokens = event.get("usage", {}).get("output_tokens") or turn.output_tokens
        elif kind == "error":
            return str(event.get("error", {}).get("type", "error"))
    return None


async def _send(http: aiohttp.ClientSession, request: Request, target: Target, send_session: bool) -> Turn:
    turn = Turn(request.session, request.turn, target.upstream or "?", time.monotonic(), 0.0)
    sent = headers(target.api_key, request.session_id if send_session else None)
    for attempt in range(1, ATTEMPTS + 1):
        turn.attempts = attempt
        try:
            async with http.post(target.url + "/v1/messages?beta=true", data=request.body, headers=sent) as response:
                body = await response.read()
                turn.upstream = target.upstream or response.headers.get(UPSTREAM_HEADER, "?")
                if response.status == 200:
                    turn.error = read_usage(turn, body)
                else:
                    turn.error = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            turn.error = type(exc).__name__
        if turn.error is None:
            break
        await asyncio.sleep(RETRY_PAUSE)
    turn.finished = time.monotonic()
    return turn


def pauses(workload: Workload, mean: float, seed: int) -> list[list[float]]:
    """Think time before each turn: exponential around `mean`, the same in every arm. Without it, sessions
    that all start together move in lockstep and a round-robin counter hands session i the same key every
    turn (with S a multiple of K), which no real round-robin over independent users would do."""
    if mean <= 0:
        return [[0.0] * workload.turns for _ in range(workload.sessions)]
    drawn = []
    for session in range(workload.sessions):
        rng = random.Random(f"think/{seed}/{session}")
        drawn.append([rng.expovariate(1 / mean) for _ in range(workload.turns)])
    return drawn


async def run_sessions(
    workload: Workload, route: Route, send_session: bool, think: list[list[float]], hook: Hook | None = None
) -> tuple[list[Turn], float]:
    """Every session concurrently, each one's turns in order after its think time; the turns and the wall
    time."""
    turns: list[Turn] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)) as http:

        async def session(requests: tuple[Request, ...]) -> None:
            for request in requests:
                pause = think[request.session][request.turn]
                if pause:
                    await asyncio.sleep(pause)
                turn = await _send(http, request, route(request), send_session)
                turns.append(turn)
                if hook is not None:
                    await hook(turn)

        began = time.monotonic()
        await asyncio.gather(*(session(requests) for requests in workload.requests))
        wall = time.monotonic() - began
    turns.sort(key=lambda turn: (turn.session, turn.turn))
    return turns, wall


async def warm_up(url: str, api_key: str, count: int) -> int:
    """Small requests with no cache_control and no session: pools and lazy imports warm, no cache written.
    Returns how many failed."""
    body = orjson.dumps(
        {"model": "claude-sonnet-4-6", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    failed = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def one() -> None:
            nonlocal failed
            try:
                async with http.post(url + "/v1/messages", data=body, headers=headers(api_key, None)) as response:
                    await response.read()
                    failed += response.status != 200
            except (aiohttp.ClientError, TimeoutError):
                failed += 1

        for _ in range(count):
            await one()
        await asyncio.gather(*(one() for _ in range(count)))
    return failed

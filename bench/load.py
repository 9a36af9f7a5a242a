"""Load generators: wrk for throughput and latency percentiles, an aiohttp client for time to first byte."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

import procs

BENCH = Path(__file__).resolve().parent
BODY_LUA = BENCH / "body.lua"
MODEL = "claude-sonnet-4-5"
# ~5 KB of prompt, the same bytes wrk sends (body.lua builds it the same way).
FILLER = "Placeholder context line for the benchmark prompt. " * 95
# How long after a cell its server's CPU time is read: the usage writer's periodic flush (every 0.5 s) belongs
# to the requests just made.
WRITER_FLUSH = 0.6


@dataclass(frozen=True)
class Endpoint:
    """Where and how to call one target."""

    url: str  # base URL, no trailing slash
    key: str
    path: str = "/v1/messages"
    bearer: bool = False  # LiteLLM also wants the key as a bearer token


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    requests: int
    errors: int  # socket errors plus non-2xx/3xx answers

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.errors == 0


FAILED = WrkResult(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, -1)


def request_body(stream: bool) -> bytes:
    payload = {
        "model": MODEL,
        "max_tokens": 64,
        "stream": stream,
        "system": "You are a benchmark.",
        "messages": [{"role": "user", "content": FILLER}],
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def run_wrk(
    endpoint: Endpoint, concurrency: int, stream: bool, seconds: float, core: str, log: Path | None = None
) -> WrkResult:
    """One wrk cell: a single thread (plenty for these rates, and it leaves the core to the mock)."""
    env = {
        **os.environ,
        "STREAM": "1" if stream else "0",
        "API_KEY": endpoint.key,
        "BEARER": "1" if endpoint.bearer else "0",
        "MODEL": MODEL,
    }
    cmd = ["taskset", "-c", core, "wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s"]
    cmd += ["--latency", "-s", str(BODY_LUA), endpoint.url + endpoint.path]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return FAILED
    if log is not None:
        with log.open("a") as out:
            out.write(f"$ {' '.join(cmd)} (STREAM={env['STREAM']})\n{done.stdout}{done.stderr}\n")
    return parse_wrk(done.stdout)


async def run_wrk_costed(
    pid: int, endpoint: Endpoint, concurrency: int, stream: bool, seconds: float, log: Path | None = None
) -> tuple[WrkResult, float]:
    """One wrk cell from the load core, and the CPU time per request (µs) of the server `pid` and its
    children (the usage writer) over it: read from /proc before and after, less sensitive to the neighbours
    than throughput."""
    before = sum(procs.cpu_seconds(pid))
    result = run_wrk(endpoint, concurrency, stream, seconds, procs.LOAD_CORE, log)
    await asyncio.sleep(WRITER_FLUSH)
    return result, _cpu_us_per_request(pid, before, result)


async def run_wrk_side_by_side(
    targets: list[tuple[int, Endpoint]], concurrency: int, stream: bool, seconds: float, logs: Path
) -> list[tuple[WrkResult, float]]:
    """One wrk cell per target (server pid, endpoint), all at once from the load core, and each server's CPU
    time per request over the same seconds: a busy neighbour then slows every target alike. Servers sharing a
    core this way each get a share of it; their costs per request compare, their throughputs add up."""
    before = [sum(procs.cpu_seconds(pid)) for pid, _ in targets]
    results = await asyncio.gather(
        *(
            asyncio.to_thread(
                run_wrk, endpoint, concurrency, stream, seconds, procs.LOAD_CORE, logs / f"wrk-{number}.log"
            )
            for number, (_, endpoint) in enumerate(targets, 1)
        )
    )
    await asyncio.sleep(WRITER_FLUSH)
    return [
        (result, _cpu_us_per_request(pid, spent, result))
        for (pid, _), spent, result in zip(targets, before, results, strict=True)
    ]


def _cpu_us_per_request(pid: int, before: float, result: WrkResult) -> float:
    """The CPU µs per request of `pid`'s process tree since it had used `before` seconds of CPU."""
    used = sum(procs.cpu_seconds(pid)) - before
    return used / result.requests * 1e6 if result.requests else float("nan")


def parse_wrk(stdout: str) -> WrkResult:
    """body.lua's done() prints one JSON line; wrk's own text is kept in the log for humans."""
    line = next((row for row in stdout.splitlines() if row.startswith("JSON ")), None)
    if line is None:
        return FAILED
    data = json.loads(line[5:])
    seconds = data["duration_us"] / 1e6
    return WrkResult(
        rps=data["requests"] / seconds if seconds else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        p999_ms=data["p999_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        requests=data["requests"],
        errors=data["errors"],
    )


async def prime(endpoint: Endpoint, count: int = 3, seconds: float = 60) -> str | None:
    """A few sequential requests with a generous timeout: some servers (LiteLLM) import half their code on
    the first request, which would otherwise eat a short wrk warm-up. The failure, or None."""
    headers = {"x-api-key": endpoint.key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    if endpoint.bearer:
        headers["authorization"] = f"Bearer {endpoint.key}"
    timeout = aiohttp.ClientTimeout(total=seconds)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(count):
                async with session.post(endpoint.url + endpoint.path, data=request_body(False), headers=headers) as r:
                    text = await r.text()
                    if r.status != 200:
                        return f"HTTP {r.status}: {text[:200]}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass(frozen=True)
class Ttfb:
    p50_ms: float
    p90_ms: float
    samples: int


async def measure_ttfb(endpoint: Endpoint, count: int, warmup: int = 10) -> Ttfb | None:
    """Sequential streaming requests on one kept-alive connection: request sent -> first body chunk.

    Sequential on purpose: it is the latency one Claude Code user feels, without queueing in it.
    """
    body = request_body(stream=True)
    headers = {"x-api-key": endpoint.key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    if endpoint.bearer:
        headers["authorization"] = f"Bearer {endpoint.key}"
    samples: list[float] = []
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for index in range(warmup + count):
            began = time.perf_counter()
            async with session.post(endpoint.url + endpoint.path, data=body, headers=headers) as response:
                if response.status != 200:
                    return None
                await response.content.readany()
                elapsed = (time.perf_counter() - began) * 1000
                await response.read()
            if index >= warmup:
                samples.append(elapsed)
    deciles = statistics.quantiles(samples, n=10)
    return Ttfb(statistics.median(samples), deciles[8], len(samples))

"""Tail attribution: which slow requests were the server's own doing, and which were the machine's.

A sequential client (concurrency 1, non-streaming) times every request while a sampler reads, every
few milliseconds, how long the server's threads sat runnable but not running (/proc/PID/task/*/schedstat,
field 2: run-queue wait). A slow request during which the server waited for a CPU was delayed by a
neighbour on its core, not by its own code; one that overlaps a logged gen-2 GC pause was the collector.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from load import Endpoint, request_body
from procs import process_tree

SAMPLE_SECONDS = 0.002
GC_LINE = re.compile(r"gc gen2 pause ([0-9.]+) ms at=([0-9.]+)")


def run_queue_wait_ns(pid: int) -> int:
    """Total time every thread of the process tree has spent runnable but waiting for a CPU."""
    total = 0
    for member in process_tree(pid):
        for stat in Path(f"/proc/{member}/task").glob("*/schedstat"):
            try:
                total += int(stat.read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total


class WaitSampler(threading.Thread):
    """Cumulative run-queue wait of the server and of the load side (mock + this client), sampled until
    stopped, so a slow request can be blamed on the side that was kept off its CPU."""

    def __init__(self, server_pid: int, load_pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.server_pid, self.load_pids = server_pid, load_pids
        self.times: list[float] = []
        self.server: list[int] = []
        self.load: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.times.append(time.monotonic())
            self.server.append(run_queue_wait_ns(self.server_pid))
            self.load.append(sum(run_queue_wait_ns(pid) for pid in self.load_pids))
            time.sleep(SAMPLE_SECONDS)

    def between(self, series: list[int], start: float, end: float) -> float:
        """Milliseconds of wait accrued in [start, end], widened to the samples around it."""
        lo = max(bisect_left(self.times, start) - 1, 0)
        hi = min(bisect_left(self.times, end), len(self.times) - 1)
        return (series[hi] - series[lo]) / 1e6 if hi > lo else 0.0


@dataclass(frozen=True)
class Attribution:
    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    slow: int  # requests over the threshold
    threshold_ms: float
    gc: int  # slow ones overlapping a gen-2 collection of the server
    mock_gc: int  # slow ones overlapping a gen-2 collection of the mock
    server_wait: int  # the server sat runnable, off-CPU, for at least half of the excess
    load_wait: int  # the same for the mock or the client
    unexplained: int
    worst_server_wait_ms: float


def gc_pauses(log: Path) -> list[tuple[float, float]]:
    """(start, end) monotonic times of the logged gen-2 collections."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [(float(at), float(at) + float(ms) / 1000) for ms, at in GC_LINE.findall(text)]


async def timed_requests(endpoint: Endpoint, seconds: float) -> list[tuple[float, float]]:
    """(start, end) monotonic times of sequential requests for `seconds`."""
    headers = {"x-api-key": endpoint.key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    body = request_body(stream=False)
    spans: list[tuple[float, float]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            start = time.monotonic()
            async with session.post(endpoint.url + endpoint.path, data=body, headers=headers) as response:
                await response.read()
            spans.append((start, time.monotonic()))
    return spans


def overlaps(pauses: list[tuple[float, float]], start: float, end: float) -> bool:
    return any(p_start < end and p_end > start for p_start, p_end in pauses)


def attribute(
    spans: list[tuple[float, float]],
    sampler: WaitSampler,
    pauses: list[tuple[float, float]],
    mock_pauses: list[tuple[float, float]],
) -> Attribution:
    latencies = sorted((end - start) * 1000 for start, end in spans)
    p50 = statistics.median(latencies)
    # Slow: well outside this client's own jitter (its p50 includes Python client overhead).
    threshold = max(5.0, 4 * p50)
    slow = gc = mock_gc = server_wait = load_wait = 0
    worst = 0.0
    for start, end in spans:
        latency = (end - start) * 1000
        waited = sampler.between(sampler.server, start, end)
        worst = max(worst, waited)
        if latency < threshold:
            continue
        slow += 1
        excess = latency - p50
        if overlaps(pauses, start, end):
            gc += 1
        elif overlaps(mock_pauses, start, end):
            mock_gc += 1
        elif waited >= excess / 2:
            server_wait += 1
        elif sampler.between(sampler.load, start, end) >= excess / 2:
            load_wait += 1
    return Attribution(
        requests=len(latencies),
        p50_ms=p50,
        p99_ms=latencies[int(len(latencies) * 0.99) - 1],
        max_ms=latencies[-1],
        slow=slow,
        threshold_ms=threshold,
        gc=gc,
        mock_gc=mock_gc,
        server_wait=server_wait,
        load_wait=load_wait,
        unexplained=slow - gc - mock_gc - server_wait - load_wait,
        worst_server_wait_ms=worst,
    )


async def trace(
    endpoint: Endpoint, pid: int, mock_pid: int, gc_log: Path, mock_log: Path, seconds: float
) -> Attribution:
    sampler = WaitSampler(pid, [mock_pid, os.getpid()])
    sampler.start()
    try:
        spans = await timed_requests(endpoint, seconds)
    finally:
        sampler.halt.set()
        await asyncio.to_thread(sampler.join)
    return attribute(spans, sampler, gc_pauses(gc_log), gc_pauses(mock_log))


if __name__ == "__main__":
    # A module of run.py's p99 study: run on its own it would exit having measured nothing.
    raise SystemExit("the p99 study and tail attribution run from run.py: .venv/bin/python bench/run.py --p99-only")

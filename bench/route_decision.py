"""Routing decision time with 10, 100 and 1,000 upstreams (issue 4's target: < 50 µs p50 at 100 upstreams,
growing no worse than linearly).

    python bench/route_decision.py            # ~15 s
    python bench/route_decision.py --write    # and (re)place the "Route decision" section of RESULTS.md

What is timed is `Router.route()` exactly as the gateway calls it for every request: the filters (model,
quota, health, rate limits, credentials), scoring of the kept candidates (in a pool over twice
`score_sample`, the ones that matter to the request plus a random sample: cache lookup, headroom estimate,
spread, errors, latency, load, weight) and the terminal strategy, trace included. The pool looks like a
busy one: every account has rate-limit observations of all four kinds, latency and prompt-size averages,
requests in flight and a warm cache of 64 other conversations; 5 % are unhealthy and 5 % parked by a 429.
Three request shapes:

- `cold`: no session, a prompt warm nowhere: every candidate is scored, the strategy breaks the tie.
- `warm`: no session, a prompt whose prefix is warm on one account: every candidate's cache is looked up.
- `sticky`: a Claude Code session continuing on its account: the fast path (no scoring of the others).

The prompt's breakpoints are analysed once, outside the timing, as the gateway does before routing; its
own cost is reported on the side. The garbage collector runs as the gateway sets it up (`settle_heap`).

The machine is shared and its speed swings within minutes, so the shapes are timed in rounds (a block of
each, then a block of a fixed piece of plain Python whose time says how slow the round ran): a slow spell
hits every shape alike, and the report says how slow the rounds ran.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from poolgate.api.anthropic import decode_request
from poolgate.app import settle_heap
from poolgate.cache.breakpoints import PromptPrefix, analyse
from poolgate.config import HealthConfig, RoutingConfig
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.routing.router import Router
from poolgate.upstreams.health import Failure, park, record_failure
from poolgate.upstreams.pool import Pool
from poolgate.upstreams.ratelimits import parse_ratelimit_headers

SECTION = "## Route decision"
SIZES = (10, 100, 1000)
MODEL = "claude-sonnet-4-5"
EPHEMERAL = {"type": "ephemeral"}
NOW = 10_000.0
WALL = 1_800_000_000.0


def claude_code_body(conversation: str, turns: int) -> bytes:
    """A Claude Code-shaped request: tools and system with markers, a growing conversation, the newest turn
    marked."""
    tools = [
        {"name": f"tool_{i}", "description": "Does a thing. " * 40, "input_schema": {"type": "object"}}
        for i in range(12)
    ]
    tools[-1]["cache_control"] = EPHEMERAL
    messages: list[dict[str, Any]] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": [{"type": "text", "text": f"{conversation} asks {turn}. " * 30}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {turn}. " * 60}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": "go on", "cache_control": EPHEMERAL}]})
    body = {
        "model": MODEL,
        "max_tokens": 8192,
        "stream": True,
        "tools": tools,
        "system": [
            {"type": "text", "text": "You are Claude Code. " * 5},
            {"type": "text", "text": "Project instructions. " * 600, "cache_control": EPHEMERAL},
        ],
        "messages": messages,
    }
    return orjson.dumps(body)


def prefix_of(body: bytes) -> PromptPrefix:
    ctx = decode_request("messages", "bench", "/v1/messages", b"", [], body)
    assert ctx.prompt is not None
    return analyse(ctx.prompt)


def ratelimit_headers(index: int) -> dict[str, str]:
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(WALL + 30))
    headers: dict[str, str] = {}
    for kind, limit in (
        ("requests", 4000),
        ("tokens", 2_000_000),
        ("input-tokens", 1_600_000),
        ("output-tokens", 400_000),
    ):
        headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
        headers[f"anthropic-ratelimit-{kind}-remaining"] = str(limit * (20 + index % 80) // 100)
        headers[f"anthropic-ratelimit-{kind}-reset"] = reset
    return headers


def busy_pool(size: int, others: list[PromptPrefix]) -> Pool:
    pool = Pool()
    pool.replace(
        Upstream(id=f"key-{i:04d}", kind="anthropic_api_key", base_url="http://127.0.0.1:1", weight=1 + i % 3)
        for i in range(size)
    )
    health = HealthConfig()
    for index, state in enumerate(pool.states()):
        state.observe(parse_ratelimit_headers(ratelimit_headers(index), NOW - 1, WALL - 1), NOW - 1)
        state.in_flight = index % 7
        for sample in range(5):
            state.stats.answered(400.0 + (index * 37 + sample * 11) % 900, NOW - 5 + sample)
            state.stats.counted_input(30_000 + index % 50 * 1000)
        for offset in range(64):
            other = others[(index * 7 + offset) % len(others)]
            state.warm.sent(other, NOW - 60)
            state.warm.answered(other, other.cacheable_tokens, 0, NOW - 60)
        if index % 20 == 7:
            record_failure(state.health, Failure.server_error, NOW - 1, health)
        elif index % 20 == 13:
            park(state.health, NOW + 30)
    return pool


def timed(call: Any, iterations: int) -> list[float]:
    clock = time.perf_counter_ns
    samples: list[float] = []
    for _ in range(iterations):
        began = clock()
        call()
        samples.append((clock() - began) / 1000)
    return samples


def analysis_times(count: int) -> list[float]:
    """Breakpoint analysis of fresh conversations (their tools and system are memoised after the first)."""
    samples: list[float] = []
    for index in range(count):
        body = claude_code_body(f"fresh-{index}", 6)
        began = time.perf_counter_ns()
        prefix_of(body)
        samples.append((time.perf_counter_ns() - began) / 1000)
    return samples


def interpreter_reference() -> None:
    """A fixed piece of plain Python (dict, attribute and arithmetic work, like routing's): its time says how
    fast this machine runs Python during this run, so runs on a shared machine can be compared."""
    counts: dict[int, int] = {}
    for i in range(2_000):
        counts[i % 97] = counts.get(i % 97, 0) + i


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Shape = tuple[int, str]  # (upstreams, request shape)


@dataclass
class Measured:
    """Every timed call per shape, and per round the p50 of the reference's block."""

    samples: dict[Shape, list[float]] = field(default_factory=dict)
    # Per shape, each round's p50 (in round order, like `reference_p50s`).
    round_p50s: dict[Shape, list[float]] = field(default_factory=dict)
    reference_p50s: list[float] = field(default_factory=list)
    reference_fastest: float = math.inf

    def p50(self, shape: Shape) -> float:
        return statistics.median(self.samples[shape])

    def slowdowns(self) -> list[float]:
        """Per round: the reference's p50 over its fastest call in the run (1.0: the machine's quiet speed)."""
        return [p50 / self.reference_fastest for p50 in self.reference_p50s]

    def quiet_p50(self, shape: Shape) -> float:
        """The shape's p50 at the machine's quiet speed: each round's p50 over that round's slowdown, the
        median over rounds."""
        return statistics.median(
            [p50 / slowdown for p50, slowdown in zip(self.round_p50s[shape], self.slowdowns(), strict=True)]
        )


def routers(size: int, others: list[PromptPrefix], cold: PromptPrefix, warm: PromptPrefix) -> dict[str, Any]:
    pool = busy_pool(size, others)
    home = pool.states()[size // 2 + 1]
    home.warm.sent(warm, NOW - 10)
    home.warm.answered(warm, warm.cacheable_tokens, 0, NOW - 10)
    router = Router(pool, RoutingConfig(strategy="round-robin"), clock=lambda: WALL)
    router.affinity.bind("session-sticky", home.upstream.id, NOW)
    return {
        "cold": lambda: router.route(MODEL, NOW, None, cold),
        "warm": lambda: router.route(MODEL, NOW, None, warm),
        "sticky": lambda: router.route(MODEL, NOW, "session-sticky", warm),
    }


def measure(calls: dict[Shape, Any], rounds: int) -> Measured:
    """Rounds of one block per shape and one of the interpreter reference, so that a slow spell of the
    machine hits every shape alike and each round says how slow it was."""
    for call in calls.values():
        timed(call, 200)
    # The collector as the gateway sets it up: the pools built above are long-lived state, like a gateway's.
    settle_heap()
    measured = Measured({shape: [] for shape in calls}, {shape: [] for shape in calls})
    for _ in range(rounds):
        for (size, shape), call in calls.items():
            block = timed(call, max(2_000, 400_000 // size) // rounds)
            measured.samples[(size, shape)] += block
            measured.round_p50s[(size, shape)].append(statistics.median(block))
        reference = timed(interpreter_reference, 40)
        measured.reference_p50s.append(statistics.median(reference))
        measured.reference_fastest = min(measured.reference_fastest, *reference)
    return measured


def render(measured: Measured, analyse_us: float, rounds: int, command: str, version: str) -> str:
    lines = [
        SECTION,
        "",
        f"`{command}` ({time.strftime('%Y-%m-%d %H:%M')}), {version}; one process pinned to core 1; "
        f"`Router.route()` timed per call with `perf_counter_ns`, in {rounds} rounds of one block per shape "
        "and one of the interpreter reference (see below).",
        "",
        "| upstreams | request | p50 µs | p90 µs | p99 µs | p50 µs per upstream |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for (size, shape), samples in measured.samples.items():
        p50 = statistics.median(samples)
        lines.append(
            f"| {size} | {shape} | {p50:.1f} | {quantile(samples, 0.9):.1f} | {quantile(samples, 0.99):.1f} "
            f"| {p50 / size:.2f} |"
        )
    lines += ["", "Growth of the p50 from 100 to 1,000 upstreams (10× the upstreams; linear is 10×):", ""]
    for shape in ("cold", "warm", "sticky"):
        lines.append(f"- {shape}: {measured.p50((1000, shape)) / measured.p50((100, shape)):.1f}×")
    at_100 = max(measured.p50(key) for key in measured.samples if key[0] == 100)
    slowdowns = measured.slowdowns()
    lines += [
        "",
        f"Target < 50 µs p50 at 100 upstreams: {'met' if at_100 < 50 else 'NOT met'} (slowest shape "
        f"{at_100:.1f} µs). For scale: analysing the request's cache breakpoints (once per request, before "
        f"routing, independent of the pool) takes {analyse_us:.0f} µs p50 for this "
        f"{len(claude_code_body('x', 6)) // 1024} KB Claude Code body uncached; repeated prefixes are memoised.",
        "",
        "This machine is shared and its speed swings about 2× within minutes. Each round also times a fixed piece "
        "of plain Python (`interpreter_reference`, dict and arithmetic work like routing's); a round's slowdown "
        "is its p50 over the fastest call of the run (1.0: quiet). Slowdowns in this run: median "
        f"{statistics.median(slowdowns):.2f}×, from {min(slowdowns):.2f}× to {max(slowdowns):.2f}× "
        f"(reference fastest {measured.reference_fastest:.0f} µs).",
        "",
        "At the machine's quiet speed (each round's p50 over that round's slowdown, median over rounds), 100 "
        "upstreams: "
        + ", ".join(f"{shape} {measured.quiet_p50((100, shape)):.1f} µs" for shape in ("cold", "warm", "sticky"))
        + "; the target is judged on the measured p50 above.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="(re)place the Route decision section of RESULTS.md")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of one block per shape (default 20)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    others = [prefix_of(claude_code_body(f"other-{i}", 1 + i % 6)) for i in range(256)]
    cold = prefix_of(claude_code_body("cold", 6))
    warm = prefix_of(claude_code_body("warm", 6))
    calls = {(size, shape): call for size in SIZES for shape, call in routers(size, others, cold, warm).items()}
    measured = measure(calls, args.rounds)
    analyse_us = statistics.median(analysis_times(300))
    from results import code_version, command_line, write_section

    command = command_line("route_decision.py")
    section = render(measured, analyse_us, args.rounds, command.strip(), code_version())
    print(section)
    if args.write:
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

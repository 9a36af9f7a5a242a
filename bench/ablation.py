"""Where the gateway's per-request CPU goes under load: the shipped gateway against copies of it with one
piece of work taken out, measured in one run.

    python bench/ablation.py                  # 10 rounds of 3 s cells, ~4 min
    python bench/ablation.py --rounds 4       # a quicker, noisier look
    python bench/ablation.py --write          # and (re)place the "Ablations" section of RESULTS.md

Each arm is its own gateway process on core 1 (the mock, wrk and this script on core 0), started through
this script's `--ablate` launcher, which replaces one step with a no-op before serving:

- `accounting`: everything after the answer that the request does not wait for (pricing in the batch, the
  usage record, observers: metrics and the usage writer, whose process then inserts nothing);
- `usage writer`: only the usage writer (records are made, priced and observed, but never stored);
- `metrics`: only the metrics observer;
- `trace ring`: writing the routing trace as JSON and keeping it for `route explain`;
- `rate-limit headers`: reading the answer's `anthropic-ratelimit-*` headers.

The arms run in turn within each round (in a rotating order); for every cell the gateway's CPU time (its
process tree, usage writer included) is read from /proc before and after, and the figure is each arm's CPU
per request over the shipped gateway's in the same round, median over rounds. An ablated gateway is not a
product (it forgets usage, or flies blind on rate limits): these say what each step costs in situ, where
a step timed in a loop (`bench/stage_costs.py`) runs on warm caches.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import procs
from procs import LOAD_CORE, PROXY_CORE

BENCH = Path(__file__).resolve().parent
SECTION = "## Ablations"
KEY = "pg-bench-ablation-0123456789abcdef"
CELL = ("json", 16)
# Each arm, and what it takes out of the gateway.
WHAT = {
    "shipped": "nothing",
    "accounting": "pricing in the batch, usage record, observers (metrics, usage writer)",
    "usage writer": "storing usage records",
    "metrics": "the metrics observer",
    "trace ring": "the routing trace as JSON, kept for `route explain`",
    "rate-limit headers": "reading the answer's rate-limit headers",
}
ARMS = tuple(WHAT)


def _no_accounting() -> None:
    from poolgate.app import Gateway

    def account(self: Gateway) -> None:
        self._account_call = None
        self._finished = []

    Gateway._account = account  # type: ignore[method-assign]


def _no_usage_writer() -> None:
    from poolgate.store.usage import UsageWriter

    UsageWriter.request_finished = lambda self, event: None  # type: ignore[method-assign]


def _no_metrics() -> None:
    from poolgate.telemetry.metrics import Metrics

    Metrics.request_finished = lambda self, event: None  # type: ignore[method-assign]


def _no_trace_ring() -> None:
    from poolgate.app import Gateway

    Gateway._keep_trace = lambda self, request_id, trace: None  # type: ignore[method-assign]


def _no_ratelimit_headers() -> None:
    from poolgate.lifecycle import relay

    relay.parse_ratelimit_headers = lambda *args: {}  # type: ignore[assignment]


ABLATIONS: dict[str, Callable[[], None]] = {
    "accounting": _no_accounting,
    "usage writer": _no_usage_writer,
    "metrics": _no_metrics,
    "trace ring": _no_trace_ring,
    "rate-limit headers": _no_ratelimit_headers,
}


def serve_ablated(arm: str) -> None:
    """Run the `poolgate` CLI with one step of the gateway taken out (none for `shipped`)."""
    if arm != "shipped":
        ABLATIONS[arm]()
    from poolgate.cli.main import main

    sys.argv = ["poolgate", *sys.argv[3:]]
    main()


@dataclass
class Arm:
    name: str
    url: str
    server: object
    cpu_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    errors: int = 0


def render(arms: dict[str, Arm], command: str, rounds: int, seconds: float, head: str) -> str:
    from results import median_with_spread

    shipped = arms["shipped"]
    lines = [
        SECTION,
        "",
        f"`{command}` — {rounds} rounds of {seconds:g} s wrk cells ({CELL[0]}, c={CELL[1]}) per arm, the arms in "
        f"turn within each round; {head}. Each arm its own gateway process on core 1; mock, wrk and the "
        "script on core 0. The change: each arm's CPU per request (gateway and its usage writer) over the "
        "shipped gateway's in the same round, median over rounds, the middle half of the rounds in brackets.",
        "",
        "| arm | what is taken out | requests/s | CPU µs / request | change |",
        "|---|---|---:|---:|---:|",
    ]
    for name, arm in arms.items():
        ratios = [mine / base for mine, base in zip(arm.cpu_us, shipped.cpu_us, strict=False)]
        change = "–" if arm is shipped else median_with_spread(ratios, lambda r: f"{(r - 1) * 100:+.1f} %")
        lines.append(
            f"| {name} | {WHAT[name]} | {statistics.median(arm.rps):,.0f} | "
            f"{statistics.median(arm.cpu_us):,.0f} | {change} |"
        )
    errors = {arm.name: arm.errors for arm in arms.values() if arm.errors}
    if errors:
        lines += ["", f"Errors during the run (the numbers of those arms are not fair): {errors}"]
    return "\n".join(lines) + "\n"


async def main() -> int:
    from load import Endpoint, prime, run_wrk_costed
    from results import code_version, command_line, publish

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--write", action="store_true", help="(re)place the Ablations section of RESULTS.md")
    args = parser.parse_args()
    work = procs.load_side("ablation", "wrk")
    mock, mock_url = await procs.start_mock(work, LOAD_CORE)
    servers = [mock]
    arms: dict[str, Arm] = {}
    try:
        for name in ARMS:
            port = procs.free_port()
            slug = name.replace(" ", "-")
            config = procs.gateway_config(work / f"{slug}.yaml", port, mock_url, [f'{{name: bench, key: "{KEY}"}}'])
            cmd = [sys.executable, __file__, "--ablate", name, "serve", "--config", str(config)]
            log = work / f"{slug}.log"
            server = procs.start(name, cmd, PROXY_CORE, log, cwd=work)
            servers.append(server)
            arms[name] = Arm(name, f"http://127.0.0.1:{port}", server)
        for arm in arms.values():
            if not await procs.wait_ready(arm.server, arm.url + "/healthz", 60):  # type: ignore[arg-type]
                raise SystemExit(f"arm {arm.name} did not start: {arm.server.log_tail()}")  # type: ignore[attr-defined]
            await procs.settled(arm.server.process.pid)  # type: ignore[attr-defined]
            failure = await prime(Endpoint(arm.url, KEY), count=20)
            if failure is not None:
                raise SystemExit(f"arm {arm.name} does not answer: {failure}")
        order = list(arms.values())
        for round_index in range(args.rounds):
            for arm in order:
                pid = arm.server.process.pid  # type: ignore[attr-defined]
                endpoint = Endpoint(arm.url, KEY)
                result, cpu_us = await run_wrk_costed(pid, endpoint, CELL[1], CELL[0] == "sse", args.seconds)
                arm.cpu_us.append(cpu_us)
                arm.rps.append(result.rps)
                arm.errors += max(result.errors, 0)
                print(
                    f"round {round_index + 1}/{args.rounds} {arm.name:20} {result.rps:8.0f} rps "
                    f"{arm.cpu_us[-1]:7.0f} µs CPU/req errors {result.errors}",
                    flush=True,
                )
            order = order[1:] + order[:1]  # rotate who goes first
    finally:
        for server in reversed(servers):
            procs.stop(server)
    command = command_line("ablation.py")
    section = render(arms, command.strip(), args.rounds, args.seconds, code_version())
    publish(SECTION, section, work, args.write)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--ablate":
        serve_ablated(sys.argv[2])
    else:
        sys.path.insert(0, str(BENCH))
        raise SystemExit(asyncio.run(main()))

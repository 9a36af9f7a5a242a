"""poolgate benchmark: the gateway against baselines measured in the same run.

    python bench/run.py --quick      # ~2-3 min smoke run (3 s cells, 50 TTFB samples, no p99 study)
    python bench/run.py              # full run, ~14 min (3 rounds of 4 s cells, 300 TTFB samples, p99 study)
    python bench/run.py --write      # also rewrite bench/RESULTS.md with this run's report

Targets, all relaying to the same mock upstream: direct-to-mock (the floor), the bare proxy on
uvicorn and on granian (the cost of the stack), poolgate, and LiteLLM's proxy. Pinning, on 2 cores:
the mock, wrk, this script and its TTFB client share core 0 (the load side); the proxy under test has
core 1 to itself, as one production worker would. Every target stays up for the whole matrix but only
one is loaded at a time, and cells are interleaved across targets so that drift on this shared,
noisy machine hits all targets alike. Only the ratios between targets mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import litellm_target
import p99
import procs
from load import Endpoint, WrkResult, measure_ttfb, prime, run_wrk
from procs import LOAD_CORE, PROXY_CORE
from report import (
    BARE,
    DIRECT,
    GATEWAY,
    GRANIAN,
    LITELLM,
    Cell,
    Measured,
    VariantRow,
    added_latency_table,
    headline,
    matrix_table,
    p99_table,
    tail_table,
    ttfb_rss_table,
)
from results import code_version, command_line
from tail import Attribution

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
POOLGATE = str(Path(sys.executable).parent / "poolgate")
GATEWAY_KEY = "pg-bench-0123456789abcdef"
CONCURRENCIES = (1, 16, 64)


@dataclass(frozen=True)
class Plan:
    seconds: float
    ttfb_count: int
    p99_seconds: float  # 0: skip the p99 study
    litellm: bool
    # The matrix runs this many times over; each cell reports its median-throughput round. This machine's
    # cores change speed for seconds at a time, and one unlucky cell would otherwise be the headline.
    rounds: int = 1


@dataclass
class Target:
    measured: Measured
    endpoint: Endpoint
    ready_path: str
    ready_seconds: float = 30
    server: procs.Server | None = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short cells, few TTFB samples, no p99 study")
    parser.add_argument("--write", action="store_true", help="rewrite bench/RESULTS.md with this run")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    parser.add_argument("--seconds", type=float, help="override the duration of each wrk cell")
    parser.add_argument("--rounds", type=int, help="override how many times the matrix runs (median round kept)")
    parser.add_argument("--p99-only", action="store_true", help="only the bare-proxy p99 study")
    args = parser.parse_args()
    if args.p99_only and args.write:
        # --write replaces the whole report, which a p99 study alone would blank.
        parser.error("--write rewrites the whole report: run the full benchmark to write it, not --p99-only")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(seconds=3, ttfb_count=50, p99_seconds=0, litellm=not args.no_litellm)
    else:
        plan = Plan(seconds=4, ttfb_count=300, p99_seconds=15, litellm=not args.no_litellm, rounds=3)
    if args.seconds:
        plan = replace(plan, seconds=args.seconds)
    if args.rounds:
        plan = replace(plan, rounds=max(1, args.rounds))
    if args.p99_only:
        plan = replace(plan, p99_seconds=plan.p99_seconds or 15, litellm=False)
    return plan


def gateway_config(work: Path, port: int, mock_url: str) -> Path:
    return procs.gateway_config(work / "poolgate.yaml", port, mock_url, [f'{{name: bench, key: "{GATEWAY_KEY}"}}'])


def start_bare(name: str, server: str, mock_url: str, work: Path) -> Target:
    port = procs.free_port()
    cmd = [sys.executable, str(BENCH / "bare_proxy.py"), "--upstream", mock_url, "--port", str(port)]
    target = Target(Measured(name), Endpoint(f"http://127.0.0.1:{port}", "any"), "/")
    target.server = procs.start(name, [*cmd, "--server", server], PROXY_CORE, work / f"{name}.log")
    return target


def start_gateway(mock_url: str, work: Path) -> Target:
    port = procs.free_port()
    cmd = [POOLGATE, "serve", "--config", str(gateway_config(work, port, mock_url))]
    target = Target(Measured(GATEWAY), Endpoint(f"http://127.0.0.1:{port}", GATEWAY_KEY), "/healthz")
    target.server = procs.start(GATEWAY, cmd, PROXY_CORE, work / "poolgate.log", cwd=work)
    return target


def start_litellm(mock_url: str, work: Path) -> Target:
    port = procs.free_port()
    key = litellm_target.MASTER_KEY
    target = Target(
        Measured(LITELLM), Endpoint(f"http://127.0.0.1:{port}", key, bearer=True), "/health/liveliness", 240
    )
    reason = litellm_target.install(work / "litellm-install.log")
    if reason is not None:
        target.measured.note = reason
        return target
    config = work / "litellm.yaml"
    litellm_target.write_config(config, mock_url, "claude-sonnet-4-5")
    cmd = litellm_target.command(config, port)
    target.server = procs.start(LITELLM, cmd, PROXY_CORE, work / "litellm.log", litellm_target.ENV, cwd=work)
    return target


def start_targets(mock_url: str, work: Path, plan: Plan) -> list[Target]:
    # LiteLLM before the others: its first run installs it for minutes, and servers started before then are
    # not yet in the list the caller's `finally` stops when the run is cut short (SIGTERM) meanwhile.
    litellm = start_litellm(mock_url, work) if plan.litellm else None
    targets = [
        Target(Measured(DIRECT), Endpoint(mock_url, "sk-ant-api03-mock-key-1"), "/"),
        start_bare(BARE, "uvicorn", mock_url, work),
    ]
    if (missing := procs.granian_missing()) is None:
        targets.append(start_bare(GRANIAN, "granian", mock_url, work))
    else:
        targets.append(Target(Measured(GRANIAN, note=missing), Endpoint("", ""), "/"))
    targets.append(start_gateway(mock_url, work))
    if litellm is not None:
        targets.append(litellm)
    return targets


async def await_ready(targets: list[Target]) -> list[Target]:
    """The targets that answered in time; the others carry the reason in their note."""
    ready = []
    for target in targets:
        if target.measured.note:
            continue
        url = target.endpoint.url + target.ready_path
        if await procs.wait_ready(target.server, url, target.ready_seconds):
            ready.append(target)
            continue
        tail = target.server.log_tail() if target.server else ""
        target.measured.note = f"did not become ready in {target.ready_seconds:.0f}s ({tail or 'no output'})"
        procs.stop(target.server)
    return ready


async def warm_up(targets: list[Target], work: Path) -> None:
    """Prime, then a short load, so pools and lazy imports are warm before anything is measured. A target
    that fails here is dropped with the reason rather than polluting the tables."""
    for target in list(targets):
        failure = await prime(target.endpoint)
        if failure is None:
            result = run_wrk(target.endpoint, 4, False, 2, LOAD_CORE, work / "wrk.log")
            if not result.ok:
                failure = f"{result.requests} requests, {result.errors} errors in a 2 s wrk warm-up"
        if failure is not None:
            target.measured.note = f"warm-up failed: {failure}"
            targets.remove(target)


async def run_matrix(targets: list[Target], cells: list[Cell], plan: Plan, work: Path) -> None:
    """Every cell for every target, round after round (interleaved, so a slow spell of the machine hits
    all targets alike); each cell keeps its median-throughput round, latencies from that same round."""
    rounds: dict[tuple[str, Cell], list[WrkResult]] = {}
    for round_number in range(1, plan.rounds + 1):
        for mode, concurrency in cells:
            for target in targets:
                # Ctrl-C cancels this task, which only notices at an await: without one here, the whole
                # matrix (up to ten minutes) ran on after it, every cell but the interrupted one.
                await asyncio.sleep(0)
                result = run_wrk(target.endpoint, concurrency, mode == "sse", plan.seconds, LOAD_CORE, work / "wrk.log")
                rounds.setdefault((target.measured.name, (mode, concurrency)), []).append(result)
                print(
                    f"round {round_number}/{plan.rounds} {target.measured.name:>13} {mode} c={concurrency:<3} "
                    f"{result.rps:8.0f} rps  p50 {result.p50_ms:7.2f}  p99 {result.p99_ms:8.2f}  "
                    f"max {result.max_ms:8.1f} ms  errors {result.errors}",
                    flush=True,
                )
    for target in targets:
        for cell in cells:
            target.measured.rounds[cell] = rounds[(target.measured.name, cell)]
            results = sorted(rounds[(target.measured.name, cell)], key=lambda result: result.rps)
            target.measured.cells[cell] = results[len(results) // 2]


async def measure_after_load(targets: list[Target], mock: procs.Server, plan: Plan) -> None:
    for target in targets:
        target.measured.ttfb = await measure_ttfb(target.endpoint, plan.ttfb_count)
        server = target.server or (mock if target.measured.name == DIRECT else None)
        if server is not None:
            target.measured.rss_mb = procs.rss_mb(server.process.pid)


def render(
    measured: list[Measured],
    cells: list[Cell],
    plan: Plan,
    command: str,
    p99_rows: list[VariantRow],
    tails: list[tuple[str, Attribution]],
) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = (
        f"Machine: {os.cpu_count()} cores, shared with other work (noisy): only same-run ratios mean anything. "
        f"Proxy under test alone on core {PROXY_CORE}; mock, wrk and the TTFB client on core {LOAD_CORE}."
    )
    if not measured:  # --p99-only: no wrk matrix, no TTFB run
        lines = [f"Command: `{command}` ({stamp}), {code_version()}.", machine]
        return "\n".join(lines + p99_sections(plan, p99_rows, tails)) + "\n"
    lines = [
        f"Command: `{command}` ({stamp}), {code_version()}; {plan.rounds} interleaved round(s) of {plan.seconds:g} s "
        "per wrk cell, each cell showing its median-throughput round; wrk -t1, ~5 KB body, max_tokens 64.",
        machine,
        "",
        "## Headline",
        "",
        *headline(measured, cells),
        "",
        "## Throughput and latency (wrk)",
        "",
        *matrix_table(measured, cells),
        "",
        "## Added p50 latency over direct-to-mock",
        "",
        *added_latency_table(measured, cells),
        "",
        f"## Streaming time to first byte ({plan.ttfb_count} sequential requests) and memory",
        "",
        *ttfb_rss_table(measured),
    ]
    return "\n".join(lines + p99_sections(plan, p99_rows, tails)) + "\n"


def p99_sections(plan: Plan, p99_rows: list[VariantRow], tails: list[tuple[str, Attribution]]) -> list[str]:
    lines: list[str] = []
    if p99_rows:
        lines += ["", f"## p99 study: bare proxy, c=1, non-streaming, {plan.p99_seconds:g} s each", ""]
        lines += p99_table(p99_rows)
    if tails:
        lines += ["", f"## Tail attribution: sequential client, c=1, non-streaming, {plan.p99_seconds:g} s each", ""]
        lines += tail_table(tails)
    return lines


def tail_specs(mock_url: str, work: Path) -> list[p99.TailSpec]:
    """The bare proxy and poolgate, both with their gen-2 collections logged."""
    bare_port, gateway_port = procs.free_port(), procs.free_port()
    bare_cmd = [sys.executable, str(BENCH / "bare_proxy.py"), "--upstream", mock_url, "--port", str(bare_port)]
    tail_work = work / "tail"
    tail_work.mkdir(exist_ok=True)
    config = gateway_config(tail_work, gateway_port, mock_url)
    gateway_cmd = [sys.executable, str(BENCH / "traced_poolgate.py"), "serve", "--config", str(config)]
    return [
        p99.TailSpec(BARE, [*bare_cmd, "--gc-log"], Endpoint(f"http://127.0.0.1:{bare_port}", "any"), "/"),
        p99.TailSpec(GATEWAY, gateway_cmd, Endpoint(f"http://127.0.0.1:{gateway_port}", GATEWAY_KEY), "/healthz"),
    ]


async def benchmark(plan: Plan, mock_url: str, mock: procs.Server, work: Path) -> list[Measured]:
    targets = start_targets(mock_url, work, plan)
    try:
        ready = await await_ready(targets)
        await warm_up(ready, work)
        cells = [(mode, c) for mode in ("json", "sse") for c in CONCURRENCIES]
        await run_matrix(ready, cells, plan, work)
        await measure_after_load(ready, mock, plan)
    finally:
        for target in targets:
            procs.stop(target.server)
    return [t.measured for t in targets]


async def main() -> None:
    args = parse_args()
    plan = make_plan(args)
    # This process and its TTFB client belong to the load side.
    work = procs.load_side("run", "wrk")
    mock_port = procs.free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    # Through traced_poolgate.py: the same mock, with its gen-2 GC pauses logged for the tail attribution.
    mock_cmd = [sys.executable, str(BENCH / "traced_poolgate.py"), "mock-upstream", "--port", str(mock_port)]
    mock_cmd += ["--accept-any-key", "--unlimited"]
    mock = procs.start("mock", mock_cmd, LOAD_CORE, work / "mock.log")
    measured: list[Measured] = []
    p99_rows: list[VariantRow] = []
    tails: list[tuple[str, Attribution]] = []
    try:
        if not await procs.wait_ready(mock, mock_url + "/", 60):
            raise SystemExit(f"the mock upstream did not start: {mock.log_tail()}")
        if not args.p99_only:
            measured = await benchmark(plan, mock_url, mock, work)
        if plan.p99_seconds:
            p99_rows = await p99.investigate(mock_url, work, plan.p99_seconds, PROXY_CORE, LOAD_CORE)
            specs = tail_specs(mock_url, work)
            tails = await p99.attribute_tails(specs, mock, work, plan.p99_seconds, PROXY_CORE)
    finally:
        procs.stop(mock)
    command = command_line("run.py")
    cells = [(mode, c) for mode in ("json", "sse") for c in CONCURRENCIES]
    text = render(measured, cells, plan, command.strip(), p99_rows, tails)
    (work / "report.md").write_text(text)
    print("\n" + text)
    print(f"logs and the report: {work}")
    if args.write:
        results = BENCH / "RESULTS.md"
        others = other_sections(results.read_text() if results.exists() else "")
        results.write_text("# Benchmark results\n\n" + text.rstrip("\n") + "\n" + ("\n" + others if others else ""))


# Sections other harnesses write into RESULTS.md (cache_affinity.py, policy_overhead.py, route_decision.py,
# ablation.py, instructions.py, bigbody.py): kept as they are, whichever of them came first.
OTHER_SECTIONS = (
    "## Cache affinity",
    "## Policy overhead",
    "## Route decision",
    "## Ablations",
    "## Instructions per request",
    "## Large bodies",
)


def other_sections(old: str) -> str:
    starts = [index for heading in OTHER_SECTIONS if (index := old.find("\n" + heading)) >= 0]
    return old[min(starts) + 1 :] if starts else ""


if __name__ == "__main__":
    asyncio.run(main())

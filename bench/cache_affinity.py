"""Cache affinity: what poolgate's routing saves in prompt-cache cost, against round-robin and the ideal.

    python bench/cache_affinity.py                      # 24 sessions × 12 turns over 4 keys, ~1-2 min
    python bench/cache_affinity.py --sessions 48 --turns 16 --keys 6 --seed 7
    python bench/cache_affinity.py --write              # also (re)place the "Cache affinity" section of RESULTS.md

Many concurrent Claude Code-like sessions (a large shared tools + system prefix, growing conversations,
`cache_control` where Claude Code puts it) run over a pool of keys on the mock upstream, whose per-key
prompt cache follows the real API's rules. Three arms, each with the mock's caches cold:

- round-robin: poolgate with cache-aware scoring and session stickiness turned off;
- poolgate: poolgate's default routing;
- ideal: the client talks straight to the mock, session i always on key i mod K, no rate limits.

Then a failover scenario: the poolgate arm again, with one key answering 500 from the run's midpoint on.
Only same-run ratios mean anything: recovered saving = (cost_rr − cost_poolgate) / (cost_rr − cost_ideal),
throughput loss = 1 − rps_poolgate / rps_round_robin. Exits non-zero on errors, not on missed targets.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

import procs
from cache_affinity_client import Hook, Target, Turn, pauses, run_sessions, warm_up
from cache_affinity_mock import DEFAULTS, gateway_key, ideal_key
from cache_affinity_procs import (
    GATEWAY_KEY,
    cold_mock,
    gateway_config,
    mock_admin,
    requests_on,
    routing_fields,
    usage_records,
)
from cache_affinity_report import (
    Arm,
    Failover,
    Run,
    arm_table,
    concentration,
    failover_report,
    headline,
    read_share,
    upstream_lines,
)
from cache_affinity_workload import MODEL, Request, Workload, build
from procs import LOAD_CORE, PROXY_CORE
from results import code_version, command_line, publish

BENCH = Path(__file__).resolve().parent
SECTION = "## Cache affinity"
POOLGATE = str(Path(sys.executable).parent / "poolgate")
ARM_TIMEOUT = 600.0
WARM_UP_PER_KEY = 4  # sequential requests, then as many at once
FAILOVER_THINK = 0.1  # mean seconds; the run then lasts several health cooldowns
FAILOVER_HEALTH = "{cooldown_seconds: 0.5}"
FAULTS = {"500": {"status": 500}, "reset": {"reset_connection": True}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=24, help="concurrent sessions (default 24)")
    parser.add_argument("--turns", type=int, default=12, help="turns per session (default 12)")
    parser.add_argument("--keys", type=int, default=4, help="upstream keys in the pool (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument(
        "--think", type=float, default=0.01, help="mean think time before a turn, exponential (default 0.01 s)"
    )
    parser.add_argument("--repeats", type=int, default=4, help="runs of each gateway arm, interleaved (default 4)")
    parser.add_argument(
        "--input-tpm",
        type=int,
        default=DEFAULTS.input_tokens_per_minute,
        help="input tokens per minute of each gateway-arm key (default: the mock's, 2,000,000)",
    )
    parser.add_argument(
        "--poolgate-routing",
        default="{}",
        help="the poolgate arm's `routing:` section, YAML flow style (default {}: poolgate's defaults)",
    )
    parser.add_argument("--fault", choices=sorted(FAULTS), default="500", help="the failover fault (default 500)")
    parser.add_argument("--no-failover", action="store_true", help="skip the failover scenario")
    parser.add_argument("--write", action="store_true", help="(re)place the Cache affinity section of RESULTS.md")
    args = parser.parse_args()
    if min(args.sessions, args.turns, args.keys, args.repeats) < 1 or args.turns < 4 or args.think < 0:
        parser.error("sessions, keys and repeats must be ≥ 1, turns ≥ 4, think ≥ 0")
    return args


class Harness:
    def __init__(self, args: argparse.Namespace, mock_url: str, work: Path) -> None:
        self.args = args
        self.mock_url = mock_url
        self.work = work
        self.runs = 0
        self.findings: list[str] = []  # what looked wrong outside the arms' numbers

    async def through_gateway(
        self,
        name: str,
        routing: str,
        workload: Workload,
        send_session: bool,
        think: list[list[float]],
        hook: Hook | None = None,
        health: str = "{}",
    ) -> Run:
        """A fresh gateway for one run: start, warm up, cold caches, the sessions, stop."""
        self.runs += 1
        port = procs.free_port()
        run_dir = self.work / f"{self.runs:02d}-{name}"
        config = gateway_config(run_dir / "poolgate.yaml", port, self.mock_url, self.args.keys, routing, health)
        cmd = [POOLGATE, "serve", "--config", str(config)]
        gateway = procs.start(name, cmd, PROXY_CORE, run_dir / "poolgate.log", cwd=run_dir)
        url = f"http://127.0.0.1:{port}"
        try:
            if not await procs.wait_ready(gateway, url + "/healthz", 60):
                raise RuntimeError(f"{name}: the gateway did not become ready: {gateway.log_tail()}")
            failed = await warm_up(url, GATEWAY_KEY, WARM_UP_PER_KEY * self.args.keys)
            if failed:
                raise RuntimeError(f"{name}: {failed} warm-up requests failed: {gateway.log_tail()}")
            if not await procs.settled(gateway.process.pid):
                self.findings.append(f"{run_dir.name}: the gateway was still busy when its run started")
            await cold_mock(self.mock_url)

            def route(request: Request) -> Target:
                return Target(url, GATEWAY_KEY, None)

            own, children = procs.cpu_seconds(gateway.process.pid)
            turns, wall = await asyncio.wait_for(run_sessions(workload, route, send_session, think, hook), ARM_TIMEOUT)
            own_after, children_after = procs.cpu_seconds(gateway.process.pid)
        finally:
            procs.stop(gateway)
        self.check_usage(run_dir, 2 * WARM_UP_PER_KEY * self.args.keys + sum(turn.attempts for turn in turns))
        return Run(turns, wall, own_after - own, children_after - children)

    def check_usage(self, run_dir: Path, expected: int) -> None:
        """DESIGN.md: a usage record for every finished request, also across restarts. The gateway was
        stopped the way procs.stop stops it (SIGTERM to its process group, as Ctrl-C or systemd would)."""
        try:
            written = usage_records(run_dir / "poolgate-data")
        except sqlite3.Error as exc:
            self.findings.append(f"{run_dir.name}: could not count usage records ({exc})")
            return
        if written < expected:
            self.findings.append(
                f"{run_dir.name}: {written} usage records for {expected} requests after a SIGTERM to the gateway's "
                f"process group ({expected - written} lost)"
            )

    async def ideal(self, workload: Workload, think: list[list[float]]) -> Run:
        await cold_mock(self.mock_url)
        keys = self.args.keys

        def route(request: Request) -> Target:
            return Target(self.mock_url, ideal_key(request.session % keys), f"k{request.session % keys}")

        turns, wall = await asyncio.wait_for(run_sessions(workload, route, True, think), ARM_TIMEOUT)
        return Run(turns, wall)

    async def failover(self, workload: Workload, routing: str) -> Failover:
        """The poolgate arm with a persistent fault on one key from the midpoint on. Time is scaled down so
        that the failed key's cooldowns run out during the run (it is probed again, as it would be over a
        real session's minutes): a longer think time and a 0.5 s health cooldown instead of 5 s."""
        think = pauses(workload, max(self.args.think, FAILOVER_THINK), self.args.seed)
        total = workload.sessions * workload.turns
        done: list[Turn] = []
        state: dict[str, Any] = {}
        fault = FAULTS[self.args.fault]

        async def hook(turn: Turn) -> None:
            done.append(turn)
            if "failed" in state or len(done) < total // 2:
                return
            latest: dict[int, str] = {}
            for seen in sorted(done, key=lambda t: t.turn):
                latest[seen.session] = seen.upstream
            # The upstream serving the most sessions right now goes down: the most sessions must move.
            failed = min(Counter(latest.values()).most_common(), key=lambda item: (-item[1], item[0]))[0]
            state["failed"] = failed
            state["at"] = time.monotonic()  # before the POST: a turn that starts meanwhile may meet the fault
            key = gateway_key(int(failed[1:]))
            state["seen"] = await requests_on(self.mock_url, key)
            await mock_admin(self.mock_url, "POST", f"/_mock/faults/{key}", fault)

        run = await self.through_gateway("failover", routing, workload, True, think, hook, FAILOVER_HEALTH)
        if "failed" not in state:
            await cold_mock(self.mock_url)
            raise RuntimeError("failover: the fault was never injected")
        failed = str(state["failed"])
        met = await requests_on(self.mock_url, gateway_key(int(failed[1:]))) - state["seen"]
        await cold_mock(self.mock_url)
        return Failover(run.turns, run.wall, state["at"], failed, orjson.dumps(fault).decode(), met)


def routing_configs(fields: set[str], poolgate: str) -> tuple[str, str, bool]:
    """The round-robin arm's routing section, the poolgate arm's, and whether round-robin may send sessions."""
    switches = [name for name in ("cache_aware", "session_stickiness") if name in fields]
    rr = "{" + ", ".join(["strategy: round-robin", *(f"{name}: false" for name in switches)]) + "}"
    return rr, poolgate, "session_stickiness" in fields


async def measure(
    args: argparse.Namespace, workload: Workload, mock_url: str, work: Path
) -> tuple[list[Arm], Failover | None, list[str], list[str]]:
    """The three arms and the failover run; notes on the setup, and what looked wrong outside the numbers."""
    fields = routing_fields()
    rr_routing, pg_routing, rr_sessions = routing_configs(fields, args.poolgate_routing)
    notes = []
    if not rr_sessions:
        notes.append(
            "this checkout has no `routing.session_stickiness` switch: the round-robin arm sends no session id "
            "(no `X-Claude-Code-Session-Id`, no session in `metadata.user_id`) so that stickiness cannot engage"
        )
    if "cache_aware" not in fields:
        notes.append("this checkout has no `routing.cache_aware` switch: the poolgate arm is stickiness only")
    rr_workload = workload if rr_sessions else build(args.sessions, args.turns, args.seed, anonymous=True)
    harness = Harness(args, mock_url, work)
    rr = Arm("round-robin", f"poolgate, `routing: {rr_routing}`")
    pg = Arm("poolgate", f"poolgate, `routing: {pg_routing}`")
    ideal = Arm("ideal", f"direct to the mock, session i on key i mod {args.keys}, unlimited")
    think = pauses(workload, args.think, args.seed)
    for repeat in range(args.repeats):
        order = [(rr, rr_routing, rr_workload, rr_sessions), (pg, pg_routing, workload, True)]
        for arm, routing, sent, send_session in order if repeat % 2 == 0 else order[::-1]:
            arm.runs.append(await harness.through_gateway(arm.name, routing, sent, send_session, think))
            progress(arm, arm.runs[-1])
        if repeat == 0:
            ideal.runs.append(await harness.ideal(workload, think))
            progress(ideal, ideal.runs[-1])
    failover = None
    if not args.no_failover:
        failover = await harness.failover(workload, pg_routing)
        print(f"{'failover':>12}: {len(failover.turns)} turns in {failover.wall:.1f} s", flush=True)
    return [rr, pg, ideal], failover, notes, harness.findings


def progress(arm: Arm, run: Run) -> None:
    errors = sum(turn.error is not None for turn in run.turns)
    print(
        f"{arm.name:>12}: {len(run.turns)} turns in {run.wall:5.1f} s  {run.rps:6.1f} req/s  "
        f"read share {read_share(run.turns):5.1%}  errors {errors}"
        + (
            f"  gateway CPU {run.cpu_per_request * 1e3:.2f} ms/req (+ {run.helper_cpu_per_request * 1e3:.2f} in its"
            " usage writer)"
            if run.gateway_cpu is not None
            else ""
        ),
        flush=True,
    )


def render(
    args: argparse.Namespace,
    arms: list[Arm],
    failover: Failover | None,
    notes: list[str],
    findings: list[str],
    body: str,
) -> str:
    rr, pg, ideal = arms
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = command_line("cache_affinity.py")
    lines = [
        SECTION,
        "",
        f"Command: `{command.strip()}` ({stamp}), {code_version()}; {args.sessions} sessions × {args.turns} turns over "
        f"{args.keys} keys of the mock (min cacheable prefix 1,024 tokens; the gateway arms' keys allow "
        f"{args.input_tpm:,} input tokens/min each, cache reads not counted, the ideal's are unlimited), "
        f"model `{MODEL}` at list prices, "
        f"think time {args.think:g} s, request bodies {body}; gateway arms run {args.repeats}× interleaved, each "
        f"through a fresh gateway on core {PROXY_CORE} (mock and client on core {LOAD_CORE}).",
        "",
        "### Headline",
        "",
        *headline(rr, pg, ideal, MODEL),
        "",
        "### Arms",
        "",
        *arm_table(arms, MODEL),
    ]
    if notes:
        lines += ["", *(f"Note: {note}." for note in notes)]
    if pg.runs:
        lines += ["", "<details><summary>poolgate arm, first run: upstream per turn of every session</summary>", ""]
        lines += ["```", *upstream_lines(pg.runs[0].turns), "```", "", "</details>"]
    wrong: list[str] = []
    if failover is not None:
        failover_lines, wrong = failover_report(failover)
        lines += ["", "### Failover: one key fails mid-run (poolgate's default routing)", "", *failover_lines]
    errors = sum(arm.errors() for arm in arms)
    if errors:
        wrong.append(f"{errors} turns failed for the client in the three arms")
    wrong += concentration(pg, args.keys)
    wrong += findings
    lines += ["", "### What looked wrong", "", *([f"- {item}" for item in wrong] or ["- nothing"])]
    return "\n".join(lines) + "\n"


async def main() -> int:
    args = parse_args()
    work = procs.load_side("cache-affinity")  # the client is the load side, with the mock
    workload = build(args.sessions, args.turns, args.seed)
    mock_port = procs.free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock_cmd = [sys.executable, str(BENCH / "cache_affinity_mock.py"), "--port", str(mock_port)]
    mock_cmd += ["--keys", str(args.keys), "--input-tpm", str(args.input_tpm)]
    mock = procs.start("mock", mock_cmd, LOAD_CORE, work / "mock.log")
    try:
        if not await procs.wait_ready(mock, mock_url + "/", 60):
            raise SystemExit(f"the mock upstream did not start: {mock.log_tail()}")
        arms, failover, notes, findings = await measure(args, workload, mock_url, work)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop(mock)
    smallest, largest = workload.body_bytes()
    body = f"{smallest / 1000:.0f}–{largest / 1000:.0f} KB"
    section = render(args, arms, failover, notes, findings, body)
    publish(SECTION, section, work, args.write)
    return 1 if any(arm.errors() for arm in arms) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

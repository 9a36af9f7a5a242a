"""What the policy and pricing stages add to poolgate's per-request cost, measured in one run.

    python bench/policy_overhead.py               # 6 rounds of 4 s cells, ~5 min
    python bench/policy_overhead.py --quick       # 2 rounds of 3 s cells, ~1 min
    python bench/policy_overhead.py --write       # and (re)place the "Policy overhead" section of RESULTS.md

Three arms against the same mock (core 0, with wrk and this script) and the same gateway process (core 1),
told apart by the key they call with. The gateway runs through this script's `--off-key` launcher, which
wraps the gateway's admission and pricing so that requests of the `off` key skip both; the wrapper's one
name check is paid by every arm alike.

- `off`: a key without claims, policy and pricing taken out: no estimate, no reservation, no cost, no
  flat-fee counting. Everything else is the shipped gateway.
- `pricing`: a key without claims: every answer is priced, nothing is enforced.
- `on`: a key with model globs, two quotas (requests per minute, output tokens per day) and a monthly
  budget: allow-list, quota check and count, budget estimate, reservation and settlement, quota and
  budget headers, and pricing.

Cells: non-streaming at c=16 and streaming at c=16 (both saturate the gateway's core: throughput is the
inverse of the per-request cost) and non-streaming at c=1 (the latency one user feels). For every cell
the gateway's CPU time (the process tree: gateway and its usage writer) is read from /proc before and
after, so the per-request CPU cost is measured directly as well, and is less sensitive to the neighbours
than throughput. Rounds interleave the arms (in a rotating order) so that drift hits all alike; each
figure is the median over rounds. Only ratios between arms of this run mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import procs
from procs import LOAD_CORE, PROXY_CORE

BENCH = Path(__file__).resolve().parent
SECTION = "## Policy overhead"
PLAIN_KEY = "pg-bench-plain-0123456789abcdef"
OFF_KEY = "pg-bench-off-0123456789abcdef"
LIMITED_KEY = "pg-bench-limited-0123456789abcdef"
CLAIMS = (
    '{models: ["claude-sonnet-*", "claude-haiku-*"], '
    'quotas: ["requests=1000000000/minute", "output_tokens=1000000000000/day"], '
    'budget_usd: "1000000", budget_range: monthly, budget_scope: per_account}'
)
# The `on` claims one kind at a time, for telling their costs apart (`instructions.py`): key and claims.
ONE_CLAIM = {
    "models only": ("pg-bench-models-0123456789abcdef", '{models: ["claude-sonnet-*", "claude-haiku-*"]}'),
    "quotas only": (
        "pg-bench-quotas-0123456789abcdef",
        '{quotas: ["requests=1000000000/minute", "output_tokens=1000000000000/day"]}',
    ),
    "budget only": (
        "pg-bench-budget-0123456789abcdef",
        '{budget_usd: "1000000", budget_range: monthly, budget_scope: per_account}',
    ),
}
CELLS = (("json", 16), ("sse", 16), ("json", 1))


def serve_with_off_key() -> None:
    """Run the `poolgate` CLI with admission and pricing skipped for the principal named `stages-off`."""
    from poolgate.app import Gateway
    from poolgate.billing.book import FREE
    from poolgate.lifecycle.policy import ADMITTED

    admit, price = Gateway._admit, Gateway._price

    def _admit(self, principal, ctx):  # type: ignore[no-untyped-def]
        return ADMITTED if principal.name == "stages-off" else admit(self, principal, ctx)

    def _price(self, ctx, upstream_id, status, usage):  # type: ignore[no-untyped-def]
        return (
            FREE
            if ctx.principal is not None and ctx.principal.name == "stages-off"
            else price(self, ctx, upstream_id, status, usage)
        )

    Gateway._admit = _admit  # type: ignore[method-assign]
    Gateway._price = _price  # type: ignore[method-assign]
    from poolgate.cli.main import main

    sys.argv = ["poolgate", *sys.argv[2:]]
    main()


def stage_micro(iterations: int = 20_000) -> dict[str, float]:
    """The stages alone, in this process: µs per request for admission + pricing + settlement, with the
    `on` key's claims and with no claims (pricing only), for the benchmark's ~5 KB body and for a Claude
    Code-sized one (the last turn of a `cache_affinity` session: ~25 tools, a long system prompt, cache
    markers). The same Gateway methods the server runs, on contexts prepared as the gateway prepares them."""
    from types import SimpleNamespace

    import yaml

    from cache_affinity_workload import build
    from load import request_body
    from poolgate.api.anthropic import decode_request
    from poolgate.app import Gateway
    from poolgate.billing.book import ChannelBook
    from poolgate.billing.catalogue import Catalogue
    from poolgate.cache.breakpoints import prompt_prefix
    from poolgate.config import ClaimsConfig, GatewayConfig
    from poolgate.lifecycle.accounting import billable
    from poolgate.lifecycle.context import Principal, Usage
    from poolgate.lifecycle.policy import ADMITTED, Policy

    claims = ClaimsConfig.model_validate(yaml.safe_load(CLAIMS)).caller_claims()
    headers = [(b"content-type", b"application/json"), (b"anthropic-version", b"2023-06-01")]
    usage = Usage(input_tokens=1300, output_tokens=64)
    book = ChannelBook(Catalogue.load_default())
    book.configure({})
    gateway = SimpleNamespace(book=book, policy=Policy(), config=GatewayConfig())
    claude_code = build(sessions=1, turns=8, seed=7).requests[0][-1].body
    results = {}
    for name, principal, body in (
        ("on", Principal("key_on", "api_key", "limited", claims), request_body(False)),
        ("pricing", Principal("key_plain", "api_key", "plain"), request_body(False)),
        ("on, Claude Code-sized body", Principal("key_on", "api_key", "limited", claims), claude_code),
    ):
        contexts = []
        for index in range(iterations):
            ctx = decode_request("messages", f"req_{index}", "/v1/messages", b"", headers, body)
            ctx.principal = principal
            if ctx.prompt is not None:
                ctx.prefix = prompt_prefix(ctx.prompt, ctx.body)
            contexts.append(ctx)
        began = time.perf_counter()
        for ctx in contexts:
            admission = Gateway._admit(gateway, principal, ctx)  # type: ignore[arg-type]
            priced = Gateway._price(gateway, ctx, "a", 200, billable(usage))  # type: ignore[arg-type]
            if admission is not ADMITTED:
                gateway.policy.settle(admission, priced.micro, usage, ctx.started_at)
        results[name] = (time.perf_counter() - began) / iterations * 1e6
    return results


@dataclass
class Sample:
    rps: float
    cpu_us_per_request: float
    p50_ms: float
    errors: int


@dataclass
class Arm:
    name: str
    url: str
    key: str
    server: object
    samples: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)

    def median(self, cell: tuple[str, int], what: str) -> float:
        values = [getattr(sample, what) for sample in self.samples.get(cell, [])]
        return statistics.median(values) if values else float("nan")

    def errors(self) -> int:
        return sum(sample.errors for samples in self.samples.values() for sample in samples)


def gateway_config(work: Path, name: str, port: int, mock_url: str) -> Path:

    keys = [
        f'{{name: stages-off, key: "{OFF_KEY}"}}',
        f'{{name: plain, key: "{PLAIN_KEY}"}}',
        f'{{name: limited, key: "{LIMITED_KEY}", claims: {CLAIMS}}}',
        *(f'{{name: {name.split()[0]}, key: "{key}", claims: {claims}}}' for name, (key, claims) in ONE_CLAIM.items()),
    ]
    return procs.gateway_config(work / f"{name}.yaml", port, mock_url, keys)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s cells")
    parser.add_argument("--rounds", type=int, help="rounds over all arms and cells (default 6)")
    parser.add_argument("--seconds", type=float, help="duration of each wrk cell (default 4)")
    parser.add_argument("--write", action="store_true", help="(re)place the Policy overhead section of RESULTS.md")
    return parser.parse_args()


def pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f} %"


def paired(arm: Arm, base: Arm, cell: tuple[str, int], what: str) -> str:
    """The arm's per-request cost over the base's, round by round: median [quartiles]."""
    ratios = []
    for mine, theirs in zip(arm.samples.get(cell, []), base.samples.get(cell, []), strict=False):
        if what == "cpu":
            ratios.append(mine.cpu_us_per_request / theirs.cpu_us_per_request)
        elif mine.rps:
            ratios.append(theirs.rps / mine.rps)
    if not ratios:
        return "-"
    from results import median_with_spread

    return median_with_spread(ratios, pct)


def render(arms: dict[str, Arm], command: str, rounds: int, seconds: float, head: str, micro: dict[str, float]) -> str:
    off, pricing, on = arms["off"], arms["pricing"], arms["on"]
    lines = [
        SECTION,
        "",
        f"`{command}` — {rounds} rounds of {seconds:g} s wrk cells per arm, interleaved; medians over rounds; "
        f"{head}. One gateway process, alone on core 1, serving the three arms' keys; mock, wrk "
        "and the script on core 0.",
        "",
        "| cell | arm | requests/s | gateway CPU µs / request | p50 ms |",
        "|---|---|---:|---:|---:|",
    ]
    for cell in CELLS:
        for arm in (off, pricing, on):
            lines.append(
                f"| {cell[0]} c={cell[1]} | {arm.name} | {arm.median(cell, 'rps'):,.0f} | "
                f"{arm.median(cell, 'cpu_us_per_request'):,.0f} | {arm.median(cell, 'p50_ms'):.2f} |"
            )
    lines += [
        "",
        "Per-request cost of `on` (policy + pricing) and of `pricing` alone over `off`: the ratio within each "
        "round (the arms ran back to back), median over rounds, with the spread of the middle half of the "
        "rounds in brackets. CPU: gateway CPU per request; 1/throughput: off requests/s over the arm's.",
        "",
        "| cell | policy + pricing, CPU | policy + pricing, 1/throughput | pricing alone, CPU | "
        "pricing alone, 1/throughput |",
        "|---|---:|---:|---:|---:|",
    ]
    for cell in CELLS[:2]:
        lines.append(
            f"| {cell[0]} c={cell[1]} | {paired(on, off, cell, 'cpu')} | {paired(on, off, cell, 'rps')} | "
            f"{paired(pricing, off, cell, 'cpu')} | {paired(pricing, off, cell, 'rps')} |"
        )
    c1 = CELLS[2]
    added = (on.median(c1, "p50_ms") - off.median(c1, "p50_ms")) * 1000
    base = off.median(CELLS[0], "cpu_us_per_request")
    lines += [
        "",
        f"p50 added at json c=1 by policy + pricing: {added:+.0f} µs.",
        "",
        "The stages alone, timed in process (the gateway's own `_admit`/`_price` and `Policy.settle`, 20,000 "
        f"requests): policy + pricing {micro['on']:.1f} µs per request ({micro['on'] / base * 100:.1f} % of the "
        f"`off` arm's CPU per request at json c=16), pricing alone {micro['pricing']:.1f} µs "
        f"({micro['pricing'] / base * 100:.1f} %); with a Claude Code-sized body "
        f"({micro['on, Claude Code-sized body']:.1f} µs) the stages cost what they cost for the small one: they "
        "read the prompt analysis and memos, not the body.",
    ]
    errors = {arm.name: arm.errors() for arm in arms.values() if arm.errors()}
    if errors:
        lines += ["", f"Errors during the run (the numbers of those arms are not fair): {errors}"]
    return "\n".join(lines) + "\n"


async def main() -> int:
    from load import Endpoint, prime, run_wrk_costed
    from results import code_version, command_line, publish

    args = parse_args()
    rounds = args.rounds or (2 if args.quick else 6)
    seconds = args.seconds or (3 if args.quick else 4)
    work = procs.load_side("policy-overhead", "wrk")
    mock, mock_url = await procs.start_mock(work, LOAD_CORE)
    servers = [mock]
    try:
        port = procs.free_port()
        cmd = [sys.executable, __file__, "--off-key", "serve", "--config"]
        cmd.append(str(gateway_config(work, "gateway", port, mock_url)))
        server = procs.start("gateway", cmd, PROXY_CORE, work / "gateway.log", cwd=work)
        servers.append(server)
        url = f"http://127.0.0.1:{port}"
        if not await procs.wait_ready(server, url + "/healthz", 60):
            raise SystemExit(f"the gateway did not start: {server.log_tail()}")
        # Its usage writer imports for a second or more at startup: not during the first cells.
        await procs.settled(server.process.pid)
        arms = {
            "off": Arm("off", url, OFF_KEY, server),
            "pricing": Arm("pricing", url, PLAIN_KEY, server),
            "on": Arm("on", url, LIMITED_KEY, server),
        }
        for arm in arms.values():
            failure = await prime(Endpoint(arm.url, arm.key), count=20)
            if failure is not None:
                raise SystemExit(f"arm {arm.name} does not answer: {failure}")
        wrk_log = work / "wrk.log"
        order = list(arms.values())
        for round_index in range(rounds):
            for cell in CELLS:
                for arm in order:
                    pid = arm.server.process.pid  # type: ignore[attr-defined]
                    endpoint = Endpoint(arm.url, arm.key)
                    result, cpu_us = await run_wrk_costed(pid, endpoint, cell[1], cell[0] == "sse", seconds, wrk_log)
                    sample = Sample(
                        rps=result.rps,
                        cpu_us_per_request=cpu_us,
                        p50_ms=result.p50_ms,
                        errors=result.errors,
                    )
                    arm.samples.setdefault(cell, []).append(sample)
                    print(
                        f"round {round_index + 1}/{rounds} {cell[0]} c={cell[1]} {arm.name:8} "
                        f"{sample.rps:8.0f} rps {sample.cpu_us_per_request:7.0f} µs CPU/req "
                        f"p50 {sample.p50_ms:.2f} ms errors {sample.errors}",
                        flush=True,
                    )
                order = order[1:] + order[:1]  # rotate who goes first
    finally:
        for server in reversed(servers):
            procs.stop(server)
    command = command_line("policy_overhead.py")
    section = render(arms, command.strip(), rounds, seconds, code_version(), stage_micro())
    publish(SECTION, section, work, args.write)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--off-key":
        serve_with_off_key()
    else:
        sys.path.insert(0, str(BENCH))
        raise SystemExit(asyncio.run(main()))

"""What the policy and pricing stages add to poolgate's per-request cost, measured in one run.

    python bench/policy_overhead.py               # 6 rounds of 4 s cells, ~5 min
    python bench/policy_overhead.py --quick       # 3 rounds of 3 s cells, ~2 min
    python bench/policy_overhead.py --write       # and (re)place the "Policy overhead" section of RESULTS.md

Three arms against the same mock (core 0, with wrk and this script), told apart by the key they call with.
The gateways run through this script's `--off-key` launcher, which wraps the gateway's admission and pricing
so that requests of the `off` key skip both; the wrapper's one name check is paid by every arm alike.

- `off`: a key without claims, policy and pricing taken out: no estimate, no reservation, no cost, no
  flat-fee counting. Everything else is the shipped gateway.
- `pricing`: a key without claims: every answer is priced, nothing is enforced.
- `on`: a key with model globs, two quotas (requests per minute, output tokens per day) and a monthly
  budget: allow-list, quota check and count, budget estimate, reservation and settlement, quota and
  budget headers, and pricing.

Cells non-streaming and streaming at c=16 compare `on` and `pricing` with `off` **side by side**: two
identical gateway processes share core 1, each loaded at the same time by a wrk of its own, one with the
`off` key and one with the other arm's, and each one's CPU time (the process tree: gateway and its usage
writer) is read from /proc over the same seconds. Whatever the machine's neighbours do then, they do to both
arms at once: loaded one after another, the same cell's `on`/`off` ratio swung ±7 points between rounds on
this machine, side by side ±1. Which gateway serves `off` alternates every round, so that a difference
between the two processes cancels out. Sharing the core makes every request dearer (the two take turns and
share its caches), which would understate a ratio by as much: each round also loads the first gateway alone
with the `off` key (json c=16) to show by how much. The cell non-streaming at c=1 (the latency one user
feels) runs the arms one after another on the first gateway, in an order that turns every round. Each
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
from typing import TYPE_CHECKING, Any

import procs
from procs import LOAD_CORE, PROXY_CORE

if TYPE_CHECKING:
    from load import WrkResult

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
SIDE_BY_SIDE = (("json", 16), ("sse", 16))
# The cell `off` also runs in with the core to itself, to show what sharing it adds.
ALONE = SIDE_BY_SIDE[0]
CELLS = (*SIDE_BY_SIDE, ("json", 1))
ARMS = {"off": OFF_KEY, "pricing": PLAIN_KEY, "on": LIMITED_KEY}


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


@dataclass
class Stages:
    """The policy and pricing stages as the gateway runs them, on a gateway of their own (the same `Gateway`
    methods, on a namespace holding what they read), and requests decoded as the gateway decodes them."""

    gateway: Any
    usage: Any  # the answer's usage every request is settled with

    @classmethod
    def make(cls) -> Stages:
        from types import SimpleNamespace

        import poolgate.app  # noqa: F401  (imported by `run`: not while it is timed)
        from poolgate.billing.book import ChannelBook
        from poolgate.billing.catalogue import Catalogue
        from poolgate.config import GatewayConfig
        from poolgate.lifecycle.context import Usage
        from poolgate.lifecycle.policy import Policy

        book = ChannelBook(Catalogue.load_default())
        book.configure({})
        config = GatewayConfig()
        gateway = SimpleNamespace(
            book=book, policy=Policy(), config=config, _budget_output_tokens=config.billing.budget_output_tokens
        )
        return cls(gateway, Usage(input_tokens=1300, output_tokens=64))

    @staticmethod
    def principal(claims: str | None) -> Any:
        """A caller with `claims` (YAML, as a key's in the configuration), or none."""
        import yaml

        from poolgate.config import ClaimsConfig
        from poolgate.lifecycle.context import Principal

        if claims is None:
            return Principal("key_plain", "api_key", "plain")
        return Principal(
            "key_on", "api_key", "limited", ClaimsConfig.model_validate(yaml.safe_load(claims)).caller_claims()
        )

    @staticmethod
    def requests(principal: Any, body: bytes, count: int) -> list[Any]:
        """`count` requests of `principal` with `body`, decoded and analysed as the gateway does."""
        from poolgate.api.anthropic import decode_request
        from poolgate.cache.breakpoints import prompt_prefix

        headers = [(b"content-type", b"application/json"), (b"anthropic-version", b"2023-06-01")]
        contexts = []
        for index in range(count):
            ctx = decode_request("messages", f"req_{index}", "/v1/messages", b"", headers, body)
            ctx.principal = principal
            if ctx.prompt is not None:
                ctx.prefix = prompt_prefix(ctx.prompt, ctx.body)
            contexts.append(ctx)
        return contexts

    def run(self, contexts: list[Any]) -> None:
        """Admission, pricing and settlement of each request, as the gateway runs them."""
        from poolgate.app import Gateway
        from poolgate.lifecycle.accounting import billable
        from poolgate.lifecycle.policy import ADMITTED

        gateway, usage = self.gateway, self.usage
        for ctx in contexts:
            principal = ctx.principal
            admission = Gateway._admit(gateway, principal, ctx)
            priced = Gateway._price(gateway, ctx, "a", 200, billable(usage))
            if admission is not ADMITTED:
                gateway.policy.settle(admission, priced.micro, usage, ctx.started_at)


def stage_micro(iterations: int = 20_000) -> dict[str, float]:
    """The stages alone, in this process: µs per request for admission + pricing + settlement, with the
    `on` key's claims and with no claims (pricing only), for the benchmark's ~5 KB body and for a Claude
    Code-sized one (the last turn of a `cache_affinity` session: ~25 tools, a long system prompt, cache
    markers). The same Gateway methods the server runs, on contexts prepared as the gateway prepares them."""
    from cache_affinity_workload import build
    from load import request_body

    stages = Stages.make()
    claude_code = build(sessions=1, turns=8, seed=7).requests[0][-1].body
    results = {}
    for name, claims, body in (
        ("on", CLAIMS, request_body(False)),
        ("pricing", None, request_body(False)),
        ("on, Claude Code-sized body", CLAIMS, claude_code),
    ):
        contexts = stages.requests(stages.principal(claims), body, iterations)
        began = time.perf_counter()
        stages.run(contexts)
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
    key: str
    samples: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)
    # Side by side with `off`, by cell: (off's sample, this arm's) of each round.
    against_off: dict[tuple[str, int], list[tuple[Sample, Sample]]] = field(default_factory=dict)

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


def rotated(arms: list[Arm], by: int) -> list[Arm]:
    """`arms` turned by `by` places: who goes first (or which gateway serves whom) changes every round."""
    shift = by % len(arms)
    return arms[shift:] + arms[:shift]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 s cells")
    parser.add_argument("--rounds", type=int, help="rounds over all arms and cells (default 6)")
    parser.add_argument("--seconds", type=float, help="duration of each wrk cell (default 4)")
    parser.add_argument("--write", action="store_true", help="(re)place the Policy overhead section of RESULTS.md")
    return parser.parse_args()


def pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f} %"


def paired(arm: Arm, cell: tuple[str, int], what: str, alone: float | None = None) -> str:
    """The arm's per-request cost over `off`'s side by side, round by round: median [quartiles]. With
    `alone` (off's CPU µs per request with the core to itself), the difference side by side over that."""
    ratios = []
    for off, mine in arm.against_off.get(cell, []):
        if alone is not None:
            ratios.append(1 + (mine.cpu_us_per_request - off.cpu_us_per_request) / alone)
        elif what == "cpu":
            ratios.append(mine.cpu_us_per_request / off.cpu_us_per_request)
        elif mine.rps:
            ratios.append(off.rps / mine.rps)
    if not ratios:
        return "-"
    from results import median_with_spread

    return median_with_spread(ratios, pct)


def render(
    arms: dict[str, Arm],
    alone: list[Sample],
    command: str,
    rounds: int,
    seconds: float,
    head: str,
    micro: dict[str, float],
) -> str:
    off, pricing, on = arms["off"], arms["pricing"], arms["on"]
    lines = [
        SECTION,
        "",
        f"`{command}` — {rounds} rounds of {seconds:g} s wrk cells; medians over rounds; {head}. Two "
        "identical gateway processes share core 1; at c=16 each arm runs side by side with `off`, both loaded at "
        "once by a wrk of their own (which gateway serves `off` alternates every round), so requests/s there is "
        "about half of one gateway's; at c=1 the arms run one after another on the first gateway. Mock, wrk and "
        "the script on core 0.",
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
        "round (the arms ran side by side), median over rounds, with the spread of the middle half of the "
        "rounds in brackets. CPU: gateway CPU per request; 1/throughput: off requests/s over the arm's; "
        "difference over alone: the arm's CPU per request minus `off`'s side by side, over `off`'s with core 1 to "
        "itself (json c=16) — sharing the core makes every request dearer (see below), which dilutes a ratio "
        "measured side by side; the difference over the cost alone is not diluted, if no more inflated either.",
        "",
        "| cell | policy + pricing, CPU | … 1/throughput | … difference over alone | pricing alone, CPU | "
        "… 1/throughput | … difference over alone |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = statistics.median(sample.cpu_us_per_request for sample in alone)
    for cell in SIDE_BY_SIDE:
        # `off` alone ran at json c=16 only.
        lines.append(
            f"| {cell[0]} c={cell[1]} | {paired(on, cell, 'cpu')} | {paired(on, cell, 'rps')} | "
            f"{paired(on, cell, 'cpu', base) if cell == ALONE else '–'} | "
            f"{paired(pricing, cell, 'cpu')} | {paired(pricing, cell, 'rps')} | "
            f"{paired(pricing, cell, 'cpu', base) if cell == ALONE else '–'} |"
        )
    c1 = CELLS[2]
    added = (on.median(c1, "p50_ms") - off.median(c1, "p50_ms")) * 1000
    beside = off.median(SIDE_BY_SIDE[0], "cpu_us_per_request")
    lines += [
        "",
        f"`off` at json c=16 with core 1 to itself: {base:,.0f} µs of CPU per request (median over rounds), "
        f"against {beside:,.0f} side by side ({pct(beside / base)}).",
        "",
        f"p50 added at json c=1 by policy + pricing: {added:+.0f} µs.",
        "",
        "The stages alone, timed in process (the gateway's own `_admit`/`_price` and `Policy.settle`, 20,000 "
        f"requests): policy + pricing {micro['on']:.1f} µs per request ({micro['on'] / base * 100:.1f} % of the "
        f"`off` arm's CPU per request at json c=16 alone), pricing alone {micro['pricing']:.1f} µs "
        f"({micro['pricing'] / base * 100:.1f} %); with a Claude Code-sized body "
        f"({micro['on, Claude Code-sized body']:.1f} µs) the stages cost what they cost for the small one: they "
        "read the prompt analysis and memos, not the body.",
    ]
    errors = {arm.name: arm.errors() for arm in arms.values() if arm.errors()}
    if errors:
        lines += ["", f"Errors during the run (the numbers of those arms are not fair): {errors}"]
    return "\n".join(lines) + "\n"


async def main() -> int:
    from load import Endpoint, prime, run_wrk_costed, run_wrk_side_by_side
    from results import code_version, command_line, publish

    args = parse_args()
    rounds = args.rounds or (3 if args.quick else 6)
    seconds = args.seconds or (3 if args.quick else 4)
    work = procs.load_side("policy-overhead", "wrk")
    alone: list[Sample] = []  # `off` at json c=16 with the core to itself
    mock, mock_url = await procs.start_mock(work, LOAD_CORE)
    servers = [mock]
    try:
        urls = []
        for number in (1, 2):
            port = procs.free_port()
            cmd = [sys.executable, __file__, "--off-key", "serve", "--config"]
            cmd.append(str(gateway_config(work, f"gateway-{number}", port, mock_url)))
            servers.append(procs.start(f"gateway-{number}", cmd, PROXY_CORE, work / f"gateway-{number}.log", cwd=work))
            urls.append(f"http://127.0.0.1:{port}")
        gateways = [(server.process.pid, url) for server, url in zip(servers[1:], urls, strict=True)]
        for server, url in zip(servers[1:], urls, strict=True):
            if not await procs.wait_ready(server, url + "/healthz", 60):
                raise SystemExit(f"the gateway did not start: {server.log_tail()}")
        for pid, _ in gateways:
            # Its usage writer imports for a second or more at startup: not during the first cells.
            await procs.settled(pid)
        arms = [Arm(name, key) for name, key in ARMS.items()]
        off = arms[0]
        for _, url in gateways:
            for arm in arms:
                failure = await prime(Endpoint(url, arm.key), count=20)
                if failure is not None:
                    raise SystemExit(f"arm {arm.name} does not answer: {failure}")
        for round_index in range(rounds):
            for cell in SIDE_BY_SIDE:
                for arm in rotated(arms[1:], round_index):
                    pair = (off, arm) if round_index % 2 == 0 else (arm, off)
                    targets = [(pid, Endpoint(url, who.key)) for (pid, url), who in zip(gateways, pair, strict=True)]
                    measured = await run_wrk_side_by_side(targets, cell[1], cell[0] == "sse", seconds, work)
                    sample = dict(zip((who.name for who in pair), measured, strict=True))
                    mine = record(arm, cell, *sample[arm.name], f"{round_index + 1}/{rounds}", "beside off")
                    theirs = record(off, cell, *sample["off"], f"{round_index + 1}/{rounds}", f"beside {arm.name}")
                    arm.against_off.setdefault(cell, []).append((theirs, mine))
            pid, url = gateways[0]
            result, cpu_us = await run_wrk_costed(
                pid, Endpoint(url, off.key), ALONE[1], ALONE[0] == "sse", seconds, work / "wrk.log"
            )
            alone.append(record(None, ALONE, result, cpu_us, f"{round_index + 1}/{rounds}", "alone"))
            cell = CELLS[2]
            for arm in rotated(arms, round_index):
                result, cpu_us = await run_wrk_costed(
                    pid, Endpoint(url, arm.key), cell[1], cell[0] == "sse", seconds, work / "wrk.log"
                )
                record(arm, cell, result, cpu_us, f"{round_index + 1}/{rounds}")
    finally:
        for server in reversed(servers):
            procs.stop(server)
    command = command_line("policy_overhead.py")
    section = render(
        {arm.name: arm for arm in arms}, alone, command.strip(), rounds, seconds, code_version(), stage_micro()
    )
    publish(SECTION, section, work, args.write)
    return 0


def record(
    arm: Arm | None, cell: tuple[str, int], result: WrkResult, cpu_us: float, round_name: str, note: str = ""
) -> Sample:
    """A cell's sample, kept with the arm's (if any) and printed."""
    sample = Sample(rps=result.rps, cpu_us_per_request=cpu_us, p50_ms=result.p50_ms, errors=result.errors)
    if arm is not None:
        arm.samples.setdefault(cell, []).append(sample)
    print(
        f"round {round_name} {cell[0]} c={cell[1]} {arm.name if arm else 'off':8} {note:16} "
        f"{sample.rps:8.0f} rps {sample.cpu_us_per_request:7.0f} µs CPU/req "
        f"p50 {sample.p50_ms:.2f} ms errors {sample.errors}",
        flush=True,
    )
    return sample


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--off-key":
        serve_with_off_key()
    else:
        sys.path.insert(0, str(BENCH))
        raise SystemExit(asyncio.run(main()))

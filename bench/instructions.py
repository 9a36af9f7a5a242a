"""Instructions per request, counted by valgrind's callgrind: the same figure in every run, whatever else the
machine is doing.

    python bench/instructions.py              # every table, ~15 min
    python bench/instructions.py --only core  # one table: core, ablations or policy
    python bench/instructions.py --write      # and (re)place the "Instructions per request" section

The wrk benchmarks measure time, and on this shared machine their ratios swing by ±10–20 % from one round to
the next: too much to see a change of a few per cent, or to tell which step costs what. Callgrind executes
the server on a simulated CPU and counts the machine instructions it runs, which does not depend on the
neighbours: a second run gives the same counts to within 1–2 %. Instructions are not time (a
cache miss costs more than an add, and the gateway's larger working set misses more often), so the time
ratios in the other sections stay the verdict; these say, exactly, where the work is.

Every server is a fresh process under `valgrind --tool=callgrind --instr-atstart=no` on core 1, its usage
writer process (a child) included; the mock and the load (an aiohttp client, 8 requests in flight, the
~5 KB body of the wrk benchmarks) on core 0. After a warm-up, counting is switched on in every process of
the server's tree for a fixed number of requests, then off; the figure is the instructions counted over
the requests counted, the gateway process and its usage writer apart.

- core: the bare proxy (`bare_proxy.py`) and poolgate as `run.py` runs it, non-streaming and streaming;
- ablations: the arms of `ablation.py` (the shipped gateway with one step taken out), non-streaming;
- policy: the arms of `policy_overhead.py` (`off`: admission and pricing skipped; `pricing`; `on`: model
  globs, two quotas, a monthly budget), and `on`'s claims one kind at a time (each with pricing),
  non-streaming.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import procs
from procs import LOAD_CORE, PROXY_CORE

BENCH = Path(__file__).resolve().parent
SECTION = "## Instructions per request"
CONCURRENCY = 8
KEY = "pg-bench-instructions-0123456789abcdef"
TABLES = ("core", "ablations", "policy")
# Valgrind runs the server some 50× slower: generous waits, and time for the usage writer's periodic
# flush (every 0.5 s) of the requests just made to land inside the counting.
READY_SECONDS, FLUSH_SECONDS = 300.0, 2.0
_COLLECTED = re.compile(r"^==(\d+)== Collected : (\d+)$", re.MULTILINE)


def _slug(table: str, name: str) -> str:
    """A target's name in file names: its logs, configuration and callgrind outputs."""
    return re.sub(r"[^a-z0-9]+", "-", f"{table} {name}").strip("-")


@dataclass(frozen=True)
class Target:
    """One server to count: how to start it, where it listens, and the key and mode to load it with."""

    table: str
    name: str
    command: tuple[str, ...]
    url: str
    ready_path: str
    key: str = KEY
    stream: bool = False

    @property
    def slug(self) -> str:
        return _slug(self.table, self.name)


@dataclass(frozen=True)
class Count:
    target: Target
    gateway: float  # instructions per request in the server's own process
    writer: float  # … in its other processes (the usage writer)

    @property
    def total(self) -> float:
        return self.gateway + self.writer


def targets(tables: tuple[str, ...], work: Path, mock_url: str) -> list[Target]:
    """The targets of `tables`, each on a port of its own (gateways get a configuration file in `work`)."""
    import ablation
    import policy_overhead

    python, poolgate = sys.executable, str(Path(sys.executable).parent / "poolgate")

    def gateway(table: str, name: str, launcher: tuple[str, ...], key: str = KEY, stream: bool = False) -> Target:
        port = procs.free_port()
        slug = _slug(table, name)
        if table == "policy":
            config = policy_overhead.gateway_config(work, slug, port, mock_url)
        else:
            config = procs.gateway_config(work / f"{slug}.yaml", port, mock_url, [f'{{name: bench, key: "{KEY}"}}'])
        command = (*launcher, "serve", "--config", str(config))
        return Target(table, name, command, f"http://127.0.0.1:{port}", "/healthz", key, stream)

    found = []
    if "core" in tables:
        for stream in (False, True):
            mode = "sse" if stream else "json"
            port = procs.free_port()
            bare = (python, str(BENCH / "bare_proxy.py"), "--upstream", mock_url, "--port", str(port))
            found.append(Target("core", f"bare proxy, {mode}", bare, f"http://127.0.0.1:{port}", "/", stream=stream))
            found.append(gateway("core", f"poolgate, {mode}", (poolgate,), stream=stream))
    if "ablations" in tables:
        for arm in ablation.ARMS:
            found.append(gateway("ablations", arm, (python, str(BENCH / "ablation.py"), "--ablate", arm)))
    if "policy" in tables:
        launcher = (python, str(BENCH / "policy_overhead.py"), "--off-key")
        for arm, key in (
            ("off", policy_overhead.OFF_KEY),
            ("pricing", policy_overhead.PLAIN_KEY),
            *((name, key) for name, (key, _) in policy_overhead.ONE_CLAIM.items()),
            ("on", policy_overhead.LIMITED_KEY),
        ):
            found.append(gateway("policy", arm, launcher, key))
    return found


async def load(url: str, key: str, stream: bool, requests: int) -> None:
    """`requests` requests, CONCURRENCY at a time; each must succeed (a failing arm measures nothing)."""
    import aiohttp

    from load import request_body

    body = request_body(stream)
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    left = requests
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url + "/v1/messages", data=body, headers=headers) as response:
                    text = await response.read()
                    if response.status != 200:
                        raise SystemExit(f"{url}: HTTP {response.status}: {text[:200]!r}")

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))


def counting(pids: list[int], on: bool) -> None:
    for pid in pids:
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)], capture_output=True, check=True)


async def count(target: Target, work: Path, warmup: int, requests: int) -> Count:

    log = work / f"{target.slug}.log"
    valgrind = ("valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes")
    out = f"--callgrind-out-file={work / target.slug}.%p.callgrind"
    server = procs.start(target.slug, [*valgrind, out, *target.command], PROXY_CORE, log, cwd=work)
    try:
        if not await procs.wait_ready(server, target.url + target.ready_path, READY_SECONDS):
            raise SystemExit(f"{target.name} did not start: {server.log_tail()}")
        # The usage writer imports for a long while under valgrind: count only once everything is idle.
        await load(target.url, target.key, target.stream, warmup)
        await asyncio.sleep(FLUSH_SECONDS)
        if not await procs.settled(server.process.pid, seconds=READY_SECONDS):
            raise SystemExit(f"{target.name} never fell idle after the warm-up")
        pids = procs.process_tree(server.process.pid)
        counting(pids, True)
        await load(target.url, target.key, target.stream, requests)
        await asyncio.sleep(FLUSH_SECONDS)
        await procs.settled(server.process.pid, seconds=READY_SECONDS)
        counting(pids, False)
    finally:
        procs.stop(server, grace=120)
    collected = {int(pid): int(n) for pid, n in _COLLECTED.findall(log.read_text(errors="replace"))}
    own = collected.pop(server.process.pid, None)
    if own is None:
        raise SystemExit(f"{target.name}: no instruction count in {log}")
    result = Count(target, own / requests, sum(collected.values()) / requests)
    print(f"{target.table:9} {target.name:22} {result.gateway / 1e3:8.1f} k + {result.writer / 1e3:6.1f} k", flush=True)
    return result


async def main() -> int:
    from results import code_version, command_line, publish

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=TABLES, action="append", help="one table (repeatable); default all")
    parser.add_argument("--requests", type=int, default=600, help="requests counted per target")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting")
    parser.add_argument("--write", action="store_true", help="(re)place the section of RESULTS.md")
    args = parser.parse_args()
    work = procs.load_side("instructions", "valgrind")
    mock, mock_url = await procs.start_mock(work, LOAD_CORE)
    try:
        counts = [
            await count(target, work, args.warmup, args.requests)
            for target in targets(tuple(args.only or TABLES), work, mock_url)
        ]
    finally:
        procs.stop(mock)
    command = command_line("instructions.py")
    section = render(counts, command.strip(), args.requests, code_version())
    publish(SECTION, section, work, args.write)
    return 0


def _k(value: float) -> str:
    return f"{value / 1e3:,.1f} k"


def _against(counts: list[Count], base_name: str, intro: str, what: dict[str, str] | None = None) -> list[str]:
    """A table of arms, each one's total against the arm named `base_name`; nothing without arms."""
    if not counts:
        return []
    base = next((c for c in counts if c.target.name == base_name), None)
    head = "| arm | what is taken out " if what else "| arm "
    lines = ["", intro, "", head + "| gateway process | usage writer | total | change |"]
    lines.append("|---|" + ("---|" if what else "") + "---:|---:|---:|---:|")
    for c in counts:
        change = f"{(c.total / base.total - 1) * 100:+.1f} %" if base and c is not base else "–"
        described = f" {what[c.target.name]} |" if what else ""
        lines.append(f"| {c.target.name} |{described} {_k(c.gateway)} | {_k(c.writer)} | {_k(c.total)} | {change} |")
    return lines


def render(counts: list[Count], command: str, requests: int, head: str) -> str:
    from ablation import WHAT

    by_name = {(c.target.table, c.target.name): c for c in counts}
    lines = [
        SECTION,
        "",
        f"`{command}` — {head}; {requests} requests counted per target after a warm-up, {CONCURRENCY} in "
        "flight, the ~5 KB body of the wrk benchmarks. Counted by callgrind (valgrind), which does not "
        "depend on the machine's load: a second run gives the same figures to within 1–2 %. "
        "Instructions are not time (the time ratios above stay the verdict), but they say exactly where the "
        "work is. k = thousand instructions per request; `usage writer` is the gateway's child process "
        "that stores the usage records.",
    ]
    if any(c.target.table == "core" for c in counts):
        lines += ["", "| target | gateway process | usage writer | total | bare proxy / target |"]
        lines.append("|---|---:|---:|---:|---:|")
        for c in counts:
            if c.target.table == "core":
                mode = c.target.name.rsplit(", ", 1)[1]
                bare = by_name.get(("core", f"bare proxy, {mode}"))
                ratio = f"{bare.total / c.total:.2f}" if bare else "–"
                lines.append(f"| {c.target.name} | {_k(c.gateway)} | {_k(c.writer)} | {_k(c.total)} | {ratio} |")
    lines += _against(
        [c for c in counts if c.target.table == "ablations"],
        "shipped",
        "Ablations (the arms of `ablation.py`, non-streaming): the change is the arm's total over the shipped "
        "gateway's.",
        WHAT,
    )
    lines += _against(
        [c for c in counts if c.target.table == "policy"],
        "off",
        "Policy and pricing (the arms of `policy_overhead.py`, and `on`'s claims one kind at a time, each "
        "with pricing; non-streaming, each a gateway process of its own): the change is the arm's total over "
        "`off`'s.",
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    raise SystemExit(asyncio.run(main()))

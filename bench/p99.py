"""The p99 investigation: the bare proxy at concurrency 1, non-streaming, one suspect changed at a time.

Each variant is a fresh bare proxy on the proxy core, loaded for the same time in the same run, so the
differences between rows are the suspects' and not the machine's mood. Suspects: Nagle meeting delayed
ACK (all our sockets set TCP_NODELAY; the `nagle` row turns it back off to show what it would cost),
upstream connection churn (`force-close` opens a connection per request), the HTTP parser (h11 vs
httptools vs granian), and the cyclic garbage collector (gen-2 pauses are logged by the proxy).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import procs
import tail
from load import Endpoint, run_wrk
from report import VariantRow

BARE_PROXY = Path(__file__).resolve().parent / "bare_proxy.py"
GC_PAUSE = re.compile(r"gc gen2 pause ([0-9.]+) ms")


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]
    why: str
    neighbour: bool = False  # a CPU-bound process shares the proxy's core


# A busy loop that ends by itself even if nobody stops it.
HOG = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


VARIANTS = (
    Variant("uvicorn+httptools", (), "the default bare proxy"),
    Variant("gc freeze", ("--gc", "freeze"), "startup heap frozen, as poolgate does"),
    Variant("gc off", ("--gc", "off"), "no cyclic GC at all: is GC the tail?"),
    Variant("uvicorn+h11", ("--server", "h11"), "pure-Python HTTP parser"),
    Variant("granian", ("--server", "granian"), "Rust HTTP server, same app"),
    Variant("force-close upstream", ("--force-close",), "new upstream connection per request (pool churn)"),
    Variant("nagle on", ("--nagle",), "TCP_NODELAY removed on every socket (the Nagle suspect)"),
    Variant("busy neighbour", (), "default proxy, a CPU-bound process on its core", neighbour=True),
)


def gc_pauses(log: Path) -> list[float]:
    try:
        return [float(m.group(1)) for m in GC_PAUSE.finditer(log.read_text(errors="replace"))]
    except OSError:
        return []


async def run_variant(
    variant: Variant, mock_url: str, work: Path, seconds: float, proxy_core: str, load_core: str
) -> VariantRow | None:
    port = procs.free_port()
    slug = re.sub(r"[^a-z0-9]+", "-", variant.name.lower())
    log = work / f"p99-{slug}.log"
    cmd = [sys.executable, str(BARE_PROXY), "--upstream", mock_url, "--port", str(port), "--gc-log", *variant.flags]
    server = procs.start(f"p99 {variant.name}", cmd, proxy_core, log)
    hog = None
    if variant.neighbour:
        hog_cmd = [sys.executable, "-c", HOG, str(seconds + 40)]
        hog = procs.start("cpu hog", hog_cmd, proxy_core, work / "p99-hog.log")
    try:
        url = f"http://127.0.0.1:{port}"
        if not await procs.wait_ready(server, url + "/", 30):
            print(f"  p99 variant {variant.name} did not start: {server.log_tail()}", flush=True)
            return None
        endpoint = Endpoint(url, "any")
        run_wrk(endpoint, 4, False, 1, load_core)  # warm the upstream pool and the code paths
        # The warm-up's own collections are not the measured run's.
        pauses_before = len(gc_pauses(log))
        result = run_wrk(endpoint, 1, False, seconds, load_core, work / "wrk-p99.log")
        return VariantRow(variant.name, variant.why, result, gc_pauses(log)[pauses_before:])
    finally:
        procs.stop(hog)
        procs.stop(server)


async def investigate(mock_url: str, work: Path, seconds: float, proxy_core: str, load_core: str) -> list[VariantRow]:
    rows = [
        VariantRow(
            "direct to mock",
            "the floor: no proxy",
            run_wrk(Endpoint(mock_url, "any"), 1, False, seconds, load_core, work / "wrk-p99.log"),
            [],
        )
    ]
    for variant in VARIANTS:
        if "granian" in variant.flags and (missing := procs.granian_missing()):
            # Said, not a traceback from a proxy that cannot start.
            print(f"p99 investigation: {variant.name} skipped, {missing}", flush=True)
            continue
        print(f"p99 investigation: {variant.name}", flush=True)
        row = await run_variant(variant, mock_url, work, seconds, proxy_core, load_core)
        if row is not None:
            rows.append(row)
    return rows


@dataclass(frozen=True)
class TailSpec:
    """A server to trace: how to start it (with its gen-2 GCs logged) and how to call it."""

    name: str
    cmd: list[str]
    endpoint: Endpoint
    ready_path: str


async def attribute_tails(
    specs: list[TailSpec], mock: procs.Server, work: Path, seconds: float, proxy_core: str
) -> list[tuple[str, tail.Attribution]]:
    """mock must log its gen-2 pauses too (run.py starts it through traced_poolgate.py)."""
    rows = []
    for spec in specs:
        print(f"tail attribution: {spec.name}", flush=True)
        log = work / f"tail-{spec.name}.log"
        server = procs.start(spec.name, spec.cmd, proxy_core, log, cwd=work)
        try:
            if not await procs.wait_ready(server, spec.endpoint.url + spec.ready_path, 30):
                print(f"  {spec.name} did not start: {server.log_tail()}", flush=True)
                continue
            run_wrk(spec.endpoint, 4, False, 2, procs.LOAD_CORE)  # warm-up, as everywhere else
            rows.append(
                (
                    spec.name,
                    await tail.trace(spec.endpoint, server.process.pid, mock.process.pid, log, mock.log, seconds),
                )
            )
        finally:
            procs.stop(server)
    return rows


if __name__ == "__main__":
    # A module of run.py's p99 study: run on its own it would exit having measured nothing.
    raise SystemExit("the p99 study and tail attribution run from run.py: .venv/bin/python bench/run.py --p99-only")

"""What a request costs the gateway as Claude Code's bodies grow: CPU per request against the bare proxy, from
~5 KB to 5 MB, and peak memory with 5 MB bodies in flight.

    python bench/bigbody.py                         # ~8 min
    python bench/bigbody.py --write                 # and (re)place the "Large bodies" section of RESULTS.md
    python bench/bigbody.py --compare ../old/src    # and the same gateways from another checkout, in the same run

Bodies are built like Claude Code's (`cache_affinity_workload`): a dozen tools and three system blocks with
`cache_control`, a conversation of assistant tool_use / user tool_result turns with the newest user turn
marked (four breakpoints), and for the largest a base64 image in the last turn. Two modes, streaming:
`repeat` sends the same body every time (a session's turns resend their prefix: the memos' best case),
`new` a body new in every byte (another session, other tools: nothing memoised helps).

Targets, each on core 1 (the mock and this client on core 0): the bare proxy (`bare_proxy.py`) and the gateway
(`poolgate serve`, two API-key upstreams; with `--compare`, also the gateway of another checkout). Requests go
one at a time and each target's CPU time (schedstat, all its
threads; the gateway's usage writer apart) is read around a batch. The batches of the targets follow one
another, `--rounds` times; a gateway's cost over the bare proxy is taken in each round (paired) and the median
over rounds shown. Peak memory: 16 clients at once send 5 MB bodies; VmHWM (the peak resident set) is reset
before and read after.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

import procs
from cache_affinity_workload import (
    MODEL,
    TOOL_NAMES,
    WORDS,
    _marked,
    _prose,
    _tool,
    _turn_messages,
    _without_cache_control,
)
from procs import LOAD_CORE, PROXY_CORE

BENCH = Path(__file__).resolve().parent
SECTION = "## Large bodies"
KEY = "pg-bench-bigbody-0123456789abcdef"
EPHEMERAL = {"type": "ephemeral"}
SIZES_KB = (5, 50, 200, 1024, 5120)
# Requests per batch: enough CPU time per batch to rise above schedstat's and the event loop's noise.
BATCH = {5: 300, 50: 150, 200: 60, 1024: 20, 5120: 6}
# The largest body's conversation stops here; the rest is the image (Claude Code pastes them as base64).
CONVERSATION_CAP = 1024 * 1024
PEAK_CLIENTS = 16


def body(size_kb: int, seed: int) -> bytes:
    """A streaming Messages body of about `size_kb` KB, like Claude Code's; a different seed changes every
    tool, system block and turn."""
    rng = random.Random(seed)
    target = size_kb * 1024
    tools = [_tool(rng, name) for name in TOOL_NAMES[: 1 if size_kb < 20 else 12]]
    tools[-1]["cache_control"] = EPHEMERAL
    identity = {
        "type": "text",
        "text": "You are Claude Code, Anthropic's official CLI for Claude.",
        "cache_control": EPHEMERAL,
    }
    instructions = {"type": "text", "text": _prose(rng, 1000 if size_kb < 20 else 9000)}
    environment = {
        "type": "text",
        "text": f"<env>{_prose(rng, 500 if size_kb < 20 else 3000)}</env>",
        "cache_control": EPHEMERAL,
    }
    request: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "stream": True,
        "metadata": {"user_id": orjson.dumps({"session_id": f"bigbody-{seed}"}).decode()},
        "system": [identity, instructions, environment],
        "tools": tools,
    }
    history: list[dict[str, Any]] = []
    newest: dict[str, Any] = {"role": "user", "content": [{"type": "text", "text": _prose(rng, 300)}]}
    turn = 0
    while True:
        request["messages"] = [*history, _marked(newest)]
        size = len(orjson.dumps(request))
        if size >= min(target, CONVERSATION_CAP) or size_kb < 20:
            break
        turn += 1
        history.append(_without_cache_control(newest))
        assistant, newest = _turn_messages(rng, turn)
        for block in newest["content"]:
            if block["type"] == "tool_result":  # a file read: lines of code, quotes and backslashes escaped
                block["content"] = _code(rng, len(block["content"]))
        history.append(assistant)
    if size < target and size_kb >= 20:
        image = rng.randbytes((target - size) * 3 // 4)
        source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image).decode()}
        # After the turn's tool results, which the API takes only at its start.
        results = [block for block in newest["content"] if block["type"] == "tool_result"]
        rest = [block for block in newest["content"] if block["type"] != "tool_result"]
        newest = {**newest, "content": [*results, {"type": "image", "source": source}, *rest]}
        request["messages"] = [*history, _marked(newest)]
    elif size_kb < 20 and size < target:
        newest["content"][0]["text"] += " " + _prose(rng, target - size)
        request["messages"] = [*history, _marked(newest)]
    return orjson.dumps(request)


def _code(rng: random.Random, size: int) -> str:
    """About `size` characters that read like source code."""
    lines: list[str] = []
    while sum(map(len, lines)) < size:
        lines.append(
            f'    {rng.choice(WORDS)} = call("{_prose(rng, 24)}", r"C:\\src\\{rng.choice(WORDS)}")  # {_prose(rng, 16)}'
        )
    return "\n".join(lines)


@dataclass
class Target:
    name: str
    server: procs.Server
    url: str
    # (size, mode) → CPU ms per request of each round: its own process, and its children (the usage writer).
    own: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    children: dict[tuple[int, str], list[float]] = field(default_factory=dict)


def headers() -> dict[str, str]:
    return {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}


async def send(session: aiohttp.ClientSession, url: str, data: bytes) -> None:
    async with session.post(url + "/v1/messages", data=data, headers=headers()) as response:
        text = await response.read()
        if response.status != 200:
            raise SystemExit(f"{url}: HTTP {response.status}: {text[:300]!r}")


async def batch(session: aiohttp.ClientSession, target: Target, bodies: list[bytes], key: tuple[int, str]) -> None:
    """One request after the other; the target's CPU time over them."""
    pid = target.server.process.pid
    await procs.settled(pid, seconds=10)
    own, children = procs.cpu_seconds(pid)
    for data in bodies:
        await send(session, target.url, data)
    own_after, children_after = procs.cpu_seconds(pid)
    target.own.setdefault(key, []).append((own_after - own) / len(bodies) * 1e3)
    target.children.setdefault(key, []).append((children_after - children) / len(bodies) * 1e3)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def peak(session: aiohttp.ClientSession, target: Target, data: bytes) -> tuple[float, float]:
    """Resident set before, and its peak while PEAK_CLIENTS clients each send one `data` at once (MB)."""
    pid = target.server.process.pid
    await procs.settled(pid, seconds=10)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = peak_rss_mb(pid)
    await asyncio.gather(*(send(session, target.url, data) for _ in range(PEAK_CLIENTS)))
    return before, peak_rss_mb(pid)


def gateway(work: Path, name: str, mock_url: str, source: str | None) -> tuple[procs.Server, str]:
    """A gateway of two upstreams on the mock, its poolgate from `source` (a checkout's src/) or this one; and its
    URL."""
    port = procs.free_port()
    slug = "gateway-compared" if source else "gateway"
    config = procs.gateway_config(work / f"{slug}.yaml", port, mock_url, [f'{{name: bench, key: "{KEY}"}}'])
    poolgate = str(Path(sys.executable).parent / "poolgate")
    env = {"PYTHONPATH": source} if source else None
    server = procs.start(slug, [poolgate, "serve", "--config", str(config)], PROXY_CORE, work / f"{slug}.log", env)
    return server, f"http://127.0.0.1:{port}"


async def main() -> int:
    from results import code_version, command_line, publish

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", metavar="SRC", help="also the gateways of another checkout's src/ directory")
    parser.add_argument("--write", action="store_true", help="(re)place the section of RESULTS.md")
    args = parser.parse_args()
    work = procs.load_side("bigbody")
    print("building bodies…", flush=True)
    repeat = {size: body(size, 0) for size in SIZES_KB}
    fresh = {size: [body(size, 1 + index) for index in range(BATCH[size] * args.rounds)] for size in SIZES_KB}
    mock, mock_url = await procs.start_mock(work, LOAD_CORE)
    targets: list[Target] = []
    try:
        port = procs.free_port()
        bare = [sys.executable, str(BENCH / "bare_proxy.py"), "--upstream", mock_url, "--port", str(port)]
        targets.append(
            Target("bare proxy", procs.start("bare", bare, PROXY_CORE, work / "bare.log"), f"http://127.0.0.1:{port}")
        )
        for source in (None, args.compare) if args.compare else (None,):
            name = f"poolgate @{source}" if source else "poolgate"
            targets.append(Target(name, *gateway(work, name, mock_url, source)))
        for target in targets:
            ready = "/" if target is targets[0] else "/healthz"
            if not await procs.wait_ready(target.server, target.url + ready, 60):
                raise SystemExit(f"{target.name} did not start: {target.server.log_tail()}")
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for target in targets:  # warm-up: imports, pools, first-call paths
                for _ in range(20):
                    await send(session, target.url, repeat[50])
            for round_ in range(args.rounds):
                for size in SIZES_KB:
                    n = BATCH[size]
                    for mode, bodies in (
                        ("repeat", [repeat[size]] * n),
                        ("new", fresh[size][round_ * n : (round_ + 1) * n]),
                    ):
                        for target in targets:
                            await batch(session, target, bodies, (size, mode))
                print(f"round {round_ + 1}/{args.rounds} done", flush=True)
            peaks = {target.name: await peak(session, target, repeat[5120]) for target in targets}
    finally:
        for target in targets:
            procs.stop(target.server)
        procs.stop(mock)
    sizes = {size: len(repeat[size]) for size in SIZES_KB}
    section = render(targets, peaks, sizes, command_line("bigbody.py"), args.rounds, code_version())
    publish(SECTION, section, work, args.write)
    return 0


def render(
    targets: list[Target],
    peaks: dict[str, tuple[float, float]],
    sizes: dict[int, int],
    command: str,
    rounds: int,
    head: str,
) -> str:
    bare, gateways = targets[0], targets[1:]
    lines = [
        SECTION,
        "",
        f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), {head}; {rounds} rounds, streaming, "
        "requests one at a time, bodies built like Claude Code's (12 tools and 3 system blocks with "
        "`cache_control`, tool_use/tool_result turns whose results read like code, a base64 image making up the "
        "5 MB one). CPU ms per request (schedstat, the process's own threads; the gateway's usage writer, "
        f"{max(statistics.median(v) for t in gateways for v in t.children.values()):.2f} ms at most, apart). "
        "`repeat`: the same body every time (a session's turns resend their prefix); `new`: a body new in every "
        "byte. Over the bare proxy: paired in each round, the median over rounds; per KB, µs per KB of body.",
        "",
        "| body | mode | bare proxy ms | " + " | ".join(f"{t.name}: ms, over bare, per KB" for t in gateways) + " |",
        "|---:|---|---:|" + "---:|" * len(gateways),
    ]
    for size, mode in bare.own:
        kb = sizes[size] / 1024
        cells = []
        for target in gateways:
            over = statistics.median(
                g - b for g, b in zip(target.own[(size, mode)], bare.own[(size, mode)], strict=True)
            )
            cells.append(f"{statistics.median(target.own[(size, mode)]):.2f}, {over:+.2f}, {over / kb * 1e3:.1f} µs")
        base = statistics.median(bare.own[(size, mode)])
        lines.append(f"| {kb:,.0f} KB | {mode} | {base:.2f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Peak resident set with {PEAK_CLIENTS} clients sending the {sizes[5120] / 2**20:.1f} MB body at once "
        "(VmHWM, reset before):",
        "",
        "| target | before MB | peak MB | peak − before MB | per body in flight MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (before, top) in peaks.items():
        rise = top - before
        lines.append(f"| {name} | {before:.0f} | {top:.0f} | {rise:.0f} | {rise / PEAK_CLIENTS:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    raise SystemExit(asyncio.run(main()))

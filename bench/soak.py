"""A soak: `poolgate serve` and `poolgate mock-upstream` as real processes, concurrent clients for a while,
and the mock's faults changing under them through its admin API; then the books are checked.

    python bench/soak.py                       # 60 s, 24 clients
    python bench/soak.py --seconds 20 --clients 8

What a user would do to trust a gateway before putting a team on it. Checked at the end (the script exits
non-zero when any fails):

- every request got an answer in Anthropic's shape: a whole message or stream (a stream cut short by an
  upstream ends with an in-band `error` event), or an error body with a type and a message; never a
  gateway fault (`Internal error in the gateway`);
- after a SIGTERM, every request has its row in the ledger (`poolgate usage --format json` counts them);
- no request is left in flight on any account (`/metrics`), and the gateway's log has no traceback;
- the memory of the gateway and its usage writer process (RSS) at rest before and after the run, for a
  look at growth.

Faults, one key at a time, changed every 0.2–1.5 s: 529, 500, 429 with `retry-after: 1`, a reset
connection, an error mid-stream, a slow first byte, a 401, slow tokens; or all cleared. The mock runs with
`--unlimited` (its default 4,000 requests a minute per key would otherwise refuse most of a long run, which
the gateway then answers quickly with 529: correct, but it is not what this soak is for).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

BENCH = Path(__file__).resolve().parent
WORK = BENCH / ".work"
KEY = "pg-bench-soak-0123456789abcdef"
MODEL = "claude-sonnet-4-5"
MOCK_KEYS = ("sk-ant-api03-mock-key-1", "sk-ant-api03-mock-key-2", "sk-ant-api03-mock-key-3")
FAULTS = (
    {"status": 529},
    {"status": 500},
    {"status": 429, "retry_after": 1},
    {"reset_connection": True},
    {"midstream_error_after": 3},
    {"ttfb_ms": 300},
    {"status": 401, "times": 2},
    {"tokens_per_second": 200},
)
GATEWAY_FAULT = "Internal error in the gateway"


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []

    def answer(self, status: int, stream: bool, body: bytes) -> None:
        """Count the answer; note it when it is not in Anthropic's shape or is a fault of the gateway."""
        key = f"{status} {'stream' if stream else 'json'}"
        if status == 200 and stream:
            ended = body.rstrip().rsplit(b"\n\n", 1)[-1]
            if b"event: error" in ended:
                key += " (error event)"
            elif b"event: message_stop" not in ended:
                self.problems.append(f"a stream ended without message_stop or error: {body[-200:]!r}")
        else:
            try:
                payload = json.loads(body)
            except ValueError:
                self.problems.append(f"HTTP {status}: not JSON: {body[:200]!r}")
                return
            if status != 200:
                error = payload.get("error") or {}
                if payload.get("type") != "error" or not error.get("type") or not error.get("message"):
                    self.problems.append(f"HTTP {status}: not Anthropic's error shape: {body[:200]!r}")
                elif error["message"] == GATEWAY_FAULT:
                    self.problems.append(f"a fault in the gateway: {body[:200]!r}")
        self.statuses[key] += 1


async def client(session: aiohttp.ClientSession, url: str, stop: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    while time.monotonic() < stop:
        stream = rng.random() < 0.6
        body = {
            "model": MODEL,
            "max_tokens": rng.choice((16, 64, 200)),
            "stream": stream,
            "messages": [{"role": "user", "content": "hello " * rng.randint(1, 400)}],
        }
        tally.sent += 1
        try:
            async with session.post(f"{url}/v1/messages", json=body, headers=headers) as response:
                data = await response.read()
                tally.answer(response.status, stream, data)
                if response.status == 529:
                    await asyncio.sleep(0.05)  # as a client would, rather than spin on quick refusals
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.problems.append(f"no answer: {exc!r}")


async def change_faults(session: aiohttp.ClientSession, mock_url: str, stop: float, seed: int) -> int:
    rng = random.Random(seed)
    changes = 0
    while time.monotonic() < stop:
        if rng.random() < 0.3:
            async with session.delete(f"{mock_url}/_mock/faults"):
                pass
        else:
            fault = rng.choice(FAULTS)
            async with session.post(f"{mock_url}/_mock/faults/{rng.choice(MOCK_KEYS)}", json=fault) as response:
                response.raise_for_status()
        changes += 1
        await asyncio.sleep(rng.uniform(0.2, 1.5))
    async with session.delete(f"{mock_url}/_mock/faults"):
        pass
    return changes


async def in_flight(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return {
        line.split('upstream="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("poolgate_upstream_in_flight{")
    }


def ledger_rows(poolgate: str, config: Path) -> int:
    done = subprocess.run(
        [poolgate, "usage", "--config", str(config), "--by", "upstream", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return sum(int(group["requests"]) for group in json.loads(done.stdout)["groups"])


async def main() -> int:
    import procs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    work = WORK / time.strftime("soak-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    poolgate = str(Path(sys.executable).parent / "poolgate")
    mock, mock_url = await procs.start_mock(work, procs.LOAD_CORE)
    gateway = None
    try:
        port = procs.free_port()
        config = work / "poolgate.yaml"
        config.write_text(
            f"data_dir: {work / 'poolgate-data'}\n"
            f"server: {{host: 127.0.0.1, port: {port}, log_level: info}}\n"
            "upstreams:\n"
            + "".join(
                f'  - {{id: up-{i}, base_url: "{mock_url}", api_key: {key}}}\n' for i, key in enumerate(MOCK_KEYS)
            )
            + f'keys:\n  - {{name: soak, key: "{KEY}"}}\n'
        )
        gateway = procs.start(
            "gateway", [poolgate, "serve", "--config", str(config)], procs.PROXY_CORE, work / "gateway.log"
        )
        url = f"http://127.0.0.1:{port}"
        if not await procs.wait_ready(gateway, url + "/healthz", 60):
            raise SystemExit(f"the gateway did not start: {gateway.log_tail()}")
        await procs.settled(gateway.process.pid)
        rss_before = procs.rss_mb(gateway.process.pid) or 0.0
        tally = Tally()
        stop = time.monotonic() + args.seconds
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            changes, *_ = await asyncio.gather(
                change_faults(session, mock_url, stop, args.seed),
                *(client(session, url, stop, tally, args.seed * 1000 + i) for i in range(args.clients)),
            )
            await asyncio.sleep(1.0)  # streams the clients finished with are accounted
            left = await in_flight(session, url)
        rss_after = procs.rss_mb(gateway.process.pid) or 0.0
    finally:
        procs.stop(gateway)
        procs.stop(mock)
    log = (work / "gateway.log").read_text(errors="replace")
    rows = ledger_rows(poolgate, config)
    print(f"{tally.sent:,} requests in {args.seconds:g} s from {args.clients} clients, {changes} fault changes")
    for status, count in sorted(tally.statuses.items()):
        print(f"  {status:28} {count:8,}")
    print(f"ledger rows {rows:,}; in flight at the end {left}")
    print(f"RSS of the gateway and its usage writer: {rss_before:.0f} MB at rest before, {rss_after:.0f} MB after")
    problems = list(tally.problems)
    if rows != tally.sent:
        problems.append(f"{tally.sent} requests sent, {rows} in the ledger")
    if any(left.values()):
        problems.append(f"requests left in flight: {left}")
    if "Traceback" in log:
        problems.append("a traceback in the gateway's log")
    for problem in problems[:20]:
        print("PROBLEM:", problem)
    print(f"logs: {work}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    raise SystemExit(asyncio.run(main()))

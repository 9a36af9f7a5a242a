"""poolgate benchmark: the gateway against baselines measured in the same run.

Targets: direct-to-mock, a bare pass-through proxy on the same stack (uvicorn and, if installed,
granian), poolgate, and LiteLLM's proxy (in its own virtualenv, offline). Every target relays to the same
mock upstream. wrk posts a ~5 KB Anthropic body at several concurrencies, streaming and not; a small
aiohttp client measures time to first byte. Results are ratios, because this machine is shared and noisy.

    python bench/run.py            # full run (~12 min, more the first time LiteLLM installs)
    python bench/run.py --quick    # ~3 min smoke run
    python bench/run.py --write    # also rewrite bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
PY = sys.executable
POOLGATE = str(Path(PY).parent / "poolgate")
GATEWAY_KEY = "pg-bench-0123456789abcdef"
LITELLM_KEY = "sk-bench-0123456789abcdef"
# Core 0: mock upstream and wrk (the load side). Core 1: the proxy under test, alone, as in production.
LOAD_CORE, PROXY_CORE = "0", "1"
MOCK_PORT, BARE_PORT, GRANIAN_PORT, GATEWAY_PORT, LITELLM_PORT = 18000, 18001, 18002, 18003, 18004


@dataclass
class Target:
    name: str
    url: str
    key: str
    ready_path: str
    process: subprocess.Popen[bytes] | None = None
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    ttfb_ms: float | None = None
    rss_mb: float | None = None
    note: str = ""


def start(cmd: list[str], core: str, log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = open(WORK / log, "wb")  # noqa: SIM115 - the process owns it until it ends
    return subprocess.Popen(
        ["taskset", "-c", core, *cmd], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT
    )


async def wait_ready(target: Target, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if target.process is not None and target.process.poll() is not None:
                return False
            try:
                async with session.get(
                    target.url + target.ready_path,
                    headers={"x-api-key": target.key, "authorization": f"Bearer {target.key}"},
                ) as response:
                    if response.status < 500:
                        return True
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    return False


def write_gateway_config() -> Path:
    path = WORK / "poolgate.yaml"
    upstreams = "\n".join(
        f"  - {{id: k{i}, base_url: 'http://127.0.0.1:{MOCK_PORT}', api_key: sk-ant-api03-mock-key-{i}}}"
        for i in (1, 2, 3)
    )
    path.write_text(
        f"data_dir: {WORK / 'gateway-data'}\nserver: {{host: 127.0.0.1, port: {GATEWAY_PORT}, log_level: warning}}\n"
        f"routing: {{strategy: round-robin}}\nupstreams:\n{upstreams}\nkeys:\n  - {{name: bench, key: {GATEWAY_KEY}}}\n"
    )
    return path


def install_litellm() -> str | None:
    """LiteLLM in its own virtualenv; None (with the reason printed) when it cannot be had."""
    venv = WORK / "litellm-venv"
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        print("installing LiteLLM into bench/.work/litellm-venv (first run only)…", flush=True)
        try:
            subprocess.run([PY, "-m", "venv", str(venv)], check=True, timeout=120)
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
                check=True,
                timeout=900,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"LiteLLM unavailable: {exc}")
            return None
    config = WORK / "litellm.yaml"
    config.write_text(
        "model_list:\n  - model_name: claude-sonnet-5\n    litellm_params:\n      model: anthropic/claude-sonnet-5\n"
        f"      api_base: http://127.0.0.1:{MOCK_PORT}\n      api_key: sk-ant-api03-mock-key-1\n"
        f"general_settings:\n  master_key: {LITELLM_KEY}\nlitellm_settings:\n  telemetry: false\n"
    )
    return str(binary)


def wrk(target: Target, concurrency: int, stream: bool, seconds: int) -> dict[str, float]:
    env = {**os.environ, "STREAM": "1" if stream else "0", "GATEWAY_KEY": target.key}
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(ROOT / "bench" / "body.lua"),
        target.url + "/v1/messages",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60).stdout
    line = next((row for row in out.splitlines() if row.startswith("JSON ")), None)
    if line is None:
        return {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "errors": -1}
    data = json.loads(line[5:])
    return {
        "rps": data["requests"] / (data["duration_us"] / 1e6),
        "p50_ms": data["p50_us"] / 1000,
        "p99_ms": data["p99_us"] / 1000,
        "max_ms": data["max_us"] / 1000,
        "errors": data["errors"],
    }


async def measure_ttfb(target: Target, count: int) -> float:
    """Median time to the first body byte of a streaming answer, one request at a time."""
    body = {
        "model": "claude-sonnet-5",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "Placeholder benchmark prompt. " * 150}],
    }
    headers = {"x-api-key": target.key, "authorization": f"Bearer {target.key}", "anthropic-version": "2023-06-01"}
    samples = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            began = time.perf_counter()
            async with session.post(target.url + "/v1/messages", json=body, headers=headers) as response:
                await response.content.readany()
                samples.append((time.perf_counter() - began) * 1000)
                await response.read()
    return statistics.median(samples)


def rss_mb(process: subprocess.Popen[bytes] | None) -> float | None:
    if process is None:
        return None
    # taskset execs the command, so the pid is the server's own (plus children for multi-process servers).
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def report(targets: list[Target], concurrencies: list[int], seconds: int, command: str) -> str:
    by_name = {t.name: t for t in targets}
    lines = [
        f"Command: `{command}` — {seconds}s per cell, wrk -t1, ~5 KB body, 64 max_tokens (16 output tokens).",
        f"Machine: {os.cpu_count()} cores, shared; proxy under test pinned to core {PROXY_CORE}, "
        f"mock + wrk on core {LOAD_CORE}. Run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| target | mode | c | RPS | p50 ms | p99 ms | max ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target in targets:
        if not target.results:
            lines.append(f"| {target.name} | – | – | unavailable: {target.note} | | | | |")
            continue
        for cell, r in target.results.items():
            mode, c = cell.split(":")
            lines.append(
                f"| {target.name} | {mode} | {c} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                f"| {r['max_ms']:.1f} | {r['errors']:.0f} |"
            )
    lines += ["", "| target | TTFB ms (median, streaming, sequential) | RSS MB after load |", "|---|---|---|"]
    for target in targets:
        ttfb = f"{target.ttfb_ms:.2f}" if target.ttfb_ms is not None else "–"
        rss = f"{target.rss_mb:.0f}" if target.rss_mb is not None else "–"
        lines.append(f"| {target.name} | {ttfb} | {rss} |")
    lines += ["", "Ratios (same run):", ""]
    gateway, bare, direct = by_name.get("poolgate"), by_name.get("bare-uvicorn"), by_name.get("direct")
    litellm = by_name.get("litellm")
    for mode in ("json", "sse"):
        for c in concurrencies:
            cell = f"{mode}:{c}"
            if gateway and bare and cell in gateway.results and cell in bare.results:
                g, b = gateway.results[cell], bare.results[cell]
                parts = [f"poolgate/bare throughput {g['rps'] / max(b['rps'], 1e-9):.2f}"]
                if direct and cell in direct.results:
                    d = direct.results[cell]
                    parts.append(
                        f"added p50 vs direct: poolgate {g['p50_ms'] - d['p50_ms']:+.2f} ms, "
                        f"bare {b['p50_ms'] - d['p50_ms']:+.2f} ms"
                    )
                if litellm and cell in litellm.results and litellm.results[cell]["rps"] > 0:
                    parts.append(f"poolgate/LiteLLM throughput {g['rps'] / litellm.results[cell]['rps']:.1f}x")
                lines.append(f"- {mode} c={c}: " + "; ".join(parts))
    if gateway and bare and gateway.ttfb_ms and bare.ttfb_ms and direct and direct.ttfb_ms:
        lines.append(
            f"- TTFB overhead vs direct: poolgate {gateway.ttfb_ms - direct.ttfb_ms:+.2f} ms, "
            f"bare {bare.ttfb_ms - direct.ttfb_ms:+.2f} ms"
        )
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short cells, fewer concurrencies")
    parser.add_argument("--write", action="store_true", help="rewrite bench/RESULTS.md with this run")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    WORK.mkdir(parents=True, exist_ok=True)
    seconds = 4 if args.quick else 10
    concurrencies = [1, 64] if args.quick else [1, 16, 64]
    mock_url = f"http://127.0.0.1:{MOCK_PORT}"
    mock = start(
        [POOLGATE, "mock-upstream", "--port", str(MOCK_PORT), "--accept-any-key", "--unlimited"], LOAD_CORE, "mock.log"
    )
    targets = [
        Target("direct", mock_url, "sk-ant-api03-mock-key-1", "/"),
        Target("bare-uvicorn", f"http://127.0.0.1:{BARE_PORT}", "any", "/"),
        Target("poolgate", f"http://127.0.0.1:{GATEWAY_PORT}", GATEWAY_KEY, "/healthz"),
    ]
    targets[1].process = start([PY, "bench/bare_proxy.py", mock_url, str(BARE_PORT)], PROXY_CORE, "bare.log")
    targets[2].process = start([POOLGATE, "serve", "--config", str(write_gateway_config())], PROXY_CORE, "gw.log")
    try:
        import granian  # noqa: F401

        granian_target = Target("bare-granian", f"http://127.0.0.1:{GRANIAN_PORT}", "any", "/")
        granian_target.process = start(
            [PY, "bench/bare_proxy.py", mock_url, str(GRANIAN_PORT), "granian"],
            PROXY_CORE,
            "granian.log",
            {"BARE_PROXY_UPSTREAM": mock_url, "PYTHONPATH": str(ROOT)},
        )
        targets.insert(2, granian_target)
    except ImportError:
        pass
    if not args.no_litellm:
        litellm_bin = install_litellm()
        litellm = Target("litellm", f"http://127.0.0.1:{LITELLM_PORT}", LITELLM_KEY, "/health/liveliness")
        if litellm_bin is None:
            litellm.note = "could not be installed"
        else:
            litellm.process = start(
                [
                    litellm_bin,
                    "--config",
                    str(WORK / "litellm.yaml"),
                    "--port",
                    str(LITELLM_PORT),
                    "--num_workers",
                    "1",
                ],
                PROXY_CORE,
                "litellm.log",
                {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"},
            )
        targets.append(litellm)
    try:
        await wait_ready(Target("mock", mock_url, "x", "/", mock), 30)
        for target in targets:
            if target.note:
                continue
            if not await wait_ready(target, 180 if target.name == "litellm" else 30):
                target.note = f"did not start (see bench/.work/{target.name}.log)"
                stop(target.process)
                continue
            # Warm the connection pools, then measure.
            wrk(target, 8, False, 1)
            for mode, stream in (("json", False), ("sse", True)):
                for c in concurrencies:
                    target.results[f"{mode}:{c}"] = wrk(target, c, stream, seconds)
                    print(target.name, mode, c, target.results[f"{mode}:{c}"], flush=True)
            target.rss_mb = rss_mb(target.process)
            target.ttfb_ms = await measure_ttfb(target, 50 if args.quick else 200)
            stop(target.process)  # one proxy at a time on the proxy core
    finally:
        for target in targets:
            stop(target.process)
        stop(mock)
    command = "python bench/run.py" + (" --quick" if args.quick else "") + (" --no-litellm" if args.no_litellm else "")
    text = report(targets, concurrencies, seconds, command)
    print(text)
    if args.write:
        (ROOT / "bench" / "RESULTS.md").write_text("# Benchmark results\n\n" + text)


if __name__ == "__main__":
    asyncio.run(main())

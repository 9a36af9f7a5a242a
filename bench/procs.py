"""Server processes for the benchmark: start pinned to a core, wait until ready, measure memory, stop.

Only processes started here are ever signalled, by their own pid.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

WORK = Path(__file__).resolve().parent / ".work"
# The load side (mock, load generator, the benchmark scripts) on core 0; the server under test alone on core 1.
LOAD_CORE, PROXY_CORE = "0", "1"


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def free_port() -> int:
    """A port nobody listens on now; other people's benches on this machine use fixed ports."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unwind(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def start(
    name: str, cmd: list[str], core: str, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Server:
    """taskset execs the command, so the Popen pid is the server's own pid."""
    # The server runs in a session of its own, so only the benchmark's `finally` blocks stop it; Python's
    # default for SIGTERM (kill, timeout, a cancelled CI job) and SIGHUP (the terminal closed) ends the
    # benchmark without running them, and the servers ran on. They unwind the benchmark as Ctrl-C does.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _unwind)
    out = log.open("wb")
    process = subprocess.Popen(
        ["taskset", "-c", core, *cmd],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,  # its own process group: Ctrl-C in the terminal reaches run.py only
    )
    out.close()
    return Server(name, process, log)


async def wait_ready(server: Server | None, url: str, seconds: float, headers: dict[str, str] | None = None) -> bool:
    """Poll url until it answers below 500, the process dies, or time runs out."""
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            if server is not None and not server.alive():
                return False
            try:
                async with session.get(url, headers=headers or {}) as response:
                    if response.status < 500:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.25)
    return False


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def process_tree(pid: int) -> list[int]:
    """The pid and its descendants: granian and gunicorn-style servers serve from child processes."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(_children(current))
    return tree


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time so far of the gateway's own process and of its child processes (the usage writer), from
    schedstat: ns resolution, every thread."""
    own = children = 0
    for member in process_tree(pid):
        for task in Path(f"/proc/{member}/task").glob("*"):
            try:
                used = int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if member == pid:
                own += used
            else:
                children += used
    return own / 1e9, children / 1e9


async def settled(pid: int, seconds: float = 20.0, interval: float = 0.25, busy_share: float = 0.05) -> bool:
    """Wait until the gateway and its children are idle: its usage writer is spawned at startup and imports
    for a second or more of CPU on this machine, which a run starting meanwhile would share its core with.
    False when it never settled within `seconds`."""
    deadline = time.monotonic() + seconds
    quiet = 0
    before = sum(cpu_seconds(pid))
    while time.monotonic() < deadline and quiet < 2:
        await asyncio.sleep(interval)
        now = sum(cpu_seconds(pid))
        quiet = quiet + 1 if now - before < busy_share * interval else 0
        before = now
    return quiet >= 2


def rss_mb(pid: int) -> float | None:
    """VmRSS summed over the process tree (shared pages counted twice: an upper bound)."""
    total_kb, seen = 0, False
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    seen = True
        except OSError:
            continue
    return total_kb / 1024 if seen else None


def stop(server: Server | None, grace: float = 15) -> None:
    """SIGTERM the server's own process group (it was started in a new session), then SIGKILL."""
    if server is None or not server.alive():
        return
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(5)


async def start_mock(work: Path, core: str) -> tuple[Server, str]:
    """The mock upstream (any key, no rate limits) on `core`, ready; and its URL. Its `poolgate` is the one
    next to this interpreter."""
    poolgate = str(Path(sys.executable).parent / "poolgate")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mock = start(
        "mock",
        [poolgate, "mock-upstream", "--port", str(port), "--accept-any-key", "--unlimited"],
        core,
        work / "mock.log",
    )
    try:
        if not await wait_ready(mock, url + "/", 60):
            raise SystemExit(f"the mock upstream did not start: {mock.log_tail()}")
    except BaseException:
        # Not yet the caller's to stop: it did not start, or the run was cut short (Ctrl-C, SIGTERM) meanwhile.
        stop(mock)
        raise
    return mock, url


def gateway_config(path: Path, port: int, mock_url: str, keys: Sequence[str]) -> Path:
    """The benchmarks' gateway configuration at `path`: the mock's first two keys as upstreams, round-robin,
    its data next to it (`<name>-data`), and the gateway `keys` given as YAML flow mappings."""
    path.write_text(
        f"data_dir: {path.parent / (path.stem + '-data')}\n"
        f"server: {{host: 127.0.0.1, port: {port}, log_level: warning}}\n"
        "routing: {strategy: round-robin}\n"
        "upstreams:\n"
        f'  - {{id: a, base_url: "{mock_url}", api_key: sk-ant-api03-mock-key-1}}\n'
        f'  - {{id: b, base_url: "{mock_url}", api_key: sk-ant-api03-mock-key-2}}\n'
        "keys:\n" + "".join(f"  - {key}\n" for key in keys)
    )
    return path


def granian_missing() -> str | None:
    """Why the bare proxy cannot run under granian, or None: granian is an optional extra ('.[bench]'), and a
    run without it still measures everything else."""
    if importlib.util.find_spec("granian") is None:
        return "granian not installed"
    return None


def ensure_command(command: str) -> str:
    """A command from Debian's package of the same name (wrk, valgrind) when it is missing (the machine may
    be fresh)."""
    found = shutil.which(command)
    if found:
        return found
    print(f"{command} not found: apt-get install -y {command}", flush=True)
    install = ["apt-get", "install", "-y", "-q", command]
    if subprocess.run(install, timeout=300, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], timeout=300, capture_output=True, check=False)
        subprocess.run(install, timeout=300, capture_output=True, check=True)
    found = shutil.which(command)
    if not found:
        raise SystemExit(f"{command} could not be installed")
    return found


def load_side(name: str, *commands: str) -> Path:
    """The prologue of every benchmark: this process (it drives the load) pinned to the load core, the
    Debian `commands` it needs installed, and a fresh work directory for its logs and files, `name-<time>`."""
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    for command in commands:
        ensure_command(command)
    work = WORK / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    return work

"""`poolgate serve` as a real process: config file, SIGTERM drains usage, a restart keeps every record."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp
import anthropic
import pytest
import yaml
from sqlalchemy import select

from poolgate.config import load_config
from poolgate.lifecycle.attempt_errors import SHORT_OF_RESOURCES
from poolgate.mock import Fault, MockServer
from poolgate.store.db import open_engine, usage
from poolgate.store.usage import count_records
from tests.conftest import MOCK_KEYS, MODEL, user
from tests.integration.test_relay_details import until_in_flight

GATEWAY_KEY = "pg-test-static-key-0123456789"


def write_config(tmp_path: Path, mock_url: str, port: int) -> Path:
    config = {
        "data_dir": str(tmp_path / "data"),
        "server": {"port": port, "log_level": "info", "shutdown_grace_seconds": 5},
        "upstreams": [
            {"id": f"up-{i}", "base_url": mock_url, "api_key": f"${{UPSTREAM_KEY_{i}}}"} for i in range(len(MOCK_KEYS))
        ],
        "keys": [{"name": "ci", "key": "${GATEWAY_KEY}"}],
    }
    path = tmp_path / "poolgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_serve(
    config: Path,
    env: dict[str, str],
    open_files: tuple[int, int] | None = None,
    ignored: tuple[int, ...] = (),
    before: list[str] | None = None,
) -> tuple[asyncio.subprocess.Process, str]:
    """`poolgate serve` as users start it: the console script (a `python -m` start differs in what child
    processes inherit, see the writer test). `open_files`: the (soft, hard) limit of open files it starts with;
    `ignored`: signals it starts with ignored (as `nohup` starts a command); `before`: takes the lines it
    writes before it listens (warnings about its store), which are otherwise refused."""

    def prepare() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)

    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "poolgate"),
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, which the group-signal test signals as a whole
        preexec_fn=prepare if open_files is not None or ignored else None,
    )
    assert process.stderr is not None
    try:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        while before is not None and "listening on" not in line and line and len(before) < 20:
            before.append(line)
            line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        assert "listening on" in line, line
    except BaseException:
        # A gateway that did not start as expected is not left running (with its writer) after the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    url = line.split("listening on ", 1)[1].split()[0]
    return process, url


async def wait_ready(url: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("gateway did not become ready")


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGHUP, True)],
    ids=["process", "process-group", "hangup"],
)
async def test_sigterm_drains_usage_and_a_restart_loses_nothing(
    tmp_path: Path, mock: MockServer, signum: signal.Signals, to_group: bool
) -> None:
    # Ctrl-C in a terminal and systemd's default stop signal the whole process group, usage writer included;
    # closing the terminal (or the ssh session) a gateway runs in sends SIGHUP to it, which killed it at once.
    config = write_config(tmp_path, mock.url, 0)
    env = {**os.environ, "GATEWAY_KEY": GATEWAY_KEY, **{f"UPSTREAM_KEY_{i}": k for i, k in enumerate(MOCK_KEYS)}}
    env.pop("POOLGATE_MASTER_KEY", None)
    total = 0
    for _round in range(2):
        process, url = await start_serve(config, env)
        try:
            await wait_ready(url)
            async with anthropic.AsyncAnthropic(base_url=url, api_key=GATEWAY_KEY, max_retries=0) as client:
                await asyncio.gather(
                    *(client.messages.create(model=MODEL, max_tokens=8, messages=user()) for _ in range(25))
                )
            total += 25
        finally:
            if to_group:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)
            _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()[-2000:]
        assert GATEWAY_KEY not in err.decode() and MOCK_KEYS[0] not in err.decode()
    loaded = load_config(config, environ={"GATEWAY_KEY": GATEWAY_KEY, **{f"UPSTREAM_KEY_{i}": "k" for i in range(3)}})
    assert count_records(open_engine(loaded.store_url())) == total


def serve_args(tmp_path: Path, mock: MockServer) -> tuple[Path, dict[str, str]]:
    """A config file for `serve` in front of the mock, and the environment its secrets come from."""
    env = {**os.environ, "GATEWAY_KEY": GATEWAY_KEY, **{f"UPSTREAM_KEY_{i}": k for i, k in enumerate(MOCK_KEYS)}}
    env.pop("POOLGATE_MASTER_KEY", None)
    return write_config(tmp_path, mock.url, 0), env


async def twenty_answered(url: str) -> None:
    await wait_ready(url)
    async with anthropic.AsyncAnthropic(base_url=url, api_key=GATEWAY_KEY, max_retries=0) as client:
        await asyncio.gather(*(client.messages.create(model=MODEL, max_tokens=8, messages=user()) for _ in range(20)))


async def test_a_hangup_ignored_from_the_start_stays_ignored(tmp_path: Path, mock: MockServer) -> None:
    """`nohup poolgate serve` starts it with SIGHUP ignored, to outlive the terminal: it stopped all the same
    when the terminal or ssh session closed (the gateway took SIGHUP as a stop whatever it had been)."""
    config, env = serve_args(tmp_path, mock)
    process, url = await start_serve(config, env, ignored=(signal.SIGHUP,))
    try:
        await wait_ready(url)
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)  # a stop would have closed the listening socket by now
        await twenty_answered(url)
        assert process.returncode is None
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]


async def test_after_a_clean_stop_the_database_file_alone_holds_every_record(tmp_path: Path, mock: MockServer) -> None:
    """Backups copy `poolgate.db`: after a SIGTERM the recent rows were still only in `poolgate.db-wal`, and a
    copy of the file alone held none of them."""
    process, url = await start_serve(*serve_args(tmp_path, mock))
    try:
        await twenty_answered(url)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(tmp_path / "data" / "poolgate.db", backup / "poolgate.db")
    copied = sqlite3.connect(backup / "poolgate.db")
    try:
        assert copied.execute("SELECT count(*) FROM usage").fetchone() == (20,)
    finally:
        copied.close()


async def test_a_second_ctrl_c_during_shutdown_still_drains_usage_and_exits(tmp_path: Path, mock: MockServer) -> None:
    """People press Ctrl-C twice. uvicorn takes the second as "force exit" and skips the application's
    shutdown: the usage writer must still drain, and the process must still end (its writer ignores
    signals, so an undrained one kept the exit waiting forever)."""
    config, env = serve_args(tmp_path, mock)
    process, url = await start_serve(config, env)
    try:
        await twenty_answered(url)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        await asyncio.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        try:
            _, err = await asyncio.wait_for(process.communicate(), 60)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("poolgate serve did not exit after a second Ctrl-C") from None
    assert process.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in err.decode(), err.decode()[-2000:]
    loaded = load_config(config, environ={"GATEWAY_KEY": GATEWAY_KEY, **{f"UPSTREAM_KEY_{i}": "k" for i in range(3)}})
    assert count_records(open_engine(loaded.store_url())) == 20


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "hangup"])
async def test_a_second_stop_signal_during_the_drain_ends_the_streams_still_running(
    tmp_path: Path, mock: MockServer, second: signal.Signals
) -> None:
    """A second Ctrl-C ends the requests still running, a second SIGTERM (or a SIGHUP: the terminal closed)
    did not: the gateway waited out every stream, up to the whole shutdown grace. Each ended stream is
    answered (an in-band error) and accounted as interrupted, and the process exits 0."""
    config, env = serve_args(tmp_path, mock)
    written = yaml.safe_load(config.read_text())
    written["server"]["shutdown_grace_seconds"] = 300  # the streams would all finish within it
    config.write_text(yaml.safe_dump(written))
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(tokens_per_second=1))  # 16 s an answer (its 16 tokens)
    process, url = await start_serve(config, env)
    assert process.stderr is not None
    try:
        await wait_ready(url)
        async with aiohttp.ClientSession() as session:

            async def streamed() -> bytes:
                body = {"model": MODEL, "max_tokens": 30, "stream": True, "messages": user()}
                async with session.post(f"{url}/v1/messages", json=body, headers={"x-api-key": GATEWAY_KEY}) as answer:
                    return await answer.read()

            streams = asyncio.gather(*(streamed() for _ in range(5)))
            await until_in_flight(mock, 5)  # every stream under way
            process.send_signal(signal.SIGTERM)
            while b"Shutting down" not in await asyncio.wait_for(process.stderr.readline(), 30):
                pass
            process.send_signal(second)
            answers = await asyncio.wait_for(streams, 120)
        _, err = await asyncio.wait_for(process.communicate(), 60)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode()[-2000:]
    assert all(b"event: error" in answer for answer in answers), answers
    loaded = load_config(config, environ={"GATEWAY_KEY": GATEWAY_KEY, **{f"UPSTREAM_KEY_{i}": "k" for i in range(3)}})
    with open_engine(loaded.store_url()).connect() as conn:
        outcomes = conn.execute(select(usage.c.outcome)).scalars().all()
    assert outcomes == ["interrupted"] * 5


async def test_sigterm_under_load_lets_every_stream_in_flight_finish_whole_and_accounts_it(
    tmp_path: Path, mock: MockServer
) -> None:
    """A deploy stops the gateway while answers are streaming: within the shutdown grace, every stream in
    flight ends as the upstream ends it (no error event, nothing cut), the process exits 0, and each one
    has its usage record."""
    config = write_config(tmp_path, mock.url, 0)
    env = {**os.environ, "GATEWAY_KEY": GATEWAY_KEY, **{f"UPSTREAM_KEY_{i}": k for i, k in enumerate(MOCK_KEYS)}}
    env.pop("POOLGATE_MASTER_KEY", None)
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(tokens_per_second=16))  # ~1 s an answer: in flight when the signal comes
    process, url = await start_serve(config, env)
    try:
        await wait_ready(url)
        async with anthropic.AsyncAnthropic(base_url=url, api_key=GATEWAY_KEY, max_retries=0) as client:

            async def streamed() -> tuple[str, str | None]:
                async with client.messages.stream(model=MODEL, max_tokens=16, messages=user()) as stream:
                    message = await stream.get_final_message()
                return message.content[0].text, message.stop_reason  # type: ignore[union-attr]

            answers = asyncio.gather(*(streamed() for _ in range(20)))
            # Every stream taken on before the signal: each has reached the mock. Waiting for all 20 in flight
            # at once could not end if a busy machine took longer than an answer's second to send the last.
            for _ in range(1000):
                if mock.stats.requests_total == 20:
                    break
                await asyncio.sleep(0.01)
            assert mock.stats.requests_total == 20 and mock.stats.in_flight
            process.send_signal(signal.SIGTERM)
            finished = await asyncio.wait_for(answers, 30)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]
    assert all(text and stop == "end_turn" for text, stop in finished), finished
    loaded = load_config(config, environ={"GATEWAY_KEY": GATEWAY_KEY, **{f"UPSTREAM_KEY_{i}": "k" for i in range(3)}})
    with open_engine(loaded.store_url()).connect() as conn:
        rows = conn.execute(select(usage.c.outcome, usage.c.output_tokens)).all()
    assert [tuple(row) for row in rows] == [("ok", 16)] * 20


def children(pid: int) -> list[int]:
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


async def test_the_usage_writer_process_holds_the_store_and_nothing_else(tmp_path: Path, mock: MockServer) -> None:
    """The gateway's one helper process writes usage rows: it must not be a second copy of the gateway in
    memory. Started by multiprocessing, it imported the console script again (CLI, gateway, HTTP stacks:
    75 MB) and came with a resource-tracker process (12 MB more)."""
    config = write_config(tmp_path, mock.url, 0)
    env = {**os.environ, "GATEWAY_KEY": GATEWAY_KEY, **{f"UPSTREAM_KEY_{i}": k for i, k in enumerate(MOCK_KEYS)}}
    env.pop("POOLGATE_MASTER_KEY", None)
    loaded_config = load_config(
        config, environ={"GATEWAY_KEY": GATEWAY_KEY, **{f"UPSTREAM_KEY_{i}": "k" for i in range(3)}}
    )
    process, url = await start_serve(config, env)
    try:
        await wait_ready(url)
        async with anthropic.AsyncAnthropic(base_url=url, api_key=GATEWAY_KEY, max_retries=0) as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        for _ in range(200):  # the writer has started and written the record (bounded wait)
            if count_records(open_engine(loaded_config.store_url())) == 1:
                break
            await asyncio.sleep(0.05)
        (writer,) = children(process.pid)
        loaded = Path(f"/proc/{writer}/maps").read_text()
        assert "sqlalchemy" in loaded  # it is the writer …
        for gateway_part in ("uvloop", "aiohttp", "httptools", "pydantic_core"):  # … and only that
            assert gateway_part not in loaded, gateway_part
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]
    assert count_records(open_engine(loaded_config.store_url())) == 1


def open_files_limits(pid: int) -> tuple[int, int]:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines() if line.startswith("Max open"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


async def test_serve_raises_its_open_files_limit_to_the_most_it_may_have(tmp_path: Path, mock: MockServer) -> None:
    # The usual soft limit (1,024) held some 500 requests at once: each holds a client and an upstream socket.
    config, env = serve_args(tmp_path, mock)
    process, url = await start_serve(config, env, open_files=(256, 8192))
    try:
        await twenty_answered(url)
        assert open_files_limits(process.pid) == (8192, 8192)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)


async def test_running_out_of_open_files_is_the_gateways_529_and_takes_no_account_out(
    tmp_path: Path, mock: MockServer
) -> None:
    """More requests at once than the open files limit allows: those the gateway cannot open an upstream
    connection for get its 529 (the SDKs and Claude Code retry it), no account is blamed (each was taken out of
    routing for its cooldown, and the pool answered 529 after the burst), and the gateway serves on."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(ttfb_ms=1500))
    config, env = serve_args(tmp_path, mock)
    process, url = await start_serve(config, env, open_files=(96, 96))
    try:
        await wait_ready(url)
        async with anthropic.AsyncAnthropic(base_url=url, api_key=GATEWAY_KEY, max_retries=0) as client:

            async def one() -> str:
                try:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                except anthropic.APIStatusError as exc:
                    assert exc.status_code == 529, exc.message
                    return exc.body["error"]["message"]  # type: ignore[index]
                except anthropic.APIConnectionError:
                    return "not accepted"  # the server could not take the connection either
                return "answered"

            outcomes = await asyncio.gather(*(one() for _ in range(80)))
        assert SHORT_OF_RESOURCES in outcomes, outcomes
        assert set(outcomes) <= {SHORT_OF_RESOURCES, "answered", "not accepted"}, outcomes
        # The client's idle keep-alive connections are closed: the gateway has files again.
        mock.clear_faults()
        async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as response:
            ready = await response.json()
        assert ready["cooling_down"] == 0 and ready["usable"] == len(MOCK_KEYS), ready
        await twenty_answered(url)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    log = err.decode()
    assert "the open files limit is 96" in log
    assert log.count("no connection to an upstream could be opened") == 1, log[-3000:]
    assert "unhealthy" not in log and "Traceback" not in log


async def test_a_store_others_can_read_is_warned_of_once_by_a_running_gateway(tmp_path: Path, mock: MockServer) -> None:
    """README: a store file others may read is warned of once. `serve` warned of `poolgate.db` twice, and of
    its `-wal` and `-shm` too: its usage writer, a process of its own, opened the store again and warned anew."""
    config, env = serve_args(tmp_path, mock)
    process, url = await start_serve(config, env)  # makes the store 0600
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.communicate(), 30)
    (tmp_path / "data" / "poolgate.db").chmod(0o644)  # as older builds made it
    before: list[str] = []
    process, url = await start_serve(config, env, before=before)
    try:
        await twenty_answered(url)  # the writer is up and has stored rows
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]
    lines = [*before, *err.decode().splitlines()]
    warnings = [line for line in lines if "is accessible by group or others" in line]
    assert len(warnings) == 1, warnings
    assert f"{tmp_path / 'data' / 'poolgate.db'} is accessible by group or others (mode 0644)" in warnings[0]


async def test_a_gateway_whose_callers_bring_jwts_is_not_told_it_has_no_keys(tmp_path: Path, mock: MockServer) -> None:
    """Callers from a JWT issuer need no gateway key: `serve` told such an operator "no gateway keys yet: create
    one", as if nobody could call it; it counts the issuers instead."""
    config, env = serve_args(tmp_path, mock)
    settings = yaml.safe_load(config.read_text())
    del settings["keys"]
    settings["callers"] = {
        "jwt_issuers": [
            {
                "name": "sso",
                "issuer": "https://sso.example",
                "audience": ["poolgate"],
                "algorithms": ["HS256"],
                "secret": "a-shared-secret-of-thirty-two-bytes!",
            }
        ]
    }
    config.write_text(yaml.safe_dump(settings))
    process, url = await start_serve(config, env)
    try:
        await wait_ready(url)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]
    assert "no gateway keys yet" not in err.decode()

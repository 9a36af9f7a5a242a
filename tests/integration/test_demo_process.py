"""The README's commands as real processes: `poolgate demo` as a newcomer runs it (prints what to export,
serves the anthropic SDK through the bundled mock with those values, stops cleanly on Ctrl-C with the
requests in a store of its own and its key revoked), and `poolgate mock-upstream` alone with faults from its
config file."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest

from poolgate.store import repo
from poolgate.store.db import open_engine
from poolgate.store.usage import count_records

DEMO_MODEL = "claude-sonnet-5"
HI = [{"role": "user", "content": "Say hi"}]


async def poolgate_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """`poolgate ARGS` as a process of its own, its output (stdout and stderr) in one pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "poolgate.cli",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def read_until(stream: asyncio.StreamReader, marker: str, lines: list[str]) -> None:
    while not any(marker in line for line in lines):
        line = (await asyncio.wait_for(stream.readline(), 60)).decode()
        assert line, "the demo exited early:\n" + "".join(lines)
        lines.append(line)


def exported(lines: list[str], name: str) -> str:
    prefix = f"export {name}="
    return next(line.strip().removeprefix(prefix) for line in lines if line.strip().startswith(prefix))


def sdk_command(lines: list[str]) -> str:
    """The printed anthropic SDK one-liner, with its continuation line."""
    first = next(i for i, line in enumerate(lines) if '-c "import anthropic' in line)
    return lines[first].strip() + "\n" + lines[first + 1].rstrip("\n")


async def printed_curl(lines: list[str], path: str) -> Any:
    """Send what the printed `curl -s URL [-H "NAME: VALUE"] [-d 'BODY']` line with `path` in it says (curl
    itself may not be installed), and return the JSON answer."""
    words = shlex.split(next(line for line in lines if line.strip().startswith("curl -s ") and path in line))
    url, headers, body = words[2], {}, None
    for flag, value in zip(words[3::2], words[4::2], strict=True):
        if flag == "-H":
            name, _, field = value.partition(": ")
            headers[name] = field
        else:
            assert flag == "-d", words
            body = value
    async with aiohttp.ClientSession() as session:
        method = "POST" if body is not None else "GET"
        async with session.request(method, url, headers=headers, data=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()


async def test_the_demo_prints_what_to_export_serves_the_sdk_with_it_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    # What a real gateway's shell may hold: the demo reads none of it (the broken config would stop it).
    real = tmp_path / "real.yaml"
    real.write_text("server: [this is not\n")
    env = {
        **os.environ,
        "COLUMNS": "200",
        "NO_COLOR": "1",
        "POOLGATE_CONFIG": str(real),
        "POOLGATE_DATA_DIR": str(tmp_path / "real-data"),
        "POOLGATE__SERVER__PORT": "abc",
    }
    env.pop("POOLGATE_MASTER_KEY", None)
    with socket.socket() as probe:  # a port free a moment ago, for the mock (`--mock-port`)
        probe.bind(("127.0.0.1", 0))
        mock_port = probe.getsockname()[1]
    process = await poolgate_cli("demo", "--port", "0", "--mock-port", str(mock_port), cwd=tmp_path, env=env)
    assert process.stdout is not None
    lines: list[str] = []
    try:
        await read_until(process.stdout, "Ctrl-C stops the demo", lines)
        base_url, api_key = exported(lines, "ANTHROPIC_BASE_URL"), exported(lines, "ANTHROPIC_API_KEY")
        assert base_url.startswith("http://127.0.0.1:") and api_key.startswith("pg-")
        assert any(f"http://127.0.0.1:{mock_port}/_mock/faults/" in line for line in lines), lines
        async with anthropic.AsyncAnthropic(base_url=base_url, api_key=api_key, max_retries=0) as client:
            message = await client.messages.create(model=DEMO_MODEL, max_tokens=32, messages=HI)
            async with client.messages.stream(model=DEMO_MODEL, max_tokens=32, messages=HI) as stream:
                streamed = await stream.get_final_text()
        assert message.content and streamed
        # The printed SDK line runs as printed, with this interpreter (a plain `python` may lack the SDK).
        command = sdk_command(lines)
        assert command.startswith(shlex.quote(sys.executable) + " -c "), command
        sdk = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command,
            env={**env, "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": api_key},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        said, _ = await asyncio.wait_for(sdk.communicate(), 60)
        assert sdk.returncode == 0 and said.strip(), said.decode()
        # The printed fault injection and admin API lines work as printed: a failing account, failed over.
        await printed_curl(lines, "/_mock/faults/")
        async with anthropic.AsyncAnthropic(base_url=base_url, api_key=api_key, max_retries=0) as client:
            assert (await client.messages.create(model=DEMO_MODEL, max_tokens=32, messages=HI)).content
        accounts = (await printed_curl(lines, "/admin/upstreams"))["upstreams"]
        # Four requests, and the one the fault met (if the router sent one to that account) tried again elsewhere.
        assert len(accounts) == 3 and sum(account["requests"] for account in accounts) >= 4, accounts
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, _ = await asyncio.wait_for(process.communicate(), 60)
    output = "".join(lines) + rest.decode()
    assert process.returncode == 0, output
    assert "poolgate demo stopped" in output and "Traceback" not in output
    # Its own store, never the real gateway's; and its key is of no use once it has stopped.
    assert not (tmp_path / "poolgate-data").exists() and not (tmp_path / "real-data").exists()
    # All of it in poolgate.db: the write-ahead log folded in (its key's revocation was left in -wal alone).
    assert not (tmp_path / "poolgate-demo" / "poolgate.db-wal").exists()
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate-demo' / 'poolgate.db'}")
    assert count_records(engine) == 4
    (key,) = repo.list_keys(engine)
    assert key.name.startswith("demo-") and key.prefix == api_key[:10] and key.revoked_at is not None


async def test_a_demo_killed_hard_leaves_no_working_key_behind_once_the_next_one_starts(tmp_path: Path) -> None:
    """A demo killed (kill -9, the OOM killer) never revoked its key for the run: the next demo on the
    store served it."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    keys = []
    for signum in (signal.SIGKILL, signal.SIGINT):
        process = await poolgate_cli("demo", "--port", "0", cwd=tmp_path, env=env)
        assert process.stdout is not None
        lines: list[str] = []
        try:
            await read_until(process.stdout, "Ctrl-C stops the demo", lines)
            keys.append((exported(lines, "ANTHROPIC_BASE_URL"), exported(lines, "ANTHROPIC_API_KEY")))
            if signum == signal.SIGINT:  # the second run: the first one's key is of no use
                assert any("left behind by a demo that did not stop cleanly" in line for line in lines)
                base_url, old_key = keys[1][0], keys[0][1]
                async with anthropic.AsyncAnthropic(base_url=base_url, api_key=old_key, max_retries=0) as client:
                    with pytest.raises(anthropic.AuthenticationError):
                        await client.messages.create(model=DEMO_MODEL, max_tokens=8, messages=HI)
        finally:
            if process.returncode is None:
                process.send_signal(signum)
            await asyncio.wait_for(process.communicate(), 60)
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate-demo' / 'poolgate.db'}")
    assert all(row.revoked_at is not None for row in repo.list_keys(engine))


async def test_a_second_demo_on_a_running_demos_store_is_refused_and_takes_nothing_from_it(tmp_path: Path) -> None:
    """The second demo revoked the running one's key, taking it for one left behind by a killed demo."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    first = await poolgate_cli("demo", "--port", "0", cwd=tmp_path, env=env)
    assert first.stdout is not None
    lines: list[str] = []
    second: asyncio.subprocess.Process | None = None
    try:
        await read_until(first.stdout, "Ctrl-C stops the demo", lines)
        second = await poolgate_cli("demo", "--port", "0", cwd=tmp_path, env=env)
        refused, _ = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 1 and b"another poolgate demo is running" in refused
        base_url, api_key = exported(lines, "ANTHROPIC_BASE_URL"), exported(lines, "ANTHROPIC_API_KEY")
        async with anthropic.AsyncAnthropic(base_url=base_url, api_key=api_key, max_retries=0) as client:
            assert (await client.messages.create(model=DEMO_MODEL, max_tokens=8, messages=HI)).content
    finally:
        for demo in (first, second):  # a second demo that started (the check failed) is stopped too
            if demo is not None and demo.returncode is None:
                demo.send_signal(signal.SIGINT)
                await asyncio.wait_for(demo.communicate(), 60)
    assert first.returncode == 0


async def test_the_mock_upstream_runs_alone_with_faults_from_its_config_file(tmp_path: Path) -> None:
    config = tmp_path / "mock.yaml"
    config.write_text("keys:\n  sk-ant-api03-own-key: {fault: {status: 529, retry_after: 2, times: 1}}\n")
    process = await poolgate_cli("mock-upstream", "--port", "0", "--config", str(config))
    assert process.stdout is not None
    lines: list[str] = []
    try:
        await read_until(process.stdout, "mock upstream on", lines)
        url = lines[-1].split("mock upstream on ", 1)[1].split(";")[0]
        assert not url.endswith(":0")
        async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-ant-api03-own-key", max_retries=0) as client:
            with pytest.raises(anthropic.APIStatusError) as overloaded:
                await client.messages.create(model=DEMO_MODEL, max_tokens=8, messages=HI)
            assert overloaded.value.status_code == 529 and overloaded.value.response.headers["retry-after"] == "2"
            answered = await client.messages.create(model=DEMO_MODEL, max_tokens=8, messages=HI)
        assert answered.content
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0

    # --unlimited lifts the default key's limits and keeps its fault.
    config.write_text("accept_any_key: true\ndefault_key: {fault: {status: 529, times: 1}}\n")
    process = await poolgate_cli("mock-upstream", "--port", "0", "--unlimited", "--config", str(config))
    assert process.stdout is not None
    lines = []
    try:
        await read_until(process.stdout, "mock upstream on", lines)
        url = lines[-1].split("mock upstream on ", 1)[1].split(";")[0]
        async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-ant-api03-any", max_retries=0) as client:
            with pytest.raises(anthropic.APIStatusError) as overloaded:
                await client.messages.create(model=DEMO_MODEL, max_tokens=8, messages=HI)
            assert overloaded.value.status_code == 529
            answered = await client.messages.with_raw_response.create(model=DEMO_MODEL, max_tokens=8, messages=HI)
        assert answered.headers["anthropic-ratelimit-requests-limit"] == str(10**12)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)

    config.write_text("keys:\n  sk-x: {fault: {status: loud}}\n")
    broken = await poolgate_cli("mock-upstream", "--config", str(config))
    error, _ = await asyncio.wait_for(broken.communicate(), 30)
    assert broken.returncode != 0 and b"mock.yaml" in error and b"Traceback" not in error

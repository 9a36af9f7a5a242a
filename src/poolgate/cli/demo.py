"""`poolgate demo`: the mock upstream with three fake API keys, the gateway in front, a fresh gateway key."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from poolgate.app import Gateway
from poolgate.config import GatewayConfig, ServerConfig, UpstreamConfig
from poolgate.mock import MockConfig, start_mock
from poolgate.serve import bind, run, serve
from poolgate.store import repo
from poolgate.telemetry.logging import setup_logging

HOST = "127.0.0.1"
DEMO_MODEL = "claude-sonnet-5"


def instructions(gateway_url: str, key: str, mock_url: str, upstreams: int, data_dir: Path) -> str:
    body = '{"model":"' + DEMO_MODEL + '","max_tokens":64,"messages":[{"role":"user","content":"Say hi"}]}'
    return f"""
[bold green]poolgate demo is running[/bold green]
  gateway        {gateway_url}
  mock upstream  {mock_url}  ({upstreams} fake API keys)
  gateway key    {key}

[bold]Point Claude Code at it[/bold] (in another terminal):
  export ANTHROPIC_BASE_URL={gateway_url}
  export ANTHROPIC_API_KEY={key}
  claude -p "say hi"

[bold]The anthropic SDK[/bold] reads the same two variables:
  python -c "import anthropic; m = anthropic.Anthropic().messages.create(model='{DEMO_MODEL}', \\
max_tokens=64, messages=[{{'role': 'user', 'content': 'Say hi'}}]); print(m.content[0].text)"

[bold]curl[/bold]:
  curl -s {gateway_url}/v1/messages -H "x-api-key: {key}" -H "anthropic-version: 2023-06-01" \\
    -H "content-type: application/json" -d '{body}'

Usage so far: poolgate usage --data-dir {data_dir}    Ctrl-C stops the demo.
"""


def run_demo(data_dir: Path, port: int, console: Console) -> None:
    setup_logging("warning")
    mock_config = MockConfig.demo()
    sock = bind(HOST, port)
    gateway_url = f"http://{HOST}:{sock.getsockname()[1]}"

    async def main() -> None:
        mock = await start_mock(mock_config, host=HOST, port=0)
        try:
            config = GatewayConfig(
                data_dir=data_dir,
                server=ServerConfig(host=HOST, port=sock.getsockname()[1], log_level="warning"),
                upstreams=tuple(
                    UpstreamConfig(id=f"mock-{i}", base_url=mock.url, api_key=key)
                    for i, key in enumerate(mock_config.keys, start=1)
                ),
            )
            gateway = Gateway(config)
            _, key = repo.create_key(gateway.engine, time.strftime("demo-%Y%m%d-%H%M%S"))
            gateway.reload()
            console.print(
                instructions(gateway_url, key, mock.url, len(mock_config.keys), data_dir),
                highlight=False,
                soft_wrap=True,
            )
            await serve(gateway, config, sock)
        finally:
            await mock.stop()
        console.print("poolgate demo stopped.")

    run(main)

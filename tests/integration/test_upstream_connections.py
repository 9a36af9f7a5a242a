"""Connections to upstreams, through the HTTP surface: why an account gave no answer is logged."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import anthropic
import pytest

from poolgate.config import UpstreamConfig
from poolgate.mock import MockServer
from tests.conftest import MOCK_KEYS, MODEL, gateway_config, start_gateway, user


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("base_url", "cause"),
    [
        # https:// to a plain-HTTP port (as is a TLS-inspecting proxy's certificate the gateway does not trust):
        # the handshake fails.
        ("https://{mock}", "SSL"),
        ("http://127.0.0.1:{closed}", "Connect call failed"),
    ],
)
async def test_why_an_account_gave_no_answer_is_logged_without_its_credential(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture, base_url: str, cause: str
) -> None:
    """The client's 529 says only "unreachable": the log says why, for the operator to fix."""
    url = base_url.format(mock=mock.url.removeprefix("http://"), closed=closed_port())
    upstreams = (UpstreamConfig(id="broken", base_url=url, api_key=MOCK_KEYS[0]),)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert refused.value.status_code == 529 and "unreachable" in refused.value.message
    finally:
        await gw.stop()
    [line] = [
        record.getMessage()
        for record in caplog.records
        if record.name == "poolgate.relay" and record.levelno == logging.WARNING and "no answer" in record.getMessage()
    ]
    assert line.startswith("upstream broken gave no answer: Upstream account unreachable (ClientConnector")
    assert cause in line and MOCK_KEYS[0] not in line

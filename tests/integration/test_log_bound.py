"""The lines a client or an upstream can make the gateway log, one per request, are bounded per kind."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest

from poolgate.config import AdminConfig
from poolgate.mock import MockServer
from poolgate.telemetry.logging import LINE_BOUND, LINE_BOUND_SECONDS, LINES_PER_KIND
from tests.conftest import MODEL, gateway_config, start_gateway, user

WRONG_KEYS = 200
REFUSED_KEY = "rejected %s gateway key %s…"


class Clock:
    """The bound's clock, moved by the test: no waiting for an interval to pass."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def warnings(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


async def test_a_client_spraying_wrong_keys_writes_a_bounded_number_of_lines_then_a_summary(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    LINE_BOUND.reset(clock)
    admin_token = "admin-secret-0123456789"
    running = await start_gateway(gateway_config(tmp_path, mock.url, admin=AdminConfig(token=admin_token)))
    body = {"model": MODEL, "max_tokens": 8, "messages": user()}

    async def wrong_key(session: aiohttp.ClientSession, n: int) -> int:
        headers = {"x-api-key": f"pg-wrong-key-{n:08d}"}
        async with session.post(f"{running.url}/v1/messages", json=body, headers=headers) as response:
            return response.status

    try:
        async with aiohttp.ClientSession() as session:
            statuses = await asyncio.gather(*(wrong_key(session, n) for n in range(WRONG_KEYS // 2)))
            # Another kind of refusal, amid the spray, is logged all the same.
            async with session.get(f"{running.url}/metrics", headers={"x-admin-token": "wrong"}) as scrape:
                assert scrape.status == 401
            statuses += await asyncio.gather(*(wrong_key(session, n) for n in range(WRONG_KEYS // 2, WRONG_KEYS)))
            assert statuses == [401] * WRONG_KEYS  # every request is refused, logged or not
            refused = warnings(caplog, "poolgate.authn")
            assert len(refused) == LINES_PER_KIND
            assert set(refused) == {"rejected unknown gateway key pg-wr…"}
            assert warnings(caplog, "poolgate.admin") == ["/metrics refused: a wrong admin token"]

            # The interval over, the next refusal is logged, after what the interval suppressed.
            clock.now += LINE_BOUND_SECONDS
            caplog.clear()
            assert await wrong_key(session, WRONG_KEYS) == 401
            assert warnings(caplog, "poolgate.authn") == [
                f"… and {WRONG_KEYS - LINES_PER_KIND} more like {REFUSED_KEY!r} suppressed in the last"
                f" {LINE_BOUND_SECONDS:.0f} s",
                "rejected unknown gateway key pg-wr…",
            ]
    finally:
        await running.stop()

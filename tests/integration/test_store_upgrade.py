"""A store an older build made, opened by this one: what the upgrade's migrations change in it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import text

from poolgate.config import RoutingConfig
from poolgate.lifecycle.context import Upstream
from poolgate.mock import MockServer
from poolgate.store import repo
from poolgate.store.crypto import SecretBox, load_master_key
from poolgate.store.db import open_engine
from tests.conftest import MOCK_KEYS, MODEL, gateway_config, start_gateway, user


def store_as_an_older_build_left_it(data_dir: Path, schema_version: int, base_urls: dict[str, str]) -> None:
    """A store at `schema_version` holding an upstream per id, with the base URL an older build accepted."""
    engine = open_engine(f"sqlite:///{data_dir / 'poolgate.db'}")
    box = SecretBox(load_master_key(data_dir))
    for (upstream_id, base_url), key in zip(base_urls.items(), MOCK_KEYS, strict=False):
        repo.add_upstream(engine, box, Upstream(upstream_id, "anthropic_api_key", "http://placeholder"), key)
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE upstreams SET base_url = :url WHERE id = :id"), {"url": base_url, "id": upstream_id}
            )
    with engine.begin() as conn:
        conn.execute(text("UPDATE meta SET value = :v WHERE key = 'schema_version'"), {"v": str(schema_version)})
    engine.dispose()


async def test_a_stored_base_url_ending_in_v1_serves_after_the_upgrade(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Older builds stored `https://…/v1`, which this one refuses: every request to that account was the API's
    404 from `/v1/v1/messages` after the upgrade, and nothing said so."""
    caplog.set_level(logging.WARNING, logger="poolgate.store.db")
    store_as_an_older_build_left_it(tmp_path, 7, {"slash-v1": f"{mock.url}/v1/", "plain": mock.url})
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), routing=RoutingConfig(strategy="round-robin")))
    try:
        client = gw.client()
        for _ in range(4):  # in turns: each account answers
            reply = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            assert reply.http_response.status_code == 200
        bases = {row.upstream.id: row.upstream.base_url for row in repo.list_upstreams(gw.gateway.engine)}
        assert bases == {"slash-v1": mock.url, "plain": mock.url}
    finally:
        await gw.stop()
    warned = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warned) == 1 and "stored upstream slash-v1: dropped the /v1" in warned[0], warned

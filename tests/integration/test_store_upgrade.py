"""A store an older build made, opened by this one: what the upgrade's migrations change in it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from msgspec.structs import asdict, astuple
from sqlalchemy import text
from typer.testing import CliRunner

from poolgate.cli.main import app
from poolgate.config import RoutingConfig
from poolgate.lifecycle.context import Upstream, UsageRecord
from poolgate.mock import MockServer
from poolgate.store import repo
from poolgate.store.crypto import SecretBox, load_master_key
from poolgate.store.db import open_engine, sqlite_file_url, usage
from poolgate.store.usage import RECORD_FIELDS, forget_trace_batch, spend_rows
from poolgate.store.writer_process import insert_rows
from tests.conftest import MOCK_KEYS, MODEL, gateway_config, start_gateway, usage_record, user


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


def store_at_schema_v8(data_dir: Path, records: Sequence[UsageRecord]) -> None:
    """A store as schema v8 left it: `records` in the ledger, each with its routing trace inside its row."""
    engine = open_engine(sqlite_file_url(data_dir / "poolgate.db"))
    with engine.begin() as conn:
        for added_in_v9 in ("TABLE spend_days", "TABLE traces"):
            conn.execute(text(f"DROP {added_in_v9}"))
        conn.execute(usage.insert(), [asdict(record) for record in records])
        conn.execute(text("UPDATE meta SET value = '8' WHERE key = 'schema_version'"))
    engine.dispose()


# The trigger schema v9 kept `spend_days` by, one statement per inserted row (v10 drops it: the usage writer
# adds each batch's spend).
V9_SPEND_DAYS_TRIGGER = """
CREATE TRIGGER usage_spend_days AFTER INSERT ON usage WHEN NEW.principal_id IS NOT NULL
BEGIN
    INSERT INTO spend_days (principal_id, session_id, day, micro_usd)
    VALUES (NEW.principal_id, COALESCE(NEW.session_id, ''), CAST(NEW.started_at / 86400 AS INTEGER) * 86400,
            COALESCE(NEW.charged_micro_usd, NEW.cost_micro_usd))
    ON CONFLICT (principal_id, session_id, day) DO UPDATE SET micro_usd = micro_usd + excluded.micro_usd;
END
"""


def test_a_store_from_schema_v9_counts_each_requests_spend_once(tmp_path: Path) -> None:
    """v9 kept the spend per day by a trigger; the usage writer now adds each batch's: left in place, the
    trigger would count every request twice, and budgets seeded from it refuse callers at half their budget."""
    url = sqlite_file_url(tmp_path / "poolgate.db")
    engine = open_engine(url)
    with engine.begin() as conn:
        conn.execute(text(V9_SPEND_DAYS_TRIGGER))
        conn.execute(text("UPDATE meta SET value = '9' WHERE key = 'schema_version'"))
    engine.dispose()
    engine = open_engine(url)
    now = time.time()
    batch = [usage_record(f"req_{n}", now, 1_000, principal_id="key_a", session_id="s1") for n in range(3)]
    insert_rows(engine, RECORD_FIELDS, [astuple(record) for record in batch])
    assert [row.cost_micro_usd for row in spend_rows(engine, now)] == [3_000]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'")).scalar() == 0


TRACE = json.dumps(
    {
        "stages": [{"name": "health", "kept": ["up-1"], "dropped": {"up-0": "unhealthy"}, "us": 1.0}],
        "terminal": {"strategy": "round-robin", "chosen": "up-1", "sticky": False, "order": ["up-1"]},
    }
)


def test_route_explain_shows_the_traces_an_older_build_kept_in_the_usage_rows(tmp_path: Path) -> None:
    """Schema v8 kept each routing trace inside its usage row, and v9 in a table of its own. The upgrade
    leaves the older ones where they are (moving them would rewrite the whole ledger: minutes on a large
    store): `route explain` shows both, and the retention drops both."""
    month_ago = time.time() - 31 * 86400
    store_at_schema_v8(tmp_path, [usage_record("req_before", month_ago, 100, route=TRACE)])
    engine = open_engine(sqlite_file_url(tmp_path / "poolgate.db"))
    insert_rows(engine, RECORD_FIELDS, [astuple(usage_record("req_after", month_ago + 1, 100, route=TRACE))])

    def explained(request_id: str) -> str:
        result = CliRunner().invoke(app, ["route", "explain", request_id, "--data-dir", str(tmp_path)])
        assert result.exit_code == 0, result.output
        return result.output

    for request_id in ("req_before", "req_after"):
        assert "up-0 (unhealthy)" in explained(request_id) and "chose up-1" in explained(request_id)
    assert forget_trace_batch(engine, 0.0, time.time() - 30 * 86400)[0] == 2
    for request_id in ("req_before", "req_after"):
        assert "routing trace was dropped" in explained(request_id)


@pytest.mark.one_window
async def test_a_store_from_schema_v8_seeds_the_budgets_its_ledger_holds(tmp_path: Path, mock: MockServer) -> None:
    """Budgets are seeded from spend per caller, session and day, which the upgrade sums from the ledger once
    (the usage writer keeps it from then on): a gateway started on an upgraded store has its callers' spend."""
    engine = open_engine(sqlite_file_url(tmp_path / "poolgate.db"))
    alice, alice_key = repo.create_key(engine, "alice", {"budget_usd": "100", "budget_range": "total"})
    bob, bob_key = repo.create_key(
        engine, "bob", {"budget_usd": "100", "budget_range": "total", "budget_scope": "per_session"}
    )
    engine.dispose()
    week, now = 7 * 86400, time.time()
    ledger = [  # weekly for ten weeks: older than the 40 days budgets keep per session and day, and newer
        usage_record(f"{caller.id}-{n}", now - n * week, 1000 * n + 1, principal_id=caller.id, session_id="s1")
        for caller in (alice, bob)
        for n in range(10)
    ]
    ledger.append(usage_record("keepalive", now, 10**6, principal_id=alice.id, endpoint="keepalive"))
    ledger.append(usage_record("credits", now, 10**6, principal_id=alice.id, currency="credits"))
    store_at_schema_v8(tmp_path, ledger)
    gw = await start_gateway(gateway_config(tmp_path, mock.url), key=alice_key)
    try:
        for key, session in ((alice_key, None), (bob_key, "s1")):
            principal = gw.gateway.authn.authenticate({b"x-api-key": key.encode()})
            status = gw.gateway.policy.budget_status(principal, session, time.time())
            assert status is not None and status.spent_micro_usd == sum(1000 * n + 1 for n in range(10))
    finally:
        await gw.stop()

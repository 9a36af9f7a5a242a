"""The cost ledger in the store: migrations, spend per UTC day for budgets, flat-fee counters, trace retention."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from msgspec.structs import astuple
from sqlalchemy import Engine, case, create_engine, event, func, inspect, select, text

from poolgate.lifecycle.budgets import NO_SESSION, SESSION_RETENTION_DAYS, SpendRow, day_of
from poolgate.lifecycle.claims import parse_claims
from poolgate.lifecycle.context import Principal, UsageRecord
from poolgate.lifecycle.policy import Policy
from poolgate.store import pacing as pacing_module
from poolgate.store import usage as usage_store
from poolgate.store.channels import add_counts, load_counters
from poolgate.store.db import CALLER_ENDPOINTS, open_engine, usage
from poolgate.store.pacing import CpuQuota, Pacing, cpu_quota, cpu_times_reader, spare_time
from poolgate.store.reports import day_start
from poolgate.store.usage import RECORD_FIELDS, find_route, forget_trace_batch, spend_rows
from poolgate.store.writer_process import INSERT_PIECE, insert_rows
from tests.conftest import usage_record as record

DAY = 86400
T0 = 1_790_000_000.0 - 1_790_000_000.0 % DAY  # a UTC midnight


def test_a_version_4_database_gains_the_cost_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v4.db'}"
    columns = (
        "request_id VARCHAR(40) PRIMARY KEY, started_at FLOAT NOT NULL, principal_id VARCHAR(64), "
        "principal_name VARCHAR(64), endpoint VARCHAR(32) NOT NULL, model VARCHAR(128), stream BOOLEAN NOT NULL, "
        "upstream_id VARCHAR(64), status INTEGER NOT NULL, outcome VARCHAR(32) NOT NULL, error_type VARCHAR(64), "
        "input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cache_creation_input_tokens INTEGER NOT NULL, "
        "cache_read_input_tokens INTEGER NOT NULL, ttfb_ms FLOAT, duration_ms FLOAT NOT NULL, "
        "attempts INTEGER NOT NULL, session_id VARCHAR(128), route TEXT"
    )
    with create_engine(url).begin() as conn:
        conn.execute(text("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value VARCHAR(256) NOT NULL)"))
        conn.execute(text("INSERT INTO meta VALUES ('schema_version', '4')"))
        conn.execute(text(f"CREATE TABLE usage ({columns})"))
        conn.execute(
            text(
                "INSERT INTO usage VALUES ('old', 1.0, 'key_a', 'alice', 'messages', 'm', 0, 'up-0', 200, 'ok', NULL, "
                "1, 1, 0, 0, NULL, 1.0, 1, NULL, NULL)"
            )
        )
    engine = open_engine(url)
    names = {column["name"] for column in inspect(engine).get_columns("usage")}
    assert {"cost_micro_usd", "currency", "pricing_version", "cache_creation_1h_input_tokens"} <= names
    assert inspect(engine).has_table("flat_fee_counters")
    insert_rows(engine, RECORD_FIELDS, [astuple(record("new", T0, 42))])
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT request_id, cost_micro_usd FROM usage")).all())
    # A row from before pricing has no cost: unknown, not zero.
    assert rows == {"old": None, "new": 42}


def test_spend_is_summed_per_principal_session_and_utc_day(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    records = [
        record("a", T0 + 10, 100),
        record("b", T0 + DAY - 1, 200),  # the same UTC day, its last second
        record("c", T0 + DAY, 400),  # the next day
        record("d", T0 + 20, 800, session_id="s2"),
        record("e", T0 + 30, None),  # unknown price: nothing to charge
        record("f", T0 + 40, 0, status=500),
        record("g", T0 + 50, 1600, endpoint="keepalive"),  # the gateway's own request
        record("h", T0 + 60, 3200, principal_id="key_b", session_id=None),
        record("i", T0 + 70, 6400, currency="credits"),  # not µUSD: no budget's business
        # Pricing failed: the budget was charged the reservation, and a restart must count it.
        record("j", T0 + 80, None, pricing_version="pricing-failed", charged_micro_usd=12_800),
    ]
    insert_rows(engine, RECORD_FIELDS, [astuple(r) for r in records])
    assert sorted(spend_rows(engine, T0 + DAY), key=lambda row: (row.principal_id, row.day, row.session_id or "")) == [
        SpendRow("key_a", "s1", T0, 300 + 12_800),
        SpendRow("key_a", "s2", T0, 800),
        SpendRow("key_a", "s1", T0 + DAY, 400),
        SpendRow("key_b", "", T0, 3200),  # requests without a session id: a session of their own
    ]
    # Older than the sessions budgets keep: one total per principal, at day 0 (all a `total` budget reads).
    later = T0 + (SESSION_RETENTION_DAYS + 2) * DAY
    assert sorted(spend_rows(engine, later), key=lambda row: row.principal_id) == [
        SpendRow("key_a", None, 0.0, 300 + 12_800 + 800 + 400),
        SpendRow("key_b", None, 0.0, 3200),
    ]


@pytest.mark.parametrize("give_way", [False, True])
def test_a_batch_of_many_pieces_is_stored_whole_and_its_spend_counted_once(tmp_path: Path, give_way: bool) -> None:
    """A batch longer than one insert statement (`INSERT_PIECE` rows, the writer giving way between them) is
    stored whole, traces included, and a batch sent again after the writer stored part of it (one it did not
    live to confirm) adds only what was missing, to the ledger and to the spend budgets are seeded from."""
    engine = open_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    count = 3 * INSERT_PIECE + 3
    batch = [astuple(record(f"r{n}", T0 + n, 100 + n, route=f'{{"n": {n}}}' if n % 3 else None)) for n in range(count)]
    insert_rows(engine, RECORD_FIELDS, batch[: INSERT_PIECE + 1], give_way=give_way)
    insert_rows(engine, RECORD_FIELDS, batch, skip_stored=True, give_way=give_way)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*), sum(cost_micro_usd) FROM usage")).one()
        traces = conn.execute(text("SELECT count(*) FROM traces")).scalar_one()
    assert tuple(stored) == (count, sum(100 + n for n in range(count)))
    assert traces == sum(1 for n in range(count) if n % 3)
    assert [(find_route(engine, f"r{n}") or {}).get("route") for n in (2, 3, count - 1)] == [
        '{"n": 2}',
        None,
        f'{{"n": {count - 1}}}',
    ]
    assert list(spend_rows(engine, T0 + DAY)) == [SpendRow("key_a", "s1", T0, sum(100 + n for n in range(count)))]


def test_the_writer_gives_way_only_while_its_cores_have_time_to_spare() -> None:
    """Yielding between pieces helps a request waiting for the core; on a saturated core each yield is a switch
    that costs the gateway CPU. The writer decides from the cores' idle share since its last decision, over a
    span long enough to tell (a sync's batch right after another keeps the decision), and never yields where
    the cores' times cannot be read."""
    # (all, idle) ticks, as the writer reads them after each batch.
    readings = iter([(1000, 500), (1100, 530), (1105, 530), (1200, 530), (1300, 545), None, (1400, 560), (1500, 600)])
    pacing = Pacing(lambda: next(readings))
    assert not pacing.give_way  # nothing known yet
    decisions = []
    for _ in range(7):
        pacing.batch_done()
        decisions.append(pacing.give_way)
    # 30 of 100 ticks idle; 5 ticks: too short to tell, kept; none of 100 since the last decision; 15 of 100;
    # unreadable; read again, but no span to judge yet; 40 of 100.
    assert decisions == [True, True, False, True, False, False, True]
    assert spare_time((0, 0), (19, 19)) is None and spare_time((0, 0), (20, 2)) == 0.1


def test_the_cores_times_are_read_where_the_system_has_them() -> None:
    times = pacing_module._cpu_times({f"cpu{n}".encode() for n in os.sched_getaffinity(0)})
    if not Path("/proc/stat").exists():
        assert times is None
    else:
        assert times is not None and 0 <= times[1] <= times[0]


def test_flat_fee_counters_add_up_what_each_process_counted(tmp_path: Path) -> None:
    """Gateways sharing a store each add their increments: a new month's replace an earlier month's, and an
    earlier month's never touch a later one's."""
    engine = open_engine(f"sqlite:///{tmp_path / 'counters.db'}")
    assert load_counters(engine) == {}
    add_counts(engine, {"flat": {"month": "2026-11", "requests": 3, "tokens": 1200}})
    add_counts(
        engine,
        {
            "flat": {"month": "2026-11", "requests": 4, "tokens": 1500},
            "other": {"month": "2026-10", "requests": 1, "tokens": 2},
        },
    )
    assert load_counters(engine) == {
        "flat": {"month": "2026-11", "requests": 7, "tokens": 2700},
        "other": {"month": "2026-10", "requests": 1, "tokens": 2},
    }
    add_counts(engine, {"flat": {"month": "2026-12", "requests": 1, "tokens": 10}})
    add_counts(engine, {"flat": {"month": "2026-11", "requests": 5, "tokens": 50}})  # a late process's
    assert load_counters(engine)["flat"] == {"month": "2026-12", "requests": 1, "tokens": 10}


def test_old_routing_traces_are_dropped_in_batches_and_the_ledger_rows_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'traces.db'}")
    # Five old rows, two of them starting at the same moment across a batch boundary.
    old = [record(f"old-{i}", T0 + min(i, 3), 100, route='{"stages": []}') for i in range(5)]
    new = record("new", T0 + DAY, 100, route='{"stages": []}')
    earlier = record("earlier", T0 - DAY, 100, route='{"stages": []}')
    insert_rows(engine, RECORD_FIELDS, [astuple(r) for r in [*old, new, earlier]])
    monkeypatch.setattr(usage_store, "FORGET_BATCH", 2)
    # From `since` (what an earlier run left behind is not looked at again), a batch at a time.
    since, before, batches = T0, T0 + DAY, []
    while since < before:
        count, since = forget_trace_batch(engine, since, before)
        batches.append(count)
    assert sum(batches) == 5 and max(batches) == 2
    rows = {r.request_id: find_route(engine, r.request_id) for r in [*old, new, earlier]}
    assert [rows[r.request_id]["route"] for r in old] == [None] * 5  # type: ignore[index]
    assert rows["new"]["route"] and rows["earlier"]["route"]  # type: ignore[index]
    assert all(row["cost_micro_usd"] == 100 for row in rows.values())  # type: ignore[index]
    assert forget_trace_batch(engine, T0, before) == (0, before)


def test_a_batch_counts_the_traces_it_dropped_not_those_another_gateway_dropped_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two gateways on one store run the retention at the same minute: each counted the rows its read found,
    and their logs added up to more traces than were dropped."""
    database = f"sqlite:///{tmp_path / 'traces.db'}"
    engine, other = open_engine(database), open_engine(database)
    rows = [record(f"old-{i}", T0 + i, 100, route='{"stages": []}') for i in range(3)]
    insert_rows(engine, RECORD_FIELDS, [astuple(r) for r in rows])
    begin = engine.begin

    def after_the_other_gateway() -> Any:
        assert forget_trace_batch(other, T0, T0 + DAY)[0] == 3  # between this one's read and its write
        return begin()

    monkeypatch.setattr(engine, "begin", after_the_other_gateway)
    assert forget_trace_batch(engine, T0, T0 + DAY)[0] == 0


@pytest.mark.parametrize("session", ["s1", None])
def test_a_long_running_sessions_budget_restores_all_of_its_spend(tmp_path: Path, session: str | None) -> None:
    """Spend older than the sessions kept came back as no session's: a session still running after 40 days
    (or a caller's requests without a session id) restored less of its per-session `total` budget than it
    had spent live."""
    caller = Principal("key_a", "api_key", "alice", parse_claims({"budget_usd": 100, "budget_scope": "per_session"}))
    engine = open_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    live, rows = Policy(), []
    for n in range(0, SESSION_RETENTION_DAYS + 6, 5):  # used every 5 days for 45 days, $1 each time
        live.budgets.spend(caller, session, T0 + n * DAY, 1_000_000)
        rows.append(astuple(record(f"r{n}", T0 + n * DAY, 1_000_000, session_id=session)))
    insert_rows(engine, RECORD_FIELDS, rows)
    now = T0 + (SESSION_RETENTION_DAYS + 5) * DAY + 10
    restarted = Policy()
    restarted.load_spend(spend_rows(engine, now), now)
    for policy in (live, restarted):
        status = policy.budget_status(caller, session, now)
        assert status is not None and status.spent_micro_usd == 10_000_000


def store_pages(engine: Engine) -> int:
    """The pages the store's file holds (in use or free)."""
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())


def test_with_trace_retention_the_store_grows_only_by_the_ledger_rows(tmp_path: Path) -> None:
    """Dropping a trace set it to null inside its usage row: new rows, appended at the table's end, never
    reused that space, so a store grew by every request's trace for ever, retention or not. A day of requests
    each day, traces kept for a day: once they are dropped, the store grows as one of requests without traces."""
    trace = json.dumps({"stages": [{"name": "models", "kept": [f"up-{n:03d}" for n in range(64)]}] * 5})
    growth = {}
    for traced in (True, False):
        engine = open_engine(f"sqlite:///{tmp_path / f'traced-{traced}.db'}")
        pages = []
        for day in range(5):
            requests = [
                record(f"{day}-{n}", T0 + day * DAY + n, 100, route=trace if traced else None) for n in range(300)
            ]
            insert_rows(engine, RECORD_FIELDS, [astuple(r) for r in requests])
            pages.append(store_pages(engine))
            since, before = 0.0, T0 + day * DAY  # the retention job's run: the day before's traces go
            while since < before:
                since = forget_trace_batch(engine, since, before)[1]
        growth[traced] = [later - earlier for earlier, later in itertools.pairwise(pages)]
    trace_pages = 300 * len(trace) // 4096
    assert growth[True][0] > trace_pages  # the first day's traces are kept until the second day's come
    # Then each day's traces take the pages the day before's left.
    for traced, untraced in zip(growth[True][1:], growth[False][1:], strict=True):
        assert traced < untraced + trace_pages / 10


def spend_rows_summing_the_ledger(engine: Engine, now: float) -> list[SpendRow]:
    """`spend_rows` as it was before `spend_days`: the whole ledger summed at every start."""
    cutoff = day_of(now) - SESSION_RETENTION_DAYS * DAY
    recent = usage.c.started_at >= cutoff
    day = case((recent, day_start(engine)), else_=0)
    named = func.coalesce(usage.c.session_id, NO_SESSION)
    kept = select(named).where(recent).distinct()
    session = case((recent | named.in_(kept), named), else_=None)
    spent = func.coalesce(usage.c.charged_micro_usd, case((usage.c.currency == "USD", usage.c.cost_micro_usd)))
    query = (
        select(usage.c.principal_id, session.label("session_id"), day.label("day"), func.sum(spent).label("total"))
        .where(usage.c.principal_id.is_not(None), spent > 0, usage.c.endpoint.in_(CALLER_ENDPOINTS))
        .group_by(usage.c.principal_id, session, day)
    )
    with engine.connect() as conn:
        return [
            SpendRow(r.principal_id, r.session_id, float(r.day), int(r.total)) for r in conn.execute(query) if r.total
        ]


def random_ledger(rng: random.Random, now: float) -> list[UsageRecord]:
    return [
        record(
            f"r{n}",
            now - rng.uniform(0, 2 * SESSION_RETENTION_DAYS) * DAY,
            rng.choice([None, 0, rng.randrange(1, 10**6)]),
            principal_id=rng.choice(["key_a", "key_b", "key_c", None]),
            session_id=rng.choice(["s1", "s2", "s3", "s4", None]),
            endpoint=rng.choice([*CALLER_ENDPOINTS, "keepalive"]),
            currency=rng.choice(["USD", "USD", "credits"]),
            charged_micro_usd=rng.choice([None, None, None, rng.randrange(1, 10**5)]),
        )
        for n in range(rng.randrange(1, 300))
    ]


def without_sessions_spent_in_long_ago(rows: list[SpendRow]) -> dict[tuple[str, str | None, float], int]:
    """The rows with a session that spent nothing in the sessions' retention as no session's: the ledger's sum
    kept such a session by name when it had a recent request of no cost (one another channel's flat fee
    paid, the gateway's keepalive), and budgets forgot it at once all the same (its spend is all at day 0)."""
    spent_lately = {row.session_id for row in rows if row.day}
    summed: dict[tuple[str, str | None, float], int] = {}
    for row in rows:
        key = (row.principal_id, row.session_id if row.session_id in spent_lately else None, row.day)
        summed[key] = summed.get(key, 0) + row.cost_micro_usd
    return summed


@pytest.mark.parametrize("seed", range(30))
def test_spend_per_day_is_what_summing_the_whole_ledger_gave(tmp_path: Path, seed: int) -> None:
    """Budgets were seeded by summing every usage row at each start (seconds on a large store); the usage
    writer now keeps the sums as it inserts each batch, set-aside records restored (some stored already,
    which are not inserted again) included."""
    rng = random.Random(seed)
    now = T0 + rng.uniform(0, DAY)
    engine = open_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = [astuple(r) for r in random_ledger(rng, now)]
    written = len(ledger) * 2 // 3
    for start in range(0, written, 50):  # the writer's batches
        insert_rows(engine, RECORD_FIELDS, ledger[start : min(start + 50, written)])
    restored = rng.sample(ledger[:written], written // 3) + ledger[written:]
    insert_rows(engine, RECORD_FIELDS, rng.sample(restored, len(restored)), skip_stored=True)
    rows, summing = list(spend_rows(engine, now)), spend_rows_summing_the_ledger(engine, now)
    assert without_sessions_spent_in_long_ago(rows) == without_sessions_spent_in_long_ago(summing)
    seeded = []
    for spend in (rows, summing):
        policy = Policy()
        policy.load_spend(spend, now)
        seeded.append(
            [
                policy.budget_status(
                    Principal(principal_id, "api_key", principal_id, parse_claims(dict(budget_usd=10**6, **shape))),
                    session,
                    now,
                )
                for principal_id in ("key_a", "key_b", "key_c")
                for session in ("s1", "s2", "s3", "s4", None)
                for shape in BUDGET_SHAPES
            ]
        )
    assert seeded[0] == seeded[1]


BUDGET_SHAPES = [
    {"budget_range": budget_range, "budget_scope": scope}
    for budget_range in ("total", "monthly", "daily")
    for scope in ("per_account", "per_session")
]


def test_budgets_are_seeded_without_reading_the_ledger(tmp_path: Path) -> None:
    """Seeding summed every usage row at each start (4.5 s for 1.5M rows, the port closed meanwhile): the
    start took longer with every request ever served. SQLite's authorizer refuses any read of `usage`."""
    engine = open_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    insert_rows(engine, RECORD_FIELDS, [astuple(record(f"r{n}", T0 + n * 3600, 100)) for n in range(48)])
    engine.dispose()

    def refuse_reading_the_ledger(dbapi_connection: sqlite3.Connection, _: object) -> None:
        def authorize(action: int, table: str | None, *_: object) -> int:
            return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_READ and table == "usage" else sqlite3.SQLITE_OK

        dbapi_connection.set_authorizer(authorize)

    event.listen(engine, "connect", refuse_reading_the_ledger)
    assert sorted(spend_rows(engine, T0 + DAY), key=lambda row: row.day) == [
        SpendRow("key_a", "s1", T0, 2400),
        SpendRow("key_a", "s1", T0 + DAY, 2400),
    ]


def cgroup_tree(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount with `files` (by path under it) and a /proc/self/cgroup reading `self_cgroup`."""
    root = tmp_path / "cgroup"
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    root.mkdir(exist_ok=True)
    (tmp_path / "self_cgroup").write_text(self_cgroup)
    return root, tmp_path / "self_cgroup"


def test_in_a_container_with_a_cpu_limit_the_writer_gives_way_by_what_its_quota_left(tmp_path: Path) -> None:
    """In a container held to a CPU quota (Kubernetes' CPU limit) the host's cores may be idle while the
    container is saturated, where a yield costs the gateway as on a saturated core: the spare time is the
    share of the quota the cgroup left unused (cgroup v2's cpu.max and cpu.stat)."""
    container = "kubepods/pod1/c1"
    root, self_cgroup = cgroup_tree(
        tmp_path,
        f"0::/{container}\n",
        {f"{container}/cpu.max": "50000 100000\n", f"{container}/cpu.stat": "usage_usec 1000000\nuser_usec 9\n"},
    )
    quota = cpu_quota(root, self_cgroup, cpus=4)
    assert quota == CpuQuota(0.5, root / container / "cpu.stat", v2=True)
    seconds = iter([100.0, 101.0, 102.0, 103.0])
    usage = iter([1_000_000, 1_480_000, 1_580_000, 2_080_000])  # µs used by the cgroup at each reading

    def reading() -> tuple[float, float] | None:
        (root / container / "cpu.stat").write_text(f"usage_usec {next(usage)}\n")
        return dataclasses.replace(quota, clock=lambda: next(seconds)).times()

    pacing = Pacing(reading)
    decisions = []
    for _ in range(3):
        pacing.batch_done()
        decisions.append(pacing.give_way)
    # 0.48 of the quota's 0.5 core-second used (4 % spare); then 0.1 of it (80 % spare); then all of it.
    assert decisions == [False, True, False]
    (root / container / "cpu.stat").unlink()
    assert quota.times() is None


def test_a_cpu_quota_is_found_where_the_container_runtime_sets_it(tmp_path: Path) -> None:
    """On an ancestor of the process's cgroup (a pod's limit), at most the cores the process may run on; in a
    cgroup namespace (the container's cgroup mounted as the root); on cgroup v1 (`cpu.cfs_quota_us`, its usage
    in `cpuacct.usage`). No quota, or no cgroup files: the cores' idle time (/proc/stat) decides."""
    root, self_cgroup = cgroup_tree(
        tmp_path / "pod",
        "0::/pod1/c1\n",
        {"pod1/c1/cpu.max": "max 100000\n", "pod1/cpu.max": "300000 100000\n", "pod1/cpu.stat": "usage_usec 5\n"},
    )
    assert cpu_quota(root, self_cgroup, cpus=2) == CpuQuota(2.0, root / "pod1" / "cpu.stat", v2=True)
    root, self_cgroup = cgroup_tree(tmp_path / "ns", "0::/\n", {"cpu.max": "100000 100000\n"})
    assert cpu_quota(root, self_cgroup, cpus=2) == CpuQuota(1.0, root / "cpu.stat", v2=True)
    root, self_cgroup = cgroup_tree(
        tmp_path / "v1",
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/docker/abc/cpuacct.usage": "5000000000\n",
        },
    )
    quota = cpu_quota(root, self_cgroup, cpus=4)
    assert quota == CpuQuota(1.5, root / "cpu,cpuacct" / "docker" / "abc" / "cpuacct.usage", v2=False)
    times = dataclasses.replace(quota, clock=lambda: 10.0).times()
    ticks = pacing_module.TICKS_PER_SECOND
    assert times == (10.0 * 1.5 * ticks, 10.0 * 1.5 * ticks - 5.0 * ticks)
    root, self_cgroup = cgroup_tree(
        tmp_path / "unlimited",
        "1:cpu:/\n0::/\n",
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n", "cpu.max": "max 100000\n"},
    )
    assert cpu_quota(root, self_cgroup, cpus=2) is None
    assert cpu_quota(root, tmp_path / "no-such-file", cpus=2) is None
    # Without a quota the reader is the cores' (this machine's own cgroups, whatever they are, read without failing).
    times = cpu_times_reader(root, self_cgroup)()
    assert times is None or 0 <= times[1] <= times[0]
    cpu_times_reader()()

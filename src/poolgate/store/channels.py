"""Channels' monthly counters (flat-fee quotas, tiered prices) in the store: read once at start, written by a
periodic task."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, case, func, select
from sqlalchemy.dialects.sqlite import insert

from poolgate.billing.values import BillableUsage
from poolgate.store.db import flat_fee_counters, usage


def load_counters(engine: Engine) -> dict[str, dict[str, Any]]:
    """Snapshots by upstream id, in `MonthlyCounter.snapshot()` form."""
    with engine.connect() as conn:
        return _snapshots(conn)


def _snapshots(conn: Connection) -> dict[str, dict[str, Any]]:
    rows = conn.execute(select(flat_fee_counters)).all()
    return {row.upstream_id: {"month": row.month, "requests": row.requests, "tokens": row.tokens} for row in rows}


def month_usage(engine: Engine, since: float) -> dict[str, BillableUsage]:
    """Per upstream, the usage of the billed requests (answered Messages requests, as `ChannelBook.record`
    counts them) the ledger holds since `since`, summed: what the month's counters count, however many of
    their saves a crash lost."""
    written = func.coalesce(func.sum(usage.c.cache_creation_input_tokens), 0)
    written_1h = func.coalesce(func.sum(usage.c.cache_creation_1h_input_tokens), 0)
    query = (
        select(
            usage.c.upstream_id,
            func.count().label("requests"),
            func.coalesce(func.sum(usage.c.input_tokens), 0).label("input"),
            func.coalesce(func.sum(usage.c.output_tokens), 0).label("output"),
            (written - written_1h).label("written_5m"),
            written_1h.label("written_1h"),
            func.coalesce(func.sum(usage.c.cache_read_input_tokens), 0).label("read"),
        )
        .where(
            usage.c.started_at >= since,
            usage.c.upstream_id.is_not(None),
            usage.c.status == 200,
            usage.c.endpoint != "count_tokens",
        )
        .group_by(usage.c.upstream_id)
    )
    with engine.connect() as conn:
        return {
            row.upstream_id: BillableUsage(
                input_tokens=int(row.input),
                output_tokens=int(row.output),
                cache_creation_5m=int(row.written_5m),
                cache_creation_1h=int(row.written_1h),
                cache_read=int(row.read),
                requests=int(row.requests),
            )
            for row in conn.execute(query)
        }


def _merge(
    conn: Connection,
    upstream_id: str,
    counts: Mapping[str, Any],
    stamp: float,
    same_month: Callable[[ColumnElement[Any], ColumnElement[Any]], ColumnElement[Any]],
) -> None:
    """`counts` (month, requests, tokens) into the upstream's row: combined by `same_month` with the row's
    counts of the same month, in place of an earlier month's (a new month starts from zero), not at all over
    a later month's (another process has moved on)."""
    table = flat_fee_counters
    row = insert(table).values(
        upstream_id=upstream_id,
        month=str(counts["month"]),
        requests=int(counts["requests"]),
        tokens=int(counts["tokens"]),
        updated_at=stamp,
    )
    same = table.c.month == row.excluded.month
    conn.execute(
        row.on_conflict_do_update(
            index_elements=[table.c.upstream_id],
            set_={
                "requests": case(
                    (same, same_month(table.c.requests, row.excluded.requests)), else_=row.excluded.requests
                ),
                "tokens": case((same, same_month(table.c.tokens, row.excluded.tokens)), else_=row.excluded.tokens),
                "month": row.excluded.month,
                "updated_at": row.excluded.updated_at,
            },
            where=table.c.month <= row.excluded.month,
        )
    )


def add_counts(
    engine: Engine,
    increments: Mapping[str, Mapping[str, Any]],
    now: float | None = None,
    floors: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Add what one process counted (`ChannelBook.unsaved`) to the stored counters, in one transaction, one
    statement per counter, so processes sharing the store never lose each other's counts (see `_merge` for
    months). Returns what the rows hold then, as `load_counters` does: every process's counts
    (`ChannelBook.saved` takes the others' in). `floors` (`ChannelBook.raised`) are counts the rows are raised
    to first, where they hold less of the month: what the ledger held at a process's start, which a crash kept
    from the counter (a floor, not an increment: the processes that start after one crash each raise it to the
    same count)."""
    if not increments and not floors:
        return load_counters(engine)
    stamp = time.time() if now is None else now
    with engine.begin() as conn:
        for upstream_id, floor in (floors or {}).items():
            _merge(conn, upstream_id, floor, stamp, lambda stored, floor: func.max(stored, floor))
        for upstream_id, added in increments.items():
            _merge(conn, upstream_id, added, stamp, lambda stored, added: stored + added)
        return _snapshots(conn)

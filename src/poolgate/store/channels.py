"""Channels' monthly counters (flat-fee quotas, tiered prices) in the store: read once at start, written by a
periodic task."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, case, select
from sqlalchemy.dialects.sqlite import insert

from poolgate.store.db import flat_fee_counters


def load_counters(engine: Engine) -> dict[str, dict[str, Any]]:
    """Snapshots by upstream id, in `MonthlyCounter.snapshot()` form."""
    with engine.connect() as conn:
        rows = conn.execute(select(flat_fee_counters)).all()
    return {row.upstream_id: {"month": row.month, "requests": row.requests, "tokens": row.tokens} for row in rows}


def add_counts(engine: Engine, increments: Mapping[str, Mapping[str, Any]], now: float | None = None) -> None:
    """Add what one process counted (`ChannelBook.unsaved`) to the stored counters, in one transaction: to
    the row's counts when it is of the same month, in place of them when the row is of an earlier month (a
    new month starts from zero), not at all when it is of a later one (another process has moved on). One
    statement per counter, so processes sharing the store never lose each other's counts."""
    if not increments:
        return
    stamp = time.time() if now is None else now
    table = flat_fee_counters
    with engine.begin() as conn:
        for upstream_id, added in increments.items():
            row = insert(table).values(
                upstream_id=upstream_id,
                month=str(added["month"]),
                requests=int(added["requests"]),
                tokens=int(added["tokens"]),
                updated_at=stamp,
            )
            same_month = table.c.month == row.excluded.month
            conn.execute(
                row.on_conflict_do_update(
                    index_elements=[table.c.upstream_id],
                    set_={
                        "requests": case(
                            (same_month, table.c.requests + row.excluded.requests), else_=row.excluded.requests
                        ),
                        "tokens": case((same_month, table.c.tokens + row.excluded.tokens), else_=row.excluded.tokens),
                        "month": row.excluded.month,
                        "updated_at": row.excluded.updated_at,
                    },
                    where=table.c.month <= row.excluded.month,
                )
            )

"""Channels' monthly counters (flat-fee quotas, tiered prices) in the store: read once at start, written by a
periodic task."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, select

from poolgate.store.db import flat_fee_counters


def load_counters(engine: Engine) -> dict[str, dict[str, Any]]:
    """Snapshots by upstream id, in `MonthlyCounter.snapshot()` form."""
    with engine.connect() as conn:
        rows = conn.execute(select(flat_fee_counters)).all()
    return {row.upstream_id: {"month": row.month, "requests": row.requests, "tokens": row.tokens} for row in rows}


def save_counters(engine: Engine, snapshots: Mapping[str, Mapping[str, Any]], now: float | None = None) -> None:
    """Upsert the given counters in one transaction."""
    if not snapshots:
        return
    stamp = time.time() if now is None else now
    with engine.begin() as conn:
        for upstream_id, data in snapshots.items():
            values = {
                "month": str(data["month"]),
                "requests": int(data["requests"]),
                "tokens": int(data["tokens"]),
                "updated_at": stamp,
            }
            updated = conn.execute(
                flat_fee_counters.update().where(flat_fee_counters.c.upstream_id == upstream_id).values(**values)
            )
            if not updated.rowcount:
                conn.execute(flat_fee_counters.insert().values(upstream_id=upstream_id, **values))

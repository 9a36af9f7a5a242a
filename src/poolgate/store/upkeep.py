"""The store's upkeep while the gateway runs, in background loops: the channels' monthly counters (flat-fee
quotas, tiered prices) added to the store's (and other processes' taken in) every
`billing.counter_save_interval_seconds`, and the routing traces older than `store.trace_retention_days`
dropped from the store. Never per request.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import Engine

from poolgate.billing.book import ChannelBook
from poolgate.config import GatewayConfig
from poolgate.store.channels import add_counts
from poolgate.store.db import read_traces_forgotten_before, write_traces_forgotten_before
from poolgate.store.usage import forget_trace_batch
from poolgate.store.writer_process import failure

log = logging.getLogger("poolgate")

# Old routing traces are dropped a minute after start, then hourly.
TRACE_RETENTION_FIRST_RUN_SECONDS = 60.0
TRACE_RETENTION_INTERVAL_SECONDS = 3600.0


class StoreUpkeep:
    """Saves the channels' counters and forgets old routing traces, each on its own schedule (the gateway
    runs the loops as tasks, and saves the counters once more at shutdown)."""

    def __init__(self, config: GatewayConfig, engine: Engine, book: ChannelBook) -> None:
        self.config = config
        self.engine = engine
        self.book = book

    async def save_counters(self) -> None:
        """Add what the channels' monthly counters counted since the last save to the store's (off the event
        loop), and take in what other processes sharing the store added; what a failed save did not write is
        added next time."""
        if not self.book.counting:
            return
        increments, raised = self.book.unsaved(), self.book.raised()
        write = asyncio.ensure_future(asyncio.to_thread(add_counts, self.engine, increments, floors=raised))
        try:
            stored = await asyncio.shield(write)
        except asyncio.CancelledError:
            # Cancelled (the shutdown stops the periodic save) while the thread writes: it commits all the
            # same, and the shutdown's own save must not add these increments a second time.
            await asyncio.wait([write])
            if write.exception() is None:
                self.book.saved(increments, write.result(), raised=raised)
            raise
        except Exception as exc:
            log.warning("saving flat-fee counters failed (will retry): %s", failure(exc))
        else:
            self.book.saved(increments, stored, raised=raised)

    async def save_counters_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.billing.counter_save_interval_seconds)
            await self.save_counters()

    async def forget_old_traces(self) -> int:
        """Drop the routing traces older than `store.trace_retention_days` from the store, a batch at a
        time off the event loop (a shutdown stops it between batches); each run starts where the last one,
        of this process or an earlier one, got to."""
        days = self.config.store.trace_retention_days
        if days is None:
            return 0
        before = time.time() - days * 86400
        since = await asyncio.to_thread(read_traces_forgotten_before, self.engine)
        if since >= before:  # the clock went back, or the retention grew: nothing new is that old
            return 0
        dropped = 0
        while since < before:
            count, since = await asyncio.to_thread(forget_trace_batch, self.engine, since, before)
            dropped += count
        await asyncio.to_thread(write_traces_forgotten_before, self.engine, before)
        if dropped:
            log.info("dropped the routing traces of %d usage records older than %g days", dropped, days)
        return dropped

    async def trace_retention_loop(self) -> None:
        await asyncio.sleep(TRACE_RETENTION_FIRST_RUN_SECONDS)  # not while the gateway starts
        while True:
            try:
                await self.forget_old_traces()
            except Exception as exc:  # the traces stay until the next run; serving is not affected
                log.warning("dropping old routing traces failed (will retry): %s", failure(exc))
            await asyncio.sleep(TRACE_RETENTION_INTERVAL_SECONDS)

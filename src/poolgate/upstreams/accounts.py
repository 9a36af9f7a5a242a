"""Subscription accounts' quota picture between requests: seeded from the store at start, saved back when
it changes (for `poolgate accounts list` and the next start), and refreshed from the subscription usage
endpoint when an account has been idle so long that its headers went stale (rate-limited per account)."""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import Engine

from poolgate.config import OAuthConfig
from poolgate.lifecycle.sign import OAUTH_KIND, Signer
from poolgate.store.accounts import load_quota_pictures, save_quota_picture
from poolgate.upstreams.pool import Pool
from poolgate.upstreams.quota import QuotaPicture, merge_pictures, should_poll_usage

log = logging.getLogger("poolgate.accounts")

INTERVAL_SECONDS = 5.0


class QuotaKeeper:
    def __init__(self, engine: Engine, pool: Pool, signer: Signer, config: OAuthConfig) -> None:
        self._engine = engine
        self._pool = pool
        self._signer = signer
        self._config = config
        self._saved: dict[str, QuotaPicture] = {}
        self._polled: dict[str, float] = {}

    def seed(self) -> None:
        """Give accounts that have no picture in memory the one stored last (blocking; at start and reload)."""
        try:
            stored = load_quota_pictures(self._engine)
        except Exception as exc:  # the table may be missing on a store that was never migrated
            log.warning("could not read stored quota pictures: %s", exc)
            return
        for upstream_id, picture in stored.items():
            state = self._pool.get(upstream_id)
            if state is not None and state.quota is None:
                state.quota = picture
                self._saved[upstream_id] = picture

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_SECONDS)
            try:
                await self.tick(time.monotonic(), time.time())
            except Exception as exc:  # bookkeeping must never stop the gateway
                log.warning("quota bookkeeping failed: %s", exc)

    async def tick(self, now: float, wall: float) -> None:
        for state in self._pool.states():
            if state.upstream.kind != OAUTH_KIND or not state.upstream.enabled:
                continue
            upstream_id = state.upstream.id
            if should_poll_usage(
                state.quota,
                now,
                self._config.max_quota_staleness_seconds,
                self._polled.get(upstream_id),
                self._config.usage_poll_min_interval_seconds,
            ):
                self._polled[upstream_id] = now
                polled = await self._signer.fetch_usage(state.upstream, now, wall)
                if polled is not None:
                    state.quota = merge_pictures(state.quota, polled)
            picture = state.quota
            if picture is not None and self._saved.get(upstream_id) is not picture:
                await asyncio.to_thread(save_quota_picture, self._engine, upstream_id, picture)
                self._saved[upstream_id] = picture

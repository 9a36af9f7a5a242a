"""Subscription accounts between requests: their quota picture, seeded from the store at start, saved back
when it changes (for `poolgate accounts list` and the next start), and refreshed from the subscription
usage endpoint when an account has been idle so long that its headers went stale (rate-limited per
account); and the optional warm-up that starts an account's 5-hour window at a configured time."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

from sqlalchemy import Engine

from poolgate.config import OAuthConfig
from poolgate.lifecycle.sign import OAUTH_KIND, Signer
from poolgate.store.accounts import load_quota_pictures, save_quota_picture
from poolgate.store.writer_process import failure
from poolgate.upstreams.health import lift_park
from poolgate.upstreams.pool import Pool
from poolgate.upstreams.quota import FIVE_HOUR, QuotaPicture, merge_pictures, quota_blocked_until, should_poll_usage

log = logging.getLogger("poolgate.accounts")

INTERVAL_SECONDS = 5.0
FIVE_HOURS = 5 * 3600.0


def warmup_slot(config: OAuthConfig, upstream_id: str, picture: QuotaPicture | None, wall: float) -> float | None:
    """The configured warm-up time (epoch) this account is due for now, if any: the latest `warmup_at` that
    has passed within the last five hours, while the account's 5-hour window is not already running."""
    if not config.warmup_at or (config.warmup_accounts and upstream_id not in config.warmup_accounts):
        return None
    window = picture.windows.get(FIVE_HOUR) if picture is not None else None
    if window is not None and window.resets_at is not None and window.resets_at > wall:
        return None
    midnight = datetime.fromtimestamp(wall, UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    due = None
    for text in config.warmup_at:
        hours, minutes = (int(part) for part in text.split(":"))
        for day in (midnight - 86400, midnight):
            at = day + hours * 3600 + minutes * 60
            if at <= wall < at + FIVE_HOURS and (due is None or at > due):
                due = at
    return due


class QuotaKeeper:
    def __init__(
        self,
        engine: Engine,
        pool: Pool,
        signer: Signer,
        config: OAuthConfig,
        warm_up: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self._engine = engine
        self._warm_up = warm_up
        # The warm-up slot each account was sent last: slots only move forward with the clock, so this is
        # what "once per slot" needs (a set of every (account, slot) grew by one per account and configured
        # time a day, for as long as the gateway ran).
        self._warmed: dict[str, float] = {}
        self._pool = pool
        self._signer = signer
        self._config = config
        self._saved: dict[str, QuotaPicture] = {}
        self._polled: dict[str, float] = {}

    def stored_pictures(self) -> dict[str, QuotaPicture]:
        """The pictures stored last (blocking: at start and reload, off the event loop)."""
        try:
            return load_quota_pictures(self._engine)
        except Exception as exc:  # the table may be missing on a store that was never migrated
            log.warning("could not read stored quota pictures: %s", failure(exc))
            return {}

    def seed(self, stored: Mapping[str, QuotaPicture]) -> None:
        """Give accounts that have no picture in memory the one stored last (see `stored_pictures`). Only a
        subscription account has one: an API key stored under the id of a subscription account removed before
        (whose picture an older build's `upstreams remove` left in the store) was held out as
        `insufficient_quota` until the old subscription's reset."""
        for upstream_id, picture in stored.items():
            state = self._pool.get(upstream_id)
            if state is not None and state.upstream.kind == OAUTH_KIND and state.quota is None:
                state.set_quota(picture)
                self._saved[upstream_id] = picture

    def forget(self, upstream_id: str) -> None:
        """The account holds another subscription now: its quota picture, and the park a rejected window of
        the old one took, are not this one's (it stayed parked for hours, 529s, until the picture went stale)."""
        state = self._pool.get(upstream_id)
        if state is not None:
            state.set_quota(None)
            lift_park(state.health, "insufficient_quota")
        self._saved.pop(upstream_id, None)
        self._polled.pop(upstream_id, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_SECONDS)
            try:
                await self.tick(time.monotonic(), time.time())
            except Exception as exc:  # bookkeeping must never stop the gateway
                log.warning("quota bookkeeping failed: %s", failure(exc))

    async def tick(self, now: float, wall: float) -> None:
        await self._signer.tokens.save_unsaved()
        for state in self._pool.states():
            if state.upstream.kind != OAUTH_KIND or not state.upstream.enabled:
                continue
            upstream_id = state.upstream.id
            if self._signer.account_state(upstream_id) == "needs_reauth":
                continue  # nothing to ask with until a new login (it was asked, and logged, every minute)
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
                    state.set_quota(merge_pictures(state.quota, polled))
                    if quota_blocked_until(state.quota, now) is None:
                        # Nothing is used up any more (a plan upgrade, extra usage bought): the park that the
                        # rejection's 429 took for its retry-after ends with it.
                        lift_park(state.health, "insufficient_quota")
            slot = warmup_slot(self._config, upstream_id, state.quota, wall)
            if slot is not None and self._warm_up is not None and slot > self._warmed.get(upstream_id, -math.inf):
                self._warmed[upstream_id] = slot  # at most one per slot, whatever the answer
                if await self._warm_up(upstream_id):
                    log.info("upstream %s: warm-up sent, its 5-hour window has started", upstream_id)
        await self.save()

    async def save(self) -> None:
        """Every subscription account's quota picture that changed since last saved (each tick, and at
        shutdown: a rejection learnt just before a restart would otherwise cost one more 429 after it)."""
        for state in self._pool.states():
            picture = state.quota
            upstream_id = state.upstream.id
            if (
                state.upstream.kind == OAUTH_KIND
                and picture is not None
                and self._saved.get(upstream_id) is not picture
            ):
                await asyncio.to_thread(save_quota_picture, self._engine, upstream_id, picture)
                self._saved[upstream_id] = picture

"""Reloading keys and upstreams from the store: what the config file and the CLI hold, read off the event
loop and swapped into the gateway's authn, signer, pool, quota pictures and billing channels at once, at
start and whenever the store's revision moves (`store.reload_interval_seconds`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import Engine

from poolgate.billing.book import ChannelBook, default_channel
from poolgate.config import GatewayConfig
from poolgate.lifecycle.authn import Authenticator
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.routing.filters import pin_problems
from poolgate.lifecycle.sign import Signer
from poolgate.store import repo
from poolgate.store.accounts import list_oauth_accounts
from poolgate.store.crypto import SecretBox, SecretBoxError
from poolgate.store.db import read_revision
from poolgate.store.writer_process import failure
from poolgate.upstreams.accounts import QuotaKeeper
from poolgate.upstreams.models import ModelCatalog
from poolgate.upstreams.pool import Pool
from poolgate.upstreams.quota import QuotaPicture

log = logging.getLogger("poolgate")


class StoreReload:
    """Takes the store's keys and upstreams into what the gateway routes and signs with; the gateway's
    model list (set once the gateway has started) is invalidated at each."""

    def __init__(
        self,
        config: GatewayConfig,
        engine: Engine,
        box: SecretBox,
        authn: Authenticator,
        signer: Signer,
        pool: Pool,
        quota_keeper: QuotaKeeper,
        book: ChannelBook,
    ) -> None:
        self.config = config
        self.engine = engine
        self.box = box
        self.authn = authn
        self.signer = signer
        self.pool = pool
        self.quota_keeper = quota_keeper
        self.book = book
        self.models: ModelCatalog | None = None
        self._revision = ""

    def reload(self) -> None:
        """Re-read keys and upstreams: the config file's plus those added with the CLI."""
        self._take(self._read_store())

    def _read_store(self) -> _StoreSnapshot:
        """What a reload takes from the store: the I/O part, which the reload loop runs in a thread. The
        revision is read first: a change committed while the rest is read is then newer than the snapshot
        says, and the next tick takes it (read last, it would be marked taken and lost until the next one)."""
        revision = read_revision(self.engine)
        stored: list[tuple[Upstream, str]] = []
        unreadable: list[str] = []
        for row in repo.list_upstreams(self.engine):
            try:
                stored.append((row.upstream, self.box.decrypt(row.secret)))
            except SecretBoxError:
                unreadable.append(row.upstream.id)
        return _StoreSnapshot(
            revision=revision,
            keys=repo.list_keys(self.engine),
            upstreams=stored,
            unreadable=unreadable,
            stale_grants={
                row.upstream.id: row.state_reason or "needs re-authentication"
                for row in list_oauth_accounts(self.engine)
                if row.state == "needs_reauth"
            },
            quota_pictures=self.quota_keeper.stored_pictures(),
        )

    def _take(self, snapshot: _StoreSnapshot) -> None:
        """Swap in what `_read_store` read, all at once on the event loop: a request never sees half a reload
        (in a thread, a reload let requests route to an account whose credential was not loaded yet)."""
        self.authn.load(snapshot.keys, [(key.name, key.key) for key in self.config.keys])
        for upstream_id in snapshot.unreadable:
            # One account left out, not the whole reload: it failed, and with it every key revoked since.
            log.error(
                "stored upstream %s is left out: its secret cannot be decrypted with this gateway's master key"
                " (it was stored with another one); remove it and add it again with this store's key",
                upstream_id,
            )
        upstreams = []
        secrets: dict[str, str] = {}
        for configured in self.config.upstreams:
            upstreams.append(configured.upstream())
            secrets[configured.id] = configured.api_key
        for upstream, secret in snapshot.upstreams:
            if upstream.id in secrets:
                log.warning("stored upstream %s is shadowed by the config file's upstream of that id", upstream.id)
                continue
            upstreams.append(upstream)
            secrets[upstream.id] = secret
        changes = self.signer.load(secrets, snapshot.stale_grants)
        self.pool.replace(upstreams, renewed=changes.rekeyed)
        for upstream_id in (*changes.resubscribed, *changes.rekeyed):  # another account's quota picture
            self.quota_keeper.forget(upstream_id)
        enabled = {upstream.id: upstream.enabled for upstream in upstreams}
        problems = pin_problems(self.config.routing.pins, enabled) + self.config.prices.unknown_upstreams(secrets)
        for problem in problems + self.config.oauth.warmup_problems(enabled):
            log.warning("%s", problem)
        channels = {upstream.id: default_channel(upstream.kind) for upstream in upstreams}
        channels.update({c.id: c.billing.build() for c in self.config.upstreams if c.billing is not None})
        self.book.configure(channels, self.config.prices.upstreams)
        self.quota_keeper.seed(snapshot.quota_pictures)
        if self.models is not None:
            self.models.invalidate()
        # Last: a reload that failed halfway is tried again on the next tick.
        self._revision = snapshot.revision

    async def reload_loop(self) -> None:
        interval = self.config.store.reload_interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                revision = await asyncio.to_thread(read_revision, self.engine)
                if revision != self._revision:
                    self._take(await asyncio.to_thread(self._read_store))
                    log.info("reloaded keys and upstreams (%d upstreams)", len(self.pool))
            except Exception as exc:
                log.warning("reloading keys and upstreams failed: %s", failure(exc))


@dataclass(frozen=True, slots=True)
class _StoreSnapshot:
    """Keys and upstreams as the store holds them, read off the event loop (see `StoreReload._read_store`)."""

    revision: str
    keys: list[repo.KeyRow]
    upstreams: list[tuple[Upstream, str]]  # stored upstreams with their decrypted secrets
    unreadable: list[str]  # stored upstreams whose secret this gateway's master key cannot decrypt
    stale_grants: dict[str, str]  # subscription accounts the store marks `needs_reauth`, with the reason
    quota_pictures: dict[str, QuotaPicture]

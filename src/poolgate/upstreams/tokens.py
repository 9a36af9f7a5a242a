"""Fresh access tokens for every subscription account: `TokenManager`, single flight per account.

Refresh tokens rotate: after a refresh the old one is dead. Two concurrent refreshes of the same token
mean one of them fails and, worse, a rotated pair that is not saved is lost for good. Hence:
- single flight per account: however many requests find the token expiring, one call reaches the token
  endpoint and everyone waits for (or, while the old token still works, does not wait for) its result;
- the new pair is persisted (through the `CredentialStore`) before the new access token is used;
- an `invalid_grant` first re-reads the stored pair (another gateway process may have rotated it) and only
  then marks the account `needs_reauth`;
- any other failure backs off exponentially and retries: only `invalid_grant` says the grant is dead (a
  proxy's 403, a mistyped token URL's 404 or an `invalid_client` is no reason to need a new login).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from poolgate.config import OAuthConfig
from poolgate.store.writer_process import failure
from poolgate.upstreams.oauth import (
    InvalidGrant,
    OAuthClient,
    OAuthCredentials,
    RefusedTokens,
    TokenClient,
    TokenEndpointError,
    another_subscription,
)

log = logging.getLogger("poolgate.oauth")
# The stored reason of an account whose token refresh keeps failing (its state stays `active`: it is usable
# again as soon as a refresh succeeds), which `accounts list` reads as the router's `refresh_failing`.
REFRESH_FAILING = "refresh failing"

AccountState = Literal["active", "refreshing", "needs_reauth"]
# Below this much remaining validity a request waits for the refresh instead of using the old token.
MIN_USABLE_SECONDS = 30.0
# A 401 this soon after a completed refresh is answered "retry" without refreshing again.
RECENT_REFRESH_SECONDS = 10.0
# A request waits this long at most for a token refresh (the token endpoint answers within a second): past it,
# it fails over and the account is out of routing as `refresh_failing` until the refresh ends. A token endpoint
# that hung held every request routed to the account for `oauth.request_timeout_seconds` (30 s) while other
# accounts sat idle.
MAX_REFRESH_WAIT_SECONDS = 5.0
# At most one refresh per account this often while its token is still usable (see `ensure_fresh`).
MIN_EARLY_REFRESH_INTERVAL_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 60.0
# How long a refresh token the endpoint refused waits for another process's save of the pair that replaced it
# (that process got its answer first and writes it at once): re-read after each of these pauses.
ROTATION_SAVE_WAITS = (0.0, 0.05, 0.15, 0.3, 0.5)


# ----- the token manager ----------------------------------------------------------------------------------


class NeedsReauth(Exception):
    """The account cannot get a working token without a person logging in again."""

    def __init__(self, account_id: str, reason: str) -> None:
        super().__init__(f"account {account_id} needs re-authentication: {reason}")
        self.account_id = account_id
        self.reason = reason


class RefreshUnavailable(Exception):
    """The access token has expired and the token endpoint cannot be reached for now (transient)."""

    def __init__(self, account_id: str, reason: str) -> None:
        super().__init__(f"account {account_id}: cannot refresh its token now: {reason}")
        self.account_id = account_id
        self.reason = reason


class CredentialStore(Protocol):
    """Where rotated credentials and account states are persisted (the database, for the gateway)."""

    async def load(self, account_id: str) -> OAuthCredentials | None: ...

    async def save(
        self, account_id: str, credentials: OAuthCredentials, over: OAuthCredentials | None = None
    ) -> OAuthCredentials | None:
        """Persist atomically, and mark the account active; with `over` (the pair a refresh started from), unless
        the store holds tokens that replaced it since (`replaced_since`): return those, write nothing."""

    async def set_state(self, account_id: str, state: AccountState, reason: str | None) -> None: ...

    async def mark_needs_reauth(
        self, account_id: str, reason: str, refused: OAuthCredentials
    ) -> OAuthCredentials | None:
        """Mark it `needs_reauth` unless another pair than `refused` is stored by now: return that pair."""


@dataclass(slots=True)
class ManagedAccount:
    id: str
    credentials: OAuthCredentials
    state: AccountState = "active"
    reason: str | None = None
    # Bumped on every new access token: a 401 for an older generation needs no second refresh.
    generation: int = 0
    flight: asyncio.Task[None] | None = None
    refreshed_at: float | None = None  # monotonic
    retry_at: float = 0.0  # monotonic: after transient failures ran out, no new attempt before this
    # Set by the refresh in flight when one of its attempts failed: requests stop waiting for it then
    # (they fail over) while it retries in the background.
    attempt_failed: asyncio.Event | None = None
    refresh_calls: int = 0
    # The generation whose access token the usage endpoint refused (403: a setup token has no `user:profile`
    # scope): it is not asked again with that token (it was every minute, for as long as the gateway ran).
    usage_refused: int | None = None
    # The generation an upstream answered 401 to: that token is dead whatever its expiry says.
    rejected: int | None = None
    # Its refresh is waiting to try again: no token call is on its way, nor a rotated pair to save.
    backing_off: bool = False
    # Its rotated pair is in memory only: the store refused it (busy longer than its timeout, every try). Saved
    # again every few seconds and at shutdown (`save_unsaved`): the stored refresh token is spent.
    unsaved: bool = False

    def token_dead(self, now: float) -> bool:
        """The access token cannot be used: an upstream rejected it, or it is (about to be) expired."""
        if self.rejected == self.generation:
            return True
        expires_at = self.credentials.expires_at
        return expires_at is not None and expires_at - now <= MIN_USABLE_SECONDS


class TokenManager:
    """Fresh access tokens for every subscription account, with single-flight refresh per account."""

    def __init__(
        self,
        config: OAuthConfig | None = None,
        client: TokenClient | None = None,
        store: CredentialStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config or OAuthConfig()
        self._client: TokenClient = client or OAuthClient(self.config)
        self.store = store
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._accounts: dict[str, ManagedAccount] = {}
        # Set by `aclose`: a refresh whose attempt fails then stops rather than back off and try again.
        self._closing = False
        # One save of rotated tokens at a time: a pair `save_unsaved` writes late must not land on a newer one a
        # refresh saves meanwhile (the older pair's refresh token is spent by then).
        self._saving = asyncio.Lock()

    def configure(
        self, config: OAuthConfig, store: CredentialStore | None = None, client: TokenClient | None = None
    ) -> None:
        """Late wiring (the gateway builds its signer before its store and HTTP session are ready)."""
        self.config = config
        if store is not None:
            self.store = store
        if client is not None:
            self._client = client
        elif isinstance(self._client, OAuthClient):
            self._client.config = config

    @property
    def client(self) -> TokenClient:
        return self._client

    async def aclose(self, grace: float = 0.0) -> None:
        """Stop, waiting up to `grace` seconds for the token calls in flight: the token endpoint may have rotated
        the grant already, and a new pair that is never saved leaves the account needing a new login. A refresh
        waiting to try again is ended at once, one still running at the end of `grace` then (each leaves the
        state it found)."""
        self._closing = True
        running = [flight for account in self._accounts.values() if (flight := account.flight) and not flight.done()]
        for account in self._accounts.values():
            if account.backing_off and account.flight is not None:
                account.flight.cancel()
        if running:
            _, unfinished = await asyncio.wait(running, timeout=grace)
            for flight in unfinished:
                flight.cancel()
            if unfinished:
                await asyncio.wait(unfinished)
        await self.save_unsaved()
        if isinstance(self._client, OAuthClient):
            await self._client.aclose()

    # ----- the account set ------------------------------------------------------------------------------

    def register(self, account_id: str, credentials: OAuthCredentials, reauth_reason: str | None = None) -> bool:
        """Add an account or take newer credentials for it (a reload from the store, a re-import); True when
        they are another subscription's than the account had (see `another_subscription`).

        An older version (a reload that read the store just before our own refresh saved) is ignored: it
        holds a refresh token that rotation has already killed. `reauth_reason`: the store says a new login
        is needed (found by this or another process before): a new account starts that way rather than
        spend a request and a token call to find out again.
        """
        account = self._accounts.get(account_id)
        if account is None:
            account = self._accounts[account_id] = ManagedAccount(account_id, credentials)
            if reauth_reason is not None:
                account.state, account.reason = "needs_reauth", reauth_reason
            return False
        current = account.credentials
        if credentials == current or credentials.obtained_at <= current.obtained_at:
            return False
        account.credentials = credentials
        account.generation += 1
        if credentials.refresh_token != current.refresh_token or credentials.access_token != current.access_token:
            # Somebody logged in again (or another process refreshed): a dead grant may live again.
            if account.state == "needs_reauth":
                account.state, account.reason = "active", None
            account.retry_at = 0.0
        return another_subscription(current, credentials)

    def retain(self, account_ids: Iterable[str]) -> None:
        keep = set(account_ids)
        for account_id in list(self._accounts):
            if account_id not in keep:
                account = self._accounts.pop(account_id)
                if account.flight is not None and not account.flight.done():
                    account.flight.cancel()

    def get(self, account_id: str) -> ManagedAccount | None:
        return self._accounts.get(account_id)

    def accounts(self) -> list[ManagedAccount]:
        return list(self._accounts.values())

    def __contains__(self, account_id: object) -> bool:
        return account_id in self._accounts

    # ----- freshness ------------------------------------------------------------------------------------

    async def ensure_fresh(self, account_id: str) -> None:
        """Return once the account has a usable access token; refresh (single flight) when due.

        Raises NeedsReauth when only a new login can help, RefreshUnavailable when the token has expired
        and the token endpoint keeps failing. A token inside the refresh margin but still valid is used
        at once while the refresh runs in the background.
        """
        account = self._accounts.get(account_id)
        if account is None:
            return
        if account.state == "needs_reauth":
            raise NeedsReauth(account_id, account.reason or "needs re-authentication")
        credentials = account.credentials
        now = self._clock()
        rejected = account.rejected == account.generation
        if not rejected and not credentials.needs_refresh(now, self.config.refresh_margin_seconds):
            return
        usable = credentials.expires_at is not None and not account.token_dead(now)
        if credentials.refresh_token is None:
            if credentials.expired(now):
                await self._mark_needs_reauth(account, "the access token expired and there is no refresh token")
                raise NeedsReauth(account_id, account.reason or "")
            return
        idle = account.flight is None or account.flight.done()
        if (
            usable
            and idle
            and account.refreshed_at is not None
            and self._monotonic() - account.refreshed_at < MIN_EARLY_REFRESH_INTERVAL_SECONDS
        ):
            # A margin as long as the tokens live (`refresh_margin_seconds` set for another provider) made every
            # request refresh a token it had just got: an early refresh waits for the last one to age.
            return
        if idle and self._monotonic() < account.retry_at:
            # Still backing off after the last round of transient failures.
            if usable:
                return
            raise RefreshUnavailable(account_id, account.reason or "the token endpoint keeps failing")
        flight = self._start_flight(account)
        if usable:
            return
        await self._await_flight(account, flight)

    def refresh_failing(self, account_id: str) -> bool:
        """The account's access token cannot be used and the token endpoint is failing for it (a refresh
        backing off, or waiting out `retry_at`): routing skips it rather than hold requests for it."""
        account = self._accounts.get(account_id)
        if account is None or account.state == "needs_reauth":
            return False
        failing = self._monotonic() < account.retry_at or (
            account.attempt_failed is not None
            and account.attempt_failed.is_set()
            and account.flight is not None
            and not account.flight.done()
        )
        return failing and account.token_dead(self._clock())

    async def _await_flight(self, account: ManagedAccount, flight: asyncio.Task[None]) -> None:
        """Wait for the refresh in flight, but not through its retries: once one of its attempts failed, or
        after `MAX_REFRESH_WAIT_SECONDS`, the request gives up on this account (RefreshUnavailable: it fails
        over, or gets a 529) while the refresh goes on in the background. A token-endpoint outage held every
        request for the whole series of retries (tens of seconds) before."""
        failed = account.attempt_failed
        if failed is None:
            try:
                await asyncio.shield(flight)
            except asyncio.CancelledError:
                _raise_if_removed(account, flight)
                raise
            return
        if not failed.is_set():
            waiter = asyncio.ensure_future(failed.wait())
            try:
                await asyncio.wait(
                    (flight, waiter), timeout=MAX_REFRESH_WAIT_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
            if not flight.done() and not failed.is_set():
                # Slow, as good as failing for the requests that need it: they go elsewhere while it goes on.
                failed.set()
                account.reason = f"the token endpoint has not answered in {MAX_REFRESH_WAIT_SECONDS:.0f} s"
                log.warning(
                    "oauth account %s: %s; its requests go to other accounts meanwhile", account.id, account.reason
                )
        if flight.done():
            _raise_if_removed(account, flight)
            flight.result()  # NeedsReauth / RefreshUnavailable, if that is how it ended
            return
        raise RefreshUnavailable(account.id, account.reason or "the token endpoint is failing; retrying")

    async def refresh_after_401(self, account_id: str, generation: int | None = None) -> bool:
        """An upstream rejected the account's access token: refresh once. True when a retry makes sense.

        `generation` is the one the rejected request was signed with: if a newer token exists already
        (another request refreshed meanwhile), retry with it without a second refresh.
        """
        account = self._accounts.get(account_id)
        if account is None or account.state == "needs_reauth":
            return False
        if generation is not None and generation != account.generation:
            return True
        if (
            generation is None
            and account.refreshed_at is not None
            and self._monotonic() - account.refreshed_at < RECENT_REFRESH_SECONDS
        ):
            return True
        # This token is dead until a refresh brings the next one (routing skips the account meanwhile when
        # the refresh fails: `refresh_failing`), whatever its expiry time says.
        account.rejected = account.generation
        if account.credentials.refresh_token is None:
            await self._mark_needs_reauth(
                account, "the upstream rejected the access token and there is no refresh token"
            )
            return False
        if (account.flight is None or account.flight.done()) and self._monotonic() < account.retry_at:
            return False  # still backing off after the last round of failures: no new round per 401
        flight = self._start_flight(account)
        try:
            await self._await_flight(account, flight)
        except (NeedsReauth, RefreshUnavailable):
            return False
        return True

    def _start_flight(self, account: ManagedAccount) -> asyncio.Task[None]:
        if account.flight is None or account.flight.done():
            account.attempt_failed = asyncio.Event()
            account.flight = asyncio.get_running_loop().create_task(
                self._refresh(account), name=f"poolgate-oauth-refresh-{account.id}"
            )
            # A background (proactive) refresh may fail with nobody awaiting it; its outcome is already in
            # the account's state and the logs, so retrieve the exception to keep asyncio quiet.
            account.flight.add_done_callback(_consume)
        return account.flight

    async def _refresh(self, account: ManagedAccount) -> None:
        found = account.state, account.reason
        account.state, account.reason = "refreshing", None
        await self._set_stored_state(account, "refreshing", None)
        try:
            await self._refresh_attempts(account)
        except asyncio.CancelledError:
            # Ended unfinished (a shutdown past its grace, the account removed): `refreshing` would stay in
            # the store, and on `accounts list`, for good.
            account.state, account.reason = found
            await self._set_stored_state(account, *found)
            raise

    async def _refresh_attempts(self, account: ManagedAccount) -> None:
        attempt = 0
        adopted_once = False
        while True:
            used = account.credentials
            if used.refresh_token is None:
                await self._mark_needs_reauth(account, "no refresh token")
                raise NeedsReauth(account.id, account.reason or "")
            account.refresh_calls += 1
            try:
                response = await self._client.refresh(used.refresh_token)
            except InvalidGrant as exc:
                # Another process sharing the store may have used this refresh token up a moment ago: its
                # new pair is what to take, once it has saved it, instead of giving up on the account.
                stored = None if adopted_once else await self._rotated_elsewhere(account.id, used)
                if stored is None:
                    stored = await self._mark_needs_reauth(account, f"refresh failed: {exc}", refused=used)
                    if stored is None:
                        raise NeedsReauth(account.id, account.reason or "") from None
                adopted_once = True
                if await self._adopt(account, stored, "adopted credentials rotated by another process"):
                    return
                continue
            except TokenEndpointError as exc:
                if isinstance(exc, RefusedTokens) and exc.refresh_token not in (None, used.refresh_token):
                    await self._keep_refresh_token(account, exc.refresh_token)
                attempt += 1
                delay = self._backoff(attempt)
                if attempt > self.config.refresh_retries or self._closing:
                    account.state, account.reason = "active", f"{REFRESH_FAILING}: {exc}"
                    account.retry_at = self._monotonic() + delay
                    # Stored before the requests waiting on the refresh are let go (by its end, not by
                    # `attempt_failed`): let go first, they and `accounts list` found no reason yet.
                    await self._set_stored_state(account, "active", account.reason)
                    log.warning(
                        "oauth account %s: token refresh failed %d times (%s); next try in %.0fs",
                        account.id,
                        attempt,
                        exc,
                        delay,
                    )
                    raise RefreshUnavailable(account.id, str(exc)) from None
                if attempt == 1 and account.token_dead(self._clock()):
                    # Out of routing from here on (`refresh_failing`): `accounts list` said "refreshing" through
                    # the retries, ~15 s by default, while the gateway had the account out. Stored before the
                    # requests waiting are let go, as at the end of the retries.
                    account.reason = f"{REFRESH_FAILING}: {exc}"
                    await self._set_stored_state(account, "refreshing", account.reason)
                if account.attempt_failed is not None:
                    account.attempt_failed.set()
                log.info("oauth account %s: token refresh failed (%s); retrying in %.1fs", account.id, exc, delay)
                account.backing_off = True
                try:
                    await self._sleep(delay)
                finally:
                    account.backing_off = False
                continue
            new = used.rotated(response, self._clock())
            # Persist before use: the old refresh token is dead now, and losing the new one would strand
            # the account at the next restart.
            replaced = await self._persist(account, new, used)
            if replaced is not None:
                if await self._adopt(
                    account, replaced, "its tokens were replaced while it refreshed: the new ones are used"
                ):
                    return
                continue
            account.credentials = new
            account.generation += 1
            account.refreshed_at = self._monotonic()
            self._activate(account)
            log.info("oauth account %s: access token refreshed", account.id)
            return

    async def _adopt(self, account: ManagedAccount, stored: OAuthCredentials, why: str) -> bool:
        """Take the pair the store holds instead of the refresh's; True when it is usable as it is (else the
        refresh goes on with it)."""
        account.credentials = stored
        account.generation += 1
        log.info("oauth account %s: %s", account.id, why)
        if stored.needs_refresh(self._clock(), self.config.refresh_margin_seconds):
            return False
        self._activate(account)
        await self._set_stored_state(account, "active", None)
        return True

    async def _keep_refresh_token(self, account: ManagedAccount, refresh_token: str) -> None:
        """The token endpoint rotated the grant but answered an access token the gateway refuses: the new refresh
        token is saved as a rotated pair is, with the access token the account had (dropped, the next refresh
        presented the spent one and the account needed a new login). The refresh goes on as a failed one."""
        kept = dataclasses.replace(account.credentials, refresh_token=refresh_token, obtained_at=self._clock())
        if await self._persist(account, kept, account.credentials) is not None:
            return  # replaced meanwhile: the refresh goes on, and adopts the new tokens at its next save or refusal
        account.credentials = kept
        await self._set_stored_state(account, "refreshing", None)  # saving marked it active

    def _activate(self, account: ManagedAccount) -> None:
        account.state, account.reason, account.retry_at = "active", None, 0.0

    def _backoff(self, attempt: int) -> float:
        base = self.config.refresh_backoff_seconds * (2 ** (attempt - 1))
        # Jitter: several accounts failing together (a token-endpoint outage) should not retry in lockstep.
        return min(MAX_BACKOFF_SECONDS, base) * random.uniform(0.8, 1.2)

    async def _persist(
        self, account: ManagedAccount, credentials: OAuthCredentials, over: OAuthCredentials
    ) -> OAuthCredentials | None:
        """Save the pair a refresh of `over` brought; None once saved (or kept in memory when the store refuses
        it), else the tokens that replaced `over` in the store since (see `CredentialStore.save`)."""
        if self.store is None:
            return None
        for attempt in range(3):
            try:
                async with self._saving:
                    replaced = await self.store.save(account.id, credentials, over)
                account.unsaved = False
                return replaced
            except Exception as exc:
                log.error("oauth account %s: saving the rotated tokens failed (%s)", account.id, failure(exc))
                await self._sleep(0.05 * (attempt + 1))
        # The old pair is dead upstream: the new one is used from memory, and saved as soon as the store takes it
        # (it was never tried again: a restart found the spent refresh token, and the account needed a new login).
        account.unsaved = True
        log.error(
            "oauth account %s: rotated tokens kept in memory until the store takes them (tried again every few "
            "seconds and at shutdown; a gateway killed before then leaves the account needing a new login)",
            account.id,
        )
        return None

    async def save_unsaved(self) -> None:
        """Save each rotated pair the store refused when it came (see `ManagedAccount.unsaved`), unless the store
        holds newer tokens by now (a re-import, a login: those are the account's)."""
        if self.store is None:
            return
        for account in self.accounts():
            if not account.unsaved:
                continue
            async with self._saving:
                credentials = account.credentials
                if not account.unsaved:  # a refresh saved newer ones meanwhile
                    continue
                try:
                    # Not over newer tokens (a re-import, a login): those are the account's, the reload takes them.
                    await self.store.save(account.id, credentials, credentials)
                except Exception as exc:
                    log.warning("oauth account %s: the rotated tokens are still unsaved (%s)", account.id, failure(exc))
                    continue
            if account.credentials is credentials:
                account.unsaved = False
                log.info("oauth account %s: the rotated tokens kept in memory are saved", account.id)

    async def _load_stored(self, account_id: str) -> OAuthCredentials | None:
        if self.store is None:
            return None
        try:
            return await self.store.load(account_id)
        except Exception as exc:
            log.warning("oauth account %s: re-reading stored credentials failed (%s)", account_id, failure(exc))
            return None

    async def _rotated_elsewhere(self, account_id: str, used: OAuthCredentials) -> OAuthCredentials | None:
        """The pair another process stored after rotating `used` (the token endpoint refused its refresh
        token to us because that process had used it), waiting a moment for the save to land."""
        if self.store is None:
            return None
        for wait in ROTATION_SAVE_WAITS:
            if wait:
                await self._sleep(wait)
            stored = await self._load_stored(account_id)
            if stored is not None and stored.refresh_token and stored.refresh_token != used.refresh_token:
                return stored
        return None

    async def _set_stored_state(self, account: ManagedAccount, state: AccountState, reason: str | None) -> None:
        if self.store is None:
            return
        try:
            await self.store.set_state(account.id, state, reason)
        except Exception as exc:  # the state is for display; never fail a refresh over it
            log.warning("oauth account %s: saving its state failed (%s)", account.id, failure(exc))

    async def _mark_needs_reauth(
        self, account: ManagedAccount, reason: str, refused: OAuthCredentials | None = None
    ) -> OAuthCredentials | None:
        """Out of routing until a new login. When the token endpoint refused the `refused` pair, the store is
        marked only if it still holds that pair; else the pair it holds (rotated by another process) is
        returned and nothing is marked."""
        if refused is not None and self.store is not None:
            try:
                rotated = await self.store.mark_needs_reauth(account.id, reason, refused)
            except Exception as exc:  # the state is for display; never fail a refresh over it
                log.warning("oauth account %s: saving its state failed (%s)", account.id, failure(exc))
                rotated = None
            if rotated is not None:
                return rotated
        account.state, account.reason = "needs_reauth", reason
        log.warning(
            "oauth account %s needs re-authentication (%s): it is out of routing until "
            "`poolgate accounts login --id %s --replace` or a re-import",
            account.id,
            reason,
            account.id,
        )
        if refused is None:
            await self._set_stored_state(account, "needs_reauth", reason)
        return None


def _raise_if_removed(account: ManagedAccount, flight: asyncio.Task[None]) -> None:
    """A refresh cancelled while a request waited for it, not the request itself: a reload removed the
    account (see `retain`). The request fails over rather than end as if its own client had left."""
    task = asyncio.current_task()
    if flight.cancelled() and (task is None or not task.cancelling()):
        raise RefreshUnavailable(account.id, "the account was removed while its token was being refreshed")


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()

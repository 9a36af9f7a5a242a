"""sign: `ShapedRequest` → `SignedRequest`. The only place that holds or applies upstream credentials.

- `anthropic_api_key` upstreams: `x-api-key`. Synchronous and allocation-light: it is on the hot path.
- `anthropic_oauth` upstreams (Claude subscriptions): `Authorization: Bearer <access token>`, the OAuth
  beta merged into `anthropic-beta`, and the subscription dialect applied to the body (Claude Code's
  identity block for clients that are not Claude Code; Claude Code's own requests pass byte for byte).
  Their tokens are kept fresh by the `TokenManager`: the relay awaits `prepare()` before `sign()` and
  calls `refresh_after_401()` when an upstream rejects a token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from poolgate.config import OAuthConfig
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.shape import ShapedRequest
from poolgate.upstreams.dialects import anthropic_oauth
from poolgate.upstreams.oauth import OAuthClient, OAuthCredentials, TokenEndpointError, looks_like_oauth_secret
from poolgate.upstreams.quota import QuotaPicture, parse_usage_response
from poolgate.upstreams.tokens import (
    AccountState,
    CredentialStore,
    NeedsReauth,
    RefreshUnavailable,
    TokenManager,
)

log = logging.getLogger("poolgate.sign")

_SEAL = object()
OAUTH_KIND = "anthropic_oauth"

__all__ = [
    "MissingCredential",
    "NeedsReauth",
    "RefreshUnavailable",
    "SignedRequest",
    "Signer",
]


class SignedRequest(msgspec.Struct, frozen=True, gc=False):
    """A request ready to send. Only `Signer.sign` can make one (the sealed-capability rule)."""

    shaped: ShapedRequest
    headers: tuple[tuple[str, str], ...]
    seal: object
    # Which access token of an OAuth account signed it: a 401 for an older one needs no second refresh.
    credential_generation: int = 0

    def __post_init__(self) -> None:
        if self.seal is not _SEAL:
            raise TypeError("a SignedRequest can only be made by the Signer")

    def credential(self) -> str:
        """The account's secret this request carries (its API key, or its bearer token), to keep out of what
        an upstream's answer passes on to the caller: looked up (from the end, where the signer puts it), not
        kept."""
        for name, value in reversed(self.headers):
            if name == "x-api-key":
                return value
            if name == "authorization":
                return value.removeprefix("Bearer ")
        return ""

    def __repr__(self) -> str:  # never print the credential
        return f"SignedRequest(upstream={self.shaped.upstream.id!r}, url={self.shaped.url!r})"

    def __rich_repr__(self) -> list[tuple[str, str]]:
        """rich (the CLI's tracebacks and pretty-printing) asks this rather than `__repr__`: the same two
        fields, never the headers."""
        return [("upstream", self.shaped.upstream.id), ("url", self.shaped.url)]


class MissingCredential(Exception):
    pass


@dataclass(frozen=True)
class CredentialChanges:
    """What a `Signer.load` changed for the accounts it already had."""

    # OAuth accounts now holding another subscription's tokens (see `another_subscription`).
    resubscribed: list[str]
    # Accounts given another API key (`upstreams remove` and `add` of one id between two reloads, to replace a
    # revoked key): another account, whose predecessor's failures and parks say nothing of it.
    rekeyed: list[str]


class Signer:
    def __init__(self, oauth: OAuthConfig | None = None, store: CredentialStore | None = None) -> None:
        self._api_keys: dict[str, str] = {}
        self._keys_held: frozenset[str] = frozenset()
        # OAuth accounts whose tokens are managed (refreshable, from the store); config-file OAuth upstreams
        # carry a long-lived token and stay in `_api_keys`.
        self.tokens = TokenManager(oauth, store=store)

    def configure_oauth(self, config: OAuthConfig, store: CredentialStore | None = None) -> None:
        """Where refreshed tokens go and which token endpoint to call. Without a store, rotated refresh
        tokens live only in memory: fine for tests, wrong for a gateway (they would be lost on restart)."""
        self.tokens.configure(config, store)

    def load(self, api_keys: Mapping[str, str], needs_reauth: Mapping[str, str] | None = None) -> CredentialChanges:
        """Credentials by upstream id: API keys, bare OAuth tokens, or stored OAuth credential documents.
        `needs_reauth`: the stored accounts the store marks so, with the reason. Returns what changed for the
        accounts it had before."""
        plain: dict[str, str] = {}
        managed: list[str] = []
        resubscribed: list[str] = []
        for upstream_id, secret in api_keys.items():
            if looks_like_oauth_secret(secret):
                try:
                    credentials = OAuthCredentials.from_secret(secret)
                except ValueError as exc:
                    log.warning("upstream %s: stored OAuth credentials are unreadable (%s)", upstream_id, exc)
                    continue
                if self.tokens.register(upstream_id, credentials, (needs_reauth or {}).get(upstream_id)):
                    resubscribed.append(upstream_id)
                managed.append(upstream_id)
            else:
                plain[upstream_id] = secret
        self.tokens.retain(managed)
        rekeyed = [upstream_id for upstream_id, key in plain.items() if self._api_keys.get(upstream_id, key) != key]
        self._api_keys = plain
        self._keys_held = frozenset(plain.values())
        return CredentialChanges(resubscribed, rekeyed)

    def holds(self, text: str) -> bool:
        """Whether `text` is an account's API key (or a config file's subscription token) this signer holds."""
        return text in self._keys_held

    # ----- the hot path ----------------------------------------------------------------------------------

    def sign(self, shaped: ShapedRequest) -> SignedRequest:
        upstream = shaped.upstream
        if upstream.kind != OAUTH_KIND:
            key = self._api_keys.get(upstream.id)
            if key is None:
                raise MissingCredential(upstream.id)
            return SignedRequest(shaped, (*shaped.headers, ("x-api-key", key)), _SEAL)
        account = self.tokens.get(upstream.id)
        token: str | None
        if account is not None:
            token, generation = account.credentials.access_token, account.generation
        else:
            token, generation = self._api_keys.get(upstream.id), 0
            if token is None:
                raise MissingCredential(upstream.id)
        if shaped.method == "POST" and shaped.body:
            body = anthropic_oauth.apply_identity(shaped.body, shaped.system)
            if body is not shaped.body:
                shaped = msgspec.structs.replace(shaped, body=body)
        return SignedRequest(shaped, anthropic_oauth.oauth_headers(shaped.headers, token), _SEAL, generation)

    async def prepare(self, upstream_id: str) -> None:
        """Make sure the upstream's credential is usable before `sign()`. Instant for API keys and for OAuth
        tokens far from expiry; otherwise one refresh per account however many requests wait (single
        flight). Raises `NeedsReauth` (the account is out until someone logs in again) or
        `RefreshUnavailable` (the token expired and the token endpoint keeps failing)."""
        if upstream_id in self.tokens:
            await self.tokens.ensure_fresh(upstream_id)

    async def refresh_after_401(self, upstream_id: str, signed: SignedRequest | None = None) -> bool:
        """An upstream answered 401 to a request signed for this account: refresh once (joining a refresh
        already running). True when retrying the same request on this account makes sense."""
        generation = signed.credential_generation if signed is not None else None
        return await self.tokens.refresh_after_401(upstream_id, generation)

    def account_state(self, upstream_id: str) -> AccountState | None:
        """active / refreshing / needs_reauth for a managed OAuth account; None for anything else."""
        account = self.tokens.get(upstream_id)
        return account.state if account is not None else None

    def unusable_reason(self, upstream_id: str) -> str | None:
        """Why routing should skip the account's credential: `needs_reauth` (only a new login helps),
        `refresh_failing` (its token is expired and the token endpoint keeps failing); else None. Cheap:
        call it per candidate."""
        account = self.tokens.get(upstream_id)
        if account is None:
            return None
        if account.state == "needs_reauth":
            return "needs_reauth"
        if self.tokens.refresh_failing(upstream_id):
            return "refresh_failing"
        return None

    # ----- subscription usage endpoint -------------------------------------------------------------------

    def usage_url(self, upstream: Upstream) -> str:
        url = self.tokens.config.usage_url
        return upstream.base_url + url if url.startswith("/") else url

    async def fetch_usage(self, upstream: Upstream, mono: float, wall: float) -> QuotaPicture | None:
        """The account's quota from the subscription usage endpoint; None when it cannot say (setup tokens
        get 403 there, API keys have no such thing). Callers rate-limit it (see `should_poll_usage`)."""
        if upstream.id not in self.tokens:
            return None
        client = self.tokens.client
        if not isinstance(client, OAuthClient):
            return None
        url = self.usage_url(upstream)
        account = self.tokens.get(upstream.id)
        if account is None or account.usage_refused == account.generation:
            return None
        try:
            await self.tokens.ensure_fresh(upstream.id)
            account = self.tokens.get(upstream.id)
            if account is None:
                return None
            try:
                payload = await client.fetch_usage(url, account.credentials.access_token)
            except TokenEndpointError as exc:
                # A token the upstream revoked before its time (another login of the account's): refreshed once,
                # as a request's 401 is. Never refreshed here, a parked account stayed out for its window's whole
                # length, however much room the endpoint would have reported meanwhile.
                if exc.status != 401 or not await self.tokens.refresh_after_401(upstream.id, account.generation):
                    raise
                account = self.tokens.get(upstream.id)
                if account is None:
                    return None
                payload = await client.fetch_usage(url, account.credentials.access_token)
        except (NeedsReauth, RefreshUnavailable, TokenEndpointError) as exc:
            if isinstance(exc, TokenEndpointError) and exc.status == 403 and account is not None:
                account.usage_refused = account.generation
                log.info(
                    "upstream %s: the usage endpoint refuses its token (%s; a setup token's scope does not cover it): "
                    "its quota is read from its answers only, until it has another token",
                    upstream.id,
                    exc,
                )
                return None
            log.info("upstream %s: usage endpoint not available (%s)", upstream.id, exc)
            return None
        return parse_usage_response(payload, mono, wall)

    async def aclose(self, grace: float = 0.0) -> None:
        """Stop, after the token refreshes in flight have ended (waiting up to `grace` seconds for them)."""
        await self.tokens.aclose(grace)

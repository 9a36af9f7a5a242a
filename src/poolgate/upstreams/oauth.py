"""Claude subscription (Pro/Max) accounts: the OAuth credential model, PKCE login, and the calls to the
token and usage endpoints. `upstreams/tokens.py` keeps the tokens fresh (`TokenManager`).

The URLs, client id and scopes come from `OAuthConfig`, whose defaults are what Claude Code uses
(`reference/subscriptions.md`); none of it is an official contract, so parsing is defensive.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp
import orjson

from poolgate.config import OAuthConfig
from poolgate.store.writer_process import failure
from poolgate.telemetry.logging import without_credential
from poolgate.upstreams.connections import read_up_to
from poolgate.upstreams.quota import iso_epoch

log = logging.getLogger("poolgate.oauth")

SECRET_TYPE = "anthropic_oauth"


# ----- credentials ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OAuthCredentials:
    """One subscription account's tokens. `expires_at` is epoch seconds; None = unknown / never (setup tokens)."""

    access_token: str
    refresh_token: str | None
    expires_at: float | None
    scopes: tuple[str, ...] = ()
    subscription_type: str | None = None
    label: str | None = None  # the account's e-mail when the token endpoint said it
    account_uuid: str | None = None
    organization_uuid: str | None = None
    # When these tokens were obtained: orders two versions of one account's credentials (newest wins).
    obtained_at: float = 0.0

    def __repr__(self) -> str:  # never print a token
        return (
            f"OAuthCredentials(label={self.label!r}, subscription_type={self.subscription_type!r}, "
            f"expires_at={self.expires_at!r}, scopes={self.scopes!r})"
        )

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def needs_refresh(self, now: float, margin: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at - margin

    def to_secret(self) -> str:
        """The JSON document stored encrypted in the upstream's secret column."""
        return orjson.dumps(
            {
                "type": SECRET_TYPE,
                "v": 1,
                "access_token": self.access_token,
                "refresh_token": self.refresh_token,
                "expires_at": self.expires_at,
                "scopes": list(self.scopes),
                "subscription_type": self.subscription_type,
                "label": self.label,
                "account_uuid": self.account_uuid,
                "organization_uuid": self.organization_uuid,
                "obtained_at": self.obtained_at,
            }
        ).decode()

    @classmethod
    def from_secret(cls, text: str) -> OAuthCredentials:
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ValueError("not an OAuth credentials document") from None
        if not isinstance(data, dict) or data.get("type") != SECRET_TYPE:
            raise ValueError("not an OAuth credentials document")
        return cls(
            access_token=_required_str(data, "access_token"),
            refresh_token=_optional_str(data.get("refresh_token")),
            expires_at=_optional_float(data.get("expires_at")),
            scopes=_scopes(data.get("scopes")),
            subscription_type=_optional_str(data.get("subscription_type")),
            label=_optional_str(data.get("label")),
            account_uuid=_optional_str(data.get("account_uuid")),
            organization_uuid=_optional_str(data.get("organization_uuid")),
            obtained_at=_optional_float(data.get("obtained_at")) or 0.0,
        )

    def rotated(self, response: TokenResponse, now: float) -> OAuthCredentials:
        """The credentials after a refresh; a response without a new refresh token keeps the old one."""
        return replace(
            self,
            access_token=response.access_token,
            refresh_token=response.refresh_token or self.refresh_token,
            expires_at=response.expires_at(now),
            scopes=response.scopes or self.scopes,
            label=response.account_email or self.label,
            account_uuid=response.account_uuid or self.account_uuid,
            organization_uuid=response.organization_uuid or self.organization_uuid,
            subscription_type=response.subscription_type or self.subscription_type,
            obtained_at=now,
        )


def looks_like_oauth_secret(secret: str) -> bool:
    """API keys never start with `{`; stored OAuth accounts are JSON documents."""
    return secret.startswith("{") and f'"type":"{SECRET_TYPE}"' in secret


def _required_str(data: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = data.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise ValueError(f"missing {names[0]}")


def _optional_str(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _object(value: object) -> Mapping[str, Any]:
    """A JSON object's fields; none for anything else (a document's optional `account`, say)."""
    return value if isinstance(value, dict) else {}


def _check_token(token: str | None, field: str) -> None:
    """A token goes into a request header (or a token call's body): one holding a control character (a line
    break pasted inside it) made every request routed to its account fail in the gateway. Refused, never
    shown."""
    if token is not None and any(char < " " or char == "\x7f" for char in token):
        raise ValueError(f"{field}: holds a control character (a line break?), which no token has")


def _optional_float(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


# Further ahead than any access token lives: a number this far out is in another unit, or wrong.
MAX_EXPIRY_AHEAD_SECONDS = 5 * 365 * 86400


def _expiry(value: object, now: float) -> float | None:
    """An imported token's expiry: epoch seconds or milliseconds (Claude Code writes milliseconds), or an
    ISO 8601 time. A value that is none of these is an error, not "no expiry known" (which it read as)."""
    if value is None:
        return None
    expires_at = _optional_float(value)
    if expires_at is None:
        expires_at = iso_epoch(value)
    elif expires_at > 1e11:
        expires_at /= 1000.0
    if expires_at is None or expires_at <= 0:
        raise ValueError(f"expiresAt: expected epoch seconds or milliseconds or an ISO 8601 time, got {value!r}")
    if expires_at > now + MAX_EXPIRY_AHEAD_SECONDS:
        raise ValueError(f"expiresAt: {value!r} is more than five years ahead: not a token's expiry")
    return expires_at


def _scopes(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part for part in value.split() if part)
    if isinstance(value, list | tuple):
        return tuple(str(part) for part in value if isinstance(part, str) and part)
    return ()


def credentials_from_document(document: object, now: float | None = None) -> OAuthCredentials:
    """Credentials from what a user can hand to `poolgate accounts import`:

    - Claude Code's `~/.credentials.json`: `{"claudeAiOauth": {"accessToken", "refreshToken",
      "expiresAt" (ms epoch), "scopes", "subscriptionType"}}` (or that inner object alone);
    - a token pair: `{"access_token", "refresh_token", "expires_at" (s or ms epoch) | "expires_in"}`,
      e.g. a token endpoint's answer.

    Raises ValueError with what is missing.
    """
    now = time.time() if now is None else now
    if not isinstance(document, dict):
        raise ValueError("expected a JSON object")
    data = document.get("claudeAiOauth", document)
    if not isinstance(data, dict):
        raise ValueError("claudeAiOauth is not an object")
    access = _required_str(data, "accessToken", "access_token")
    refresh = _optional_str(data.get("refreshToken", data.get("refresh_token")))
    _check_token(access, "access_token")
    _check_token(refresh, "refresh_token")
    expires_at = _expiry(data.get("expiresAt", data.get("expires_at")), now)
    if expires_at is None:
        given = data.get("expires_in", data.get("expiresIn"))
        expires_in = _optional_float(given)
        if given is not None and expires_in is None:
            raise ValueError(f"expires_in: expected seconds, got {given!r}")
        if expires_in is not None and expires_in > MAX_EXPIRY_AHEAD_SECONDS:
            raise ValueError(f"expires_in: {given!r} is more than five years: not a token's lifetime")
        if expires_in is not None:
            expires_at = now + expires_in
    account, organization = _object(data.get("account")), _object(data.get("organization"))
    return OAuthCredentials(
        access_token=access,
        refresh_token=refresh,
        expires_at=expires_at,
        scopes=_scopes(data.get("scopes", data.get("scope"))),
        subscription_type=_optional_str(data.get("subscriptionType", data.get("subscription_type"))),
        label=_optional_str(account.get("email_address") or account.get("email")),
        account_uuid=_optional_str(account.get("uuid")),
        organization_uuid=_optional_str(organization.get("uuid")),
        obtained_at=now,
    )


def replaced_since(stored: OAuthCredentials | None, base: OAuthCredentials) -> bool:
    """Whether `stored` are other tokens than `base`, obtained after them: a re-import or a new login since a
    refresh of `base` began, which the pair the refresh brings (the old tokens' rotated ones) must not overwrite.
    A stored pair obtained before `base` is one `base` rotated already (a save the store refused, see
    `TokenManager.save_unsaved`)."""
    return (
        stored is not None
        and (stored.access_token, stored.refresh_token) != (base.access_token, base.refresh_token)
        and stored.obtained_at > base.obtained_at
    )


def another_subscription(old: OAuthCredentials, new: OAuthCredentials) -> bool:
    """Whether `new` are another subscription's tokens than `old` (a login under an existing id as someone
    else): by the account uuid when both name one, else by the e-mail, or by an organization both name."""
    if old.account_uuid is not None and new.account_uuid is not None:
        differs = old.account_uuid != new.account_uuid
    else:
        differs = old.label is not None and new.label is not None and old.label != new.label
    organizations = old.organization_uuid, new.organization_uuid
    return differs or (None not in organizations and organizations[0] != organizations[1])


def credentials_document(credentials: OAuthCredentials) -> dict[str, object]:
    """The credentials as a token pair that `credentials_from_document` reads back as them."""
    return {
        "access_token": credentials.access_token,
        "refresh_token": credentials.refresh_token,
        "expires_at": credentials.expires_at,
        "scopes": list(credentials.scopes),
        "subscription_type": credentials.subscription_type,
        "account": {"uuid": credentials.account_uuid, "email_address": credentials.label},
        "organization": {"uuid": credentials.organization_uuid},
    }


# ----- PKCE and the authorize URL -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PkcePair:
    verifier: str
    challenge: str
    method: str = "S256"


def s256_challenge(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier))), no padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pkce() -> PkcePair:
    # 64 random bytes → 86 URL-safe characters, inside RFC 7636's 43–128.
    verifier = secrets.token_urlsafe(64)
    return PkcePair(verifier, s256_challenge(verifier))


def new_state() -> str:
    return secrets.token_urlsafe(32)


def authorize_url(config: OAuthConfig, pkce: PkcePair, state: str) -> str:
    query = {
        "code": "true",  # the copy-paste flow: the callback page shows `code#state`
        "client_id": config.client_id,
        "response_type": "code",
        "redirect_uri": config.redirect_uri,
        "scope": " ".join(config.scopes),
        "code_challenge": pkce.challenge,
        "code_challenge_method": pkce.method,
        "state": state,
    }
    separator = "&" if "?" in config.authorize_url else "?"
    return config.authorize_url + separator + urlencode(query)


def parse_pasted_code(pasted: str, expected_state: str) -> str:
    """The code from what the callback page showed (`code#state`, or the bare code); checks the state."""
    text = pasted.strip()
    if "code=" in text and ("?" in text or "&" in text):  # a whole callback URL was pasted
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(text)
        params = parse_qs(parts.query)
        code = (params.get("code") or [""])[0]
        state = (params.get("state") or [parts.fragment or ""])[0]
    else:
        code, _, state = text.partition("#")
    code = code.strip()
    if not code:
        raise ValueError("no authorization code was pasted")
    if state and state.strip() != expected_state:
        raise ValueError("the pasted state does not match this login (an old or foreign code?)")
    return code


# ----- the token endpoint ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenResponse:
    access_token: str
    refresh_token: str | None
    expires_in: float | None
    scopes: tuple[str, ...] = ()
    account_uuid: str | None = None
    account_email: str | None = None
    organization_uuid: str | None = None
    subscription_type: str | None = None

    def __repr__(self) -> str:
        return f"TokenResponse(expires_in={self.expires_in!r}, scopes={self.scopes!r})"

    @classmethod
    def parse(cls, payload: object) -> TokenResponse:
        if not isinstance(payload, dict):
            raise ValueError("the token endpoint answered something other than a JSON object")
        account, organization = _object(payload.get("account")), _object(payload.get("organization"))
        access, refresh = _required_str(payload, "access_token"), _optional_str(payload.get("refresh_token"))
        _check_token(access, "access_token")
        _check_token(refresh, "refresh_token")
        return cls(
            access_token=access,
            refresh_token=refresh,
            expires_in=_optional_float(payload.get("expires_in")),
            scopes=_scopes(payload.get("scope")),
            account_uuid=_optional_str(account.get("uuid")),
            account_email=_optional_str(account.get("email_address") or account.get("email")),
            organization_uuid=_optional_str(organization.get("uuid")),
            subscription_type=_optional_str(payload.get("subscription_type")),
        )

    def expires_at(self, now: float) -> float | None:
        """When the access token expires. A lifetime past any token's (a broken endpoint's `1e300`, which
        `accounts list` could not show) is taken as the longest one plausible; none that is not positive is
        known (as expired at once, it would be refreshed again and again)."""
        if self.expires_in is None or self.expires_in <= 0:
            return None
        return now + min(self.expires_in, MAX_EXPIRY_AHEAD_SECONDS)

    def credentials(self, now: float, subscription_type: str | None = None) -> OAuthCredentials:
        return OAuthCredentials(
            access_token=self.access_token,
            refresh_token=self.refresh_token,
            expires_at=self.expires_at(now),
            scopes=self.scopes,
            subscription_type=subscription_type or self.subscription_type,
            label=self.account_email,
            account_uuid=self.account_uuid,
            organization_uuid=self.organization_uuid,
            obtained_at=now,
        )


class TokenEndpointError(Exception):
    """A token call that failed. Only its subclass `InvalidGrant` says the grant is dead: any other failure
    (a network error, a 5xx, but also a proxy's 403 or a mistyped URL's 404) says nothing about the grant and
    is worth retrying."""

    def __init__(self, message: str, *, status: int | None = None, error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class RefusedTokens(TokenEndpointError):
    """A 200 whose tokens the gateway refuses. `refresh_token`: the well-formed one it rotated the grant to, if
    any (the one the call presented is spent, so it is the grant's only way on)."""

    def __init__(self, message: str, refresh_token: str | None) -> None:
        super().__init__(message, status=200)
        self.refresh_token = refresh_token


def well_formed_refresh_token(payload: object) -> str | None:
    """The refresh token of a token answer when it is one the gateway can use, else None."""
    if not isinstance(payload, dict):
        return None
    refresh = _optional_str(payload.get("refresh_token"))
    try:
        _check_token(refresh, "refresh_token")
    except ValueError:
        return None
    return refresh


class InvalidGrant(TokenEndpointError):
    """The refresh token (or code) is dead: revoked, expired, or already rotated by someone else."""

    def __init__(self, message: str, status: int | None = 400) -> None:
        super().__init__(message, status=status, error="invalid_grant")


class TokenClient(Protocol):
    async def refresh(self, refresh_token: str) -> TokenResponse: ...


# What a token call sends that only the account's holder may know.
_SECRET_FIELDS = ("refresh_token", "code", "code_verifier")


def _without_secrets(said: object, sent: tuple[str, ...]) -> str | None:
    """What a token endpoint said, as text, less the secrets the call `sent` (see `_classify`)."""
    if not said:
        return None
    text = str(said)
    for secret in sent:
        text = without_credential(text, secret)
    return text


def _classify(status: int, payload: object, url: str, sent: tuple[str, ...]) -> TokenEndpointError:
    """The failure a token endpoint's error answer stands for. What it said loses the secrets the call `sent`
    (a refresh token, a code and its verifier), which an endpoint or a proxy before it may quote: the message
    is logged, and kept in the store as the account's state, which `accounts list` shows."""
    error = description = None
    if isinstance(payload, dict):
        raw_error = payload.get("error")
        if isinstance(raw_error, dict):  # Anthropic-shaped error bodies
            error, description = raw_error.get("type"), raw_error.get("message")
        else:
            error, description = raw_error, payload.get("error_description")
    error, description = _without_secrets(error, sent), _without_secrets(description, sent)
    error = error[:64] if error else None
    message = f"token endpoint {url} answered HTTP {status}" + (f" {error}" if error else "")
    if description:
        message += f": {description[:200]}"
    if error == "invalid_grant":
        return InvalidGrant(message, status)
    return TokenEndpointError(message, status=status, error=error)


# The most of a token or usage endpoint's answer that is read (they answer a few hundred bytes): more is no
# answer of theirs, and read whole, an endpoint that never ends its body filled the gateway's memory for
# `oauth.request_timeout_seconds`.
ANSWER_CAP = 1024 * 1024


async def _read_answer(response: aiohttp.ClientResponse, what: str) -> bytes:
    """An endpoint's answer, up to ANSWER_CAP; a longer one raises TokenEndpointError (`what` names the
    endpoint)."""
    raw, complete = await read_up_to(response.content, ANSWER_CAP)
    if not complete:
        raise TokenEndpointError(f"{what} answered HTTP {response.status} with over {ANSWER_CAP >> 20} MiB")
    return raw


class OAuthClient:
    """The calls to the token and usage endpoints (aiohttp; a session of its own unless given one)."""

    def __init__(self, config: OAuthConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self._session = session
        self._owns_session = session is None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(trust_env=False)
            self._owns_session = True
        return self._session

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None and not self._session.closed:
            await self._session.close()

    async def _post_token(self, body: dict[str, str]) -> TokenResponse:
        url = self.config.token_url
        sent = tuple(body[name] for name in _SECRET_FIELDS if name in body)
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_seconds)
        try:
            async with self._get_session().post(
                url,
                data=orjson.dumps(body),
                headers={"content-type": "application/json", "accept": "application/json"},
                timeout=timeout,
                allow_redirects=False,  # a refresh token must go to the configured endpoint only
            ) as response:
                raw = await _read_answer(response, f"token endpoint {url}")
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # What failed, as the relay logs an upstream's (a refused connection, a name that does not resolve, a
            # certificate): the class alone (`ClientConnectorError`) told none of them apart. aiohttp's message
            # names the host, never the body, where the refresh token goes; but it quotes an answer it cannot
            # read (a header line too long), which may quote the secrets sent back.
            raise TokenEndpointError(
                f"token endpoint {url} unreachable: {_without_secrets(failure(exc), sent)}"
            ) from None
        try:
            payload = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            payload = None
        if status != 200:
            raise _classify(status, payload, url, sent)
        try:
            return TokenResponse.parse(payload)
        except ValueError as exc:
            # A 200 without usable tokens is a broken answer, not a verdict on the grant: try again later.
            message = f"token endpoint {url} answered 200 without usable tokens ({exc})"
            raise RefusedTokens(message, well_formed_refresh_token(payload)) from None

    async def exchange_code(self, code: str, pkce: PkcePair, state: str) -> TokenResponse:
        return await self._post_token(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.config.redirect_uri,
                "client_id": self.config.client_id,
                "code_verifier": pkce.verifier,
                "state": state,
            }
        )

    async def refresh(self, refresh_token: str) -> TokenResponse:
        return await self._post_token(
            {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": self.config.client_id}
        )

    async def fetch_usage(self, url: str, access_token: str) -> object:
        """The subscription usage endpoint's JSON; raises TokenEndpointError on anything but a 200."""
        from poolgate.upstreams.dialects.anthropic_oauth import OAUTH_BETA

        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_seconds)
        headers = {
            "authorization": f"Bearer {access_token}",
            "anthropic-beta": OAUTH_BETA,
            "anthropic-version": "2023-06-01",
            "accept": "application/json",
        }
        try:
            # No redirects: aiohttp would carry the bearer token to wherever one points.
            async with self._get_session().get(
                url, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                raw = await _read_answer(response, "usage endpoint")
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # its quote of an answer, as `_post_token`'s
            raise TokenEndpointError(
                f"usage endpoint unreachable: {_without_secrets(failure(exc), (access_token,))}"
            ) from None
        if status != 200:
            raise TokenEndpointError(f"usage endpoint answered HTTP {status}", status=status)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise TokenEndpointError("usage endpoint answered invalid JSON", status=status) from None

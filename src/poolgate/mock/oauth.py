"""The mock's Claude subscription side: an OAuth token endpoint, bearer tokens that expire, and 5-hour /
7-day quota windows reported in `anthropic-ratelimit-unified-*` headers.

As on the real service (see `reference/subscriptions.md`):
- `GET /oauth/authorize` (PKCE S256) → the copy-paste page's `code#state` (here as plain text, approved at
  once; `&account=ID` picks which mock account logs in);
- `POST /v1/oauth/token` with JSON bodies: `authorization_code` (verifier checked against the challenge)
  and `refresh_token`, whose refresh tokens rotate: a used or unknown one answers 400 `invalid_grant`;
- subscription bearer tokens on `/v1/messages` need the OAuth beta and a Claude Code-shaped system prompt;
  an expired or unknown one answers 401 `authentication_error`;
- every answer carries the unified quota headers; utilisation grows with the tokens used, against a
  budget per window, and a used-up (or admin-rejected) window answers 429 until its reset; the weekly Opus
  window (`7d_opus`) counts and refuses Opus requests only, and is reported on every answer;
- `GET /api/oauth/usage` reports the windows with utilisation in percent.

Admin (for tests and demos) under `/_mock/oauth/`: create accounts and tokens, expire or revoke them,
set a window's utilisation or reject it until a reset, and make the token endpoint fail transiently or answer
an access token with a line break in it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol

import msgspec
import orjson
from aiohttp import web

from poolgate.mock.cache import BILLING_PREFIX
from poolgate.mock.responses import error_json, error_response, request_id
from poolgate.mock.strict import unknown_keys, unknown_message

DEFAULT_CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
OAUTH_BETA = "oauth-2025-04-20"
ACCESS_PREFIX = "sk-ant-oat01-"
REFRESH_PREFIX = "sk-ant-ort01-"
CODE_TTL_SECONDS = 600.0
IDENTITY_PREFIXES = (
    "You are Claude Code, Anthropic's official CLI for Claude",
    "You are a Claude agent, built on Anthropic's Claude Agent SDK",
)
DEFAULT_SCOPES = ("user:profile", "user:inference", "user:sessions:claude_code", "user:mcp_servers")
JSON = "application/json"
# What an answer's unified headers report: see `MockOAuthConfig.unified_headers`.
UnifiedHeaders = Literal["every_window", "aggregate", "status"]


@dataclass
class MockOAuthConfig:
    access_token_ttl_seconds: float = 8 * 3600.0
    five_hour_budget_tokens: int = 1_000_000
    seven_day_budget_tokens: int = 10_000_000
    seven_day_opus_budget_tokens: int = 5_000_000
    warning_threshold: float = 0.75  # allowed → allowed_warning past this utilisation
    require_claude_code: bool = True  # 400 for requests that are not Claude Code-shaped, like the real API
    require_oauth_beta: bool = True  # 401 without `anthropic-beta: oauth-2025-04-20`
    client_id: str = DEFAULT_CLIENT_ID
    # What an answer's unified headers report. `every_window`: each window's status, utilisation and reset, and
    # the aggregate status of the most binding of them all (a Sonnet answer says `rejected` while the Opus week
    # is used up). `aggregate`: only the aggregate status, reset and representative claim, of the windows that
    # bind the request's model (a Sonnet answer says `allowed` then), as some answers of the real API carry no
    # per-window headers; `status`: the same without the representative claim.
    unified_headers: UnifiedHeaders = "every_window"


@dataclass
class QuotaWindow:
    """A subscription window: starts at the first request after it is idle, resets `length` later."""

    name: str
    length: float
    budget: int
    family: str | None = None  # a per-model window's model family ("opus"): it counts those requests only
    started: float | None = None  # epoch
    used: float = 0.0
    forced_status: str | None = None
    forced_reset: float | None = None

    def binds(self, model: str) -> bool:
        return self.family is None or self.family in model.lower()

    def roll(self, now: float) -> None:
        if self.forced_reset is not None and now >= self.forced_reset:
            self.forced_status = self.forced_reset = self.started = None
            self.used = 0.0
        if self.started is not None and now >= self.started + self.length:
            self.started, self.used = None, 0.0

    def utilization(self) -> float:
        # The API rejects a window only once it is used up: a forced rejection reads as full everywhere (the
        # headers and the usage endpoint), or a poll of the usage endpoint would call the account free again.
        if self.forced_status == "rejected":
            return 1.0
        return self.used / self.budget if self.budget > 0 else 1.0

    def reset_at(self, now: float) -> float:
        if self.forced_reset is not None:
            return self.forced_reset
        return (self.started if self.started is not None else now) + self.length

    def status(self, warning: float) -> str:
        if self.forced_status is not None:
            return self.forced_status
        used = self.utilization()
        return "rejected" if used >= 1.0 else "allowed_warning" if used >= warning else "allowed"


@dataclass
class MockAccount:
    id: str
    email: str
    subscription_type: str
    scopes: tuple[str, ...]
    uuid: str = field(default_factory=lambda: secrets.token_hex(16))
    organization_uuid: str = field(default_factory=lambda: secrets.token_hex(16))
    refresh_token: str | None = None  # the one live refresh token; rotation replaces it
    windows: dict[str, QuotaWindow] = field(default_factory=dict)
    requests: int = 0  # served (charged to its windows)
    # Every Messages request that reached it, served or refused, by model.
    requests_by_model: dict[str, int] = field(default_factory=dict)


@dataclass
class _Code:
    account_id: str
    challenge: str
    redirect_uri: str
    state: str
    expires: float


class MockOAuth:
    def __init__(self, config: MockOAuthConfig | None = None) -> None:
        self.config = config or MockOAuthConfig()
        self.accounts: dict[str, MockAccount] = {}
        self._access: dict[str, tuple[str, float]] = {}  # access token → (account id, expiry epoch)
        self._refresh: dict[str, str] = {}  # live refresh token → account id
        self._codes: dict[str, _Code] = {}
        self.token_faults: list[int] = []  # the next token calls answer these statuses, one each
        self.token_delay_seconds = 0.0
        # The next token answers carry an access token no request header can carry (the grant rotates all the same).
        self.broken_access_tokens = 0

    # ----- accounts and tokens ----------------------------------------------------------------------------

    def create_account(
        self,
        account_id: str | None = None,
        *,
        email: str | None = None,
        subscription_type: str = "max",
        scopes: tuple[str, ...] = DEFAULT_SCOPES,
        expires_in: float | None = None,
    ) -> dict[str, Any]:
        """A new account (or new tokens for an existing one); returns a token endpoint's answer."""
        account_id = account_id or "acct_" + secrets.token_hex(4)
        account = self.accounts.get(account_id)
        if account is None:
            account = self.accounts[account_id] = MockAccount(
                account_id, email or f"{account_id}@example.com", subscription_type, tuple(scopes)
            )
            account.windows = {
                "five_hour": QuotaWindow("five_hour", 5 * 3600.0, self.config.five_hour_budget_tokens),
                "seven_day": QuotaWindow("seven_day", 7 * 86400.0, self.config.seven_day_budget_tokens),
                "seven_day_opus": QuotaWindow(
                    "seven_day_opus", 7 * 86400.0, self.config.seven_day_opus_budget_tokens, "opus"
                ),
            }
        return self._issue(account, expires_in)

    def _issue(self, account: MockAccount, expires_in: float | None = None) -> dict[str, Any]:
        ttl = self.config.access_token_ttl_seconds if expires_in is None else expires_in
        access = ACCESS_PREFIX + secrets.token_urlsafe(32)
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        if account.refresh_token is not None:
            self._refresh.pop(account.refresh_token, None)
        account.refresh_token = refresh
        self._refresh[refresh] = account.id
        self._access[access] = (account.id, time.time() + ttl)
        return {
            "token_type": "Bearer",
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": int(ttl),
            "scope": " ".join(account.scopes),
            "account": {"uuid": account.uuid, "email_address": account.email},
            "organization": {"uuid": account.organization_uuid, "name": f"{account.id}'s Organization"},
        }

    def expire(self, account_id: str) -> None:
        for token, (owner, _) in list(self._access.items()):
            if owner == account_id:
                self._access[token] = (owner, time.time() - 1)

    def revoke(self, account_id: str) -> None:
        """Kill the account's refresh token (the next refresh gets invalid_grant) and its access tokens."""
        account = self.accounts[account_id]
        if account.refresh_token is not None:
            self._refresh.pop(account.refresh_token, None)
            account.refresh_token = None
        for token, (owner, _) in list(self._access.items()):
            if owner == account_id:
                del self._access[token]

    def is_oauth_token(self, token: str) -> bool:
        return token.startswith(ACCESS_PREFIX) or token in self._access

    def authenticate(self, token: str, now: float) -> MockAccount | str:
        """The account a bearer token belongs to, or why not: "expired" or "unknown"."""
        found = self._access.get(token)
        if found is None:
            return "unknown"
        account_id, expires = found
        if now >= expires:
            return "expired"
        account = self.accounts.get(account_id)
        return account if account is not None else "unknown"

    # ----- the OAuth endpoints ----------------------------------------------------------------------------

    def authorize(self, query: Mapping[str, str]) -> tuple[int, str]:
        if query.get("client_id") != self.config.client_id:
            return 400, "unknown client_id"
        if query.get("response_type") != "code":
            return 400, "response_type must be code"
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return 400, "PKCE with code_challenge_method=S256 is required"
        account_id = query.get("account") or "acct_" + secrets.token_hex(4)
        if account_id not in self.accounts:
            self.create_account(account_id)
        code = secrets.token_urlsafe(24)
        state = query.get("state", "")
        self._codes[code] = _Code(
            account_id, query["code_challenge"], query.get("redirect_uri", ""), state, time.time() + CODE_TTL_SECONDS
        )
        return 200, f"{code}#{state}"

    def token(self, body: object) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            return 400, {"error": "invalid_request", "error_description": "expected a JSON object"}
        if body.get("client_id") != self.config.client_id:
            return 401, {"error": "invalid_client", "error_description": "unknown client_id"}
        grant = body.get("grant_type")
        if grant == "authorization_code":
            return self._code_grant(body)
        if grant == "refresh_token":
            return self._refresh_grant(body)
        return 400, {"error": "unsupported_grant_type", "error_description": f"grant_type {grant!r}"}

    def _code_grant(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        code = self._codes.pop(str(body.get("code", "")), None)  # single use
        if code is None or time.time() > code.expires:
            return 400, {"error": "invalid_grant", "error_description": "unknown, used or expired code"}
        verifier = body.get("code_verifier")
        if not isinstance(verifier, str) or _s256(verifier) != code.challenge:
            return 400, {"error": "invalid_grant", "error_description": "code_verifier does not match"}
        if body.get("redirect_uri") != code.redirect_uri:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri does not match"}
        if code.state and body.get("state") not in (None, code.state):
            return 400, {"error": "invalid_grant", "error_description": "state does not match"}
        return 200, self._issue(self.accounts[code.account_id])

    def _refresh_grant(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        account_id = self._refresh.get(str(body.get("refresh_token", "")))
        if account_id is None:
            return 400, {"error": "invalid_grant", "error_description": "Invalid refresh token"}
        return 200, self._issue(self.accounts[account_id])

    # ----- quota ------------------------------------------------------------------------------------------

    def _windows(self, account: MockAccount, now: float) -> dict[str, QuotaWindow]:
        for window in account.windows.values():
            window.roll(now)
        return account.windows

    def rejected(self, account: MockAccount, now: float, model: str = "") -> QuotaWindow | None:
        """The used-up window that refuses a request for `model`, if any."""
        for window in self._windows(account, now).values():
            if window.binds(model) and window.status(self.config.warning_threshold) == "rejected":
                return window
        return None

    def charge(self, account: MockAccount, tokens: float, now: float, model: str = "") -> None:
        account.requests += 1
        for window in self._windows(account, now).values():
            if not window.binds(model):
                continue
            if window.started is None:
                window.started = now
            window.used += tokens

    def set_window(
        self,
        account_id: str,
        name: str,
        utilization: float | None = None,
        status: str | None = None,
        reset_in: float | None = None,
    ) -> None:
        window = self.accounts[account_id].windows[name]
        now = time.time()
        window.roll(now)
        if utilization is not None:
            window.used = utilization * window.budget
            if window.started is None:
                window.started = now
        window.forced_status = status
        window.forced_reset = now + reset_in if reset_in is not None else None

    def headers(self, account: MockAccount, now: float, model: str = "") -> dict[str, str]:
        """The unified quota headers of an answer to a request for `model` (see `MockOAuthConfig.unified_headers`)."""
        warning = self.config.warning_threshold
        windows = self._windows(account, now)
        every_window = self.config.unified_headers == "every_window"
        headers: dict[str, str] = {}
        binding: QuotaWindow | None = None
        # In `every_window` mode, every window on every answer, the per-model ones too, and the aggregate status
        # is the most binding window's, whichever model the request was for (as the API's, which reports a
        # used-up Opus week as `rejected` on a Sonnet answer it served).
        for prefix, name in (("5h", "five_hour"), ("7d", "seven_day"), ("7d_opus", "seven_day_opus")):
            window = windows[name]
            if not every_window and not window.binds(model):
                continue
            status = window.status(warning)
            if every_window:
                headers[f"anthropic-ratelimit-unified-{prefix}-status"] = status
                headers[f"anthropic-ratelimit-unified-{prefix}-utilization"] = f"{window.utilization():.4f}"
                headers[f"anthropic-ratelimit-unified-{prefix}-reset"] = str(int(window.reset_at(now)))
                if status == "allowed_warning":
                    headers[f"anthropic-ratelimit-unified-{prefix}-surpassed-threshold"] = str(warning)
            if binding is None or _rank(window, warning) > _rank(binding, warning):
                binding = window
        assert binding is not None
        headers["anthropic-ratelimit-unified-status"] = binding.status(warning)
        headers["anthropic-ratelimit-unified-reset"] = str(int(binding.reset_at(now)))
        if self.config.unified_headers == "status":
            return headers
        headers["anthropic-ratelimit-unified-representative-claim"] = binding.name
        if not every_window:
            return headers
        headers["anthropic-ratelimit-unified-fallback-percentage"] = "0.5"
        headers["anthropic-ratelimit-unified-overage-status"] = "rejected"
        headers["anthropic-ratelimit-unified-overage-disabled-reason"] = "org_level_disabled"
        return headers

    def usage_payload(self, account: MockAccount, now: float) -> dict[str, Any]:
        payload: dict[str, Any] = {"seven_day_opus": None, "seven_day_sonnet": None}
        for name, window in self._windows(account, now).items():
            resets = datetime.fromtimestamp(window.reset_at(now), UTC).isoformat() if window.started else None
            payload[name] = {"utilization": round(window.utilization() * 100, 2), "resets_at": resets}
        return payload

    # ----- request checks ---------------------------------------------------------------------------------

    def refusal(
        self, headers: Mapping[str, str], request: dict[str, Any], account: MockAccount, now: float
    ) -> web.Response | None:
        """The answer the real API would give instead of serving this subscription request, if any."""
        betas = {part.strip() for part in headers.get("anthropic-beta", "").split(",")}
        if self.config.require_oauth_beta and OAUTH_BETA not in betas:
            return error_response(401, NO_BETA_MESSAGE)
        if self.config.require_claude_code and not _claude_code_shaped(request.get("system")):
            return error_response(400, NOT_CLAUDE_CODE_MESSAGE)
        model = str(request.get("model", ""))
        window = self.rejected(account, now, model)
        if window is not None:
            retry = max(1, int(window.reset_at(now) - now + 0.999))
            extra = {"retry-after": str(retry), "x-should-retry": "true", **self.headers(account, now, model)}
            return error_response(429, f"This request would exceed your account's rate limit ({window.name})", extra)
        return None


def _rank(window: QuotaWindow, warning: float) -> tuple[int, float]:
    order = {"allowed": 0, "allowed_warning": 1, "rejected": 2}
    return order.get(window.status(warning), 0), window.utilization()


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _claude_code_shaped(system: object) -> bool:
    def text(block: object) -> str | None:
        if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            return block["text"]
        return None

    if isinstance(system, str):
        return system.startswith(IDENTITY_PREFIXES)
    if not isinstance(system, list) or not system:
        return False
    first = text(system[0])
    if first is not None and first.startswith(BILLING_PREFIX) and len(system) > 1:
        first = text(system[1])
    return first is not None and first.startswith(IDENTITY_PREFIXES)


EXPIRED_MESSAGE = "OAuth token has expired. Please obtain a new token or refresh your existing token."
INVALID_MESSAGE = "Invalid bearer token"
NO_BETA_MESSAGE = "OAuth authentication is currently not supported."
NOT_CLAUDE_CODE_MESSAGE = (
    "This credential is only authorized for use with Claude Code and cannot be used for other API requests."
)


# ----- routes ---------------------------------------------------------------------------------------------


class _State(Protocol):
    oauth: MockOAuth
    stats: Any


def bearer(request: web.Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


class OAuthRoutes:
    def __init__(self, state: _State) -> None:
        self.state = state

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        status, text = self.state.oauth.authorize(request.query)
        return web.Response(status=status, text=text)

    async def token(self, request: web.Request) -> web.StreamResponse:
        oauth = self.state.oauth
        stats = self.state.stats
        stats.oauth_token_calls += 1
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": "invalid_request", "error_description": "body must be JSON"}, status=400)
        grant = body.get("grant_type") if isinstance(body, dict) else None
        stats.oauth_token_calls_by_grant[str(grant)] = stats.oauth_token_calls_by_grant.get(str(grant), 0) + 1
        if oauth.token_delay_seconds:
            await asyncio.sleep(oauth.token_delay_seconds)
        if oauth.token_faults:
            status = oauth.token_faults.pop(0)
            return web.json_response({"error": "server_error", "error_description": "injected fault"}, status=status)
        status, payload = oauth.token(body)
        if status == 200 and oauth.broken_access_tokens:
            oauth.broken_access_tokens -= 1
            payload = {**payload, "access_token": payload["access_token"] + "\r\nx-broken: 1"}
        return web.json_response(payload, status=status)

    async def usage(self, request: web.Request) -> web.StreamResponse:
        self.state.stats.oauth_usage_calls += 1
        found = self.state.oauth.authenticate(bearer(request), time.time())
        if isinstance(found, str):
            return error_response(401, EXPIRED_MESSAGE if found == "expired" else INVALID_MESSAGE)
        if "user:profile" not in found.scopes:  # setup tokens (inference only) are refused here
            return error_response(403, "This token does not have the user:profile scope")
        return web.json_response(self.state.oauth.usage_payload(found, time.time()))

    # ----- admin ------------------------------------------------------------------------------------------

    async def create_account(self, request: web.Request) -> web.StreamResponse:
        data = await _json_body(request, ACCOUNT_FIELDS)
        tokens = self.state.oauth.create_account(
            data.get("id"),
            email=data.get("email"),
            subscription_type=data.get("subscription_type", "max"),
            scopes=tuple(data.get("scopes") or DEFAULT_SCOPES),
            expires_in=data.get("expires_in"),
        )
        account_id = self.state.oauth._refresh[tokens["refresh_token"]]
        return web.json_response({"account_id": account_id, **tokens})

    async def account(self, request: web.Request) -> web.StreamResponse:
        account = self.state.oauth.accounts.get(request.match_info["account"])
        if account is None:
            return error_response(404, NO_SUCH_ACCOUNT)
        now = time.time()
        return web.json_response(
            {
                "id": account.id,
                "requests": account.requests,
                "requests_by_model": account.requests_by_model,
                "usage": self.state.oauth.usage_payload(account, now),
                "headers": self.state.oauth.headers(account, now),
            }
        )

    async def set_window(self, request: web.Request) -> web.StreamResponse:
        data = await _json_body(request, WINDOW_FIELDS)
        if data.get("status") not in WINDOW_STATUSES:  # a typo would stick as a status no client knows
            raise _admin_error(f"status: {data['status']!r} is not one of allowed, allowed_warning, rejected")
        try:
            self.state.oauth.set_window(
                request.match_info["account"],
                str(data.get("window", "five_hour")),
                data.get("utilization"),
                data.get("status"),
                data.get("reset_in_seconds"),
            )
        except KeyError as exc:
            return error_response(404, f"unknown {exc}")
        return web.json_response({"ok": True})

    async def expire(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["account"] not in self.state.oauth.accounts:
            return error_response(404, NO_SUCH_ACCOUNT)
        self.state.oauth.expire(request.match_info["account"])
        return web.json_response({"ok": True})

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        try:
            self.state.oauth.revoke(request.match_info["account"])
        except KeyError:
            return error_response(404, NO_SUCH_ACCOUNT)
        return web.json_response({"ok": True})

    async def token_faults(self, request: web.Request) -> web.StreamResponse:
        data = await _json_body(request, TOKEN_FAULT_FIELDS)
        try:  # a bad value was a 500 (`int("x")`), and a string of statuses its characters
            faults = msgspec.convert(data, TokenFaults)
        except msgspec.ValidationError as exc:
            raise _admin_error(str(exc)) from None
        self.state.oauth.token_faults = list(faults.statuses)
        if faults.delay_ms is not None:
            self.state.oauth.token_delay_seconds = faults.delay_ms / 1000
        if faults.broken_access_tokens is not None:
            self.state.oauth.broken_access_tokens = faults.broken_access_tokens
        return web.json_response({"ok": True})


# What each admin body may hold: an unknown field is refused rather than ignored, as a typo
# (`{"stauts": "rejected"}`) would otherwise look accepted and do nothing.
ACCOUNT_FIELDS = frozenset({"id", "email", "subscription_type", "scopes", "expires_in"})
WINDOW_FIELDS = frozenset({"window", "utilization", "status", "reset_in_seconds"})
WINDOW_STATUSES = (None, "allowed", "allowed_warning", "rejected")
TOKEN_FAULT_FIELDS = frozenset({"statuses", "delay_ms", "broken_access_tokens"})
NO_SUCH_ACCOUNT = "no such account"


class TokenFaults(msgspec.Struct):
    """`POST /_mock/oauth/token-faults`: the statuses the next token calls answer (replacing those left), and
    optionally their delay and how many rotating answers carry a broken access token."""

    statuses: list[Annotated[int, msgspec.Meta(ge=200, le=599)]] = []
    delay_ms: Annotated[float, msgspec.Meta(ge=0)] | None = None
    broken_access_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None


async def _json_body(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise _admin_error("body must be JSON") from None
    if not isinstance(data, dict):
        raise _admin_error("body must be a JSON object")
    unknown = unknown_keys(data, allowed)
    if unknown:
        raise _admin_error(unknown_message(unknown))
    return data


def _admin_error(message: str) -> web.HTTPBadRequest:
    """The admin API's 400, in the API's error shape as every error of the mock's."""
    request = request_id()
    return web.HTTPBadRequest(
        text=error_json(400, message, request).decode(), content_type=JSON, headers={"request-id": request}
    )


def add_oauth_routes(app: web.Application, state: _State) -> None:
    routes = OAuthRoutes(state)
    app.router.add_get("/oauth/authorize", routes.authorize)
    app.router.add_post("/v1/oauth/token", routes.token)
    app.router.add_get("/api/oauth/usage", routes.usage)
    app.router.add_post("/_mock/oauth/accounts", routes.create_account)
    app.router.add_get("/_mock/oauth/accounts/{account}", routes.account)
    app.router.add_post("/_mock/oauth/accounts/{account}/window", routes.set_window)
    app.router.add_post("/_mock/oauth/accounts/{account}/expire", routes.expire)
    app.router.add_post("/_mock/oauth/accounts/{account}/revoke", routes.revoke)
    app.router.add_post("/_mock/oauth/token-faults", routes.token_faults)

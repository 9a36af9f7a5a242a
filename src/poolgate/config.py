"""One pydantic model of the whole configuration: a YAML file, `${ENV}` substitution, env overrides.

Errors name the bad field and, where the YAML parser can tell, the file and line it came from, or the
POOLGATE__* environment variable that set it.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from poolgate.billing.catalogue import Catalogue, CatalogueError
from poolgate.billing.config import ChannelConfig, ConfigModel, PriceOverrides, dotted, problem_text
from poolgate.lifecycle.claims import CallerClaims, ClaimsError, parse_claims
from poolgate.lifecycle.context import Upstream
from poolgate.store.db import sqlite_file, sqlite_file_url, sqlite_url

Strategy = Literal["first-pick", "random", "round-robin", "least-connections"]
UpstreamKind = Literal["anthropic_api_key", "anthropic_oauth"]

ENV_PREFIX = "POOLGATE__"
# Relative to the configuration file's directory (to the current one without a file).
DEFAULT_DATA_DIR = "poolgate-data"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# A path as a shell takes it, `~/x` the home directory's, wherever it comes from: the file's paths are expanded
# as they are anchored (see `_anchored`), an override's and `--data-dir`'s only here (a price file or a JWT key
# from POOLGATE__… was looked for in a directory named ~).
def _no_nul(value: object) -> object:
    # YAML writes one as "\0"; no file name holds it, and every use of the path failed with a traceback.
    if isinstance(value, str | Path) and "\0" in str(value):
        raise ValueError("must not hold a NUL character")
    return value


HomePath = Annotated[Path, BeforeValidator(_no_nul), AfterValidator(Path.expanduser)]


class ConfigError(Exception):
    """A configuration that cannot be used; the message is meant for the person who wrote it."""


# Control characters, a tab too: aiohttp refuses to send the others in a header value, the server refuses them
# in a caller's, and no credential holds a tab.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def _header_credential(value: object) -> object:
    """A credential sent or matched as a header value, without the whitespace around it: a Kubernetes secret
    made from a file ends with the file's newline (incoming header values are stripped alike). One with a
    control character inside was accepted, then every request routed to it failed."""
    if not isinstance(value, str):
        return value
    value = value.strip()
    if _CONTROL_CHARACTER.search(value):
        # Never the value: it is a secret.
        raise ValueError("holds a control character (a line break, a tab, …), which no header can carry")
    return value


# An upstream's credential, the admin token, a gateway key: header values, stripped and checked on the way in.
HeaderCredential = Annotated[str, BeforeValidator(_header_credential)]


class ServerConfig(ConfigModel):
    # Never empty: an empty address listens on every interface (`host: ${PGHOST}` with PGHOST set but
    # empty served the gateway to the network without a word); every interface is written `0.0.0.0`.
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    # A request's head (request line and headers): larger → 431; not complete this long after its first
    # byte → 408. Both close the connection (a 64 MB header, a client trickling a head byte by byte).
    max_head_bytes: int = Field(64 * 1024, ge=1024)
    head_timeout_seconds: float = Field(30.0, gt=0)
    # A request body of which nothing more has come this long → 408 and the connection closes.
    body_timeout_seconds: float = Field(30.0, gt=0)
    # A client that takes nothing of its answer this long while the answer waits on it → the connection
    # closes (the request ends as the client's disconnect, its upstream request cancelled).
    send_timeout_seconds: float = Field(60.0, gt=0)
    # Seconds to let in-flight requests finish on SIGTERM before they are cut.
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # One `poolgate.access` line (at INFO) per finished request: caller, account, status, tokens, cost, times.
    # (uvicorn's own access line, which says less, is never written.)
    access_log: bool = True

    @field_validator("host")
    @classmethod
    def _no_whitespace(cls, value: str) -> str:
        # `host: " "` passed the check, then serve could not listen: no address or host name holds any.
        if any(character.isspace() for character in value):
            raise ValueError("must be an address or host name, without whitespace (`0.0.0.0` for every interface)")
        return value


class HealthConfig(ConfigModel):
    failure_threshold: int = Field(3, ge=1)
    cooldown_seconds: float = Field(5.0, gt=0)
    # Cooldown multipliers by consecutive failures: base, 5x base, 15x base (the last one repeats).
    cooldown_multipliers: tuple[Annotated[float, Field(gt=0)], ...] = Field((1.0, 5.0, 15.0), min_length=1)
    # When every account that could serve a request is cooling down, send it (one attempt) to the one due
    # soonest rather than answer 529: a blip across the whole pool must not become a 25–75 s outage.
    panic: bool = True


class ScoreWeights(ConfigModel):
    """How much each scoring term counts; 0 turns a term off. See the README's routing section."""

    cache: float = Field(4.0, ge=0)
    headroom: float = Field(4.0, ge=0)
    load: float = Field(0.0, ge=0)
    latency: float = Field(0.5, ge=0)
    errors: float = Field(2.0, ge=0)
    weight: float = Field(0.0, ge=0)
    spread: float = Field(4.0, ge=0)
    # Subscription accounts: quota pressure (past the threshold, or ahead of the weekly pace), metered
    # keys while subscription capacity is left, and draining the window that resets soonest first.
    quota: float = Field(4.0, ge=0)
    metered: float = Field(2.0, ge=0)
    drain: float = Field(1.0, ge=0)
    # Among metered upstreams, the one whose price for the model is higher (per-upstream price overrides or
    # channel pricing) scores worse, by its excess over the cheapest: a small tie-breaker, not a rule.
    cost: float = Field(0.5, ge=0)


class KeepaliveConfig(ConfigModel):
    """Re-touch a paused session's warm prompt cache shortly before its TTL runs out (opt-in)."""

    enabled: bool = False
    # Send the keepalive this many seconds before the entry would expire. Under the 5-minute TTL: a lead as
    # long found every entry due at once, and sent `max_per_session` keepalives in a row after each turn.
    lead_seconds: float = Field(30.0, gt=0, lt=300)
    # At most this many keepalives per pause of one session (3 keep a 5-minute cache warm ~15 minutes).
    max_per_session: int = Field(3, ge=1)
    max_per_upstream_per_minute: int = Field(10, ge=1)
    # Sessions tracked for keepalive (each keeps its last request body and headers in memory), and the bytes
    # of those together (Claude Code's bodies are 0.1–1 MB; a body may be up to `server.max_body_bytes`).
    max_sessions: int = Field(200, ge=1)
    max_bytes: int = Field(128 * 2**20, ge=1)


class PinConfig(ConfigModel):
    """Requests that match (every given glob) may only go to the listed upstreams."""

    model: str | None = None  # glob, e.g. "claude-opus-*"
    caller: str | None = None  # glob over the caller's name (a key's name; a JWT's name claim, else its subject)
    upstreams: tuple[str, ...] = Field(min_length=1)


class RoutingConfig(ConfigModel):
    strategy: Strategy = "round-robin"
    max_attempts: int = Field(3, ge=1, le=10)
    # Prefer the account that already holds the request's prompt cache (see docs: prompt-cache affinity).
    cache_aware: bool = True
    # Keep a Claude Code session on its account while that account is usable and has headroom.
    session_stickiness: bool = True
    score_weights: ScoreWeights = ScoreWeights()
    # Candidates whose scores are within this margin of the best are tied; the strategy picks among them.
    tie_margin: float = Field(0.1, ge=0)
    # Pools of more than twice this many usable accounts score, per request, only the accounts that matter
    # to it (warm for its prompt, its session's own, paid-for capacity, the terminal strategy's weighted
    # draw from the whole pool) plus a uniform random sample of the rest, up to this many ("power of k
    # choices"): routing time stays flat as the pool grows. 0 scores
    # every candidate. Four random choices already balance load almost as well as scoring all (load
    # balancers commonly use two); each scored account costs routing time on every request.
    score_sample: int = Field(4, ge=0)
    cache_entries_per_upstream: int = Field(10_000, ge=1)
    # Retries (failover attempts) may add at most this share of extra upstream load, plus a small floor.
    retry_budget_ratio: float = Field(0.2, ge=0, le=10)
    retry_budget_min_per_second: float = Field(1.0, ge=0)
    # Routing traces kept in memory for `GET /admin/routes/{request_id}` (older ones are in the usage records).
    # Bounded: the ring is allocated at start (10**12 passed the check, then serve died of a MemoryError), and
    # 100 000 traces already take ~0.1–0.65 GB.
    trace_ring_size: int = Field(1000, ge=0, le=100_000)
    keepalive: KeepaliveConfig = KeepaliveConfig()
    # Configured pinning: the first pin a request matches limits it to its upstreams (reason `not_pinned`).
    pins: tuple[PinConfig, ...] = ()
    # Send every routing decision back in an `x-poolgate-route` header (callers can also ask per request
    # with `x-poolgate-trace: 1`, unless `trace_on_request` is off).
    expose_trace: bool = False
    # Whether a caller's `x-poolgate-trace: 1` is honoured: a trace names the pool's accounts, their scores and
    # what failed upstream, which an operator serving several teams may keep to themselves (`route explain` and
    # the admin API still show it).
    trace_on_request: bool = True
    # A session stays on its account (and its prompt cache) until idle this long.
    session_idle_seconds: float = Field(3600.0, gt=0)
    # How long a 529 "no usable upstream" answer tells the client to wait.
    no_upstream_retry_after_seconds: int = Field(5, ge=1)


class UpstreamTimeouts(ConfigModel):
    connect_seconds: float = Field(10.0, gt=0)
    # The whole wait for the first byte (the headers, then a JSON answer's whole body or a stream's first event);
    # long because a non-streaming answer sends nothing before its whole generation is done.
    first_byte_seconds: float = Field(600.0, gt=0)
    # Longest silence between two chunks of a stream.
    idle_seconds: float = Field(300.0, gt=0)


def upstream_base_url(value: str) -> str:
    """An upstream's base URL as the gateway keeps it (without a trailing slash); a ValueError says what is
    wrong with it (never the credentials it may hold)."""
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    # Each of these passed, and the upstream was then unreachable (a 529, not a word in the log) or answered
    # on another path: the gateway appends `/v1/messages` to the base URL as it is.
    if any(character.isspace() or _CONTROL_CHARACTER.match(character) for character in value):
        raise ValueError("must not hold whitespace or control characters")
    parts = urlsplit(value)
    if "@" in parts.netloc:
        # A base URL is stored and shown (`upstreams list`, logs) as it is: only the secret is encrypted.
        raise ValueError(
            "must not hold credentials (user:password@host), which would be stored and shown in plain text: "
            "give the upstream's key as api_key, which is kept encrypted"
        )
    if not parts.hostname:
        raise ValueError("must name a host (https://api.anthropic.com)")
    if not _valid_port(parts):
        raise ValueError("has a port that is not a number from 1 to 65535")
    if "?" in value or "#" in value:
        raise ValueError("must not hold a query (?…) or a fragment (#…): request paths are appended to it")
    if ends_in_api_version(value):
        raise ValueError("must not end in /v1: poolgate appends /v1/messages itself; drop the /v1")
    return value.rstrip("/")


def ends_in_api_version(base_url: str) -> bool:
    """Whether a base URL ends in `/v1`: every request would go to `/v1/v1/messages`, the API's 404 about the
    request relayed as the client's error while the account stayed healthy and first in line."""
    return urlsplit(base_url).path.rstrip("/").endswith("/v1")


def without_api_version(base_url: str) -> str:
    """A base URL without the `/v1` it ends in (see `ends_in_api_version`); one that does not, as it is."""
    return base_url.rstrip("/").removesuffix("/v1") if ends_in_api_version(base_url) else base_url


def _valid_port(parts: SplitResult) -> bool:
    try:
        return parts.port != 0  # None: the scheme's
    except ValueError:  # not a number, or out of range
        return False


class UpstreamConfig(ConfigModel):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    kind: UpstreamKind = "anthropic_api_key"
    base_url: str = "https://api.anthropic.com"
    # For kind anthropic_oauth: a long-lived OAuth access token (`claude setup-token`), sent as a Bearer token.
    # Refreshable subscription accounts live in the store (`poolgate accounts import/login`), which can
    # persist their rotating refresh tokens; a config file cannot.
    api_key: HeaderCredential = Field(min_length=1, repr=False)
    weight: int = Field(1, ge=1, le=1000)
    # Model globs this upstream serves; none = any model. An empty glob matches no model.
    models: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    enabled: bool = True
    # Keep paused sessions' prompt caches warm on this account even when routing.keepalive is off.
    cache_keepalive: bool = False
    # How this upstream is paid for: `{billing: metered}` (priced by the catalogue, or by `pricing`) or
    # `{billing: flat_fee, max_requests_per_month, max_tokens_per_month, on_exhausted}`. Unset: metered for
    # API keys, unlimited flat-fee for subscription (anthropic_oauth) accounts.
    billing: ChannelConfig | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return upstream_base_url(value)

    def upstream(self) -> Upstream:
        return Upstream(
            id=self.id,
            kind=self.kind,
            base_url=self.base_url,
            weight=self.weight,
            models=self.models,
            enabled=self.enabled,
            source="config",
            cache_keepalive=self.cache_keepalive,
        )


class ClaimsConfig(ConfigModel):
    """Caller claims written in the config file: for static and internal keys, and as a JWT issuer's defaults.
    See the README's "Callers, quotas and budgets"."""

    # Model globs the caller may use; absent = any model.
    models: tuple[str, ...] = ()
    # `METRIC=LIMIT/WINDOW`: metric requests, input_tokens or output_tokens; window minute, hour or day.
    quotas: tuple[str, ...] = ()
    budget_usd: Decimal | None = Field(None, ge=0)
    budget_scope: Literal["per_session", "per_account"] = "per_account"
    budget_range: Literal["daily", "weekly", "monthly", "total"] = "total"
    # An opaque id passed on to observers (e.g. a cost centre or a chain of delegation).
    chain: str | None = None

    @field_validator("chain", mode="before")
    @classmethod
    def _a_number_is_an_id_too(cls, value: object) -> object:
        # As a token's `chain` is read (`parse_claims`): a cost centre's number is an id, `true` is not.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _parses(self) -> ClaimsConfig:
        try:
            self.caller_claims()
        except ClaimsError as exc:
            raise ValueError(str(exc)) from None
        return self

    def caller_claims(self) -> CallerClaims:
        data = self.model_dump(exclude_none=True)
        if "models" not in self.model_fields_set:  # absent: any model (`models: []`, written, is refused)
            del data["models"]
        return parse_claims(data)


JwtAlgorithm = Literal[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


class JwtClaimMapping(ConfigModel):
    """Which JWT claim carries each caller claim (a top-level name, or a dotted path into an object claim);
    null = never taken from the token, only from the issuer's `defaults`."""

    models: str | None = "models"
    quotas: str | None = "quotas"
    budget_usd: str | None = "budget_usd"
    budget_micro_usd: str | None = "budget_micro_usd"
    budget_scope: str | None = "budget_scope"
    budget_range: str | None = "budget_range"
    chain: str | None = "chain"


# The principal ids of the config file's keys are `static:<name>` and, of `callers.internal_keys`,
# `internal:<name>` or `bearer:<name>` (see lifecycle/authn).
KEY_ID_PREFIXES = ("static", "internal", "bearer")


class JwtIssuerConfig(ConfigModel):
    """Callers that present a signed JWT (`Authorization: Bearer` or `x-api-key`) from this issuer."""

    name: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")
    # The principal kind of every caller this issuer vouches for.
    kind: Literal["oauth_subject", "workload_identity"] = "oauth_subject"
    # The exact `iss` value; it also selects this issuer for a token.
    issuer: str = Field(min_length=1)
    # Accepted `aud` values (the token must name at least one).
    audience: tuple[str, ...] = Field(min_length=1)
    algorithms: tuple[JwtAlgorithm, ...] = Field(min_length=1)
    # Exactly one key source: an HMAC secret (HS*), a PEM public key file, or a JWKS file (RS*/PS*/ES*/EdDSA).
    secret: str | None = Field(None, repr=False)
    public_key_file: HomePath | None = None
    jwks_file: HomePath | None = None
    # Clock skew tolerated on exp/nbf/iat.
    leeway_seconds: float = Field(30.0, ge=0, le=600)
    subject_claim: str = "sub"
    # Shown as the principal's name (falls back to the subject).
    name_claim: str = "name"
    claim_mapping: JwtClaimMapping = JwtClaimMapping()
    # Claims every token of this issuer gets unless it carries its own.
    defaults: ClaimsConfig = ClaimsConfig()

    @field_validator("name")
    @classmethod
    def _not_a_key_prefix(cls, value: str) -> str:
        # Its callers' ids are `<name>:<subject>`: `static:victim` for `sub: victim` would be static key
        # victim's id, and spend that key's budget.
        if value in KEY_ID_PREFIXES:
            raise ValueError(
                f"{value!r} is reserved: its callers' ids ({value}:<subject>) would be those of config keys"
                f" ({', '.join(prefix + ':<name>' for prefix in KEY_ID_PREFIXES)}); choose another name"
            )
        return value

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The secret's own check (not the issuer's, below): an error in a secret from POOLGATE__…__SECRET names
        # that variable, not the file's line of the issuer. (`algorithms` comes first, so it is checked.)
        hmac = [alg for alg in info.data.get("algorithms", ()) if alg.startswith("HS")]
        if value is not None and hmac:
            shortest = max(_HMAC_MIN_BYTES[alg] for alg in hmac)
            if len(value.encode()) < shortest:
                raise ValueError(f"must be at least {shortest} bytes for {', '.join(hmac)}")
        return value

    @model_validator(mode="after")
    def _key_fits_algorithms(self) -> JwtIssuerConfig:
        sources = [s for s in (self.secret, self.public_key_file, self.jwks_file) if s is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of secret, public_key_file, jwks_file")
        hmac = [alg for alg in self.algorithms if alg.startswith("HS")]
        if self.secret is not None:
            # An HMAC secret next to asymmetric algorithms invites algorithm confusion; keep them apart.
            if len(hmac) != len(self.algorithms):
                raise ValueError("a secret works only with HS256/HS384/HS512")
        else:
            if hmac:
                raise ValueError("HS* algorithms need a secret, not a public key")
            path = self.public_key_file or self.jwks_file
            if path is not None and not path.is_file():
                raise ValueError(not_a_file(path))
        return self


def not_a_file(path: Path) -> str:
    """Why a path the configuration names as a file is none: "no such file" was said of a directory too."""
    if path.is_dir():
        return f"{path}: a directory, not a file"
    return f"{path}: not a regular file" if path.exists() else f"{path}: no such file"


# A credential callers send in a header: printable ASCII without spaces (clients send header bytes as they
# are, so a key with "é" in it could never match), and names shown in logs and tables: no control characters.
HEADER_TOKEN = r"^[\x21-\x7e]+$"
PRINTABLE_NAME = r"^[^\x00-\x1f\x7f-\x9f]+$"
MAX_KEY_NAME = 64


class CallerKeyConfig(ConfigModel):
    """A pre-shared caller credential from the config file: a service (`internal_key`) or a registered
    subscription bearer token (`subscription_bearer`). Matched by hash, like gateway keys."""

    name: str = Field(min_length=1, max_length=MAX_KEY_NAME, pattern=PRINTABLE_NAME)
    key: HeaderCredential = Field(min_length=16, repr=False, pattern=HEADER_TOKEN)
    kind: Literal["internal_key", "subscription_bearer"] = "internal_key"
    claims: ClaimsConfig = ClaimsConfig()


class CallersConfig(ConfigModel):
    jwt_issuers: tuple[JwtIssuerConfig, ...] = ()
    internal_keys: tuple[CallerKeyConfig, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> CallersConfig:
        for what, values in (
            ("jwt issuer name", [i.name for i in self.jwt_issuers]),
            ("jwt issuer", [i.issuer for i in self.jwt_issuers]),
            ("internal key name", [k.name for k in self.internal_keys]),
        ):
            duplicates = {v for v in values if values.count(v) > 1}
            if duplicates:
                raise ValueError(f"duplicate {what} {sorted(duplicates)[0]!r}")
        return self


class StaticKey(ConfigModel):
    """A gateway key given in the config file (e.g. from a secret store), instead of `poolgate keys create`."""

    name: str = Field(min_length=1, max_length=MAX_KEY_NAME, pattern=PRINTABLE_NAME)
    key: HeaderCredential = Field(min_length=16, repr=False, pattern=HEADER_TOKEN)
    claims: ClaimsConfig = ClaimsConfig()


class StoreConfig(ConfigModel):
    # SQLAlchemy URL of a SQLite database; empty = SQLite file `poolgate.db` in the data directory.
    url: str = ""
    flush_interval_seconds: float = Field(0.5, gt=0)
    batch_size: int = Field(500, ge=1)
    # How often a running gateway re-reads keys and upstreams changed by the CLI.
    reload_interval_seconds: float = Field(2.0, gt=0)
    # Routing traces are most of what a request stores (~0.7 KB of ~1 with three accounts): kept this long,
    # then dropped; the usage rows stay (they are the spend ledger). None keeps them for ever.
    trace_retention_days: float | None = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _sqlite(cls, value: str) -> str:
        if value and not value.startswith(("sqlite://", "sqlite+pysqlite://")):
            # Its driver is not installed, and what several instances share needs more than one (see the
            # README's "Scaling out"): refused here rather than a traceback at start.
            raise ValueError("only SQLite is supported for now (sqlite:////path/to/poolgate.db, or empty)")
        database = sqlite_file(value) if value else None
        if database is not None:
            _no_nul(database)
        if value and database is None:
            # The usage writer is a process of its own, and every CLI command another: an in-memory database
            # is a different, empty one in each (the gateway failed every reload, and its records were lost).
            raise ValueError("the store must be a file (sqlite:////path/to/poolgate.db, or empty), not in memory")
        if database is not None and str(database).startswith("~"):
            # From the environment too (`POOLGATE__STORE__URL`): a directory named `~` is no one's intent.
            return sqlite_url(value, database.expanduser())
        return value


class OAuthConfig(ConfigModel):
    """Claude subscription (Pro/Max) accounts. The defaults are what Claude Code itself uses; none of it is an
    official contract, so every URL and id can be changed (the tests point them at the mock)."""

    authorize_url: str = "https://claude.ai/oauth/authorize"
    # JSON bodies, not form-encoded.
    token_url: str = "https://platform.claude.com/v1/oauth/token"
    # Claude Code's public PKCE client (no secret).
    client_id: str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    # What `poolgate accounts login` asks for (refreshes keep the scopes the grant already has).
    scopes: tuple[str, ...] = (
        "org:create_api_key",
        "user:profile",
        "user:inference",
        "user:sessions:claude_code",
        "user:mcp_servers",
        "user:file_upload",
    )
    # The copy-paste callback: the page shows `code#state` to paste back into `poolgate accounts login`.
    redirect_uri: str = "https://platform.claude.com/oauth/code/callback"
    # Refresh this long before the access token expires (Claude Code uses 5 minutes).
    refresh_margin_seconds: float = Field(300.0, ge=0)
    # Transient token-endpoint failures (network, 429, 5xx) are retried this often with exponential backoff.
    refresh_retries: int = Field(4, ge=0, le=20)
    refresh_backoff_seconds: float = Field(1.0, gt=0)
    request_timeout_seconds: float = Field(30.0, gt=0)
    # The subscription usage endpoint; a path is relative to the account's base_url.
    usage_url: str = "/api/oauth/usage"
    # Quota data older than this is `stale` (then the usage endpoint may be asked).
    max_quota_staleness_seconds: float = Field(300.0, gt=0)
    # Ask the usage endpoint at most this often per account (only when the headers have gone stale).
    usage_poll_min_interval_seconds: float = Field(60.0, gt=0)
    # Utilisation (fraction of a 5h/7d window) past which an account is deprioritised before it hits the wall.
    quota_pressure_threshold: float = Field(0.8, ge=0, le=1)
    # Warm-up: at these UTC times ("HH:MM") a subscription account whose 5-hour window is not running gets
    # one minimal request, so that its window starts (and resets) when the team needs it.
    warmup_at: tuple[str, ...] = ()
    # Which accounts (upstream ids) get warm-ups; empty = every subscription account.
    warmup_accounts: tuple[str, ...] = ()
    warmup_model: str = "claude-haiku-4-5"

    @field_validator("warmup_at")
    @classmethod
    def _clock_times(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for text in value:
            hours, _, minutes = text.partition(":")
            if not (hours.isdigit() and minutes.isdigit() and int(hours) < 24 and int(minutes) < 60):
                raise ValueError(f"{text!r} is not a UTC time of day as HH:MM")
        return value

    def warmup_problems(self, known: Collection[str]) -> list[str]:
        """What is wrong with warm-ups, one line each, given the upstreams configured or stored: an account
        `warmup_accounts` names that does not exist (a typo warms nothing), and accounts named with no
        `warmup_at` (no warm-up ever runs)."""
        problems = [
            f"oauth.warmup_accounts names {account}: no such upstream is configured or stored, nothing is warmed up"
            " for it"
            for account in self.warmup_accounts
            if account not in known
        ]
        if self.warmup_accounts and not self.warmup_at:
            problems.append("oauth.warmup_accounts is set but oauth.warmup_at is empty: no warm-up runs")
        return problems


class BillingConfig(ConfigModel):
    """Prices and spend: where prices come from, the cost header, flat-fee counters."""

    # A price file in the shipped format (src/poolgate/billing/prices.json) replacing the shipped one.
    price_file: HomePath | None = None
    # Send `x-poolgate-cost` on every answer, not only when the caller asks with `x-poolgate-cost: 1`.
    expose_cost: bool = False
    # How often flat-fee channels' monthly counters are saved (also on shutdown).
    counter_save_interval_seconds: float = Field(5.0, gt=0)
    # The output a budget reserves for a request while it runs: its max_tokens (None: an upper bound, no
    # overspend), or at most this many tokens (Claude Code asks for 32k-64k on every request; each request
    # in flight may then overspend by what it produces beyond this).
    budget_output_tokens: int | None = Field(None, ge=1)
    # A caller with a budget asking for a model no price covers (not in the catalogue, no upstream serving it
    # prices it or is flat-fee) or one an upstream priced by duration serves (no estimate bounds its cost):
    # `refuse` (403: the budget could not be held to it) or `allow` (it costs the budget nothing, or what
    # the request turns out to cost).
    unpriced_under_budget: Literal["refuse", "allow"] = "refuse"

    @field_validator("price_file")
    @classmethod
    def _usable(cls, value: Path | None) -> Path | None:
        # Read here, not only with the `prices` overrides: without a `prices` section their check never ran
        # (a default is not validated), and `config check` passed a file `serve` then refused.
        if value is not None:
            if not value.is_file():
                raise ValueError(not_a_file(value))
            build_catalogue(PriceOverrides(), value)
        return value


class AdminConfig(ConfigModel):
    # The admin API's own credential (use `${POOLGATE_ADMIN_TOKEN}`); unset = no admin API.
    # The length constraint inside, before the validator: it counts the stripped token (outside the Optional,
    # pydantic checked it after, and called the characters "items").
    token: Annotated[str, Field(min_length=16), BeforeValidator(_header_credential)] | None = Field(None, repr=False)

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `${POOLGATE_ADMIN_TOKEN:-}` with the variable unset leaves an empty string: no admin API.
        return None if value == "" else value


class GatewayConfig(ConfigModel):
    data_dir: HomePath = Path(DEFAULT_DATA_DIR)
    admin: AdminConfig = AdminConfig()
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    oauth: OAuthConfig = OAuthConfig()
    upstreams: tuple[UpstreamConfig, ...] = ()
    keys: tuple[StaticKey, ...] = ()
    callers: CallersConfig = CallersConfig()
    billing: BillingConfig = BillingConfig()
    # Price overrides: `models: {id: {input, output, cache_write_5m, …}}` (USD per million tokens),
    # `upstreams: {upstream id: {model id or "*": price}}`, `aliases: {name: model id}`.
    prices: PriceOverrides = PriceOverrides()

    @field_validator("prices")
    @classmethod
    def _prices_usable(cls, value: PriceOverrides, info: ValidationInfo) -> PriceOverrides:
        # Build the catalogue once here so that a bad price is a config error naming it, not a crash at start.
        billing = info.data.get("billing")
        build_catalogue(value, billing.price_file if isinstance(billing, BillingConfig) else None)
        return value

    def catalogue(self) -> Catalogue:
        """The price catalogue this configuration prices requests with: the shipped (or configured) price
        file with the `prices` overrides applied."""
        return build_catalogue(self.prices, self.billing.price_file)

    @model_validator(mode="after")
    def _unique_keys(self) -> GatewayConfig:
        # Two entries with one key: a request with it would be one of them, the other's limits ignored. The
        # message starts with the entry's path, which the error names the line of (a key value is a secret:
        # never shown).
        values = [("admin.token", self.admin.token)] if self.admin.token else []  # a caller's key would open it
        values += [(f"keys.{i}.key", k.key) for i, k in enumerate(self.keys)]
        values += [(f"callers.internal_keys.{i}.key", k.key) for i, k in enumerate(self.callers.internal_keys)]
        for what, entries in (
            ("key name", [(f"keys.{i}.name", k.name) for i, k in enumerate(self.keys)]),
            ("key value", values),
        ):
            seen: dict[str, str] = {}
            for where, value in entries:
                if value in seen:
                    shown = repr(value) if what == "key name" else f"(the same as {seen[value]})"
                    raise ValueError(f"{where}: duplicate {what} {shown}")
                seen[value] = where
        return self

    @field_validator("data_dir", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        # An empty path is the current directory (`data_dir: ${PGDATA:-}` with PGDATA unset put the store
        # wherever the command ran): the store's place is never a guess.
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"must not be empty: leave it out for the default, {DEFAULT_DATA_DIR} next to the file")
        return value

    @field_validator("upstreams")
    @classmethod
    def _unique_ids(cls, value: tuple[UpstreamConfig, ...]) -> tuple[UpstreamConfig, ...]:
        seen: set[str] = set()
        for index, upstream in enumerate(value):
            if upstream.id in seen:
                raise ValueError(f"upstreams.{index}.id: duplicate upstream id {upstream.id!r}")
            seen.add(upstream.id)
        return value

    def store_file(self) -> Path:
        """The store's SQLite file: `poolgate.db` in the data directory, or the one `store.url` names."""
        named = sqlite_file(self.store.url) if self.store.url else None
        path = named or self.data_dir / "poolgate.db"
        try:
            return path.resolve()
        except RuntimeError:
            # Python 3.11 and 3.12 raise this for a symlink loop on the way (3.13 an OSError): as an OSError, it
            # is the one line every command answers a store it cannot open with, not a traceback.
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None

    def store_url(self) -> str:
        return self.store.url or sqlite_file_url(self.store_file())


def build_catalogue(prices: PriceOverrides, price_file: Path | None = None) -> Catalogue:
    try:
        base = Catalogue.from_file(price_file) if price_file is not None else None
        return Catalogue.from_config(prices, base)
    except (CatalogueError, OSError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def substitute_env(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace `${NAME}` and `${NAME:-default}`; an unset variable without a default is an error, and so is a
    `${` that starts neither (`${KEY-A}`, `${A:-${B}}`): it was kept as written, and sent as an API key."""
    env = os.environ if environ is None else environ
    references = {match.start() for match in _ENV_REF.finditer(text) if "${" not in (match.group(2) or "")}
    if any(start.start() not in references for start in re.finditer(r"\$\{", text)):
        raise ConfigError(
            "holds a `${` that starts no ${NAME} or ${NAME:-default} (NAME: letters, digits and _; a default holds"
            " no `${`)"
        )

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set (referenced as ${{{name}}})")

    return _ENV_REF.sub(replace, text)


@dataclass(frozen=True)
class _BadReference:
    """A `${…}` that cannot be substituted (unset, or not written as one) at a key path of the document;
    `parse_config` adds the file and line."""

    message: str
    path: tuple[str | int, ...]


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str | int, ...], tuple[str, str]]:
    """`POOLGATE__SERVER__PORT=9000` as `{("server", "port"): ("POOLGATE__SERVER__PORT", "9000")}`; a number
    is a list index (`POOLGATE__UPSTREAMS__0__API_KEY`)."""
    overrides: dict[tuple[str | int, ...], tuple[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = tuple(
            int(part) if part.isdecimal() else part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part
        )
        if path:
            overrides[path] = (name, value)
    return overrides


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`POOLGATE__SERVER__PORT=9000` sets `server.port`; nested sections by double underscore, list entries
    by index (`POOLGATE__UPSTREAMS__0__API_KEY` sets the first upstream's `api_key`)."""
    env = os.environ if environ is None else environ
    for path, (name, value) in _env_overrides(env).items():
        node: Any = data
        for depth, part in enumerate(path):
            if isinstance(part, int) != isinstance(node, list) or (isinstance(part, int) and part >= len(node)):
                where = ".".join(str(p) for p in path[:depth]) or "the configuration"
                entries = f"has {len(node)} entries" if isinstance(node, list) else "is not a list"
                raise ConfigError(f"environment variable {name}: {where} {entries}: there is no entry {part}")
            if depth == len(path) - 1:
                break
            child = node[part] if isinstance(part, int) else node.get(part)
            if not isinstance(child, dict | list):  # a section left out: an empty one of the kind named next
                child = node[part] = [] if isinstance(path[depth + 1], int) else {}
            node = child
        if not value or _is_secret(path, _CREDENTIALS):
            node[path[-1]] = value
            continue
        try:
            node[path[-1]] = _yaml_document(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {name}: not valid YAML: {_yaml_problem(exc)}") from None
    return data


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key written twice in one mapping; its message names the key (a field's name, not a value)."""


# What PyYAML's constructors raise for a value its tag does not fit (`!!int abc` a ValueError, `!!bool abc` a
# KeyError, `!!timestamp abc` an AttributeError), quoting the value: a secret, as often as not.
_NOT_OF_ITS_TAG = (ValueError, KeyError, AttributeError, TypeError, OverflowError)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: YAML keeps the last one silently (a
    second `routing:` section dropped the first's pins; `{api_key: k1, api_key: k2}` took k2)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except _NOT_OF_ITS_TAG:
            kind = node.tag.rpartition(":")[2]
            raise yaml.constructor.ConstructorError(
                problem=f"the value is not a valid {kind} (its YAML tag, or its form, says it is one)",
                problem_mark=node.start_mark,
            ) from None

    # YAML 1.1's numbers that YAML 1.2 (and every reader of a config file) takes otherwise: a leading zero is
    # decimal (`port: 017` listened on port 15), and base 60 is no number (`first_byte_seconds: 1:30` was 90 s;
    # kept as the text, which the field then refuses). Hex (`0x1F`) stays a number.
    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        text = self.construct_scalar(node)
        if ":" in text:
            return text
        digits = text.replace("_", "")
        if digits.lstrip("+-").startswith("0") and digits.lstrip("+-")[1:2].isdigit():
            return int(digits, 10)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        text = self.construct_scalar(node)
        return text if ":" in text else super().construct_yaml_float(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # `!!map abc`, `!!set abc`: the YAML error that says so
            return super().construct_mapping(node, deep)
        # Before the merge keys are flattened in: a key may override one merged from an anchor (`<<: *base`).
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if not isinstance(key, Hashable):  # `!!set a: 1`: the YAML error that says so
                continue
            if key in first:
                raise _DuplicateKey(
                    problem=f"duplicate key {key!r} (first at line {first[key].start_mark.line + 1})",
                    problem_mark=key_node.start_mark,
                )
            first[key] = key_node
        return super().construct_mapping(node, deep)


def _yaml_document(text: str) -> Any:
    """`text` read as YAML (by `_Loader`); a YAMLError, never another exception, for what cannot be read."""
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:  # some 500 levels of `[`: YAML's composer recurses
        raise yaml.YAMLError("nested too deeply") from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each key path of the YAML document to its 1-based line, for error messages."""
    index: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        # A key's line is its own, not its value's: a block mapping's value starts on the line after it (an
        # unknown `serverr:` section was reported at its first field).
        if isinstance(node, yaml.MappingNode):
            for key, child in node.value:
                index.setdefault((*path, str(key.value)), key.start_mark.line + 1)
                walk(child, (*path, str(key.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                index.setdefault((*path, i), child.start_mark.line + 1)
                walk(child, (*path, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return index
    if root is not None:
        index[()] = root.start_mark.line + 1
        walk(root, ())
    return index


def _located(source: str, lines: Mapping[tuple[str | int, ...], int], path: tuple[str | int, ...]) -> str:
    """`file:line` of the innermost key of `path` the file has (a default filled in has none), else `file`."""
    probe = path
    while probe:
        line = lines.get(probe)
        if line:
            return f"{source}:{line}"
        probe = probe[:-1]
    return source


def _override_of(
    loc: tuple[str | int, ...],
    overrides: Mapping[tuple[str | int, ...], tuple[str, str]],
    lines: Mapping[tuple[str | int, ...], int],
) -> str | None:
    """The environment variable that set the value at `loc`, if one did: an error there is not the file's."""
    for path, (name, _) in overrides.items():
        if loc[: len(path)] == path:
            return name
        # An override can create a key the file does not have (an unknown section): the error is at that key.
        if loc and path[: len(loc)] == loc and loc not in lines:
            return name
    return None


def _named(
    loc: tuple[str | int, ...], message: str, lines: Mapping[tuple[str | int, ...], int]
) -> tuple[str | int, ...]:
    """The deepest key path below `loc` that a section's own check names at the start of its message
    (`Value error, prices.models.my-model: …`), for its line; else `loc`."""
    text = message.removeprefix("Value error, ")
    named = [
        path
        for path in lines
        if len(path) > len(loc)
        and path[: len(loc)] == loc
        and text.startswith((f"{dotted(path)}:", f"{dotted(path)} "))
    ]
    return max(named, key=len, default=loc)


def _message(error: ErrorDetails) -> str:
    """pydantic's message as `problem_text` words it, but for a list, which pydantic calls a tuple ("Input
    should be a valid tuple"): one with nothing under it (`models:` and the lines below it commented out),
    or a mapping or a value where a list belongs (`upstreams:` with its entries' `- ` left out)."""
    if error["type"] in ("tuple_type", "list_type"):
        if error["input"] is None:
            return "nothing under it: a list is needed"
        return "a list is needed (each entry on a line of its own starting with `- `, or `[a, b]`)"
    parent = tuple(error["loc"])[:-1]
    return problem_text(error, _fields_at(parent) | _fields_of_sections_at(parent))


def _fields_at(path: tuple[str | int, ...]) -> set[str]:
    """The fields the configuration's models read at `path` (`server`: host, port, …), for an unknown
    field's likely meaning; none where the path leads to no model."""
    kinds: list[Any] = [GatewayConfig]
    for part in path:
        kinds = [inner for kind in kinds for inner in _below(kind, part)]
    return {
        name
        for kind in kinds
        if isinstance(kind, type) and issubclass(kind, BaseModel)
        for field_name, field in kind.model_fields.items()
        for name in (field_name, field.alias)
        if name
    }


def _fields_of_sections_at(path: tuple[str | int, ...]) -> set[str]:
    """The fields one section down from `path`, as `server.port`: a field written a level too high (`port:`
    not indented under `server:`) is unknown where it stands."""
    return {f"{section}.{field}" for section in _fields_at(path) for field in _fields_at((*path, section))}


def _below(kind: Any, part: str | int) -> list[Any]:
    """The types a value of `kind` holds at `part` of an error's path (a field, a list index, a mapping's
    key); a union's members each, and for a name none of them reads, the members themselves: pydantic puts
    the member's tag in the path (`billing.metered.pricing`)."""
    origin, args = get_origin(kind), get_args(kind)
    if origin is Annotated:
        return _below(args[0], part)
    if origin in (Union, UnionType):
        found = [inner for member in args for inner in _below(member, part)]
        return found or [member for member in args if isinstance(part, str)]
    if isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(part, str):
        return [field.annotation for name, field in kind.model_fields.items() if part in (name, field.alias)]
    if origin in (tuple, list) and isinstance(part, int):
        return [arg for arg in args if arg is not Ellipsis]
    if origin in (dict, Mapping) and isinstance(part, str):
        return [args[1]]
    return []


def _as_written(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """An error's path as the file writes it: without the tags pydantic puts in it for a tagged union's member
    (`billing.metered.pricing.tiered.tiers` is `billing.pricing.tiers` in the file)."""
    written: list[str | int] = []
    kinds: list[Any] = [GatewayConfig]
    for part in loc:
        tagged = [member for kind in kinds for member in _tagged(kind, part)]
        if tagged:
            kinds = tagged
            continue
        kinds = [inner for kind in kinds for inner in _below(kind, part)]
        written.append(part)
    return tuple(written)


def _tagged(kind: Any, part: str | int) -> list[Any]:
    """The members of the union `kind` whose tag `part` is (one of its fields is `Literal[part]`), when no
    member has a field of that name; none otherwise."""
    members = _models_of(kind)
    if len(members) < 2 or not isinstance(part, str) or any(part in member.model_fields for member in members):
        return []
    return [
        member
        for member in members
        if any(
            get_origin(field.annotation) is Literal and part in get_args(field.annotation)
            for field in member.model_fields.values()
        )
    ]


def _models_of(kind: Any) -> list[type[BaseModel]]:
    """The models a field of type `kind` may hold: itself, or a union's members (through `Annotated` and
    `| None`)."""
    origin, args = get_origin(kind), get_args(kind)
    if origin is Annotated:
        return _models_of(args[0])
    if origin in (Union, UnionType):
        return [model for member in args for model in _models_of(member)]
    return [kind] if isinstance(kind, type) and issubclass(kind, BaseModel) else []


def _format_errors(
    exc: ValidationError,
    source: str,
    lines: Mapping[tuple[str | int, ...], int],
    overrides: Mapping[tuple[str | int, ...], tuple[str, str]],
) -> str:
    parts = []
    for error in exc.errors():
        loc = _as_written(tuple(error["loc"]))
        variable = _override_of(loc, overrides, lines)
        named = _named(loc, error["msg"], lines)
        at = f"environment variable {variable}" if variable else _located(source, lines, named)
        # A check of the whole file names the field it is about itself (`keys.1.key: duplicate key value`):
        # "(top level): " before it said nothing.
        field = "" if not loc and named != loc else f"{dotted(loc)}: "
        parts.append(f"{at}: {field}{_message(error)}")
    if len(parts) == 1:
        return f"invalid configuration: {parts[0]}"
    return _several(parts)


def _several(problems: list[str]) -> str:
    """Problems found in one check, a line each: all of them are fixed before the next run."""
    return "invalid configuration:\n  " + "\n  ".join(problems)


# What the YAML parser quotes of the text: an alias's, an anchor's or a tag's name, which is the rest of an
# unquoted value (`api_key: *Secret…` is an alias to YAML, `!Secret…` a tag): never shown, a secret may be
# one. A character (`'\t'`) and a token's kind (`'<block end>'`) are kept.
_QUOTED = re.compile(r"""( ?)('[^']*'|"[^"]*")""")


def _unquoted(problem: str) -> str:
    def hidden(match: re.Match[str]) -> str:
        text = match.group(2)[1:-1]
        return match.group(0) if len(text) <= 2 or text.startswith("<") else ""

    return _QUOTED.sub(hidden, problem)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A parser error without its `in "<unicode string>"` marks, which name the string, not the file, and
    without the text it quotes (see _QUOTED)."""
    if isinstance(exc, _DuplicateKey) and exc.problem is not None:
        return exc.problem
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem is None:
        # str() of a marked error shows the line it is on, secret or not: only what it says of the problem.
        problem = (exc.context or "a syntax error") if isinstance(exc, yaml.MarkedYAMLError) else str(exc)
    else:
        problem = exc.problem
        context = exc.context_mark
        if exc.context and context is not None:
            problem = f"{problem} ({exc.context} at line {context.line + 1})"
        elif exc.context:
            problem = f"{problem} ({exc.context})"
    if problem.startswith(("found undefined alias", "could not determine a constructor for the tag")):
        problem += " (a value starting with * & or ! is read as YAML syntax: quote it)"
    return _unquoted(problem)


def yaml_error(exc: yaml.YAMLError, source: str) -> str:
    """A YAML file's syntax error as one line: `source:LINE: not valid YAML: what`."""
    mark = exc.problem_mark if isinstance(exc, yaml.MarkedYAMLError) else None
    at = f"{source}:{mark.line + 1}" if mark is not None else source
    return f"{at}: not valid YAML: {_yaml_problem(exc)}"


# The secrets only the gateway itself uses (upstream credentials, the admin token, JWT HMAC secrets), by
# their place in the document (`None`: any list index).
_SECRETS = (("upstreams", None, "api_key"), ("admin", "token"), ("callers", "jwt_issuers", None, "secret"))
# What stands in for an unset one where none is needed; long enough for every length rule on them.
_UNSET_SECRET = "(unset: this command does not use it)".ljust(64, ".")


# Every credential: the gateway's own secrets and the gateway keys callers present. An environment override
# of one is its value as written, never YAML (`abc #tail` lost its tail, quotes were dropped, `null` turned
# the admin API off, an all-digit token was a number and refused, `*abc` was an alias the error named).
_CREDENTIALS = (*_SECRETS, ("keys", None, "key"), ("callers", "internal_keys", None, "key"))


# A credential written as a shell reads a variable (`api_key: $ANTHROPIC_KEY`) was taken as those characters.
# Only in credentials: elsewhere a `$` is a `$` (no credential of Anthropic's or poolgate's starts with one).
_SHELL_REFERENCE = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*")


def _is_secret(path: tuple[str | int, ...], patterns: tuple[tuple[str | None, ...], ...] = _SECRETS) -> bool:
    return any(
        len(path) == len(pattern) and all(part in (None, step) for part, step in zip(pattern, path, strict=True))
        for pattern in patterns
    )


def _substitute_values(
    node: Any,
    environ: Mapping[str, str] | None,
    secrets_needed: bool,
    problems: list[_BadReference],
    path: tuple[str | int, ...] = (),
) -> Any:
    """Substitute in string values only, so that comments and keys are left alone. Every reference that cannot
    be substituted is added to `problems` (its value left as written), so that one check names them all: a
    file reading two keys from the environment, with neither exported, named the second only once the first
    was set."""
    if isinstance(node, str):
        try:
            if _SHELL_REFERENCE.fullmatch(node) and _is_secret(path, _CREDENTIALS):
                # Never the value: a credential it may be, however unlikely.
                raise ConfigError("reads like a shell variable ($NAME), which is not replaced: write ${NAME}")
            return substitute_env(node, environ)
        except ConfigError as exc:
            if not secrets_needed and _is_secret(path):
                return _UNSET_SECRET
            overrides = _env_overrides(os.environ if environ is None else environ)
            if any(path[: len(overridden)] == overridden for overridden in overrides):
                # A POOLGATE__* override sets this value (`api_key: ${KEY_A}` in the file, the key in
                # POOLGATE__UPSTREAMS__0__API_KEY): what the file would have had is not needed.
                return node
            problems.append(_BadReference(str(exc), path))
            return node
    if isinstance(node, dict):
        return {
            key: _substitute_values(value, environ, secrets_needed, problems, (*path, str(key)))
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [
            _substitute_values(value, environ, secrets_needed, problems, (*path, i)) for i, value in enumerate(node)
        ]
    return node


def _refuse_a_moved_store(written: Path, anchored: Path) -> None:
    """A relative data_dir was taken from the current directory before it was taken from the file's: a store
    made then is not silently replaced by a new, empty one (every key refused, stored upstreams gone)."""
    if written.is_absolute():
        return
    before = Path.cwd() / written
    if (before / "poolgate.db").exists() and not (anchored / "poolgate.db").exists() and before.resolve() != anchored:
        raise ConfigError(
            f"data_dir {written} is taken from the configuration file's directory ({anchored}), which holds no "
            f"store, but {before} (from the current directory) holds one: this gateway's, if it was made when a "
            f"relative data_dir was taken from the current directory (as an earlier poolgate did: move it to "
            f"{anchored}, or set data_dir to {before.resolve()}), or another configuration's (then set this "
            "file's data_dir to an absolute path, or run the command from another directory)"
        )


def _anchored(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """The file's relative paths (and the default data directory) taken from `base`, the file's directory:
    `poolgate keys create --config /srv/gw/gw.yaml` run elsewhere made a second, empty store next to the
    shell, and the key it printed was unknown to the gateway."""

    def located(path: Path) -> Path:
        path = path.expanduser()  # `~/poolgate` is the home directory's, not a directory named ~
        return path if path.is_absolute() else base / path

    def anchor(section: object, field: str) -> None:
        # A blank path is left as it is, for its field to refuse (`data_dir: "  "` made a directory named so).
        if isinstance(section, dict) and isinstance(value := section.get(field), str) and value.strip():
            section[field] = str(located(Path(value)))

    data.setdefault("data_dir", DEFAULT_DATA_DIR)
    anchor(data, "data_dir")
    anchor(data.get("billing"), "price_file")
    callers = data.get("callers")
    issuers = callers.get("jwt_issuers") if isinstance(callers, dict) else None
    for issuer in issuers if isinstance(issuers, list) else ():
        anchor(issuer, "public_key_file")
        anchor(issuer, "jwks_file")
    store = data.get("store")
    if isinstance(store, dict) and isinstance(url := store.get("url"), str) and url.startswith("sqlite"):
        database = sqlite_file(url)
        # Rewritten only when relative or under ~ (a URL given whole stays as written).
        if database is not None and located(database) != database:
            store["url"] = sqlite_url(url, located(database))
    return data


def parse_config(
    text: str,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    base: Path | None = None,
    secrets_needed: bool = True,
    data_dir: Path | None = None,
) -> GatewayConfig:
    """The configuration in `text`; `base` is the directory relative paths in it are taken from (the file's),
    None for the current one; `data_dir` (a command line's) overrides the file's and the environment's.
    Without `secrets_needed` (commands that only manage keys and read the store), an unset `${NAME}` in an
    upstream's credential, the admin token or a JWT secret is no error: an operator listing keys or reading
    spend need not have production API keys in the shell."""
    try:
        data = _yaml_document(text)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error(exc, source)) from None
    if data is None:  # an empty file, or comments only (`[]`, `false` or `0` is no configuration)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    problems: list[_BadReference] = []
    try:
        data = _substitute_values(data, environ, secrets_needed, problems)
    except RecursionError:  # `a: &a [*a]`: YAML takes it, nothing can walk it
        raise ConfigError(
            f"{source}: not valid configuration: nested too deeply, or an alias refers to the value it is in"
        ) from None
    if problems:
        lines = _line_index(text)
        found = [
            f"{_located(source, lines, problem.path)}: {dotted(problem.path)}: {problem.message}"
            for problem in problems
        ]
        raise ConfigError(found[0] if len(found) == 1 else _several(found))
    written = data.get("data_dir", DEFAULT_DATA_DIR)
    if base is not None:
        data = _anchored(data, base)
    anchored = data.get("data_dir")
    data = apply_env_overrides(data, environ)
    if data_dir is not None:
        data["data_dir"] = str(data_dir)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        overrides = _env_overrides(os.environ if environ is None else environ)
        raise ConfigError(_format_errors(exc, source, _line_index(text), overrides)) from None
    # After validation: a mistake in the file is what its author needs to hear first.
    if (
        isinstance(written, str)
        and base is not None
        and data.get("data_dir") == anchored  # the file's says where the store is (no override)
        and not config.store.url
    ):
        _refuse_a_moved_store(Path(written).expanduser(), Path(anchored))
    return config


def load_config(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    secrets_needed: bool = True,
    data_dir: Path | None = None,
) -> GatewayConfig:
    """Load the file at `path`, or the defaults plus env overrides when there is none (see `parse_config`)."""
    if path is None:
        return parse_config("{}", "<defaults>", environ, secrets_needed=secrets_needed, data_dir=data_dir)
    return parse_config(read_text(path), str(path), environ, path.resolve().parent, secrets_needed, data_dir)


def read_text(path: Path) -> str:
    """A configuration file's text; a ConfigError saying why it cannot be had."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})") from None

"""authn: caller credentials → `Principal`.

Gateway keys, static and internal keys are stored and looked up by hash; a process remembers the keys it
accepted lately (in memory, like the JWTs below) until the keys change, so a caller's next request skips
the hashing. Signed JWTs
(`oauth_subject`, `workload_identity`) are verified once and then cached until they expire, so a caller
that sends the same token on every request (Claude Code does) pays for one signature check, not one per
request. Claims are parsed here, once, into a frozen `CallerClaims`; bad claims refuse the credential
rather than silently lifting a limit.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple

import jwt
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from poolgate.api.errors import ApiError
from poolgate.api.http import Fields, fields_of, header_text
from poolgate.config import (
    CallerKeyConfig,
    CallersConfig,
    ConfigError,
    JwtClaimMapping,
    JwtIssuerConfig,
    StaticKey,
)
from poolgate.lifecycle.claims import CLAIM_FIELDS, NO_CLAIMS, CallerClaims, ClaimsError, parse_claims
from poolgate.lifecycle.context import Principal, PrincipalKind, RawHeaders
from poolgate.store.repo import KeyRow, display_prefix, hash_key
from poolgate.telemetry.logging import BoundedLog

log = logging.getLogger("poolgate.authn")
# A client can send a wrong credential thousands of times a second.
_refusals = BoundedLog(log)

# Verified tokens kept; past this many the cache starts over (a burst of one-off tokens must not grow memory).
TOKEN_CACHE_SIZE = 4096
# Gateway keys recently accepted, by the key itself: hashing a key costs more than the rest of
# authentication on a busy process (OpenSSL's digest set-up on cold caches), and callers repeat theirs.
KEY_CACHE_SIZE = 4096
# Principal ids land in the usage table's 64-character column.
MAX_ID = 64
# What marks a principal id whose subject is hashed.
_HASHED = "h:"

# Checked in order: subclasses first (InvalidSignatureError is a DecodeError).
_JWT_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "it has expired"),
    (jwt.ImmatureSignatureError, "it is not valid yet (nbf)"),
    (jwt.InvalidIssuedAtError, "it was issued in the future (iat)"),
    (jwt.InvalidAudienceError, "its audience (aud) is not accepted here"),
    (jwt.InvalidIssuerError, "its issuer (iss) is not accepted here"),
    (jwt.InvalidSignatureError, "its signature does not verify"),
    (jwt.InvalidKeyError, "its signature does not verify with the issuer's key"),
    (jwt.InvalidAlgorithmError, "its algorithm is not accepted for this issuer"),
    (jwt.DecodeError, "it is malformed"),
)


# Refusals a fresh token from the same issuer may not meet, so a client that fetches one on a 401 (Claude Code's
# apiKeyHelper) may retry: the token is not valid yet (or expired recently: see `_recently_expired`), or it was
# signed with a key the gateway does not hold (a token from before the issuer rotated its keys). A fresh token
# has the same issuer, algorithm, audience and claims, so every other refusal is final.
_RETRYABLE_JWT_ERRORS = (
    jwt.ImmatureSignatureError,
    jwt.InvalidSignatureError,
    jwt.InvalidKeyError,
)


# A token fetched for Claude Code by its `apiKeyHelper` is at most 5 minutes old when sent (the helper's default
# time to live): one that expired longer ago than twice that comes from no helper (a token handed out once, in
# ANTHROPIC_AUTH_TOKEN), and a retry sends it again: Claude Code retried such a 401 for three minutes, silently.
RETRY_EXPIRED_WITHIN_SECONDS = 600.0


def _recently_expired(token: str) -> bool:
    """Whether an expired token (its signature verified) expired recently enough for a fresh one to be on its
    way (see RETRY_EXPIRED_WITHIN_SECONDS)."""
    exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    # Compared, not subtracted: an int and a float compare exactly, and `exp` may be any signed integer
    # (-10**400 does not fit a float).
    return isinstance(exp, int | float) and exp > time.time() - RETRY_EXPIRED_WITHIN_SECONDS


# PyJWT's words for a time claim that is no number (a DecodeError for `exp` and `nbf`, an InvalidIssuedAtError
# for `iat`).
_NOT_A_NUMBER = re.compile(r"\((exp|nbf|iat)\) must be an integer")


def jwt_refusal(exc: jwt.PyJWTError) -> str:
    """Why a token is refused, in words. PyJWT reports an `iat` in the future as an immature signature,
    like an `nbf` still ahead, and a time claim that is no number as the claim's own error (an `iat` of
    `{"x": 1}` read "issued in the future"): its message tells them apart."""
    text = str(exc)
    if (wrong := _NOT_A_NUMBER.search(text)) is not None:
        return f"its {wrong.group(1)!r} claim is not a number"
    if text == "Subject must be a string":
        return "its subject (sub) is not a string"
    if isinstance(exc, jwt.ImmatureSignatureError) and "(iat)" in text:
        return "it was issued in the future (iat)"
    return next((text for kind, text in _JWT_ERRORS if isinstance(exc, kind)), "it is not valid")


# Set while the gateway re-checks a caller for a request of its own (`Authenticator.still_accepted`).
_QUIET: ContextVar[bool] = ContextVar("poolgate_authn_quiet", default=False)


def _refused(message: str, *args: object) -> None:
    """A refused credential, logged: what explains a client's 401 (Claude Code retries one silently)."""
    if not _QUIET.get():
        _refusals.warning(message, *args)


def _credential_refused(message: str, retryable: bool = False) -> ApiError:
    """A 401 for a credential, with `x-should-retry: false` unless a retry may change the answer (see
    `_RETRYABLE_JWT_ERRORS`): Claude Code retried a wrong gateway key, or a token from an unknown issuer, for
    minutes, silently, before it said what was wrong."""
    return ApiError(401, message, "authentication_error", [] if retryable else [(b"x-should-retry", b"false")])


# What mends each state of a refused key, said in its 401. Interactive Claude Code shows a 401 as "Please run
# /login · API Error: 401 …", and no Claude login opens the gateway: the advice says what does.
_STATE_ADVICE = {
    "unknown": "set ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN to the gateway key you were given (a Claude /login is"
    " no gateway key)",
    "revoked": "ask the gateway's operator for a new key and set ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN to it (a"
    " Claude /login is no gateway key)",
    "unusable": "the gateway refuses the key's limits as stored; its operator has to set them again (`poolgate keys"
    " list` says why)",
}


def refusal_advice(key: str, state: str) -> str:
    """What a refused key's 401 adds to its state: what the key shows went wrong, else what mends the state.

    A user who sets only ANTHROPIC_BASE_URL sends their Claude Code login's token, or the Anthropic key left in
    their shell, and "Invalid gateway key" alone did not tell them that it is no gateway key at all. A key
    sent as `x-api-key: Bearer pg-…` (the Authorization header's form) read as a wrong key too. No advice names
    that header: Claude Code shows an error whose message does in words of its own ("Invalid API key · Fix external
    API key"; for ANTHROPIC_AUTH_TOKEN, "Not logged in · Please run /login")."""
    if key[:7].lower() == "bearer ":
        return (
            "the key came with 'Bearer ' before it: set ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN to the key alone"
            " (the client adds 'Bearer ' where it belongs)"
        )
    if key.startswith("sk-ant-oat"):
        sent = "a Claude login's token"
    elif key.startswith("sk-ant-"):
        sent = "an Anthropic API key"
    else:
        return _STATE_ADVICE[state]
    return (
        f"{sent} was sent, not a key of this gateway; set ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN to the gateway"
        " key you were given"
    )


def presented_key(fields: Fields, name: bytes = b"x-api-key") -> str | None:
    """The caller's credential from the `name` header or `Authorization: Bearer` (Claude Code uses either):
    blanks around it are not part of it, and a blank header is no credential."""
    value = fields.get(name)
    if value and value.strip():
        return header_text(value).strip()
    return bearer_token(fields)


def bearer_token(fields: Fields) -> str | None:
    auth = fields.get(b"authorization")
    if auth and auth[:7].lower() == b"bearer ":
        return header_text(auth[7:]).strip() or None
    return None


def looks_like_jwt(token: str) -> bool:
    # A JOSE header is a JSON object, so its base64url always starts with "eyJ"; gateway keys start "pg-".
    return token.startswith("eyJ") and token.count(".") == 2


def _bounded_id(prefix: str, subject: str) -> str:
    """`<prefix>:<subject>`, or for a subject too long for it, `<prefix>:h:<its hash>`. A subject that starts
    with `h:` is hashed too: written as a hashed id, it was that long subject's caller (budget, quotas,
    ledger)."""
    principal_id = f"{prefix}:{subject}"
    if len(principal_id) <= MAX_ID and not subject.startswith(_HASHED):
        return principal_id
    return f"{prefix}:{_HASHED}{hashlib.sha256(subject.encode()).hexdigest()[:32]}"


def _claim(payload: Mapping[str, Any], name: str) -> Any:
    """A claim by exact name (namespaced claims are often URLs with dots), else by dotted path."""
    if name in payload:
        return payload[name]
    node: Any = payload
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


def _load_public_key(config: JwtIssuerConfig) -> Any:
    assert config.public_key_file is not None
    where = f"callers.jwt_issuers[{config.name}].public_key_file {config.public_key_file}"
    try:
        data = config.public_key_file.read_bytes()
        if b"BEGIN CERTIFICATE" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{where}: not a PEM public key or certificate") from None
    for alg in config.algorithms:
        if not isinstance(key, _KEY_TYPES[alg[:2]]):
            raise ConfigError(f"{where}: a {type(key).__name__} cannot verify {alg}")
    return key


class _JwksKey(NamedTuple):
    kid: str | None
    key: Any
    # The one algorithm the JWK says it is for (its `alg`); None: any its type can verify.
    alg: str | None

    def verifies(self, alg: str) -> bool:
        """Whether a token signed with `alg` may be verified with this key."""
        return isinstance(self.key, _KEY_TYPES.get(alg[:2], ())) and self.alg in (None, alg)


def _verifies_tokens(jwk: Mapping[str, Any]) -> bool:
    """Whether a JWK says it is for signatures, or says nothing of what it is for. A key published for
    encryption (`use: enc`: what clients encrypt to the issuer with) signs no token of the issuer's, and
    whoever holds its private half may not be the issuer; nor may whoever holds a key whose `key_ops` leave out
    `verify` (one for encrypting, or wrapping keys). An entry with its private part verifies with its public
    half: its `sign` is that half's `verify` (PyJWT writes a private key's JWK with `key_ops: ["sign"]`)."""
    if jwk.get("use") not in (None, "sig"):
        return False
    ops = jwk.get("key_ops")
    if ops is None:
        return True
    return isinstance(ops, list) and ("verify" in ops or ("sign" in ops and "d" in jwk))


def _load_jwks(config: JwtIssuerConfig) -> tuple[_JwksKey, ...]:
    """The JWKS's verification keys, in the file's order: kids may be absent or repeat (keys being rotated),
    so they are no dictionary's keys."""
    assert config.jwks_file is not None
    where = f"callers.jwt_issuers[{config.name}].jwks_file {config.jwks_file}"
    try:
        document = orjson.loads(config.jwks_file.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not a usable JWKS: {exc}") from None
    # Each key read as PyJWKSet reads it (skipped when PyJWT cannot read it), but kept with its JWK: PyJWK
    # keeps no `key_ops`, and its `algorithm_name` is a guess from the key's type when the JWK names no `alg`.
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{where}: not a usable JWKS: no keys (a JSON object with a list of JWKs as "keys")')
    read = [(jwk, pyjwk) for jwk in entries if isinstance(jwk, dict) and (pyjwk := _read_jwk(jwk)) is not None]
    if not read:
        raise ConfigError(f"{where}: not a usable JWKS: PyJWT can read none of its keys")
    # An entry with its private part (`d`) gives a private key, which verifies with its public half (PyJWT
    # cannot verify with the private key itself).
    loaded = tuple(
        _JwksKey(
            pyjwk.key_id,
            pyjwk.key.public_key() if hasattr(pyjwk.key, "private_bytes") else pyjwk.key,
            jwk.get("alg"),
        )
        for jwk, pyjwk in read
        if _verifies_tokens(jwk)
    )
    if not any(key.verifies(alg) for key in loaded for alg in config.algorithms):
        # As a public key file that cannot verify them stops the start: every token would be refused.
        raise ConfigError(f"{where}: none of its keys can verify {', '.join(config.algorithms)}")
    for key in loaded:
        if key.alg is not None and key.alg not in config.algorithms:
            log.warning(
                "%s: the key %s is for %s, which the issuer's algorithms (%s) do not list: it verifies no token",
                where,
                "without a kid" if key.kid is None else f"{key.kid!r}",
                key.alg,
                ", ".join(config.algorithms),
            )
    return loaded


def _read_jwk(jwk: dict[str, Any]) -> jwt.PyJWK | None:
    """A JWK's key; None when PyJWT cannot read it (an unknown `kty`, curve or `alg`; an `alg` that is no
    string, which PyJWT answers with a TypeError; a symmetric key without its `k`, a KeyError; a number
    that is not base64url, a ValueError where PyJWT does not wrap it)."""
    try:
        return jwt.PyJWK(jwk)
    except (jwt.PyJWTError, TypeError, KeyError, ValueError):
        return None


_BUDGET_SPELLINGS = frozenset({"budget_usd", "budget_micro_usd"})


def budget_spellings_left_unread(mapping: JwtClaimMapping) -> frozenset[str]:
    """The budget's spellings a token is not read for. The budget is one claim written two ways: a mapping
    that says where one of them lives (a claim of the issuer's, or null: the defaults only) says where the
    budget lives, so the other, left at its default name, is not read either: a token's top-level
    `budget_micro_usd` replaced a budget kept to the defaults, or read from `poolgate.budget_usd`."""
    written = _BUDGET_SPELLINGS & mapping.model_fields_set
    return _BUDGET_SPELLINGS - written if written else frozenset()


class JwtIssuer:
    """One trusted issuer: its verification key, the checks, and how its claims map to caller claims."""

    def __init__(self, config: JwtIssuerConfig) -> None:
        self.name = config.name
        self.kind: PrincipalKind = config.kind
        self.issuer = config.issuer
        self._audience = list(config.audience)
        self._algorithms = list(config.algorithms)
        self._leeway = config.leeway_seconds
        self._subject_claim = config.subject_claim
        self._name_claim = config.name_claim
        mapping = config.claim_mapping
        self._mapping = [
            (f, getattr(mapping, f))
            for f in CLAIM_FIELDS
            if getattr(mapping, f) is not None and f not in budget_spellings_left_unread(mapping)
        ]
        self._defaults: dict[str, object] = config.defaults.model_dump(exclude_unset=True)
        self._secret = config.secret.encode() if config.secret is not None else None
        self._public_key = _load_public_key(config) if config.public_key_file is not None else None
        self._jwks = _load_jwks(config) if config.jwks_file is not None else None

    def _refuse(self, reason: str, retryable: bool = False) -> ApiError:
        return _credential_refused(f"Invalid token from issuer {self.name!r}: {reason}", retryable)

    def _keys(self, token: str) -> tuple[Any, ...]:
        """The keys that may have signed `token`, to be tried in turn; at least one."""
        if self._secret is not None:
            return (self._secret,)
        if self._public_key is not None:
            return (self._public_key,)
        assert self._jwks is not None
        header = jwt.get_unverified_header(token)
        kid, alg = header.get("kid"), header.get("alg")
        # A token naming no kid may come from any of the keys (a JWKS of kid-less keys while rotating), and
        # one kid may name several keys: each is tried. A JWKS holds a few keys, so a forged token costs a
        # few signature checks at most.
        named = tuple(key for key in self._jwks if kid is None or key.kid == kid)
        if not named:
            raise self._refuse("its key id (kid) is not in the issuer's JWKS", retryable=True)
        if alg not in self._algorithms:
            return (named[0].key,)  # refused for its algorithm whatever the key
        # A JWKS may hold keys of several types (an RSA and an EC key while rotating): only those the token's
        # algorithm verifies with are tried (PyJWT answers a mismatch with a TypeError, not a refusal); and a
        # key whose JWK names its algorithm verifies tokens of that one only (an RS256 key, no PS256 token).
        usable = tuple(key.key for key in named if key.verifies(alg))
        if not usable:
            raise self._refuse(
                f"its key id (kid) names a key that cannot verify {alg}"
                if kid is not None
                else f"the issuer's JWKS holds no key that can verify {alg}",
                retryable=True,
            )
        return usable

    def _decode(self, token: str) -> dict[str, Any]:
        *others, last = self._keys(token)
        for key in others:
            try:
                return self._decode_with(token, key)
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):  # InvalidKeyError: an EC key of another curve
                continue  # signed with another of the issuer's keys, perhaps
        return self._decode_with(token, last)

    def _decode_with(self, token: str, key: Any) -> dict[str, Any]:
        return jwt.decode(
            token,
            key,
            algorithms=self._algorithms,
            audience=self._audience,
            issuer=self.issuer,
            leeway=self._leeway,
            options={"require": ["exp", "iss", "aud"]},
        )

    def verify(self, token: str) -> tuple[Principal, float]:
        """The principal a valid token stands for, and until when (epoch seconds) that answer holds."""
        try:
            payload = self._decode(token)
        except jwt.MissingRequiredClaimError as exc:
            raise self._refuse(f"it lacks the required {exc.claim!r} claim") from None
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError) as exc:
            # Raised once the signature verified, so the claims read here are the issuer's.
            if (claim := _time_claim_not_a_number(jwt.decode(token, options={"verify_signature": False}))) is not None:
                raise self._refuse(f"its {claim!r} claim is not a number") from None
            retryable = _recently_expired(token) if isinstance(exc, jwt.ExpiredSignatureError) else True
            raise self._refuse(jwt_refusal(exc), retryable) from None
        except jwt.PyJWTError as exc:
            raise self._refuse(jwt_refusal(exc), isinstance(exc, _RETRYABLE_JWT_ERRORS)) from None
        except (TypeError, ValueError):  # a key PyJWT cannot use for this token: refused all the same
            raise self._refuse("it cannot be verified with the issuer's key", retryable=True) from None
        if (claim := _not_text(payload)) is not None:
            raise self._refuse(f"its {claim!r} claim is not text (half of a surrogate pair)")
        subject = payload.get(self._subject_claim)
        if not isinstance(subject, str | int) or subject == "":
            raise self._refuse(f"it lacks the {self._subject_claim!r} claim")
        subject = str(subject)
        name = payload.get(self._name_claim)
        taken = {field: value for field, claim in self._mapping if (value := _claim(payload, claim)) is not None}
        if "quotas" in self._defaults and _given_but_empty(taken.get("quotas")):
            # Read as "no quota", it lifted the issuer's default quotas, where an absent or null one keeps them
            # (an identity provider writing `[]` for a user without quotas of their own). Without default quotas
            # it lifts nothing, and means what it says.
            raise self._refuse("its claims cannot be used: quotas: given but empty (leave it out for the issuer's)")
        try:
            claims = parse_claims({**self._defaults, **taken})
        except ClaimsError as exc:
            raise self._refuse(f"its claims cannot be used: {exc}") from None
        principal = Principal(
            id=_bounded_id(self.name, subject),
            kind=self.kind,
            name=(name if isinstance(name, str) and name else subject)[:MAX_ID],
            claims=claims,
        )
        if (claim := _time_claim_not_a_number(payload)) is not None:
            raise self._refuse(f"its {claim!r} claim is not a number")
        exp = payload["exp"]
        try:
            until = float(exp) + self._leeway
        except OverflowError:  # a validly signed `exp` of hundreds of digits: PyJWT compares it as an int
            raise self._refuse("its 'exp' claim is out of range") from None
        return principal, until


# Half of a surrogate pair: JSON can write one (`"\\ud800"`) and PyJWT's reader takes it, but it is no text.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _holds_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return not value.isascii() and _SURROGATE.search(value) is not None
    if isinstance(value, list):
        return any(map(_holds_surrogate, value))
    if isinstance(value, dict):
        return any(_holds_surrogate(key) or _holds_surrogate(item) for key, item in value.items())
    return False


def _not_text(payload: dict[str, Any]) -> str | None:
    """The first claim holding a string that is not Unicode text: read as a subject or a name it became the
    principal of usage records the store could not encode."""
    return next((str(name) for name, value in payload.items() if _holds_surrogate(value)), None)


def _time_claim_not_a_number(payload: dict[str, Any]) -> str | None:
    """The first of `exp`, `nbf` and `iat` present but not a NumericDate, which is a JSON number (RFC 7519).
    PyJWT reads its time claims with `int()`: a string of digits passes, and `true` is 1 (an `exp: true` was
    refused as expired, an `nbf: true` or `iat: true` accepted)."""
    for claim in ("exp", "nbf", "iat"):
        if claim in payload and (isinstance(payload[claim], bool) or not isinstance(payload[claim], int | float)):
            return claim
    return None


def _given_but_empty(value: object) -> bool:
    """A claim present with nothing in it: `[]`, `{}`, or a blank string (None is an absent claim)."""
    return value == [] or value == {} or (isinstance(value, str) and not value.strip())


def build_issuers(callers: CallersConfig) -> dict[str, JwtIssuer]:
    """Issuers by their `iss` value; reads key files, so a bad one fails here, at startup."""
    return {config.issuer: JwtIssuer(config) for config in callers.jwt_issuers}


def _claims_of_key(config: StaticKey | CallerKeyConfig) -> CallerClaims:
    return config.claims.caller_claims()


class _KeyTable:
    """The known keys by hash, and the plain keys accepted since this table was built."""

    __slots__ = ("accepted", "jwt_like", "principals")

    def __init__(self, principals: dict[str, Principal], jwt_like: dict[str, Principal]) -> None:
        self.principals = principals
        # Configured keys that look like JWTs (a service account's token as a static key), by plain key: with
        # a JWT issuer configured they would otherwise go to verification, and never work.
        self.jwt_like = jwt_like
        self.accepted: dict[str, Principal] = {}


def _no_secret(_: str) -> bool:
    return False


class Authenticator:
    def __init__(self, callers: CallersConfig | None = None, static_keys: Iterable[StaticKey] = ()) -> None:
        # Principals by key hash, and the accepted keys remembered for them: swapped together as one
        # `_KeyTable`, because a reload builds the next one on another thread (see `authenticate`).
        self._keys = _KeyTable({}, {})
        self._revoked: set[str] = set()
        self._unusable: set[str] = set()
        self._stored: dict[str, Principal] = {}
        self._static: dict[str, Principal] = {}
        self._internal: dict[str, Principal] = {}
        self._static_claims: dict[str, CallerClaims] = {}
        self._issuers: dict[str, JwtIssuer] = {}
        self._tokens: dict[str, tuple[Principal, float]] = {}
        self._static_jwt_like: dict[str, Principal] = {}
        self._internal_jwt_like: dict[str, Principal] = {}
        # Whether a text is one of the gateway's own secrets (its admin token, an account's key: the gateway
        # sets it): never a caller's key, nor a model, and not to be shown in part in a log line.
        self.own_secret: Callable[[str], bool] = _no_secret
        self.configure(callers, static_keys)

    def configure(self, callers: CallersConfig | None, static_keys: Iterable[StaticKey] = ()) -> None:
        """Take JWT issuers, internal keys and static keys' claims from the configuration.

        Raises ConfigError when an issuer's key file cannot be used."""
        callers = callers or CallersConfig()
        issuers = build_issuers(callers)
        internal: dict[str, Principal] = {}
        internal_jwt_like: dict[str, Principal] = {}
        for key in callers.internal_keys:
            prefix = "internal" if key.kind == "internal_key" else "bearer"
            principal = Principal(id=f"{prefix}:{key.name}", kind=key.kind, name=key.name, claims=_claims_of_key(key))
            internal[hash_key(key.key)] = principal
            if looks_like_jwt(key.key):
                internal_jwt_like[key.key] = principal
        self._internal_jwt_like = internal_jwt_like
        self._static_claims = {key.name: _claims_of_key(key) for key in static_keys}
        self._issuers, self._internal, self._tokens = issuers, internal, {}
        self._merge()

    def load(self, stored: Iterable[KeyRow], static: Iterable[tuple[str, str] | StaticKey] = ()) -> None:
        """Replace the known keys: stored rows plus static keys from the config file, as (name, plain key)
        pairs (their claims come from `configure`) or as `StaticKey`s."""
        principals: dict[str, Principal] = {}
        revoked: set[str] = set()
        unusable: set[str] = set()
        for row in stored:
            if row.revoked_at is not None:
                revoked.add(row.key_hash)
                continue
            try:
                claims = stored_key_claims(row.settings)
            except (ClaimsError, ValueError) as exc:
                # Fail closed: a key whose limits cannot be read must not run without them.
                log.error("gateway key %s (%s) is unusable: its settings cannot be read: %s", row.name, row.id, exc)
                unusable.add(row.key_hash)
                continue
            principals[row.key_hash] = Principal(id=row.id, kind="api_key", name=row.name, claims=claims)
        static_principals: dict[str, Principal] = {}
        static_jwt_like: dict[str, Principal] = {}
        for item in static:
            if isinstance(item, StaticKey):
                name, plain, claims = item.name, item.key, _claims_of_key(item)
            else:
                name, plain = item
                claims = self._static_claims.get(name, NO_CLAIMS)
            principal = Principal(id=f"static:{name}", kind="api_key", name=name, claims=claims)
            static_principals[hash_key(plain)] = principal
            if looks_like_jwt(plain):
                static_jwt_like[plain] = principal
        self._stored, self._static, self._revoked, self._unusable = principals, static_principals, revoked, unusable
        self._static_jwt_like = static_jwt_like
        self._merge()

    def _merge(self) -> None:
        # A fresh table: a revoked or changed key must not outlive the change among the remembered keys.
        self._keys = _KeyTable(
            {**self._stored, **self._static, **self._internal}, {**self._static_jwt_like, **self._internal_jwt_like}
        )

    def is_caller_credential(self, text: str) -> bool:
        """Whether `text` is a caller's credential: a key this gateway knows (revoked ones too: the config file's
        keys may have any shape) or a token. Asked of a request's model: pasted there (ANTHROPIC_MODEL set to the
        key), it went to the upstream and was kept in plain text in the usage record. Claude's model ids are no
        keys, and are not hashed."""
        if text.startswith("claude-"):
            return False
        keys = self._keys
        if looks_like_jwt(text) or text in keys.accepted or self.own_secret(text):
            return True
        digest = hash_key(text)
        return digest in keys.principals or digest in self._revoked or digest in self._unusable

    @property
    def key_count(self) -> int:
        return len(self._keys.principals)

    @property
    def issuer_count(self) -> int:
        return len(self._issuers)

    def still_accepted(self, headers: RawHeaders) -> Principal | None:
        """The caller of a request accepted before, if it still would be; None, and no log line, when not: the
        gateway asks this for its own requests (a cache keepalive), and a "rejected revoked gateway key" line
        then told the operator a client still used the key."""
        quiet = _QUIET.set(True)
        try:
            return self.authenticate(fields_of(headers))
        except ApiError:
            return None
        finally:
            _QUIET.reset(quiet)

    def authenticate(self, fields: Fields) -> Principal:
        key = presented_key(fields)
        if not key:
            raise _credential_refused("Missing gateway key: send it in the x-api-key or Authorization: Bearer header")
        # One table for the whole lookup: should a reload swap in the next one meanwhile, what this lookup
        # found is remembered in the old table only, which nobody reads any more.
        keys = self._keys
        principal = keys.accepted.get(key)
        if principal is not None:
            return principal
        bearer = bearer_token(fields)
        if bearer is None or bearer == key:
            return self._authenticate(key, keys)
        # Claude Code sends `x-api-key` and `Authorization: Bearer` both when ANTHROPIC_API_KEY and
        # ANTHROPIC_AUTH_TOKEN are both set: the first is then often the user's own Anthropic key, left in their
        # shell, and the gateway key the bearer (it was a 401 "unknown gateway key"). Either opens the gateway;
        # the refusal, when neither does, is the x-api-key's.
        quiet = _QUIET.set(True)
        try:
            return self._authenticate(key, keys)
        except ApiError:
            pass
        finally:
            _QUIET.reset(quiet)
        try:
            return keys.accepted.get(bearer) or self._authenticate(bearer, keys)
        except ApiError:
            return self._authenticate(key, keys)  # refused again, logged this time

    def _authenticate(self, key: str, keys: _KeyTable) -> Principal:
        """The principal of a gateway key or token not in `keys.accepted`; raises the 401 when there is none."""
        if self._issuers and looks_like_jwt(key):
            return keys.jwt_like.get(key) or self._authenticate_jwt(key)
        digest = hash_key(key)
        principal = keys.principals.get(digest)
        if principal is not None:
            if len(keys.accepted) >= KEY_CACHE_SIZE:
                keys.accepted.clear()
            keys.accepted[key] = principal
            return principal
        # Claude Code retries a 401 silently for minutes; a clear log line is what explains the "hang".
        state = "revoked" if digest in self._revoked else "unusable" if digest in self._unusable else "unknown"
        if self.own_secret(key):
            # Its first characters would be a part of the secret in the log.
            _refused(
                "rejected %s gateway key: one of the gateway's own secrets (its admin token or an account's key)", state
            )
        else:
            _refused("rejected %s gateway key %s…", state, display_prefix(key))
        raise _credential_refused(f"Invalid gateway key ({state}): {refusal_advice(key, state)}")

    def _authenticate_jwt(self, token: str) -> Principal:
        now = time.time()
        cached = self._tokens.get(token)
        if cached is not None:
            if now <= cached[1]:
                return cached[0]
            del self._tokens[token]
        try:
            issuer_claim = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError:
            _refused("rejected a token: it is malformed")
            raise _credential_refused("Invalid token: it is malformed") from None
        issuer = self._issuers.get(issuer_claim) if isinstance(issuer_claim, str) else None
        if issuer is None:
            # The unverified `iss` is attacker-chosen: log a short form only, never the token.
            _refused("rejected a token from an unknown issuer %.80r", issuer_claim)
            raise _credential_refused("Invalid token: its issuer (iss) is not accepted here")
        try:
            principal, valid_until = issuer.verify(token)
        except ApiError as error:
            _refused("rejected a token: %s", error.message)
            raise
        if len(self._tokens) >= TOKEN_CACHE_SIZE:
            self._tokens = {t: entry for t, entry in self._tokens.items() if entry[1] >= now}
            if len(self._tokens) >= TOKEN_CACHE_SIZE:
                self._tokens.clear()
        self._tokens[token] = (principal, valid_until)
        return principal


def stored_key_claims(settings: str | None) -> CallerClaims:
    """A stored key's claims from its settings (None: no limits); a ClaimsError or ValueError says why they
    cannot be read: limits an older build accepted and this one refuses (`requests=0/min`)."""
    return parse_claims(_settings(settings)) if settings else NO_CLAIMS


def unreadable_settings(settings: str | None) -> str | None:
    """Why the gateway refuses a stored key with these settings (401 "unusable"); None: it takes them."""
    try:
        stored_key_claims(settings)
    except (ClaimsError, ValueError) as exc:
        return str(exc)
    return None


def _settings(text: str) -> Mapping[str, object]:
    value = orjson.loads(text)
    if not isinstance(value, dict):
        raise ValueError("settings are not a JSON object")
    return value

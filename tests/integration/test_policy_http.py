"""Callers, quotas and budgets through the real HTTP surface, with the anthropic SDK against the mock."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from poolgate.config import (
    BillingConfig,
    CallersConfig,
    ClaimsConfig,
    JwtClaimMapping,
    JwtIssuerConfig,
    ServerConfig,
)
from poolgate.lifecycle import budgets as budgets_module
from poolgate.lifecycle.context import Principal, RequestContext
from poolgate.mock import MockServer
from poolgate.mock.config import Fault
from poolgate.store import repo
from tests.conftest import (
    MOCK_KEYS,
    MODEL,
    RunningGateway,
    gateway_config,
    messages_request,
    start_gateway,
    usage_rows,
    user,
)
from tests.integration.test_relay_details import until_in_flight

SECRET = "integration-secret-" + "x" * 32
ISSUER = "https://sso.example.test"


@pytest.fixture
async def gw(tmp_path: Path, mock: MockServer) -> AsyncIterator[RunningGateway]:
    callers = CallersConfig(jwt_issuers=(sso(leeway_seconds=5),))
    running = await start_gateway(gateway_config(tmp_path, mock.url, callers=callers))
    yield running
    await running.stop()


def sso(**settings: Any) -> JwtIssuerConfig:
    """The tests' identity provider: HS256 tokens signed with `SECRET`, unless `settings` say otherwise."""
    return JwtIssuerConfig(
        **{"name": "sso", "issuer": ISSUER, "audience": ("poolgate",), "algorithms": ("HS256",), "secret": SECRET}
        | settings
    )


def limited_client(gw: RunningGateway, name: str, **settings: Any) -> anthropic.AsyncAnthropic:
    """A client whose gateway key carries `settings` as caller claims."""
    _, key = repo.create_key(gw.gateway.engine, name, settings)
    gw.gateway.reload()
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0)


@dataclass(frozen=True)
class FromNow:
    """A time claim this many seconds from when its token is made. (Parameters are made when the tests are
    collected: a token expired 300 s before that was over 600 s stale when a long run reached its test.)"""

    seconds: int


def token(signed_with: str | None = SECRET, **overrides: Any) -> str:
    """A token for `dana`, signed with HS256 (with no `signed_with`, unsigned: `alg: none`)."""
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISSUER, "aud": "poolgate", "sub": "dana", "iat": now, "exp": now + 600}
    claims.update({name: now + v.seconds if isinstance(v, FromNow) else v for name, v in overrides.items()})
    return jwt.encode(claims, signed_with, algorithm="HS256" if signed_with else "none")


def session(name: str) -> dict[str, str]:
    return {"x-claude-code-session-id": name}


async def ask(client: anthropic.AsyncAnthropic, session_id: str = "s-1", model: str = MODEL) -> Any:
    return await client.messages.create(model=model, max_tokens=16, messages=user(), extra_headers=session(session_id))


# ----- JWT callers ---------------------------------------------------------------------------------


async def test_a_valid_jwt_is_accepted_as_bearer_and_as_api_key(gw: RunningGateway) -> None:
    good = token(name="Dana")
    async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=good, max_retries=0) as client:
        message = await client.messages.create(model=MODEL, max_tokens=16, messages=user())
    assert message.content
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=good, max_retries=0) as client:
        assert (await client.messages.create(model=MODEL, max_tokens=16, messages=user())).content


@pytest.mark.parametrize(
    ("claims", "says"),
    [
        ({"exp": FromNow(-3600)}, "expired"),
        ({"aud": "another-service"}, "audience"),
        ({"iss": "https://elsewhere.test"}, "issuer"),
        ({"exp": 10**400}, "'exp' claim is out of range"),  # a 500 with a traceback
        # Budgets past 64-bit µUSD overflowed the arithmetic or the header's formatting: a 500 per request.
        ({"budget_usd": "1e999999"}, "budget_usd: '1e999999' is too large"),
        ({"budget_usd": "1e5000"}, "budget_usd: '1e5000' is too large"),
        ({"budget_micro_usd": 10**30}, "budget_micro_usd: too large"),
        # A limit of over 4,300 digits made `int()` raise: a 500.
        ({"quotas": ["requests=" + "9" * 5000 + "/min"]}, "quota requests: limit too large"),
        # Empty or false read as absent: the issuer's default (or per_account, total) instead, unseen.
        ({"budget_usd": 1, "budget_range": ""}, "budget_range: '' is not one of"),
        ({"budget_usd": 1, "budget_scope": False}, "budget_scope: False is not one of"),
        ({"chain": True}, "chain: expected a string"),
    ],
)
async def test_a_bad_jwt_gets_401_saying_why(gw: RunningGateway, claims: dict[str, Any], says: str) -> None:
    bad = token(**claims)
    async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=bad, max_retries=0) as client:
        with pytest.raises(anthropic.AuthenticationError) as error:
            await client.messages.create(model=MODEL, max_tokens=16, messages=user())
    assert error.value.status_code == 401 and says in error.value.message
    assert bad not in error.value.message


async def test_a_token_with_empty_quotas_does_not_lift_the_issuers_default_quotas(
    tmp_path: Path, mock: MockServer
) -> None:
    """`quotas: []` in a token was read as no quota at all: the issuer's `requests=1/min` was lifted, unseen."""
    issuer = sso(defaults=ClaimsConfig(quotas=("requests=1/min",)))
    gw = await start_gateway(gateway_config(tmp_path, mock.url, callers=CallersConfig(jwt_issuers=(issuer,))))
    try:
        async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=token(quotas=[]), max_retries=0) as client:
            with pytest.raises(anthropic.AuthenticationError) as error:
                await client.messages.create(model=MODEL, max_tokens=16, messages=user())
        assert "quotas: given but empty" in error.value.message
        async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=token(), max_retries=0) as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=16, messages=user())
        assert raw.headers["x-poolgate-quota-limit-requests-per-minute"] == "1"
    finally:
        await gw.stop()


async def test_a_jwt_with_a_bad_signature_gets_401(gw: RunningGateway) -> None:
    forged = jwt.encode(
        {"iss": ISSUER, "aud": "poolgate", "sub": "dana", "exp": int(time.time()) + 600}, "not-the-secret-" * 4
    )
    async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=forged, max_retries=0) as client:
        with pytest.raises(anthropic.AuthenticationError) as error:
            await client.messages.create(model=MODEL, max_tokens=16, messages=user())
    assert "signature" in error.value.message


@pytest.mark.parametrize(
    ("claims", "signed_with", "says", "should_retry"),
    [
        # A fresh token may do: its time has come, or it is signed with the issuer's current key.
        ({"exp": FromNow(-300)}, SECRET, "expired", None),
        # Expired long before any apiKeyHelper's next token: a token handed out once, which Claude Code sent
        # again and again for three minutes before it showed the error.
        ({"exp": FromNow(-3600)}, SECRET, "expired", "false"),
        ({"nbf": FromNow(3600)}, SECRET, "not valid yet", None),
        ({}, "not-the-secret-" * 4, "signature does not verify", None),
        # A fresh token from the same issuer is refused the same way: Claude Code retried for minutes.
        ({"iss": "https://elsewhere.test"}, SECRET, "issuer (iss) is not accepted", "false"),
        ({"aud": "another-service"}, SECRET, "audience", "false"),
        ({"budget_usd": "lots"}, SECRET, "claims cannot be used", "false"),
        ({"sub": ""}, SECRET, "lacks the 'sub' claim", "false"),
        ({}, None, "algorithm", "false"),  # alg: none
    ],
)
async def test_only_a_jwt_refusal_a_fresh_token_may_change_is_retryable(
    gw: RunningGateway, claims: dict[str, Any], signed_with: str | None, says: str, should_retry: str | None
) -> None:
    sent = token(signed_with=signed_with, **claims)
    async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=sent, max_retries=0) as client:
        with pytest.raises(anthropic.AuthenticationError) as error:
            await client.messages.create(model=MODEL, max_tokens=16, messages=user())
    assert says in error.value.message
    assert error.value.response.headers.get("x-should-retry") == should_retry


def _segment(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "malformed",
    [
        "eyJhbGciOi.xx.yy",
        f"{_segment({'alg': 'HS256', 'kid': 7})}.{_segment({'iss': ISSUER})}.c2ln",  # a kid that is no string
        f"{_segment({'alg': 'HS256'})}.{_segment([ISSUER])}.c2ln",  # a payload that is no object
    ],
)
async def test_a_malformed_jwt_is_refused_and_logged_without_the_token(
    gw: RunningGateway, malformed: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every other refused token or key is a `poolgate.authn` warning, which explains a client's 401; a
    malformed token was refused in silence."""
    with caplog.at_level(logging.WARNING, logger="poolgate.authn"):
        async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=malformed, max_retries=0) as client:
            with pytest.raises(anthropic.AuthenticationError) as error:
                await client.messages.create(model=MODEL, max_tokens=16, messages=user())
    assert "malformed" in error.value.message
    assert error.value.response.headers["x-should-retry"] == "false"  # no retry of the same token helps
    [warning] = [record.getMessage() for record in caplog.records if record.name == "poolgate.authn"]
    assert "rejected a token" in warning and "malformed" in warning and malformed not in warning


@pytest.mark.parametrize("budget_claim", [None, "poolgate.budget_usd"])
@pytest.mark.one_window
async def test_a_token_sets_its_budget_only_where_the_issuers_mapping_says_it_lives(
    tmp_path: Path, mock: MockServer, budget_claim: str | None
) -> None:
    """The budget is one claim written two ways (`budget_usd`, `budget_micro_usd`): mapping `budget_usd` to
    null (the issuer's defaults only) or to a claim of the issuer's (README's `poolgate.budget_usd`) left
    `budget_micro_usd` read from its default name, so a token carrying it replaced the $1 budget with a
    million dollars."""
    issuer = sso(
        claim_mapping=JwtClaimMapping(budget_usd=budget_claim),
        defaults=ClaimsConfig(budget_usd=Decimal(1), budget_range="daily"),
    )
    callers = CallersConfig(jwt_issuers=(issuer,))
    running = await start_gateway(gateway_config(tmp_path, mock.url, callers=callers))
    try:
        raised = token(budget_micro_usd=10**12)
        async with anthropic.AsyncAnthropic(base_url=running.url, auth_token=raised, max_retries=0) as client:
            answer = await client.messages.with_raw_response.create(model=MODEL, max_tokens=16, messages=user())
    finally:
        await running.stop()
    assert answer.headers["x-poolgate-budget-limit-usd"] == "1.00"


async def test_tokens_signed_with_any_key_of_a_jwks_without_kids_are_accepted(tmp_path: Path, mock: MockServer) -> None:
    """An issuer rotating its keys publishes the old and the new one, neither with a kid: tokens signed with
    the old key were refused (only the JWKS's last key was kept), locking its callers out."""
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]
    jwks = [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())) for key in keys]
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": jwks}))
    issuer = sso(algorithms=("RS256",), secret=None, jwks_file=tmp_path / "jwks.json")
    running = await start_gateway(gateway_config(tmp_path, mock.url, callers=CallersConfig(jwt_issuers=(issuer,))))
    try:
        for key in keys:
            claims = {"iss": ISSUER, "aud": "poolgate", "sub": "dana", "exp": int(time.time()) + 600}
            signed = jwt.encode(claims, key, algorithm="RS256")
            async with anthropic.AsyncAnthropic(base_url=running.url, auth_token=signed, max_retries=0) as client:
                assert (await client.messages.create(model=MODEL, max_tokens=16, messages=user())).content
    finally:
        await running.stop()


async def test_a_key_the_jwks_publishes_for_encryption_verifies_no_token(tmp_path: Path, mock: MockServer) -> None:
    """An issuer's JWKS may hold keys for clients to encrypt to it (`use: enc`) beside its signing keys: a token
    signed with an encryption key's private half was accepted as the issuer's."""
    signing, encrypting = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    jwks = [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "use": use, "kid": use}
        for key, use in ((signing, "sig"), (encrypting, "enc"))
    ]
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": jwks}))
    issuer = sso(algorithms=("RS256",), secret=None, jwks_file=tmp_path / "jwks.json")
    running = await start_gateway(gateway_config(tmp_path, mock.url, callers=CallersConfig(jwt_issuers=(issuer,))))
    claims = {"iss": ISSUER, "aud": "poolgate", "sub": "dana", "exp": int(time.time()) + 600}
    try:
        signed = jwt.encode(claims, signing, algorithm="RS256", headers={"kid": "sig"})
        async with anthropic.AsyncAnthropic(base_url=running.url, auth_token=signed, max_retries=0) as client:
            assert (await client.messages.create(model=MODEL, max_tokens=16, messages=user())).content
        for kid in ("enc", None):  # named, or found among the keys tried for a token naming none
            forged = jwt.encode(claims, encrypting, algorithm="RS256", headers={"kid": kid} if kid else None)
            async with anthropic.AsyncAnthropic(base_url=running.url, auth_token=forged, max_retries=0) as client:
                with pytest.raises(anthropic.AuthenticationError):
                    await client.messages.create(model=MODEL, max_tokens=16, messages=user())
    finally:
        await running.stop()


async def jwks_refusals(
    tmp_path: Path, mock: MockServer, jwks: list[dict[str, Any]], algorithms: tuple[str, ...], tokens: list[str]
) -> list[str | None]:
    """For each token, what the gateway (its issuer's keys in `jwks`) refused it for; None: it was served."""
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": jwks}))
    issuer = sso(algorithms=algorithms, secret=None, jwks_file=tmp_path / "jwks.json")
    running = await start_gateway(gateway_config(tmp_path, mock.url, callers=CallersConfig(jwt_issuers=(issuer,))))
    refusals: list[str | None] = []
    try:
        for signed in tokens:
            async with anthropic.AsyncAnthropic(base_url=running.url, auth_token=signed, max_retries=0) as client:
                try:
                    assert (await client.messages.create(model=MODEL, max_tokens=16, messages=user())).content
                    refusals.append(None)
                except anthropic.AuthenticationError as refused:
                    refusals.append(refused.message)
    finally:
        await running.stop()
    return refusals


def dana(key: rsa.RSAPrivateKey, algorithm: str, kid: str | None) -> str:
    claims = {"iss": ISSUER, "aud": "poolgate", "sub": "dana", "exp": int(time.time()) + 600}
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


def public_jwk(key: rsa.RSAPrivateKey, **fields: Any) -> dict[str, Any]:
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), **fields}


async def test_a_jwks_key_that_names_its_algorithm_verifies_tokens_of_that_algorithm_only(
    tmp_path: Path, mock: MockServer
) -> None:
    """An issuer's JWK may say which algorithm its key is for (`alg`): an RS256 key verified PS256 and RS512
    tokens too, whatever else the issuer's algorithms let in."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = [public_jwk(key, alg="RS256", kid="k1")]
    tokens = [dana(key, algorithm, kid) for algorithm in ("RS256", "PS256", "RS512") for kid in ("k1", None)]
    refusals = await jwks_refusals(tmp_path, mock, jwks, ("RS256", "PS256", "RS512"), tokens)
    assert refusals[:2] == [None, None]
    for (named, unnamed), algorithm in zip((refusals[2:4], refusals[4:6]), ("PS256", "RS512"), strict=True):
        assert named is not None and f"its key id (kid) names a key that cannot verify {algorithm}" in named
        assert unnamed is not None and f"the issuer's JWKS holds no key that can verify {algorithm}" in unnamed


async def test_a_jwks_key_whose_key_ops_leave_out_verify_verifies_no_token(tmp_path: Path, mock: MockServer) -> None:
    """A JWK's `key_ops` say what its key is for: one for encrypting or wrapping keys (no `verify`) verified
    tokens as the issuer's signing keys do, so whoever held its private half could sign any caller in."""
    signing, wrapping = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    jwks = [public_jwk(signing, kid="sig"), public_jwk(wrapping, kid="wrap", key_ops=["encrypt", "wrapKey"])]
    tokens = [dana(signing, "RS256", "sig"), dana(wrapping, "RS256", "wrap"), dana(wrapping, "RS256", None)]
    refusals = await jwks_refusals(tmp_path, mock, jwks, ("RS256",), tokens)
    assert refusals[0] is None
    assert refusals[1] is not None and "its key id (kid) is not in the issuer's JWKS" in refusals[1]
    assert refusals[2] is not None and "its signature does not verify" in refusals[2]


async def test_a_jwks_key_for_an_algorithm_the_issuer_does_not_list_verifies_no_token(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A key whose JWK names an algorithm the issuer's `algorithms` leave out (RS512 for an RS256 issuer)
    verified RS256 tokens: it verifies none, and the gateway says so when it starts."""
    current, other = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    jwks = [public_jwk(current, alg="RS256", kid="current"), public_jwk(other, alg="RS512", kid="other")]
    tokens = [dana(current, "RS256", "current"), dana(other, "RS256", "other"), dana(other, "RS512", "other")]
    with caplog.at_level(logging.WARNING, logger="poolgate.authn"):
        refusals = await jwks_refusals(tmp_path, mock, jwks, ("RS256",), tokens)
    assert refusals[0] is None
    assert refusals[1] is not None and "its key id (kid) names a key that cannot verify RS256" in refusals[1]
    assert refusals[2] is not None and "its algorithm is not accepted for this issuer" in refusals[2]
    assert "the key 'other' is for RS512, which the issuer's algorithms (RS256) do not list" in caplog.text


# ----- policy ----------------------------------------------------------------------------------------------


@pytest.mark.one_window
async def test_a_max_tokens_no_model_answers_is_the_same_400_with_a_budget_or_without(gw: RunningGateway) -> None:
    """Without a budget the upstream refused it (400); with one, the estimate came first: a 402 saying the
    request "may cost up to $15000000000000000000000000.000129", not to be retried, for the client's typo."""
    _, capped = repo.create_key(gw.gateway.engine, "capped", {"budget_usd": "100"})
    gw.gateway.reload()
    body = {"model": MODEL, "max_tokens": 10**30, "messages": user()}
    answers = []
    async with aiohttp.ClientSession() as http:
        for key in (gw.key, capped):
            async with http.post(f"{gw.url}/v1/messages", json=body, headers={"x-api-key": key}) as r:
                answers.append((r.status, (await r.json())["error"]))
    assert answers[0] == answers[1]
    status, error = answers[0]
    assert status == 400 and error["type"] == "invalid_request_error" and error["message"].startswith("max_tokens:")


@pytest.mark.one_window
async def test_a_request_quota_answers_429_with_retry_after_and_quota_headers(gw: RunningGateway) -> None:
    async with limited_client(gw, "quota", quotas=["requests=2/day"]) as client:
        first = await client.messages.with_raw_response.create(model=MODEL, max_tokens=16, messages=user())
        assert first.headers["x-poolgate-quota-limit-requests-per-day"] == "2"
        assert first.headers["x-poolgate-quota-remaining-requests-per-day"] == "1"
        await ask(client)
        with pytest.raises(anthropic.RateLimitError) as error:
            await ask(client)
    response = error.value.response
    assert response.status_code == 429 and error.value.type == "rate_limit_error"  # type: ignore[attr-defined]
    assert 0 < int(response.headers["retry-after"]) <= 86400
    assert response.headers["x-poolgate-quota-remaining-requests-per-day"] == "0"
    assert "requests-per-day" in error.value.message
    # Hours away: not worth a retry (an SDK would retry at once in vain, or sleep until then).
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.one_window
async def test_a_caller_asking_for_costs_is_told_a_refused_request_cost_nothing(gw: RunningGateway) -> None:
    """An app showing each request's cost (`x-poolgate-cost: 1`) got no cost for a request its quota refused,
    while one the pool refused (a 529) said 0: both cost nothing, and both say so."""
    async with limited_client(gw, "counted", quotas=["requests=1/day"]) as client:
        await ask(client)
        with pytest.raises(anthropic.RateLimitError) as error:
            await client.messages.create(
                model=MODEL, max_tokens=16, messages=user(), extra_headers={"x-poolgate-cost": "1"}
            )
    assert error.value.response.headers["x-poolgate-cost"] == "0"
    assert error.value.response.headers["x-poolgate-cost-currency"] == "USD"


@pytest.mark.one_window
async def test_a_streaming_request_refused_says_it_cost_nothing_to_a_caller_asking(gw: RunningGateway) -> None:
    """A refusal is a JSON answer, whole, also for a request asking for a stream: its cost (nothing) is known
    when it is sent. A streaming request refused by its quota (or its budget, its models, the pool) said no
    cost, while the same request not streaming said 0; a stream that is answered still says none."""
    async with limited_client(gw, "streamer", quotas=["requests=1/day"]) as client:
        ask_cost = {"x-poolgate-cost": "1"}
        async with client.messages.with_streaming_response.create(
            model=MODEL, max_tokens=16, messages=user(), stream=True, extra_headers=ask_cost
        ) as streamed:
            assert "x-poolgate-cost" not in streamed.headers
            await streamed.read()
        with pytest.raises(anthropic.RateLimitError) as error:
            await client.messages.create(
                model=MODEL, max_tokens=16, messages=user(), stream=True, extra_headers=ask_cost
            )
    assert error.value.response.headers["x-poolgate-cost"] == "0"


async def test_a_caller_asking_for_costs_is_told_a_request_refused_before_its_policy_cost_nothing(
    tmp_path: Path, mock: MockServer
) -> None:
    """A request refused before the policy stage (a credential refused, a body that is not a request, one
    over `server.max_body_bytes`) said no cost to a caller asking for it (`x-poolgate-cost: 1`), while the
    policy's own refusals said 0: an app showing each request's cost showed these as of unknown cost."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url, server=ServerConfig(max_body_bytes=4096)))
    url = f"{gw.url}/v1/messages"
    ask_cost = {"x-poolgate-cost": "1", "content-type": "application/json"}
    refused = {
        "a wrong key": ({"x-api-key": "not-a-gateway-key-0123456789"}, b'{"model": "m"}', 401),
        "malformed": ({"x-api-key": gw.key}, b"{not json", 400),
        "max_tokens": ({"x-api-key": gw.key}, orjson.dumps({"model": MODEL, "max_tokens": -1, "messages": []}), 400),
        "too large": ({"x-api-key": gw.key}, b" " * 8192, 413),
    }
    try:
        async with aiohttp.ClientSession() as http:
            for what, (credential, body, status) in refused.items():
                async with http.post(url, data=body, headers={**ask_cost, **credential}) as response:
                    assert response.status == status, what
                    assert response.headers.get("x-poolgate-cost") == "0", what
                    assert response.headers.get("x-poolgate-cost-currency") == "USD", what
    finally:
        await gw.stop()


@pytest.mark.one_window
async def test_a_quota_that_resets_within_a_minute_is_left_to_the_clients_retry(gw: RunningGateway) -> None:
    async with limited_client(gw, "per-minute", quotas=["requests=1/minute"]) as client:
        await ask(client)
        with pytest.raises(anthropic.RateLimitError) as error:
            await ask(client)
    response = error.value.response
    assert 0 < int(response.headers["retry-after"]) <= 60 and "x-should-retry" not in response.headers


@pytest.mark.one_window
async def test_a_wall_clock_stepped_back_holds_a_used_up_quota_for_a_window_not_for_the_step(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A minute quota used up, then the wall clock stepped back an hour (an NTP correction): the window stayed
    an hour ahead, and the caller was refused for that hour (`retry-after: 3625`), not for the minute."""
    policy, step = gw.gateway.policy, [0.0]

    class SteppedPolicy:
        """The gateway's policy, told the time `step` away (a compiled class: its method cannot be replaced)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(policy, name)

        def admit(self, principal: Principal, ctx: RequestContext, cost: int | None, now: float, *rest: int) -> Any:
            return policy.admit(principal, ctx, cost, now + step[0], *rest)

    monkeypatch.setattr(gw.gateway, "policy", SteppedPolicy())
    async with limited_client(gw, "stepped", quotas=["requests=1/minute"]) as client:
        await ask(client)
        step[0] = -3600.0
        with pytest.raises(anthropic.RateLimitError) as error:
            await ask(client)  # the minute's request is still counted
        step[0] += 60.0  # a minute later by the clock as it is now
        await ask(client)
    assert 0 < int(error.value.response.headers["retry-after"]) <= 60


@pytest.mark.one_window
async def test_a_default_sdk_client_gets_a_used_up_daily_quota_at_once(gw: RunningGateway) -> None:
    _, key = repo.create_key(gw.gateway.engine, "daily", {"quotas": ["requests=1/day"]})
    gw.gateway.reload()
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key) as client:  # max_retries=2
        await ask(client)
        with pytest.raises(anthropic.RateLimitError):
            await asyncio.wait_for(ask(client), 20)
    refused = [row for row in await usage_rows(gw) if row["status"] == 429]
    assert len(refused) == 1, "the SDK did not retry"


@pytest.mark.one_window
async def test_a_token_jwt_claim_limits_the_caller_too(gw: RunningGateway) -> None:
    limited = token(sub="erin", quotas=["requests=1/day"])
    async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=limited, max_retries=0) as client:
        await client.messages.create(model=MODEL, max_tokens=16, messages=user())
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(model=MODEL, max_tokens=16, messages=user())


@pytest.mark.one_window
async def test_a_token_quota_counts_the_requests_running_when_the_keys_quotas_change(
    gw: RunningGateway, mock: MockServer
) -> None:
    """`keys set` while a request runs (here raising the limit): the running request's tokens still count
    against the quota, as do those of the requests admitted after the change."""
    for key in MOCK_KEYS:  # streamed answers paced: the change lands while the first one runs
        mock.set_fault(key, Fault(tokens_per_second=10))
    async with limited_client(gw, "changing", quotas=["output_tokens=40/day"]) as client:
        async with client.messages.stream(model=MODEL, max_tokens=16, messages=user()) as running:
            await anext(aiter(running))  # message_start: admitted
            repo.set_key_settings(gw.gateway.engine, "changing", {"quotas": ["output_tokens=50/day"]})
            gw.gateway.reload()
            during = await client.messages.with_raw_response.create(model=MODEL, max_tokens=16, messages=user())
            assert during.headers["x-poolgate-quota-remaining-output-tokens-per-day"] == "50", "it had finished"
            first = await running.get_final_message()
        after = await client.messages.with_raw_response.create(model=MODEL, max_tokens=16, messages=user())
    used = first.usage.output_tokens + (await during.parse()).usage.output_tokens
    assert after.headers["x-poolgate-quota-limit-output-tokens-per-day"] == "50"
    assert after.headers["x-poolgate-quota-remaining-output-tokens-per-day"] == str(50 - used)


async def test_a_model_outside_the_allow_list_gets_403_and_is_not_listed(gw: RunningGateway) -> None:
    async with limited_client(gw, "haiku-only", models=["claude-haiku-*"]) as client:
        with pytest.raises(anthropic.PermissionDeniedError) as error:
            await ask(client, model=MODEL)
        assert await ask(client, model="claude-haiku-4-5")
        models = [model.id async for model in client.models.list()]
    assert error.value.status_code == 403 and MODEL in error.value.message
    # Claude Code puts "Please run /login" before any 403: logging in would replace the gateway key.
    assert "the key is valid: choose an allowed model" in error.value.message
    assert models and all(fnmatchcase(model, "claude-haiku-*") for model in models)


async def test_a_token_callers_403_says_its_token_is_valid_not_a_key(gw: RunningGateway) -> None:
    """A JWT caller was told "the key is valid": it has no key, and went looking for one."""
    sent = token(models=["claude-haiku-*"])
    async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=sent, max_retries=0) as client:
        with pytest.raises(anthropic.PermissionDeniedError) as error:
            await client.messages.create(model=MODEL, max_tokens=16, messages=user())
    assert "the token is valid: choose an allowed model" in error.value.message


async def spend_until_refused(client: anthropic.AsyncAnthropic, session_id: str, limit: int = 20) -> Any:
    """Send requests in one session until the budget refuses one; return that refusal."""
    for sent in range(limit):
        try:
            await ask(client, session_id)
        except anthropic.APIStatusError as error:
            assert sent > 0, f"refused before any spend: {error.message}"
            return error
    raise AssertionError(f"no refusal after {limit} requests")


@pytest.mark.one_window
async def test_a_subject_spelled_like_a_hashed_one_does_not_spend_its_budget(gw: RunningGateway) -> None:
    """A subject too long for an id is kept as its hash, `sso:h:<hash>`: the subject `h:<hash>` shared that
    caller's id, so it could spend the other's budget (and use its quotas, and its rows in the ledger)."""
    long_subject = "victim-" + "v" * 80
    lookalike = "h:" + hashlib.sha256(long_subject.encode()).hexdigest()[:32]
    budget = {"budget_usd": "0.0005", "budget_range": "daily", "budget_scope": "per_account"}
    async with anthropic.AsyncAnthropic(
        base_url=gw.url, auth_token=token(sub=lookalike, **budget), max_retries=0
    ) as client:
        assert (await spend_until_refused(client, "s-1")).status_code == 402
    async with anthropic.AsyncAnthropic(
        base_url=gw.url, auth_token=token(sub=long_subject, **budget), max_retries=0
    ) as client:
        assert await ask(client, "s-1")
    assert len({row["principal_id"] for row in await usage_rows(gw)}) == 2


@pytest.mark.one_window
async def test_a_budget_runs_out_mid_session_with_a_clear_402(gw: RunningGateway) -> None:
    async with limited_client(gw, "budget", budget_usd="0.0005", budget_range="daily") as client:
        error = await spend_until_refused(client, "s-mid")
    assert error.status_code == 402 and error.body["error"]["type"] == "billing_error"  # type: ignore[index]
    message = error.message
    assert "Budget exhausted" in message and "daily per-account budget of $0.0005" in message
    assert "spent" in message and "resets at" in message
    assert error.response.headers["x-should-retry"] == "false"


@pytest.mark.one_window
async def test_a_budget_held_only_by_a_request_in_flight_answers_a_retryable_429(
    gw: RunningGateway, mock: MockServer
) -> None:
    """Two Claude Code requests at once on a budget that covers one: the second was refused with a 402 "Budget
    exhausted" to retry after the budget's reset (hours), which ended the user's turn, though nothing was spent
    and it fits as soon as the first ends. It is a 429 to retry shortly; once the first ends it is admitted."""
    # Each request may cost ~$0.32 (32,000 output tokens of claude-sonnet-5 at $10 a million): one fits in $0.50.
    client = limited_client(gw, "parallel", budget_usd="0.50", budget_range="daily", budget_scope="per_account")

    async def big_ask() -> Any:
        async with client.messages.stream(model=MODEL, max_tokens=32_000, messages=user()) as stream:
            return await stream.get_final_message()

    for key in MOCK_KEYS:  # the first stays in flight while the second is sent
        mock.set_fault(key, Fault(ttfb_ms=1000, times=1))
    async with client:
        first = asyncio.create_task(big_ask())
        await until_in_flight(mock)
        with pytest.raises(anthropic.RateLimitError) as held:
            await big_ask()
        assert (await first).content
        mock.clear_faults()
        assert (await big_ask()).content  # the retry, once the first ended
    refusal = held.value
    assert refusal.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "held by 1 request in flight" in refusal.message and "Retry shortly" in refusal.message
    assert "Budget exhausted" not in refusal.message
    headers = refusal.response.headers
    assert headers["retry-after"] == "5" and headers["x-should-retry"] == "true"
    assert headers["x-poolgate-budget-limit-usd"] == "0.50" and headers["x-poolgate-budget-spent-usd"] == "0.00"
    assert headers["x-poolgate-budget-reset"].endswith("T00:00:00Z")


@pytest.mark.one_window
async def test_a_budget_can_reserve_less_output_than_claude_codes_max_tokens(tmp_path: Path, mock: MockServer) -> None:
    """Claude Code asks for 64k output tokens: a small budget refuses such a request outright (it could cost
    more than the whole budget), unless `billing.budget_output_tokens` caps what is reserved; the request is
    then charged what it cost."""
    budget = {"budget_usd": "0.5", "budget_range": "daily", "budget_scope": "per_account"}

    async def big_ask(gw: RunningGateway) -> Any:
        client = limited_client(gw, "claude-code", **budget)
        async with client, client.messages.stream(model=MODEL, max_tokens=64_000, messages=user()) as stream:
            return await stream.get_final_message()

    exact = await start_gateway(gateway_config(tmp_path / "exact", mock.url))
    try:
        with pytest.raises(anthropic.APIStatusError) as refused:
            await big_ask(exact)
    finally:
        await exact.stop()
    assert refused.value.status_code == 402 and "more than the whole budget" in refused.value.message
    capped = await start_gateway(
        gateway_config(tmp_path / "capped", mock.url, billing=BillingConfig(budget_output_tokens=4_000))
    )
    try:
        message = await big_ask(capped)
        [row] = await usage_rows(capped)
    finally:
        await capped.stop()
    assert message.content and row["status"] == 200 and row["cost_micro_usd"] > 0


@pytest.mark.one_window
async def test_per_session_budgets_are_separate_and_per_account_budgets_shared(gw: RunningGateway) -> None:
    budget = {"budget_usd": "0.0005", "budget_range": "daily"}
    async with limited_client(gw, "per-session", budget_scope="per_session", **budget) as client:
        await spend_until_refused(client, "session-a")
        assert await ask(client, "session-b")  # a fresh session has its own budget
    async with limited_client(gw, "per-account", budget_scope="per_account", **budget) as client:
        await spend_until_refused(client, "session-a")
        with pytest.raises(anthropic.APIStatusError) as error:
            await ask(client, "session-b")  # the account's budget is spent whatever the session
    assert error.value.status_code == 402 and "per-account" in error.value.message


@pytest.mark.one_window
async def test_the_budgets_kept_per_session_are_bounded_and_a_dropped_one_keeps_its_spend(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller with a per-session budget sending a new session id with every request added a budget bucket
    a request until the daily sweep. Past the bound the idle ones go; one whose session comes back is
    rebuilt from the spend history, so its spent budget still refuses."""
    monkeypatch.setattr(budgets_module, "MAX_BUCKETS_KEPT", 20)
    budget = {"budget_usd": "0.0005", "budget_range": "daily", "budget_scope": "per_session"}
    async with limited_client(gw, "many-sessions", **budget) as client:
        await spend_until_refused(client, "session-spent")
        for index in range(60):
            await ask(client, f"session-{index}")
        buckets = gw.gateway.policy.budgets._buckets
        assert len(buckets) <= 20
        assert not any(session == "session-spent" for _, session in buckets)
        with pytest.raises(anthropic.APIStatusError) as refused:
            await ask(client, "session-spent")
    assert refused.value.status_code == 402


@pytest.mark.one_window
async def test_a_budget_reserves_the_web_searches_a_request_may_run(gw: RunningGateway) -> None:
    """Searches are billed per search: a request offering 5 may cost $0.05 more than its tokens, and a
    budget with less than that left refuses it (and admits the same request without the tool)."""
    # haiku-4-5: a short prompt with max_tokens 16 estimates well under a cent; five searches are 5 cents.
    async with limited_client(gw, "searcher", budget_usd="0.03") as client:
        search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=user(), tools=[search])
        assert refused.value.status_code == 402 and "may cost up to $0.05" in str(refused.value)
        answer = await client.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=user())
        assert answer.usage.output_tokens > 0


@pytest.mark.one_window
async def test_a_request_too_large_for_its_budget_by_its_web_searches_says_so(gw: RunningGateway) -> None:
    """Claude Code's WebSearch offers 8 searches ($0.08) with a short prompt: on a $0.05 budget the refusal
    said the request's prompt and max_tokens made it too large and to send a smaller prompt or max_tokens,
    which changed nothing; the searches it may run did."""
    async with limited_client(gw, "small-searcher", budget_usd="0.05") as client:
        search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=user(), tools=[search])
    message = refused.value.message
    assert refused.value.status_code == 402 and "Request too large" in message
    assert "8 web searches" in message and "max_uses" in message, message


@pytest.mark.one_window
async def test_a_budget_reserves_the_advisor_consultations_a_request_may_make(gw: RunningGateway) -> None:
    """The advisor tool's consultations run on Opus and are billed at its rates: a Haiku request with a short
    prompt estimated under a cent may cost ~$0.05 more with one consultation of 2,048 tokens. A $0.05 budget
    refuses it as too large, saying the advisor's consultations make it so and what to make smaller, and admits
    the same request without the tool, or with a smaller consultation."""
    advisor = {"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-6", "max_uses": 1}
    async with limited_client(gw, "advised", budget_usd="0.05") as client:
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(
                model="claude-haiku-4-5",
                max_tokens=16,
                messages=user(),
                tools=[advisor | {"max_tokens": 2048}],  # type: ignore[list-item]
            )
        message = refused.value.message
        assert refused.value.status_code == 402 and "Request too large" in message, message
        assert "1 consultation of the advisor claude-opus-4-6 of 2048 tokens" in message, message
        assert "advisor max_uses or advisor max_tokens" in message, message
        for tools in ([], [advisor | {"max_tokens": 1024}]):
            answer = await client.messages.create(
                model="claude-haiku-4-5",
                max_tokens=16,
                messages=user(),
                tools=tools,  # type: ignore[arg-type]
            )
            assert answer.usage.output_tokens > 0


async def refused_estimate(gw: RunningGateway, key: str, body: bytes) -> str:
    """What a budget too small for any request says the raw `body` may cost."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gw.url}/v1/messages", data=body, headers={"x-api-key": key, "content-type": "application/json"}
        ) as r,
    ):
        assert r.status == 402, await r.text()
        message: str = (await r.json())["error"]["message"]
    return message.split("may cost up to $", 1)[1].split(" ", 1)[0]


# Names and values spelled with escapes read the same to the upstream as plain ones.
@pytest.mark.parametrize(
    ("plain", "escaped"),
    [
        ('"type":"web_search_20250305"', '"type":"web\\u005fsearch_20250305"'),
        ('"ttl":"1h"', '"ttl":"\\u0031h"'),
        ('"cache_control"', '"cache_\\u0063ontrol"'),
        ('"type":"ephemeral"', '"type":"eph\\u0065meral"'),
    ],
)
@pytest.mark.one_window
async def test_escapes_in_the_body_cannot_lower_a_budget_estimate(gw: RunningGateway, plain: str, escaped: str) -> None:
    """Web searches and 1-hour cache writes were found by scanning the body's bytes: spelled with an escape,
    a request offering searches (or asking for a 1-hour write) reserved none, and twenty such requests in
    parallel spent 32 times a budget."""
    _, key = repo.create_key(gw.gateway.engine, "escapes", {"budget_usd": "0.000001"})
    gw.gateway.reload()
    system = "x" * 8000
    body = (
        '{"model":"claude-haiku-4-5","max_tokens":16,'
        '"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":5}],'
        f'"system":[{{"type":"text","text":"{system}","cache_control":{{"type":"ephemeral","ttl":"1h"}}}}],'
        '"messages":[{"role":"user","content":"hi"}]}'
    )
    assert plain in body
    escaped_estimate = await refused_estimate(gw, key, body.replace(plain, escaped).encode())
    # The escapes' bytes count as prompt: a few millionths more.
    assert Decimal(escaped_estimate) >= Decimal(await refused_estimate(gw, key, body.encode()))


def screenshot_turn(marked: bool) -> dict[str, Any]:
    """Claude Code's turn after its Read tool opened a screenshot: the image in a tool result, ~1.2 MB of
    base64 (an image costs the API at most ~4,800 tokens, however large)."""
    screenshot = base64.b64encode(bytes(range(256)) * 3600).decode()
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": screenshot}}
    system: dict[str, Any] = {"type": "text", "text": "You are Claude Code."}
    if marked:
        system["cache_control"] = {"type": "ephemeral"}
    return {
        "model": "claude-opus-4-8",
        "max_tokens": 16,
        "system": [system],
        "messages": [
            {"role": "user", "content": "What does the screenshot show?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [image]}]},
        ],
    }


@pytest.mark.parametrize("marked", [True, False], ids=["cache-marked", "unmarked"])
@pytest.mark.one_window
async def test_a_screenshot_reserves_what_an_image_costs_not_its_base64(gw: RunningGateway, marked: bool) -> None:
    """A budget reserved a screenshot's base64 by its size, 400,000 tokens (~$2 under Opus): a caller with
    $0.50 left got 402s for a turn that costs a cent."""
    turn = screenshot_turn(marked)
    _, key = repo.create_key(gw.gateway.engine, f"looker-{marked}", {"budget_usd": "0.000001"})
    gw.gateway.reload()
    # ~5,000 tokens for the image and 16 of output: under 6 cents, at a 1-hour cache write's rate even.
    assert Decimal(await refused_estimate(gw, key, orjson.dumps(turn))) < Decimal("0.06")
    async with limited_client(gw, f"budgeted-{marked}", budget_usd="0.50") as client:
        answer = await client.messages.create(**turn)
    # The mock bills an image as the API bills a screenshot, ~1,600 tokens.
    assert answer.usage.input_tokens + (answer.usage.cache_creation_input_tokens or 0) < 2_000


@pytest.mark.parametrize("escaped", [False, True], ids=["plain", "escaped"])
@pytest.mark.one_window
async def test_images_by_url_reserve_what_images_may_cost(gw: RunningGateway, escaped: bool) -> None:
    """Forty images by URL are a 3 KB body, estimated by its size at 1,000 tokens; they may cost 190,000. Their
    type spelled with an escape is the same to the upstream, and to the estimate."""
    image = {"type": "image", "source": {"type": "url", "url": "https://example.test/chart.png"}}
    body = orjson.dumps(
        {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": [image] * 40}]}
    )
    if escaped:
        body = body.replace(b'"image"', b'"\\u0069mage"')
    _, key = repo.create_key(gw.gateway.engine, f"urls-{escaped}", {"budget_usd": "0.000001"})
    gw.gateway.reload()
    # 40 images at the most an image costs, at haiku-4-5's $1 per million input tokens.
    assert Decimal(await refused_estimate(gw, key, body)) >= Decimal("0.19")


@pytest.mark.parametrize("shape", ["unmarked", "cache-marked", "large"])
@pytest.mark.one_window
async def test_a_search_result_beside_images_does_not_hide_them_from_the_estimate(
    gw: RunningGateway, shape: str
) -> None:
    """A search result's `source` is its URL, a string: one in a message (a RAG tool's result) left the
    message's content unread as blocks, and its forty images by URL were estimated at their few bytes again."""
    image = {"type": "image", "source": {"type": "url", "url": "https://example.test/chart.png"}}
    text = [{"type": "text", "text": "A chart of the quarter."}]
    found = {"type": "search_result", "source": "https://example.test/doc", "title": "Doc", "content": text}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [found]}
    messages: list[dict[str, Any]] = [{"role": "user", "content": [result, *[image] * 40]}]
    if shape == "cache-marked":
        messages[0]["content"][-1] = {**image, "cache_control": {"type": "ephemeral"}}
    if shape == "large":  # over 4 MiB and 10,000 messages: its messages are not decoded on the way in
        messages[:0] = [{"role": "user", "content": "x" * (4 * 2**20)}, *[{"role": "user", "content": "x"}] * 10_000]
    body = orjson.dumps({"model": "claude-haiku-4-5", "max_tokens": 16, "messages": messages})
    _, key = repo.create_key(gw.gateway.engine, f"found-{shape}", {"budget_usd": "0.000001"})
    gw.gateway.reload()
    # Its text by size, at 3 bytes a token, and 40 images at the most an image costs, at $1 per million.
    assert Decimal(await refused_estimate(gw, key, body)) >= (len(body) // 3 + 40 * 5_000) / Decimal(10**6)


@pytest.mark.one_window
async def test_a_budgeted_caller_cannot_use_a_model_no_price_covers(tmp_path: Path, mock: MockServer) -> None:
    """A model the catalogue does not list (an expensive new id, say) cost a budget nothing: a caller capped at
    half a cent ran such requests without end. Callers without a budget may use it (its cost is recorded as
    unknown), and `billing.unpriced_under_budget: allow` lets budgeted ones too."""
    for setting in ("refuse", "allow"):
        config = gateway_config(tmp_path / setting, mock.url, billing=BillingConfig(unpriced_under_budget=setting))
        running = await start_gateway(config)
        try:
            async with (
                limited_client(running, "capped", budget_usd="0.005") as capped,
                limited_client(running, "free") as free,
            ):
                assert await ask(free, model="claude-unpriced-9")
                if setting == "refuse":
                    with pytest.raises(anthropic.PermissionDeniedError) as refused:
                        await ask(capped, model="claude-unpriced-9")
                    assert "'claude-unpriced-9' has no price" in refused.value.message
                    assert "unpriced_under_budget" in refused.value.message
                    # Claude Code shows it after "Please run /login": it says the key is not what is wrong.
                    assert "the key is valid" in refused.value.message
                else:
                    assert await ask(capped, model="claude-unpriced-9")
                assert await ask(capped, model="claude-haiku-4-5")  # priced models as before
        finally:
            await running.stop()


@pytest.mark.parametrize("claim", ["sub", "name", "chain"])
async def test_a_token_whose_claims_are_not_unicode_text_is_refused(gw: RunningGateway, claim: str) -> None:
    """JSON can write half of a surrogate pair (`"\\ud800"`), which is no text: a signed token's subject or
    name holding one became the principal of a usage record the usage writer could not encode, which ended
    its periodic task; every later record then waited in memory."""
    bad = token(**{claim: "dana\ud800"})
    async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=bad, max_retries=0) as client:
        with pytest.raises(anthropic.AuthenticationError) as error:
            await client.messages.create(model=MODEL, max_tokens=16, messages=user())
    assert f"its {claim!r} claim is not text" in error.value.message
    async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=token(), max_retries=0) as client:
        await client.messages.create(model=MODEL, max_tokens=16, messages=user())
    [row] = await usage_rows(gw)
    assert row["principal_id"] == "sso:dana"


async def test_under_another_server_the_quota_and_budget_headers_come_as_header_pairs(gw: RunningGateway) -> None:
    """`poolgate serve` writes the policy's headers into the head as lines the app rendered; an ASGI server of
    another make (the app under `uvicorn.run`, hypercorn) gets the same headers as ordinary pairs."""
    _, key = repo.create_key(
        gw.gateway.engine, "elsewhere", {"quotas": ["requests=5/day"], "budget_usd": "10", "budget_range": "monthly"}
    )
    gw.gateway.reload()
    scope, receive = messages_request(key, orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()}))
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(gw.gateway(scope, receive, send), 30)
    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert set(start) == {"type", "status", "headers"}, "nothing another server would not read"
    headers = {name.decode(): value.decode() for name, value in start["headers"]}
    assert headers["x-poolgate-quota-limit-requests-per-day"] == "5"
    assert headers["x-poolgate-quota-remaining-requests-per-day"] == "4"
    assert headers["x-poolgate-quota-reset-requests-per-day"].endswith("T00:00:00Z")
    assert headers["x-poolgate-budget-limit-usd"] == "10.00"
    assert headers["x-poolgate-budget-spent-usd"] == "0.00"
    assert headers["x-poolgate-budget-reset"].endswith("-01T00:00:00Z")

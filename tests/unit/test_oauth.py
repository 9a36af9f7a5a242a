"""Subscription accounts: PKCE, credential documents, the token manager's single flight / rotation / reauth
rules, the subscription dialect and the signer's OAuth path — all without a network (fake token client)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import msgspec
import orjson
import pytest
from rich.pretty import pretty_repr

from poolgate.api.anthropic import decode_request
from poolgate.config import OAuthConfig
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.shape import ShapedRequest, shape
from poolgate.lifecycle.sign import NeedsReauth, Signer
from poolgate.upstreams.dialects import anthropic_oauth
from poolgate.upstreams.dialects.anthropic_oauth import (
    CLAUDE_CODE_IDENTITY,
    OAUTH_BETA,
    apply_identity,
    is_claude_code_system,
    merge_beta,
)
from poolgate.upstreams.oauth import (
    InvalidGrant,
    OAuthCredentials,
    PkcePair,
    TokenEndpointError,
    TokenResponse,
    authorize_url,
    credentials_from_document,
    looks_like_oauth_secret,
    new_pkce,
    parse_pasted_code,
    replaced_since,
    s256_challenge,
)
from poolgate.upstreams.tokens import AccountState, RefreshUnavailable, TokenManager

NOW = 1_800_000_000.0


# ----- PKCE, authorize URL, pasted codes -------------------------------------------------------------


def test_s256_matches_rfc_7636_appendix_b() -> None:
    assert (
        s256_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )
    pair = new_pkce()
    assert 43 <= len(pair.verifier) <= 128 and pair.challenge == s256_challenge(pair.verifier)
    assert new_pkce().verifier != pair.verifier


def test_authorize_url_carries_what_claude_code_sends() -> None:
    config = OAuthConfig()
    url = authorize_url(config, PkcePair("v" * 43, "challenge"), "the-state")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://claude.ai/oauth/authorize"
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    assert query == {
        "code": "true",
        "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "response_type": "code",
        "redirect_uri": "https://platform.claude.com/oauth/code/callback",
        "scope": " ".join(config.scopes),
        "code_challenge": "challenge",
        "code_challenge_method": "S256",
        "state": "the-state",
    }
    assert "user:inference" in config.scopes and config.token_url == "https://platform.claude.com/v1/oauth/token"


def test_pasted_codes_are_checked_against_the_state() -> None:
    assert parse_pasted_code("  abc#st  ", "st") == "abc"
    assert parse_pasted_code("abc", "st") == "abc"
    assert parse_pasted_code("https://platform.claude.com/oauth/code/callback?code=abc&state=st", "st") == "abc"
    with pytest.raises(ValueError, match="state"):
        parse_pasted_code("abc#other", "st")
    with pytest.raises(ValueError, match="no authorization code"):
        parse_pasted_code("#st", "st")


# ----- credentials -----------------------------------------------------------------------------------


def test_claude_codes_credentials_file_is_read_with_its_millisecond_expiry() -> None:
    document = {
        "claudeAiOauth": {
            "accessToken": "sk-ant-oat01-aaa",
            "refreshToken": "sk-ant-ort01-bbb",
            "expiresAt": int((NOW + 3600) * 1000),
            "scopes": ["user:inference", "user:profile"],
            "subscriptionType": "max",
        }
    }
    credentials = credentials_from_document(document, NOW)
    assert credentials.access_token == "sk-ant-oat01-aaa" and credentials.refresh_token == "sk-ant-ort01-bbb"
    assert credentials.expires_at == NOW + 3600 and credentials.subscription_type == "max"
    assert credentials.scopes == ("user:inference", "user:profile") and credentials.obtained_at == NOW
    assert "sk-ant" not in repr(credentials)


def test_a_token_pair_and_a_token_response_are_read_too() -> None:
    pair = credentials_from_document({"access_token": "a", "refresh_token": "r", "expires_in": 60}, NOW)
    assert pair.expires_at == NOW + 60 and pair.refresh_token == "r"
    setup = credentials_from_document({"access_token": "a"}, NOW)
    assert setup.expires_at is None and setup.refresh_token is None
    response = credentials_from_document(
        {"access_token": "a", "refresh_token": "r", "expires_at": NOW + 5, "account": {"email_address": "x@y.z"}}, NOW
    )
    assert response.label == "x@y.z" and response.expires_at == NOW + 5
    for bad in ({}, {"claudeAiOauth": {"refreshToken": "r"}}, [], {"claudeAiOauth": "x"}):
        with pytest.raises(ValueError):
            credentials_from_document(bad, NOW)


def test_the_stored_secret_round_trips_and_is_told_apart_from_api_keys() -> None:
    credentials = OAuthCredentials("a", "r", NOW, ("s",), "pro", "me@x", "u", "o", NOW - 1)
    secret = credentials.to_secret()
    assert looks_like_oauth_secret(secret) and not looks_like_oauth_secret("sk-ant-api03-xyz")
    assert OAuthCredentials.from_secret(secret) == credentials
    with pytest.raises(ValueError):
        OAuthCredentials.from_secret('{"type":"other"}')


def test_a_rotation_keeps_what_the_response_does_not_say() -> None:
    old = OAuthCredentials("a", "r", NOW, ("s",), "max", "me@x")
    new = old.rotated(TokenResponse("a2", None, 100.0), NOW + 1)
    assert (new.access_token, new.refresh_token, new.expires_at) == ("a2", "r", NOW + 101)
    assert new.subscription_type == "max" and new.label == "me@x" and new.obtained_at == NOW + 1


@pytest.mark.parametrize(("expires_in", "expires_at"), [(1e300, NOW + 5 * 365 * 86400), (0.0, None), (-60.0, None)])
def test_a_refresh_takes_a_lifetime_only_as_long_as_a_tokens(expires_in: float, expires_at: float | None) -> None:
    """Login capped a token endpoint's lifetime at five years and a refresh did not: `expires_in: 1e300` was
    stored as is, and `accounts list` died on it (timestamp out of range). One not positive would have had
    the token refreshed again and again."""
    old = OAuthCredentials("a", "r", NOW, obtained_at=NOW)
    response = TokenResponse("a2", "r2", expires_in)
    assert old.rotated(response, NOW).expires_at == expires_at == response.credentials(NOW).expires_at


# ----- the token manager -----------------------------------------------------------------------------


class FakeClient:
    """A token endpoint with rotating refresh tokens; `fail` queues errors for the next calls."""

    def __init__(self, live: str = "r0") -> None:
        self.live = live
        self.calls = 0
        self.fail: list[Exception] = []
        self.gate: asyncio.Event | None = None

    async def refresh(self, refresh_token: str) -> TokenResponse:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.fail:
            raise self.fail.pop(0)
        if refresh_token != self.live:
            raise InvalidGrant("token endpoint answered HTTP 400 invalid_grant")
        self.live = f"r{self.calls}"
        return TokenResponse(f"a{self.calls}", self.live, 3600.0)


class FakeStore:
    def __init__(self, manager_ref: list[TokenManager]) -> None:
        self.saved: list[OAuthCredentials] = []
        self.states: list[tuple[str, str | None]] = []
        self.stored: OAuthCredentials | None = None
        self.token_in_use_at_save: list[str] = []
        self._manager = manager_ref

    async def load(self, account_id: str) -> OAuthCredentials | None:
        return self.stored

    async def save(
        self, account_id: str, credentials: OAuthCredentials, over: OAuthCredentials | None = None
    ) -> OAuthCredentials | None:
        if over is not None and replaced_since(self.stored, over):
            return self.stored
        account = self._manager[0].get(account_id)
        assert account is not None
        self.token_in_use_at_save.append(account.credentials.access_token)
        self.saved.append(credentials)
        self.stored = credentials
        return None

    async def set_state(self, account_id: str, state: AccountState, reason: str | None) -> None:
        self.states.append((state, reason))

    async def mark_needs_reauth(
        self, account_id: str, reason: str, refused: OAuthCredentials
    ) -> OAuthCredentials | None:
        if self.stored is not None and self.stored.refresh_token != refused.refresh_token:
            return self.stored
        self.states.append(("needs_reauth", reason))
        return None


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def manager_with(
    expires_in: float, refresh: str | None = "r0", **config: object
) -> tuple[TokenManager, FakeClient, FakeStore, Clock]:
    clock = Clock()
    client = FakeClient()
    ref: list[TokenManager] = []
    store = FakeStore(ref)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    oauth = OAuthConfig(refresh_backoff_seconds=0.5, **config)  # type: ignore[arg-type]
    manager = TokenManager(oauth, client, store, clock=clock, sleep=sleep)
    manager.sleeps = sleeps  # type: ignore[attr-defined]
    ref.append(manager)
    manager.register("acct", OAuthCredentials("a0", refresh, NOW + expires_in, obtained_at=NOW))
    return manager, client, store, clock


async def test_a_refresh_does_not_save_its_pair_over_tokens_replaced_while_it_was_under_way() -> None:
    """`accounts import --replace` (or a login) stored new tokens while a refresh of the old ones waited for the
    token endpoint: its save landed after them and took the account back to the old tokens' rotated pair."""
    manager, client, store, _ = manager_with(-10)
    store.stored = OAuthCredentials("a0", "r0", NOW - 10, obtained_at=NOW)
    client.gate = asyncio.Event()
    waiting = asyncio.create_task(manager.ensure_fresh("acct"))
    await asyncio.sleep(0.01)
    replaced = OAuthCredentials("b0", "s0", NOW + 3600, obtained_at=NOW + 1)
    store.stored = replaced
    client.gate.set()
    await waiting
    account = manager.get("acct")
    assert store.stored is replaced and store.saved == []
    assert account is not None and account.credentials is replaced and account.state == "active"
    # The pair a refresh of `base` brought goes over `base` itself, and over an older pair (one it rotated, which
    # a busy store refused to take), not over newer tokens.
    base = OAuthCredentials("a1", "r1", NOW, obtained_at=NOW)
    assert not replaced_since(None, base) and not replaced_since(base, base)
    assert not replaced_since(OAuthCredentials("a0", "r0", NOW, obtained_at=NOW - 5), base)
    assert replaced_since(replaced, base)


async def test_a_stampede_on_an_expired_token_makes_exactly_one_refresh_call() -> None:
    manager, client, store, _ = manager_with(-10)
    client.gate = asyncio.Event()
    waiters = [asyncio.create_task(manager.ensure_fresh("acct")) for _ in range(200)]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in waiters)  # nobody uses the expired token meanwhile
    client.gate.set()
    await asyncio.gather(*waiters)
    account = manager.get("acct")
    assert account is not None
    assert client.calls == 1 and len(store.saved) == 1
    assert account.credentials.access_token == "a1" and account.credentials.refresh_token == "r1"
    assert account.state == "active" and account.generation == 1
    # The rotated pair was persisted before the new access token was put to use.
    assert store.token_in_use_at_save == ["a0"] and store.saved[0].access_token == "a1"
    await manager.ensure_fresh("acct")
    assert client.calls == 1


async def test_inside_the_margin_the_old_token_serves_while_the_refresh_runs_in_the_background() -> None:
    manager, client, _, _ = manager_with(200, refresh_margin_seconds=300)  # valid 200 s, margin 300 s
    client.gate = asyncio.Event()
    await asyncio.wait_for(manager.ensure_fresh("acct"), 1)  # did not wait for the refresh
    account = manager.get("acct")
    assert account is not None and account.state == "refreshing" and account.credentials.access_token == "a0"
    client.gate.set()
    assert account.flight is not None
    await account.flight
    assert account.credentials.access_token == "a1" and account.state == "active" and client.calls == 1


async def test_a_margin_longer_than_the_tokens_live_does_not_refresh_on_every_request() -> None:
    """`refresh_margin_seconds` above the tokens' lifetime (8 h for Claude's) made every request start a
    refresh of the token it had just got: 9 token calls for 20 requests."""
    manager, client, _, _ = manager_with(3600, refresh_margin_seconds=30000)
    await manager.ensure_fresh("acct")  # inside the margin: a refresh in the background
    account = manager.get("acct")
    assert account is not None and account.flight is not None
    await account.flight
    for _ in range(20):
        await manager.ensure_fresh("acct")
        await asyncio.sleep(0)
    assert client.calls == 1 and account.credentials.access_token == "a1"


async def test_far_from_expiry_nothing_is_called() -> None:
    manager, client, _, _ = manager_with(3600)
    await manager.ensure_fresh("acct")
    await manager.ensure_fresh("unknown-account")  # not an OAuth account: nothing to do
    assert client.calls == 0


async def test_invalid_grant_marks_the_account_needs_reauth_and_stops_calling() -> None:
    manager, client, store, _ = manager_with(-10)
    client.live = "someone-else"
    with pytest.raises(NeedsReauth, match="invalid_grant"):
        await manager.ensure_fresh("acct")
    account = manager.get("acct")
    assert account is not None and account.state == "needs_reauth" and "invalid_grant" in (account.reason or "")
    assert store.states[-1][0] == "needs_reauth"
    with pytest.raises(NeedsReauth):
        await manager.ensure_fresh("acct")
    assert client.calls == 1
    assert await manager.refresh_after_401("acct", account.generation) is False
    # A re-login (newer credentials) brings it back.
    manager.register("acct", OAuthCredentials("b0", "someone-else", NOW + 3600, obtained_at=NOW + 1))
    assert account.state == "active"
    await manager.ensure_fresh("acct")


async def test_invalid_grant_first_adopts_a_pair_another_process_rotated() -> None:
    manager, client, store, _ = manager_with(-10)
    client.live = "r-other"
    store.stored = OAuthCredentials("a-other", "r-other", NOW + 3600, obtained_at=NOW + 5)
    await manager.ensure_fresh("acct")
    account = manager.get("acct")
    assert account is not None and account.state == "active"
    assert account.credentials.access_token == "a-other" and client.calls == 1


async def test_invalid_grant_waits_a_moment_for_the_pair_another_process_is_saving() -> None:
    """Two gateways on one store refreshed one account at once: the loser's refresh token was refused before
    the winner's save landed, and the loser marked a working account needs_reauth."""
    manager, client, store, _ = manager_with(-10)
    client.live = "r-other"
    rotated = OAuthCredentials("a-other", "r-other", NOW + 3600, obtained_at=NOW + 5)
    loads = 0

    async def load(account_id: str) -> OAuthCredentials | None:
        nonlocal loads
        loads += 1
        return rotated if loads >= 3 else None  # the other process's save lands during the second pause

    store.load = load  # type: ignore[method-assign]
    await manager.ensure_fresh("acct")
    account = manager.get("acct")
    assert account is not None and account.state == "active" and account.credentials.access_token == "a-other"
    assert "needs_reauth" not in [state for state, _ in store.states]


async def test_invalid_grant_marks_nothing_when_the_rotated_pair_is_saved_just_before_the_mark() -> None:
    """The mark is conditional on the store still holding the refused pair: a save landing after the waits
    and before the mark is taken instead."""
    manager, client, store, _ = manager_with(-10)
    client.live = "r-other"
    rotated = OAuthCredentials("a-other", "r-other", NOW + 3600, obtained_at=NOW + 5)
    original = store.mark_needs_reauth

    async def saved_just_before(account_id: str, reason: str, refused: OAuthCredentials) -> OAuthCredentials | None:
        store.stored = rotated
        return await original(account_id, reason, refused)

    store.mark_needs_reauth = saved_just_before  # type: ignore[method-assign]
    await manager.ensure_fresh("acct")
    account = manager.get("acct")
    assert account is not None and account.state == "active" and account.credentials.access_token == "a-other"
    assert [state for state, _ in store.states if state == "needs_reauth"] == []


async def test_transient_failures_back_off_exponentially_and_then_succeed() -> None:
    """The request that found the token expired gives up on the account after the first failed attempt
    (it fails over); the refresh goes on in the background, backing off, and succeeds."""
    manager, client, _, _ = manager_with(-10)
    client.fail = [TokenEndpointError("503", status=503) for _ in range(3)]
    with pytest.raises(RefreshUnavailable):
        await manager.ensure_fresh("acct")
    assert manager.refresh_failing("acct")  # routing skips it meanwhile
    account = manager.get("acct")
    assert account is not None and account.flight is not None
    await account.flight
    assert not manager.refresh_failing("acct")
    await manager.ensure_fresh("acct")  # fresh now: no wait, no call
    assert client.calls == 4
    sleeps = manager.sleeps  # type: ignore[attr-defined]
    assert len(sleeps) == 3 and sleeps[0] < sleeps[1] < sleeps[2]
    assert 0.4 <= sleeps[0] <= 0.6 and 1.6 <= sleeps[2] <= 2.4


async def test_when_transient_failures_run_out_the_caller_is_told_and_the_endpoint_is_spared() -> None:
    manager, client, _, _ = manager_with(-10, refresh_retries=1)
    client.fail = [TokenEndpointError("down") for _ in range(5)]
    with pytest.raises(RefreshUnavailable):
        await manager.ensure_fresh("acct")
    account = manager.get("acct")
    assert account is not None and account.flight is not None
    with pytest.raises(RefreshUnavailable):
        await account.flight  # its retries, in the background
    assert client.calls == 2
    with pytest.raises(RefreshUnavailable):
        await manager.ensure_fresh("acct")  # still backing off: no new call
    assert await manager.refresh_after_401("acct") is False  # nor a new round for every 401 meanwhile
    assert client.calls == 2
    assert account.state == "active"  # not a reauth: the grant may be fine


async def test_a_rejected_token_whose_refresh_fails_takes_the_account_out_of_routing_however_long_it_had() -> None:
    """The upstream answered 401 to a token its expiry called valid for an hour, and the token endpoint was
    down: the account stayed routable, and request after request went to it for another 401. A token an
    upstream rejected is dead until a refresh brings the next: `refresh_failing` until then."""
    manager, client, _, _ = manager_with(3600, refresh_retries=1)
    client.fail = [TokenEndpointError("503", status=503) for _ in range(2)]
    assert not manager.refresh_failing("acct")
    assert await manager.refresh_after_401("acct", 0) is False
    account = manager.get("acct")
    assert account is not None and account.flight is not None
    with pytest.raises(RefreshUnavailable):
        await account.flight
    assert manager.refresh_failing("acct")
    with pytest.raises(RefreshUnavailable):
        await manager.ensure_fresh("acct")  # not handed out again while backing off
    # Once the endpoint answers, the next refresh brings a new token and the account back.
    account.retry_at = 0.0
    await manager.ensure_fresh("acct")
    assert not manager.refresh_failing("acct") and account.credentials.access_token != "a0"


async def test_a_401_refreshes_once_however_many_requests_report_it() -> None:
    manager, client, _, _ = manager_with(3600)
    results = await asyncio.gather(*(manager.refresh_after_401("acct", 0) for _ in range(50)))
    assert all(results) and client.calls == 1
    # A late 401 for the old token: the new one exists already, no second refresh.
    assert await manager.refresh_after_401("acct", 0) is True
    assert client.calls == 1
    # Without a generation, a refresh that just happened also counts.
    assert await manager.refresh_after_401("acct") is True and client.calls == 1


async def test_an_expired_token_without_a_refresh_token_needs_reauth() -> None:
    manager, client, _, _ = manager_with(-10, refresh=None)
    with pytest.raises(NeedsReauth, match="no refresh token"):
        await manager.ensure_fresh("acct")
    assert client.calls == 0


async def test_an_older_version_from_a_reload_is_ignored() -> None:
    manager, _, _, _ = manager_with(-10)
    await manager.ensure_fresh("acct")
    account = manager.get("acct")
    assert account is not None and account.credentials.access_token == "a1"
    manager.register("acct", OAuthCredentials("a0", "r0", NOW - 10, obtained_at=NOW))  # read before our save
    assert account.credentials.access_token == "a1"
    manager.retain([])
    assert manager.get("acct") is None


async def test_a_refresh_ended_unfinished_leaves_the_state_it_found() -> None:
    """A stop past its grace ended a refresh, and the store said `refreshing` for good."""
    manager, client, store, _ = manager_with(200, refresh_margin_seconds=300)
    client.gate = asyncio.Event()  # the token endpoint never answers
    await manager.ensure_fresh("acct")  # a background refresh
    await asyncio.sleep(0.01)
    await manager.aclose()
    await asyncio.sleep(0)
    account = manager.get("acct")
    assert account is not None and account.state == "active" and account.reason is None
    assert store.states[-1] == ("active", None) and store.saved == []


async def test_a_stop_waits_for_the_token_call_in_flight_but_not_for_its_retries() -> None:
    manager, client, store, _ = manager_with(-10)
    client.gate = asyncio.Event()
    client.fail = [TokenEndpointError("503", status=503) for _ in range(3)]
    waiter = asyncio.create_task(manager.ensure_fresh("acct"))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(manager.aclose(grace=60))
    await asyncio.sleep(0.01)
    assert not closing.done()
    client.gate.set()  # the call in flight fails: no backoff and retry while stopping
    await asyncio.wait_for(closing, 1)
    with pytest.raises(RefreshUnavailable):
        await waiter
    assert client.calls == 1 and store.states[-1][0] == "active"


async def test_a_stop_ends_a_refresh_waiting_to_try_again_at_once() -> None:
    manager, client, store, _ = manager_with(-10)
    client.fail = [TokenEndpointError("503", status=503)]
    # A backoff that lasts as long as the test.
    manager._sleep = lambda seconds: asyncio.Event().wait()  # type: ignore[assignment]
    with pytest.raises(RefreshUnavailable):
        await manager.ensure_fresh("acct")
    await asyncio.wait_for(manager.aclose(grace=60), 1)
    account = manager.get("acct")
    assert account is not None and account.flight is not None and account.flight.cancelled()
    assert client.calls == 1 and account.state == "active" and store.states[-1] == ("active", None)


# ----- the subscription dialect ----------------------------------------------------------------------


def test_the_oauth_beta_is_merged_into_the_clients_flags() -> None:
    headers = [("anthropic-beta", "a-1, b-2"), ("x-app", "cli"), ("Anthropic-Beta", "b-2,c-3")]
    merged = merge_beta(headers)
    betas = [value for name, value in merged if name == "anthropic-beta"]
    assert betas == [f"a-1,b-2,c-3,{OAUTH_BETA}"] and ("x-app", "cli") in merged
    assert [v for n, v in merge_beta([("anthropic-beta", OAUTH_BETA)]) if n == "anthropic-beta"] == [OAUTH_BETA]
    assert merge_beta([]) == [("anthropic-beta", OAUTH_BETA)]


def test_claude_code_requests_pass_byte_for_byte() -> None:
    billing = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.0; cc_entrypoint=cli;"}
    identity = {"type": "text", "text": CLAUDE_CODE_IDENTITY, "cache_control": {"type": "ephemeral"}}
    for system in ([billing, identity, {"type": "text", "text": "rules"}], [identity], CLAUDE_CODE_IDENTITY + " more"):
        body = b'{"model":"m",  "messages":[],\n"system":' + orjson.dumps(system) + b"}"
        assert is_claude_code_system(system)
        assert apply_identity(body) is body


def test_other_clients_get_the_identity_block_first_and_their_own_content_intact() -> None:
    for system, rest in (
        ("Be terse.", [{"type": "text", "text": "Be terse."}]),
        ([{"type": "text", "text": "Rules", "cache_control": {"type": "ephemeral"}}], None),
        (None, []),
    ):
        request: dict[str, object] = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        if system is not None:
            request["system"] = system
        shaped = orjson.loads(apply_identity(orjson.dumps(request)))
        assert shaped["system"][0] == {"type": "text", "text": CLAUDE_CODE_IDENTITY}
        expected = rest if rest is not None else system
        assert shaped["system"][1:] == expected
        assert {k: v for k, v in shaped.items() if k != "system"} == {k: v for k, v in request.items() if k != "system"}
    for junk in (b"", b"not json", b"[1,2]"):
        assert apply_identity(junk) is junk


def test_other_clients_members_but_system_reach_the_account_as_they_sent_them() -> None:
    """The body was decoded and written again whole: a tool schema's integer past 64 bits became a float
    (`1e+20`), and numbers, escapes and spacing were orjson's."""
    tools = b'[{"name": "t", "input_schema": {"type": "integer", "maximum": 100000000000000000000, "x": 1.0}}]'
    body = (
        b'{"model": "m", "max_tokens": 5, "system": "Be terse.", "tools": '
        + tools
        + (b', "messages": [{"role": "user", "content": "caf\\u00e9  \\n"}], "temperature": 1.0}')
    )
    members = msgspec.json.decode(apply_identity(body), type=dict[str, msgspec.Raw])
    sent = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    assert list(members) == list(sent)  # in the client's order
    assert {k: bytes(v) for k, v in members.items() if k != "system"} == {
        k: bytes(v) for k, v in sent.items() if k != "system"
    }
    assert msgspec.json.decode(members["system"])[0]["text"] == CLAUDE_CODE_IDENTITY


# ----- the signer ------------------------------------------------------------------------------------


def shaped_for(upstream: Upstream, body: bytes, betas: str | None = "tools-2024") -> ShapedRequest:
    headers = [("anthropic-version", "2023-06-01"), ("content-type", "application/json")]
    if betas:
        headers.append(("anthropic-beta", betas))
    return ShapedRequest(upstream, "POST", upstream.base_url + "/v1/messages", tuple(headers), body)


def test_api_keys_are_signed_as_before() -> None:
    signer = Signer()
    signer.load({"k": "sk-ant-api03-x"})
    upstream = Upstream("k", "anthropic_api_key", "http://u")
    shaped = shaped_for(upstream, b"{}")
    signed = signer.sign(shaped)
    assert signed.shaped is shaped and signed.headers[-1] == ("x-api-key", "sk-ant-api03-x")


async def test_subscription_accounts_are_signed_with_a_bearer_token_and_the_oauth_beta() -> None:
    signer = Signer()
    credentials = OAuthCredentials("sk-ant-oat01-tok", "r", NOW + 10**9, obtained_at=NOW)
    signer.load({"sub": credentials.to_secret(), "setup": "sk-ant-oat01-setup", "key": "sk-ant-api03-k"})
    sub = Upstream("sub", "anthropic_oauth", "http://u")
    body = orjson.dumps({"model": "m", "max_tokens": 1, "messages": [], "system": "Hi"})
    signed = signer.sign(shaped_for(sub, body))
    headers = dict(signed.headers)
    assert headers["authorization"] == "Bearer sk-ant-oat01-tok" and "x-api-key" not in headers
    assert headers["anthropic-beta"] == f"tools-2024,{OAUTH_BETA}"
    assert orjson.loads(signed.shaped.body)["system"][0]["text"] == CLAUDE_CODE_IDENTITY
    # Nor in rich's pretty-printing (the CLI's tracebacks with locals), which does not ask `repr`.
    assert "sk-ant" not in repr(signed) and "sk-ant" not in pretty_repr(signed)
    # A config-file subscription upstream: a long-lived token, no refresh.
    setup = signer.sign(shaped_for(Upstream("setup", "anthropic_oauth", "http://u"), body, betas=None))
    assert dict(setup.headers)["authorization"] == "Bearer sk-ant-oat01-setup"
    await signer.prepare("key")
    await signer.prepare("sub")
    assert signer.account_state("sub") == "active" and signer.account_state("key") is None
    assert signer.unusable_reason("sub") is None
    account = signer.tokens.get("sub")
    assert account is not None
    account.state = "needs_reauth"
    assert signer.unusable_reason("sub") == "needs_reauth"
    with pytest.raises(NeedsReauth):
        await signer.prepare("sub")
    assert await signer.refresh_after_401("sub", signed) is False
    # A reload with the same stored document keeps the live state; dropping the upstream forgets it.
    signer.load({"sub": credentials.to_secret()})
    assert signer.account_state("sub") == "needs_reauth"
    signer.load({"sub": replace(credentials, access_token="new", obtained_at=NOW + 1).to_secret()})
    assert signer.account_state("sub") == "active"
    signer.load({})
    assert signer.account_state("sub") is None
    await signer.aclose()


@pytest.mark.parametrize(
    "system",
    [
        [{"type": "text", "text": CLAUDE_CODE_IDENTITY, "cache_control": {"type": "ephemeral"}}],
        "Be terse.",
        None,
        {"not": "a list"},
    ],
)
def test_a_request_is_signed_for_a_subscription_by_the_system_its_decoding_found(
    monkeypatch: pytest.MonkeyPatch, system: object
) -> None:
    """Signing a Messages request for a subscription account decoded its whole body again to read `system`
    (~0.6 ms for a Claude Code body of 1 MB, every attempt): the `system` the request's decoding found is
    read instead, with the same outcome."""
    signer = Signer()
    signer.load({"sub": "sk-ant-oat01-setup"})
    sub = Upstream("sub", "anthropic_oauth", "http://u")
    request = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 10_000}]}
    body = orjson.dumps(request if system is None else {**request, "system": system})
    expected = signer.sign(shaped_for(sub, body)).shaped.body  # from the body itself
    ctx = decode_request("messages", "req", "/v1/messages", b"", [], body)
    monkeypatch.setattr(anthropic_oauth, "_decoder", None)  # the body is not decoded again
    signed = signer.sign(shape(ctx, sub)).shaped.body
    assert signed == expected
    assert (signed is body) is (expected is body)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2027-01-01T00:00:00Z", 1798761600.0),
        (1798761600, 1798761600.0),
        (1798761600000, 1798761600.0),  # milliseconds, as Claude Code writes them
        ("soon", "expected epoch seconds"),
        (-5, "expected epoch seconds"),
        (99999999999999, "more than five years ahead"),  # year 5138
    ],
)
def test_an_imported_tokens_expiry_is_read_or_refused_never_taken_for_none(value: object, expected: object) -> None:
    """`"expires_at": "soon"` (or an ISO time) was imported as "no expiry known": the gateway then never
    refreshed the token before it failed."""
    document = {"access_token": "a", "refresh_token": "r", "expires_at": value}
    if isinstance(expected, float):
        assert credentials_from_document(document, now=1796000000.0).expires_at == expected
    else:
        with pytest.raises(ValueError, match=str(expected)):
            credentials_from_document(document, now=1796000000.0)


@pytest.mark.parametrize(("lifetime", "refused"), [(28800, False), (3_153_600_000, True), (1e300, True)])
def test_an_imported_tokens_lifetime_is_bounded_like_its_expiry(lifetime: float, refused: bool) -> None:
    """`expires_in: 1e300` was stored, then `accounts list` failed on it with a traceback every time."""
    document = {"access_token": "a", "refresh_token": "r", "expires_in": lifetime}
    if refused:
        with pytest.raises(ValueError, match="more than five years"):
            credentials_from_document(document, now=NOW)
    else:
        assert credentials_from_document(document, now=NOW).expires_at == NOW + lifetime
    # A token endpoint's answer is not refused (the account is logged in by then): its lifetime is capped.
    answer = TokenResponse.parse({"access_token": "a", "refresh_token": "r", "expires_in": lifetime})
    expires_at = answer.credentials(NOW).expires_at
    assert expires_at is not None and expires_at <= NOW + 5 * 365 * 86400

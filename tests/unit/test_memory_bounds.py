"""What the gateway remembers per value a caller chooses (a model id, a session id) stays bounded however many
distinct values it is sent: a client making one up per request must not grow its memory for as long as it runs."""

from __future__ import annotations

import jwt
import pytest

from poolgate.billing.book import UNIT_COSTS_KEPT, ChannelBook
from poolgate.billing.catalogue import RESOLVED_CACHE_SIZE, Catalogue
from poolgate.cache.keepalive import CacheKeepalive
from poolgate.config import CallersConfig, KeepaliveConfig, RoutingConfig, StaticKey
from poolgate.lifecycle import authn
from poolgate.lifecycle.authn import Authenticator
from poolgate.lifecycle.routing.router import KEPT_MEMO_SIZE, Router
from poolgate.upstreams.pool import MODEL_MEMO_SIZE
from tests.unit.test_authn_jwt import SECRET, authn_with, bearer, claims_for, hs_issuer
from tests.unit.test_routing import make_pool
from tests.unit.test_smart_routing import NOW, prefix, turn_body

MADE_UP = [f"claude-made-up-{i}" for i in range(5000)]


def test_the_accounts_serving_a_model_are_remembered_for_a_bounded_number_of_models() -> None:
    pool = make_pool([1, 1], models=("claude-*",))
    for model in MADE_UP[: MODEL_MEMO_SIZE * 2]:
        pool.serving(model)
    assert 0 < len(pool._serving) <= MODEL_MEMO_SIZE


def test_the_routers_memos_hold_a_bounded_number_of_models() -> None:
    router = Router(make_pool([1, 1]), RoutingConfig(strategy="first-pick"))
    for model in MADE_UP[: KEPT_MEMO_SIZE * 3]:
        router.route(model, NOW)
    assert 0 < len(router._kept_memo) <= KEPT_MEMO_SIZE
    assert 0 < len(router._model_stages) <= KEPT_MEMO_SIZE


def test_prices_are_looked_up_once_per_model_for_a_bounded_number_of_models() -> None:
    catalogue = Catalogue.load_default()
    for model in MADE_UP[: RESOLVED_CACHE_SIZE + 10]:
        catalogue.resolve(model)
    assert 0 < len(catalogue._resolved) <= RESOLVED_CACHE_SIZE


def test_a_models_typical_cost_per_upstream_is_remembered_for_a_bounded_number_of_models() -> None:
    book = ChannelBook(Catalogue.load_default())
    for model in MADE_UP[: UNIT_COSTS_KEPT + 10]:
        book.unit_cost(model, "u0")
    assert 0 < len(book._unit_costs) <= UNIT_COSTS_KEPT


def test_one_shot_sessions_are_remembered_as_such_for_at_most_max_sessions() -> None:
    """Each `claude -p` run is a session of its own: one a request."""
    keepalive = CacheKeepalive(KeepaliveConfig(enabled=True, max_sessions=5))
    one_shot_agent = [(b"user-agent", b"claude-cli/2.1.197 (external, sdk-cli)")]
    for session in range(20):
        body = turn_body("main", "task", 0)
        keepalive.served("key_a", f"s{session}", "u0", "m", body, one_shot_agent, prefix("main", 3), NOW)
    assert keepalive.skipped == {"one_shot": 20}
    assert len(keepalive._one_shots) == 5


def test_verified_tokens_are_remembered_for_a_bounded_number_of_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token helper hands out a new token every few minutes, per caller: each is verified once, and kept."""
    monkeypatch.setattr(authn, "TOKEN_CACHE_SIZE", 8)
    authenticator = authn_with(hs_issuer())
    for subject in range(20):
        authenticator.authenticate(bearer(jwt.encode(claims_for(sub=f"user-{subject}"), SECRET)))
    assert 0 < len(authenticator._tokens) <= 8


def test_accepted_keys_are_remembered_for_a_bounded_number_of_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authn, "KEY_CACHE_SIZE", 8)
    keys = [StaticKey(name=f"k{i}", key=f"pg-bound-key-{i:08d}") for i in range(20)]
    authenticator = Authenticator(CallersConfig(), keys)
    authenticator.load([], keys)
    for key in keys:
        authenticator.authenticate({b"x-api-key": key.key.encode()})
    assert 0 < len(authenticator._keys.accepted) <= 8

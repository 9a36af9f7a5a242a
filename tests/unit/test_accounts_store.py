"""Subscription accounts in the store: tokens encrypted, rotations atomic, states and quota pictures kept."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from poolgate.lifecycle.context import Upstream
from poolgate.store import accounts as store
from poolgate.store import repo
from poolgate.store.crypto import SecretBox, load_master_key
from poolgate.store.db import open_engine, read_revision, upstreams
from poolgate.upstreams.oauth import OAuthCredentials
from poolgate.upstreams.quota import FIVE_HOUR, parse_unified_headers, quota_blocked_until


def test_accounts_are_encrypted_rotated_atomically_and_removed(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'p.db'}")
    box = SecretBox(load_master_key(tmp_path))
    first = OAuthCredentials("sk-ant-oat01-first", "sk-ant-ort01-first", time.time() + 60, ("user:inference",), "max")
    store.add_oauth_account(engine, box, Upstream("sub", store.KIND, "http://u"), first)
    with engine.connect() as conn:
        secret = conn.execute(select(upstreams.c.secret)).scalar_one()
    assert b"sk-ant" not in secret and b"sk-ant" not in (tmp_path / "p.db").read_bytes()
    assert store.load_oauth_credentials(engine, box, "sub") == first
    # The gateway's reload sees the account as an upstream like any other.
    [stored] = repo.list_upstreams(engine)
    assert stored.upstream.kind == "anthropic_oauth" and box.decrypt(stored.secret) == first.to_secret()

    store.set_oauth_state(engine, "sub", "needs_reauth", "invalid_grant")
    before = read_revision(engine)
    second = OAuthCredentials("sk-ant-oat01-second", "sk-ant-ort01-second", time.time() + 3600, obtained_at=1.0)
    store.save_oauth_credentials(engine, box, "sub", second)
    assert store.load_oauth_credentials(engine, box, "sub") == second
    assert read_revision(engine) != before  # other gateway processes reload the rotated pair
    [row] = store.list_oauth_accounts(engine)
    assert row.state == "active" and row.state_reason is None and row.refreshed_at is not None

    with pytest.raises(repo.RepoError, match="already exists"):
        store.add_oauth_account(engine, box, Upstream("sub", store.KIND, "http://u"), first)
    store.add_oauth_account(engine, box, Upstream("sub", store.KIND, "http://u"), first, replace=True)
    assert store.load_oauth_credentials(engine, box, "sub") == first

    picture = parse_unified_headers(
        {
            "anthropic-ratelimit-unified-status": "rejected",
            "anthropic-ratelimit-unified-5h-status": "rejected",
            "anthropic-ratelimit-unified-5h-utilization": "1.0",
            "anthropic-ratelimit-unified-5h-reset": str(int(time.time() + 600)),
        },
        time.monotonic(),
        time.time(),
    )
    assert picture is not None
    store.save_quota_picture(engine, "sub", picture)
    store.save_quota_picture(engine, "sub", picture)  # an upsert
    [row] = store.list_oauth_accounts(engine)
    assert row.quota is not None and row.quota["windows"][FIVE_HOUR]["utilization"] == 1.0
    restored = store.load_quota_pictures(engine)["sub"]
    assert quota_blocked_until(restored, time.monotonic()) is not None

    store.remove_oauth_account(engine, "sub")
    assert store.list_oauth_accounts(engine) == [] and store.load_quota_pictures(engine) == {}
    assert store.load_oauth_credentials(engine, box, "sub") is None
    with pytest.raises(repo.RepoError):
        store.remove_oauth_account(engine, "sub")
    with pytest.raises(repo.RepoError, match="no stored subscription account"):
        store.save_oauth_credentials(engine, box, "sub", first)


def test_an_account_given_another_subscriptions_tokens_loses_the_old_ones_quota_picture(tmp_path: Path) -> None:
    """The old subscription's used-up window was shown by `accounts list`, and parked the account at the next
    start, for a subscription that had used none of it."""
    engine = open_engine(f"sqlite:///{tmp_path / 'p.db'}")
    box = SecretBox(load_master_key(tmp_path))
    alice = OAuthCredentials("sk-ant-oat01-a", "sk-ant-ort01-a", None, label="alice@example.com", account_uuid="ua")
    store.add_oauth_account(engine, box, Upstream("sub", store.KIND, "http://u"), alice)
    picture = parse_unified_headers(
        {"anthropic-ratelimit-unified-5h-status": "rejected", "anthropic-ratelimit-unified-5h-utilization": "1.0"},
        time.monotonic(),
        time.time(),
    )
    assert picture is not None
    store.save_quota_picture(engine, "sub", picture)
    refreshed = OAuthCredentials("sk-ant-oat01-a2", "sk-ant-ort01-a2", None, label="alice@example.com", obtained_at=1)
    store.save_oauth_credentials(engine, box, "sub", refreshed)  # the same subscription (no uuid said)
    assert "sub" in store.load_quota_pictures(engine)
    bob = OAuthCredentials("sk-ant-oat01-b", "sk-ant-ort01-b", None, label="bob@example.com", account_uuid="ub")
    store.add_oauth_account(engine, box, Upstream("sub", store.KIND, "http://u"), bob, replace=True)
    assert store.load_quota_pictures(engine) == {}
    [row] = store.list_oauth_accounts(engine)
    assert row.label == "bob@example.com" and row.quota is None


def test_an_api_key_upstream_is_not_replaced_by_an_account(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'p.db'}")
    box = SecretBox(load_master_key(tmp_path))
    repo.add_upstream(engine, box, Upstream("k", "anthropic_api_key", "http://u"), "sk-ant-api03-x")
    with pytest.raises(repo.RepoError, match="not a subscription account"):
        store.add_oauth_account(
            engine, box, Upstream("k", store.KIND, "http://u"), OAuthCredentials("a", "r", None), True
        )


def test_a_refused_refresh_marks_the_account_only_while_the_store_holds_the_refused_pair(tmp_path: Path) -> None:
    """Another gateway on the store rotated the pair and saved it: the mark of the process whose refresh the
    endpoint refused (it used the same, now used-up, refresh token) must not land on top of that save."""
    engine = open_engine(f"sqlite:///{tmp_path / 'p.db'}")
    box = SecretBox(load_master_key(tmp_path))
    first = OAuthCredentials("sk-ant-oat01-first", "sk-ant-ort01-first", time.time() + 60)
    store.add_oauth_account(engine, box, Upstream("sub", store.KIND, "http://u"), first)
    second = OAuthCredentials("sk-ant-oat01-second", "sk-ant-ort01-second", time.time() + 3600, obtained_at=1.0)
    store.save_oauth_credentials(engine, box, "sub", second)

    assert store.mark_oauth_needs_reauth(engine, box, "sub", "invalid_grant", refused=first) == second
    [row] = store.list_oauth_accounts(engine)
    assert row.state == "active" and row.state_reason is None

    assert store.mark_oauth_needs_reauth(engine, box, "sub", "invalid_grant", refused=second) is None
    [row] = store.list_oauth_accounts(engine)
    assert row.state == "needs_reauth" and row.state_reason == "invalid_grant"

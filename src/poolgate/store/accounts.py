"""Subscription (OAuth) accounts as stored.

An account is an `upstreams` row of kind `anthropic_oauth` whose encrypted secret is the credentials'
JSON document (so the gateway's reload and the signer see it like any other upstream), plus an
`oauth_accounts` row with what may be shown (state, subscription type, expiry), plus the last quota picture
in `quota_snapshots`. A token rotation rewrites the secret and the metadata in one transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, Update, delete, select, update
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import IntegrityError

from poolgate.lifecycle.context import Upstream
from poolgate.store.crypto import SecretBox
from poolgate.store.db import bump_revision, oauth_accounts, quota_snapshots, upstreams
from poolgate.store.repo import RepoError, delete_upstream, upstream_of, upstream_settings
from poolgate.upstreams.oauth import OAuthCredentials, another_subscription, replaced_since
from poolgate.upstreams.quota import QuotaPicture, picture_from_json, picture_to_json
from poolgate.upstreams.tokens import AccountState

KIND = "anthropic_oauth"


@dataclass(frozen=True, slots=True)
class OAuthAccountRow:
    upstream: Upstream
    state: str
    state_reason: str | None
    subscription_type: str | None
    label: str | None
    scopes: tuple[str, ...]
    expires_at: float | None
    refreshed_at: float | None
    created_at: float
    quota: dict[str, Any] | None  # the last quota picture as stored (wall-clock JSON), if any
    state_since: float | None = None  # when its state (or its stored tokens) last changed


def _metadata(credentials: OAuthCredentials, now: float) -> dict[str, object]:
    return {
        "subscription_type": credentials.subscription_type,
        "label": credentials.label,
        "scopes": " ".join(credentials.scopes),
        "expires_at": credentials.expires_at,
        "updated_at": now,
    }


def add_oauth_account(
    engine: Engine,
    box: SecretBox,
    upstream: Upstream,
    credentials: OAuthCredentials,
    replace: bool = False,
    settings: Collection[str] = (),
) -> None:
    """Store a new account, or with `replace` give an existing one new credentials (a re-login) and the
    `settings` of `upstream` named (`base_url`, `weight`, `models`: those the command was given)."""
    now = time.time()
    with engine.begin() as conn:
        existing = conn.execute(select(upstreams.c.kind).where(upstreams.c.id == upstream.id)).scalar()
        if (refusal := _refusal(upstream.id, existing, replace)) is not None:
            raise RepoError(refusal)
        if existing is not None:
            _write_credentials(conn, box, upstream.id, credentials, now)
            values = {name: value for name, value in upstream_settings(upstream).items() if name in settings}
            if values:
                conn.execute(update(upstreams).where(upstreams.c.id == upstream.id).values(**values))
        else:
            try:
                conn.execute(
                    upstreams.insert().values(
                        id=upstream.id,
                        kind=KIND,
                        secret=box.encrypt(credentials.to_secret()),
                        enabled=upstream.enabled,
                        **upstream_settings(upstream),
                        created_at=now,
                    )
                )
            except IntegrityError:
                raise RepoError(f"an upstream with id {upstream.id!r} already exists") from None
            # What an older build's `upstreams remove` left of an account of this id is not this one's.
            conn.execute(delete(oauth_accounts).where(oauth_accounts.c.upstream_id == upstream.id))
            conn.execute(delete(quota_snapshots).where(quota_snapshots.c.upstream_id == upstream.id))
            conn.execute(
                oauth_accounts.insert().values(
                    upstream_id=upstream.id, state="active", state_reason=None, **_metadata(credentials, now)
                )
            )
        bump_revision(conn)


def _refusal(upstream_id: str, stored_kind: str | None, replace: bool) -> str | None:
    """Why an account cannot be stored as `upstream_id`, whose stored upstream is of `stored_kind` (None: there
    is none), or None."""
    if stored_kind is None:
        return None
    if not replace:
        return f"an upstream with id {upstream_id!r} already exists (--replace to re-authenticate it)"
    if stored_kind != KIND:
        return f"upstream {upstream_id!r} is not a subscription account (kind {stored_kind})"
    return None


def check_account_id(engine: Engine, upstream_id: str, replace: bool) -> None:
    """Raise the RepoError `add_oauth_account` would raise for this id now: a login checks it before its code
    exchange, which rotates the subscription's tokens (refused after it, the new pair was lost)."""
    with engine.connect() as conn:
        stored_kind = conn.execute(select(upstreams.c.kind).where(upstreams.c.id == upstream_id)).scalar()
    if (refusal := _refusal(upstream_id, stored_kind, replace)) is not None:
        raise RepoError(refusal)


def _write_credentials(
    conn: Connection, box: SecretBox, upstream_id: str, credentials: OAuthCredentials, now: float
) -> None:
    previous = _stored_credentials(conn, box, upstream_id)
    if previous is not None and another_subscription(previous, credentials):
        # The stored quota picture is the old subscription's (`accounts list`, the next start).
        conn.execute(delete(quota_snapshots).where(quota_snapshots.c.upstream_id == upstream_id))
    result = conn.execute(
        update(upstreams)
        .where(upstreams.c.id == upstream_id, upstreams.c.kind == KIND)
        .values(secret=box.encrypt(credentials.to_secret()))
    )
    if result.rowcount == 0:
        raise RepoError(f"no stored subscription account with id {upstream_id!r}")
    values = {"state": "active", "state_reason": None, "refreshed_at": now, **_metadata(credentials, now)}
    if (
        conn.execute(
            update(oauth_accounts).where(oauth_accounts.c.upstream_id == upstream_id).values(**values)
        ).rowcount
        == 0
    ):
        conn.execute(oauth_accounts.insert().values(upstream_id=upstream_id, **values))


def save_oauth_credentials(
    engine: Engine,
    box: SecretBox,
    upstream_id: str,
    credentials: OAuthCredentials,
    over: OAuthCredentials | None = None,
) -> OAuthCredentials | None:
    """Persist rotated tokens atomically (secret and metadata in one transaction) and mark the account active;
    with `over` (the pair a refresh started from), not over tokens that replaced it since (`replaced_since`: an
    `accounts import --replace` or a login while the refresh was under way): those are returned, nothing is
    written. The old tokens' rotated pair, saved a moment after the new ones, took the account back to them.

    The revision is bumped so that other gateway processes reload the new pair instead of refreshing with
    the dead one.
    """
    with engine.connect() as conn:
        # The write first: it takes the store's write lock, so no re-import lands between the read and the save.
        bump_revision(conn)
        stored = _stored_credentials(conn, box, upstream_id) if over is not None else None
        if over is not None and replaced_since(stored, over):
            conn.rollback()
            return stored
        _write_credentials(conn, box, upstream_id, credentials, time.time())
        conn.commit()
        return None


def load_oauth_credentials(engine: Engine, box: SecretBox, upstream_id: str) -> OAuthCredentials | None:
    with engine.connect() as conn:
        return _stored_credentials(conn, box, upstream_id)


def _stored_credentials(conn: Connection, box: SecretBox, upstream_id: str) -> OAuthCredentials | None:
    secret = conn.execute(
        select(upstreams.c.secret).where(upstreams.c.id == upstream_id, upstreams.c.kind == KIND)
    ).scalar()
    return None if secret is None else OAuthCredentials.from_secret(box.decrypt(secret))


def _state_update(upstream_id: str, state: AccountState, reason: str | None) -> Update:
    return (
        update(oauth_accounts)
        .where(oauth_accounts.c.upstream_id == upstream_id)
        .values(state=state, state_reason=reason[:500] if reason else None, updated_at=time.time())
    )


def set_oauth_state(engine: Engine, upstream_id: str, state: AccountState, reason: str | None) -> None:
    with engine.begin() as conn:
        conn.execute(_state_update(upstream_id, state, reason))


def mark_oauth_needs_reauth(
    engine: Engine, box: SecretBox, upstream_id: str, reason: str, refused: OAuthCredentials
) -> OAuthCredentials | None:
    """Mark the account `needs_reauth` because the token endpoint refused `refused`'s refresh token, unless
    the store holds another pair by now: another process rotated it (the endpoint refused ours because that
    process's refresh used it up) and saved it while we asked. Then that pair is returned and nothing is
    marked: a gateway sharing the store marked a working account dead for good when its mark landed after
    the other's save."""
    with engine.connect() as conn:
        # The write first: it takes the store's write lock, so no save lands between the read and the mark.
        conn.execute(_state_update(upstream_id, "needs_reauth", reason))
        stored = _stored_credentials(conn, box, upstream_id)
        if stored is not None and stored.refresh_token and stored.refresh_token != refused.refresh_token:
            conn.rollback()
            return stored
        conn.commit()
        return None


def list_oauth_accounts(engine: Engine) -> list[OAuthAccountRow]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(upstreams, oauth_accounts, quota_snapshots.c.picture)
            .select_from(
                upstreams.outerjoin(oauth_accounts, oauth_accounts.c.upstream_id == upstreams.c.id).outerjoin(
                    quota_snapshots, quota_snapshots.c.upstream_id == upstreams.c.id
                )
            )
            .where(upstreams.c.kind == KIND)
            .order_by(upstreams.c.created_at)
        ).all()
    return [
        OAuthAccountRow(
            upstream=upstream_of(row),
            state=row.state or "active",
            state_reason=row.state_reason,
            subscription_type=row.subscription_type,
            label=row.label,
            scopes=tuple((row.scopes or "").split()),
            expires_at=row.expires_at,
            refreshed_at=row.refreshed_at,
            created_at=row.created_at,
            quota=_quota_document(row.picture),
            state_since=row.updated_at,
        )
        for row in rows
    ]


def configured_account_row(upstream: Upstream, engine: Engine | None) -> OAuthAccountRow:
    """A config file's subscription account (a long-lived token: nothing of it is stored but the last quota
    picture a gateway saw), shown like a stored one."""
    picture = None
    if engine is not None:
        with engine.connect() as conn:
            picture = conn.execute(
                select(quota_snapshots.c.picture).where(quota_snapshots.c.upstream_id == upstream.id)
            ).scalar()
    return OAuthAccountRow(
        upstream=upstream,
        state="active",
        state_reason=None,
        subscription_type=None,
        label=None,
        scopes=(),
        expires_at=None,
        refreshed_at=None,
        created_at=0.0,
        quota=_quota_document(picture),
    )


def _quota_document(picture: str | None) -> dict[str, Any] | None:
    if not picture:
        return None
    try:
        quota = orjson.loads(picture)
    except orjson.JSONDecodeError:
        return None
    return quota if isinstance(quota, dict) else None


def holder_of(engine: Engine, box: SecretBox, credentials: OAuthCredentials) -> str | None:
    """The stored account that holds the same subscription (the same refresh or access token: one
    credentials file imported twice, which names neither, also once without its refresh token; else by account
    uuid, else by e-mail, in the same organization when both name one), if any."""
    for row in list_oauth_accounts(engine):
        stored = load_oauth_credentials(engine, box, row.upstream.id)
        if stored is None:
            continue
        if credentials.refresh_token is not None and stored.refresh_token == credentials.refresh_token:
            return row.upstream.id
        if stored.access_token == credentials.access_token:
            return row.upstream.id
        if credentials.account_uuid is not None and stored.account_uuid is not None:
            same_person = stored.account_uuid == credentials.account_uuid
        else:
            same_person = credentials.label is not None and stored.label == credentials.label
        # One person's seat in another organization (a personal Max and a Team plan, one login) is another
        # subscription: taken for this one, it was refused, and a login's tokens replaced this account's.
        if same_person and not another_subscription(stored, credentials):
            return row.upstream.id
    return None


def remove_oauth_account(engine: Engine, upstream_id: str) -> None:
    with engine.begin() as conn:
        if not delete_upstream(conn, upstream_id, upstreams.c.kind == KIND):
            raise RepoError(f"no stored subscription account with id {upstream_id!r}")


# ----- quota pictures ---------------------------------------------------------------------------------


def save_quota_picture(engine: Engine, upstream_id: str, picture: QuotaPicture) -> None:
    """Remember an account's latest quota picture (blocking: call it off the event loop, e.g. to_thread)."""
    document = orjson.dumps(picture_to_json(picture)).decode()
    values = {"picture": document, "observed_at": picture.observed_at_wall}
    # An upsert: two gateway processes may report the same account at once.
    statement = (
        insert(quota_snapshots)
        .values(upstream_id=upstream_id, **values)
        .on_conflict_do_update(index_elements=[quota_snapshots.c.upstream_id], set_=values)
    )
    with engine.begin() as conn:
        conn.execute(statement)


def load_quota_pictures(
    engine: Engine, now_mono: float | None = None, now_wall: float | None = None
) -> dict[str, QuotaPicture]:
    """Every stored picture on this process's monotonic clock (a gateway seeds its pool with them)."""
    now_mono = time.monotonic() if now_mono is None else now_mono
    now_wall = time.time() if now_wall is None else now_wall
    with engine.connect() as conn:
        rows = conn.execute(select(quota_snapshots.c.upstream_id, quota_snapshots.c.picture)).all()
    pictures = {}
    for row in rows:
        try:
            picture = picture_from_json(orjson.loads(row.picture), now_mono, now_wall)
        except orjson.JSONDecodeError:
            continue
        if picture is not None:
            pictures[row.upstream_id] = picture
    return pictures


# ----- the token manager's store ----------------------------------------------------------------------


class DbCredentialStore:
    """`CredentialStore` over the database; blocking calls run in a worker thread, off the event loop."""

    def __init__(self, engine: Engine, box: SecretBox) -> None:
        self._engine = engine
        self._box = box

    async def load(self, account_id: str) -> OAuthCredentials | None:
        return await asyncio.to_thread(load_oauth_credentials, self._engine, self._box, account_id)

    async def save(
        self, account_id: str, credentials: OAuthCredentials, over: OAuthCredentials | None = None
    ) -> OAuthCredentials | None:
        return await asyncio.to_thread(save_oauth_credentials, self._engine, self._box, account_id, credentials, over)

    async def set_state(self, account_id: str, state: AccountState, reason: str | None) -> None:
        await asyncio.to_thread(set_oauth_state, self._engine, account_id, state, reason)

    async def mark_needs_reauth(
        self, account_id: str, reason: str, refused: OAuthCredentials
    ) -> OAuthCredentials | None:
        return await asyncio.to_thread(mark_oauth_needs_reauth, self._engine, self._box, account_id, reason, refused)

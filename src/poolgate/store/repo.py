"""Gateway keys and upstream accounts as stored: keys hashed, upstream secrets encrypted."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Connection, Engine, Row, delete, select, update
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import IntegrityError

from poolgate.lifecycle.context import Upstream
from poolgate.store.crypto import MASTER_KEY_ENV, MASTER_KEY_FILE, SecretBox, SecretBoxError, open_box
from poolgate.store.db import bump_revision, gateway_keys, meta, oauth_accounts, quota_snapshots, read_meta, upstreams

KEY_PREFIX = "pg-"
# A stored key's id: `key_` and 12 hex digits (`create_key`). `keys set` and `revoke` take an id or a name.
KEY_ID = re.compile(r"key_[0-9a-f]{12}")


class RepoError(Exception):
    """A CLI or admin change that cannot be made; the message says why."""


def hash_key(key: str) -> str:
    # Gateway keys are 256-bit random, so a plain SHA-256 is not brute-forceable and is fast on the hot path.
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    """The part of a key that is safe to show and log: 10 characters of a generated key (46), never more
    than a quarter of a shorter secret (an admin token or a static key may be 16 characters long)."""
    return key[: min(10, len(key) // 4)]


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: str
    name: str
    prefix: str
    key_hash: str
    created_at: float
    revoked_at: float | None
    # Caller claims as JSON (see lifecycle/claims.py); authn parses it once per reload.
    settings: str | None = None


def create_key(engine: Engine, name: str, settings: Mapping[str, object] | None = None) -> tuple[KeyRow, str]:
    """Create a gateway key; the plain key is returned once and never stored."""
    if KEY_ID.fullmatch(name):
        # `keys set` and `revoke` of that id would then mean two keys.
        raise RepoError(f"{name!r} is how a key id is written: choose a name that is not one")
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = KeyRow(
        id="key_" + secrets.token_hex(6),
        name=name,
        prefix=display_prefix(plain),
        key_hash=hash_key(plain),
        created_at=time.time(),
        revoked_at=None,
        settings=orjson.dumps(settings).decode() if settings else None,
    )
    try:
        with engine.begin() as conn:
            conn.execute(gateway_keys.insert().values(**_asdict(row)))
            bump_revision(conn)
    except IntegrityError:
        with engine.connect() as conn:
            revoked = conn.execute(select(gateway_keys.c.revoked_at).where(gateway_keys.c.name == name)).scalar()
        # A revoked key keeps its name: the ledger's records of it must not become another caller's.
        taken = " (revoked, and a revoked key keeps its name: choose another)" if revoked is not None else ""
        raise RepoError(f"a key named {name!r} already exists{taken}") from None
    return row, plain


def _asdict(row: KeyRow) -> dict[str, object]:
    return {slot: getattr(row, slot) for slot in KeyRow.__slots__}


def list_keys(engine: Engine) -> list[KeyRow]:
    with engine.connect() as conn:
        rows = conn.execute(select(gateway_keys).order_by(gateway_keys.c.created_at)).all()
    return [KeyRow(**row._mapping) for row in rows]


def _named_key(conn: Connection, name_or_id: str) -> Row[Any]:
    """The one key `name_or_id` names: the key of that id, else the key of that name. (Matching either at
    once, a key named as another's id, which older builds let be made, had a change made to both.)"""
    for column in (gateway_keys.c.id, gateway_keys.c.name):
        row = conn.execute(select(gateway_keys).where(column == name_or_id)).first()
        if row is not None:
            return row
    raise RepoError(f"no key named {name_or_id!r}")


def set_key_settings(engine: Engine, name_or_id: str, settings: Mapping[str, object] | None) -> KeyRow:
    """Replace a key's caller claims; running gateways pick them up at their next reload."""
    value = orjson.dumps(settings).decode() if settings else None
    with engine.begin() as conn:
        row = _named_key(conn, name_or_id)
        if row.revoked_at is not None:
            # Its limits no longer matter: "set" would read as if the key worked again.
            raise RepoError(f"the key {row.name!r} is revoked: no caller can use it (create a new one)")
        conn.execute(update(gateway_keys).where(gateway_keys.c.id == row.id).values(settings=value))
        bump_revision(conn)
    return KeyRow(**{**row._mapping, "settings": value})


def revoke_key(engine: Engine, name_or_id: str) -> KeyRow:
    """The key, revoked now; one revoked before keeps the time it was (revoking again changed it)."""
    with engine.begin() as conn:
        row = _named_key(conn, name_or_id)
        if row.revoked_at is not None:
            return KeyRow(**row._mapping)
        revoked_at = time.time()
        conn.execute(update(gateway_keys).where(gateway_keys.c.id == row.id).values(revoked_at=revoked_at))
        bump_revision(conn)
    return KeyRow(**{**row._mapping, "revoked_at": revoked_at})


@dataclass(frozen=True, slots=True)
class StoredUpstream:
    upstream: Upstream
    secret: bytes  # encrypted


def upstream_settings(upstream: Upstream) -> dict[str, object]:
    """The `upstreams` columns of an account's settings: where it is, its weight, the models it serves."""
    return {
        "base_url": upstream.base_url,
        "weight": upstream.weight,
        "models": orjson.dumps(list(upstream.models)).decode(),
    }


def add_upstream(engine: Engine, box: SecretBox, upstream: Upstream, api_key: str) -> None:
    try:
        with engine.begin() as conn:
            conn.execute(
                upstreams.insert().values(
                    id=upstream.id,
                    kind=upstream.kind,
                    secret=box.encrypt(api_key),
                    enabled=upstream.enabled,
                    created_at=time.time(),
                    **upstream_settings(upstream),
                )
            )
            bump_revision(conn)
    except IntegrityError:
        raise RepoError(already_stored(upstream.id)) from None


def already_stored(upstream_id: str) -> str:
    return f"an upstream with id {upstream_id!r} already exists (--replace to change it)"


def upstream_stored(engine: Engine, upstream_id: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(upstreams.c.id).where(upstreams.c.id == upstream_id)).first() is not None


def subscription_account_replaced(upstream_id: str) -> str:
    """Why `upstreams add --replace` leaves a subscription account alone: its credential is a token pair."""
    return (
        f"{upstream_id!r} is a subscription account: `poolgate accounts import` or `accounts login` with"
        f" --id {upstream_id} --replace changes it"
    )


def replace_upstream(engine: Engine, box: SecretBox, upstream: Upstream, api_key: str) -> None:
    """Give a stored API-key upstream these settings and key in one change (enabled or not, it stays so): a
    running gateway takes it at one reload, never without the account as between a `remove` and an `add`."""
    with engine.begin() as conn:
        kind = conn.execute(select(upstreams.c.kind).where(upstreams.c.id == upstream.id)).scalar()
        if kind is None:
            raise RepoError(f"no stored upstream with id {upstream.id!r}")
        if kind != upstream.kind:
            raise RepoError(subscription_account_replaced(upstream.id))
        values = {"secret": box.encrypt(api_key), **upstream_settings(upstream)}
        conn.execute(update(upstreams).where(upstreams.c.id == upstream.id).values(**values))
        bump_revision(conn)


def upstream_of(row: Row[Any]) -> Upstream:
    """An `upstreams` row as the pool's `Upstream` (without its secret)."""
    return Upstream(
        id=row.id,
        kind=row.kind,
        base_url=row.base_url,
        weight=row.weight,
        models=tuple(orjson.loads(row.models)),
        enabled=bool(row.enabled),
        source="store",
    )


def list_upstreams(engine: Engine) -> list[StoredUpstream]:
    with engine.connect() as conn:
        rows = conn.execute(select(upstreams).order_by(upstreams.c.created_at)).all()
    return [StoredUpstream(upstream_of(row), row.secret) for row in rows]


# A value the first process to open a store's secrets encrypts with its master key (see `store_box`).
KEY_CHECK = "master_key_check"
KEY_CHECK_TEXT = "poolgate master key"


def store_box(engine: Engine, data_dir: Path) -> SecretBox:
    """The box for the store's secrets, its master key checked against a value the store holds encrypted
    with the store's key: the check value, else one of its secrets. The first process to open it records the
    check value: a gateway whose key came from POOLGATE_MASTER_KEY, its upstreams in the config file, left
    a store holding no secret, so a CLI command without the variable made a new key file and stored a secret
    no gateway could read; every reload then failed, key revocations included."""
    stored, recorded = _key_checked_against(engine)
    box = open_box(data_dir, stored)
    if not recorded:
        with engine.begin() as conn:  # the first of two processes opening a new store at once records it
            conn.execute(
                insert(meta)
                .values(key=KEY_CHECK, value=box.encrypt(KEY_CHECK_TEXT).decode())
                .on_conflict_do_nothing(index_elements=[meta.c.key])
            )
            check = read_meta(conn, KEY_CHECK)
        assert check is not None  # this one's, or the other's
        box.decrypt(check.encode())  # the other one's, if it came first: this key must open it too
    return box


def _key_checked_against(engine: Engine) -> tuple[bytes | None, bool]:
    """What a master key is checked against: the store's check value, else one of its secrets (None: it holds
    neither); and whether it was the check value."""
    with engine.connect() as conn:
        check = read_meta(conn, KEY_CHECK)
        if check is not None:
            return check.encode(), True
        return conn.execute(select(upstreams.c.secret).limit(1)).scalar(), False


def check_store_box(engine: Engine, data_dir: Path) -> list[str]:
    """What `store_box` refuses (SecretBoxError), checked without recording a check value or creating a key
    file, for `poolgate config check`; returns the stored upstreams whose secrets the key cannot decrypt,
    which a gateway leaves out of its pool."""
    stored, _ = _key_checked_against(engine)
    if stored is None and not os.environ.get(MASTER_KEY_ENV) and not (data_dir / MASTER_KEY_FILE).exists():
        return []  # nothing to check a key against, and no key yet: the gateway creates one
    box = open_box(data_dir, stored)
    return [row.upstream.id for row in list_upstreams(engine) if not _decrypts(box, row.secret)]


def _decrypts(box: SecretBox, secret: bytes) -> bool:
    try:
        box.decrypt(secret)
    except SecretBoxError:
        return False
    return True


def remove_upstream(engine: Engine, upstream_id: str) -> None:
    with engine.begin() as conn:
        if not delete_upstream(conn, upstream_id):
            raise RepoError(f"no stored upstream with id {upstream_id!r}")


def delete_upstream(conn: Connection, upstream_id: str, *where: ColumnElement[bool]) -> bool:
    """Delete the stored upstream (one that also meets `where`), and tell running gateways; whether there was one."""
    if conn.execute(delete(upstreams).where(upstreams.c.id == upstream_id, *where)).rowcount == 0:
        return False
    # A subscription account's state and quota picture go with it: left behind, the picture of a used-up
    # window held out the next upstream given its id (an API key, another subscription) till that reset.
    conn.execute(delete(oauth_accounts).where(oauth_accounts.c.upstream_id == upstream_id))
    conn.execute(delete(quota_snapshots).where(quota_snapshots.c.upstream_id == upstream_id))
    bump_revision(conn)
    return True


def set_upstream_enabled(engine: Engine, upstream_id: str, enabled: bool) -> None:
    with engine.begin() as conn:
        result = conn.execute(update(upstreams).where(upstreams.c.id == upstream_id).values(enabled=enabled))
        if result.rowcount == 0:
            raise RepoError(f"no stored upstream with id {upstream_id!r}")
        bump_revision(conn)

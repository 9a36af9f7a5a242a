"""authn: gateway credentials → `Principal`. Keys are looked up by hash; the plain key is never kept."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from poolgate.api.errors import ApiError
from poolgate.api.http import header
from poolgate.lifecycle.context import Principal, RawHeaders
from poolgate.store.repo import KeyRow, display_prefix, hash_key

log = logging.getLogger("poolgate.authn")


def presented_key(headers: RawHeaders) -> str | None:
    """The gateway key from `x-api-key` or `Authorization: Bearer` (Claude Code uses either)."""
    value = header(headers, b"x-api-key")
    if value:
        return value.decode("latin-1").strip()
    auth = header(headers, b"authorization")
    if auth and auth[:7].lower() == b"bearer ":
        return auth[7:].decode("latin-1").strip()
    return None


class Authenticator:
    def __init__(self) -> None:
        self._principals: dict[str, Principal] = {}
        self._revoked: set[str] = set()

    def load(self, stored: Iterable[KeyRow], static: Iterable[tuple[str, str]] = ()) -> None:
        """Replace the known keys: stored rows plus (name, plain key) pairs from the config file."""
        principals: dict[str, Principal] = {}
        revoked: set[str] = set()
        for row in stored:
            if row.revoked_at is not None:
                revoked.add(row.key_hash)
            else:
                principals[row.key_hash] = Principal(id=row.id, kind="api_key", name=row.name)
        for name, plain in static:
            principals[hash_key(plain)] = Principal(id=f"static:{name}", kind="api_key", name=name)
        self._principals, self._revoked = principals, revoked

    @property
    def key_count(self) -> int:
        return len(self._principals)

    def authenticate(self, headers: RawHeaders) -> Principal:
        key = presented_key(headers)
        if not key:
            raise ApiError(401, "Missing gateway key: send it in the x-api-key or Authorization: Bearer header")
        digest = hash_key(key)
        principal = self._principals.get(digest)
        if principal is not None:
            return principal
        # Claude Code retries a 401 silently for minutes; a clear log line is what explains the "hang".
        state = "revoked" if digest in self._revoked else "unknown"
        log.warning("rejected %s gateway key %s…", state, display_prefix(key))
        raise ApiError(401, f"Invalid gateway key ({state})")

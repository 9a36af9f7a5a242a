"""The admin API: live state the usage store does not have yet, behind its own credential.

`GET /admin/routes/{request_id}` and `GET /admin/routes?last=N` read the in-memory trace ring (the
newest decisions, explainable before the usage writer has flushed them); `GET /admin/upstreams` shows each
account's live state: health, rate-limit windows, EWMA statistics, warm prompt-cache entries and its billing
channel with this month's use (a flat-fee quota, a tiered price).
The admin token (config `admin.token`) is separate from gateway keys: a caller's key never opens it.
Without a configured token the admin API does not exist (404).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from functools import partial
from urllib.parse import parse_qs

from poolgate.api.errors import ApiError
from poolgate.api.http import fields_of
from poolgate.billing.book import ChannelBook
from poolgate.lifecycle.authn import presented_key
from poolgate.lifecycle.routing.trace import TraceRing
from poolgate.telemetry.logging import BoundedLog
from poolgate.upstreams.pool import Pool, UpstreamState

PREFIX = "/admin/"

# Its lines are refused requests: someone trying tokens can send thousands a second.
log = BoundedLog(logging.getLogger("poolgate.admin"))


LAST_ROUTES_MAX = 1000


class AdminApi:
    def __init__(
        self,
        token: str | None,
        traces: TraceRing,
        pool: Pool,
        book: ChannelBook,
        unusable: Callable[[float], dict[str, str | None]],
    ) -> None:
        self._token = token.encode() if token else None
        self._unusable = unusable
        self._traces = traces
        self._pool = pool
        self._book = book

    def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> object:
        """The JSON answer for an admin request; raises ApiError for anything else."""
        if self._token is None:
            raise ApiError(404, f"Not found: {method} {path} (the admin API is off: set admin.token)")
        self._authenticate(headers, path)
        answer: Callable[[], object]
        if path == "/admin/routes":
            answer = partial(self._last_routes, query)
        elif path.startswith("/admin/routes/"):
            answer = partial(self._route, path.removeprefix("/admin/routes/"))
        elif path == "/admin/upstreams":
            answer = self._upstreams
        else:
            raise ApiError(404, f"Not found: {method} {path}")
        if method != "GET":
            raise ApiError(405, f"{method} is not allowed on {path}; use GET", headers=[(b"allow", b"GET")])
        return answer()

    def _route(self, request_id: str) -> object:
        if not request_id:
            raise ApiError(404, "Give a request id: /admin/routes/REQUEST_ID (or /admin/routes for the latest)")
        trace = self._traces.get(request_id)
        if trace is None:
            raise ApiError(404, f"No routing trace in memory for {request_id}; try `poolgate route explain`")
        return {"request_id": request_id, "route": trace}

    def _upstreams(self) -> object:
        now, wall = time.monotonic(), time.time()
        reasons = self._unusable(now)
        return {
            "upstreams": [
                {
                    **upstream_state(state, now, reasons[state.upstream.id]),
                    "channel": self._book.describe(state.upstream.id, wall),
                }
                for state in self._pool.states()
            ]
        }

    def authorize_scrape(self, headers: list[tuple[bytes, bytes]]) -> None:
        """`/metrics` is open while there is no admin token (bind it to a private interface), and needs the
        token once one is configured (Prometheus sends it as a bearer token)."""
        if self._token is not None:
            self._authenticate(headers, "/metrics")

    def _authenticate(self, headers: list[tuple[bytes, bytes]], path: str) -> None:
        assert self._token is not None
        presented = presented_key(fields_of(headers), b"x-admin-token")
        if presented is None or not hmac.compare_digest(presented.encode("latin-1"), self._token):
            # Logged, as a refused gateway key is: a scraper with a stale token, or someone trying tokens,
            # shows in the log (never what was presented).
            log.warning("%s refused: %s", path, "no admin token" if presented is None else "a wrong admin token")
            raise ApiError(401, "The admin API needs the admin token (x-admin-token or Authorization: Bearer)")

    def _last_routes(self, query: bytes) -> object:
        asked = parse_qs(query.decode("latin-1"), keep_blank_values=True)
        # A parameter it does not take (`limit=5`, as other APIs spell it) was ignored: twenty traces came back.
        unknown = sorted(set(asked) - {"last"})
        if unknown:
            raise ApiError(400, f"Unknown query parameter {unknown[0]!r}: GET /admin/routes takes last=N only")
        value = asked.get("last", ["20"])[0]
        # ASCII digits only: int() also takes other scripts' digits (a full-width `１`), `_` between digits,
        # a sign and spaces around.
        if not (value.isascii() and value.isdigit()):
            raise ApiError(400, "last: expected an integer (digits 0-9)")
        count = int(value)
        if not 1 <= count <= LAST_ROUTES_MAX:
            raise ApiError(400, f"last: must be between 1 and {LAST_ROUTES_MAX}")
        return {
            "routes": [{"request_id": request_id, "route": trace} for request_id, trace in self._traces.last(count)]
        }


def upstream_state(state: UpstreamState, now: float, unusable: str | None) -> dict[str, object]:
    """One account's live state as plain data (no secret: the pool never holds one); `unusable` is why the
    router would not send it a request now (`Router.unusable`)."""
    share, tokens_left = state.reported_headroom(now, unusable)
    return {
        "id": state.upstream.id,
        "kind": state.upstream.kind,
        "enabled": state.upstream.enabled,
        "usable": unusable is None,
        "unusable_reason": unusable,
        "in_flight": state.in_flight,
        "headroom": round(share, 4),
        "tokens_left": None if tokens_left is None else int(tokens_left),
        "ratelimits": {
            kind: {
                "limit": obs.limit,
                "remaining": obs.remaining,
                # 0 once the reset has passed (the account has not answered since to say more).
                "resets_in_s": None if obs.reset_at is None else max(0.0, round(obs.reset_at - now, 1)),
            }
            for kind, obs in state.ratelimits.items()
        },
        "ttfb_ms": None if state.stats.ttfb_ms is None else round(state.stats.ttfb_ms, 1),
        "latency_ms": None if state.stats.latency_ms is None else round(state.stats.latency_ms, 1),
        "error_rate": round(state.stats.error_rate(now), 4),
        "requests": state.stats.requests,
        "warm_cache_entries": state.warm.live(now),
        # Models it answered 403 for, each out of routing for this many seconds more (its other models' requests go on).
        "denied_models": {model: round(until - now, 1) for model, until in sorted(state.denied.items()) if until > now},
    }

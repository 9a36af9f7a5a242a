"""Browser callers (CORS), as the Anthropic API admits them: only those that opt in with the header the
TypeScript SDK sends under `dangerouslyAllowBrowser: true`. Without CORS answers a browser app sees every
answer, errors included, as a network failure, and its preflight got a 405.

No cookie or other ambient credential opens the gateway (a caller names its key in a header), so any origin
may be let in: a page still needs a gateway key to get anything but a 401."""

from __future__ import annotations

from collections.abc import Awaitable
from itertools import product
from typing import Any, get_args

from poolgate.api.http import Fields, Message, Send, connection_lost, server_flow
from poolgate.lifecycle.claims import QuotaMetric, QuotaRule, QuotaWindow

BROWSER_FLAG = b"anthropic-dangerous-direct-browser-access"

# What an app learns of its caller's limits: the request's cost (asked for with `x-poolgate-cost`), its budget,
# and each quota rule's state. A browser app given a key of its own with a budget (README) could read none of
# them, so it could not show what is left.
_LIMITS = (
    "x-poolgate-cost",
    "x-poolgate-cost-currency",
    "x-poolgate-pricing-version",
    "x-poolgate-budget-limit-usd",
    "x-poolgate-budget-spent-usd",
    "x-poolgate-budget-reset",
    *(
        f"x-poolgate-quota-{part}-{QuotaRule(metric, 1, window).name}"
        for metric, window in product(get_args(QuotaMetric), get_args(QuotaWindow))
        for part in ("limit", "remaining", "reset")
    ),
)
# What a browser lets the SDK read of an answer beyond the safelisted headers: the request id of its errors,
# the retry advice its retries follow, and the caller's limits.
EXPOSED = (
    b"request-id, retry-after, retry-after-ms, x-should-retry, x-poolgate-upstream, x-poolgate-upstream-request-id, "
    + ", ".join(_LIMITS).encode()
)
ANSWER_HEADERS = ((b"access-control-allow-origin", b"*"), (b"access-control-expose-headers", EXPOSED))
PREFLIGHT_MAX_AGE = b"86400"


def browser_request(fields: Fields) -> bool:
    """A cross-origin request from a browser whose caller opted in (the SDK sends the flag on every request)."""
    return b"origin" in fields and fields.get(BROWSER_FLAG) == b"true"


def preflight_headers(fields: Fields) -> list[tuple[bytes, bytes]] | None:
    """The answer to a preflight that announces the flag among its headers (a preflight carries the names of
    the request's headers, not their values); None for any other, which gets no CORS headers."""
    requested = fields.get(b"access-control-request-headers")
    if b"origin" not in fields or requested is None:
        return None
    if BROWSER_FLAG not in (name.strip().lower() for name in requested.split(b",")):
        return None
    return [
        (b"access-control-allow-origin", b"*"),
        (b"access-control-allow-methods", b"GET, HEAD, POST"),
        (b"access-control-allow-headers", requested),
        (b"access-control-max-age", PREFLIGHT_MAX_AGE),
    ]


class BrowserAnswer:
    """The server's `send` with the CORS headers added to the answer's head. Its bound `send` keeps what the
    gateway reads of uvicorn's request cycle through `send.__self__` (`disconnected`, `flow`)."""

    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    @property
    def disconnected(self) -> bool:
        return connection_lost(self._send)

    @property
    def flow(self) -> Any:
        return server_flow(self._send)

    def send(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            message["headers"] = [*message["headers"], *ANSWER_HEADERS]
        return self._send(message)

"""shape: the client's request + the chosen upstream → `ShapedRequest` (no credentials here).

The body is forwarded byte for byte. Headers pass through except hop-by-hop ones, the caller's own
credentials (the gateway key must never reach an upstream), cookies, and client-address headers, also
when their names are written with `_` for `-`.
"""

from __future__ import annotations

import msgspec

from poolgate.api.errors import ApiError
from poolgate.api.http import header_text
from poolgate.lifecycle.context import RawHeaders, RequestContext, Upstream
from poolgate.telemetry.logging import visible

# RFC 9110 §7.6.1 hop-by-hop headers, plus what the gateway owns or must not leak upstream.
DROPPED = frozenset(
    {
        b"host",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        # Not hop-by-hop, but no request header of HTTP's: CGI-style servers read it as `HTTP_PROXY`, the proxy
        # their own outgoing requests go through (httpoxy), so a caller's could route an upstream proxy's calls,
        # the account's key on them, through the caller's host.
        b"proxy",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"x-api-key",
        b"authorization",
        b"cookie",
        b"accept-encoding",
        # The gateway reads the body as plain JSON (a compressed one is refused): whatever a client said
        # about its encoding does not describe the bytes sent on.
        b"content-encoding",
        # Who the client is and how it reached us: the upstream sees the gateway, not the caller.
        b"forwarded",
        b"x-original-forwarded-for",
        b"x-real-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"via",
        # The gateway's admin credential (its per-request switches, `x-poolgate-*`: see `OWN_PREFIX`).
        b"x-admin-token",
    }
)
# The gateway's own headers, whatever follows: today's switches (`-trace`, `-cost`) and any a client sends.
OWN_PREFIX = b"x-poolgate-"
# Headers a proxy in front of the gateway adds, whatever follows: the client's address (`-for`, `-host`,
# `-proto`, …) but also who it is, an authenticating proxy's `x-forwarded-user` and `-email`, and the user's
# own token (oauth2-proxy's `x-forwarded-access-token`, or its `x-auth-request-access-token` passed on by an
# nginx `auth_request`), which the upstream must never see.
DROPPED_PREFIXES = (OWN_PREFIX, b"x-forwarded-", b"x-auth-request-")

# The relay reads usage out of the body, so it asks for it uncompressed; the client still gets what it
# can read either way (identity is always acceptable).
ACCEPT_ENCODING = ("accept-encoding", "identity")


class ShapedRequest(msgspec.Struct, frozen=True, gc=False):
    """A Struct, not a frozen dataclass: one is made per attempt, and its constructor costs a fifth."""

    upstream: Upstream
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    # The body's `system` as decoding the request found it (an empty Raw: none), for signing it for a subscription
    # account without decoding the body again (~0.6 ms for 1 MB, each attempt); None: not decoded.
    system: msgspec.Raw | None = None
    # Whether `headers` hold a User-Agent (the client's): without one, none is sent (`NO_AGENT`).
    agent: bool = False


# Request header names by what forwarding makes of them: the name as text, or None for one that is not forwarded.
# Clients send few names (Claude Code's twenty, the SDKs'), so a request's are nearly all known: one lookup each
# instead of four calls (~250 bytecodes for six headers). Bounded for safety (names are the client's to choose).
_FORWARDED: dict[bytes, str | None] = {}
_FORWARDED_MAX = 4096
_UNSEEN = ""  # no name forwards as the empty text: a name is one byte at least


# The longest header value sent on: HTTP servers and proxies refuse a longer header line (nginx's and aiohttp's
# 8 KB by default) with a 400 or 431 of their own, which read as the account's (`is its base_url the API's?`)
# and made the request fail over through the whole pool. The gateway's own limit is the whole head's
# (`server.max_head_bytes`); a long header it does not send on (a JWT in `authorization`) is the gateway's own.
MAX_FORWARDED_VALUE = 8000
# The most header fields sent on, for the same reason: servers count a head's fields (aiohttp refuses more than
# 128, Envoy 100 by default, its own and the gateway's credential, host and framing among them). 130 tiny headers
# made every account of the pool answer a bare 400 in turn, each counted as that account's failure.
MAX_FORWARDED_FIELDS = 90


class Unsendable(ApiError):
    """A request no upstream can be sent, whatever the account: the client's to change (no attempt made)."""


def forward_headers(headers: RawHeaders) -> list[tuple[str, str]]:
    """The request's headers to send upstream, names and values as aiohttp takes them (`header_text`), without
    those it must not see (`DROPPED`, `DROPPED_PREFIXES`) and those its Connection header lists as hop-by-hop.
    Raises the 431 for a value longer than MAX_FORWARDED_VALUE, or more than MAX_FORWARDED_FIELDS of them."""
    forwarded: list[tuple[str, str]] = []
    listed: list[bytes] = []
    names = _FORWARDED
    for name, value in headers:
        text = names.get(name, _UNSEEN)
        if text == _UNSEEN:
            text = _forwarded_name(name)
        if text is None:
            if name == b"connection":
                listed.append(value)
            continue
        if len(value) > MAX_FORWARDED_VALUE:
            raise Unsendable(
                431,
                f"Request header {visible(text)!r} is {len(value):,} bytes long: a header sent on to the upstream"
                f" may be at most {MAX_FORWARDED_VALUE:,} (HTTP servers and proxies refuse longer ones)",
            )
        # `header_text`'s ASCII case inline: a call per header, on every attempt.
        forwarded.append((text, value.decode("latin-1") if value.isascii() else header_text(value)))
    if len(forwarded) > MAX_FORWARDED_FIELDS:
        raise Unsendable(
            431,
            f"The request carries {len(forwarded):,} headers to send on to the upstream: at most"
            f" {MAX_FORWARDED_FIELDS} may be (HTTP servers and proxies refuse heads of more)",
        )
    if listed:
        # A name read with `_` as `-`, as CGI-style servers read it (see `_forwarded_name`); Node's `connection:
        # keep-alive` (Claude Code's) lists only names dropped anyway.
        hop_by_hop = {token.strip().lower().replace(b"_", b"-") for value in listed for token in value.split(b",")}
        hop_by_hop -= DROPPED
        if hop_by_hop:
            forwarded = [header for header in forwarded if _alias(header[0].encode("latin-1")) not in hop_by_hop]
    return forwarded


def _alias(name: bytes) -> bytes:
    return name.replace(b"_", b"-")


def _forwarded_name(name: bytes) -> str | None:
    """`name` as text if the upstream may see it, else None. A name is compared with `_` read as `-`, as
    CGI-style servers (WSGI, Rack, PHP, nginx with `underscores_in_headers`) read it: there `x_api_key` is
    `x-api-key`, and `x_forwarded_for` the client's address."""
    alias = _alias(name)
    text = None if alias in DROPPED or alias.startswith(DROPPED_PREFIXES) else name.decode("latin-1")
    if len(_FORWARDED) < _FORWARDED_MAX:
        _FORWARDED[name] = text
    return text


def shape(ctx: RequestContext, upstream: Upstream) -> ShapedRequest:
    url = upstream.base_url + ctx.path
    if ctx.query:
        url += "?" + ctx.query.decode("latin-1")
    headers = forward_headers(ctx.headers)
    present = {name for name, _ in headers}
    headers.append(ACCEPT_ENCODING)
    if "content-type" not in present:
        headers.append(("content-type", "application/json"))
    if "anthropic-version" not in present:
        headers.append(("anthropic-version", "2023-06-01"))
    system = ctx.prompt.system if ctx.prompt is not None else None
    return ShapedRequest(upstream, "POST", url, tuple(headers), ctx.body, system, "user-agent" in present)

"""The paths the gateway answers, with the methods each takes, and what a client calling a path it does
not serve is told: a base URL that ends in a path (`/v1`, another gateway's `/anthropic`) or an Anthropic API
it does not relay. `Gateway.asgi` and `Gateway._http` dispatch by these.
"""

from __future__ import annotations

from poolgate.lifecycle.context import Endpoint

# The Messages endpoints, which take POST (`Gateway.asgi` hands them to `_messages`).
MESSAGE_ENDPOINTS: dict[str, Endpoint] = {
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
}

# What reads a resource: a HEAD is a GET whose body the server leaves out (HTTP asks every server for both;
# a monitor probing `/readyz` with HEAD got 405).
READ = ("GET", "HEAD")
# The methods each fixed path answers (a wrong one gets 405 with `allow`); the Messages endpoints take POST.
# Liveness, answered without a key: Claude Code (2.1.332) opens its connection with `HEAD /api/hello` on each
# start, which the API answers 200 (the gateway answered 404); older releases probed `HEAD /`.
LIVENESS = ("/", "/healthz", "/api/hello")
ALLOWED_METHODS = {path: "GET, HEAD" for path in ("/v1/models", *LIVENESS, "/readyz", "/metrics")}

# What a client whose base URL ends in /v1 is told (it sends `/v1/v1/messages`), naming the variable to fix.
BASE_URL_ENDS_IN_V1 = (
    "the base URL must not end in /v1: the client adds /v1 itself. Set ANTHROPIC_BASE_URL (or the SDK's"
    " base_url) to http://host:port, without /v1"
)


def base_url_path(path: str) -> str | None:
    """The path a client's base URL ends in, when `path` is an API path under one: `/v1` of any `/v1/v1/…`
    (the client adds /v1 itself), or the prefix of an endpoint poolgate serves, `/anthropic` of
    `/anthropic/v1/messages` (other gateways serve Anthropic's API under a path; poolgate serves it at the root)."""
    if path.startswith("/v1/v1/"):
        return "/v1"
    at = path.find("/v1/", 1)
    while at > 0:
        tail = path[at:]
        if tail in MESSAGE_ENDPOINTS or tail == "/v1/models" or tail.startswith("/v1/models/"):
            return path[:at]
        at = path.find("/v1/", at + 1)
    return None


def base_url_advice(prefix: str) -> str:
    """What a client whose base URL ends in `prefix` is told (see `base_url_path`), naming the variable to fix."""
    if prefix == "/v1":
        return BASE_URL_ENDS_IN_V1
    if prefix.endswith("/"):
        # `//v1/messages`: a base URL ending in `/` (or in `//`) joined to the path by hand.
        return (
            f"the path begins with {prefix}/, not /: poolgate serves its API at /v1/…. A base URL ending in /"
            " joined to /v1/… makes //v1/…: set ANTHROPIC_BASE_URL (or the SDK's base_url) to http://host:port,"
            " without a trailing /"
        )
    return (
        f"poolgate serves its API at the root, not under {prefix}. Set ANTHROPIC_BASE_URL (or the SDK's base_url)"
        " to http://host:port, without a path"
    )


# Anthropic APIs the gateway does not relay, by path prefix (named in their 404s).
UNSERVED_APIS = (
    ("/v1/messages/batches", "the Message Batches API"),
    ("/v1/files", "the Files API"),
    ("/v1/skills", "the Skills API"),
    ("/v1/complete", "the Text Completions API"),  # the legacy API older SDKs' `completions.create` calls
)


def unserved_api(path: str) -> str | None:
    return next((name for prefix, name in UNSERVED_APIS if path.startswith(prefix)), None)

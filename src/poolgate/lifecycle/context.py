"""The spine's vocabulary: what one request carries from stage to stage."""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass
from typing import Literal

import msgspec

from poolgate.cache.breakpoints import PromptFields, PromptPrefix
from poolgate.lifecycle.claims import NO_CLAIMS, CallerClaims

PrincipalKind = Literal["api_key", "oauth_subject", "internal_key", "workload_identity", "subscription_bearer"]
# `keepalive`: a cache keepalive the gateway sent on a paused session's behalf (cache/keepalive.py).
# `warmup`: a minimal request that starts a subscription account's 5-hour window (upstreams/accounts.py).
Endpoint = Literal["messages", "count_tokens", "keepalive", "warmup"]
RawHeaders = list[tuple[bytes, bytes]]
# A session by its caller (principal id), its id and its model: the id is the client's to choose, so what
# the gateway remembers of a session (its account, its cache keepalive) is its caller's, out of other
# callers' reach; and a prompt cache is one model's (a session's haiku side calls are a conversation apart).
SessionKey = tuple[str, str, str]


class Thread(msgspec.Struct, frozen=True, gc=False):
    """A request's `thread` field (the message threads beta): it asks the upstream to hold the conversation under
    the answer's `id` (`create`, `previous_message_id` None), or goes on from the reply `previous_message_id` with
    only the new messages (`continue`), which only the account holding the thread can answer."""

    previous_message_id: str | None = None


def new_request_id() -> str:
    """`req_pg_` + milliseconds since the epoch + 48 random bits, in hex: unique, not secret (a PRNG is
    enough, and costs a fraction of an os.urandom syscall per request), and in time order, so that the usage
    table's primary key grows at its end instead of at random pages of an ever larger index."""
    return f"req_pg_{time.time_ns() // 1_000_000:012x}{random.getrandbits(48):012x}"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the result of authn, the input of policy."""

    id: str
    kind: PrincipalKind
    name: str
    # Parsed once by authn; policy reads only this typed form.
    claims: CallerClaims = NO_CLAIMS

    @property
    def credential(self) -> str:
        """What the caller presented, in words: a refusal that says it is valid names it as the caller knows it."""
        return "key" if self.kind in ("api_key", "internal_key") else "token"


@dataclass(frozen=True, slots=True)
class Upstream:
    """An account in the pool, without its secret: only the signer holds credentials."""

    id: str
    kind: str
    base_url: str
    weight: int = 1
    models: tuple[str, ...] = ()
    enabled: bool = True
    source: Literal["config", "store"] = "config"
    # Cache keepalive for this account even when it is off globally (`routing.keepalive.enabled`).
    cache_keepalive: bool = False


class RequestContext(msgspec.Struct, gc=False):
    """One proxied request, decoded only as far as routing and accounting need. (A Struct, as the other
    per-request records: made in C, and nothing it holds refers back to it.)"""

    request_id: str
    endpoint: Endpoint
    path: str
    query: bytes
    headers: RawHeaders
    body: bytes
    model: str
    stream: bool = False
    session_id: str | None = None
    # The output bound the caller asked for (Messages requests): policy's cost estimate uses it.
    max_tokens: int | None = None
    # It asks for a mode whose tokens bear a premium (`speed: "fast"`, `inference_geo: "us"`): the estimate
    # bounds it.
    fast: bool = False
    us_only: bool = False
    # The undecoded parts of the prompt the cache model reads (Messages requests only).
    prompt: PromptFields | None = None
    # Its `thread`, when it has one the gateway can read (Messages requests only).
    thread: Thread | None = None
    # Its cache breakpoints, when the router is cache-aware.
    prefix: PromptPrefix | None = None
    principal: Principal | None = None
    started: float = msgspec.field(default_factory=time.perf_counter)
    started_at: float = msgspec.field(default_factory=time.time)

    def timed_from(self, arrived: float, now: float) -> None:
        """Time the request from `arrived` (`time.perf_counter`), its wall-clock start moved back with it from
        `now` (the gateway's wall clock, which dates its month for billing: tests move it)."""
        self.started_at = now - (time.perf_counter() - arrived)
        self.started = arrived


def costs_anything(ctx: RequestContext) -> bool:
    """Counting tokens is free (and counts against no channel's monthly quota)."""
    return ctx.endpoint != "count_tokens"


def speaks_for_messages(ctx: RequestContext) -> bool:
    """Whether an account's answer to the request speaks of its Messages rate limits. Counting tokens has limits
    of its own at the API, apart from Messages', so its 429 (and its rate-limit headers) says nothing of whether
    the account can take a message: read as Messages', a caller counting tokens faster than they allow (which no
    quota stops: counting is free) parked every account it tried, and every caller's messages got the pool's 529."""
    return ctx.endpoint != "count_tokens"


class Iteration(msgspec.Struct, frozen=True, gc=False):
    """The tokens of an inference an answer ran that its top-level usage leaves out (`usage.iterations`): a
    server-side compaction's (on the request's model: `model` None) or an advisor's (on `model`)."""

    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0


class Usage(msgspec.Struct, gc=False):
    input_tokens: int = 0
    output_tokens: int = 0
    # All cache writes; of which written with the 1-hour TTL (`cache_creation.ephemeral_1h_input_tokens`),
    # billed at a higher rate than the default 5-minute writes.
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    # Server tools the upstream ran and bills per use (`server_tool_use.web_search_requests`).
    web_search_requests: int = 0
    # The answer carried no `usage` object at all (the API's always does; a proxy in between may strip it):
    # its counts are unknown, not zero, and so is its cost.
    unreported: bool = False
    # It ran in a mode whose tokens bear a premium (`usage.speed: "fast"`, `usage.inference_geo: "us"`; see
    # `billing.pricing.PerTokenPrice.premium`).
    fast: bool = False
    us_only: bool = False
    # The compaction tokens counted in the token fields above: billed on the request's model, and left out of
    # the top-level counts the answer reported (see `lifecycle.usage.apply_usage`).
    compaction: Iteration | None = None
    # The advisor sub-inferences the answer ran on other models: priced at their models' rates, not counted in
    # the token fields above (another model's tokens).
    advisors: tuple[Iteration, ...] = ()
    # A stream cut short after an advisor's advice or a compaction's block was passed on: their tokens, which only
    # the final usage reports, are unknown, and so is the cost.
    incomplete: bool = False


class Outcome(enum.StrEnum):
    ok = "ok"
    upstream_error = "upstream_error"
    client_error = "client_error"
    no_upstream = "no_upstream"
    stream_error = "stream_error"
    client_disconnected = "client_disconnected"
    # The gateway was shutting down and could wait no longer (shutdown grace over, a second Ctrl-C).
    interrupted = "interrupted"
    # A fault in the gateway itself (logged with its traceback): answered 500 api_error.
    gateway_error = "gateway_error"


class UsageRecord(msgspec.Struct, gc=False, frozen=True):
    """What a finished request leaves behind, success or failure. (A Struct: one per request, and its
    fields are all plain values.) Frozen: the usage writer stores it after the observers have had it, and
    none of them may rewrite the ledger."""

    request_id: str
    started_at: float
    principal_id: str | None
    principal_name: str | None
    endpoint: str
    model: str | None
    stream: bool
    upstream_id: str | None
    status: int
    outcome: str
    error_type: str | None
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    ttfb_ms: float | None
    duration_ms: float
    attempts: int
    session_id: str | None
    route: str | None = None  # the RoutingTrace as JSON
    # Of `cache_creation_input_tokens`, those written with the 1-hour TTL.
    cache_creation_1h_input_tokens: int = 0
    # What the request cost on its upstream's channel, in integer micro-units of `currency`; None when
    # the price is unknown (never 0 for unknown). `pricing_version` names the price that applied.
    cost_micro_usd: int | None = None
    currency: str | None = None
    pricing_version: str | None = None
    web_search_requests: int = 0
    # What the caller's budget was charged where that is not `cost_micro_usd` (µUSD): a request whose cost
    # is unknown (its pricing failed, its channel prices by characters) is charged its reservation.
    # Budgets are re-seeded from the ledger at start, so it must be there.
    charged_micro_usd: int | None = None

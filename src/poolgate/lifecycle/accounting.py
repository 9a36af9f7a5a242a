"""Accounting of a finished request, a client's or the gateway's own: how it ended (`answered_with`,
`ended_by`), whether and by what it is billed (`billed`, `billable`, `elapsed_ms`), the cost headers its
caller may ask for, and its usage record. `Finished` holds a request from `Gateway._finish` (which charges its
budget and channel at once) to the batch that writes its record and tells the observers (`Gateway._account`).
"""

from __future__ import annotations

import math
import time

import msgspec

from poolgate.api.anthropic import is_credential
from poolgate.api.errors import ApiError
from poolgate.billing.book import FREE, USAGE_INCOMPLETE, USAGE_UNREPORTED
from poolgate.billing.values import BillableUsage, ModelUsage, Priced
from poolgate.lifecycle.context import Iteration, Outcome, RequestContext, Usage, UsageRecord, costs_anything
from poolgate.lifecycle.policy import Admission
from poolgate.lifecycle.relay import RelayResult
from poolgate.lifecycle.routing.router import RouteRefused
from poolgate.lifecycle.routing.trace import RoutingTrace
from poolgate.telemetry.logging import redact


class Finished(msgspec.Struct, frozen=True, gc=False):
    """A finished request waiting for its usage record and observer event. (A Struct: one per request, made in
    C; nothing it holds refers back to it.)"""

    ctx: RequestContext
    result: RelayResult
    trace: RoutingTrace | None
    # The trace as JSON, for the usage record.
    route: bytes | None
    usage: BillableUsage
    # Worked out already where its channel's month needed it (see `Gateway._finish`).
    priced: Priced | None
    # Its hold on its caller's quotas and budget, settled with the batch.
    admission: Admission
    # perf_counter when it finished: its duration does not include the wait for the batch.
    ended: float


def answered_with(result: RelayResult, error: ApiError) -> None:
    """The request was answered with `error`: its status, type, message and, unless the relay said whose
    error it is, its outcome (a keepalive's were all `upstream_error`, one no account was tried for too)."""
    result.status, result.error_type, result.error_message = error.status, error.error_type, error.message
    if result.outcome is Outcome.ok:
        result.outcome = (
            # The router's refusals (a 529, a flat-fee channel's `block` 503) tried no account.
            Outcome.no_upstream
            if error.status == 529 or isinstance(error, RouteRefused)
            else (Outcome.client_error if error.status < 500 else Outcome.upstream_error)
        )


def ended_by(result: RelayResult, outcome: Outcome, error: ApiError, answered: bool) -> None:
    """The gateway ended the request with `error`: its outcome, type and message, and its status unless an
    answer had begun (a stream's 200 stands, and so does the usage of an answer the upstream billed)."""
    result.outcome, result.error_type, result.error_message = outcome, error.error_type, error.message
    if not answered:
        result.status = error.status


def billed(ctx: RequestContext, status: int) -> bool:
    """Only answered Messages requests cost anything (errors are not billed)."""
    return status == 200 and costs_anything(ctx)


def billable(usage: Usage, duration_ms: int = 0) -> BillableUsage:
    """What the pricing models meter: the answer's tokens (a compaction's among them), its web searches, the
    request's duration (what a per-unit duration price bills; characters and images are not measured on Messages
    traffic, see `ChannelBook.cost`) and its advisors' tokens, by model. Cache writes without a reported 1-hour
    share are billed as 5-minute writes (the default TTL)."""
    # Not `min()`, a call of ~1,400 instructions (CPython 3.11): every request is made billable once or twice.
    one_hour, written = usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens
    if written < one_hour:
        one_hour = written
    billed = BillableUsage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_creation_5m=written - one_hour,
        cache_creation_1h=one_hour,
        cache_read=usage.cache_read_input_tokens,
        web_searches=usage.web_search_requests,
        duration_ms=duration_ms,
        unknown=USAGE_UNREPORTED if usage.unreported else USAGE_INCOMPLETE if usage.incomplete else "",
        fast=usage.fast,
        us_only=usage.us_only,
    )
    if usage.compaction is None and not usage.advisors:  # nearly every answer: no more keywords to pass
        return billed
    return msgspec.structs.replace(
        billed,
        compaction=None if usage.compaction is None else _tokens(usage.compaction),
        advisors=tuple(ModelUsage(str(advisor.model), _tokens(advisor)) for advisor in usage.advisors),
    )


def _tokens(iteration: Iteration) -> BillableUsage:
    """An iteration's tokens, as a price meters them (its 1-hour writes are within its writes: see
    `lifecycle.usage.read_iterations`)."""
    written, one_hour = iteration.cache_creation_input_tokens, iteration.cache_creation_1h_input_tokens
    return BillableUsage(
        iteration.input_tokens,
        iteration.output_tokens,
        written - one_hour,
        one_hour,
        iteration.cache_read_input_tokens,
        requests=0,
    )


def elapsed_ms(ctx: RequestContext, now: float) -> int:
    """Milliseconds since the request started, rounded up (`now` a `perf_counter` reading): a duration price
    bills every increment begun, and truncating made a request under 1 ms free."""
    return math.ceil((now - ctx.started) * 1000)


def cost_headers(priced: Priced) -> list[tuple[bytes, bytes]]:
    """`x-poolgate-cost` (µ of the currency, or `unknown`), its currency and the price version."""
    headers = [
        (b"x-poolgate-cost", b"unknown" if priced.micro is None else str(priced.micro).encode()),
        (b"x-poolgate-cost-currency", (priced.currency or "USD").encode()),
    ]
    if priced.version:
        headers.append((b"x-poolgate-pricing-version", priced.version.encode()))
    return headers


def model_as_recorded(model: str | None) -> str | None:
    """The model a request named, as its usage record keeps it: a credential pasted there (ANTHROPIC_MODEL set to
    the key: a request refused for it is recorded too) is redacted as the log line does, or the store would keep
    in plain text the key it keeps hashed (or encrypted), and `usage --by model`, `route last` show it."""
    return redact(model) if model is not None and is_credential(model) else model


def usage_record(
    ctx: RequestContext,
    result: RelayResult,
    route: bytes | None,
    priced: Priced = FREE,
    ended: float | None = None,
    charged: int | None = None,
) -> UsageRecord:
    now = time.perf_counter() if ended is None else ended
    principal = ctx.principal
    usage = result.usage
    # The 1-hour share as billed (see `billable`): no more than the cache writes it is a share of.
    one_hour, written = usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens
    return UsageRecord(
        request_id=ctx.request_id,
        started_at=ctx.started_at,
        principal_id=principal.id if principal else None,
        principal_name=principal.name if principal else None,
        endpoint=ctx.endpoint,
        model=model_as_recorded(ctx.model),
        stream=ctx.stream,
        upstream_id=result.upstream_id,
        status=result.status,
        outcome=result.outcome.value,
        error_type=result.error_type,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        ttfb_ms=(result.first_byte_at - ctx.started) * 1000 if result.first_byte_at is not None else None,
        duration_ms=(now - ctx.started) * 1000,
        attempts=result.attempts,
        session_id=ctx.session_id,
        route=route.decode() if route is not None else None,
        cache_creation_1h_input_tokens=one_hour if one_hour <= written else written,
        cost_micro_usd=priced.micro,
        currency=priced.currency,
        pricing_version=priced.version,
        web_search_requests=usage.web_search_requests,
        charged_micro_usd=charged,
    )

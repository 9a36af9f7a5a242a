"""relay: send the signed request, fail over before the first byte, stream the answer through.

Before the first byte reaches the client, a connection error, 401, 429, 5xx or 529 moves the request to
the next candidate (up to `max_attempts`). After it, an upstream failure becomes an Anthropic `error`
SSE event and the stream ends cleanly. Usage is read from the bytes as they pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import orjson

from poolgate.api.errors import (
    ERROR_MESSAGE_CAP,
    ApiError,
    error_event,
    error_type_for,
    no_upstream,
    retry_headers,
    too_long_to_retry,
    upstream_error_message,
    upstream_error_type,
)
from poolgate.api.http import JSON, Send, header, header_bytes
from poolgate.config import HealthConfig, UpstreamTimeouts
from poolgate.lifecycle.attempt_errors import (
    GATEWAYS_OWN,
    CredentialRejected,
    CredentialUnsendable,
    EndedEarly,
    GrantDead,
    Misconfigured,
    ModelDenied,
    OperatorsToFix,
    ShortOfResources,
    Skipped,
    TokenUnavailable,
    Unanswered,
    unsendable_credential,
)
from poolgate.lifecycle.context import Outcome, RequestContext, Usage, costs_anything, speaks_for_messages
from poolgate.lifecycle.quotas import humanize, rfc3339
from poolgate.lifecycle.retry_budget import RetryBudget
from poolgate.lifecycle.routing.router import RouteDecision, next_usable_in, refusal_message
from poolgate.lifecycle.routing.trace import FailedAttempt, PerCandidateReason
from poolgate.lifecycle.shape import Unsendable, shape
from poolgate.lifecycle.sign import OAUTH_KIND, MissingCredential, SignedRequest, Signer
from poolgate.lifecycle.sse import BOM, EVENT_CAP, USUAL_OPENING, first_event, read_first_event, whole_events
from poolgate.lifecycle.usage import JSON_CAP, StreamUsageScanner, answer_id, usage_from_json, whole_answer_usage
from poolgate.store.writer_process import failure as what_failed
from poolgate.telemetry.logging import (
    CREDENTIAL_PLACEHOLDER,
    HIDDEN_CREDENTIAL_MIN,
    BoundedLog,
    without_credential,
)
from poolgate.upstreams.connections import (
    closed_while_idle,
    dead_before_answer,
    open_files_limit,
    out_of_local_resources,
    read_up_to,
    release_response,
    send,
)
from poolgate.upstreams.health import (
    Failure,
    HealthState,
    begin_attempt,
    end_probe,
    park,
    record_answer,
    record_failure,
    record_rate_limited,
    record_success,
    refuses_failover,
)
from poolgate.upstreams.pool import MODEL_DENIED_SECONDS, Pool, UpstreamState
from poolgate.upstreams.quota import merge_pictures, model_family, parse_unified_headers, quota_blocked_until
from poolgate.upstreams.ratelimits import LONGEST_WAIT_SECONDS, parse_ratelimit_headers, refused_until
from poolgate.upstreams.tokens import NeedsReauth, RefreshUnavailable

if TYPE_CHECKING:
    from poolgate.billing.values import Priced

# Response headers worth passing to the client; rate-limit headers describe one pool account, not the
# caller's allowance, so they stay behind.
log = logging.getLogger("poolgate.relay")
# What an attempt's answer (or its want of one) says: an upstream failing every request, or answering each from
# a wrong base_url, would write a line per request. A change of an account's state is told once, on `log`.
# Bounded per account (each line's first argument is its id): one failing every request hides no other's lines.
attempt_log = BoundedLog(log, per_subject=True)

# (`content-type` is the gateway's to say: see `Relay._client_headers`.)
PASSED_RESPONSE_HEADERS = ("retry-after", "x-should-retry")
_PASSED = tuple([(name, name.encode()) for name in PASSED_RESPONSE_HEADERS])
ERROR_BODY_CAP = 64 * 1024
DEFAULT_PARK_SECONDS = 1.0
MIDSTREAM_BREAK = "The upstream connection broke mid-stream"
SHORTAGE_LOG_SECONDS = 10.0
# The wait the gateway tells (`retry_after_fields`): replaced together, lest an account's `retry-after` go out
# beside the gateway's `retry-after-ms`, which the SDKs read first.
_WAIT_FIELDS = (b"retry-after", b"retry-after-ms")
_RETRY_ADVICE_FIELDS = (*_WAIT_FIELDS, b"x-should-retry")


class RelayResult(msgspec.Struct, gc=False):
    """How the request went, filled in as it goes so that a cancelled request is still accounted."""

    upstream_id: str | None = None
    # That account's kind, taken with its id: a reload may remove the account before the request is accounted.
    provider: str | None = None
    status: int = 0
    outcome: Outcome = Outcome.ok
    error_type: str | None = None
    # What the client was told, for observers (the usage record keeps the type only).
    error_message: str | None = None
    usage: Usage = msgspec.field(default_factory=Usage)
    first_byte_at: float | None = None
    attempts: int = 0
    # The price the caller was told in its cost header, if it asked (the ledger records the same).
    priced: Priced | None = None
    # When the client had its whole answer, if the request went on after it (reading the upstream's end).
    answered_at: float | None = None
    # Monotonic: when the answering attempt was sent. The upstream reads and writes the prompt cache before it
    # generates, so the entries' TTLs run from about then, not from the end of a long answer.
    sent_at: float | None = None
    # The answer's `id`, read for a request in a message thread only (any JSON: see `ThreadRoots`).
    reply_id: Any = None


def failure_of(status: int) -> Failure | None:
    """Which upstream statuses say "try another account" rather than "the request is wrong"."""
    if status in (401, 403):
        return Failure.auth
    if status == 529:
        return Failure.overloaded
    if 300 <= status < 400 or status == 407:
        # A redirect, or a proxy on the way asking for credentials of its own: the path to the API is wrong, not
        # the request (see `_upstream_error`). Relayed, a 407 was the client's error, and the account kept its
        # traffic.
        return Failure.misconfigured
    if status >= 500:
        return Failure.server_error
    return None


# A page refusing the method (a static site's 405, Python's http.server's 501): the API takes the method the
# gateway sends to each of its paths, so another server answered. A 501 passed on as the upstream's error was retried by
# Claude Code for minutes; a 405 was the client's own error.
NO_POST_HERE = frozenset({405, 501})

# The API's answer to a path it does not have (the mock's too). A request it read names what it did not find
# (`model: claude-x`), so this one says the account's base_url has a path the API lacks.
PATH_NOT_FOUND = "Not Found"


def is_path_not_found(error: ApiError) -> bool:
    """Whether an upstream's error (as `normalised_error` reads it) is the API's 404 for a path it does not have:
    one whose `details` say what was not found (`thread_not_found`) is about the request, whatever its message."""
    return (
        error.status == 404
        and error.error_type == "not_found_error"
        and error.message == PATH_NOT_FOUND
        and error.details is None
    )


def misconfigured_answer(status: int) -> tuple[str, tuple[str, str]]:
    """What a misconfigured account's answer of `status` was, and the header (with what to log without it) that
    tells where it points."""
    if status < 400:
        return "a redirect", ("location", "nowhere")
    if status == 407:
        return "a proxy's demand for credentials of its own", ("proxy-authenticate", "none")
    if status in NO_POST_HERE:
        return "a page refusing the method (the API takes it: another server answered)", ("server", "unnamed")
    return f"{PATH_NOT_FOUND} (a path the API does not have)", ("request-id", "none")


class FirstByteDeadline:
    """The wait for the client's first byte of an attempt, as a whole (see `Relay._send`): its expiry cancels the
    attempt's task, as `asyncio.timeout` would, for one timer handle (a `timeout`, and one more for a JSON
    answer's body, cost ~7 µs of every request). `loop`: the running one, passed in (asked for, it costs a
    `getpid` system call each time on Python 3.11, ~0.3 µs)."""

    __slots__ = ("_cancelling", "_ended", "_handle", "_seconds", "_task", "expired")

    def __init__(self, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
        task = asyncio.current_task(loop)
        assert task is not None, "an attempt runs in a task"
        self._task = task
        self._cancelling = task.cancelling()
        self._seconds = seconds
        self._ended: bool | None = None
        self.expired = False
        self._handle = loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def disarm(self) -> None:
        self._handle.cancel()

    def ended_it(self) -> bool:
        """Whether the cancellation just caught is this deadline's alone: then it is taken back, and the attempt
        ends as one not answered in time; else it is someone else's (a client gone, a shutdown), to raise on."""
        if self._ended is None and self.expired:
            self._ended = self._task.uncancel() <= self._cancelling
        return bool(self._ended)

    def timeout(self) -> TimeoutError:
        return TimeoutError(f"no first byte for the client within {self._seconds:g} s")


def is_api_error(body: bytes) -> bool:
    """Whether an error answer's body is the API's error, `{"type": "error", "error": {…}}` (its `type` is
    not required: an Anthropic-compatible proxy may leave it out, and its client errors are the client's)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and isinstance(payload.get("error"), dict)


def assured_failover(attempts: int, to: HealthState) -> bool:
    """Whether a failover goes whatever the retry budget's balance: a request's first (`attempts` so far: one)
    to an account that has not failed since its last success. One account failing a burst at once sent most of
    it back to the clients as 529s while healthy accounts sat idle; a retry storm, what the budget guards
    against, needs the accounts failed over to failing too (and then each failover is charged)."""
    return attempts == 1 and to.healthy and to.consecutive_failures == 0


def retry_after_seconds(value: str | None, wall_now: float) -> float | None:
    """A `retry-after` as seconds from `wall_now` (`time.time()`): a number of seconds, or an HTTP-date
    (RFC 9110), which CDNs and proxies in front of an API send; None when unreadable or over a week
    (`LONGEST_WAIT_SECONDS`)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        until = http_date(value)
        if until is None:
            return None
        # A date already past (the two clocks differ) means: retry now.
        seconds = max(0.0, until - wall_now)
    return seconds if 0 <= seconds < LONGEST_WAIT_SECONDS else None


def http_date(value: str) -> float | None:
    """An HTTP-date as a POSIX timestamp; its obsolete forms too (asctime's has no zone: GMT, as all are)."""
    try:
        moment = parsedate_to_datetime(value)
        return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):  # not a date, or a year beyond datetime's (`99999999999`)
        return None


# A UUID in an upstream's error message: the API's rate-limit errors name the account's organization by it
# ("… the rate limit for your organization (6c2b…) of …"), which is the pool's, not the caller's, to know.
_ACCOUNT_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
_ACCOUNT_UUID_BYTES = re.compile(_ACCOUNT_UUID.pattern.encode())
# Where a stream's error event is: its `event:` line, or its data's type (a text's quotes are escaped, `\"`).
_ERROR_EVENT = re.compile(rb'^event: ?error\r?$|"type" ?: ?"error"', re.MULTILINE)


_PLACEHOLDER_BYTES = CREDENTIAL_PLACEHOLDER.encode()


def hidden_secret(credential: str) -> bytes:
    """The credential as a stream's bytes would carry it (b"": none worth hiding, see `without_credential`)."""
    return credential.encode() if len(credential) >= HIDDEN_CREDENTIAL_MIN else b""


def answer_without_credential(answer: bytes, secret: bytes) -> bytes:
    """An answer's bytes with the account's credential (`hidden_secret`) replaced wherever it is: in any of a
    stream's events, not only in the error events the usage scanner reads (an error's data over several lines,
    or without its `type`, passed the key on), and in a JSON answer (one quoting it passed it on, where the
    same answer streamed lost it). Most header values (a request id) are shorter than the key: a search costs
    ~0.1 µs even so, the length ~0.03."""
    if not secret or len(answer) < len(secret) or answer.find(secret) < 0:  # `find`: see `usage._content_bytes`
        return answer
    return answer.replace(secret, _PLACEHOLDER_BYTES)


def header_as_told(value: str, secret: bytes) -> bytes:
    """An upstream's header value the client is passed (its request id, its retry advice), as bytes without the
    account's credential: a proxy used as a base_url may quote the key it was sent there as well as in its
    body."""
    return answer_without_credential(header_bytes(value), secret)


def as_told(message: str, credential: str) -> str:
    """An upstream's error message as the client is told it: without the account's credential and ids."""
    return _ACCOUNT_UUID.sub("…", without_credential(message, credential))


def header_in_log(headers: Mapping[str, str], name: str, default: str, credential: str) -> str:
    """An upstream's header quoted in a warning (`default` when it sent none), without the account's credential: a
    proxy used as a base_url may echo the key it was sent there (a redirect to a URL carrying it), and the log's own
    redaction knows Anthropic's key shapes only."""
    return without_credential(headers.get(name, default), credential)


def type_as_told(error_type: str, fallback: str, credential: str) -> str:
    """An upstream's error type as the client, the log and the usage record are told it: `fallback` when it
    quotes the account's credential (a short key fits in what passes for a type, as it does in a message)."""
    return error_type if without_credential(error_type, credential) == error_type else fallback


def error_event_as_told(events: bytes) -> bytes:
    """A stream's events that hold the upstream's error event, with the account's ids out of it and what
    follows it (the API ends a stream at its error; a proxy may not) as out of a JSON error's message (an
    in-band error passed them on); the events before it, a text that quotes a UUID, as they are."""
    found = _ERROR_EVENT.search(events)
    if found is None:  # the error event is still to come whole
        return events
    ends = [at + len(blank) for blank in (b"\n\n", b"\r\n\r\n") if (at := events.rfind(blank, 0, found.start())) >= 0]
    start = max(ends, default=0)
    return events[:start] + _ACCOUNT_UUID_BYTES.sub("…".encode(), events[start:])


def client_status(status: int) -> int:
    """An upstream's error status as the client is answered with it: HTTP's syntax allows any three digits, and
    a proxy may answer one beyond HTTP's statuses (600 and up), for which no server has a status line (relayed,
    the client's connection dropped without an answer): a bad gateway's 502 instead."""
    return status if status < 600 else 502


def normalised_error(
    status: int,
    body: bytes,
    upstream_headers: Mapping[str, str],
    upstream_id: str,
    credential: str = "",
) -> ApiError:
    """An upstream error in Anthropic's shape, keeping its type and message when it had them (less the
    account's ids and the `credential` the request was signed with), and saying which account answered it
    and under which upstream request id (what Anthropic's support asks for)."""
    message = f"Upstream answered HTTP {status}"
    status = client_status(status)
    error_type = error_type_for(status)
    secret = hidden_secret(credential)
    details = None
    try:
        payload = orjson.loads(body)
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            error_type = type_as_told(upstream_error_type(error.get("type"), error_type), error_type, credential)
            message = as_told(upstream_error_message(error.get("message")) or message, credential)
            details = details_as_told(error.get("details"), secret)
    except orjson.JSONDecodeError:
        pass
    return ApiError(
        status,
        message,
        error_type,
        passed_on(upstream_headers, secret) + answered_by(upstream_id, upstream_headers, secret),
        details,
    )


# The most of an upstream's `error.details` passed on, as JSON (the API's are an `error_code` and a few fields).
DETAILS_CAP = 4096


def details_as_told(details: object, secret: bytes) -> dict[str, object] | None:
    """An upstream error's `details` object as the client is told it: without the account's credential (a proxy
    may quote it anywhere), and none when it is no object or longer than `DETAILS_CAP` as JSON."""
    if not isinstance(details, dict):
        return None
    try:
        data = orjson.dumps(details)
    except orjson.JSONEncodeError:  # nested past orjson's depth
        return None
    if len(data) > DETAILS_CAP:
        return None
    if secret and data.find(secret) >= 0:
        told: dict[str, object] = orjson.loads(data.replace(secret, _PLACEHOLDER_BYTES))
        return told
    return details


def passed_on(upstream_headers: Mapping[str, str], secret: bytes) -> list[tuple[bytes, bytes]]:
    """The upstream's retry advice the client is passed (`PASSED_RESPONSE_HEADERS`), without the account's
    credential (`secret`, see `header_as_told`)."""
    return [
        (raw_name, header_as_told(value, secret))
        for name, raw_name in _PASSED
        if (value := upstream_headers.get(name)) is not None
    ]


def answered_by(upstream_id: str, upstream_headers: Mapping[str, str], secret: bytes) -> list[tuple[bytes, bytes]]:
    """Which account answered, and under which upstream request id (what Anthropic's support asks for):
    on every answer relayed, success or error (`secret`: the account's credential, `hidden_secret`)."""
    headers = [(b"x-poolgate-upstream", upstream_id.encode())]
    upstream_request_id = upstream_headers.get("request-id")
    if upstream_request_id:
        headers.append((b"x-poolgate-upstream-request-id", header_as_told(upstream_request_id, secret)))
    return headers


# The errors a stream may open with instead of `message_start` (how the API reports overload on a stream: a
# 200, then this event) that another account may not have, as the status they stand for: nothing but the
# headers has reached the client then, so the request fails over as if the upstream had answered that.
_FAILOVER_STREAM_ERRORS = {"overloaded_error": 529, "api_error": 500}
# How long the rest of a stream's answer is read after its end (for the connection's next request), and how
# much of it: an upstream that goes on sending past its end (a chunked body's last chunk is 5 bytes) is not
# worth its connection, and read whole, a second of it was hundreds of MB in memory per request.
DRAIN_SECONDS = 1.0
DRAIN_BYTES = 64 * 1024


def opening_error(opened: tuple[bytes, bytes]) -> int | None:
    """The status a stream's first event (`first_event`) stands for when it is an `error` worth failing
    over from (see `_FAILOVER_STREAM_ERRORS`); None for anything else."""
    name, payload = opened
    if name != b"error":
        return None
    try:
        error = orjson.loads(payload).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    kind = error.get("type") if isinstance(error, dict) else None
    return _FAILOVER_STREAM_ERRORS.get(kind) if isinstance(kind, str) else None


def stream_failure(error_type: str | None, broke: bool) -> Failure | None:
    """How a stream that began ended, for its account's health: the failure that continues the account's
    streak (an in-band error another account may not have, as if it had opened the stream; a break), or None
    for a whole answer or an error about the request itself."""
    status = _FAILOVER_STREAM_ERRORS.get(error_type) if error_type is not None else None
    if status is not None:
        return failure_of(status)
    return Failure.connect if broke else None


# Why routing left an account out that passes with time (a retry may find it back), unlike a model it does
# not serve, a pin, or a credential only a new login brings back.
_PASSING = frozenset({"unhealthy", "rate_limited", "parked", "refresh_failing", "insufficient_quota"})


def _out_for_a_while(reason: str, health: HealthState | None) -> bool:
    """Whether an account out for `reason` may serve a retry soon: not when it is unhealthy from rejecting
    its credential or from a misconfigured base_url (after three rejections every revoked key was
    "unhealthy", and its 500s retryable again; a wrong base_url's 502 was retryable from the second request)."""
    return reason in _PASSING and not (reason == "unhealthy" and health is not None and health.awaits_operator())


class Relay:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        fresh_session: aiohttp.ClientSession,
        signer: Signer,
        health: HealthConfig,
        timeouts: UpstreamTimeouts,
        max_attempts: int,
        no_upstream_retry_after: int,
        retry_budget: RetryBudget,
        pool: Pool,
        refusal_now: Callable[[str, str | None, bool], ApiError | None],
        on_accepted: Callable[[RequestContext, str, float], None],
    ) -> None:
        self._session = session
        self._loop = asyncio.get_running_loop()  # made by the gateway's startup, on the loop it serves from
        # Each request on a new connection (see `_send`).
        self._fresh_session = fresh_session
        self._pool = pool
        # The router's answer to a request (model, caller) no account can take now (`Router.refusal_now`).
        self._refusal_now = refusal_now
        # Told of every session's request an account took on (its 200's headers: it read the prompt as it
        # arrived), with the account and when the request was sent (the cache keepalive's:
        # `KeepaliveSender.turn_accepted`).
        self._on_accepted = on_accepted
        self._signer = signer
        self._health = health
        self._timeouts = timeouts
        self._max_attempts = max_attempts
        self._retry_after = no_upstream_retry_after
        self._shortage_logged_at = -math.inf
        self.retry_budget = retry_budget
        # Until the client's first byte, `first_byte_seconds` in all (`_send`'s deadline); after the response
        # headers, `idle_seconds` between chunks (aiohttp's read timer: see `_answer`). No read timer before the
        # headers: the deadline bounds that wait, silent or not.
        self._request_timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.connect_seconds)

    async def relay(self, ctx: RequestContext, decision: RouteDecision, send: Send, result: RelayResult) -> None:
        """Answer the client from the first candidate that serves; raise ApiError when none does."""
        last_error: ApiError | None = None
        stopped = False  # at `max_attempts` or by the retry budget, with accounts left to retry on
        waiting: dict[str, str] = {}  # candidates passed over at failover that may be back soon, and why
        to_fix: dict[str, str] = {}  # accounts that answered what only the operator can cure, and what
        self.retry_budget.request(time.monotonic())
        for position, state in enumerate(decision.order):
            if not state.in_service():  # since this request was routed: no attempt, no retry spent
                continue
            if result.attempts >= self._max_attempts:
                stopped = True
                break
            now = time.monotonic()
            # Earlier attempts of this or other requests may have parked or failed it meanwhile (for a while:
            # a retry may find it back).
            if position > 0 and (reason := refuses_failover(state.health, now)) is not None:
                if _out_for_a_while(reason, state.health):
                    waiting[state.upstream.id] = reason
                continue
            assured = assured_failover(result.attempts, state.health)
            if result.attempts and not self.retry_budget.try_retry(now, assured):
                stopped = True
                decision.trace.retry_budget_denied = True
                break
            result.attempts += 1
            tried_before = result.upstream_id, result.provider
            result.upstream_id, result.provider = state.upstream.id, state.upstream.kind
            probe = begin_attempt(state.health, now)
            try:
                # An API-key account's attempt is its one send: awaited here, one coroutine fewer in the
                # chain every suspension passes through (see `Gateway._messages`).
                attempt = (
                    self._attempt(ctx, state, send, result)
                    if state.upstream.kind == OAUTH_KIND
                    else self._send(ctx, state, send, result)
                )
                try:
                    error = await attempt
                except Unsendable:
                    result.attempts -= 1
                    result.upstream_id, result.provider = tried_before
                    raise
                if isinstance(error, CredentialRejected):
                    # No refresh cured it: the operator has to act. Say which account, and count it against
                    # its health (a probe's failure before the probe ends: its next cooldown is longer),
                    # unless it is out already as needing a new login (routing says so, not "unhealthy").
                    attempt_log.warning("upstream %s %s", state.upstream.id, error.problem())
                    if self._signer.unusable_reason(state.upstream.id) is None:
                        self._failed(state, Failure.auth, sent_at=now)  # the attempt began at `now`
            finally:
                if probe:
                    end_probe(state.health, probe)
            if error is None:
                return
            if isinstance(error, Skipped):
                result.attempts -= 1
                result.upstream_id, result.provider = tried_before
                if isinstance(error, ShortOfResources):  # this host could send the request nowhere
                    raise error
                # A line per request (a burst that met an account's failing refresh): bounded, as `attempt_log` is.
                attempt_log.info(
                    "upstream %s skipped for request %s: %s", state.upstream.id, ctx.request_id, error.message
                )
                continue
            # A credential an account rejected is the operator's to fix: another account's answer (a 529 with
            # its retry-after, say) tells the client more, and a retry may succeed. Of several rejections the
            # last is kept, naming the account the usage record and the access log name.
            if last_error is None or isinstance(last_error, OperatorsToFix) or not isinstance(error, OperatorsToFix):
                last_error = error
            if isinstance(error, OperatorsToFix):
                to_fix[state.upstream.id] = error.named
            # What the account answered: a rejected credential is the 401 it said, not the client's 500.
            seen = error.seen if isinstance(error, (CredentialRejected, TokenUnavailable, ModelDenied)) else error
            kind = error.kind if isinstance(error, Unanswered) else seen.error_type
            failed = FailedAttempt(state.upstream.id, seen.status, kind, seen.message)
            if decision.trace.failed is None:
                decision.trace.failed = [failed]
            else:
                decision.trace.failed.append(failed)
        if last_error is None:
            raise no_upstream(self._retry_after)
        # What the pool's accounts answered (a 429 or 529 from each, say), or did not answer, is not the
        # caller's mistake; `no_upstream` is for a request no account could be tried for.
        result.outcome = Outcome.upstream_error
        passing = {} if stopped else {**self._left_out_for_a_while(decision), **waiting}
        if passing and isinstance(last_error, OperatorsToFix) and not isinstance(last_error, GrantDead):
            # Only accounts the operator has to fix were left to try, while others are out for a while: the
            # rejection's 500 (or 502) gave no `retry-after` though the pool was back seconds later.
            reasons = {**decision.trace.dropped(), **waiting, **to_fix}
            raise self._pools_wait(decision, last_error, reasons, ctx.model)
        self._advise_retry(last_error, not stopped and not passing, decision, ctx.model)
        raise last_error

    def _pools_wait(
        self, decision: RouteDecision, answered: ApiError, reasons: Mapping[str, str], model: str
    ) -> ApiError:
        """The 529 routing gives when no account can take a request (each account and why, `retry-after` till
        the first is back), naming the account that answered last as `answered` did."""
        wait = self._first_back_in(decision, model)
        refusal = no_upstream(wait, refusal_message(reasons, wait))
        refusal.headers += [field for field in answered.headers if field[0].startswith(b"x-poolgate-upstream")]
        return refusal

    def _left_out_for_a_while(self, decision: RouteDecision) -> dict[str, PerCandidateReason]:
        """The accounts routing left out that may serve a retry soon, with why."""
        pool = self._pool
        passing: dict[str, PerCandidateReason] = {}
        for upstream_id, reason in decision.trace.dropped().items():
            state = pool.get(upstream_id)
            if _out_for_a_while(reason, state.health if state is not None else None):
                passing[upstream_id] = reason
        return passing

    def _advise_retry(self, error: ApiError, every_candidate: bool, decision: RouteDecision, model: str) -> None:
        """The last account's retry advice, made the pool's. A 429's wait, or a 529's or 5xx's that gave one, is
        the last account's, not the pool's: the accounts that answered one are parked, and the client is told
        when the first account that could serve the request is back (`_first_back_in`). An account's own long
        wait (a used-up subscription window: hours, and the API still says `x-should-retry: true`) is not the
        pool's either: past a minute, and when unreadable, it becomes the gateway's short wait, and a retry goes
        to another account or gets the gateway's own 529, which says how long the whole pool is out (SDKs that
        honour any `retry-after` slept for hours; Claude Code's would have retried at once). A 529 that said
        nothing gets that wait too, as for no usable account at all. A credential every candidate rejected is
        not retried (`every_candidate`: the attempts did not stop at `max_attempts` or the retry budget with
        accounts left, where a retry goes to those)."""
        if isinstance(error, OperatorsToFix):
            if not every_candidate:
                if isinstance(error, ModelDenied):
                    # A 403 the SDKs retry only when told: an account left untried may serve the model (the ones
                    # that answered 403 are held out of it now), as a rejected credential's 500 is retried.
                    error.headers = [*error.headers, (b"x-should-retry", b"true")]
                return
            # No account took the gateway's credential, or none is where the API is: retrying cannot help until
            # the operator acts (Claude Code's ten retries of such a 500 stalled it for three minutes before it
            # showed the error). The router's refusal a dead grant is answered with may say so already.
            if header(error.headers, b"x-should-retry") is None:
                error.headers = [*error.headers, (b"x-should-retry", b"false")]
            return
        if error.status == 429 or (
            error.status >= 500
            and not isinstance(error, GATEWAYS_OWN)
            and header(error.headers, b"retry-after") is not None
        ):
            # The last account's retry-after (or a 429's none) told the client to wait for it while another account
            # was back sooner, or usable at once: a 529 or 5xx that said when parks its account as a 429 does. A
            # pool out for long is told the short wait, as below.
            back = self._first_back_in(decision, model)
            short = not too_long_to_retry(back)
            replaced = _WAIT_FIELDS if short else _RETRY_ADVICE_FIELDS
            kept = [field for field in error.headers if field[0] not in replaced]
            error.headers = kept + retry_headers(back if short else self._retry_after)
            return
        raw = header(error.headers, b"retry-after")
        if raw is None:
            if error.status == 529:
                error.headers += [
                    field for field in retry_headers(self._retry_after) if header(error.headers, field[0]) is None
                ]
            return
        wait = retry_after_seconds(raw.decode("latin-1"), time.time())
        if wait is None or too_long_to_retry(wait):
            kept = [field for field in error.headers if field[0] not in _RETRY_ADVICE_FIELDS]
            error.headers = kept + retry_headers(self._retry_after)

    def _first_back_in(self, decision: RouteDecision, model: str) -> float:
        """Seconds until the first account that could serve the request may: the gateway's short wait when one
        of its candidates can now (the attempts stopped at `max_attempts` or the retry budget before it),
        else when the first of them, or of the accounts routing left out for a while, is back (as the
        gateway's own 529 would say)."""
        now = time.monotonic()
        # An account that rejected its credential or answered from a wrong base_url serves no retry however
        # usable it looks (it is not unhealthy until its failures add up).
        candidates = [state for state in decision.order if state.in_service() and not state.health.awaits_operator()]
        if any(state.usable_again_at(now, model) <= now for state in candidates):
            return self._retry_after
        passing = self._left_out_for_a_while(decision)
        left_out = [state for state in map(self._pool.get, passing) if state is not None]
        refreshing = "refresh_failing" in passing.values()
        return next_usable_in([*candidates, *left_out], now, self._retry_after, refreshing, model)

    async def _attempt(
        self, ctx: RequestContext, state: UpstreamState, send: Send, result: RelayResult
    ) -> ApiError | None:
        """A subscription account's try: its token is refreshed first if it is about to expire; a 401 from
        it is answered by one refresh and one retry of the same request on the same account."""
        try:
            await self._signer.prepare(state.upstream.id)
        except (NeedsReauth, RefreshUnavailable) as exc:
            attempt_log.warning("upstream %s skipped: %s", state.upstream.id, exc)
            return Skipped("A subscription account's credential is not usable", self._retry_after)
        error = await self._send(ctx, state, send, result)
        if isinstance(error, CredentialRejected):
            if state.upstream.id not in self._signer.tokens:
                # A config file's `claude setup-token` token: nothing refreshes it, so a rejection is the
                # operator's to fix, as an API key's (it was a retryable 529 "expired", never counted).
                return error
            if await self._signer.refresh_after_401(state.upstream.id, error.signed):
                return await self._send(ctx, state, send, result)
            # Its token cannot be had: the account is out of routing, as `needs_reauth` (its grant is dead) or
            # `refresh_failing` (the token endpoint fails for now), and this request is answered as routing
            # answers the next ones (a 500 here, a 529 a moment later, for one state; then a 529 naming this
            # account alone, or none, while the next request's named each and said when the first is back).
            reason = self._signer.unusable_reason(state.upstream.id) or "refresh_failing"
            caller = ctx.principal.name if ctx.principal is not None else None
            refusal = self._refusal_now(ctx.model, caller, costs_anything(ctx))
            if refusal is None:  # another account can take it: the next candidate will
                message = f"No upstream account can serve this request ({state.upstream.id}: {reason})"
                refusal = no_upstream(self._retry_after, message)
            if reason != "needs_reauth":
                return TokenUnavailable(error.seen, refusal)
            return GrantDead(error.seen, state.upstream.id, refusal)
        return error

    async def _send(
        self, ctx: RequestContext, state: UpstreamState, send: Send, result: RelayResult
    ) -> ApiError | None:
        try:
            signed = self._signer.sign(shape(ctx, state.upstream))
        except MissingCredential:
            # Its credential went with a reload while this request waited (a subscription account's refresh):
            # the next candidate takes it.
            return Skipped("The upstream account was removed from the gateway", self._retry_after)
        sent_at = time.monotonic()
        counted = state.counted_tokens(ctx.prefix, sent_at)  # before `sent` makes its breakpoints pending
        if ctx.prefix is not None and ctx.prefix.marked:
            # Anthropic accounts (every upstream kind so far) cache only what markers ask for: an unmarked
            # prompt's inferred breakpoints would be forgotten on the answer, and pending meanwhile would
            # draw a burst of identical unmarked requests onto this account for nothing.
            state.warm.sent(ctx.prefix, sent_at)
        state.request_sent(sent_at, counted)
        # The wait for the client's first byte, as a whole: the response head, and a JSON answer's body or a
        # stream's first event (disarmed as the client's answer starts). aiohttp's read timeout is a silence:
        # an upstream (or a proxy) sending its head a byte at a time, or keepalive comments, held the request
        # as long as it pleased, the client with nothing and no failover.
        deadline = FirstByteDeadline(self._timeouts.first_byte_seconds, self._loop)
        try:
            try:
                response = await self._request(self._session, signed)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if not closed_while_idle(exc, time.monotonic() - sent_at):
                    return self._unsent(state, exc, sent_at, signed.credential())
                # The upstream closed the pooled connection as the request went out on it: the account is
                # not to blame (it answers again at once), and the request was never taken up. Once more, on
                # a new connection (another pooled one may have been closed with it), charged nothing: no
                # failure, no retry from the budget, no attempt.
                # An upstream closing idle connections early does so to every other request: bounded.
                attempt_log.info(
                    "upstream %s closed a pooled connection as a request went out on it", state.upstream.id
                )
                try:
                    response = await self._request(self._fresh_session, signed)
                except (aiohttp.ClientError, OSError, TimeoutError) as again:
                    return self._unsent(state, again, sent_at, signed.credential())
            except ValueError:
                # aiohttp refuses to write a header value with a control character in it: the account's own
                # credential is that account's failure (the next candidate takes the request); anything
                # else is the gateway's.
                if not unsendable_credential(signed):
                    raise
                unsendable = CredentialUnsendable(state.upstream.id)
                unsendable.signed = signed
                return unsendable
            try:
                error = await self._answer(ctx, state, response, send, result, sent_at, signed, deadline)
                if isinstance(error, CredentialRejected):
                    error.signed = signed
                return error
            finally:
                await release_response(response)
        except asyncio.CancelledError:
            if not deadline.ended_it():
                raise
            late = deadline.timeout()
            return self._no_answer(state, self._unanswered(late), late, sent_at, signed.credential())
        finally:
            deadline.disarm()
            state.request_done(sent_at, counted)

    def _request(self, session: aiohttp.ClientSession, signed: SignedRequest) -> Awaitable[aiohttp.ClientResponse]:
        shaped = signed.shaped
        return send(
            session, shaped.method, shaped.url, signed.headers, shaped.body, self._request_timeout, shaped.agent
        )

    def _answer(
        self,
        ctx: RequestContext,
        state: UpstreamState,
        response: aiohttp.ClientResponse,
        send: Send,
        result: RelayResult,
        sent_at: float,
        signed: SignedRequest,
        deadline: FirstByteDeadline,
    ) -> Awaitable[ApiError | None]:
        """What the answer's headers say about the account, then the coroutine that relays the answer (a plain
        function: the relaying coroutine is awaited by `_send` itself, one fewer in the chain). `deadline`:
        the client's first byte's (see `_send`), which the relaying coroutine disarms."""
        status = response.status
        answered_at = time.monotonic()
        for_messages = speaks_for_messages(ctx)
        if for_messages and (observed := parse_ratelimit_headers(response.headers, answered_at, time.time())):
            state.observe(observed, sent_at)
        if state.upstream.kind == OAUTH_KIND:
            picture = parse_unified_headers(response.headers, answered_at, time.time(), ctx.model)
            if picture is not None:
                state.set_quota(merge_pictures(state.quota, picture))
        if status >= 300:
            return self._upstream_error(state, response, signed, ctx.model, sent_at, deadline, for_messages)
        if ctx.session_id is not None:
            self._on_accepted(ctx, state.upstream.id, sent_at)
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = self._timeouts.idle_seconds
            connection.protocol.start_timeout()
        # Media types are case-insensitive (an Anthropic-compatible upstream sent `Text/Event-Stream`, and its
        # stream was read whole, its usage lost). A stream answering a request for JSON is read as JSON, and
        # so refused as no answer to it (the SDK handed its caller the raw events as a string).
        if ctx.stream and response.headers.get("content-type", "")[:17].lower() == "text/event-stream":
            return self._relay_stream(ctx, state, response, send, result, sent_at, answered_at, signed, deadline)
        state.stats.answered((answered_at - sent_at) * 1000, answered_at)
        return self._relay_json(ctx, state, response, send, result, sent_at, signed, deadline)

    def _completed(self, ctx: RequestContext, state: UpstreamState, result: RelayResult, sent_at: float) -> None:
        """An answer relayed to its end: the account's latency, and what the answer says about its cache."""
        state.stats.completed((time.monotonic() - sent_at) * 1000)
        if state.denied:  # it serves the model: a 403 it gave for it was another request's (a feature it asked for)
            state.lift(ctx.model)
        result.sent_at = sent_at
        self._learn(ctx, state, result.usage, sent_at)

    async def _relay_json(
        self,
        ctx: RequestContext,
        state: UpstreamState,
        response: aiohttp.ClientResponse,
        send: Send,
        result: RelayResult,
        sent_at: float,
        signed: SignedRequest,
        deadline: FirstByteDeadline,
    ) -> ApiError | None:
        """A JSON answer is read whole before the client gets a byte of it (the client cannot use half a
        JSON document anyway): an upstream that breaks off in the middle is a failure to fail over from,
        not a truncated answer, and the length the client is told is the true one. Its body is read by the
        first byte's `deadline` too (a body trickling in held the request past it); an answer that came whole
        before its framing stalled is relayed at the deadline, as when it broke."""
        received: list[bytes] = []
        secret = hidden_secret(signed.credential())
        try:
            body, complete = await read_up_to(response.content, JSON_CAP, received)
        except (aiohttp.ClientError, OSError, TimeoutError, asyncio.CancelledError) as failed:
            if isinstance(failed, asyncio.CancelledError) and not deadline.ended_it():
                raise
            exc = deadline.timeout() if deadline.expired else failed
            body = b"".join(received)
            usage = None if ctx.stream else whole_answer_usage(body, ctx.endpoint)
            if usage is None:
                message = (
                    self._unanswered(exc)
                    if deadline.expired
                    else "Upstream connection broke before the answer was complete"
                )
                return self._no_answer(state, message, exc, sent_at, signed.credential())
            # The answer came whole, its usage with it, and the framing after it broke (a chunked body
            # without its last chunk, a content-length past its end): it was generated and billed, and failing
            # over would have it generated and billed again.
            attempt_log.warning(
                "upstream %s's answer came whole but its framing broke after it (%s)",
                state.upstream.id,
                what_failed(exc),
            )
        else:
            if not complete:
                # No Messages answer comes near this: refuse it rather than hold an unbounded body in memory.
                too_large = f"The upstream's answer exceeds {JSON_CAP // (1024 * 1024)} MiB"
                raise ApiError(502, too_large, "api_error", answered_by(state.upstream.id, response.headers, secret))
            usage = usage_from_json(body, ctx.endpoint)
        deadline.disarm()
        if usage is None or ctx.stream:
            # Not the API's answer: a web server at a wrong base_url answers 200 to anything, a proxy may carry
            # an error in a 200, and a stream's answer is no JSON document. Relayed, it was a success recorded
            # free (Claude Code: "empty or malformed response"), and the account stayed in the pool.
            return self._not_an_answer(state, response, signed.credential(), sent_at)
        self._succeeded(state)
        result.status = response.status
        body = answer_without_credential(body, secret)
        # The API's media type, whatever the upstream wrote (`Application/JSON`, `text/plain`, none): the
        # TypeScript SDK (Claude Code's) reads a body as JSON only under a lower-case `application/json`.
        headers = self._client_headers(ctx, state, response, JSON, secret)
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": result.status, "headers": headers})
        result.first_byte_at = time.perf_counter()
        await send({"type": "http.response.body", "body": body, "more_body": False})
        result.usage = usage
        if ctx.thread is not None:
            result.reply_id = answer_id(body)
        self._completed(ctx, state, result, sent_at)
        return None

    async def _relay_stream(
        self,
        ctx: RequestContext,
        state: UpstreamState,
        response: aiohttp.ClientResponse,
        send: Send,
        result: RelayResult,
        sent_at: float,
        answered_at: float,
        signed: SignedRequest,
        deadline: FirstByteDeadline,
    ) -> ApiError | None:
        """Events go to the client as they arrive; usage is read as they pass. The client's answer starts
        with the stream's first event: a stream that opens with an error another account may not have (or
        breaks before its first event, or has not begun by the first byte's `deadline`) is failed over from, as
        a failed answer would be. After that a failure can only be told in-band: an `error` event, and the
        stream ends cleanly."""
        content = response.content
        try:
            # SSE allows a BOM before the first event: the usage scanner skips it, and so must the client, whose
            # SDK may not (the Python SDK's `get_final_message` failed on it).
            head = (await read_first_event(content)).removeprefix(BOM)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return self._no_answer(
                state,
                f"Upstream account sent nothing for {self._timeouts.idle_seconds:g} s after its headers"
                if isinstance(exc, TimeoutError)
                else "Upstream connection broke before the stream began",
                exc,
                sent_at,
                signed.credential(),
            )
        # Anything but the usual opening is looked at closely; the usual one costs nothing more.
        if not head.startswith(USUAL_OPENING):
            opened = first_event(head)
            if opened is None:
                if len(head) >= EVENT_CAP:
                    # More than any event's worth of bytes that dispatch none (a page served as a stream, a proxy's
                    # gzip bomb despite `accept-encoding: identity`): relayed, the client got a 200 and megabytes
                    # no SDK reads.
                    return self._not_an_answer(state, response, signed.credential(), sent_at)
                # A 200 that ended without a single event (nothing, comments, half an event): another may answer.
                self._failed(state, Failure.connect, sent_at=sent_at, why="a stream that ended before its first event")
                return Unanswered(self._retry_after, "Upstream account's stream ended before its first event")
            elif (status := opening_error(opened)) is not None:
                self._failed(state, failure_of(status) or Failure.server_error, sent_at=sent_at)
                return normalised_error(status, opened[1], response.headers, state.upstream.id, signed.credential())
        # Its time to first byte is its headers' (as for a JSON answer), counted once the answer is taken. The
        # account answers (a probe passed), yet its streak of failures stands until the stream ends whole.
        state.stats.answered((answered_at - sent_at) * 1000, answered_at)
        self._succeeded(state, whole=False, sent_at=sent_at)
        result.status = response.status
        secret = hidden_secret(signed.credential())
        media_type = header_as_told(response.headers["content-type"], secret)
        deadline.disarm()
        await send(
            {
                "type": "http.response.start",
                "status": result.status,
                "headers": self._client_headers(ctx, state, response, media_type, secret),
            }
        )
        result.first_byte_at = time.perf_counter()
        scanner = StreamUsageScanner(ctx.max_tokens)
        # Counted as the events pass: a stream cut short (the client left, shutdown) keeps the usage already
        # reported (message_start's prompt tokens are billed upstream whatever happens next).
        result.usage = scanner.usage
        # An event too long to hold goes on in pieces, all but what could be the start of the account's key
        # (the search for it is per piece, and the client joins them).
        kept_back = max(0, len(secret) - 1)
        ended = broke = False
        held = b""  # the start of an event not yet whole
        try:
            chunk = head
            while chunk:
                scanner.feed(chunk)
                data = held + chunk if held else chunk
                whole = len(data) - kept_back if len(data) > EVENT_CAP else whole_events(data, len(held))
                held = data[whole:]
                # The chunk that completes the answer's last event (`message_stop`, or an error event), whole,
                # ends the client's response too, whether or not the upstream has closed yet: one ASGI send
                # (and one write) fewer per request than a closing empty body, and an upstream slow to close
                # after its end (longer than the idle timeout) no longer turns a whole answer into a broken one.
                ended = not held and scanner.finished
                if whole:
                    events = data[:whole]
                    # Inline: a call per chunk costs more than the search (`find`: see `usage._content_bytes`).
                    if secret and events.find(secret) >= 0:
                        events = events.replace(secret, _PLACEHOLDER_BYTES)
                    if scanner.error_type is not None:  # the stream's end, an error: once a stream
                        events = error_event_as_told(events)
                    await send({"type": "http.response.body", "body": events, "more_body": not ended})
                if ended:
                    break
                chunk = await content.readany()
            if not scanner.finished:
                # Closed cleanly, yet before `message_stop`: the client got half an answer that looked whole
                # (the SDK raised nothing, `stop_reason` None), and the ledger said `ok`.
                raise EndedEarly
        except (aiohttp.ClientError, OSError, TimeoutError, EndedEarly) as exc:
            held = b""  # half an event: the error event goes in its place, not glued to it
            broke = True
            message = (
                f"The upstream sent nothing for {self._timeouts.idle_seconds:g} s mid-stream"
                if isinstance(exc, TimeoutError)
                else "The upstream ended the stream before its end"
                if isinstance(exc, EndedEarly)
                else MIDSTREAM_BREAK
            )
            result.outcome, result.error_type, result.error_message = Outcome.stream_error, "api_error", message
            await send({"type": "http.response.body", "body": error_event("api_error", message), "more_body": True})
        finally:
            scanner.close()  # also when the request is cancelled (the client left, shutdown)
        if not ended:  # what is held is a last event without its blank line: the client gets it as sent (an
            # error event without the account's credential and ids)
            last = answer_without_credential(held, secret)
            if scanner.error_type is not None:
                last = error_event_as_told(last)
            await send({"type": "http.response.body", "body": last, "more_body": False})
        if scanner.error_type is not None:
            result.outcome = Outcome.stream_error
            result.error_type = type_as_told(scanner.error_type, "api_error", signed.credential())
            if scanner.error_message is not None:
                # As the client got it: without the account's credential (hidden before it is cut short, so
                # that no part of it is left) and ids.
                told = as_told(scanner.error_message, signed.credential())
                result.error_message = told[:ERROR_MESSAGE_CAP]
        failure = stream_failure(scanner.error_type, broke)
        if failure is None:
            self._succeeded(state)
        else:
            # Said as it happened: the failure's kind alone, `connect`, sent the operator after a connection
            # problem when the account's streams stalled or broke off after their first event.
            why = (
                f"an {result.error_type} event mid-stream"
                if scanner.error_type is not None
                else "a stream that broke off mid-way"
            )
            self._failed(state, failure, sent_at=sent_at, why=why)
        if ctx.thread is not None:
            result.reply_id = scanner.message_id
        self._completed(ctx, state, result, sent_at)
        if ended and not content.at_eof():
            # The client has its whole answer (its time is taken); the rest of the upstream's, its chunked
            # body's end, is read so that the connection can serve the next request, for a moment at most.
            result.answered_at = time.perf_counter()
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    await read_up_to(content, DRAIN_BYTES)
        return None

    def _not_an_answer(
        self, state: UpstreamState, response: aiohttp.ClientResponse, credential: str, sent_at: float
    ) -> Misconfigured:
        """A success status whose body is not the API's answer to the request: the account's base_url does not
        lead to the API (or something on the way answers for it), out at once, as after a redirect. `credential`:
        the account's, which the request carried."""
        attempt_log.warning(
            "upstream %s answered %d with a body that is not the API's answer to this request (content-type %r):"
            " is its base_url the API's?",
            state.upstream.id,
            response.status,
            header_in_log(response.headers, "content-type", "none", credential),
        )
        self._failed(state, Failure.misconfigured, sent_at=sent_at)
        answered = answered_by(state.upstream.id, response.headers, hidden_secret(credential))
        return Misconfigured(state.upstream.id, f"{response.status} with a body that is not an API answer", answered)

    @staticmethod
    def _learn(ctx: RequestContext, state: UpstreamState, usage: Usage, sent_at: float) -> None:
        """What the answer says about the account's prompt cache (its entries' TTLs run from when the request
        was sent) and the size of its requests (as its token rate limits count them: cache reads are not)."""
        written, read = usage.cache_creation_input_tokens, usage.cache_read_input_tokens
        state.stats.counted_input(usage.input_tokens + written)
        if ctx.prefix is not None and ctx.prefix.marked:
            state.warm.answered(ctx.prefix, written, read, sent_at)

    async def _upstream_error(
        self,
        state: UpstreamState,
        response: aiohttp.ClientResponse,
        signed: SignedRequest,
        model: str,
        sent_at: float,
        deadline: FirstByteDeadline,
        for_messages: bool,
    ) -> ApiError:
        """`for_messages`: whether the answer speaks of the account's Messages rate limits (`speaks_for_messages`)."""
        status = response.status
        try:
            body, _ = await read_up_to(response.content, ERROR_BODY_CAP)
        except (aiohttp.ClientError, OSError, TimeoutError):
            body = b""
        except asyncio.CancelledError:
            # The body trickled in past the first byte's deadline: what the head said stands (a 429's
            # `retry-after` parks the account), without the body. Taken for no answer, it parked nothing.
            if not deadline.ended_it():
                raise
            body = b""
        error = normalised_error(status, body, response.headers, state.upstream.id, signed.credential())
        failure = failure_of(status)
        if is_path_not_found(error) or (status in NO_POST_HERE and not is_api_error(body)):
            failure = Failure.misconfigured
        if failure is Failure.misconfigured:
            # Not the API's answer: a pointer elsewhere (http:// for https://, a path left out of the base URL),
            # a proxy on the way to it, or the API's own answer to a path it does not have (a path put in the base
            # URL). The account cannot serve until its base_url (or that) is fixed; never the client's to follow,
            # nor its request's fault (a 404 passed on, Claude Code said "There's an issue with the selected model").
            what, said = misconfigured_answer(status)
            attempt_log.warning(
                "upstream %s answered HTTP %d, %s (%s %r): its base_url is not the API's",
                state.upstream.id,
                status,
                what,
                said[0],
                header_in_log(response.headers, *said, signed.credential()),
            )
            error = Misconfigured(state.upstream.id, f"HTTP {status}, {what}", error.headers)
        now = time.monotonic()
        wait = retry_after_seconds(response.headers.get("retry-after"), time.time())
        if status == 429:
            if is_api_error(body):
                record_rate_limited(state.health)
            if not for_messages:
                # Its own limits are used up, not the account's Messages': failed over (another account's may have
                # room), nothing parked.
                return error
            # Without retry-after: park until the reset the rate-limit headers announce, if any. A subscription
            # window used up (its headers, read above, say so) is parked as such: newer figures that lift the
            # rejection lift the park too (see `QuotaKeeper`).
            until = (
                now + wait if wait is not None else (refused_until(state.ratelimits, now) or now + DEFAULT_PARK_SECONDS)
            )
            reason = "rate_limited"
            if quota_blocked_until(state.quota, now) is not None:
                reason = "insufficient_quota"
                # Out for hours, maybe days: the operator hears of it, once (the access log's failed attempt
                # alone said so).
                if state.new_quota_wall("", until):
                    log.warning(
                        "upstream %s: its subscription's usage window is used up: out of routing for %s (till %s), "
                        "or until a usage poll finds room",
                        state.upstream.id,
                        humanize(until - now),
                        rfc3339(time.time() + (until - now)),
                    )
            elif (family_until := quota_blocked_until(state.quota, now, model=model)) is not None:
                # Only a per-model weekly window is used up (Opus, say): the quota filter holds that model's
                # requests off until its reset, and the account serves the others meanwhile. Parked, it served
                # none of them for days, its Sonnet and Haiku quota left unused (or billed to a metered key).
                # Told once per family: every Opus id is held out by the same window.
                family = model_family(model)
                if state.new_quota_wall(family, family_until):
                    log.warning(
                        "upstream %s: its subscription's weekly window for %s models is used up: their requests "
                        "go elsewhere for %s (till %s); it serves other models meanwhile",
                        state.upstream.id,
                        family,
                        humanize(family_until - now),
                        rfc3339(time.time() + (family_until - now)),
                    )
                return error
            park(state.health, until, reason)
            return error
        if failure is None:
            if not is_api_error(body):
                # Not the API's error but a page from something on the way: a web server's HTML 404 at a wrong
                # base_url, a proxy's 413 for a body too large for it. Another account may serve the request: it
                # is failed over, and counted in this account's error rate (routing prefers the others) but not
                # against its health: a request that a proxy every account sits behind refuses must not take the
                # pool out.
                attempt_log.warning(
                    "upstream %s answered HTTP %d with no API error (content-type %r): is its base_url the API's?",
                    state.upstream.id,
                    status,
                    header_in_log(response.headers, "content-type", "none", signed.credential()),
                )
                state.stats.failed(now)
                return error
            # The upstream is fine; the request is what it refused. Pass it through, no failover.
            self._succeeded(state)
            raise error
        if failure is Failure.auth:
            if status == 403 and state.upstream.kind != OAUTH_KIND and is_api_error(body):
                # An API key's 403 is a permission its organization lacks, for this model or a feature the request
                # asks for: counted as a rejected credential, three took the account out for every model.
                state.deny(model, now + MODEL_DENIED_SECONDS)
                attempt_log.warning(
                    "upstream %s answered 403 %s for model %r: out of that model's requests for %s",
                    state.upstream.id,
                    error.error_type,
                    model,
                    humanize(MODEL_DENIED_SECONDS),
                )
                return ModelDenied(error, state.upstream.id, model)
            # A rejected upstream credential is the gateway's problem, not the caller's: never a 401,
            # which clients read as "your key is wrong". Counted (and logged) by `_attempt` once no
            # refresh cures it: a subscription token that just expired is routine, not a failing account.
            return CredentialRejected(error, state.upstream.id)
        self._failed(state, failure, sent_at, now)
        if wait is not None:
            # An overloaded or failing account that says when to come back is left alone until then.
            park(state.health, now + wait, "parked")
        return error

    def _unanswered(self, exc: BaseException) -> str:
        """Why an account gave no answer, for the client's 529 if no other account answers either."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"Upstream account not reachable within {self._timeouts.connect_seconds:g} s"
        if isinstance(exc, TimeoutError):
            return f"Upstream account did not answer within {self._timeouts.first_byte_seconds:g} s"
        if isinstance(exc, aiohttp.ClientResponseError):
            # It answered, in a form aiohttp refuses: a content-encoding it cannot decode (brotli from a proxy
            # that ignores `accept-encoding: identity`), a malformed head. The log says which.
            return "Upstream account's answer could not be read"
        if isinstance(exc, aiohttp.ServerDisconnectedError) or dead_before_answer(exc):
            # It took the connection, then closed or reset it, before its answer or in the middle of its head:
            # reached, so not its address or a firewall for the operator to look at.
            return "Upstream account closed the connection before its answer"
        return "Upstream account unreachable"

    def _unsent(
        self, state: UpstreamState, exc: BaseException, sent_at: float, credential: str
    ) -> ShortOfResources | Unanswered:
        """A request that failed on its way to the account (`exc`): this host's shortage, or the account's
        (`credential`: what it was signed with, see `_no_answer`)."""
        if out_of_local_resources(exc):
            return self._short_of_resources(exc)
        return self._no_answer(state, self._unanswered(exc), exc, sent_at, credential)

    def _short_of_resources(self, exc: BaseException) -> ShortOfResources:
        """The gateway's 529 for a request it could not open a connection for, for want of file descriptors
        or socket memory on this host (too many connections at once, or an open-files limit set too low).
        No account is to blame, nor tried after it: each would fail alike, and counted as the account's
        failure, a burst took every account out of routing for their cooldowns. Logged at most every
        `SHORTAGE_LOG_SECONDS`: a burst fails hundreds of requests at once."""
        now = time.monotonic()
        if now - self._shortage_logged_at >= SHORTAGE_LOG_SECONDS:
            self._shortage_logged_at = now
            log.error(
                "no connection to an upstream could be opened (%s): too many connections at once for this "
                "host's limits (open files: %s); requests are refused with 529 meanwhile",
                what_failed(exc),
                open_files_limit(),
            )
        return ShortOfResources(self._retry_after)

    def _no_answer(
        self, state: UpstreamState, message: str, exc: BaseException, sent_at: float, credential: str
    ) -> Unanswered:
        """An account that gave no answer (`message`, what the client's 529 says) because of `exc`: counted
        against its health, and the cause logged (an untrusted certificate, a refused connection, a header
        too long all told the client and the log only "unreachable"). aiohttp's messages name the host (a
        timeout's, the URL), never the request's headers, where the credential goes; but they quote an answer
        they cannot read (a header line too long, a malformed status line), which may quote the `credential`
        the request was signed with back."""
        cause = without_credential(what_failed(exc), credential)
        attempt_log.warning("upstream %s gave no answer: %s (%s)", state.upstream.id, message, cause)
        # The health line says what the client was told: the kind alone ("after connect") sent the operator
        # looking for a network problem when the account was reached and slower than `first_byte_seconds`.
        self._failed(state, Failure.connect, sent_at=sent_at, why=f"no answer ({message})")
        return Unanswered(self._retry_after, message, exc)

    def _failed(
        self, state: UpstreamState, failure: Failure, sent_at: float, now: float | None = None, why: str | None = None
    ) -> None:
        """A failed attempt (of a request sent at `sent_at`: see `record_failure`): the account's health and
        error rate; a change of health is logged, saying `why` (else the failure's kind)."""
        now = time.monotonic() if now is None else now
        if record_failure(state.health, failure, now, self._health, sent_at):
            log.warning(
                "upstream %s is unhealthy after %s (%d in a row): no traffic for %.1f s",
                state.upstream.id,
                why or failure.value,
                state.health.consecutive_failures,
                state.health.retry_at - now,
            )
        state.stats.failed(now)

    @staticmethod
    def _succeeded(state: UpstreamState, whole: bool = True, sent_at: float | None = None) -> None:
        """An answer (`whole`: all of it; else a stream's first event, of a request sent at `sent_at`, see
        `record_answer`)."""
        if record_success(state.health) if whole else record_answer(state.health, sent_at):
            log.info("upstream %s is healthy again", state.upstream.id)

    @staticmethod
    def _client_headers(
        ctx: RequestContext,
        state: UpstreamState,
        response: aiohttp.ClientResponse,
        content_type: bytes,
        secret: bytes,
    ) -> list[tuple[bytes, bytes]]:
        upstream_headers = response.headers
        return [
            (b"request-id", ctx.request_id.encode()),
            (b"content-type", content_type),
            *answered_by(state.upstream.id, upstream_headers, secret),
            *passed_on(upstream_headers, secret),
        ]

"""Builds the gateway's ASGI application from a configuration and walks each request down the spine:
api → authn → policy → route → shape → sign → relay → observe.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from sqlalchemy import Engine

from poolgate import __version__
from poolgate.api.admin import PREFIX as ADMIN_PREFIX
from poolgate.api.admin import AdminApi
from poolgate.api.anthropic import (
    CREDENTIAL_AS_MODEL,
    MAX_MODEL_ID,
    decode_request,
    is_credential,
    named_model,
)
from poolgate.api.cors import BrowserAnswer, browser_request, preflight_headers
from poolgate.api.delivery import CostHeaders, DisconnectWatcher, TrackedSend, WatchSchedule, cut_short
from poolgate.api.errors import INTERNAL_ERROR, SHUTTING_DOWN, ApiError
from poolgate.api.http import (
    SERVER_ANSWER,
    ClientDisconnected,
    Fields,
    Receive,
    Scope,
    Send,
    fields_of,
    read_body,
    respond,
    respond_error,
    respond_json,
)
from poolgate.api.model_pages import model_page
from poolgate.api.paths import (
    ALLOWED_METHODS,
    LIVENESS,
    MESSAGE_ENDPOINTS,
    READ,
    base_url_advice,
    base_url_path,
    unserved_api,
)
from poolgate.api.tools import NOTHING_OFFERED
from poolgate.billing.book import FREE, PRICING_FAILED, ChannelBook
from poolgate.billing.channel import month_bounds, month_key
from poolgate.billing.values import BillableUsage, Priced
from poolgate.cache.breakpoints import prompt_prefix
from poolgate.cache.keepalive import CacheKeepalive
from poolgate.config import ConfigError, GatewayConfig
from poolgate.lifecycle.accounting import (
    Finished,
    answered_with,
    billable,
    billed,
    cost_headers,
    elapsed_ms,
    ended_by,
    usage_record,
)
from poolgate.lifecycle.authn import Authenticator
from poolgate.lifecycle.budgets import budget_charge
from poolgate.lifecycle.context import (
    Endpoint,
    Outcome,
    Principal,
    RequestContext,
    SessionKey,
    Usage,
    costs_anything,
    new_request_id,
)
from poolgate.lifecycle.internal import InternalRequests
from poolgate.lifecycle.keepalives import KeepaliveSender
from poolgate.lifecycle.observe import LogObserver, Observers, RequestFinished
from poolgate.lifecycle.policy import (
    ADMITTED,
    Admission,
    Policy,
    allowed_models,
    budget_estimate,
    model_allowed,
)
from poolgate.lifecycle.relay import Relay, RelayResult
from poolgate.lifecycle.reload import StoreReload
from poolgate.lifecycle.retry_budget import RetryBudget
from poolgate.lifecycle.routing.affinity import affinity_key
from poolgate.lifecycle.routing.filters import pin_for
from poolgate.lifecycle.routing.router import Router, RouteRefused
from poolgate.lifecycle.routing.threads import ThreadRoots, thread_key
from poolgate.lifecycle.routing.trace import RoutingTrace, TraceRing
from poolgate.lifecycle.sign import Signer
from poolgate.lifecycle.usage import usage_from_json
from poolgate.store import repo
from poolgate.store.accounts import DbCredentialStore
from poolgate.store.channels import load_counters, month_usage
from poolgate.store.db import CALLER_ENDPOINTS, close_engine, open_engine
from poolgate.store.upkeep import StoreUpkeep
from poolgate.store.usage import (
    SET_ASIDE_FILE,
    UsageWriter,
    restore_set_aside,
    spend_rows,
)
from poolgate.store.writer_process import failure
from poolgate.telemetry.logging import LINE_BOUND, BoundedLog, suppressed_lines_loop
from poolgate.telemetry.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from poolgate.telemetry.metrics import Metrics
from poolgate.upstreams.accounts import QuotaKeeper
from poolgate.upstreams.connections import prime, upstream_session
from poolgate.upstreams.models import ModelCatalog
from poolgate.upstreams.pool import Pool

log = logging.getLogger("poolgate")
# What one request can make the gateway say (a client's wrong base URL, a fault a request's input brings out,
# a store that refuses every write): at any rate the requests come.
request_log = BoundedLog(log)

GC_THRESHOLD = 20_000


def settle_heap() -> None:
    """Everything built so far lives as long as the process: keep the collector from re-scanning it, and
    collect young objects less often. Full collections over a large heap were the p99 outliers."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 100)


# Faults in a request's accounting (pricing it, settling its quotas and budget, keeping its spend) are logged with
# a traceback the first time, then every this many of their kind.
FAILURES_LOGGED_EVERY = 1000


class Faults:
    """How many faults of one kind the gateway has met, and whether the latest is one to log with its traceback
    (the first, then every `FAILURES_LOGGED_EVERY`-th): a fault on every request must not flood the log."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def met(self) -> bool:
        """Count one; whether to log it."""
        self.count += 1
        return self.count == 1 or self.count % FAILURES_LOGGED_EVERY == 0


class Gateway:
    """The ASGI application. One instance per process; all hot-path state lives in memory."""

    def __init__(self, config: GatewayConfig, engine: Engine | None = None) -> None:
        self.config = config
        # What every request reads of the (frozen) configuration, read once (see `scoring.Weights`).
        self._max_body_bytes = config.server.max_body_bytes
        self._cache_aware = config.routing.cache_aware
        self._expose_cost = config.billing.expose_cost
        self._expose_trace, self._trace_on_request = config.routing.expose_trace, config.routing.trace_on_request
        self._budget_output_tokens = config.billing.budget_output_tokens
        self.engine = engine or open_engine(config.store_url())
        self.box = repo.store_box(self.engine, config.data_dir)
        # Raises ConfigError when a JWT issuer's key file cannot be used.
        self.authn = Authenticator(config.callers, config.keys)
        self.policy = Policy()
        # Wall-clock time for calendar months (flat-fee quotas); tests move it.
        self.clock: Callable[[], float] = time.time
        try:
            self.book = ChannelBook(config.catalogue())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.pool = Pool(config.routing.cache_entries_per_upstream)
        self.signer = Signer(config.oauth, DbCredentialStore(self.engine, self.box))
        self.authn.own_secret = self._own_secret
        self.observers = Observers([LogObserver()] if config.server.access_log else [])
        self.metrics = Metrics(
            self.pool,
            self.signer.unusable_reason,
            lambda now: self.router.unusable_accounts(now),
            lambda: self.observers.errors,
            lambda: self.keepalive.skipped,
        )
        self.observers.add(self.metrics)
        self.router = Router(
            self.pool,
            config.routing,
            credential_problem=self.signer.unusable_reason,
            quota_threshold=config.oauth.quota_pressure_threshold,
            billing=self.book,
            clock=lambda: self.clock(),
            panic=config.health.panic,
        )
        # Which thread each thread's latest reply is of (its session for stickiness).
        self.threads = ThreadRoots(idle_ttl=config.routing.session_idle_seconds)
        self.internal = InternalRequests(config, self.pool, self.router, self._finish, self._keep_trace)
        self.quota_keeper = QuotaKeeper(self.engine, self.pool, self.signer, config.oauth, self.internal.warm_up)
        self.traces = TraceRing(config.routing.trace_ring_size)
        self.admin = AdminApi(config.admin.token, self.traces, self.pool, self.book, self.router.unusable_accounts)
        self.keepalive = CacheKeepalive(config.routing.keepalive)
        self.keepalive_sender = KeepaliveSender(
            config, self.keepalive, self.authn, self.policy, self.pool, self.internal, lambda: self.stopping
        )
        # Called for a session's every answered turn: bound once, no lookup more per request than a method's.
        self._watch_pause = self.keepalive_sender.watch_pause
        self._keepalive_task: asyncio.Task[None] | None = None
        self._counter_task: asyncio.Task[None] | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._suppressed_lines_task: asyncio.Task[None] | None = None
        self._quota_task: asyncio.Task[None] | None = None
        self.writer = UsageWriter(
            self.engine,
            config.data_dir / SET_ASIDE_FILE,
            config.store.flush_interval_seconds,
            config.store.batch_size,
        )
        self.observers.add(self.writer)
        self.upkeep = StoreUpkeep(config, self.engine, self.book)
        self._session: aiohttp.ClientSession | None = None
        # For a request sent again after the pooled connection it went on turned out dead (see `Relay._send`).
        self._fresh_session: aiohttp.ClientSession | None = None
        self._relay: Relay | None = None
        self._models: ModelCatalog | None = None
        self._reloader: asyncio.Task[None] | None = None
        self._watches = WatchSchedule()
        # Set when the server begins to shut down: a request cancelled from then on was ended by the
        # shutdown (see `_messages`), not by its client.
        self.stopping = False
        self._grace_ends: float | None = None  # monotonic: the end of `server.shutdown_grace_seconds`
        self._finished: list[Finished] = []
        self._account_call: asyncio.Handle | None = None
        self.pricing_failures = Faults()
        self.settle_failures = Faults()
        self.spend_failures = Faults()
        self.store_reload = StoreReload(
            config, self.engine, self.box, self.authn, self.signer, self.pool, self.quota_keeper, self.book
        )
        self.reload()
        # Spend and flat-fee usage so far, from the store: budgets and monthly quotas survive restarts.
        restore_set_aside(self.engine, config.data_dir / SET_ASIDE_FILE)
        month = month_key(self.clock())
        self.book.restore(load_counters(self.engine), month_usage(self.engine, month_bounds(month)[0]), month)
        self.policy.load_spend(spend_rows(self.engine))

    # ----- state -------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read keys and upstreams: the config file's plus those added with the CLI (see `StoreReload`)."""
        self.store_reload.reload()

    def readiness(self) -> dict[str, object]:
        """Whether a request would be tried upstream now: some account is usable, or (panic mode) some is
        only cooling down after failures, which the router would try anyway. A load balancer that took the
        instance out then would turn a blip across the pool into an outage for as long as the cooldowns. An
        account unhealthy from rejecting its credential (or a wrong base_url) is not cooling down: no wait
        cures it, and panic mode passes it over."""
        now = time.monotonic()
        usable = cooling = 0
        for upstream_id, reason in self.router.unusable_accounts(now).items():
            if reason is None:
                usable += 1
            elif reason == "unhealthy" and (state := self.pool.get(upstream_id)) is not None:
                cooling += not state.health.awaits_operator()
        ready = usable > 0 or (cooling > 0 and self.config.health.panic)
        return {"ready": ready, "upstreams": len(self.pool), "usable": usable, "cooling_down": cooling}

    # ----- lifespan ----------------------------------------------------------------------------------

    async def startup(self) -> None:
        self._session = upstream_session()
        self._fresh_session = upstream_session(fresh=True)
        await prime(self._session)  # the classes both sessions make, before a burst of requests can
        self._relay = Relay(
            self._session,
            self._fresh_session,
            self.signer,
            self.config.health,
            self.config.timeouts,
            self.config.routing.max_attempts,
            self.config.routing.no_upstream_retry_after_seconds,
            RetryBudget(
                self.config.routing.retry_budget_ratio,
                self.config.routing.retry_budget_min_per_second,
                time.monotonic(),
            ),
            self.pool,
            self.router.refusal_now,
            self.keepalive_sender.turn_accepted,
        )
        self.internal.relay = self._relay
        self._models = ModelCatalog(
            self._session, self.signer, self.pool, self.config.routing.no_upstream_retry_after_seconds
        )
        self.store_reload.models = self._models
        self.writer.start()
        settle_heap()
        # The usage writer thread should take the GIL when the loop waits for I/O, not preempt it mid-request.
        sys.setswitchinterval(0.05)
        self._reloader = asyncio.create_task(self.store_reload.reload_loop(), name="poolgate-reload")
        self._keepalive_task = asyncio.create_task(self.keepalive_sender.keepalive_loop(), name="poolgate-keepalive")
        self._quota_task = asyncio.create_task(self.quota_keeper.run(), name="poolgate-quota")
        self._counter_task = asyncio.create_task(self.upkeep.save_counters_loop(), name="poolgate-counters")
        self._retention_task = asyncio.create_task(self.upkeep.trace_retention_loop(), name="poolgate-trace-retention")
        self._suppressed_lines_task = asyncio.create_task(suppressed_lines_loop(), name="poolgate-log-bound")

    def begin_stop(self) -> None:
        """The server has begun a graceful stop: its grace runs from now."""
        self.stopping = True
        self._grace_ends = time.monotonic() + self.config.server.shutdown_grace_seconds

    def _grace_left(self) -> float:
        grace_ends = self._grace_ends
        if grace_ends is None:  # stopped without the server's graceful stop (an embedding of the ASGI app)
            return self.config.server.shutdown_grace_seconds
        return max(0.0, grace_ends - time.monotonic())

    async def shutdown(self) -> None:
        for task in (
            self._reloader,
            self._keepalive_task,
            self._quota_task,
            self._counter_task,
            self._retention_task,
            self._suppressed_lines_task,
        ):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # Each keepalive in flight records itself as interrupted before the writer stops.
        await self.keepalive_sender.cancel_in_flight()
        self.account_now()
        try:
            await self.quota_keeper.save()
        except Exception as exc:  # the usage is written; a quota picture is only a head start after a restart
            log.warning("saving subscription quota pictures at shutdown failed: %s", failure(exc))
        await self.writer.stop()
        await self.save_counters()
        # A token refresh in flight may have rotated its account's grant already: its new pair must be saved.
        await self.signer.aclose(self._grace_left())
        for session in (self._session, self._fresh_session):
            if session is not None:
                await session.close()
        try:
            await asyncio.to_thread(close_engine, self.engine)
        except Exception as exc:  # everything is written: only the log is left unfolded, which the next start reads
            log.warning("folding the store's write-ahead log into it at shutdown failed: %s", failure(exc))
        LINE_BOUND.flush(everything=True)  # what was suppressed lately is told before the last line
        log.log(logging.ERROR if self.writer.lost else logging.INFO, "stopped; %s", self.writer.outcome())

    async def save_counters(self) -> None:
        """Save the channels' monthly counters to the store now (see `StoreUpkeep.save_counters`)."""
        await self.upkeep.save_counters()

    async def forget_old_traces(self) -> int:
        """Drop the routing traces past their retention from the store now (see `StoreUpkeep`)."""
        return await self.upkeep.forget_old_traces()

    # ----- ASGI --------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI 3 application, for any server (`uvicorn.run(gateway)`, granian, tests). The bounds on
        heads, stalled bodies and clients that stop reading are `poolgate serve`'s server protocol's (see
        `serve.BoundedHeadProtocol`): under another server, they are that server's to keep."""
        await self.asgi(scope, receive, send)

    def asgi(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The same application as a plain function handing the server the coroutine that serves the scope,
        so that a Messages request's coroutine is the server's own (see `_messages`): what `poolgate serve`
        runs (uvicorn with `interface="asgi3"`: auto-detection takes a plain function for ASGI 2)."""
        if scope["type"] == "http":
            fields = fields_of(scope["headers"])
            if browser_request(fields):
                send = BrowserAnswer(send).send
            endpoint = MESSAGE_ENDPOINTS.get(scope["path"])
            if endpoint is not None and scope["method"] == "POST":
                return self._messages(endpoint, scope, fields, receive, send)
            return self._http(scope, fields, receive, send)
        if scope["type"] == "lifespan":
            return self._lifespan(receive, send)
        return asyncio.sleep(0)  # websocket: not served

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, fields: Fields, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        request_id = new_request_id()
        ids = [(b"request-id", request_id.encode())]
        try:
            if method == "OPTIONS" and path.startswith("/v1/"):
                preflight = preflight_headers(fields)
                if preflight is not None:  # a browser's preflight; any other OPTIONS is a wrong method, below
                    await respond(send, 200, b"", [*ids, *preflight])
                    return
            if path in MESSAGE_ENDPOINTS:  # POST went to `_messages`
                raise ApiError(405, f"{method} is not allowed on {path}; use POST", headers=[(b"allow", b"POST")])
            if path == "/v1/models" and method in READ:
                principal = self.authn.authenticate(fields)
                page = model_page(await self._models_for(principal), scope["query_string"])
                await respond_json(send, 200, page, ids)
            elif path.startswith("/v1/models/") and method in READ:
                principal = self.authn.authenticate(fields)
                model_id = path[len("/v1/models/") :]  # decoded by the server already (ASGI's `path`)
                if is_credential(model_id) or self.authn.is_caller_credential(model_id):
                    raise ApiError(400, CREDENTIAL_AS_MODEL)
                model = next((m for m in await self._models_for(principal) if m["id"] == model_id), None)
                # An id longer than a request may name is not looked up: the allow-list memo and the lookups
                # remembered are keyed by it, and ids of up to a head's 64 KB, made up per call, held hundreds of
                # MB there.
                if model is None and len(model_id) <= MAX_MODEL_ID and model_allowed(principal, model_id):
                    # Not listed as such: an alias, say, which the API resolves to its dated id. The id asked for
                    # is the one the caller may use (a request naming it is checked so), not the dated one.
                    assert self._models is not None
                    model = await self._models.retrieve(model_id, principal.id)
                if model is None:
                    raise ApiError(404, f"model: {model_id}", "not_found_error")
                await respond_json(send, 200, model, ids)
            elif path in LIVENESS and method in READ:
                # A HEAD's answer has GET's headers, content-length included; the server sends no body for it.
                await respond(send, 200, b'{"status":"ok","version":"' + __version__.encode() + b'"}', ids)
            elif path == "/metrics" and method in READ:
                self.admin.authorize_scrape(scope["headers"])
                self.account_now()
                await respond(send, 200, self.metrics.exposition(), ids, METRICS_CONTENT_TYPE)
            elif path.startswith(ADMIN_PREFIX):
                answer = self.admin.handle(method, path, scope["query_string"], scope["headers"])
                await respond_json(send, 200, answer, ids)
            elif path == "/readyz" and method in READ:
                readiness = self.readiness()
                await respond_json(send, 200 if readiness["ready"] else 503, readiness, ids)
            elif path in ALLOWED_METHODS or path.startswith("/v1/models/"):
                allowed = ALLOWED_METHODS.get(path, "GET, HEAD")
                raise ApiError(
                    405, f"{method} is not allowed on {path}; use {allowed}", headers=[(b"allow", allowed.encode())]
                )
            elif (prefix := base_url_path(path)) is not None:
                # A 400, not a 404: Claude Code turns any 404 into "There's an issue with the selected model",
                # hiding the message; a 400's it shows. Logged too, where the operator looks.
                request_log.warning(
                    "%s %s: a client's base URL ends in %s, which poolgate does not serve under", method, path, prefix
                )
                raise ApiError(400, f"{method} {path}: {base_url_advice(prefix)}")
            elif (api := unserved_api(path)) is not None:
                # A bare "not found" of a batch or file id reads as "that batch does not exist".
                raise ApiError(404, f"poolgate does not serve {api}: {method} {path}")
            else:
                raise ApiError(404, f"Not found: {method} {path}")
        except ApiError as error:
            await respond_error(send, error, request_id)
        except ClientDisconnected:
            pass
        except Exception:  # a fault of the gateway's: an answer in Anthropic's shape, not the server's text 500
            request_log.exception("request %s failed in the gateway", request_id)
            await respond_error(send, INTERNAL_ERROR, request_id)

    async def _models_for(self, principal: Principal) -> list[dict[str, Any]]:
        """The pool's models, as far as the caller may use them."""
        assert self._models is not None
        return allowed_models(principal, await self._models.models())

    async def _messages(self, endpoint: Endpoint, scope: Scope, fields: Fields, receive: Receive, send: Send) -> None:
        """A Messages request, from authn to accounting. The server awaits this coroutine itself, and the
        relay's are as few: every frame in the chain of awaiting coroutines is passed through again on each
        suspension and resumption of the request (a sampling profile put a quarter of the gateway's own CPU
        per request on `await` lines; four frames fewer saved ~2 % of its CPU per request)."""
        request_id = new_request_id()
        arrived = time.perf_counter()
        headers = scope["headers"]
        try:
            principal = self.authn.authenticate(fields)
            body = b""
            try:
                body = await read_body(receive, self._max_body_bytes, fields.get(b"content-length"))
                ctx = decode_request(endpoint, request_id, scope["path"], scope["query_string"], headers, body, fields)
                if self.authn.is_caller_credential(ctx.model):
                    raise ApiError(400, CREDENTIAL_AS_MODEL)
            except (ApiError, ClientDisconnected, asyncio.CancelledError) as refused:
                # A known caller's unreadable request (malformed, oversize, abandoned, stopped arriving, or
                # still arriving when the shutdown could wait no longer) is a finished request too.
                outcome = Outcome.client_error
                if isinstance(refused, asyncio.CancelledError):
                    if not self.stopping:
                        raise
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    refused, outcome = (
                        ApiError(503, SHUTTING_DOWN.message, SHUTTING_DOWN.error_type),
                        Outcome.interrupted,
                    )
                answer = refused if isinstance(refused, ApiError) else None
                if SERVER_ANSWER in scope:  # a body that stopped arriving or cannot be read: the server answered
                    request_id, answer = scope[SERVER_ANSWER]
                # The body read, it says which model the refusal is counted under.
                model = named_model(body, self.authn.is_caller_credential)
                ctx = RequestContext(request_id, endpoint, scope["path"], scope["query_string"], headers, b"", model)
                # Timed from its arrival, not its refusal (a stalled body's 408 came a body timeout later).
                ctx.timed_from(arrived, self.clock())
                ctx.principal = principal
                if answer is not None:
                    result = RelayResult(
                        status=answer.status,
                        outcome=outcome,
                        error_type=answer.error_type,
                        error_message=answer.message,
                    )
                else:
                    result = RelayResult(status=499, outcome=Outcome.client_disconnected)
                self._finish(ctx, result, None, ADMITTED, None)
                raise refused from None
        except ApiError as error:
            if self._cost_asked(fields):
                # Refused before the policy (a credential, a body that is no request): not billed either, and
                # said so as the policy's refusals say it (no header read as a cost unknown).
                error = ApiError(
                    error.status, error.message, error.error_type, [*error.headers, *cost_headers(FREE)], error.details
                )
            await respond_error(send, error, request_id)
            return
        except ClientDisconnected:
            return
        except Exception:  # as in `_http` (past this point the relay's own handler answers)
            request_log.exception("request %s failed in the gateway", request_id)
            await respond_error(send, INTERNAL_ERROR, request_id)
            return
        # Timed from its arrival, as a refused one is: the time its body took to come is the client's wait too.
        ctx.timed_from(arrived, self.clock())
        ctx.principal = principal
        if ctx.prompt is not None and self._cache_aware:
            ctx.prefix = prompt_prefix(ctx.prompt, ctx.body, ctx.model)
        result = RelayResult()
        tracked = TrackedSend(send)
        watcher = DisconnectWatcher(receive, tracked, self._watches)
        trace: RoutingTrace | None = None
        admission = ADMITTED
        session_key = affinity_key(principal, ctx) if ctx.thread is None else self._thread_session(principal, ctx)
        unfinished: ApiError | None = None  # what the client is told of a request the gateway could not finish
        if not ctx.stream and self._cost_asked(fields):
            # The cost is known once the whole answer is: hold the (bounded) JSON answer back until then. (A
            # refusal, the policy's too, says its cost: nothing.) A stream goes as it comes, without: its cost is
            # known after its last event; its refusal says it below (asked then: the header is not looked for in
            # every stream's request).
            tracked.cost_headers = self._cost_headers_of(ctx, result)
        try:
            admission = self._admit(principal, ctx)
            tracked.head_lines = admission.head_lines
            try:
                decision = self.router.route(
                    ctx.model, time.monotonic(), session_key, ctx.prefix, principal.name, costs_anything(ctx)
                )
            except RouteRefused as refusal:
                trace = refusal.trace
                if self._trace_asked(fields):
                    # Why nothing could serve it: the refusal explains itself too.
                    tracked.extra_headers.append((b"x-poolgate-route", trace.to_json()))
                raise
            trace = decision.trace
            if self._trace_asked(fields):
                tracked.extra_headers.append((b"x-poolgate-route", trace.to_json()))
            assert self._relay is not None
            await self._relay.relay(ctx, decision, tracked, result)
            if result.status == 200 and result.upstream_id is not None and result.outcome is Outcome.ok:
                # The session's own account, if it had one and the router put it first (a new session's
                # first turn failed over belongs where it was answered). A stream that broke mid-way binds the
                # session no more firmly to its account: the account may be on its way out.
                sticky = trace.terminal is not None and trace.terminal.sticky
                home = decision.order[0].upstream.id if sticky else None
                now = time.monotonic()
                if ctx.thread is not None:
                    root = self.threads.answered(principal.id, ctx.thread, result.reply_id, now)
                    if root is not None:
                        # The thread lives on the account that answered, whichever the session's home was: its
                        # next turn (a `create`'s first `continue` too) must find it there.
                        session_key, home = thread_key(principal.id, root, ctx.model), None
                if self.router.answered(session_key, result.upstream_id, home, ctx.model, now) == result.upstream_id:
                    assert result.sent_at is not None  # set with the answer's usage
                    self._watch_pause(ctx, result.upstream_id, result.usage, result.sent_at)
                # else the session stays with its cache, and so does its keepalive
        except ApiError as error:
            answered_with(result, error)
            if error.status == 402 and ctx.session_id is not None:
                # The session cannot go on, whatever the model: nothing to keep warm.
                self.keepalive.drop((principal.id, ctx.session_id), "budget")
            if not tracked.started:
                if ctx.stream and self._cost_asked(fields):
                    tracked.cost_headers = self._cost_headers_of(ctx, result)
                await respond_error(tracked, error, request_id)
        except asyncio.CancelledError:
            # The client had its whole answer: only the read of the upstream's end (for its connection's reuse)
            # was cut, and the answer stands as relayed (it was recorded `interrupted`, an error).
            whole = result.answered_at is not None
            if not (watcher.disconnected or self.stopping):
                # Cancelled by a server that did not say it is stopping (the app under `uvicorn.run`, not
                # `poolgate serve`): nothing more can be sent, but it was cut short, not `ok` with status 0.
                if not whole:
                    ended_by(result, Outcome.interrupted, SHUTTING_DOWN, answered=tracked.started)
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if watcher.disconnected:
                result.outcome = Outcome.client_disconnected
                result.status = result.status or 499
            elif not whole:
                # The server cancels what is still running when it can wait no longer: tell the client, in
                # Anthropic's shape, rather than cut it off (the server logged a traceback for each).
                unfinished = SHUTTING_DOWN
                ended_by(result, Outcome.interrupted, SHUTTING_DOWN, answered=tracked.started)
        except Exception:
            request_log.exception("request %s failed in the gateway", request_id)
            unfinished = INTERNAL_ERROR
            ended_by(result, Outcome.gateway_error, INTERNAL_ERROR, answered=tracked.started)
        finally:
            watcher.stop()
            if tracked.undelivered and result.outcome is Outcome.ok:
                # The client left before its (quick) answer was written: it was relayed to nobody, too soon
                # for the watcher, and the server dropped it.
                result.outcome = Outcome.client_disconnected
            self._finish(ctx, result, trace, admission, self._keep_trace(request_id, trace))
        if unfinished is not None:
            # Told once accounted: the send waits for a client that takes nothing more (up to the send timeout),
            # and the shutdown stopped the usage writer meanwhile, the request's record with it.
            await cut_short(tracked, ctx, request_id, unfinished)

    def _own_secret(self, text: str) -> bool:
        """Whether `text` is one of the gateway's own secrets: its admin token, or an account's key of any shape
        (the demo's `sk-ant-api03-mock-key-1`, a proxy's key). Pasted as a model, one went to another account,
        came back in its 404 and stayed in the ledger; sent as a gateway key, its first characters were logged."""
        return text == self.config.admin.token or self.signer.holds(text)

    def _thread_session(self, principal: Principal, ctx: RequestContext) -> SessionKey | None:
        """The session a threaded request is routed in: the thread's, for a `continue` of one this instance
        answered; else the request's own, if any (a `create`, a thread another instance answered or forgotten:
        any account may take it, and the one that does not hold the thread says so, `thread_not_found`)."""
        assert ctx.thread is not None
        root = self.threads.root(principal.id, ctx.thread, time.monotonic())
        return affinity_key(principal, ctx) if root is None else thread_key(principal.id, root, ctx.model)

    def _keep_trace(self, request_id: str, trace: RoutingTrace | None) -> bytes | None:
        """The trace as JSON, kept in the ring for `route explain` (and then written to the usage record).
        Never in the way of accounting: a trace that cannot be written is logged and the request accounted
        without it."""
        if trace is None:
            return None
        try:
            route = trace.to_json()
        except Exception:
            request_log.exception("writing the routing trace of request %s failed", request_id)
            return None
        self.traces.add(request_id, route)
        return route

    # ----- policy and cost ---------------------------------------------------------------------------

    def _admit(self, principal: Principal, ctx: RequestContext) -> Admission:
        """Policy before routing: allow, or raise the 403/429/402. A budget reserves an upper bound of the
        request's cost on the accounts that serve its model (prompt from the body size, output at max_tokens
        or at most `billing.budget_output_tokens`)."""
        claims = principal.claims
        if not claims.enforced:
            return ADMITTED
        estimate = None
        tools = NOTHING_OFFERED
        if claims.budget_micro_usd is not None and ctx.endpoint == "messages":
            # Which accounts may serve it matters where their prices differ, or where some are paid by the month.
            priced_apart = self.book.priced_by_upstream or self.book.flat_fee
            serving = self._serving(principal, ctx.model) if priced_apart else ()
            estimate, tools = budget_estimate(self.book, ctx, self._budget_output_tokens, serving)
            # Looked into only where it may refuse: a priced model served at prices that do not differ, the usual,
            # is not.
            if (
                (estimate is None or (serving and self.book.priced_by_upstream))
                and self.config.billing.unpriced_under_budget == "refuse"
                and model_allowed(principal, ctx.model)
            ):
                # (A model the caller may not use at all is left to the policy's 403.)
                if estimate is None:
                    self._refuse_unpriced(principal, ctx)
                # An upstream priced by duration has a price of its own: none serves where prices do not differ.
                if serving and self.book.priced_by_upstream:
                    self._refuse_timed(principal, ctx, self.book.timed(serving))
        return self.policy.admit(principal, ctx, estimate, ctx.started_at, tools)

    def _serving(self, principal: Principal, model: str) -> tuple[str, ...]:
        """The accounts a request of `principal` for `model` may go to: those serving the model, cut to the
        ones a pin names (an unpriced model pinned to a flat-fee account was refused for a metered one that
        serves it too, but never gets it)."""
        serving = self.pool.serving(model).ids
        pins = self.config.routing.pins
        pin = pin_for(pins, model, principal.name) if pins else None
        return serving if pin is None else tuple(upstream_id for upstream_id in serving if upstream_id in pin.upstreams)

    def _refuse_unpriced(self, principal: Principal, ctx: RequestContext) -> None:
        """A budget cannot be held to a model no price covers: every request would cost it nothing (an
        expensive model id the catalogue does not list yet, say). (Claude Code shows a 403 after "Please run
        /login", or as "Failed to authenticate": its message says the key is fine, as the allow-list's does.)"""
        if not self.book.covers(ctx.model, ctx.started_at, self._serving(principal, ctx.model)):
            raise ApiError(
                403,
                f"Model {ctx.model!r} has no price (not in the price catalogue, and not every upstream serving it"
                f" prices it), so it cannot be charged to the budget of {principal.name!r}; the"
                f" {principal.credential} is valid: use a"
                " priced model (in Claude Code: /model or --model), or ask the operator to price it (`prices`) or to"
                " allow unpriced models under budgets"
                " (`billing.unpriced_under_budget: allow`)",
                "permission_error",
            )

    def _refuse_timed(self, principal: Principal, ctx: RequestContext, timed: list[str]) -> None:
        """A budget cannot be held to a model an upstream priced by duration serves: no estimate bounds how
        long a request runs there, so a $0.10 budget admitted ten requests that cost $0.20 each."""
        if timed:
            raise ApiError(
                403,
                f"Model {ctx.model!r} is served by upstream(s) priced by duration ({', '.join(timed)}), whose cost"
                f" no estimate bounds, so it cannot be charged to the budget of {principal.name!r}; the"
                f" {principal.credential} is valid:"
                " use another model (in Claude Code: /model or --model), or ask the operator to allow such models"
                " under budgets"
                " (`billing.unpriced_under_budget: allow`)",
                "permission_error",
            )

    def _price(self, ctx: RequestContext, upstream_id: str | None, status: int, usage: BillableUsage) -> Priced:
        """What the answer cost (see `billed`); unknown when pricing fails: a request is accounted, and its
        answer delivered, whatever went wrong pricing it (a cost header's failure made the held answer a
        plain-text 500; one in the batch lost the usage record)."""
        if upstream_id is None or not billed(ctx, status):
            return FREE
        try:
            return self.book.cost(ctx.model, upstream_id, usage, ctx.started_at)
        except Exception:
            if self.pricing_failures.met():
                log.exception(
                    "pricing request %s (model %s, upstream %s) failed (%d so far; logged the first time, then every"
                    " %d): its cost is unknown (pricing version %r)",
                    ctx.request_id,
                    ctx.model,
                    upstream_id,
                    self.pricing_failures.count,
                    FAILURES_LOGGED_EVERY,
                    PRICING_FAILED,
                )
            return Priced(None, self.book.catalogue.currency, PRICING_FAILED)

    def _trace_asked(self, fields: Fields) -> bool:
        """Whether the answer carries its routing trace: `routing.expose_trace`, or the caller's
        `x-poolgate-trace: 1` where `routing.trace_on_request` allows it."""
        return self._expose_trace or (self._trace_on_request and fields.get(b"x-poolgate-trace") == b"1")

    def _cost_asked(self, fields: Fields) -> bool:
        """Whether an answer says its cost: `billing.expose_cost`, or the caller's `x-poolgate-cost: 1`."""
        return self._expose_cost or fields.get(b"x-poolgate-cost") == b"1"

    def _cost_headers_of(self, ctx: RequestContext, result: RelayResult) -> CostHeaders:
        """The cost headers of the answer to `ctx`, for `TrackedSend` to add once the answer is whole."""
        return lambda status, body: self._cost_headers(ctx, result, status, body)

    def _cost_headers(
        self, ctx: RequestContext, result: RelayResult, status: int, body: bytes
    ) -> list[tuple[bytes, bytes]]:
        answered = usage_from_json(body) if status == 200 else None
        usage = billable(answered or Usage(), elapsed_ms(ctx, time.perf_counter()))
        # The ledger records the price the caller was told (see `_finish`): pricing it again later could
        # land in another tier once concurrent requests have been counted meanwhile.
        result.priced = self._price(ctx, result.upstream_id, status, usage)
        return cost_headers(result.priced)

    def _finish(
        self,
        ctx: RequestContext,
        result: RelayResult,
        trace: RoutingTrace | None,
        admission: Admission,
        route: bytes | None,
    ) -> None:
        """Count the request in its flat-fee channel's month now: the next request's routing must see it. Its
        price, its charge to the caller's budget and quotas, its usage record and the observers (the usage writer
        among them) follow in a batch, right after this turn of the event loop (see `_account`). Runs for every
        request that got past authn, well or badly. `route` is the trace's JSON for the usage record."""
        ended = result.answered_at or time.perf_counter()
        usage = billable(result.usage, elapsed_ms(ctx, ended))
        priced = result.priced
        upstream_id = result.upstream_id
        if upstream_id is not None and priced is None and self.book.sequenced(upstream_id):
            # Priced now, before the request is counted in its channel's month (a tiered price's next tier
            # starts after the units already used), rather than in the batch.
            priced = self._price(ctx, upstream_id, result.status, usage)
        if upstream_id is not None and billed(ctx, result.status):
            # In the month it started in, which it was priced in (and its ledger row and budget date it by):
            # one that finished in the next month was priced on one month's count and counted in the other's.
            self.book.record(upstream_id, usage, ctx.started_at)
        self._finished.append(Finished(ctx, result, trace, route, usage, priced, admission, ended))
        if self._account_call is None:
            self._account_call = asyncio.get_running_loop().call_soon(self._account)

    def _account(self) -> None:
        """The charges, usage records and observer events of the requests that finished in one turn of the event
        loop, in the order they finished: one after another the code stays warm, and their data is still warm (a
        20 ms batch saved as much CPU on quick answers but cost ~10 % more on Claude Code-sized ones, whose
        traces and bodies had gone cold by then, in the cache-affinity benchmark). A budget's charge waits for the
        batch safely: until then the request's reservation, an upper bound of its cost, holds its place; charged
        in the request's own turn, with its price, it cost ~1 % more CPU per request than here (measured side by
        side as `bench/policy_overhead.py` does)."""
        self._account_call = None
        batch, self._finished = self._finished, []
        for finished in batch:
            ctx, result, trace = finished.ctx, finished.result, finished.trace
            try:
                priced = finished.priced
                if priced is None:
                    priced = self._price(ctx, result.upstream_id, result.status, finished.usage)
                admission = finished.admission
                charged = None
                if admission is not ADMITTED:
                    reserved = admission.budget.reserved if admission.budget is not None else None
                    charge, charged = budget_charge(priced, reserved)
                    try:
                        self.policy.settle(admission, charge, result.usage, time.time())
                    except Exception:
                        charged = self._settle_failed(ctx, admission, charged)
                principal = ctx.principal
                if (
                    admission.budget is None  # charged to a budget, which keeps it as spend: not again
                    and priced.micro
                    and priced.currency == "USD"
                    and principal is not None
                    and ctx.endpoint in CALLER_ENDPOINTS
                ):
                    self._keep_spend(principal, ctx, priced.micro)
                event = RequestFinished(
                    record=usage_record(ctx, result, finished.route, priced, finished.ended, charged),
                    principal=ctx.principal,
                    route=trace,
                    provider=result.provider,
                    usage=result.usage,
                    error_message=result.error_message,
                )
            except Exception:  # never lose the rest of the batch to one request's accounting
                request_log.exception("accounting request %s failed", ctx.request_id)
                continue
            self.observers.request_finished(event)

    def _settle_failed(self, ctx: RequestContext, admission: Admission, charged: int | None) -> int | None:
        """A fault settling a request's quotas and budget: its budget is charged what it reserved (see
        `Policy.release`), and its usage record still written, with what was charged (`charged`, the charge
        meant, if the budget was settled before the fault)."""
        if self.settle_failures.met():
            request_log.exception(
                "settling request %s with its quotas and budget failed (%d so far; logged the first time, then"
                " every %d): its budget is charged what the request reserved",
                ctx.request_id,
                self.settle_failures.count,
                FAILURES_LOGGED_EVERY,
            )
        released = self.policy.release(admission)
        return charged if released is None else released

    def _keep_spend(self, principal: Principal, ctx: RequestContext, micro: int) -> None:
        """Keep a request's cost in its caller's spend history (what a budget given to the caller later counts).
        A fault doing so loses that, not the request's usage record: the ledger has its cost, and the history is
        seeded from the ledger at the next start."""
        try:
            self.policy.budgets.spend(principal, ctx.session_id, ctx.started_at, micro)
        except Exception:
            if self.spend_failures.met():
                request_log.exception(
                    "keeping the spend of request %s failed (%d so far; logged the first time, then every %d): its"
                    " cost is in its usage record, and in the caller's spend history again after a restart",
                    ctx.request_id,
                    self.spend_failures.count,
                    FAILURES_LOGGED_EVERY,
                )

    def account_now(self) -> None:
        """Account every finished request now rather than with the next batch (a scrape, a flush, shutdown)."""
        if self._account_call is not None:
            self._account_call.cancel()
        self._account()

    async def flush_usage(self) -> None:
        """Every finished request's usage record in the database (tests, tools)."""
        self.account_now()
        await self.writer.flush()


def build_app(config: GatewayConfig, engine: Engine | None = None) -> Gateway:
    return Gateway(config, engine)

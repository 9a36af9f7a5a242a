"""The cache keepalive at work (`cache.keepalive.CacheKeepalive` keeps its schedule): after a session's
turn, whether to watch its pause; once a paused session's cache entry nears expiry, whether its caller and
account may still have it kept warm, and the keepalive itself, sent as the gateway's own request
(`InternalRequests`), each its own task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from poolgate.cache.keepalive import CacheKeepalive, PausedSession
from poolgate.config import GatewayConfig
from poolgate.lifecycle.authn import Authenticator
from poolgate.lifecycle.context import Principal, RequestContext, Usage, new_request_id
from poolgate.lifecycle.internal import InternalRequests
from poolgate.lifecycle.policy import Policy, model_allowed
from poolgate.store.writer_process import failure
from poolgate.upstreams.pool import Pool, UpstreamState, serves_model

log = logging.getLogger("poolgate")


class KeepaliveSender:
    """Feeds the keepalive schedule from the gateway's answered turns, and sends the keepalives it says are
    due."""

    def __init__(
        self,
        config: GatewayConfig,
        keepalive: CacheKeepalive,
        authn: Authenticator,
        policy: Policy,
        pool: Pool,
        internal: InternalRequests,
        stopping: Callable[[], bool],
    ) -> None:
        self.config = config
        self.keepalive = keepalive
        self.authn = authn
        self.policy = policy
        self.pool = pool
        self.internal = internal
        self._stopping = stopping  # the gateway has begun to shut down
        self._keepalives: set[asyncio.Task[None]] = set()  # in flight, each its own task (`start_keepalives`)

    def turn_accepted(self, ctx: RequestContext, upstream_id: str, sent_at: float) -> None:
        """A turn of a session was taken on by an account: if that holds the session's paused prompt and the
        turn reads it, the entry lives a TTL from the turn's send (a turn still in flight past the old expiry
        was taken for a pause, and kept warm for nothing)."""
        if len(self.keepalive) and ctx.principal is not None and ctx.session_id is not None and ctx.prefix is not None:
            self.keepalive.read_by_turn((ctx.principal.id, ctx.session_id), upstream_id, ctx.prefix, sent_at)

    def _keepalive_wanted(self, upstream_id: str) -> bool:
        if self.config.routing.keepalive.enabled:
            return True
        state = self.pool.get(upstream_id)
        return state is not None and state.upstream.cache_keepalive

    def watch_pause(self, ctx: RequestContext, upstream_id: str, usage: Usage, sent_at: float) -> None:
        """Watch the session's pause after this answer. Its cache entries' TTLs run from when the request was
        sent (the upstream touches the cache before it generates): timed from the end of a long answer, the
        keepalive came after the entry had expired, and wrote the whole prompt again."""
        if ctx.session_id is None or ctx.prefix is None or ctx.endpoint != "messages" or ctx.principal is None:
            return
        if ctx.thread is not None or ctx.max_tokens == 0:
            # Its body is no prompt to send again: a `continue` sent again would continue the thread (the client's
            # next turn then finds it continued already), a `create` would start another; a review alone (Claude
            # Code's of a subagent's report, prefilled) would be generated after and reviewed again. The turn
            # before it stays the one kept warm.
            return
        if not (usage.cache_creation_input_tokens or usage.cache_read_input_tokens):
            # The upstream cached none of it (a prompt under the model's minimum): keeping it warm would pay
            # for the whole prompt each time and save nothing. An earlier turn's watch, if any, stands.
            return
        if self._keepalive_wanted(upstream_id):
            self.keepalive.served(
                ctx.principal.id,
                ctx.session_id,
                upstream_id,
                ctx.model,
                ctx.body,
                ctx.headers,
                ctx.prefix,
                sent_at,
            )

    async def keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._stopping():  # none that the shutdown would cut short, to be billed and recorded `interrupted`
                continue
            try:
                self.start_keepalives(time.monotonic())
            except Exception as exc:  # a keepalive is an optimisation: never let it stop the gateway
                log.warning("cache keepalive failed: %s", exc)

    def start_keepalives(self, now: float) -> list[asyncio.Task[None]]:
        """Start the keepalives due at `now`, each its own task; returns them. An account slow to answer one
        (up to `timeouts.first_byte_seconds`) holds back no other keepalive, nor those coming due meanwhile:
        waited for, they went out after their entries had expired, and wrote the whole prompt again."""
        started = []
        for session in self.keepalive.due(now):
            principal = self._keepalive_caller(session)
            state = None if principal is None else self._keepalive_account(session)
            if principal is not None and state is not None and self.keepalive.sending(session, now):
                task = asyncio.create_task(self._send_keepalive(session, principal, state, now))
                self._keepalives.add(task)
                task.add_done_callback(self._keepalives.discard)
                started.append(task)
        return started

    async def send_keepalives(self, now: float) -> int:
        """Start the keepalives due at `now` and wait for their answers (tests, tools); returns how many went
        out."""
        started = self.start_keepalives(now)
        await asyncio.gather(*started)
        return len(started)

    def _keepalive_caller(self, session: PausedSession) -> Principal | None:
        """The session's caller, if it could still send the next turn: its key not revoked (nor its token
        expired), the session's model still allowed to it, its budget not used up. A keepalive is in no
        budget: it must not outlive the caller's right to the session."""
        principal = self.authn.still_accepted(session.headers)
        if principal is None or not model_allowed(principal, session.model):
            self.keepalive.let_go(session, "caller_refused")
            return None
        budget = self.policy.budget_status(principal, session.session_id, time.time())
        if budget is not None and budget.spent_micro_usd >= budget.limit_micro_usd:
            self.keepalive.let_go(session, "budget")
            return None
        return principal

    def _keepalive_account(self, session: PausedSession) -> UpstreamState | None:
        """The session's account, if the router would send the session's model there now (its model globs
        too, which a reload may have narrowed since the turn); else the session gets no keepalive until its
        next turn (an account in trouble gets no retries from keepalives)."""
        state = self.internal.internal_target(session.upstream_id, session.model)
        if state is None or not serves_model(state.upstream.models, session.model):
            state = None
            self.keepalive.let_go(session, "account_unusable")
        return state

    async def _send_keepalive(
        self, session: PausedSession, principal: Principal, state: UpstreamState, now: float
    ) -> None:
        ctx = RequestContext(
            request_id=new_request_id(),
            endpoint="keepalive",
            path="/v1/messages",
            query=b"",
            headers=session.headers,
            body=session.body,
            model=session.model,
            session_id=session.session_id,
            prefix=session.prefix,
            principal=principal,
        )
        ok = False
        try:
            ok = await self.internal.relay_internal(ctx, state)
        except Exception as exc:  # a task of its own: nothing else would log it
            log.warning("cache keepalive failed: %s", failure(exc))
        self.keepalive.refreshed(session, ok, now)

    async def cancel_in_flight(self) -> None:
        """Cancel the keepalives in flight and wait for them: each records itself as interrupted (see
        `InternalRequests.relay_internal`)."""
        keepalives = list(self._keepalives)
        for keepalive in keepalives:
            keepalive.cancel()
        await asyncio.gather(*keepalives, return_exceptions=True)

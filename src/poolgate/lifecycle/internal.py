"""The gateway's own requests: a subscription account's warm-up (which `QuotaKeeper` asks for) and a
cache keepalive (`KeepaliveSender`). Each goes to one given account, past routing, only if the router would
use that account now, and is accounted like a client's request (its usage record, the account's health).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import orjson

from poolgate.api.errors import INTERNAL_ERROR, SHUTTING_DOWN, ApiError
from poolgate.api.http import Message
from poolgate.config import GatewayConfig
from poolgate.lifecycle.accounting import answered_with, ended_by
from poolgate.lifecycle.context import Outcome, RequestContext, new_request_id
from poolgate.lifecycle.policy import ADMITTED, Admission
from poolgate.lifecycle.relay import Relay, RelayResult
from poolgate.lifecycle.routing.router import RouteDecision, Router
from poolgate.lifecycle.routing.trace import RoutingTrace, TerminalDecision
from poolgate.telemetry.logging import BoundedLog
from poolgate.upstreams.pool import Pool, UpstreamState

request_log = BoundedLog(logging.getLogger("poolgate"))

# `Gateway._finish` and `Gateway._keep_trace`: how any finished request is accounted, and its trace kept.
Finish = Callable[[RequestContext, RelayResult, RoutingTrace | None, Admission, bytes | None], None]
KeepTrace = Callable[[str, RoutingTrace | None], bytes | None]


class InternalRequests:
    """Sends the gateway's own requests through the relay (set once the gateway has started) and accounts
    them as the gateway accounts a client's."""

    def __init__(
        self, config: GatewayConfig, pool: Pool, router: Router, finish: Finish, keep_trace: KeepTrace
    ) -> None:
        self.config = config
        self.pool = pool
        self.router = router
        self.relay: Relay | None = None  # set by `Gateway.startup`
        self._finish = finish
        self._keep_trace = keep_trace

    async def warm_up(self, upstream_id: str) -> bool:
        """One minimal request to a subscription account, which starts its 5-hour window."""
        model = self.config.oauth.warmup_model
        body = orjson.dumps({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
        ctx = RequestContext(
            request_id=new_request_id(),
            endpoint="warmup",
            path="/v1/messages",
            query=b"",
            headers=[(b"anthropic-version", b"2023-06-01"), (b"content-type", b"application/json")],
            body=body,
            model=model,
        )
        return await self.send_internal(ctx, upstream_id)

    async def send_internal(self, ctx: RequestContext, upstream_id: str) -> bool:
        """A request the gateway makes itself (a warm-up; a keepalive checks its account first, see
        `KeepaliveSender.start_keepalives`) to one given account, accounted like any other; True when it was
        answered with 200. Not sent to an account that is unhealthy, parked or out of a rate-limit window: it
        would be refused, and count against the account's health."""
        state = self.internal_target(upstream_id, ctx.model)
        return state is not None and await self.relay_internal(ctx, state)

    def internal_target(self, upstream_id: str, model: str) -> UpstreamState | None:
        """The account a request of the gateway's own for `model` may go to now, if the router would use it."""
        state = self.pool.get(upstream_id)
        if (
            state is None
            or self.relay is None
            or self.router.unusable_accounts(time.monotonic(), model)[upstream_id] is not None
        ):
            return None
        return state

    async def relay_internal(self, ctx: RequestContext, state: UpstreamState) -> bool:
        """Send a request of the gateway's own to `state`'s account, accounted like any other; True on a 200."""
        assert self.relay is not None  # `internal_target` checked it
        trace = RoutingTrace(stages=[])
        trace.terminal = TerminalDecision(ctx.endpoint, state.upstream.id, (state.upstream.id,))
        result = RelayResult()
        try:
            await self.relay.relay(ctx, RouteDecision((state,), trace), _discard, result)
        except ApiError as error:
            answered_with(result, error)
        except asyncio.CancelledError:
            # The shutdown cancels the gateway's own tasks: the request went out and may be billed, so it is
            # recorded, as a client's request the shutdown ends is (it left no usage record).
            ended_by(result, Outcome.interrupted, SHUTTING_DOWN, answered=result.status != 0)
            self._finish(ctx, result, trace, ADMITTED, self._keep_trace(ctx.request_id, trace))
            raise
        except Exception:
            # A fault of the gateway's, as for a client's request: the upstream may have answered and billed it
            # already (it left no usage record).
            request_log.exception("%s request %s failed in the gateway", ctx.endpoint, ctx.request_id)
            ended_by(result, Outcome.gateway_error, INTERNAL_ERROR, answered=result.status != 0)
        self._finish(ctx, result, trace, ADMITTED, self._keep_trace(ctx.request_id, trace))
        return result.status == 200


async def _discard(message: Message) -> None:
    """The answer to a request the gateway made itself has no client to go to."""

"""The pool's model list: the union of what each upstream's `/v1/models` says, cut to its model globs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from poolgate.api.errors import ApiError, no_upstream, retry_headers, whole_seconds
from poolgate.lifecycle.relay import answer_without_credential, hidden_secret
from poolgate.lifecycle.shape import ShapedRequest
from poolgate.lifecycle.sign import Signer
from poolgate.telemetry.logging import BoundedLog
from poolgate.upstreams.connections import NO_AGENT, read_up_to
from poolgate.upstreams.health import unusable_reason
from poolgate.upstreams.pool import Pool, UpstreamState, serves_model

# Its lines are an upstream's failed answers to a lookup a client asked for: one per request, at any rate.
log = BoundedLog(logging.getLogger("poolgate.models"))

CACHE_SECONDS = 300.0
# A list some account did not answer for (down, or failing) is asked for again this soon: kept for minutes,
# it left that account's models out long after the account was back.
INCOMPLETE_SECONDS = 15.0
RETRIEVED_MAX = 1024
# Accounts asked in turn for a model the list does not name, while none answers.
RETRIEVE_ATTEMPTS = 3
# Upstream lookups of ids the list does not name, per caller and minute (answers remembered are free): an
# id made up for every call would otherwise be an upstream request on a pool account per call.
LOOKUPS_PER_MINUTE = 30
LOOKUP_CALLERS_MAX = 10_000
# Ids that name no model and are no path segment of their own: the HTTP client resolves `/v1/models/..` to
# `/v1/`, and `/v1/models/.` (as `/v1/models/`) is the list.
NOT_AN_ID = frozenset({"", ".", ".."})
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10)
# The most of an account's answer to a model list or lookup that is read (the API's list of every model is a
# few tens of KB): a base_url that serves a large file, or an upstream that never ends its body, filled the
# gateway's memory for as long as FETCH_TIMEOUT let it (GBs over a fast link).
FETCH_CAP = 4 * 1024 * 1024
# The most of an account's answer to the lookup of one model that is read: a model object is a few hundred bytes,
# and up to `RETRIEVED_MAX` answers are remembered, which at `FETCH_CAP` apiece an upstream padding its answers
# would make 4 GiB.
MODEL_CAP = 64 * 1024
# What `_get` returns when the account gave no answer to go by (unreachable, an error other than 404, a body
# that is not JSON): unlike a 404, it says nothing about the model.
UNANSWERED: Any = object()


class ModelCatalog:
    def __init__(self, session: aiohttp.ClientSession, signer: Signer, pool: Pool, retry_after: int = 5) -> None:
        self._session = session
        self._signer = signer
        self._pool = pool
        self._retry_after = retry_after
        # The last list some account answered for; None until one has.
        self._models: list[dict[str, Any]] | None = None
        self._fetched_at = float("-inf")
        self._kept_for = CACHE_SECONDS
        # When the latest fetch began, answered or not (see `models`).
        self._tried_at = float("-inf")
        self._lock = asyncio.Lock()
        # Models retrieved by an id the list does not hold (see `retrieve`): when, and what was found.
        self._retrieved: dict[str, tuple[float, dict[str, Any] | None]] = {}
        # Per caller, when its latest upstream lookups were made (see `LOOKUPS_PER_MINUTE`).
        self._lookups: dict[str, deque[float]] = {}

    def invalidate(self) -> None:
        self._fetched_at = float("-inf")

    async def models(self) -> list[dict[str, Any]]:
        """The pool's list, fetched again once past its time. When no account answers for it, the last list
        one answered for, however old (it is asked for again at the next call), else a 529: an empty list would
        say the pool serves no model at all."""
        arrived = time.monotonic()
        async with self._lock:
            # A caller that waited for a fetch begun after it arrived takes that fetch's outcome: each asking
            # again in turn, callers queued behind a pool that does not answer would wait a timeout apiece.
            if time.monotonic() - self._fetched_at > self._kept_for and self._tried_at < arrived:
                await self._refresh()
            if self._models is None:
                raise no_upstream(self._retry_after, "No upstream account answered for the model list")
            return self._models

    async def _refresh(self) -> None:
        """Ask the accounts for their lists; the merged list replaces the last one when some account answered."""
        now = self._tried_at = time.monotonic()
        enabled = [state for state in self._pool.states() if state.upstream.enabled]
        # An account known to be down (cooling down after failures) is not waited for (up to the fetch
        # timeout, for every caller); one parked or rate-limited still answers its list.
        asked = [state for state in enabled if state.health.healthy or now >= state.health.retry_at]
        answered = [
            models for models in await asyncio.gather(*(self._fetch(state) for state in asked)) if models is not None
        ]
        if not answered and enabled:
            if self._models is not None:
                # Kept, but only what the accounts still enabled may serve (one disabled or removed since, or
                # whose globs changed, is out of it).
                self._models = [
                    model
                    for model in self._models
                    if any(serves_model(state.upstream.models, model["id"]) for state in enabled)
                ]
            return
        merged: dict[str, dict[str, Any]] = {}
        for models in answered:
            for model in models:
                merged.setdefault(model["id"], model)
        self._models = list(merged.values())
        self._fetched_at = time.monotonic()
        # An empty or incomplete list is asked for again soon rather than kept for minutes.
        self._kept_for = CACHE_SECONDS if len(answered) == len(enabled) and self._models else INCOMPLETE_SECONDS

    async def retrieve(self, model_id: str, caller: str) -> dict[str, Any] | None:
        """A model the list does not name as such, e.g. an alias (`claude-sonnet-4-5`, which the API resolves
        to its dated id), asked of the accounts that may serve it, usable ones first, until one answers; the
        answer (found or not) remembered as long as the list. None: no account has it. Raises a 529 when no
        account answered (a down account's silence is no "not found"), and a 429 when the caller made more
        than `LOOKUPS_PER_MINUTE` lookups in the last minute."""
        if model_id in NOT_AN_ID:
            return None
        now = time.monotonic()
        known = self._retrieved.get(model_id)
        if known is not None and now - known[0] <= CACHE_SECONDS:
            return known[1]
        serving = [
            state
            for state in self._pool.states()
            if state.upstream.enabled and serves_model(state.upstream.models, model_id)
        ]
        if not serving:
            return None
        self._count_lookup(caller, now)
        serving.sort(key=lambda state: unusable_reason(state.health, now) is not None)
        path = f"/v1/models/{quote(model_id, safe='')}"
        for state in serving[:RETRIEVE_ATTEMPTS]:
            answer = await self._get(state, path, MODEL_CAP)
            if answer is UNANSWERED:
                continue
            # The account serves the id asked for (its globs took it above): an alias's answer names the dated
            # model it stands for, which globs naming the alias do not take, and is the account's all the same.
            model = answer if isinstance(answer, dict) and isinstance(answer.get("id"), str) else None
            if len(self._retrieved) >= RETRIEVED_MAX:
                self._retrieved.clear()
            self._retrieved[model_id] = (now, model)
            return model
        raise no_upstream(self._retry_after, f"No upstream account answered the lookup of model {model_id}")

    def _count_lookup(self, caller: str, now: float) -> None:
        """Count one upstream lookup against the caller's minute; a 429 when its minute is used up."""
        made = self._lookups.get(caller)
        if made is None:
            if len(self._lookups) >= LOOKUP_CALLERS_MAX:
                self._lookups.clear()
            made = self._lookups[caller] = deque()
        while made and now - made[0] >= 60.0:
            made.popleft()
        if len(made) >= LOOKUPS_PER_MINUTE:
            wait = 60.0 - (now - made[0])
            raise ApiError(
                429,
                f"More than {LOOKUPS_PER_MINUTE} lookups of models the model list does not name in a minute; "
                f"retry in {max(1, whole_seconds(wait))} s",
                "rate_limit_error",
                retry_headers(wait),
            )
        made.append(now)

    async def _fetch(self, state: UpstreamState) -> list[dict[str, Any]] | None:
        """The account's models that its globs take; None when it gave no list."""
        payload = await self._get(state, "/v1/models?limit=1000")
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            return None
        return [
            model
            for model in data
            if isinstance(model, dict)
            and isinstance(model.get("id"), str)
            and serves_model(state.upstream.models, model["id"])
        ]

    async def _get(self, state: UpstreamState, path: str, cap: int = FETCH_CAP) -> Any:
        """The upstream's JSON answer to `GET path`, the account's credential in it `[redacted]`: None for a 404,
        `UNANSWERED` when it gave none to go by (logged), or one over `cap` bytes."""
        upstream = state.upstream
        shaped = ShapedRequest(
            upstream, "GET", f"{upstream.base_url}{path}", (("anthropic-version", "2023-06-01"),), b""
        )
        try:
            signed = self._signer.sign(shaped)
            # Never follow a redirect: aiohttp would send the account's credential to wherever it points.
            async with self._session.get(
                shaped.url,
                headers=signed.headers,
                timeout=FETCH_TIMEOUT,
                allow_redirects=False,
                skip_auto_headers=NO_AGENT,
            ) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    log.warning("upstream %s answered HTTP %d to %s", upstream.id, response.status, path)
                    return UNANSWERED
                body, complete = await read_up_to(response.content, cap)
                if not complete:
                    log.warning("upstream %s answered %s with over %d KiB", upstream.id, path, cap >> 10)
                    return UNANSWERED
                # Without the account's key, as a Messages answer is: a proxy used as a base_url may quote it (in
                # a model's display name), and every caller is shown the list.
                return orjson.loads(answer_without_credential(body, hidden_secret(signed.credential())))
        except Exception as exc:
            log.warning("GET %s of upstream %s failed: %s", path, upstream.id, type(exc).__name__)
            return UNANSWERED

"""The pool's model list: the union of what each upstream's `/v1/models` says, cut to its model globs."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from poolgate.lifecycle.shape import ShapedRequest
from poolgate.lifecycle.sign import Signer
from poolgate.upstreams.pool import Pool, UpstreamState, serves_model

log = logging.getLogger("poolgate.models")

CACHE_SECONDS = 300.0
RETRIEVED_MAX = 1024
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10)


class ModelCatalog:
    def __init__(self, session: aiohttp.ClientSession, signer: Signer, pool: Pool) -> None:
        self._session = session
        self._signer = signer
        self._pool = pool
        self._models: list[dict[str, Any]] = []
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        # Models retrieved by an id the listing does not hold (see `retrieve`): when, and what was found.
        self._retrieved: dict[str, tuple[float, dict[str, Any] | None]] = {}

    def invalidate(self) -> None:
        self._fetched_at = float("-inf")

    async def models(self) -> list[dict[str, Any]]:
        async with self._lock:
            if time.monotonic() - self._fetched_at > CACHE_SECONDS:
                states = [state for state in self._pool.states() if state.upstream.enabled]
                lists = await asyncio.gather(*(self._fetch(state) for state in states))
                merged: dict[str, dict[str, Any]] = {}
                for models in lists:
                    for model in models:
                        merged.setdefault(model["id"], model)
                self._models = list(merged.values())
                # An empty answer is retried soon rather than cached for minutes.
                self._fetched_at = time.monotonic() if self._models else time.monotonic() - CACHE_SECONDS + 5
            return self._models

    async def retrieve(self, model_id: str) -> dict[str, Any] | None:
        """A model the listing does not name as such, e.g. an alias (`claude-sonnet-4-5`, which the API
        resolves to its dated id), asked of an account that may serve it; remembered, found or not, for as
        long as the listing (a caller cannot make the gateway ask upstreams per request)."""
        now = time.monotonic()
        known = self._retrieved.get(model_id)
        if known is not None and now - known[0] <= CACHE_SECONDS:
            return known[1]
        state = next(
            (
                state
                for state in self._pool.states()
                if state.upstream.enabled and serves_model(state.upstream.models, model_id)
            ),
            None,
        )
        answer = await self._get(state, f"/v1/models/{quote(model_id, safe='')}") if state is not None else None
        model = (
            answer
            if isinstance(answer, dict)
            and isinstance(answer.get("id"), str)
            and state is not None
            and serves_model(state.upstream.models, answer["id"])
            else None
        )
        if len(self._retrieved) >= RETRIEVED_MAX:
            self._retrieved.clear()
        self._retrieved[model_id] = (now, model)
        return model

    async def _fetch(self, state: UpstreamState) -> list[dict[str, Any]]:
        payload = await self._get(state, "/v1/models?limit=1000")
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            return []
        return [
            model
            for model in data
            if isinstance(model, dict)
            and isinstance(model.get("id"), str)
            and serves_model(state.upstream.models, model["id"])
        ]

    async def _get(self, state: UpstreamState, path: str) -> Any:
        """The upstream's JSON answer to `GET path`; None when it gives none (logged)."""
        upstream = state.upstream
        shaped = ShapedRequest(
            upstream, "GET", f"{upstream.base_url}{path}", (("anthropic-version", "2023-06-01"),), b""
        )
        try:
            signed = self._signer.sign(shaped)
            # Never follow a redirect: aiohttp would send the account's credential to wherever it points.
            async with self._session.get(
                shaped.url, headers=signed.headers, timeout=FETCH_TIMEOUT, allow_redirects=False
            ) as response:
                if response.status != 200:
                    if response.status != 404:
                        log.warning("upstream %s answered HTTP %d to %s", upstream.id, response.status, path)
                    return None
                return orjson.loads(await response.read())
        except Exception as exc:
            log.warning("GET %s of upstream %s failed: %s", path, upstream.id, type(exc).__name__)
            return None

"""The pool's model list: the union of what each upstream's `/v1/models` says, cut to its model globs."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson

from poolgate.lifecycle.shape import ShapedRequest
from poolgate.lifecycle.sign import Signer
from poolgate.upstreams.pool import Pool, UpstreamState, serves_model

log = logging.getLogger("poolgate.models")

CACHE_SECONDS = 300.0
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10)


class ModelCatalog:
    def __init__(self, session: aiohttp.ClientSession, signer: Signer, pool: Pool) -> None:
        self._session = session
        self._signer = signer
        self._pool = pool
        self._models: list[dict[str, Any]] = []
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

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

    async def _fetch(self, state: UpstreamState) -> list[dict[str, Any]]:
        upstream = state.upstream
        shaped = ShapedRequest(
            upstream,
            "GET",
            f"{upstream.base_url}/v1/models?limit=1000",
            (("anthropic-version", "2023-06-01"),),
            b"",
        )
        try:
            signed = self._signer.sign(shaped)
            # Never follow a redirect: aiohttp would send the account's credential to wherever it points.
            async with self._session.get(
                shaped.url, headers=signed.headers, timeout=FETCH_TIMEOUT, allow_redirects=False
            ) as response:
                if response.status != 200:
                    log.warning("upstream %s answered HTTP %d to /v1/models", upstream.id, response.status)
                    return []
                payload = orjson.loads(await response.read())
        except Exception as exc:
            log.warning("listing models of upstream %s failed: %s", upstream.id, type(exc).__name__)
            return []
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            return []
        return [
            model
            for model in data
            if isinstance(model, dict)
            and isinstance(model.get("id"), str)
            and serves_model(upstream.models, model["id"])
        ]

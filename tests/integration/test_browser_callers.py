"""Browser apps (the TypeScript SDK under `dangerouslyAllowBrowser: true`) reach the gateway across origins
when they send the API's opt-in header, as they reach the API; others get no CORS answers."""

from __future__ import annotations

import aiohttp

from poolgate.store import repo
from tests.conftest import MODEL, RunningGateway, user

ORIGIN = "http://localhost:5173"
FLAG = "anthropic-dangerous-direct-browser-access"
# What a browser's preflight lists for the SDK's request: the names of its headers, not their values.
REQUESTED = f"{FLAG},anthropic-version,content-type,x-api-key,x-stainless-lang,x-stainless-retry-count"


def browser_headers(key: str, **extra: str) -> dict[str, str]:
    return {"origin": ORIGIN, FLAG: "true", "x-api-key": key, "anthropic-version": "2023-06-01", **extra}


async def test_a_browser_preflight_that_announces_the_opt_in_is_answered(gw: RunningGateway) -> None:
    preflight = {"origin": ORIGIN, "access-control-request-method": "POST", "access-control-request-headers": REQUESTED}
    async with aiohttp.ClientSession() as session:
        async with session.options(f"{gw.url}/v1/messages", headers=preflight) as answered:
            assert answered.status == 200, await answered.text()
            assert answered.headers["access-control-allow-origin"] == "*"
            assert "POST" in answered.headers["access-control-allow-methods"]
            assert answered.headers["access-control-allow-headers"] == REQUESTED
        without_flag = {**preflight, "access-control-request-headers": "content-type,x-api-key"}
        async with session.options(f"{gw.url}/v1/messages", headers=without_flag) as refused:
            assert refused.status == 405 and "access-control-allow-origin" not in refused.headers


async def test_answers_to_an_opted_in_browser_let_it_read_them_and_their_retry_advice(gw: RunningGateway) -> None:
    body = {"model": MODEL, "max_tokens": 16, "messages": user()}
    async with aiohttp.ClientSession() as session:
        answers = [
            await session.post(f"{gw.url}/v1/messages", json=body, headers=browser_headers(gw.key)),
            await session.post(f"{gw.url}/v1/messages", json={**body, "stream": True}, headers=browser_headers(gw.key)),
            await session.post(f"{gw.url}/v1/messages", json=body, headers=browser_headers("pg-wrong-0123456789")),
            await session.get(f"{gw.url}/v1/models", headers=browser_headers(gw.key)),
        ]
        for answer in answers:
            await answer.read()
        assert [answer.status for answer in answers] == [200, 200, 401, 200]
        for answer in answers:
            assert answer.headers["access-control-allow-origin"] == "*", answer.headers
            exposed = {name.strip() for name in answer.headers["access-control-expose-headers"].split(",")}
            assert {"request-id", "retry-after", "retry-after-ms", "x-should-retry"} <= exposed
        # Without the opt-in (or from no browser at all) nothing changes.
        plain = await session.post(
            f"{gw.url}/v1/messages", json=body, headers={**browser_headers(gw.key), FLAG: "false"}
        )
        await plain.read()
        assert plain.status == 200 and "access-control-allow-origin" not in plain.headers


async def test_a_browser_app_can_read_its_cost_budget_and_quotas(gw: RunningGateway) -> None:
    """README gives a browser app a key of its own with a budget; the answers' cost, budget and quota headers
    were not exposed to it, so it could not show what it had spent or had left."""
    _, key = repo.create_key(
        gw.gateway.engine,
        "browser-app",
        {"budget_usd": "5", "budget_range": "daily", "quotas": ["requests=60/min", "output_tokens=100000/day"]},
    )
    gw.gateway.reload()
    body = {"model": MODEL, "max_tokens": 16, "messages": user()}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gw.url}/v1/messages", json=body, headers=browser_headers(key, **{"x-poolgate-cost": "1"})
        ) as answer,
    ):
        assert answer.status == 200, await answer.text()
        exposed = {name.strip() for name in answer.headers["access-control-expose-headers"].split(",")}
        limits = {
            name.lower()
            for name in answer.headers
            if name.lower().startswith(
                ("x-poolgate-cost", "x-poolgate-pricing", "x-poolgate-budget", "x-poolgate-quota")
            )
        }
    assert len(limits) == 3 + 3 + 6 and limits <= exposed, limits - exposed

"""Channel billing through the HTTP surface: flat-fee capacity first, its monthly quota, falling back to
metered upstreams or blocking with a 503, month rollover, counters across restarts, cheaper metered first."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from sqlalchemy import select

from poolgate.billing.channel import month_bounds, month_key
from poolgate.billing.config import FlatFeeChannelConfig, MeteredChannelConfig, PerTokenPriceConfig, PriceOverrides
from poolgate.config import AdminConfig, BillingConfig, GatewayConfig, PinConfig, UpstreamConfig
from poolgate.lifecycle.observe import RequestFinished
from poolgate.mock import MockConfig, MockServer, start_mock
from poolgate.mock.config import Fault
from poolgate.store import repo
from poolgate.store.channels import add_counts, load_counters
from poolgate.store.db import flat_fee_counters, open_engine, usage
from tests.conftest import MOCK_KEYS, MODEL, RunningGateway, gateway_config, start_gateway, usage_rows, user

TRACE = {"x-poolgate-trace": "1"}


def flat_fee(**limits: Any) -> FlatFeeChannelConfig:
    return FlatFeeChannelConfig(billing="flat_fee", monthly_fee="100", **limits)


def billing_config(tmp_path: Path, mock_url: str, channel: FlatFeeChannelConfig, **overrides: Any) -> GatewayConfig:
    """up-0 is the flat-fee upstream; up-1 and up-2 are metered API keys."""
    upstreams = tuple(
        UpstreamConfig(id=f"up-{i}", base_url=mock_url, api_key=key, billing=channel if i == 0 else None)
        for i, key in enumerate(MOCK_KEYS)
    )
    return gateway_config(tmp_path, mock_url, upstreams=upstreams, **overrides)


async def served_by(gw: RunningGateway, count: int) -> list[str]:
    """Send `count` requests one after the other; the upstream each was served by."""
    served = []
    async with gw.client() as client:
        for _ in range(count):
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, messages=user(), extra_headers=TRACE
            )
            served.append(raw.headers["x-poolgate-upstream"])
    return served


def last_route(headers: Any) -> dict[str, Any]:
    return json.loads(headers["x-poolgate-route"])


def stage(route: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in route["stages"] if s["name"] == name)


async def where_accounts_stand(
    gw: RunningGateway, admin_token: str
) -> tuple[dict[str, dict[str, Any]], str, tuple[int, dict[str, Any]]]:
    """What an operator and a load balancer see: each account's state in the admin API (by id), the metrics
    text, and `/readyz`'s status and body."""
    async with aiohttp.ClientSession(headers={"x-admin-token": admin_token}) as http:
        async with http.get(f"{gw.url}/admin/upstreams") as response:
            states = {state["id"]: state for state in (await response.json())["upstreams"]}
        async with http.get(f"{gw.url}/metrics") as response:
            metrics = await response.text()
        async with http.get(f"{gw.url}/readyz") as response:
            ready = (response.status, await response.json())
    return states, metrics, ready


def metered(upstreams: Sequence[str]) -> bool:
    return all(upstream in ("up-1", "up-2") for upstream in upstreams)


@pytest.mark.one_window
async def test_flat_fee_capacity_goes_first_then_falls_back_to_metered(tmp_path: Path, mock: MockServer) -> None:
    gw = await start_gateway(billing_config(tmp_path, mock.url, flat_fee(max_requests_per_month=3)))
    try:
        served = await served_by(gw, 6)
        assert served[:3] == ["up-0"] * 3 and metered(served[3:])
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, messages=user(), extra_headers=TRACE
            )
        assert stage(last_route(raw.headers), "billing")["dropped"] == {"up-0": "insufficient_quota"}
        counter = gw.gateway.book.counter("up-0")
        assert counter is not None and counter.requests == 3
        rows = await usage_rows(gw)
        flat = [row for row in rows if row["upstream_id"] == "up-0"]
        assert len(flat) == 3 and {(row["cost_micro_usd"], row["pricing_version"]) for row in flat} == {(0, "flat_fee")}
        assert all(row["cost_micro_usd"] > 0 for row in rows if row["upstream_id"] != "up-0")
    finally:
        await gw.stop()


@pytest.mark.one_window
async def test_a_token_quota_counts_every_token(tmp_path: Path, mock: MockServer) -> None:
    gw = await start_gateway(billing_config(tmp_path, mock.url, flat_fee(max_tokens_per_month=1)))
    try:
        served = await served_by(gw, 3)
        assert served[0] == "up-0" and metered(served[1:])
        counter = gw.gateway.book.counter("up-0")
        assert counter is not None and counter.tokens > 1
    finally:
        await gw.stop()


@pytest.mark.one_window
async def test_block_answers_503_once_the_flat_fee_quota_is_used_up(tmp_path: Path, mock: MockServer) -> None:
    channel = flat_fee(max_requests_per_month=2, on_exhausted="block")
    gw = await start_gateway(billing_config(tmp_path, mock.url, channel))
    try:
        assert await served_by(gw, 2) == ["up-0", "up-0"]
        async with gw.client() as client:
            with pytest.raises(anthropic.InternalServerError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user(), extra_headers=TRACE)
        error = refused.value
        assert error.status_code == 503 and error.body["error"]["type"] == "api_error"  # type: ignore[index]
        assert "up-0" in error.message and "block" in error.message and "1st of the month" in error.message
        # It lasts until the month ends: clients must not retry it (Claude Code retries a 5xx up to 10 times).
        assert error.response.headers["x-should-retry"] == "false"
        _, month_end = month_bounds(month_key(time.time()))
        assert abs(int(error.response.headers["retry-after"]) - (month_end - time.time())) < 60
        # Readiness and the admin view agree: nothing can be served.
        assert gw.gateway.readiness()["ready"] is False
        assert gw.gateway.router.unusable_accounts(time.monotonic()) == {
            "up-0": "insufficient_quota",
            "up-1": "blocked_by_billing",
            "up-2": "blocked_by_billing",
        }
        billing = stage(last_route(error.response.headers), "billing")
        assert billing["dropped"] == {
            "up-0": "insufficient_quota",
            "up-1": "blocked_by_billing",
            "up-2": "blocked_by_billing",
        }
        assert not any(mock.stats.requests_by_key.get(key) for key in MOCK_KEYS[1:])
        rows = await usage_rows(gw)
        assert rows[-1]["status"] == 503 and rows[-1]["upstream_id"] is None
        # No account was tried: not an upstream's error (which alerting on upstream errors would page for).
        assert rows[-1]["outcome"] == "no_upstream" and rows[-1]["attempts"] == 0
    finally:
        await gw.stop()


@pytest.mark.one_window
async def test_a_used_up_fallback_channel_with_no_metered_upstream_for_the_model_refuses_until_the_month_ends(
    tmp_path: Path, mock: MockServer
) -> None:
    """`fallback_to_metered` with no metered upstream serving the model: nothing serves it until the quota
    resets, yet the answer was a 529 with `retry-after: 5`, which Claude Code and the SDKs retry (all month)."""
    upstreams = (
        UpstreamConfig(id="up-0", base_url=mock.url, api_key=MOCK_KEYS[0], billing=flat_fee(max_requests_per_month=1)),
        UpstreamConfig(id="up-1", base_url=mock.url, api_key=MOCK_KEYS[1], models=("claude-other-*",)),
    )
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        assert await served_by(gw, 1) == ["up-0"]
        async with gw.client() as client:
            with pytest.raises(anthropic.InternalServerError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        error = refused.value
        assert error.status_code == 503 and "up-0" in error.message and "no metered upstream" in error.message
        assert error.response.headers["x-should-retry"] == "false"
        _, month_end = month_bounds(month_key(time.time()))
        assert abs(int(error.response.headers["retry-after"]) - (month_end - time.time())) < 60
    finally:
        await gw.stop()


@pytest.mark.one_window
async def test_a_caller_pinned_to_metered_upstreams_is_served_after_a_block_channel_is_used_up(
    tmp_path: Path, mock: MockServer
) -> None:
    """A pin is the operator's say-so: a caller pinned to metered upstreams is served by them also once the
    flat-fee quota is used up under `block` (the pin leaves the flat-fee upstream out before billing sees it),
    while other callers get the 503."""
    pin = PinConfig(caller="metered-*", upstreams=("up-1", "up-2"))
    config = billing_config(tmp_path, mock.url, flat_fee(max_requests_per_month=1, on_exhausted="block"))
    gw = await start_gateway(config.model_copy(update={"routing": config.routing.model_copy(update={"pins": (pin,)})}))
    try:
        _, key = repo.create_key(gw.gateway.engine, "metered-team")
        gw.gateway.reload()
        assert await served_by(gw, 1) == ["up-0"]
        async with gw.client() as client:
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as pinned:
            raw = await pinned.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.headers["x-poolgate-upstream"] in ("up-1", "up-2")
    finally:
        await gw.stop()


@pytest.mark.one_window
async def test_counting_tokens_is_not_refused_by_a_used_up_block_channel(tmp_path: Path, mock: MockServer) -> None:
    # Counting tokens costs nothing and counts against no monthly quota: Claude Code's context view still works
    # while messages are blocked, and counting does not use the quota up.
    channel = flat_fee(max_requests_per_month=1, on_exhausted="block")
    gw = await start_gateway(billing_config(tmp_path, mock.url, channel))
    try:
        async with gw.client() as client:
            for _ in range(3):
                counted = await client.messages.count_tokens(model=MODEL, messages=user())
                assert counted.input_tokens > 0
            assert await served_by(gw, 1) == ["up-0"]
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            counted = await client.messages.count_tokens(model=MODEL, messages=user())
        assert counted.input_tokens > 0
        counter = gw.gateway.book.counter("up-0")
        assert counter is not None and counter.requests == 1
    finally:
        await gw.stop()


@pytest.mark.one_window
async def test_a_flat_fee_upstream_covers_an_unpriced_model_under_a_budget_only_where_it_alone_serves_it(
    tmp_path: Path, mock: MockServer
) -> None:
    """A flat-fee upstream made a model without a price usable under a budget (its requests cost nothing), also
    where metered upstreams that do not price it serve it too: they took it when the flat-fee one was out (a
    failover, its month used up with `fallback_to_metered`) at a cost unknown, and the budget was charged
    nothing. Such a model is refused as unpriced; served by the flat-fee upstream alone (the metered keys do not
    serve it, or a pin sends it to the flat-fee one only), it is allowed."""
    for alone in ("no", "models", "pin"):
        config = billing_config(tmp_path / alone, mock.url, flat_fee(max_requests_per_month=1))
        if alone == "models":  # the metered keys serve priced models only
            upstreams = tuple(
                u if u.id == "up-0" else u.model_copy(update={"models": ("claude-haiku-*",)}) for u in config.upstreams
            )
            config = config.model_copy(update={"upstreams": upstreams})
        elif alone == "pin":
            pin = PinConfig(model="claude-unpriced-*", upstreams=("up-0",))
            config = config.model_copy(update={"routing": config.routing.model_copy(update={"pins": (pin,)})})
        gw = await start_gateway(config)
        try:
            _, key = repo.create_key(gw.gateway.engine, "capped", {"budget_usd": "0.001"})
            gw.gateway.reload()
            async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
                if alone != "no":
                    raw = await client.messages.with_raw_response.create(
                        model="claude-unpriced-9", max_tokens=8, messages=user()
                    )
                    assert raw.headers["x-poolgate-upstream"] == "up-0"
                else:
                    mock.set_fault(MOCK_KEYS[0], Fault(status=500, times=1))  # it would fail over to a metered key
                    with pytest.raises(anthropic.PermissionDeniedError) as refused:
                        await client.messages.create(model="claude-unpriced-9", max_tokens=8, messages=user())
                    assert "'claude-unpriced-9' has no price" in refused.value.message
            assert not any(mock.stats.requests_by_key.get(key) for key in MOCK_KEYS[1:])
        finally:
            await gw.stop()
            mock.clear_faults()


async def test_a_pool_paid_by_the_month_holds_nothing_of_a_budget(tmp_path: Path, mock: MockServer) -> None:
    """A budget reserved each request's list price also where every account that may serve it is paid by the
    month (subscriptions, flat fees), where it costs nothing: a Claude Code request at Opus 5.5's list price
    ($0.64 with max_tokens 32000) was refused under a $0.50 budget as too large, and requests at once were
    told the budget was held, while nothing was ever spent. Where a metered key serves the model too (a
    failover, a used-up month), its list price is still reserved."""
    for pool in ("flat-fee", "with-metered"):
        config = billing_config(tmp_path / pool, mock.url, flat_fee())
        if pool == "flat-fee":
            paid = tuple(u.model_copy(update={"billing": flat_fee()}) for u in config.upstreams)
            config = config.model_copy(update={"upstreams": paid})
        gw = await start_gateway(config)
        try:
            _, key = repo.create_key(gw.gateway.engine, "dev", {"budget_usd": "0.5", "budget_range": "daily"})
            gw.gateway.reload()
            async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
                ask = {"model": "claude-opus-5-5", "max_tokens": 32000, "messages": user(), "timeout": 30}
                if pool == "with-metered":
                    with pytest.raises(anthropic.APIStatusError) as refused:
                        await client.messages.create(**ask)  # type: ignore[call-overload]
                    assert refused.value.status_code == 402 and "Request too large" in refused.value.message
                    continue
                answers = await asyncio.gather(
                    *(client.messages.with_raw_response.create(**ask) for _ in range(3))  # type: ignore[call-overload]
                )
            assert [answer.headers["x-poolgate-budget-spent-usd"] for answer in answers] == ["0.00"] * 3
            rows = await usage_rows(gw)
            assert [(row["status"], row["cost_micro_usd"], row["pricing_version"]) for row in rows] == [
                (200, 0, "flat_fee")
            ] * 3
        finally:
            await gw.stop()


@pytest.mark.one_window
async def test_the_quota_comes_back_at_the_month_boundary(tmp_path: Path, mock: MockServer) -> None:
    gw = await start_gateway(billing_config(tmp_path, mock.url, flat_fee(max_requests_per_month=1)))
    try:
        _, month_end = month_bounds(month_key(gw.gateway.clock()))
        gw.gateway.clock = lambda: month_end - 1  # the last second of the month
        served = await served_by(gw, 2)
        assert served[0] == "up-0" and metered(served[1:])
        gw.gateway.clock = lambda: month_end + 1  # the first seconds of the next month (UTC)
        served = await served_by(gw, 2)
        assert served[0] == "up-0" and metered(served[1:])
        counter = gw.gateway.book.counter("up-0")
        assert counter is not None and counter.month == month_key(month_end) and counter.requests == 1
    finally:
        await gw.stop()


@pytest.mark.one_window
async def test_a_counter_of_an_earlier_month_in_the_store_starts_over(tmp_path: Path, mock: MockServer) -> None:
    config = billing_config(tmp_path, mock.url, flat_fee(max_requests_per_month=2))
    last_year = datetime.now(UTC).year - 1
    add_counts(open_engine(config.store_url()), {"up-0": {"month": f"{last_year}-12", "requests": 2, "tokens": 99}})
    gw = await start_gateway(config)
    try:
        assert await served_by(gw, 2) == ["up-0", "up-0"]
        assert metered(await served_by(gw, 1))
    finally:
        await gw.stop()
    assert load_counters(gw.gateway.engine)["up-0"]["month"] == month_key(gw.gateway.clock())


@pytest.mark.one_window
async def test_counters_survive_a_restart(tmp_path: Path, mock: MockServer) -> None:
    config = billing_config(tmp_path, mock.url, flat_fee(max_requests_per_month=3))
    first = await start_gateway(config)
    try:
        assert await served_by(first, 2) == ["up-0", "up-0"]
    finally:
        await first.stop()  # saves the counters, as SIGTERM does
    assert load_counters(first.gateway.engine)["up-0"]["requests"] == 2
    second = await start_gateway(config, key=first.key)
    try:
        served = await served_by(second, 3)
        assert served[0] == "up-0" and metered(served[1:])
    finally:
        await second.stop()


@pytest.mark.parametrize("limit", ["requests", "tokens"])
@pytest.mark.one_window
async def test_counts_a_crash_did_not_save_are_read_back_from_the_ledger(
    tmp_path: Path, mock: MockServer, limit: str
) -> None:
    """Counters are saved every few seconds, usage records every half second: a gateway killed in between
    left the month's count short of what its ledger holds, and a used-up `block` quota served again after
    the restart. Here the saves are lost altogether (the counter row removed after a clean stop)."""
    channel = (
        flat_fee(max_requests_per_month=2, on_exhausted="block")
        if limit == "requests"
        else flat_fee(max_tokens_per_month=10, on_exhausted="block")  # one request uses it up
    )
    config = billing_config(tmp_path, mock.url, channel)
    first = await start_gateway(config)
    try:
        assert set(await served_by(first, 2 if limit == "requests" else 1)) == {"up-0"}
    finally:
        await first.stop()
    with first.gateway.engine.begin() as conn:
        conn.execute(flat_fee_counters.delete())
    second = await start_gateway(config, key=first.key)
    try:
        async with second.client() as client:
            with pytest.raises(anthropic.InternalServerError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert refused.value.status_code == 503 and "block" in refused.value.message
        # What the restart read back is written as a floor (other instances take it in), not added: a second
        # save leaves it as it is.
        await second.gateway.save_counters()
        stored = load_counters(second.gateway.engine)["up-0"]
        assert stored["requests"] == (2 if limit == "requests" else 1)
        await second.gateway.save_counters()
        assert load_counters(second.gateway.engine)["up-0"] == stored
    finally:
        await second.stop()


@pytest.mark.one_window
async def test_counters_are_saved_periodically_while_serving(tmp_path: Path, mock: MockServer) -> None:
    config = billing_config(tmp_path, mock.url, flat_fee(max_requests_per_month=10))
    config = config.model_copy(
        update={"billing": config.billing.model_copy(update={"counter_save_interval_seconds": 0.05})}
    )
    gw = await start_gateway(config)
    try:
        await served_by(gw, 2)
        for _ in range(100):
            if load_counters(gw.gateway.engine).get("up-0", {}).get("requests") == 2:
                break
            await asyncio.sleep(0.05)
        assert load_counters(gw.gateway.engine)["up-0"]["requests"] == 2
    finally:
        await gw.stop()


async def test_among_metered_upstreams_the_cheaper_one_goes_first(tmp_path: Path, mock: MockServer) -> None:
    pricier = {"*": {"input": "9", "output": "45"}}
    config = gateway_config(tmp_path, mock.url, prices={"upstreams": {"up-1": pricier}})
    gw = await start_gateway(config)
    try:
        served = await served_by(gw, 8)
        assert "up-1" not in served and {"up-0", "up-2"} == set(served)
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, messages=user(), extra_headers=TRACE
            )
        scores = {score["upstream_id"]: score for score in last_route(raw.headers)["scores"]}
        assert scores["up-1"]["cost"] > 0 and "cost" not in scores["up-0"]
    finally:
        await gw.stop()


async def test_a_price_in_another_currency_is_not_taken_for_a_cheaper_one(tmp_path: Path, mock: MockServer) -> None:
    """0.3 credits per Mtok took every request from $3 list price (µcredits compared as µUSD). A price in
    another currency is an unknown price to routing: the list-priced upstream goes first, and between two
    upstreams without a USD price the routing strategy spreads the requests."""
    credits = MeteredChannelConfig.model_validate(
        {"pricing": {"kind": "credits", "per_mtok_input": "0.3", "per_mtok_output": "1.5"}}
    )
    yen = MeteredChannelConfig.model_validate(
        {"pricing": {"kind": "per_token", "input": "450", "output": "2250", "currency": "JPY"}}
    )
    upstreams = (
        UpstreamConfig(id="listed", base_url=mock.url, api_key=MOCK_KEYS[0], models=(MODEL,)),
        UpstreamConfig(id="credits", base_url=mock.url, api_key=MOCK_KEYS[1], billing=credits),
        UpstreamConfig(id="yen", base_url=mock.url, api_key=MOCK_KEYS[2], billing=yen),
    )
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        assert set(await served_by(gw, 4)) == {"listed"}
        async with gw.client() as client:
            served = set()
            for _ in range(4):
                raw = await client.messages.with_raw_response.create(
                    model="claude-haiku-4-5", max_tokens=8, messages=user()
                )
                served.add(raw.headers["x-poolgate-upstream"])
        assert served == {"credits", "yen"}
    finally:
        await gw.stop()


@pytest.mark.one_window
async def test_a_price_by_characters_duration_or_images_is_not_taken_for_the_cheapest(
    tmp_path: Path, mock: MockServer
) -> None:
    """A typical request's tokens cost nothing on a price by characters, by the minute or by the image (it
    counts none of them), so such an upstream took every request from a list-priced one, and a budgeted
    caller was charged the whole reservation of a request whose cost is unknown. Their price is unknown to
    routing: the list-priced upstream goes first, and the caller is charged what its request cost."""
    pricings = {
        "chars": {"kind": "char", "per_million_chars": "1000"},
        "minutes": {"kind": "per_unit", "per_minute": "100"},
        "images": {"kind": "per_unit", "images": {"1024x1024": {"standard": "0.04"}}},
    }
    upstreams = (
        *(
            UpstreamConfig(
                id=name,
                base_url=mock.url,
                api_key=MOCK_KEYS[0],
                billing=MeteredChannelConfig.model_validate({"pricing": pricing}),
            )
            for name, pricing in pricings.items()
        ),
        UpstreamConfig(id="listed", base_url=mock.url, api_key=MOCK_KEYS[1]),
    )
    config = gateway_config(
        tmp_path, mock.url, upstreams=upstreams, billing=BillingConfig(unpriced_under_budget="allow")
    )
    gw = await start_gateway(config)
    try:
        assert set(await served_by(gw, 4)) == {"listed"}
        _, key = repo.create_key(gw.gateway.engine, "capped", {"budget_usd": "1"})
        gw.gateway.reload()
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as capped:
            raw = await capped.messages.with_raw_response.create(
                model=MODEL, max_tokens=4000, messages=user(), extra_headers={"x-poolgate-cost": "1", **TRACE}
            )
        scores = {score["upstream_id"]: score for score in last_route(raw.headers)["scores"]}
        assert "cost" not in scores["listed"] and all(scores[name]["cost"] > 0 for name in pricings)
        assert raw.headers["x-poolgate-upstream"] == "listed"
        principal = gw.gateway.authn.authenticate({b"x-api-key": key.encode()})
        status = gw.gateway.policy.budget_status(principal, None, time.time())
        assert status is not None and status.spent_micro_usd == int(raw.headers["x-poolgate-cost"]) > 0
    finally:
        await gw.stop()


WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search"}
# Channel prices whose tokens cost nothing, so that what a request costs is its web searches alone.
FREE_TOKENS: dict[str, dict[str, Any]] = {
    "tiered": {"kind": "tiered", "tiers": [{"rate": "0"}]},
    "timed": {"kind": "per_unit", "per_minute": "0"},
    "credits": {"kind": "credits", "per_mtok_input": "0", "per_mtok_output": "0", "web_search": "0.02"},
    "credits-unrated": {"kind": "credits", "per_mtok_input": "0", "per_mtok_output": "0"},
    "euro": {"kind": "per_token", "input": "0", "output": "0", "currency": "EUR"},
}


async def test_every_pricing_model_bills_web_searches(tmp_path: Path) -> None:
    """A web search cost nothing on credits, tiered and per-unit channels, and 0.01 EUR on a per-token price
    in euros. Each costs the price's own `web_search`, $0.01 for a USD price that names none; in another
    currency without one, a request that ran a search has an unknown cost (never 0, nor $0.01 taken for
    0.01 of that currency)."""
    models = tuple(f"claude-{name}-1" for name in FREE_TOKENS)
    mock = await start_mock(MockConfig(accept_any_key=True, models=models), host="127.0.0.1", port=0)
    upstreams = tuple(
        UpstreamConfig(
            id=name,
            base_url=mock.url,
            api_key=f"sk-ant-api03-{name}",
            models=(f"claude-{name}-1",),
            billing=MeteredChannelConfig.model_validate({"pricing": pricing}),
        )
        for name, pricing in FREE_TOKENS.items()
    )
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    costs: dict[str, tuple[str, str, str]] = {}
    try:
        async with gw.client() as client:
            for name in FREE_TOKENS:
                asked = {"model": f"claude-{name}-1", "max_tokens": 32, "extra_headers": {"x-poolgate-cost": "1"}}
                plain = await client.messages.with_raw_response.create(messages=user(), **asked)
                searched = await client.messages.with_raw_response.create(messages=user(), tools=[WEB_SEARCH], **asked)
                assert (await searched.parse()).usage.server_tool_use.web_search_requests == 1  # type: ignore[union-attr]
                currency = searched.headers["x-poolgate-cost-currency"]
                costs[name] = (plain.headers["x-poolgate-cost"], searched.headers["x-poolgate-cost"], currency)
    finally:
        await gw.stop()
        await mock.stop()
    assert costs == {
        "tiered": ("0", "10000", "USD"),
        "timed": ("0", "10000", "USD"),
        "credits": ("0", "20000", "credits"),
        "credits-unrated": ("0", "unknown", "credits"),
        "euro": ("0", "unknown", "EUR"),
    }


def tiered_upstream(mock_url: str, first_tier_requests: int) -> tuple[UpstreamConfig]:
    """One metered upstream with a tiered price by requests: $1 each up to `first_tier_requests` in the
    month, $0.50 after."""
    tiered = MeteredChannelConfig.model_validate(
        {
            "pricing": {
                "kind": "tiered",
                "meter": "requests",
                "per": 1,
                "tiers": [{"up_to": first_tier_requests, "rate": "1"}, {"rate": "0.5"}],
            }
        }
    )
    return (UpstreamConfig(id="tiered", base_url=mock_url, api_key=MOCK_KEYS[0], billing=tiered),)


async def test_a_tiered_channel_bills_each_request_by_the_months_cumulative_usage(
    tmp_path: Path, mock: MockServer
) -> None:
    """A metered channel with a tiered price: the first two requests of the month at $1 each, later ones at
    $0.50; the ledger says so, and the month's count survives a restart."""
    upstreams = tiered_upstream(mock.url, first_tier_requests=2)
    config = gateway_config(tmp_path, mock.url, upstreams=upstreams)
    costs: list[int] = []
    for _ in range(2):  # a restart in between
        gw = await start_gateway(config)
        try:
            async with gw.client() as client:
                for _ in range(2):
                    raw = await client.messages.with_raw_response.create(
                        model=MODEL, max_tokens=8, messages=user(), extra_headers={"x-poolgate-cost": "1"}
                    )
                    costs.append(int(raw.headers["x-poolgate-cost"]))
        finally:
            await gw.stop()
    with open_engine(config.store_url()).connect() as conn:
        ledger = [
            row.cost_micro_usd for row in conn.execute(select(usage.c.cost_micro_usd).order_by(usage.c.started_at))
        ]
    assert costs == ledger == [1_000_000, 1_000_000, 500_000, 500_000]


async def test_a_request_that_finishes_in_the_next_month_counts_in_the_month_it_started(
    tmp_path: Path, mock: MockServer
) -> None:
    """A tiered price's request that started in the last second of a month and was answered in the next one
    was priced on the old month's count but counted in the new one's: the new month's first request was
    billed at the second tier. It counts in the month it started in, as its ledger row says."""
    upstreams = tiered_upstream(mock.url, first_tier_requests=1)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        _, month_end = month_bounds(month_key(gw.gateway.clock()))
        gw.gateway.clock = lambda: month_end - 1  # the last second of the month
        mock.set_fault(MOCK_KEYS[0], Fault(ttfb_ms=1000, times=1))
        async with gw.client() as client:

            async def cost() -> int:
                raw = await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, messages=user(), extra_headers={"x-poolgate-cost": "1"}
                )
                return int(raw.headers["x-poolgate-cost"])

            late = asyncio.create_task(cost())
            for _ in range(500):  # its answer on the way
                if mock.stats.in_flight:
                    break
                await asyncio.sleep(0.01)
            gw.gateway.clock = lambda: month_end + 1  # answered in the first seconds of the next month (UTC)
            costs = [await late, await cost()]
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            started = [row.started_at for row in conn.execute(select(usage.c.started_at).order_by(usage.c.started_at))]
        await gw.gateway.save_counters()
        stored = load_counters(gw.gateway.engine)["tiered"]
    finally:
        await gw.stop()
    assert costs == [1_000_000, 1_000_000]  # each the first of its month
    assert [month_key(at) for at in started] == [month_key(month_end - 1), month_key(month_end)]
    assert (stored["month"], stored["requests"]) == (month_key(month_end), 1)


async def test_gateways_sharing_a_store_price_a_tier_by_all_of_their_requests(tmp_path: Path, mock: MockServer) -> None:
    """Each instance priced a tiered channel by its own requests alone: two gateways taking turns each billed
    the month's first four at the first tier's $1, eight in all where the price has four. Each takes in the
    others' counts as it saves its own (every few seconds; here after each request)."""
    upstreams = tiered_upstream(mock.url, first_tier_requests=4)
    # The saves are the test's own, one after each request, not the periodic task's.
    config = gateway_config(
        tmp_path, mock.url, upstreams=upstreams, billing=BillingConfig(counter_save_interval_seconds=3600)
    )
    first = await start_gateway(config)
    second = await start_gateway(config)
    try:
        costs: list[int] = []
        for turn in range(8):
            serving, other = (first, second) if turn % 2 == 0 else (second, first)
            async with serving.client() as client:
                raw = await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, messages=user(), extra_headers={"x-poolgate-cost": "1"}
                )
            costs.append(int(raw.headers["x-poolgate-cost"]))
            for gw in (serving, other):  # its count into the store, then into the other's
                await gw.gateway.save_counters()
        counters = [gw.gateway.book.counter("tiered") for gw in (first, second)]
    finally:
        await first.stop()
        await second.stop()
    assert costs == [1_000_000] * 4 + [500_000] * 4
    assert [(counter.requests if counter else None) for counter in counters] == [8, 8]
    assert load_counters(open_engine(config.store_url()))["tiered"]["requests"] == 8


@pytest.mark.one_window
async def test_a_quota_a_crash_kept_from_the_counter_is_used_up_on_every_instance(
    tmp_path: Path, mock: MockServer
) -> None:
    """A gateway restarted after a crash raises its counter to the ledger's count of the month, but kept the
    raise to itself: another instance sharing the store went on serving a used-up `block` quota (its row
    short of the ledger for as long as both ran). The raise is written as a floor under the stored count."""
    channel = flat_fee(max_requests_per_month=3, on_exhausted="block")
    config = billing_config(tmp_path, mock.url, channel, billing=BillingConfig(counter_save_interval_seconds=3600))
    other = await start_gateway(config)
    try:
        crashed = await start_gateway(config)
        assert await served_by(crashed, 3) == ["up-0"] * 3
        await crashed.stop()
        with crashed.gateway.engine.begin() as conn:  # the counts its crash kept from the store
            conn.execute(flat_fee_counters.delete())
        restarted = await start_gateway(config)
        try:
            for gw in (restarted, other):  # their periodic saves
                await gw.gateway.save_counters()
            for gw in (restarted, other):
                async with gw.client() as client:
                    with pytest.raises(anthropic.InternalServerError) as refused:
                        await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                assert refused.value.status_code == 503
            # Each further start raises it to the same count: a floor, not an increment.
            await restarted.gateway.save_counters()
            assert load_counters(restarted.gateway.engine)["up-0"]["requests"] == 3
        finally:
            await restarted.stop()
    finally:
        await other.stop()


async def test_under_concurrency_the_ledger_records_the_price_the_cost_header_said(
    tmp_path: Path, mock: MockServer
) -> None:
    """Concurrent requests cross a tier boundary while their answers are on the way: each request's ledger
    row holds the very price its `x-poolgate-cost` header told the caller, and the tiers add up."""
    upstreams = tiered_upstream(mock.url, first_tier_requests=5)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        async with gw.client() as client:

            async def told() -> tuple[str, int]:
                raw = await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, messages=user(), extra_headers={"x-poolgate-cost": "1"}
                )
                return raw.headers["request-id"], int(raw.headers["x-poolgate-cost"])

            headers = dict(await asyncio.gather(*(told() for _ in range(12))))
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            ledger = dict(conn.execute(select(usage.c.request_id, usage.c.cost_micro_usd)).all())
    finally:
        await gw.stop()
    assert ledger == headers
    assert sorted(ledger.values()) == [500_000] * 7 + [1_000_000] * 5


async def test_duration_channels_bill_the_request_time_and_char_channels_say_unknown(
    tmp_path: Path, mock: MockServer
) -> None:
    """A per-minute price bills each request's duration (rounded up to its increment); characters are not
    measured on Messages traffic, so a per-character price records the cost as unknown, never as 0."""
    by_time = MeteredChannelConfig.model_validate(
        {"pricing": {"kind": "per_unit", "per_minute": "60", "increment_seconds": "1"}}
    )
    by_char = MeteredChannelConfig.model_validate({"pricing": {"kind": "char", "per_million_chars": "2"}})
    upstreams = (
        UpstreamConfig(id="timed", base_url=mock.url, api_key=MOCK_KEYS[0], billing=by_time),
        UpstreamConfig(id="chars", base_url=mock.url, api_key=MOCK_KEYS[1], billing=by_char),
    )
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        async with gw.client() as client:
            for _ in range(2):  # round-robin: one each
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            rows = {row.upstream_id: row for row in conn.execute(select(usage))}
    finally:
        await gw.stop()
    # $60 a minute in whole seconds: every request (well under a second here) bills its first second, $1.
    assert rows["timed"].cost_micro_usd == 1_000_000 and rows["timed"].pricing_version == "channel:per_unit"
    assert rows["chars"].cost_micro_usd is None and rows["chars"].pricing_version == "channel:char"


@pytest.mark.one_window
async def test_a_budgeted_caller_cannot_use_a_model_an_upstream_priced_by_duration_serves(
    tmp_path: Path, mock: MockServer
) -> None:
    """Nothing bounds how long a request runs (a stream goes on while chunks come), so no estimate bounds its
    cost on a per-minute channel: a $0.10 budget admitted ten parallel requests and spent $2. A budgeted
    caller is refused such a model, as an unpriced one (`billing.unpriced_under_budget: allow` lets it in);
    models that channel does not serve, and callers without a budget, are served as before."""
    by_time = MeteredChannelConfig.model_validate({"pricing": {"kind": "per_unit", "per_minute": "6"}})
    upstreams = (
        UpstreamConfig(id="timed", base_url=mock.url, api_key=MOCK_KEYS[0], billing=by_time, models=(MODEL,)),
        UpstreamConfig(id="plain", base_url=mock.url, api_key=MOCK_KEYS[1]),
    )
    for setting in ("refuse", "allow"):
        config = gateway_config(
            tmp_path / setting,
            mock.url,
            upstreams=upstreams,
            billing=BillingConfig(unpriced_under_budget=setting),
        )
        gw = await start_gateway(config)
        try:
            _, key = repo.create_key(gw.gateway.engine, "capped", {"budget_usd": "0.10"})
            gw.gateway.reload()
            async with (
                anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as capped,
                gw.client() as free,
            ):
                assert (await free.messages.create(model=MODEL, max_tokens=8, messages=user())).content
                assert (await capped.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=user())).content
                if setting == "refuse":
                    with pytest.raises(anthropic.PermissionDeniedError) as refused:
                        await capped.messages.create(model=MODEL, max_tokens=8, messages=user())
                    assert "priced by duration (timed)" in refused.value.message
                    assert "unpriced_under_budget" in refused.value.message
                    assert "the key is valid" in refused.value.message
                else:
                    assert (await capped.messages.create(model=MODEL, max_tokens=8, messages=user())).content
        finally:
            await gw.stop()


@pytest.mark.one_window
async def test_the_admin_api_shows_each_channel_and_its_month(tmp_path: Path, mock: MockServer) -> None:
    """Operators see a flat-fee channel's fee, limits, use this month and what is left, without the database;
    and how a metered one is priced: an upstream with prices of its own is not said to be at list price."""
    config = billing_config(
        tmp_path,
        mock.url,
        flat_fee(max_requests_per_month=5),
        admin=AdminConfig(token="admin-secret-0123456789"),
        prices=PriceOverrides(upstreams={"up-2": {MODEL: PerTokenPriceConfig(input="0.5", output="2")}}),
    )
    gw = await start_gateway(config)
    try:
        assert await served_by(gw, 2) == ["up-0", "up-0"]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{gw.url}/admin/upstreams", headers={"x-admin-token": "admin-secret-0123456789"}) as response,
        ):
            channels = {state["id"]: state["channel"] for state in (await response.json())["upstreams"]}
    finally:
        await gw.stop()
    flat = channels["up-0"]
    assert flat["billing"] == "flat_fee" and flat["monthly_fee_micro"] == 100_000_000 and flat["state"] == "prepaid"
    month = flat["this_month"]
    assert (month["requests"], month["requests_left"], month["fee_per_request_micro"]) == (2, 3, 50_000_000)
    assert channels["up-1"] == {"billing": "metered", "pricing": "catalogue"}
    assert channels["up-2"] == {"billing": "metered", "pricing": "catalogue+overrides"}


@pytest.mark.one_window
async def test_readiness_the_admin_api_and_metrics_call_usable_only_what_the_router_would_use(
    tmp_path: Path, mock: MockServer
) -> None:
    """A flat-fee account whose month is used up, and a disabled one, are not "usable" anywhere an operator
    or a load balancer looks, as the router does not use them; /readyz stays ready while a metered one is."""
    token = "admin-secret-0123456789"
    config = billing_config(tmp_path, mock.url, flat_fee(max_requests_per_month=1), admin=AdminConfig(token=token))
    upstreams = (*config.upstreams[:2], config.upstreams[2].model_copy(update={"enabled": False}))
    gw = await start_gateway(config.model_copy(update={"upstreams": upstreams}))
    try:
        assert await served_by(gw, 2) == ["up-0", "up-1"]
        states, metrics, ready = await where_accounts_stand(gw, token)
    finally:
        await gw.stop()
    assert {upstream_id: state["unusable_reason"] for upstream_id, state in states.items()} == {
        "up-0": "insufficient_quota",
        "up-1": None,
        "up-2": "disabled",
    }
    assert [state["usable"] for state in states.values()] == [False, True, False]
    for upstream_id, value in (("up-0", "0.0"), ("up-1", "1.0"), ("up-2", "0.0")):
        assert f'poolgate_upstream_usable{{kind="anthropic_api_key",upstream="{upstream_id}"}} {value}' in metrics
    assert ready == (200, {"ready": True, "upstreams": 3, "usable": 1, "cooling_down": 0})


@pytest.mark.one_window
async def test_a_used_up_block_channel_blocks_only_the_models_it_serves(tmp_path: Path, mock: MockServer) -> None:
    """A `block` flat fee serving only Opus, its month used up, made /readyz 503 and every metered key
    `blocked_by_billing` in the admin API and the metrics, while the keys answered every Sonnet request: a
    load balancer took the whole gateway out. Only the requests for its own models are refused, and only a
    metered key serving none but those is blocked."""
    token = "admin-secret-0123456789"
    opus = "claude-opus-5"
    block = flat_fee(max_requests_per_month=1, on_exhausted="block")
    upstreams = (
        UpstreamConfig(id="flat", base_url=mock.url, api_key=MOCK_KEYS[0], billing=block, models=("claude-opus-*",)),
        UpstreamConfig(id="opus-key", base_url=mock.url, api_key=MOCK_KEYS[1], models=(opus,)),
        UpstreamConfig(id="any-key", base_url=mock.url, api_key=MOCK_KEYS[2]),
    )
    config = gateway_config(tmp_path, mock.url, upstreams=upstreams, admin=AdminConfig(token=token))
    gw = await start_gateway(config)
    try:
        async with gw.client() as client:
            raw = await client.messages.with_raw_response.create(model=opus, max_tokens=8, messages=user())
            assert raw.headers["x-poolgate-upstream"] == "flat"
            with pytest.raises(anthropic.InternalServerError) as refused:
                await client.messages.create(model=opus, max_tokens=8, messages=user())
            assert refused.value.status_code == 503 and "block" in refused.value.message
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            assert raw.headers["x-poolgate-upstream"] == "any-key"
        reported, metrics, ready = await where_accounts_stand(gw, token)
        states = {upstream_id: state["unusable_reason"] for upstream_id, state in reported.items()}
    finally:
        await gw.stop()
    assert states == {"flat": "insufficient_quota", "opus-key": "blocked_by_billing", "any-key": None}
    for upstream_id, value in (("flat", "0.0"), ("opus-key", "0.0"), ("any-key", "1.0")):
        assert f'poolgate_upstream_usable{{kind="anthropic_api_key",upstream="{upstream_id}"}} {value}' in metrics
    assert ready == (200, {"ready": True, "upstreams": 3, "usable": 1, "cooling_down": 0})


@pytest.mark.one_window
async def test_gateways_sharing_a_store_add_up_their_flat_fee_counts(tmp_path: Path, mock: MockServer) -> None:
    """Two gateways on one store (README "Scaling out") each saved their own count as the month's: the last
    one to save overwrote the other's, and a restart granted the quota again."""
    config = billing_config(tmp_path, mock.url, flat_fee(max_requests_per_month=5))
    first = await start_gateway(config)
    second = await start_gateway(config)
    try:
        assert await served_by(first, 2) == ["up-0"] * 2
        assert await served_by(second, 2) == ["up-0"] * 2
        await first.gateway.save_counters()
        await second.gateway.save_counters()
        assert await served_by(first, 1) == ["up-0"]  # saved again at its stop
    finally:
        await first.stop()
        await second.stop()
    assert load_counters(first.gateway.engine)["up-0"]["requests"] == 5
    restarted = await start_gateway(config)
    try:
        assert metered(await served_by(restarted, 1))  # the month's five are used, by both
    finally:
        await restarted.stop()


@pytest.mark.one_window
async def test_a_save_cancelled_mid_write_is_not_added_again_at_shutdown(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shutdown cancels the periodic save; its thread commits all the same, and the shutdown's own save
    added the same increments again (10 counted, 20 stored)."""
    import poolgate.store.upkeep

    def slow_add(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.5)
        add_counts(*args, **kwargs)

    gw = await start_gateway(billing_config(tmp_path, mock.url, flat_fee(max_requests_per_month=10)))
    try:
        assert await served_by(gw, 3) == ["up-0"] * 3
        monkeypatch.setattr(poolgate.store.upkeep, "add_counts", slow_add)
        periodic = asyncio.create_task(gw.gateway.save_counters())
        await asyncio.sleep(0.1)
        periodic.cancel()
        with pytest.raises(asyncio.CancelledError):
            await periodic
    finally:
        await gw.stop()
    assert load_counters(gw.gateway.engine)["up-0"]["requests"] == 3


async def test_a_cost_in_credits_is_never_told_as_dollars(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A request served on a channel priced in credits: its access log line said `cost_micro=507` like a
    dollar-priced one's (summing the log mixed credits into dollars), and observers read its micro-credits
    as `event.cost_micro_usd` (the README's cost alert reported credits as dollars). The line names the
    currency; the event's USD cost is unknown, as in `poolgate_cost_micro_usd_total`, the amount on its record."""
    credits = MeteredChannelConfig.model_validate(
        {"pricing": {"kind": "credits", "per_mtok_input": "3", "per_mtok_output": "15"}}
    )
    upstreams = (UpstreamConfig(id="credits", base_url=mock.url, api_key=MOCK_KEYS[0], billing=credits),)
    caplog.set_level(logging.INFO, logger="poolgate.access")
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    events: list[RequestFinished] = []
    gw.gateway.observers.add(Recorder(events))
    try:
        async with gw.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        gw.gateway.account_now()
        [line] = [r.getMessage() for r in caplog.records if r.name == "poolgate.access"]
        [event] = events
        cost = event.record.cost_micro_usd
        assert cost and event.record.currency == "credits"
        assert f" cost_micro={cost} currency=credits " in line
        assert event.cost_micro_usd is None
    finally:
        await gw.stop()


class Recorder:
    def __init__(self, events: list[RequestFinished]) -> None:
        self.events = events

    def request_finished(self, event: RequestFinished) -> None:
        self.events.append(event)

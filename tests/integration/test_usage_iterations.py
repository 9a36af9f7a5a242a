"""What an answer's `usage.iterations` reports beyond its top-level usage is billed: a server-side compaction's
tokens (left out of the top level, billed on the request's model) and an advisor's sub-inference (billed at its
own model's rates), in the usage record, the cost and the caller's budget, from JSON answers and streams."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import MODEL, RunningGateway, gateway_config, serve_upstream, start_gateway, usage_rows, user
from tests.integration.test_cost_ledger import budgeted, list_price

ADVISOR = "claude-opus-4-6"
# The top level: the request after its context was compacted (the `message` iteration, counted once).
TOP = {"input_tokens": 23_000, "output_tokens": 500, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
COMPACTION = {
    "type": "compaction",
    "input_tokens": 180_000,
    "output_tokens": 3_000,
    "cache_creation_input_tokens": 1_000,
    "cache_read_input_tokens": 2_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1_000},
}
ADVICE = {
    "type": "advisor_message",
    "model": ADVISOR,
    "input_tokens": 4_000,
    "output_tokens": 600,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
}


class Upstream:
    """Answers every request with `usage` (its top level and iterations), as JSON or a stream as asked."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        asked = await request.json()
        message = {
            "id": "msg_iterations",
            "type": "message",
            "role": "assistant",
            "model": asked["model"],
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": self.usage,
        }
        if not asked.get("stream"):
            return web.json_response(message)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        # The stream's first usage is the top level's prompt; the last carries its cumulative counts and iterations.
        opening = {"input_tokens": self.usage["input_tokens"], "output_tokens": 1}
        events = [
            {"type": "message_start", "message": {**message, "content": [], "usage": opening}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": self.usage},
            {"type": "message_stop"},
        ]
        for event in events:
            await response.write(f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[tuple[Upstream, RunningGateway]]:
    answering = Upstream()
    app = web.Application()
    app.router.add_post("/v1/messages", answering.handle)
    runner, url = await serve_upstream(app)
    gw = await start_gateway(gateway_config(tmp_path, url, keys=("sk-ant-api03-iterations",)))
    try:
        yield answering, gw
    finally:
        await gw.stop()
        await runner.cleanup()


async def ask_both_ways(gw: RunningGateway, client: Any) -> str:
    """One request answered as JSON and one streamed; the JSON answer's cost header."""
    raw = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=32, messages=user(), extra_headers={"x-poolgate-cost": "1"}
    )
    async with client.messages.stream(model=MODEL, max_tokens=32, messages=user()) as stream:
        await stream.get_final_message()
    return str(raw.headers["x-poolgate-cost"])


@pytest.mark.one_window
async def test_a_compaction_and_an_advisor_are_billed_with_the_request(
    upstream: tuple[Upstream, RunningGateway],
) -> None:
    """A compaction that read a 180,000-token conversation, under a top level of 23,000 input tokens, was
    billed as 23,000: its tokens are counted in the request's (record, cost, budget, quotas); an advisor's are billed
    at its model's rates, on top, and kept out of the request's model's token columns."""
    answering, gw = upstream
    answering.usage = {**TOP, "iterations": [COMPACTION, {"type": "message", **TOP}, ADVICE]}
    quotas = ["input_tokens=10000000/day", "output_tokens=1000000/day"]
    principal, client = budgeted(gw, "compacting", budget_usd="50", budget_range="daily", quotas=quotas)
    async with client:
        header = await ask_both_ways(gw, client)
        # Admitted after the two: its quota headers say what they used (a prompt counts its cache writes).
        after = await client.messages.with_raw_response.create(model=MODEL, max_tokens=32, messages=user())
    counted = {
        "input_tokens": 203_000,
        "output_tokens": 3_500,
        "cache_creation_input_tokens": 1_000,
        "cache_creation_1h_input_tokens": 1_000,
        "cache_read_input_tokens": 2_000,
    }
    own = list_price(
        MODEL, {**counted, "cache_creation": {"ephemeral_1h_input_tokens": counted["cache_creation_1h_input_tokens"]}}
    )
    cost = own + list_price(ADVISOR, ADVICE)
    rows = await usage_rows(gw)
    assert [row["stream"] for row in rows] == [False, True, False]
    for row in rows:
        assert {name: row[name] for name in counted} == counted
        assert row["model"] == MODEL and row["cost_micro_usd"] == cost
    assert header == str(cost)
    status = gw.gateway.policy.budget_status(principal, None, time.time())
    assert status is not None and status.spent_micro_usd == 3 * cost
    left = {
        name: int(after.headers[f"x-poolgate-quota-remaining-{name}-per-day"])
        for name in ("input-tokens", "output-tokens")
    }
    assert left == {"input-tokens": 10_000_000 - 2 * 204_000, "output-tokens": 1_000_000 - 2 * 3_500}


async def test_an_advisor_on_a_model_without_a_price_makes_the_cost_unknown(
    upstream: tuple[Upstream, RunningGateway],
) -> None:
    """As an unpriced model's own answer is: never priced as if the advisor had cost nothing."""
    answering, gw = upstream
    answering.usage = {**TOP, "iterations": [{"type": "message", **TOP}, {**ADVICE, "model": "claude-unpriced-9"}]}
    async with gw.client() as client:
        header = await ask_both_ways(gw, client)
    assert header == "unknown"
    rows = await usage_rows(gw)
    assert [row["cost_micro_usd"] for row in rows] == [None, None]
    assert [row["input_tokens"] for row in rows] == [TOP["input_tokens"]] * 2


async def test_an_answer_without_iterations_beyond_its_messages_costs_its_top_level(
    upstream: tuple[Upstream, RunningGateway],
) -> None:
    """`message` iterations are the top level's own (a server tool's loop): counted once, not again."""
    answering, gw = upstream
    answering.usage = {**TOP, "iterations": [{"type": "message", **TOP}]}
    async with gw.client() as client:
        header = await ask_both_ways(gw, client)
    rows = await usage_rows(gw)
    assert [row["input_tokens"] for row in rows] == [TOP["input_tokens"]] * 2
    assert [row["cost_micro_usd"] for row in rows] == [list_price(MODEL, TOP)] * 2
    assert header == str(list_price(MODEL, TOP))

"""The spend ledger through the HTTP surface: a cost row for every finished request, the cost header,
budgets that agree with the ledger, and spend that survives a restart."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from anthropic.types import Message
from sqlalchemy import func, select

from poolgate import app as app_module
from poolgate.app import Gateway
from poolgate.billing import BillableUsage, Catalogue
from poolgate.billing.config import MeteredChannelConfig
from poolgate.config import (
    AdminConfig,
    BillingConfig,
    CallerKeyConfig,
    CallersConfig,
    GatewayConfig,
    StaticKey,
    UpstreamConfig,
)
from poolgate.lifecycle.context import Principal
from poolgate.lifecycle.policy import budget_estimate
from poolgate.mock import Fault, MockServer
from poolgate.mock.responses import ADVICE
from poolgate.store import repo
from poolgate.store.db import usage
from poolgate.store.reports import summarize
from tests.conftest import MOCK_KEYS, MODEL, RunningGateway, gateway_config, start_gateway, usage_rows, user
from tests.integration.test_mock_fidelity import CACHE_WRITE_THEN_READ, streamed
from tests.integration.test_relay_details import broken_upstream

CATALOGUE = Catalogue.load_default()


def list_price(model: str, usage_json: dict[str, Any]) -> int:
    cost = CATALOGUE.cost(model, BillableUsage.from_anthropic(usage_json))
    assert cost.micro_usd is not None
    return cost.micro_usd


def cacheable(text: str, ttl: str | None = None) -> list[dict[str, Any]]:
    control: dict[str, str] = {"type": "ephemeral"}
    if ttl is not None:
        control["ttl"] = ttl
    return [{"role": "user", "content": [{"type": "text", "text": text, "cache_control": control}]}]


async def test_every_answer_gets_a_cost_row_at_the_catalogue_price(gw: RunningGateway) -> None:
    async with gw.client() as client:
        message = await client.messages.create(model=MODEL, max_tokens=32, messages=user())
        async with client.messages.stream(model=MODEL, max_tokens=32, messages=user("again")) as stream:
            streamed = await stream.get_final_message()
    rows = await usage_rows(gw)
    assert [row["stream"] for row in rows] == [False, True]
    for row, answer in zip(rows, (message, streamed), strict=True):
        assert row["cost_micro_usd"] == list_price(MODEL, answer.usage.model_dump()) > 0
        assert row["currency"] == "USD" and row["pricing_version"] == CATALOGUE.version


WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}


async def test_web_searches_are_recorded_and_billed_per_search(gw: RunningGateway) -> None:
    """Claude Code's WebSearch runs Anthropic's server-side web search tool: $10 per 1,000 searches on
    top of the tokens (`usage.server_tool_use.web_search_requests`), in the ledger and its reports."""
    async with gw.client() as client:
        message = await client.messages.create(model=MODEL, max_tokens=32, messages=user(), tools=[WEB_SEARCH])
        async with client.messages.stream(
            model=MODEL, max_tokens=32, messages=user("again"), tools=[WEB_SEARCH]
        ) as stream:
            streamed = await stream.get_final_message()
    for answer in (message, streamed):
        assert [block.type for block in answer.content] == ["server_tool_use", "web_search_tool_result", "text"]
        assert answer.usage.server_tool_use is not None and answer.usage.server_tool_use.web_search_requests == 1
    rows = await usage_rows(gw)
    for row, answer in zip(rows, (message, streamed), strict=True):
        assert row["web_search_requests"] == 1
        tokens_only = {**answer.usage.model_dump(), "server_tool_use": None}
        assert (
            row["cost_micro_usd"]
            == list_price(MODEL, answer.usage.model_dump())
            == list_price(MODEL, tokens_only) + 10_000
        )
    summary = summarize(gw.gateway.engine, "model", None, None)
    assert summary.total["web_search_requests"] == 2


async def leave_at(events: Any, block_type: str) -> None:
    """Read a stream until a block of `block_type` starts, then leave, the answer's text still to come."""
    async for event in events:
        if event.type == "content_block_start" and event.content_block.type == block_type:
            break
    await events.response.aclose()


async def only_row(gw: RunningGateway) -> dict[str, Any]:
    """The one usage record, once written."""
    for _ in range(500):
        rows = await usage_rows(gw)
        if rows:
            break
        await asyncio.sleep(0.02)
    [row] = rows
    return row


async def test_a_stream_left_after_a_web_searchs_results_is_billed_the_search(
    gw: RunningGateway, mock: MockServer
) -> None:
    """A stream's search count comes only in its final usage: a client that left once the search's results had
    come (or an upstream that broke off then) was billed its tokens alone, the search the upstream ran and
    billed free (twenty such streams ran 4 times a $0.05 budget in searches, none refused)."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(tokens_per_second=20))
    async with gw.client() as client:
        events = await client.messages.create(
            model=MODEL, max_tokens=64, messages=user(), tools=[WEB_SEARCH], stream=True
        )
        await leave_at(events, "web_search_tool_result")
    row = await only_row(gw)
    assert (row["outcome"], row["web_search_requests"]) == ("client_disconnected", 1)
    usage = {name: row[name] for name in ("input_tokens", "output_tokens", "cache_read_input_tokens")}
    assert row["cost_micro_usd"] == list_price(MODEL, usage) + 10_000


ADVISOR_MODEL = "claude-opus-4-6"
ADVISOR = {"type": "advisor_20260301", "name": "advisor", "model": ADVISOR_MODEL, "max_uses": 1, "max_tokens": 1024}


def advisor_price(prompt: dict[str, Any]) -> int:
    """What the mock's advisor consultation costs: it reads the whole prompt uncached, on its own model, and
    writes its advice (`mock.responses.ADVICE`)."""
    read = prompt["input_tokens"] + prompt["cache_creation_input_tokens"] + prompt["cache_read_input_tokens"]
    return list_price(ADVISOR_MODEL, {"input_tokens": read, "output_tokens": len(ADVICE)})


async def test_an_advisors_consultation_is_billed_at_its_models_price(gw: RunningGateway) -> None:
    """The advisor tool (Claude Code's /advisor): the executor consults an Opus advisor mid-answer, and its
    sub-inference, reported in the usage's `iterations`, is billed at Opus's rates on top of the executor's
    tokens, in a JSON answer and a stream (where only the final usage reports it)."""
    async with gw.client() as client:
        answer = await client.beta.messages.create(
            model=MODEL, max_tokens=32, messages=user(), tools=[ADVISOR], betas=["advisor-tool-2026-03-01"]
        )
        assert [block.type for block in answer.content] == ["server_tool_use", "advisor_tool_result", "text"]
        async with client.beta.messages.stream(
            model=MODEL, max_tokens=32, messages=user("again"), tools=[ADVISOR], betas=["advisor-tool-2026-03-01"]
        ) as stream:
            streamed_answer = await stream.get_final_message()
    rows = await usage_rows(gw)
    for row, message in zip(rows, (answer, streamed_answer), strict=True):
        tokens = {name: row[name] for name in ("input_tokens", "output_tokens", "cache_creation_input_tokens")}
        prompt = {**tokens, "cache_read_input_tokens": row["cache_read_input_tokens"]}
        assert row["output_tokens"] == message.usage.output_tokens
        assert row["cost_micro_usd"] == list_price(MODEL, prompt) + advisor_price(prompt), row["pricing_version"]


async def test_a_stream_left_after_an_advisors_advice_has_an_unknown_cost_charged_its_reservation(
    gw: RunningGateway, mock: MockServer
) -> None:
    """An advisor's tokens come only in a stream's final usage: a client that left once the advice had come
    (Claude Code's Esc mid-answer) was billed the executor's turn alone, the Opus consultation free, to its
    budget too. Its cost is unknown now (`usage-incomplete`), and its budget is charged what the request reserved,
    which holds the consultation."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(tokens_per_second=20))
    principal, client = budgeted(gw, "advised", budget_usd="5")
    async with client:
        events = await client.beta.messages.create(
            model=MODEL,
            max_tokens=64,
            messages=user(),
            tools=[ADVISOR],
            betas=["advisor-tool-2026-03-01"],
            stream=True,
        )
        await leave_at(events, "advisor_tool_result")
    row = await only_row(gw)
    assert (row["outcome"], row["cost_micro_usd"], row["pricing_version"]) == (
        "client_disconnected",
        None,
        "usage-incomplete",
    )
    prompt = {name: row[name] for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")}
    # The reservation: the prompt and max_tokens at the executor's list price, and the consultation at Opus's.
    assert row["charged_micro_usd"] > list_price(MODEL, {**prompt, "output_tokens": 64}) + advisor_price(prompt)
    status = gw.gateway.policy.budget_status(principal, None, time.time())
    assert status is not None and status.spent_micro_usd == row["charged_micro_usd"]


# Fast mode's model, and a web search to show that a search's fee is not a token rate the premiums multiply.
FAST_MODEL = "claude-opus-4-6"


@pytest.mark.parametrize(
    ("modes", "percent", "version"),
    [
        ({"speed": "fast"}, 600, "+speed:fast"),
        ({"inference_geo": "us"}, 110, "+inference_geo:us"),
        ({"speed": "fast", "inference_geo": "us"}, 660, "+speed:fast+inference_geo:us"),
    ],
)
async def test_fast_mode_and_us_only_inference_are_billed_at_their_premiums(
    gw: RunningGateway, modes: dict[str, str], percent: int, version: str
) -> None:
    """An answer whose usage says `speed: "fast"` (6× every token rate) or `inference_geo: "us"` (1.1×) was
    billed at the standard rates: a fast Opus 4.6 turn cost its caller's budget, the ledger and the cost
    header a sixth of what the account was billed."""
    async with gw.client() as client:
        fields: dict[str, Any] = {"model": FAST_MODEL, "max_tokens": 32, "tools": [WEB_SEARCH]}
        standard = await client.messages.create(**fields, messages=user())
        raw = await client.messages.with_raw_response.create(
            **fields, messages=user(), extra_body=modes, extra_headers={"x-poolgate-cost": "1"}
        )
        async with client.messages.stream(**fields, messages=user(), extra_body=modes) as stream:
            streamed = await stream.get_final_message()
    fast = await raw.parse()
    for answer in (fast, streamed):
        assert answer.usage.model_dump(exclude_none=True).items() >= modes.items()
        assert answer.usage.model_dump(include=set(PROMPT_AND_OUTPUT)) == standard.usage.model_dump(
            include=set(PROMPT_AND_OUTPUT)
        )
    tokens = list_price(FAST_MODEL, {**standard.usage.model_dump(), "server_tool_use": None})
    expected = (tokens * percent + 50) // 100 + 10_000  # rounded half up; the search's fee as it is
    rows = await usage_rows(gw)
    assert [row["cost_micro_usd"] for row in rows] == [tokens + 10_000, expected, expected]
    assert raw.headers["x-poolgate-cost"] == str(expected)
    assert [row["pricing_version"] for row in rows] == [CATALOGUE.version] + [CATALOGUE.version + version] * 2
    assert raw.headers["x-poolgate-pricing-version"] == CATALOGUE.version + version


async def test_a_fast_turn_on_a_model_whose_fast_premium_is_not_known_has_an_unknown_cost(gw: RunningGateway) -> None:
    """Fast mode's premium is the model's own (6× on Opus 4.6 and 4.7, not the same elsewhere): a fast answer of
    a model whose price does not say it is of unknown cost, as an unpriced model's is, never the plain rates nor
    another model's 6×."""
    async with gw.client() as client:
        raw = await client.messages.with_raw_response.create(
            model="claude-opus-4-8",
            max_tokens=16,
            messages=user(),
            extra_body={"speed": "fast"},
            extra_headers={"x-poolgate-cost": "1"},
        )
    assert raw.headers["x-poolgate-cost"] == "unknown"
    [row] = await usage_rows(gw)
    assert row["cost_micro_usd"] is None and row["pricing_version"] == CATALOGUE.version + "+speed:fast"


async def test_an_unpriced_model_is_recorded_as_unknown_never_as_zero(gw: RunningGateway) -> None:
    async with gw.client() as client:
        raw = await client.messages.with_raw_response.create(
            model="claude-unpriced-9", max_tokens=16, messages=user(), extra_headers={"x-poolgate-cost": "1"}
        )
    assert raw.headers["x-poolgate-cost"] == "unknown"
    [row] = await usage_rows(gw)
    assert row["status"] == 200 and row["output_tokens"] > 0
    assert row["cost_micro_usd"] is None and row["pricing_version"] == CATALOGUE.version


async def test_one_hour_cache_writes_are_billed_at_the_one_hour_rate(gw: RunningGateway) -> None:
    prompt = "A long and stable system of instructions to cache. " * 120
    async with gw.client() as client:
        message = await client.messages.create(model=MODEL, max_tokens=16, messages=cacheable(prompt, "1h"))
    [row] = await usage_rows(gw)
    assert row["cache_creation_input_tokens"] == row["cache_creation_1h_input_tokens"] > 0
    price = CATALOGUE.price_for(MODEL)
    assert price is not None and price.rates.cache_write_1h > price.rates.cache_write_5m
    assert row["cost_micro_usd"] == list_price(MODEL, message.usage.model_dump())
    as_five_minute = BillableUsage(
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        cache_creation_5m=row["cache_creation_input_tokens"],
    )
    assert row["cost_micro_usd"] > (CATALOGUE.cost(MODEL, as_five_minute).micro_usd or 0)


PROMPT_AND_OUTPUT = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")


def recorded(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in PROMPT_AND_OUTPUT}


async def test_a_streamed_answer_that_writes_and_reads_the_cache_is_recorded_as_the_client_saw_it(
    tmp_path: Path, mock: MockServer
) -> None:
    """message_delta repeats message_start's prompt counts (its usage is cumulative, as the API's): the
    record and its cost are the usage the client's SDK made of the two, each count once."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1]))  # one account: one cache
    try:
        async with gw.client() as client:
            answers = [
                await streamed(client, model=MODEL, max_tokens=16, system=system, messages=user())
                for system in CACHE_WRITE_THEN_READ
            ]
        rows = await usage_rows(gw)
    finally:
        await gw.stop()
    for row, (_, delta, final) in zip(rows, answers, strict=True):
        seen = final.usage
        assert delta.cache_creation_input_tokens == seen.cache_creation_input_tokens  # message_delta carried them
        assert recorded(row) == {name: getattr(seen, name) for name in PROMPT_AND_OUTPUT}
        assert seen.cache_creation is not None
        assert row["cache_creation_1h_input_tokens"] == seen.cache_creation.ephemeral_1h_input_tokens
        assert row["cost_micro_usd"] == list_price(MODEL, seen.model_dump()) > 0
    written, read = rows
    assert read["cache_read_input_tokens"] == written["cache_creation_input_tokens"] > 4000
    assert read["input_tokens"] and read["cache_creation_input_tokens"]


# An answer's cumulative usage, as message_delta carries it.
DELTA_USAGE = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 3000,
    "cache_read_input_tokens": 40000,
    "output_tokens": 77,
}


def upstream_stream(start_usage: dict[str, int] | None) -> bytes:
    """A streamed answer whose message_start has `start_usage` (none at all for None) and whose
    message_delta has `DELTA_USAGE`, as raw HTTP."""
    message = {"id": "msg_raw", "type": "message", "role": "assistant", "model": MODEL, "content": []}
    if start_usage is not None:
        message["usage"] = start_usage
    events = [
        ("message_start", {"message": message}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "hello"}}),
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": DELTA_USAGE}),
        ("message_stop", {}),
    ]
    body = b"".join(
        b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps({"type": name, **data})) for name, data in events
    )
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(body)
    return head + body


@pytest.mark.parametrize(
    "start_usage",
    [
        None,
        {"output_tokens": 1},
        {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1},
        {**DELTA_USAGE, "output_tokens": 1},
    ],
    ids=["no-usage", "no-prompt-counts", "zero-prompt-counts", "repeated"],
)
async def test_message_deltas_prompt_counts_are_recorded_once_whatever_message_start_said(
    tmp_path: Path, start_usage: dict[str, int] | None
) -> None:
    """message_start's prompt counts missing, zero, or the same as message_delta's: the record and its cost
    are message_delta's cumulative usage, neither message_start's zeros nor the sum of the two."""
    server, url = await broken_upstream(upstream_stream(start_usage))
    upstreams = (UpstreamConfig(id="raw", base_url=url, api_key="sk-raw"),)
    gw = await start_gateway(gateway_config(tmp_path, url, upstreams=upstreams))
    try:
        async with (
            gw.client() as client,
            client.messages.with_streaming_response.create(
                model=MODEL, max_tokens=100, messages=user(), stream=True
            ) as answer,
        ):
            seen = b"".join([chunk async for chunk in answer.iter_bytes()])
        assert b'"message_stop"' in seen
        [row] = await usage_rows(gw)
    finally:
        await gw.stop()
        server.close()
    assert recorded(row) == DELTA_USAGE
    assert row["cost_micro_usd"] == list_price(MODEL, DELTA_USAGE) > 0


async def test_the_cost_header_is_sent_when_asked_for_json_answers_only(gw: RunningGateway) -> None:
    ask = {"x-poolgate-cost": "1"}
    async with gw.client() as client:
        plain = await client.messages.with_raw_response.create(model=MODEL, max_tokens=16, messages=user())
        asked = await client.messages.with_raw_response.create(
            model=MODEL, max_tokens=16, messages=user(), extra_headers=ask
        )
        message = await asked.parse()
        async with client.messages.with_streaming_response.create(
            model=MODEL, max_tokens=16, messages=user(), stream=True, extra_headers=ask
        ) as streamed:
            streamed_headers = streamed.headers
            async for _ in streamed.iter_bytes():
                pass
    assert "x-poolgate-cost" not in plain.headers
    assert message.content and asked.headers["x-poolgate-cost-currency"] == "USD"
    assert asked.headers["x-poolgate-pricing-version"] == CATALOGUE.version
    # Streams: the cost is known only at the end, after the headers; the usage record has it.
    assert "x-poolgate-cost" not in streamed_headers
    rows = await usage_rows(gw)
    assert (
        int(asked.headers["x-poolgate-cost"])
        == rows[1]["cost_micro_usd"]
        == list_price(MODEL, message.usage.model_dump())
    )
    assert rows[2]["cost_micro_usd"] and rows[2]["stream"] is True


async def test_a_price_alias_of_the_config_is_in_the_pricing_version(tmp_path: Path, mock: MockServer) -> None:
    """`prices.aliases` priced a model as Opus while its pricing version said the catalogue's, as if at list
    price: an alias of the config is an override, whose digest the version carries, as a model price's does."""
    config = gateway_config(tmp_path, mock.url, prices={"aliases": {"claude-haiku-9": "claude-opus-4-5"}})
    gw = await start_gateway(config)
    ask = {"x-poolgate-cost": "1"}
    try:
        async with gw.client() as client:
            aliased = await client.messages.with_raw_response.create(
                model="claude-haiku-9", max_tokens=16, messages=user(), extra_headers=ask
            )
            listed = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=16, messages=user(), extra_headers=ask
            )
        rows = await usage_rows(gw)
    finally:
        await gw.stop()
    version = aliased.headers["x-poolgate-pricing-version"]
    assert version.startswith(f"{CATALOGUE.version}+cfg.")
    answered = await aliased.parse()
    assert int(aliased.headers["x-poolgate-cost"]) == list_price("claude-opus-4-5", answered.usage.model_dump())
    assert listed.headers["x-poolgate-pricing-version"] == CATALOGUE.version
    assert [row["pricing_version"] for row in rows] == [version, CATALOGUE.version]


async def test_a_claude_model_priced_in_the_config_by_input_and_output_reads_its_cache_at_a_tenth(
    tmp_path: Path, mock: MockServer
) -> None:
    """README's advice for a model newer than the catalogue (`prices.models`, input and output at least) billed
    its cache reads and writes at the input rate: Claude Code's turns, mostly cache reads, at ~10 times their
    price, and budgets spent as fast."""
    rates = {"input": "10", "output": "50"}
    config = gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1], prices={"models": {"claude-unpriced-9": rates}})
    gw = await start_gateway(config)
    try:
        async with gw.client() as client:
            answers = [
                await client.messages.with_raw_response.create(
                    model="claude-unpriced-9",
                    max_tokens=16,
                    system=system,  # type: ignore[arg-type]
                    messages=user(),
                    extra_headers={"x-poolgate-cost": "1"},
                )
                for system in CACHE_WRITE_THEN_READ
            ]
            usages = [(await answer.parse()).usage for answer in answers]
        rows = await usage_rows(gw)
    finally:
        await gw.stop()
    assert usages[1].cache_read_input_tokens and usages[1].cache_creation_input_tokens
    for answer, used, row in zip(answers, usages, rows, strict=True):
        # µUSD at $10 / $12.50 / $1 / $50 per Mtok, in tenths, rounded half up once.
        tenths = (
            used.input_tokens * 100
            + (used.cache_creation_input_tokens or 0) * 125
            + (used.cache_read_input_tokens or 0) * 10
            + used.output_tokens * 500
        )
        assert int(answer.headers["x-poolgate-cost"]) == row["cost_micro_usd"] == (tenths + 5) // 10


async def test_errors_cost_nothing_and_say_so(gw: RunningGateway, mock: MockServer) -> None:
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(status=400, times=1))
    async with gw.client() as client:
        with pytest.raises(anthropic.BadRequestError) as error:
            await client.messages.create(
                model=MODEL, max_tokens=16, messages=user(), extra_headers={"x-poolgate-cost": "1"}
            )
    assert error.value.response.headers["x-poolgate-cost"] == "0"
    [row] = await usage_rows(gw)
    assert row["status"] == 400 and row["cost_micro_usd"] == 0


STATIC_KEY, INTERNAL_KEY = "team-ci-static-0042", "svc-billing-internal-7731"
# A JWT's shape (header.payload.signature, the header's base64url starting "eyJ"): a caller's token pasted as the model.
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLW9mLWFsaWNlcy10b2tlbg"
UPSTREAM_KEY = "sk-ant-api03-" + "x" * 93 + "AA"  # a real key's 108 characters
SHORT_UPSTREAM_KEY = "sk-ant-api03-mock-key-1"  # a key's shape, shorter than a model id may be: the demo's keys
# The gateway's own secrets, of no key's shape: an account's key (a proxy's) and the admin token.
ACCOUNT_KEY, ADMIN_TOKEN = "proxy-account-key-0042", "Jei_NXh_Xk8lnws1_sW4YNN9-QzUmrC5"


@pytest.mark.parametrize(
    "pasted",
    ["gateway key", UPSTREAM_KEY, SHORT_UPSTREAM_KEY, STATIC_KEY, INTERNAL_KEY, TOKEN, ACCOUNT_KEY, ADMIN_TOKEN],
)
async def test_a_credential_sent_as_the_model_is_refused_and_not_kept_in_the_usage_record(
    tmp_path: Path, mock: MockServer, pasted: str
) -> None:
    """A key pasted where the model goes (ANTHROPIC_MODEL set to it) was kept in plain text as the request's
    model, in the store (where gateway keys are kept hashed, upstream keys encrypted) and in what `poolgate
    usage --by model` and `route last` show of it; the log line said it as `[redacted]`. And it was sent on: a
    gateway key reached the upstream, and came back in its 404. It is the client's mistake, said as such. The
    config file's keys may have any shape (a secret store's `team-ci-static-0042`), and a JWT none of a gateway
    key's: only keys shaped like a gateway or an Anthropic key were refused."""
    config = gateway_config(
        tmp_path,
        mock.url,
        keys=(*MOCK_KEYS, ACCOUNT_KEY),
        callers=CallersConfig(internal_keys=(CallerKeyConfig(name="billing", key=INTERNAL_KEY),)),
        admin=AdminConfig(token=ADMIN_TOKEN),
    ).model_copy(update={"keys": (StaticKey(name="ci", key=STATIC_KEY),)})
    gw = await start_gateway(config)
    secret = gw.key if pasted == "gateway key" else pasted
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.BadRequestError) as refused:
                await client.messages.create(model=secret, max_tokens=16, messages=user())
            with pytest.raises(anthropic.BadRequestError) as looked_up:  # nor is it looked up as a model
                await client.models.retrieve(secret)
        for error in (refused.value, looked_up.value):
            said = error.body["error"]["message"]  # type: ignore[index]
            assert "that is a credential" in said and secret not in said
        assert mock.stats.requests_total == 0
        [row] = await usage_rows(gw)
        assert secret not in row["model"] and row["model"].endswith("[redacted]")
    finally:
        await gw.stop()


# An identity provider's token and a secret store's key as long as they come: longer than a model id may be.
LONG_TOKEN = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiJhbGljZUBleGFtcGxlLmNvbSIsImF1ZCI6InBvb2xnYXRlIiwiaXNzIjoiaHR0cHM6Ly9pZHAuZXhhbXBsZS5jb20ifQ."
    + "c"
    * 342
)
LONG_STATIC_KEY = "vault-" + "k" * 150


@pytest.mark.parametrize("pasted", [LONG_TOKEN, LONG_STATIC_KEY])
async def test_a_credential_longer_than_a_model_id_sent_as_the_model_is_not_kept_in_part(
    tmp_path: Path, mock: MockServer, pasted: str
) -> None:
    """Refused for its length, its record kept the first 128 characters of it: a token's claims, most of a key."""
    config = gateway_config(tmp_path, mock.url).model_copy(
        update={"keys": (StaticKey(name="vault", key=LONG_STATIC_KEY),)}
    )
    gw = await start_gateway(config)
    try:
        async with gw.client() as client:
            with pytest.raises(anthropic.BadRequestError):
                await client.messages.create(model=pasted, max_tokens=16, messages=user())
        [row] = await usage_rows(gw)
        assert row["model"] == "[redacted]"
    finally:
        await gw.stop()


def budgeted(gw: RunningGateway, name: str, **claims: Any) -> tuple[Principal, anthropic.AsyncAnthropic]:
    row, key = repo.create_key(gw.gateway.engine, name, claims)
    gw.gateway.reload()
    principal = gw.gateway.authn.authenticate({b"x-api-key": key.encode()})
    assert principal.id == row.id
    return principal, anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0)


def ledger_spend(gw: RunningGateway, principal_id: str) -> int:
    with gw.gateway.engine.connect() as conn:
        total = conn.execute(
            select(func.sum(usage.c.cost_micro_usd)).where(usage.c.principal_id == principal_id)
        ).scalar_one()
    return int(total or 0)


async def test_accounts_all_at_a_discount_reserve_their_own_price_not_the_list_price(
    tmp_path: Path, mock: MockServer
) -> None:
    """A budget reserved at list price at least, also where every account serving the model has a lower price
    of its own (a negotiated discount, a self-hosted upstream): a $0.50 budget refused an Opus 5.5 request
    ($0.64 at list price, $0.32 at half) as too large. Where an account at list price may serve it too, the
    list price is still reserved."""
    half = {"input": "2", "output": "10"}  # Opus 5.5 at half its list price (4 / 20)
    ask = {"model": "claude-opus-5-5", "max_tokens": 32000, "messages": user(), "timeout": 30}
    for pool in ("discounted", "with-list-price"):
        prices = {"upstreams": {"up-0": {"*": half}, "up-1": {"claude-opus-5-5": half}}}
        keys = MOCK_KEYS[:2] if pool == "discounted" else MOCK_KEYS
        gw = await start_gateway(gateway_config(tmp_path / pool, mock.url, keys=keys, prices=prices))
        try:
            _, client = budgeted(gw, "dev", budget_usd="0.5", budget_range="daily")
            async with client:
                if pool == "with-list-price":
                    with pytest.raises(anthropic.APIStatusError) as refused:
                        await client.messages.create(**ask)  # type: ignore[call-overload]
                    assert refused.value.status_code == 402 and "Request too large" in refused.value.message
                    continue
                raw = await client.messages.with_raw_response.create(**ask)  # type: ignore[call-overload]
                message = await raw.parse()
            [row] = await usage_rows(gw)
        finally:
            await gw.stop()
        listed = list_price("claude-opus-5-5", message.usage.model_dump())
        assert 2 * row["cost_micro_usd"] == listed > 0


@pytest.mark.one_window
async def test_the_ledger_adds_up_to_the_budget_spent_and_survives_a_restart(tmp_path: Path, mock: MockServer) -> None:
    config: GatewayConfig = gateway_config(tmp_path, mock.url)
    first = await start_gateway(config)
    try:
        principal, client = budgeted(first, "metered", budget_usd="5", budget_range="daily", budget_scope="per_account")
        async with client:
            for index in range(4):
                await client.messages.create(
                    model=MODEL,
                    max_tokens=24,
                    messages=user(f"turn {index}"),
                    extra_headers={"x-claude-code-session-id": "s1"},
                )
            await asyncio.gather(
                *(client.messages.create(model=MODEL, max_tokens=24, messages=user(f"parallel {i}")) for i in range(12))
            )
            async with client.messages.stream(model=MODEL, max_tokens=24, messages=user("stream")) as stream:
                await stream.get_final_message()
        await first.gateway.flush_usage()
        spent = first.gateway.policy.budget_status(principal, None, time.time())
        assert spent is not None and spent.reserved_micro_usd == 0 and spent.in_flight == 0
        assert spent.spent_micro_usd == ledger_spend(first, principal.id) > 0
    finally:
        await first.stop()

    second = await start_gateway(config, key=first.key)
    try:
        again = second.gateway.policy.budget_status(principal, None, time.time())
        assert again is not None and again.spent_micro_usd == spent.spent_micro_usd
    finally:
        await second.stop()


@pytest.mark.one_window
async def test_many_parallel_requests_never_overspend_a_budget(gw: RunningGateway) -> None:
    """Admission reserves an upper bound of each request's cost, so a burst cannot spend past the budget:
    some requests are refused (429 while the others' reservations hold the budget, 402 once it is spent) and
    what the others spent stays within it."""
    limit = 2_000  # µUSD: a handful of these requests
    principal, client = budgeted(gw, "burst", budget_micro_usd=limit, budget_range="daily")
    async with client:
        results = await asyncio.gather(
            *(client.messages.create(model=MODEL, max_tokens=24, messages=user(f"burst {i}")) for i in range(40)),
            return_exceptions=True,
        )
    refused = [r for r in results if isinstance(r, anthropic.APIStatusError)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert refused and answered and len(refused) + len(answered) == 40
    assert {error.status_code for error in refused} <= {402, 429}
    status = gw.gateway.policy.budget_status(principal, None, time.time())
    assert status is not None and status.reserved_micro_usd == 0
    await gw.gateway.flush_usage()
    assert status.spent_micro_usd == ledger_spend(gw, principal.id) <= limit


@pytest.mark.one_window
async def test_a_budget_reserves_the_premium_of_a_fast_request(gw: RunningGateway) -> None:
    """A budget's estimate is an upper bound of the cost: a request asking for fast mode reserves 6× the list
    rates, as it is charged (it reserved the standard rates, so a burst of them could overspend the budget
    fivefold)."""
    principal, client = budgeted(gw, "fast", budget_micro_usd=3_000, budget_range="daily")
    fields: dict[str, Any] = {"model": FAST_MODEL, "max_tokens": 32, "messages": user()}
    async with client:
        standard = await client.messages.create(**fields)
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(**fields, extra_body={"speed": "fast"})
    assert standard.usage.output_tokens > 0
    assert refused.value.status_code == 402 and refused.value.type == "billing_error"
    status = gw.gateway.policy.budget_status(principal, None, time.time())
    assert status is not None and 0 < status.spent_micro_usd < 3_000 / 6


@pytest.mark.one_window
async def test_a_budget_set_while_the_gateway_runs_counts_what_was_spent_before_it(gw: RunningGateway) -> None:
    """Spend is kept for every caller, budget or not: a budget given to a key later in its range counts what
    the key spent before, at once, as it would after a restart."""
    row, key = repo.create_key(gw.gateway.engine, "late-budget", {})
    gw.gateway.reload()
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
        for index in range(3):
            await client.messages.create(model=MODEL, max_tokens=24, messages=user(f"before {index}"))
        await gw.gateway.flush_usage()
        spent_before = ledger_spend(gw, row.id)
        assert spent_before > 0
        repo.set_key_settings(
            gw.gateway.engine, "late-budget", {"budget_micro_usd": spent_before, "budget_range": "daily"}
        )
        gw.gateway.reload()
        principal = gw.gateway.authn.authenticate({b"x-api-key": key.encode()})
        status = gw.gateway.policy.budget_status(principal, None, time.time())
        assert status is not None and status.spent_micro_usd == spent_before
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(model=MODEL, max_tokens=24, messages=user("after"))
    assert refused.value.status_code == 402


@pytest.mark.one_window
async def test_a_request_of_unknown_cost_is_charged_its_reservation(tmp_path: Path, mock: MockServer) -> None:
    """A channel priced by characters never knows a request's cost: charged as 0, a caller capped at a tenth
    of a cent ran priced models on it without end. Each such request now costs its budget what it reserved,
    the ledger says so next to the unknown cost (so a restarted gateway's budget counts it too), and the
    usage report still counts the cost as unknown rather than as the charge."""
    by_char = MeteredChannelConfig.model_validate({"pricing": {"kind": "char", "per_million_chars": "1"}})
    upstream = UpstreamConfig(id="chars", base_url=mock.url, api_key=MOCK_KEYS[0], billing=by_char)
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=(upstream,)))
    try:
        principal, client = budgeted(gw, "by-char", budget_micro_usd=1_000)
        answered = 0
        async with client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                for index in range(10):
                    await client.messages.create(model=MODEL, max_tokens=16, messages=user(f"turn {index}"))
                    answered += 1
        assert refused.value.status_code == 402 and answered > 0
        rows = await usage_rows(gw)
        status = gw.gateway.policy.budget_status(principal, None, time.time())
        assert status is not None and status.reserved_micro_usd == 0
        served = [row for row in rows if row["status"] == 200]
        assert len(served) == answered
        assert {(row["cost_micro_usd"], row["pricing_version"]) for row in served} == {(None, "channel:char")}
        assert 0 < sum(row["charged_micro_usd"] for row in served) == status.spent_micro_usd <= 1_000
        restarted = Gateway(gw.gateway.config, gw.gateway.engine).policy.budget_status(principal, None, time.time())
        assert restarted is not None and restarted.spent_micro_usd == status.spent_micro_usd
        total = summarize(gw.gateway.engine, "principal").total
        assert total["unpriced"] == answered and not total["cost_micro_usd"]  # the 402 cost nothing
    finally:
        await gw.stop()


async def test_a_price_file_replaces_the_shipped_catalogue(tmp_path: Path, mock: MockServer) -> None:
    """`billing.price_file`: the operator's own prices (same format, dated), for every request's cost; a
    broken file is refused at startup, naming it."""
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps(
            {
                "version": "acme-2026-12",
                "as_of": "2026-12-01",
                "currency": "USD",
                "prices": [{"ids": [MODEL], "input": "1", "output": "2", "cache_write_5m": "1.25", "cache_read": "0"}],
            }
        )
    )
    config = gateway_config(tmp_path, mock.url, billing=BillingConfig(price_file=prices))
    gw = await start_gateway(config)
    try:
        async with gw.client() as client:
            answered = await client.messages.create(model=MODEL, max_tokens=16, messages=user())
        await gw.gateway.flush_usage()
        [row] = await usage_rows(gw)
    finally:
        await gw.stop()
    expected = answered.usage.input_tokens * 1 + answered.usage.output_tokens * 2  # µUSD at $1 / $2 per Mtok
    assert (row["cost_micro_usd"], row["pricing_version"]) == (expected, "acme-2026-12")

    prices.write_text('{"version": "broken", "as_of": "2026-12-01", "prices": [{"ids": ["m"], "input": "cheap"}]}')
    with pytest.raises(ValueError, match="price file"):
        gateway_config(tmp_path, mock.url, billing=BillingConfig(price_file=prices)).catalogue()


@pytest.mark.one_window
async def test_a_pricing_failure_leaves_the_cost_unknown_but_loses_no_answer_record_or_budget_charge(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in pricing (not a model without a price) delivers the answer, records its usage with the cost
    unknown under the pricing version `pricing-failed`, logs the traceback once rather than per request, and
    charges a budget what the request reserved: a fault must not make requests free."""
    principal, budgeted_client = budgeted(gw, "priced-by-fault", budget_micro_usd=10_000_000, budget_range="daily")

    class BrokenBook:
        """The gateway's book but for its prices (a compiled class: its method cannot be replaced)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(book, name)

        def cost(self, *_: object) -> None:
            raise RuntimeError("price table corrupted")

    book = gw.gateway.book
    monkeypatch.setattr(gw.gateway, "book", BrokenBook())
    # The budget's estimate takes the book itself (compiled, its argument's type is checked).
    monkeypatch.setattr(app_module, "budget_estimate", lambda _, *args: budget_estimate(book, *args))
    async with gw.client() as client:
        asked = await client.messages.with_raw_response.create(
            model=MODEL, max_tokens=16, messages=user(), extra_headers={"x-poolgate-cost": "1"}
        )
        message = await asked.parse()
        async with client.messages.stream(model=MODEL, max_tokens=16, messages=user("again")) as stream:
            streamed = await stream.get_final_message()
    async with budgeted_client:
        charged = await budgeted_client.messages.create(model=MODEL, max_tokens=16, messages=user("on a budget"))
    # The held JSON answer is delivered whole, its cost unknown (it was a plain-text 500).
    assert asked.status_code == 200 and message.content and streamed.content and charged.content
    assert asked.headers["x-poolgate-cost"] == "unknown"
    rows = await usage_rows(gw)
    assert [(row["status"], row["cost_micro_usd"], row["pricing_version"]) for row in rows] == [
        (200, None, "pricing-failed")
    ] * 3
    assert rows[0]["output_tokens"] == message.usage.output_tokens
    status = gw.gateway.policy.budget_status(principal, None, time.time())
    assert status is not None and status.reserved_micro_usd == 0
    assert status.spent_micro_usd >= list_price(MODEL, charged.usage.model_dump()) > 0
    assert caplog.text.count("RuntimeError: price table corrupted") == 1
    # The charge is in the ledger next to the unknown cost, so a restarted gateway's budget counts it too.
    assert [row["charged_micro_usd"] for row in rows] == [None, None, status.spent_micro_usd]
    restarted = Gateway(gw.gateway.config, gw.gateway.engine).policy.budget_status(principal, None, time.time())
    assert restarted is not None and restarted.spent_micro_usd == status.spent_micro_usd
    failures = [
        line
        for line in gw.gateway.metrics.exposition().decode().splitlines()
        if line.startswith("poolgate_pricing_failures_total{")
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in failures) == 3


async def answer_and_stream(client: anthropic.AsyncAnthropic) -> tuple[Message, Message]:
    """A JSON answer and a streamed one, each asked of `client` (then closed)."""
    async with client:
        answered = await client.messages.create(model=MODEL, max_tokens=16, messages=user())
        async with client.messages.stream(model=MODEL, max_tokens=16, messages=user("again")) as stream:
            return answered, await stream.get_final_message()


@pytest.mark.one_window
async def test_a_fault_settling_a_budget_charges_what_the_request_reserved_and_loses_no_usage_record(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault settling a request's quotas and budget (a bug, not a refusal) delivers the answer, writes its usage
    record with its cost, and charges the budget what the request reserved, an upper bound: the reservation is
    not held until a restart (the budget's room shrank by every such request), nor is the request free. The
    traceback is logged once, not per request."""
    principal, client = budgeted(gw, "settled-by-fault", budget_micro_usd=10_000_000, budget_range="daily")
    policy = gw.gateway.policy

    class BrokenPolicy:
        """The gateway's policy but for its settlement (a compiled class: its method cannot be replaced)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(policy, name)

        def settle(self, *_: object) -> None:
            raise RuntimeError("quota table corrupted")

    monkeypatch.setattr(gw.gateway, "policy", BrokenPolicy())
    answered, streamed = await answer_and_stream(client)
    rows = await usage_rows(gw)
    assert [(row["status"], row["output_tokens"]) for row in rows] == [
        (200, answered.usage.output_tokens),
        (200, streamed.usage.output_tokens),
    ]
    assert [row["cost_micro_usd"] for row in rows] == [
        list_price(MODEL, answered.usage.model_dump()),
        list_price(MODEL, streamed.usage.model_dump()),
    ]
    status = policy.budget_status(principal, None, time.time())
    assert status is not None and (status.reserved_micro_usd, status.in_flight) == (0, 0)
    charged = [row["charged_micro_usd"] for row in rows]
    assert all(charge > cost for charge, cost in zip(charged, (row["cost_micro_usd"] for row in rows), strict=True))
    assert sum(charged) == status.spent_micro_usd
    assert caplog.text.count("RuntimeError: quota table corrupted") == 1
    restarted = Gateway(gw.gateway.config, gw.gateway.engine).policy.budget_status(principal, None, time.time())
    assert restarted is not None and restarted.spent_micro_usd == status.spent_micro_usd


async def test_a_fault_keeping_a_callers_spend_loses_no_usage_record(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault keeping the spend of a caller without a budget in its history (a bug; the history is what a budget
    given to the caller later counts) delivers the answer and writes its usage record with its cost: the ledger
    has it, and the next start seeds the history from the ledger. (It cost the record: the fault escaped the
    request's accounting.) The traceback is logged once, not per request."""
    principal, client = budgeted(gw, "spend-by-fault")
    policy = gw.gateway.policy

    class BrokenBudgets:
        def __getattr__(self, name: str) -> Any:
            return getattr(policy.budgets, name)

        def spend(self, *_: object) -> None:
            raise RuntimeError("spend history corrupted")

    class BrokenPolicy:
        """The gateway's policy but for its budgets' spend (compiled classes: their methods cannot be replaced)."""

        budgets = BrokenBudgets()

        def __getattr__(self, name: str) -> Any:
            return getattr(policy, name)

    monkeypatch.setattr(gw.gateway, "policy", BrokenPolicy())
    answered, streamed = await answer_and_stream(client)
    rows = await usage_rows(gw)
    assert [(row["principal_id"], row["status"], row["output_tokens"]) for row in rows] == [
        (principal.id, 200, answered.usage.output_tokens),
        (principal.id, 200, streamed.usage.output_tokens),
    ]
    costs = [list_price(MODEL, answered.usage.model_dump()), list_price(MODEL, streamed.usage.model_dump())]
    assert [row["cost_micro_usd"] for row in rows] == costs
    assert ledger_spend(gw, principal.id) == sum(costs)
    assert caplog.text.count("RuntimeError: spend history corrupted") == 1


def stream_answer(message_start_usage: bytes) -> bytes:
    """An SSE answer whose message_start carries `message_start_usage` (b"" for none) and whose message_delta
    carries no usage."""
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
        b'"role":"assistant","model":"'
        + MODEL.encode()
        + b'","content":[],"stop_reason":null'
        + message_start_usage
        + b"}}\n\n"
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hello there"}}\n\n'
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(events)
    return head + events


async def test_an_answer_that_reports_no_usage_is_recorded_at_an_unknown_cost_never_free(
    tmp_path: Path, mock: MockServer
) -> None:
    """A proxy that strips `usage` from the API's answers: read as zeros, a JSON answer was recorded (and its
    cost header said) 0, and a stream its estimated output with a prompt of 0 tokens."""
    message = (
        b'{"id":"msg_1","type":"message","role":"assistant","model":"' + MODEL.encode() + b'",'
        b'"content":[{"type":"text","text":"Hello"}],"stop_reason":"end_turn"}'
    )
    json_answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(message)
    for answer, stream in ((json_answer + message, False), (stream_answer(b""), True)):
        server, url = await broken_upstream(answer)
        upstream = UpstreamConfig(id="stripped", base_url=url, api_key="sk-stripped")
        gw = await start_gateway(gateway_config(tmp_path / str(stream), mock.url, upstreams=(upstream,)))
        try:
            async with gw.client() as client:
                raw = await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=16, messages=user(), stream=stream, extra_headers={"x-poolgate-cost": "1"}
                )
                if stream:
                    assert [event.type async for event in await raw.parse()][-1] == "message_stop"
                else:
                    assert raw.headers["x-poolgate-cost"] == "unknown"
            [row] = await usage_rows(gw)
            assert (row["status"], row["outcome"]) == (200, "ok")
            assert row["cost_micro_usd"] is None and row["pricing_version"] == "usage-unreported"
        finally:
            await gw.stop()
            server.close()


async def test_a_stream_that_reports_its_usage_only_at_its_start_is_priced(tmp_path: Path, mock: MockServer) -> None:
    """Its prompt is counted; its output, never reported at the end, is estimated from its deltas (as for a
    stream cut short) rather than made unknown."""
    server, url = await broken_upstream(stream_answer(b',"usage":{"input_tokens":20,"output_tokens":1}'))
    upstream = UpstreamConfig(id="start-only", base_url=url, api_key="sk-start-only")
    gw = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=(upstream,)))
    try:
        async with gw.client() as client:
            # Raw events: the SDK's stream helper fails on a message_delta without usage.
            events = await client.messages.create(model=MODEL, max_tokens=16, messages=user(), stream=True)
            assert [event.type async for event in events][-1] == "message_stop"
        [row] = await usage_rows(gw)
        assert row["input_tokens"] == 20 and row["output_tokens"] > 1
        assert row["cost_micro_usd"] == list_price(MODEL, {"input_tokens": 20, "output_tokens": row["output_tokens"]})
    finally:
        await gw.stop()
        server.close()

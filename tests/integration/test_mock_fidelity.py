"""The mock upstream is as strict as the real Messages API, through its HTTP surface: models it does not
have answer 404 in the API's shape, malformed requests 400, and its admin API and config file refuse
fields nothing reads instead of ignoring a typo."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pydantic
import pytest

from poolgate.mock import Fault, MockConfig, MockKey, MockServer, start_mock
from poolgate.mock.config import DEFAULT_MODELS, DEMO_KEYS, MockConfigError, load_mock_config
from poolgate.mock.server import display_name
from tests import claude_code
from tests.conftest import MOCK_KEYS, MODEL
from tests.integration.test_demo_process import poolgate_cli

HEADERS = {"x-api-key": MOCK_KEYS[0], "anthropic-version": "2023-06-01", "content-type": "application/json"}
HI = [{"role": "user", "content": "Say hi"}]
BILLING_HEADER = "x-anthropic-billing-header:"

# Real Claude ids in both namings, the ones Claude Code sends, and the ones tests and benchmarks use.
REAL_MODELS = (
    "claude-3-5-sonnet-20241022",
    "claude-3-5-sonnet-20240620",
    "claude-3-5-sonnet-latest",
    "claude-3-5-haiku-20241022",
    "claude-3-7-sonnet-20250219",
    "claude-3-haiku-20240307",
    "claude-3-opus-20240229",
    "claude-3-sonnet-20240229",
    "claude-2.1",
    "claude-2.0",
    "claude-instant-1.2",
    "claude-1.3-100k",
    "claude-v1",
    "claude-sonnet-4-20250514",
    "claude-sonnet-4-0",
    "claude-opus-4-20250514",
    "claude-opus-4-1",
    "claude-opus-4-1-20250805",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5",
    "claude-haiku-4-5-20251001",
    "claude-opus-4-5",
    "claude-opus-4-5-20251101",
    "claude-opus-4-6-fast",
    "claude-sonnet-4-6",
    "claude-opus-4-7",
    "claude-opus-4-8",
    "claude-sonnet-5",
    "claude-fable-5",
    "claude-mythos-5-1",
    "claude-mythos-preview",
    "claude-unpriced-9",  # served but unlisted: the gateway's tests price an unknown model with it
    *DEFAULT_MODELS,
)


async def post(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, Any, str | None]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = HEADERS if headers is None else headers
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=sent) as response:
        return response.status, await response.json(content_type=None), response.headers.get("request-id")


def ask(model: str = MODEL, **fields: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 8, "messages": HI, **fields}


def sdk(server: MockServer) -> anthropic.AsyncAnthropic:
    """The real SDK against the mock over HTTP, as the demo's users and the gateway's clients see it."""
    return anthropic.AsyncAnthropic(base_url=server.url, api_key=MOCK_KEYS[0], max_retries=0)


@pytest.fixture
async def custom_mock() -> AsyncIterator[MockServer]:
    server = await start_mock(
        MockConfig(keys={MOCK_KEYS[0]: MockKey()}, models=("local-model",), unlisted_models=("hidden-model",))
    )
    yield server
    await server.stop()


# ----- models ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["claude-nonexistent-9", "gpt-4", "m", "claude-opus-4-1@20250805", "claude-x"])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_a_model_the_api_does_not_have_gets_its_404(mock: MockServer, model: str, path: str) -> None:
    status, error, request_id = await post(mock.url + path, ask(model, stream=True))
    assert status == 404 and request_id is not None and request_id.startswith("req_")
    assert error == {
        "type": "error",
        "error": {"type": "not_found_error", "message": f"model: {model}"},
        "request_id": request_id,
    }


async def test_every_real_claude_model_id_is_served(mock: MockServer) -> None:
    for model in REAL_MODELS:
        status, message, _ = await post(mock.url + "/v1/messages", ask(model))
        assert (status, message.get("model")) == (200, model), message
        status, counted, _ = await post(mock.url + "/v1/messages/count_tokens", {"model": model, "messages": HI})
        assert status == 200 and counted["input_tokens"] > 0, (model, counted)


async def test_the_configs_models_are_served_listed_or_not(custom_mock: MockServer) -> None:
    for model in ("local-model", "hidden-model", "claude-haiku-4-5"):
        status, message, _ = await post(custom_mock.url + "/v1/messages", ask(model))
        assert (status, message["model"]) == (200, model)
    assert (await post(custom_mock.url + "/v1/messages", ask("other-model")))[0] == 404
    async with aiohttp.ClientSession() as session, session.get(custom_mock.url + "/v1/models", headers=HEADERS) as r:
        listed = [model["id"] for model in (await r.json())["data"]]
    assert listed == ["local-model"]


async def test_models_are_listed_with_the_apis_display_names(mock: MockServer) -> None:
    async with aiohttp.ClientSession() as session, session.get(mock.url + "/v1/models", headers=HEADERS) as r:
        names = {model["id"]: model["display_name"] for model in (await r.json())["data"]}
    assert names and all(name.startswith("Claude ") for name in names.values()), names
    # The API's own spelling: versions with a dot, the family before them, whatever the id's order.
    assert [display_name(model) for model in ("claude-sonnet-4-5-20250929", "claude-3-5-haiku-20241022")] == [
        "Claude Sonnet 4.5",
        "Claude Haiku 3.5",
    ]
    assert display_name("claude-opus-4-20250514") == "Claude Opus 4"
    assert display_name("local-model") == "Local Model"


async def test_every_model_object_is_one_the_sdk_validates(custom_mock: MockServer) -> None:
    """The SDK's ModelInfo requires `lifecycle`, which the API always sends: the mock's objects had none (a
    client's `model.lifecycle == "active"` filter dropped every model the demo serves), and no `max_tokens`
    for a client that sizes its requests by it, though the mock holds each model's limit."""
    objects = []
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/models?limit=1000", "/v1/models/claude-opus-4-1", "/v1/models/hidden-model"):
            async with session.get(custom_mock.url + path, headers=HEADERS) as response:
                found = await response.json()
            objects += found.get("data", [found])
    models = {model.id: model for model in map(anthropic.types.ModelInfo.model_validate, objects)}
    assert all(model.lifecycle == "active" for model in models.values())
    opus = models["claude-opus-4-1-20250805"]
    assert (opus.line, opus.max_tokens) == ("opus", 32_000)
    # Models the mock cannot place (its config's own) name no line, and may be asked for any max_tokens it takes.
    assert (models["local-model"].line, models["local-model"].max_tokens) == (None, 128_000)


async def test_the_model_list_pages_newest_first_like_the_apis() -> None:
    """`limit`, `after_id` and `before_id` were ignored (every model, has_more false), every model had the
    same `created_at` and `models.retrieve` got a plain-text 404."""
    ids = tuple(f"claude-sonnet-4-{n}" for n in range(1, 26))
    server = await start_mock(MockConfig(keys={MOCK_KEYS[0]: MockKey()}, models=ids))
    client = sdk(server)
    try:
        first = await client.models.list()  # the API's default page: 20
        assert [m.id for m in first.data] == list(ids[:20]) and first.has_more and first.last_id == ids[19]
        created = [m.created_at for m in first.data]
        assert created == sorted(created, reverse=True) and len(set(created)) == 20
        assert [model.id async for model in client.models.list(limit=7)] == list(ids)  # the SDK walks the pages
        last = await client.models.list(limit=5, after_id=ids[21])
        assert [m.id for m in last.data] == list(ids[22:]) and not last.has_more
        back = await client.models.list(limit=2, before_id=ids[4])
        assert [m.id for m in back.data] == list(ids[2:4]) and back.has_more and back.first_id == ids[2]
        retrieved = await client.models.retrieve(ids[3])
        assert (retrieved.id, retrieved.created_at, retrieved.display_name) == (
            ids[3],
            first.data[3].created_at,
            "Claude Sonnet 4.4",
        )
        assert (await client.models.retrieve("claude-3-haiku-20240307")).id == "claude-3-haiku-20240307"  # served
        # An alias is answered as the model it stands for, as the API resolves it (the mock named the alias).
        alias = await client.models.retrieve("claude-opus-4-1")
        assert (alias.id, alias.display_name) == ("claude-opus-4-1-20250805", "Claude Opus 4.1")
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.models.retrieve("claude-nonexistent-9")
        assert missing.value.body["error"] == {"type": "not_found_error", "message": "model: claude-nonexistent-9"}
        for bad in ({"limit": 0}, {"limit": 1001}, {"after_id": "claude-nonexistent-9"}):
            with pytest.raises(anthropic.BadRequestError):
                await client.models.list(**bad)  # type: ignore[arg-type]
    finally:
        await client.close()
        await server.stop()


# `limit`s the API refuses that Python's `int()` reads: other scripts' digits, underscores, and a separator
# character `str.isspace()` counts as whitespace and pydantic (hence the API) does not; and an empty one, which
# `parse_qs` drops unless told to keep it (the default page).
LIMITS_THE_API_REFUSES = ("１", "٣", "1_0", "\x1c5", "")
# `limit`s it reads as 5: a sign, leading zeros and surrounding whitespace, Unicode's included.
LIMITS_THE_API_READS_AS_5 = ("+5", "005", " 5 ", "\u30005\n")


async def assert_limits_read_as_the_api(client: anthropic.AsyncAnthropic, ids: Sequence[str], refusal: str) -> None:
    """The model list behind `client` (of `ids`, more than five) refuses the limits the API refuses, with the
    message `refusal`, those out of range in the API's words, and reads the others as 5."""
    for limit in LIMITS_THE_API_REFUSES:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.models.list(extra_query={"limit": limit})
        assert refused.value.body["error"]["message"] == refusal, limit
    for limit in ("0", "1001", "-3"):
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.models.list(extra_query={"limit": limit})
        assert refused.value.body["error"]["message"] == "limit: Input should be between 1 and 1000", limit
    for limit in LIMITS_THE_API_READS_AS_5:
        page = await client.models.list(extra_query={"limit": limit})
        assert [m.id for m in page.data] == list(ids[:5]), limit


async def test_a_limit_is_read_as_the_api_reads_an_integer() -> None:
    """`int()` read "１" as 1 and "1_0" as 10 where the API answers 400."""
    ids = tuple(f"claude-sonnet-4-{n}" for n in range(1, 9))
    server = await start_mock(MockConfig(keys={MOCK_KEYS[0]: MockKey()}, models=ids))
    client = sdk(server)
    try:
        await assert_limits_read_as_the_api(client, ids, "limit: Input should be a valid integer")
    finally:
        await client.close()
        await server.stop()


# ----- malformed requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"messages": []}, "messages: at least one message is required"),
        ({"system": 5}, "system: Input should be a valid string or a list of text blocks"),
        ({"system": {"type": "text", "text": "hi"}}, "system: Input should be"),
        ({"system": [{"type": "image", "source": {}}]}, "system.0.type"),
        ({"system": [{"type": "text"}]}, "system.0.text"),
        ({"system": ["plain"]}, "system.0: Input should be a valid dictionary"),
        ({"tools": {"name": "t"}}, "tools: Input should be a valid list"),
        ({"tools": "t"}, "tools: Input should be a valid list"),
        ({"tools": [["nested"]]}, "tools.0: Input should be a valid dictionary"),
        ({"messages": [{"role": "user", "content": [["x"]]}]}, "messages.0.content.0"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0"),
        ({"model": 5}, "model: Input should be a valid string"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_a_malformed_request_gets_the_apis_400(
    mock: MockServer, fields: dict[str, Any], needle: str, path: str
) -> None:
    status, error, _ = await post(mock.url + path, ask(**fields))
    assert status == 400 and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error" and needle in error["error"]["message"]


@pytest.mark.parametrize(
    ("versions", "message"),
    [
        ([], "anthropic-version: header is required"),
        (["2023-10-01"], 'anthropic-version: "2023-10-01" is not a valid version'),
        (["bogus"], 'anthropic-version: "bogus" is not a valid version'),
        (["2023-06-01", "2023-06-01"], 'anthropic-version: "2023-06-01, 2023-06-01" is not a valid version'),
        (["2023-06-01"], None),
        (["2023-01-01"], None),
        (["2099-01-01"], None),  # a newer SDK's version
    ],
)
@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models")]
)
async def test_every_request_names_a_version_of_the_api(
    mock: MockServer, versions: list[str], message: str | None, method: str, path: str
) -> None:
    """It was never looked at: no header, or a date the API never had, was served."""
    headers = [(name, value) for name, value in HEADERS.items() if name != "anthropic-version"]
    headers += [("anthropic-version", version) for version in versions]
    data = orjson.dumps(ask()) if method == "POST" else None
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, mock.url + path, data=data, headers=headers) as r,
    ):
        answer = await r.json()
    if message is None:
        assert r.status == 200, answer
    else:
        assert (r.status, answer["error"]) == (400, {"type": "invalid_request_error", "message": message})


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models")]
)
async def test_a_missing_key_and_a_wrong_one_get_the_apis_two_401s(mock: MockServer, method: str, path: str) -> None:
    """The API tells a request without a credential from one with a wrong one; the mock said both were invalid."""
    data = orjson.dumps(ask()) if method == "POST" else None
    without = {name: value for name, value in HEADERS.items() if name != "x-api-key"}
    errors = []
    for headers in (without, {**without, "x-api-key": "sk-ant-api03-not-a-mock-key"}):
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, mock.url + path, data=data, headers=headers) as r,
        ):
            errors.append((r.status, (await r.json())["error"]))
    assert errors == [
        (401, {"type": "authentication_error", "message": "x-api-key header is required"}),
        (401, {"type": "authentication_error", "message": "invalid x-api-key"}),
    ]


def said(content: str | list[dict[str, Any]], role: str = "user") -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content}]}


def text(value: str, ttl: str | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": value}
    if ttl is not None:
        block["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    return block


EMPTY_CONTENT = "messages.0: all messages must have non-empty content except for the optional final assistant message"
NOT_EPHEMERAL = "Input tag 'persistent' found using 'type' does not match any of the expected tags: 'ephemeral'"
LOOKUP = {"name": "lookup", "input_schema": {"type": "object"}}
WHITESPACE_ONLY = "messages: text content blocks must contain non-whitespace text"
TRAILING_WHITESPACE = "messages: final assistant content cannot end with trailing whitespace"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (said("hi", role="bot"), "messages.0.role: Input should be 'user' or 'assistant'"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role: Field required"),
        (said(""), EMPTY_CONTENT),
        ({"messages": [{"role": "user", "content": []}]}, EMPTY_CONTENT),
        (said([text("")]), "messages: text content blocks must be non-empty"),
        # It answered these, which are among the API's most met 400s (a tool or hook that returned a blank line,
        # a prefill ending in a space): a client that worked against the demo failed against the API.
        (said(" \n"), WHITESPACE_ONLY),
        (said([text("hi"), text("\n\n")]), WHITESPACE_ONLY),
        ({"messages": [*HI, {"role": "assistant", "content": "Sure, "}]}, TRAILING_WHITESPACE),
        (
            {"messages": [*HI, {"role": "assistant", "content": [text("Sure"), text("the answer:\n")]}]},
            TRAILING_WHITESPACE,
        ),
        (said([{"text": "hi"}]), "messages.0.content.0.type: Field required"),
        (said([text("hi", ttl="2h")]), "cache_control.ephemeral.ttl: Input should be '5m' or '1h'"),
        # It took these for no breakpoint at all, and answered.
        (
            said([{**text("hi"), "cache_control": {"type": "persistent"}}]),
            f"messages.0.content.0.text.cache_control: {NOT_EPHEMERAL}",
        ),
        (
            {"system": [{**text("rules"), "cache_control": {"type": "persistent"}}]},
            f"system.0.cache_control: {NOT_EPHEMERAL}",
        ),
        ({"cache_control": {"ttl": "1h"}}, "cache_control: Unable to extract tag using discriminator 'type'"),
        (
            {"tools": [{**LOOKUP, "cache_control": "ephemeral"}]},
            "tools.0.custom.cache_control: Input should be a valid dictionary or object",
        ),
        # It answered these as if the empty block, the tool or the tools were there.
        ({"system": [text("rules"), text("")]}, "system: text content blocks must be non-empty"),
        (
            {"tools": [LOOKUP], "tool_choice": {"type": "tool", "name": "lookpu"}},
            'tool_choice.tool.name: "lookpu" is not the name of a tool in tools',
        ),
        ({"tool_choice": {"type": "any"}}, "tool_choice may only be specified while providing tools."),
        (
            {"tools": [], "tool_choice": {"type": "tool", "name": "lookup"}},
            "tool_choice may only be specified while providing tools.",
        ),
        (
            {"system": [text("rules", ttl="5m")], **said([text("hi", ttl="1h")])},
            "cache_control.ttl: a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. "
            "Note that blocks are processed in the following order: `tools`, `system`, `messages`.",
        ),
    ],
)
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_a_request_the_api_refuses_gets_its_400_not_an_answer(
    mock: MockServer, fields: dict[str, Any], message: str, path: str
) -> None:
    status, error, _ = await post(mock.url + path, ask(**fields))
    assert (status, error["error"]) == (400, {"type": "invalid_request_error", "message": message})


@pytest.mark.parametrize(
    ("model", "limit"),
    [
        ("claude-3-haiku-20240307", 4096),
        ("claude-3-opus-20240229", 4096),
        ("claude-3-5-sonnet-20241022", 8192),
        ("claude-3-7-sonnet-20250219", 64_000),
        ("claude-sonnet-4-5", 64_000),
        ("claude-opus-4-1-20250805", 32_000),
        ("claude-opus-4-5", 64_000),
        ("claude-haiku-4-5", 64_000),
        (MODEL, 128_000),  # a model newer than the table: the API's cap for every model
    ],
)
async def test_max_tokens_is_bounded_by_the_models_own_output_limit(mock: MockServer, model: str, limit: int) -> None:
    """Only 128000 was checked, for every model: claude-3-haiku was asked for 100000 and answered."""
    status, error, _ = await post(mock.url + "/v1/messages", ask(model, max_tokens=limit + 1))
    assert (status, error["error"]["message"]) == (
        400,
        f"max_tokens: {limit + 1} > {limit}, which is the maximum allowed number of output tokens for {model}",
    )
    assert (await post(mock.url + "/v1/messages", ask(model, max_tokens=limit)))[0] == 200


async def test_requests_the_api_takes_are_served(mock: MockServer) -> None:
    """What the stricter checks must let through: Claude Code's system messages and fields the mock does not
    know, an empty prefill, explicit TTLs an hour before five minutes, 3.7 Sonnet's 128k output beta, and
    Claude Code 2.1.332's per-turn control, an empty system message (refused, every turn after `/compact` of an
    interactive session failed against the demo)."""
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    control = {"role": "system", "content": [], "output_config": {"effort": "medium"}}
    cases: list[tuple[dict[str, Any], dict[str, str] | None]] = [
        ({"messages": [{"role": "system", "content": "reminder"}, *HI], "context_management": {}}, None),
        ({"messages": [*HI, {"role": "assistant", "content": "hello"}, control, *HI]}, None),
        ({"messages": prefill}, None),
        # Whitespace around text is taken, and at the end of an assistant message that is not the last.
        ({"messages": [{"role": "user", "content": " hi\n"}, {"role": "assistant", "content": "hello "}, *HI]}, None),
        (
            {
                "system": [text("rules", ttl="1h")],
                **said([text("hi", ttl="5m")]),
                "cache_control": {"type": "ephemeral"},
            },
            None,
        ),
        (
            {"model": "claude-3-7-sonnet-20250219", "max_tokens": 128_000},
            {"anthropic-beta": "output-128k-2025-02-19"},
        ),
    ]
    for fields, extra in cases:
        status, answer, _ = await post(mock.url + "/v1/messages", ask(**fields), {**HEADERS, **(extra or {})})
        assert status == 200, (fields, answer)
    status, _, _ = await post(mock.url + "/v1/messages", claude_code.body(False), claude_code.headers(MOCK_KEYS[0]))
    assert status == 200


async def test_a_stream_that_is_not_a_boolean_gets_the_apis_400(mock: MockServer) -> None:
    """`"stream": "yes"` was served, as a stream."""
    for stream in ("yes", 1, "true"):
        status, error, _ = await post(mock.url + "/v1/messages", ask(stream=stream))
        assert (status, error["error"]["message"]) == (400, "stream: Input should be a valid boolean")
    assert (await post(mock.url + "/v1/messages", ask(stream=False)))[0] == 200


async def test_the_per_minute_limits_429_says_it_should_be_retried_like_the_injected_one() -> None:
    server = await start_mock(MockConfig(keys={MOCK_KEYS[0]: MockKey(requests_per_minute=1), MOCK_KEYS[1]: MockKey()}))
    server.set_fault(MOCK_KEYS[1], Fault(status=429, retry_after=2.5))
    try:
        async with aiohttp.ClientSession() as session:
            answers = []
            for key in (MOCK_KEYS[0], MOCK_KEYS[0], MOCK_KEYS[1]):
                headers = {**HEADERS, "x-api-key": key}
                async with session.post(server.url + "/v1/messages", data=orjson.dumps(ask()), headers=headers) as r:
                    answers.append((r.status, r.headers.get("x-should-retry"), r.headers.get("retry-after")))
    finally:
        await server.stop()
    assert answers[1][:2] == (429, "true") and answers[1][2] is not None, answers
    # An injected wait is rounded up to whole seconds: 2.5 was sent as 2, 0.5 as 0 (retry at once).
    assert answers[2] == (429, "true", "3"), answers


async def test_a_request_that_would_take_its_keys_input_tokens_past_the_minutes_limit_gets_the_429() -> None:
    """The API refuses a request whose prompt does not fit in what is left of a key's per-minute input tokens
    ("This request would exceed the rate limit … Please reduce the prompt length"), cache reads apart, which no
    limit counts; the gateway's routing passes over such a key. The mock refused only once a limit was used up,
    and served a prompt of any size into the last token of room."""
    config = MockConfig(keys={MOCK_KEYS[0]: MockKey(input_tokens_per_minute=3000)}, min_cacheable_tokens=256)
    server = await start_mock(config)
    cached = [{"type": "text", "text": "rule " * 1600, "cache_control": {"type": "ephemeral"}}]  # ~2,000 tokens
    try:
        written = await post(server.url + "/v1/messages", ask(system=cached))
        too_long = await post(server.url + "/v1/messages", ask(system="rule " * 1600))
        read = await post(server.url + "/v1/messages", ask(system=cached))  # the same prompt, as a cache read
        async with aiohttp.ClientSession() as session:
            body = orjson.dumps(ask(system="rule " * 1600))
            async with session.post(server.url + "/v1/messages", data=body, headers=HEADERS) as refused:
                left = int(refused.headers["anthropic-ratelimit-input-tokens-remaining"])
                retry = (refused.headers.get("x-should-retry"), refused.headers.get("retry-after"))
    finally:
        await server.stop()
    assert written[0] == 200 and written[1]["usage"]["cache_creation_input_tokens"] > 1900
    assert too_long[0] == 429 and too_long[1]["error"] == {
        "type": "rate_limit_error",
        "message": "This request would exceed the rate limit of 3,000 input tokens per minute. Please reduce the "
        "prompt length or the maximum tokens requested, or try again later.",
    }
    assert read[0] == 200 and read[1]["usage"]["cache_read_input_tokens"] > 1900
    # Refused with room left, which the headers say, as a 429 for a used-up window does.
    assert 0 < left < 1000 and retry[0] == "true" and retry[1] is not None


async def test_the_demo_keys_outlast_a_minute_of_load() -> None:
    """A load test of `poolgate demo` measures the gateway: its keys had a real key's 4,000 requests a minute,
    used up within seconds (the rest of each minute, 529s), while their rate-limit headers still come."""
    server = await start_mock(MockConfig.demo())
    try:
        async with aiohttp.ClientSession() as session:
            headers = {**HEADERS, "x-api-key": DEMO_KEYS[0]}
            body = orjson.dumps(ask())

            async def some(count: int) -> list[tuple[int, str | None]]:
                answers = []
                for _ in range(count):
                    async with session.post(server.url + "/v1/messages", data=body, headers=headers) as r:
                        await r.read()
                        answers.append((r.status, r.headers.get("anthropic-ratelimit-requests-remaining")))
                return answers

            answers = [answer for batch in await asyncio.gather(*(some(160) for _ in range(26))) for answer in batch]
    finally:
        await server.stop()
    assert len(answers) > 4000 and {status for status, _ in answers} == {200}
    assert all(remaining is not None and int(remaining) > 0 for _, remaining in answers)


@pytest.mark.parametrize(
    ("max_tokens", "needle"),
    [
        (128_001, "max_tokens: 128001 > 128000"),
        (1_000_000, "maximum allowed number of output tokens"),
        (0, "greater than or equal to 1"),
        (-5, "greater than or equal to 1"),
        ("ten", "max_tokens: Input should be a valid integer"),
        (8.5, "max_tokens: Input should be a valid integer"),
        (True, "max_tokens: Input should be a valid integer"),
        (None, "max_tokens: Input should be a valid integer"),
    ],
)
async def test_max_tokens_must_be_a_positive_integer_up_to_128000(
    mock: MockServer, max_tokens: object, needle: str
) -> None:
    status, error, _ = await post(mock.url + "/v1/messages", ask(max_tokens=max_tokens, stream=True))
    assert status == 400 and error["error"]["type"] == "invalid_request_error"
    assert needle in error["error"]["message"]


async def test_well_formed_requests_at_the_limits_are_served(mock: MockServer) -> None:
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    tool = {"name": "t", "description": "d", "input_schema": {"type": "object"}}
    for fields in ({"max_tokens": 128_000}, {"max_tokens": 1}, {"system": system, "tools": [tool]}, {"tools": []}):
        status, message, _ = await post(mock.url + "/v1/messages", ask(**fields))
        assert status == 200 and message["type"] == "message", (fields, message)


# ----- what the answer holds -------------------------------------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "kelvin"]}},
        "required": ["city", "unit"],
    },
}
OTHER_TOOL = {"name": "other", "description": "Another tool.", "input_schema": {"type": "object"}}
SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search"}


@pytest.mark.parametrize(
    ("tools", "choice"),
    [
        ([OTHER_TOOL, WEATHER], {"type": "tool", "name": "get_weather"}),
        ([SEARCH_TOOL, WEATHER, OTHER_TOOL], {"type": "any"}),  # a client tool, not the server's search
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_forced_tool_choice_is_answered_with_a_tool_call(
    mock: MockServer, tools: list[dict[str, Any]], choice: dict[str, Any], stream: bool
) -> None:
    """It was answered with text and end_turn, which the API never does for a forced tool."""
    client = sdk(mock)
    fields: dict[str, Any] = {"model": MODEL, "max_tokens": 200, "tools": tools, "tool_choice": choice}
    try:
        if stream:
            async with client.messages.stream(**fields, messages=HI) as events:
                kinds = [event.type async for event in events]
                message = await events.get_final_message()
            assert "input_json" in kinds and "text" not in kinds
        else:
            message = await client.messages.create(**fields, messages=HI)
    finally:
        await client.close()
    assert message.stop_reason == "tool_use" and len(message.content) == 1
    call = message.content[0]
    assert call.type == "tool_use" and call.name == "get_weather" and call.id.startswith("toolu_")
    assert call.input == {"city": "mock", "unit": "celsius"}  # the schema's required parameters
    assert message.usage.output_tokens > 0


async def test_a_tool_asked_for_by_name_is_called_and_its_result_answered_in_words(mock: MockServer) -> None:
    """A tool loop for a demo and the tests: the mock called a tool only when `tool_choice` forced it, which
    Claude Code never does, so no tool loop ever went through the gateway from it."""
    client = sdk(mock)
    tools: Any = [OTHER_TOOL, WEATHER]
    reminder = {"type": "text", "text": "<system-reminder>Consider using the other tool.</system-reminder>"}
    asked: Any = [
        {"role": "user", "content": [{"type": "text", "text": "Use the get_weather tool for Paris"}, reminder]}
    ]
    try:
        # Claude Code sends its environment in a `system` message after the user's turn.
        environment = {"role": "system", "content": "Primary working directory: /tmp"}
        called = await client.messages.create(model=MODEL, max_tokens=200, tools=tools, messages=[*asked, environment])
        assert called.stop_reason == "tool_use"
        [call] = called.content
        assert (
            call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "mock", "unit": "celsius"}
        )
        result = {"type": "tool_result", "tool_use_id": call.id, "content": "18 degrees"}
        turns: Any = [*asked, {"role": "assistant", "content": called.content}, {"role": "user", "content": [result]}]
        answered = await client.messages.create(model=MODEL, max_tokens=200, tools=tools, messages=turns)
        assert answered.stop_reason == "end_turn" and answered.content[0].type == "text"
        # Not asked at a text's start (a reminder's mention), not offered, or refused by `tool_choice`: words.
        for tools_offered, messages, choice in (
            (tools, [{"role": "user", "content": [reminder]}], {"type": "auto"}),
            ([OTHER_TOOL], asked, {"type": "auto"}),
            (tools, asked, {"type": "none"}),
        ):
            plain = await client.messages.create(
                model=MODEL, max_tokens=200, tools=tools_offered, tool_choice=choice, messages=messages
            )
            assert plain.stop_reason == "end_turn", (tools_offered, messages, choice)
    finally:
        await client.close()


def call(tool_id: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": "get_weather", "input": {"city": "Paris"}}


def result(tool_id: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": "18 degrees"}


def turn(role: str, *blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": role, "content": list(blocks)}


ASKED = {"role": "user", "content": "The weather in Paris?"}
WORDS = {"role": "user", "content": "And?"}
UNANSWERED = (
    "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` "
    "block must have a corresponding `tool_result` block in the next message."
)
UNEXPECTED = (
    "messages.{}: unexpected `tool_use_id` found in `tool_result` blocks: {}. Each `tool_result` block must have a "
    "corresponding `tool_use` block in the previous message."
)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        # The client answered its call in words, or left one of two parallel calls without its result.
        (
            [ASKED, turn("assistant", call("toolu_a")), {"role": "user", "content": "And?"}],
            UNANSWERED.format("toolu_a"),
        ),
        (
            [ASKED, turn("assistant", call("toolu_a"), call("toolu_b")), turn("user", result("toolu_a"))],
            UNANSWERED.format("toolu_b"),
        ),
        (
            [ASKED, turn("assistant", call("toolu_a"), call("toolu_b")), WORDS],
            UNANSWERED.format("toolu_a, toolu_b"),
        ),
        # The results must come first in the user's turn, and the calls last in the assistant's.
        (
            [ASKED, turn("assistant", call("toolu_a")), turn("user", text("Here:"), result("toolu_a"))],
            UNANSWERED.format("toolu_a"),
        ),
        (
            [ASKED, turn("assistant", call("toolu_a"), text("Checking.")), turn("user", result("toolu_a"))],
            UNANSWERED.format("toolu_a"),
        ),
        # A result whose call is not in the turn before it: made up, two turns back, or opening the conversation.
        (
            [ASKED, turn("assistant", call("toolu_a")), turn("user", result("toolu_a"), result("toolu_x"))],
            UNEXPECTED.format("2.content.1", "toolu_x"),
        ),
        (
            [
                ASKED,
                turn("assistant", call("toolu_a")),
                turn("user", result("toolu_a")),
                {"role": "assistant", "content": "18 degrees."},
                turn("user", result("toolu_a")),
            ],
            UNEXPECTED.format("4.content.0", "toolu_a"),
        ),
        ([turn("user", result("toolu_a"))], UNEXPECTED.format("0.content.0", "toolu_a")),
        # Consecutive messages of one role are one turn to the API, and its indices count turns.
        ([ASKED, turn("user", result("toolu_a"))], UNEXPECTED.format("0.content.1", "toolu_a")),
        (
            [turn("assistant", call("toolu_a"), text("Checking.")), turn("user", result("toolu_a")), ASKED],
            UNANSWERED.format("toolu_a"),  # as the API answered this one: a user turn counted before it
        ),
        (
            [ASKED, turn("assistant", call("toolu_a"), call("toolu_a")), turn("user", result("toolu_a"))],
            "messages.1.content.1: `tool_use` ids must be unique",
        ),
    ],
)
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_tool_calls_and_results_that_do_not_pair_up_get_the_apis_400(
    mock: MockServer, messages: list[dict[str, Any]], message: str, path: str
) -> None:
    """It answered them, which the API refuses: a client whose tool loop lost a result (an interrupted tool, a
    history trimmed between a call and its result) worked against the demo and failed against the API."""
    status, error, _ = await post(mock.url + path, ask(messages=messages, tools=[WEATHER]))
    assert (status, error["error"]) == (400, {"type": "invalid_request_error", "message": message})


@anthropic.beta_async_tool
async def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: the city
    """
    return f"18 degrees in {city}"


def tool_runner(client: anthropic.AsyncAnthropic, stream: bool = False) -> Any:
    return client.beta.messages.tool_runner(
        model=MODEL,
        max_tokens=200,
        system="You check the weather.",
        tools=[get_weather],
        messages=[{"role": "user", "content": "use the get_weather tool for Paris"}],
        max_iterations=3,
        stream=stream,
    )


def total_input(usage: Any) -> int:
    """A usage's prompt tokens, read from the cache or not."""
    return int(usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_sdks_tool_runner_continues_the_thread_the_mock_holds(mock: MockServer, stream: bool) -> None:
    """The anthropic SDK's tool runner sends a loop as a message thread: its second turn is a `continue` holding the
    tool's result alone, the call, the system prompt and the tools being the API's to keep. The mock kept none: it
    answered the result as a whole conversation (billing its few bytes as the prompt)."""
    async with sdk(mock) as client:
        replies = [item if not stream else await item.get_final_message() async for item in tool_runner(client, stream)]
    assert [reply.stop_reason for reply in replies] == ["tool_use", "end_turn"]
    second = orjson.loads(mock.stats.last_request_body)
    assert second["thread"] == {"type": "continue", "previous_message_id": replies[0].id}
    assert "system" not in second and "tools" not in second
    assert [block["type"] for message in second["messages"] for block in message["content"]] == ["tool_result"]
    # Billed as the API bills it: the held conversation (the first turn's whole prompt, its reply) and the result.
    assert total_input(replies[1].usage) > total_input(replies[0].usage) + replies[0].usage.output_tokens


async def test_a_continue_is_read_after_the_conversation_the_mock_holds(mock: MockServer) -> None:
    """Its results answer the held reply's calls (and only those), its prompt is the whole conversation's, and the
    held tools are the turn's: a continue asking for one is answered with a call of it."""
    asked = {"role": "user", "content": "use the get_weather tool on Paris"}
    status, reply, _ = await post(mock.url + "/v1/messages", ask(messages=[asked], tools=[WEATHER], thread=CREATE))
    assert (status, reply["stop_reason"]) == (200, "tool_use")
    answered = turn("user", result(reply["content"][-1]["id"]))
    whole = ask(messages=[asked, {"role": "assistant", "content": reply["content"]}, answered], tools=[WEATHER])
    status, unthreaded, _ = await post(mock.url + "/v1/messages", whole)
    assert status == 200

    wrong = ask(messages=[turn("user", result("toolu_other"))], thread=continues(reply["id"]))
    status, error, _ = await post(mock.url + "/v1/messages", wrong)
    assert (status, error["error"]["message"]) == (400, UNANSWERED.format(reply["content"][-1]["id"]))

    counting = {"model": MODEL, "messages": [answered], "thread": continues(reply["id"])}
    status, counted, _ = await post(mock.url + "/v1/messages/count_tokens", counting)
    assert (status, counted["input_tokens"]) == (200, unthreaded["usage"]["input_tokens"])
    status, threaded, _ = await post(mock.url + "/v1/messages", ask(messages=[answered], thread=continues(reply["id"])))
    assert (status, threaded["content"][0]["type"]) == (200, "text")  # the result answered in words
    assert threaded["usage"]["input_tokens"] == unthreaded["usage"]["input_tokens"]

    again = ask(
        messages=[{"role": "user", "content": "use the get_weather tool on Rome"}], thread=continues(threaded["id"])
    )
    status, called, _ = await post(mock.url + "/v1/messages", again)
    assert (status, called["stop_reason"], called["content"][-1]["name"]) == (200, "tool_use", "get_weather")


CREATE = {"type": "create"}


def continues(reply_id: str) -> dict[str, str]:
    return {"type": "continue", "previous_message_id": reply_id}


async def test_a_thread_is_continued_once_and_by_the_key_that_made_it(mock: MockServer) -> None:
    """As the API: a thread is its account's (another key's continue is 404 `thread_not_found`, as is an id it
    never held), and a reply is continued once (400 `thread_already_continued`); the `error_code` in
    `error.details` is what the SDK recovers on."""
    status, reply, _ = await post(mock.url + "/v1/messages", ask(thread=CREATE))
    assert status == 200
    more = ask(messages=[{"role": "user", "content": "More"}], thread=continues(reply["id"]))
    other_key = {**HEADERS, "x-api-key": MOCK_KEYS[1]}
    for sent, headers in ((more, other_key), (ask(thread=continues("msg_never")), HEADERS)):
        status, error, _ = await post(mock.url + "/v1/messages", sent, headers)
        assert (status, error["error"]["type"]) == (404, "not_found_error")
        assert error["error"]["details"] == {"error_code": "thread_not_found"}
    assert (await post(mock.url + "/v1/messages", more))[0] == 200
    status, error, _ = await post(mock.url + "/v1/messages", more)
    assert (status, error["error"]["type"]) == (400, "invalid_request_error")
    assert error["error"]["details"] == {"error_code": "thread_already_continued"}


async def test_the_sdks_tool_runner_recovers_a_thread_another_key_does_not_hold(mock: MockServer) -> None:
    """A tool loop whose second turn reaches another account (as through a gateway's pool) gets `thread_not_found`,
    and the SDK sends the whole conversation again under a new thread, which that account answers."""
    async with sdk(mock) as client:
        runner = tool_runner(client)
        turns = []
        async for message in runner:
            turns.append(message.stop_reason)
            client.api_key = MOCK_KEYS[1]  # every later turn on the other account
    assert turns == ["tool_use", "end_turn"]
    assert mock.stats.requests_by_key == {MOCK_KEYS[0]: 1, MOCK_KEYS[1]: 2}
    replay = orjson.loads(mock.stats.last_request_body)
    assert replay["thread"] == CREATE and len(replay["messages"]) == 3 and replay["tools"]


async def test_tool_calls_and_results_that_pair_up_are_served(mock: MockServer) -> None:
    """Parallel results in any order, then text; results split over user messages (consecutive ones are one turn)
    around a `system` message; the assistant's text in a message of its own before its calls."""
    control = {"role": "system", "content": [], "output_config": {"effort": "medium"}}
    conversations = [
        [
            ASKED,
            turn("assistant", text("Checking both."), call("toolu_a"), call("toolu_b")),
            turn("user", result("toolu_b"), result("toolu_a"), text("Thanks.")),
        ],
        [
            ASKED,
            turn("assistant", call("toolu_a"), call("toolu_b")),
            control,
            turn("user", result("toolu_a")),
            turn("user", result("toolu_b")),
        ],
        [
            ASKED,
            {"role": "assistant", "content": "Checking."},
            turn("assistant", call("toolu_a")),
            turn("user", result("toolu_a")),
            {"role": "user", "content": "In a word?"},
        ],
    ]
    for messages in conversations:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            status, answer, _ = await post(mock.url + path, ask(messages=messages, tools=[WEATHER]))
            assert status == 200, (messages, answer)


# Requests whose answers have each kind of block and stop the mock sends.
ANSWERS_OF_EVERY_KIND = {
    "text": ask(),
    "thinking": ask("claude-sonnet-4-5", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024}),
    "tool call": ask(tools=[WEATHER], tool_choice={"type": "any"}),
    "web search": ask(max_tokens=64, tools=[SEARCH_TOOL]),
    "stop sequence": ask(stop_sequences=["poolgate"]),
}
STREAM_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)


@pytest.mark.parametrize("kind", list(ANSWERS_OF_EVERY_KIND))
async def test_every_answer_and_stream_event_is_one_the_sdks_types_validate(mock: MockServer, kind: str) -> None:
    """The SDK's ServerToolUsage requires `web_fetch_requests` beside `web_search_requests`, as the API sends
    both in every usage: the mock's had the search count alone, so `usage.server_tool_use.web_fetch_requests`
    was None to a client (not 0) and every answer failed the SDK's own validation."""
    request = ANSWERS_OF_EVERY_KIND[kind]
    status, message, _ = await post(mock.url + "/v1/messages", request)
    assert status == 200
    anthropic.types.Message.model_validate(message)
    async with (
        aiohttp.ClientSession() as session,
        session.post(mock.url + "/v1/messages", json={**request, "stream": True}, headers=HEADERS) as response,
    ):
        lines = (await response.text()).splitlines()
    events = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    for event in events:
        if event["type"] != "ping":  # the SDK reads a ping as a keepalive, not as one of its events
            STREAM_EVENT.validate_python(event)
    assert [event["type"] for event in events][-2:] == ["message_delta", "message_stop"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_forced_tool_call_stops_at_max_tokens(mock: MockServer, stream: bool) -> None:
    """It ran on past max_tokens 1 to 6 output tokens, with stop_reason tool_use."""
    client = sdk(mock)
    fields: dict[str, Any] = {"model": MODEL, "max_tokens": 1, "tools": [WEATHER], "tool_choice": {"type": "any"}}
    try:
        if stream:
            async with client.messages.stream(**fields, messages=HI) as events:
                message = await events.get_final_message()
        else:
            message = await client.messages.create(**fields, messages=HI)
    finally:
        await client.close()
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 1)
    assert [block.type for block in message.content] == ["tool_use"]


async def test_a_forced_web_search_is_run_then_answered(mock: MockServer) -> None:
    """It was answered as a client tool call (tool_use, no search run)."""
    choice = {"type": "tool", "name": "web_search"}
    fields = ask(max_tokens=200, tools=[SEARCH_TOOL, WEATHER], tool_choice=choice)
    status, message, _ = await post(mock.url + "/v1/messages", fields)
    assert status == 200 and message["stop_reason"] == "end_turn"
    assert [block["type"] for block in message["content"]] == ["server_tool_use", "web_search_tool_result", "text"]
    assert message["usage"]["server_tool_use"]["web_search_requests"] == 1


async def test_a_forced_tool_with_a_nullable_parameter_is_called_and_a_malformed_schema_gets_the_apis_400(
    mock: MockServer,
) -> None:
    """A type list (`["string", "null"]`) was a 500 with a traceback, and so was `required: [["a"]]`."""
    nullable = {"type": "object", "properties": {"a": {"type": ["string", "null"]}}, "required": ["a"]}
    choice = {"type": "tool", "name": "t"}
    status, message, _ = await post(
        mock.url + "/v1/messages", ask(tools=[{"name": "t", "input_schema": nullable}], tool_choice=choice)
    )
    assert status == 200 and message["content"][0]["input"] == {"a": "mock"}, message
    for schema in ({"type": "object", "required": [["a"]]}, {"properties": {"a": {"type": 5}}}, "object"):
        status, error, _ = await post(
            mock.url + "/v1/messages", ask(tools=[{"name": "t", "input_schema": schema}], tool_choice=choice)
        )
        assert (status, error["error"]["type"]) == (400, "invalid_request_error"), (schema, error)
        assert error["error"]["message"].startswith("tools.0.custom.input_schema: JSON schema is invalid")


@pytest.mark.parametrize("stream", [False, True])
async def test_the_text_stops_at_the_first_stop_sequence(mock: MockServer, stream: bool) -> None:
    """`stop_sequences` were ignored: the answer ran on through them with end_turn."""
    client = sdk(mock)
    fields: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "messages": HI}
    try:
        if stream:
            async with client.messages.stream(**fields, stop_sequences=["mock", "poolgate"]) as events:
                text = "".join([chunk async for chunk in events.text_stream])
                message = await events.get_final_message()
            assert text == message.content[0].text  # type: ignore[union-attr]
        else:
            message = await client.messages.create(**fields, stop_sequences=["mock", "poolgate"])
        unstopped = await client.messages.create(**fields, stop_sequences=["never said"])
    finally:
        await client.close()
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "poolgate")
    assert message.content[0].text == "Hello from the "  # type: ignore[union-attr]
    assert message.usage.output_tokens == 4
    assert (unstopped.stop_reason, unstopped.stop_sequence) == ("end_turn", None)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_stop_sequence_before_any_text_leaves_no_empty_text_block(mock: MockServer, stream: bool) -> None:
    """The answer had an empty text block (an empty `text_delta` in a stream), which the mock, as the API,
    refuses when a client sends the turn back: a conversation using `stop_sequences` broke on its next turn."""
    client = sdk(mock)
    fields: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "messages": HI, "stop_sequences": ["Hello"]}
    try:
        if stream:
            async with client.messages.stream(**fields) as events:
                message = await events.get_final_message()
        else:
            message = await client.messages.create(**fields)
        assert (message.stop_reason, message.stop_sequence, message.content) == ("stop_sequence", "Hello", [])
    finally:
        await client.close()


# A model that takes extended thinking (`enabled`, with a budget): Claude 4.7 and later refuse it.
EXTENDED_THINKING = "claude-sonnet-4-5"


@pytest.mark.parametrize("tools", [[], [SEARCH_TOOL]])
@pytest.mark.parametrize("stream", [False, True])
async def test_extended_thinking_puts_a_signed_thinking_block_first(
    mock: MockServer, stream: bool, tools: list[dict[str, Any]]
) -> None:
    """With the web search, the thinking block came after the search's blocks."""
    client = sdk(mock)
    fields: dict[str, Any] = {"model": EXTENDED_THINKING, "max_tokens": 2000, "messages": HI, "tools": tools}
    thinking = {"type": "enabled", "budget_tokens": 1024}
    try:
        if stream:
            async with client.messages.stream(**fields, thinking=thinking) as events:
                kinds = [event.type async for event in events]
                message = await events.get_final_message()
            assert "thinking" in kinds and "signature" in kinds and kinds.index("thinking") < kinds.index("text")
        else:
            message = await client.messages.create(**fields, thinking=thinking)
        plain = await client.messages.create(**fields)
    finally:
        await client.close()
    searched = ["server_tool_use", "web_search_tool_result"] if tools else []
    assert [block.type for block in message.content] == ["thinking", *searched, "text"]
    thought = message.content[0]
    assert thought.type == "thinking" and thought.thinking and thought.signature
    assert message.usage.output_tokens > plain.usage.output_tokens  # thinking is output


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 512}}, "greater than or equal to 1024"),
        ({"thinking": {"type": "enabled", "budget_tokens": 4096}}, "`max_tokens` must be greater than"),
        (
            {
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "tools": [WEATHER],
                "tool_choice": {"type": "any"},
            },
            "Thinking may not be enabled when tool_choice forces tool use.",
        ),
    ],
)
async def test_thinking_the_api_would_refuse_gets_its_400(
    mock: MockServer, fields: dict[str, Any], needle: str
) -> None:
    status, error, _ = await post(mock.url + "/v1/messages", ask(EXTENDED_THINKING, **{"max_tokens": 2048, **fields}))
    assert (status, error["error"]["type"]) == (400, "invalid_request_error") and needle in error["error"]["message"]


# Each model's thinking modes, as the API's documentation lists them ("Troubleshooting thinking"): extended
# thinking (`enabled` with a budget) is refused from Claude 4.7 on, adaptive thinking before 4.6, and thinking
# cannot be turned off on the models that always think.
ENABLED_REFUSED = '"thinking.type.enabled" is not supported for this model.'
DISABLED_REFUSED = '"thinking.type.disabled" is not supported for this model.'
ADAPTIVE_REFUSED = "adaptive thinking is not supported on this model"
BUDGET = {"type": "enabled", "budget_tokens": 1024}


@pytest.mark.parametrize(
    ("model", "thinking", "refused"),
    [
        ("claude-sonnet-5", BUDGET, ENABLED_REFUSED),
        ("claude-opus-4-7", BUDGET, ENABLED_REFUSED),
        ("claude-opus-4-8", BUDGET, ENABLED_REFUSED),
        ("claude-opus-5", BUDGET, ENABLED_REFUSED),
        ("claude-fable-5", BUDGET, ENABLED_REFUSED),
        ("claude-haiku-5-5", BUDGET, ENABLED_REFUSED),
        ("claude-fable-5", {"type": "disabled"}, DISABLED_REFUSED),
        ("claude-mythos-5-1", {"type": "disabled"}, DISABLED_REFUSED),
        ("claude-opus-5-5", {"type": "disabled"}, DISABLED_REFUSED),
        ("claude-sonnet-5-5", {"type": "disabled"}, DISABLED_REFUSED),
        ("claude-sonnet-4-5", {"type": "adaptive"}, ADAPTIVE_REFUSED),
        ("claude-haiku-4-5-20251001", {"type": "adaptive"}, ADAPTIVE_REFUSED),
        ("claude-opus-4-1", {"type": "adaptive"}, ADAPTIVE_REFUSED),
        ("claude-sonnet-4-6", BUDGET, None),
        ("claude-opus-4-6", {"type": "adaptive"}, None),
        ("claude-sonnet-4-5", BUDGET, None),
        ("claude-sonnet-5", {"type": "adaptive"}, None),
        ("claude-sonnet-5", {"type": "disabled"}, None),
        ("claude-haiku-5-5", {"type": "disabled"}, None),
    ],
)
async def test_a_thinking_mode_the_model_does_not_have_gets_the_apis_400(
    mock: MockServer, model: str, thinking: dict[str, Any], refused: str | None
) -> None:
    """The mock answered `thinking: {type: enabled}` with a thinking block on every model: an SDK user's code
    that worked against it got a 400 from the API on claude-sonnet-5 (the gateway's default) and every model
    from Claude 4.7 on."""
    client = sdk(mock)
    try:
        if refused is None:
            message = await client.messages.create(model=model, max_tokens=2000, messages=HI, thinking=thinking)
            assert message.content[-1].type == "text"
            return
        with pytest.raises(anthropic.BadRequestError) as raised:
            await client.messages.create(model=model, max_tokens=2000, messages=HI, thinking=thinking)
    finally:
        await client.close()
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert raised.value.body["error"]["message"].startswith(refused)


async def test_opus_5_thinks_at_the_highest_efforts_whatever_the_request_says(mock: MockServer) -> None:
    """Claude Opus 5 turns thinking off at effort high or below only."""
    off = ask("claude-opus-5", thinking={"type": "disabled"})
    for effort, status in (("high", 200), ("xhigh", 400), ("max", 400)):
        answered, body, _ = await post(mock.url + "/v1/messages", {**off, "output_config": {"effort": effort}})
        assert answered == status, body
    assert DISABLED_REFUSED in body["error"]["message"]


# ----- prompt caching --------------------------------------------------------------------------------------

POLICY = "policy " * 3000  # ~5k tokens: over any model's minimum


async def test_request_level_cache_control_caches_up_to_the_last_block(mock: MockServer) -> None:
    """Automatic caching (`cache_control` on the request) was ignored: the same prompt twice wrote nothing
    and read nothing."""
    client = sdk(mock)
    first_turn = [{"role": "user", "content": "question"}]
    try:
        ask_twice = [
            await client.messages.create(
                model=MODEL, max_tokens=5, system=POLICY, messages=first_turn, cache_control={"type": "ephemeral"}
            )
            for _ in range(2)
        ]
        # The breakpoint moves on with the conversation: the next turn reads what the first wrote.
        next_turn = [*first_turn, {"role": "assistant", "content": "answer"}, {"role": "user", "content": "more"}]
        grown = await client.messages.create(
            model=MODEL,
            max_tokens=5,
            system=POLICY,
            messages=next_turn,
            cache_control={"type": "ephemeral", "ttl": "1h"},
        )
    finally:
        await client.close()
    write, read = ask_twice[0].usage, ask_twice[1].usage
    assert write.cache_creation_input_tokens > 4000 and write.cache_read_input_tokens == 0
    assert write.input_tokens == 0  # the whole prompt is the cached prefix
    assert read.cache_read_input_tokens == write.cache_creation_input_tokens and read.cache_creation_input_tokens == 0
    assert grown.usage.cache_read_input_tokens == write.cache_creation_input_tokens
    assert (
        grown.usage.cache_creation.ephemeral_1h_input_tokens > 0 == grown.usage.cache_creation.ephemeral_5m_input_tokens
    )


def cached_system(*parts: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": part, "cache_control": {"type": "ephemeral"}} for part in parts]


# A prefix written, then read by a request that writes more after it: an answer with every prompt count.
CACHE_WRITE_THEN_READ = (cached_system(POLICY), cached_system(POLICY, "rules " * 3000))


async def streamed(
    client: anthropic.AsyncAnthropic, **fields: Any
) -> tuple[anthropic.types.Usage, anthropic.types.MessageDeltaUsage, anthropic.types.Message]:
    """A streamed answer's usage as its message_start and its message_delta told it, and its final message."""
    async with client.messages.stream(**fields) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    start = next(event.message.usage for event in events if event.type == "message_start")
    delta = next(event.usage for event in events if event.type == "message_delta")
    return start, delta, final


async def test_a_streams_message_delta_repeats_its_cumulative_usage(mock: MockServer) -> None:
    """Its usage carried `output_tokens` alone; the API's repeats message_start's prompt counts with it."""
    client = sdk(mock)
    try:
        answers = [
            await streamed(client, model=MODEL, max_tokens=5, system=system, messages=HI)
            for system in CACHE_WRITE_THEN_READ
        ]
    finally:
        await client.close()
    for start, delta, final in answers:
        prompt = (start.input_tokens, start.cache_creation_input_tokens, start.cache_read_input_tokens)
        assert (delta.input_tokens, delta.cache_creation_input_tokens, delta.cache_read_input_tokens) == prompt
        assert delta.output_tokens == final.usage.output_tokens
    (_, written, _), (_, read, _) = answers
    assert read.input_tokens and read.cache_creation_input_tokens
    assert read.cache_read_input_tokens == written.cache_creation_input_tokens > 4000


async def test_claude_codes_attribution_block_is_counted_and_billed_as_input_but_never_cached(mock: MockServer) -> None:
    """It was left out of the count altogether: count_tokens and usage.input_tokens (0 for a Claude Code turn,
    whose last message is marked) did not see it."""
    billing = {"type": "text", "text": f"{BILLING_HEADER} cc_version=2.1; " + "pad " * 500}
    rest = {"type": "text", "text": "You are Claude Code."}
    client = sdk(mock)
    try:
        without = await client.messages.count_tokens(model=MODEL, system=[rest], messages=HI)  # type: ignore[list-item]
        counted = await client.messages.count_tokens(model=MODEL, system=[billing, rest], messages=HI)  # type: ignore[list-item]
    finally:
        await client.close()
    assert counted.input_tokens - without.input_tokens > 400
    versions = ("2.1.0.a1b", "2.1.0.c2d")
    first, second = [
        (await post(mock.url + "/v1/messages", claude_code.body(False, f"{BILLING_HEADER} cc_version={v};")))[1][
            "usage"
        ]
        for v in versions
    ]
    assert first["input_tokens"] > 0 and first["cache_read_input_tokens"] == 0
    # Another session's attribution block: the cache still hits, and the block is the whole uncached part.
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"] > 4000
    assert second["input_tokens"] == first["input_tokens"] > 0 and second["cache_creation_input_tokens"] == 0


async def test_the_prompt_cache_is_per_model(mock: MockServer) -> None:
    """One key's cache was shared by every model: a prefix Sonnet wrote was read by Haiku."""
    system = [{"type": "text", "text": POLICY, "cache_control": {"type": "ephemeral"}}]
    usages = [
        (await post(mock.url + "/v1/messages", ask(model, system=system)))[1]["usage"]
        for model in (MODEL, "claude-haiku-4-5", MODEL)
    ]
    sonnet, haiku, sonnet_again = ((u["cache_creation_input_tokens"], u["cache_read_input_tokens"]) for u in usages)
    assert sonnet[0] > 0 and haiku == sonnet and sonnet_again == (0, sonnet[0])


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-sonnet-4-0", "claude-sonnet-4-20250514"),
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet-20250219"),
    ],
)
async def test_an_alias_reads_the_prompt_cache_of_its_dated_model(mock: MockServer, written: str, read: str) -> None:
    """The API serves an alias as its dated model; the mock kept them apart, so a prefix cached under one was
    written again, at the write price, under the other."""
    system = [{"type": "text", "text": POLICY, "cache_control": {"type": "ephemeral"}}]
    first, second = [
        (await post(mock.url + "/v1/messages", ask(model, system=system)))[1]["usage"] for model in (written, read)
    ]
    assert first["cache_creation_input_tokens"] > 0
    assert (second["cache_creation_input_tokens"], second["cache_read_input_tokens"]) == (
        0,
        first["cache_creation_input_tokens"],
    )


@pytest.mark.parametrize(
    ("model", "cached"),
    [
        ("claude-sonnet-4-5", {1500: True, 3000: True}),
        ("claude-3-haiku-20240307", {1500: False, 3000: True}),
        ("claude-3-5-haiku-20241022", {1500: False, 3000: True}),
        ("claude-haiku-4-5", {1500: False, 3000: False}),
        ("claude-opus-4-6", {1500: False, 3000: False}),
        ("claude-opus-4-7", {1500: False, 3000: True}),
        # Claude Code's default model, and the 5 generation's (they never cached under 4,096)
        ("claude-opus-4-8", {800: False, 1500: True}),
        ("claude-opus-5", {300: False, 800: True}),
        ("claude-fable-5-1", {300: False, 800: True}),
    ],
)
async def test_the_smallest_cacheable_prefix_is_the_models_own(model: str, cached: dict[int, bool]) -> None:
    """It was 1,024 tokens for every model: Haiku 4.5 cached a 1.5k-token prompt the API does not cache."""
    server = await start_mock(MockConfig(keys={MOCK_KEYS[0]: MockKey()}))
    try:
        found = {}
        for tokens in cached:
            system = [{"type": "text", "text": "word " * (tokens * 4 // 5), "cache_control": {"type": "ephemeral"}}]
            usage = (await post(server.url + "/v1/messages", ask(model, system=system)))[1]["usage"]
            found[tokens] = usage["cache_creation_input_tokens"] > 0
    finally:
        await server.stop()
    assert found == cached


def marked(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}


TOOL = {"name": "lookup", "description": "Look a word up.", "input_schema": {"type": "object", "properties": {}}}
# Each asks for the same prompt as the first request of the test below, with a setting that is no block of it.
SETTINGS_THAT_INVALIDATE_THE_MESSAGES = {
    "adaptive thinking": {"thinking": {"type": "adaptive"}},
    "extended thinking": {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048},
    "another thinking budget": {"thinking": {"type": "enabled", "budget_tokens": 1500}, "max_tokens": 2048},
    "a forced tool": {"tool_choice": {"type": "any"}},
}


@pytest.mark.parametrize("changed", list(SETTINGS_THAT_INVALIDATE_THE_MESSAGES))
async def test_thinking_and_tool_choice_are_part_of_the_messages_cache_key(mock: MockServer, changed: str) -> None:
    """The API keys the messages' cache on the thinking settings and `tool_choice` too (its "what invalidates
    the cache" table): a request that changes them reads the cached tools and system prompt, and writes its
    messages again. The mock read the whole prompt, so a gateway's cache keepalive that changed them (as one
    dropping `thinking` would) kept nothing warm, unseen."""
    conversation = [{"role": "user", "content": [marked("history " * 1500)]}]
    # A model with both thinking modes
    fields = {"model": "claude-sonnet-4-6", "max_tokens": 8, "tools": [TOOL], "system": cached_system(POLICY)}
    first, same, other = [
        (await post(mock.url + "/v1/messages", {**fields, "messages": conversation, **extra}))[1]["usage"]
        for extra in ({}, {}, SETTINGS_THAT_INVALIDATE_THE_MESSAGES[changed])
    ]
    prompt = first["cache_creation_input_tokens"]
    assert same["cache_read_input_tokens"] == prompt
    # The tools and the system prompt (~5k tokens) read, the conversation (~3k) written again.
    assert 4000 < other["cache_read_input_tokens"] < prompt - 2500
    assert other["cache_read_input_tokens"] + other["cache_creation_input_tokens"] == prompt


@pytest.mark.parametrize(
    ("fields", "found"),
    [
        ({"system": [marked(f"part {i}") for i in range(5)]}, 5),
        # The automatic breakpoint takes a fifth slot, unless the last block's own marker is where it goes.
        ({"system": [marked(f"part {i}") for i in range(4)], "cache_control": {"type": "ephemeral"}}, 5),
        ({"messages": [{"role": "user", "content": [marked(f"part {i}") for i in range(4)]}]}, None),
        (
            {
                "messages": [{"role": "user", "content": [marked(f"p {i}") for i in range(4)]}],
                "cache_control": {"type": "ephemeral"},
            },
            None,
        ),
    ],
)
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_more_than_four_cache_breakpoints_get_the_apis_400(
    mock: MockServer, fields: dict[str, Any], found: int | None, path: str
) -> None:
    status, answer, _ = await post(mock.url + path, ask(**fields))
    if found is None:
        assert status == 200, answer
    else:
        assert (status, answer["error"]["type"]) == (400, "invalid_request_error")
        assert answer["error"]["message"] == f"A maximum of 4 blocks with cache_control may be provided. Found {found}."


# ----- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "kind"),
    [
        ("GET", "/v1/nope", b"", 404, "not_found_error"),
        ("POST", "/v1/complete", b"{}", 404, "not_found_error"),
        ("GET", "/v1/messages", b"", 405, "invalid_request_error"),
        ("DELETE", "/v1/models", b"", 405, "invalid_request_error"),
        ("POST", "/v1/messages", b" " * (64 * 1024 * 1024 + 1), 413, "request_too_large"),
    ],
)
async def test_every_error_is_in_the_apis_shape_with_its_request_id(
    mock: MockServer, method: str, path: str, body: bytes, status: int, kind: str
) -> None:
    """An unknown path, a wrong method and an oversize body got aiohttp's plain text."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, mock.url + path, data=body, headers=HEADERS) as response,
    ):
        assert response.status == status and response.content_type == "application/json"
        error = await response.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and error["error"]["message"]
    assert error["request_id"] == response.headers["request-id"] and error["request_id"].startswith("req_")


async def test_the_sdk_sees_the_request_id_of_an_error(mock: MockServer) -> None:
    client = sdk(mock)
    try:
        with pytest.raises(anthropic.NotFoundError) as error:
            await client.messages.create(model="gpt-4", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    finally:
        await client.close()
    assert error.value.body["request_id"] == error.value.request_id and error.value.request_id.startswith("req_")


# ----- the admin API ---------------------------------------------------------------------------------------


async def test_a_one_shot_stream_fault_waits_for_a_stream(mock: MockServer) -> None:
    """count_tokens and a JSON answer used it up: the stream it was set for went through."""
    mock.set_fault(MOCK_KEYS[0], Fault(midstream_error_after=3, times=1))
    assert (await post(mock.url + "/v1/messages/count_tokens", {"model": MODEL, "messages": HI}))[0] == 200
    assert (await post(mock.url + "/v1/messages", ask()))[0] == 200
    streams = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(
                mock.url + "/v1/messages", data=orjson.dumps(ask(stream=True)), headers=HEADERS
            ) as r:
                streams.append(await r.text())
    assert "event: error" in streams[0] and "message_stop" not in streams[0]
    assert "event: error" not in streams[1] and "message_stop" in streams[1]


async def test_a_slow_answer_reports_the_windows_as_they_were_when_its_request_arrived(mock: MockServer) -> None:
    """The API counts a request as it arrives, then takes its time: a quicker answer to a request sent after a
    slow one reports one request fewer left than the slow one does. The mock counted a request once its
    `ttfb_ms` was over, so the slow answer came with the later picture."""
    mock.set_fault(MOCK_KEYS[0], Fault(ttfb_ms=300, times=1))
    async with aiohttp.ClientSession() as session:

        async def requests_left() -> int:
            async with session.post(mock.url + "/v1/messages", data=orjson.dumps(ask()), headers=HEADERS) as r:
                return int(r.headers["anthropic-ratelimit-requests-remaining"])

        slow = asyncio.create_task(requests_left())
        for _ in range(500):
            if mock.stats.requests_by_key.get(MOCK_KEYS[0]):
                break
            await asyncio.sleep(0.01)
        quick = await requests_left()
        assert quick == await slow - 1


async def test_a_slow_fault_delays_a_refusal_too(mock: MockServer) -> None:
    """A `ttfb_ms` fault with `times` is taken by the request it delays; a request the mock then refused (a model
    it does not have) used one up and was answered at once, so the slow answer a test waited for never came."""
    mock.set_fault(MOCK_KEYS[0], Fault(ttfb_ms=300, times=1))
    async with aiohttp.ClientSession() as session:
        began = asyncio.get_running_loop().time()
        async with session.post(
            mock.url + "/v1/messages", data=orjson.dumps(ask() | {"model": "claude-nonexistent-9"}), headers=HEADERS
        ) as r:
            assert r.status == 404
        # A lower bound only: a sleep is never shorter.
        assert asyncio.get_running_loop().time() - began >= 0.3


async def test_the_default_keys_fault_is_each_admitted_keys_own(tmp_path: Path) -> None:
    """`default_key: {fault: …}` was read and never applied: every key accept_any_key admitted was served."""
    path = tmp_path / "mock.yaml"
    path.write_text(
        f"accept_any_key: true\ndefault_key: {{fault: {{status: 529, times: 1}}}}\nkeys: {{{MOCK_KEYS[0]}: {{}}}}\n"
    )
    server = await start_mock(load_mock_config(path))
    try:

        async def status(key: str) -> int:
            return (await post(server.url + "/v1/messages", ask(), {**HEADERS, "x-api-key": key}))[0]

        answers = [await status(key) for key in (MOCK_KEYS[0], "sk-ant-new-1", "sk-ant-new-1", "sk-ant-new-2")]
        # A fault set for a key before its first request stands: the default one was put in its place.
        assert (await post(f"{server.url}/_mock/faults/sk-ant-new-4", {"status": 500}))[0] == 200
        answers.append(await status("sk-ant-new-4"))
        server.clear_faults()
        answers.append(await status("sk-ant-new-3"))
    finally:
        await server.stop()
    assert answers == [200, 529, 200, 529, 500, 200]


async def test_a_fault_with_an_unknown_field_is_refused_and_not_installed(mock: MockServer) -> None:
    faults = f"{mock.url}/_mock/faults/{MOCK_KEYS[0]}"
    status, error, _ = await post(faults, {"stauts": 500, "times": 1})
    assert status == 400 and "`stauts` (did you mean `status`?)" in error["error"]["message"]
    assert not mock.state.faults
    assert (await post(mock.url + "/v1/messages", ask()))[0] == 200
    # The right spelling still installs the fault; a bad value is refused as before.
    assert (await post(faults, {"status": 500, "times": 1}))[:2] == (200, {"ok": True})
    assert (await post(mock.url + "/v1/messages", ask()))[0] == 500
    assert (await post(faults, {"status": "loud"}))[0] == 400


async def test_a_fault_for_a_key_the_mock_does_not_serve_is_refused(mock: MockServer) -> None:
    """A misspelt key (`…-key-4` of a mock serving three) installed a fault no request would ever meet."""
    status, error, _ = await post(f"{mock.url}/_mock/faults/sk-ant-api03-mock-key-4", {"status": 529})
    assert status == 400 and "'sk-ant-api03-mock-key-4' is not a key this mock serves" in error["error"]["message"]
    assert MOCK_KEYS[0] in error["error"]["message"] and not mock.state.faults
    # A subscription account's requests are its key's, `oauth:<account id>`: their faults are taken.
    mock.state.oauth.create_account("acct-a")
    assert (await post(f"{mock.url}/_mock/faults/oauth:acct-a", {"status": 529}))[0] == 200


@pytest.mark.parametrize(
    "fault",
    [{"status": 99}, {"status": 200}, {"times": -1}, {"times": 0}, {"ttfb_ms": -5}, {"tokens_per_second": 0}],
)
async def test_a_fault_that_cannot_happen_is_refused(mock: MockServer, fault: dict[str, object]) -> None:
    """A status of 200 answered an error body with a 200 (relayed as a success), 99 read as "unreachable";
    a negative count or delay, or no pace at all, have no meaning."""
    status, error, _ = await post(f"{mock.url}/_mock/faults/{MOCK_KEYS[0]}", fault)
    assert status == 400 and next(iter(fault)) in error["error"]["message"]
    assert not mock.state.faults


async def test_a_deeply_nested_block_is_served_not_a_500(mock: MockServer) -> None:
    """The API takes a tool schema or content nested hundreds of levels deep; the mock's cache model could
    not serialise past 254 and answered a 500, which marks an account unhealthy: one such request put the
    whole pool into cooldown."""
    nested: dict[str, object] = {"type": "object"}
    for _ in range(200):  # 400 levels
        nested = {"type": "object", "properties": {"a": nested}}
    tool = {"name": "deep", "description": "d", "input_schema": nested, "cache_control": {"type": "ephemeral"}}
    status, message, _ = await post(mock.url + "/v1/messages", json.dumps(ask(tools=[tool])).encode())
    assert status == 200 and message["type"] == "message", message


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/_mock/oauth/accounts", {"id": "acct-t", "scope": ["user:inference"]}, "`scope` (did you mean `scopes`?)"),
        ("/_mock/oauth/accounts/acct-a/window", {"window": "five_hour", "stauts": "rejected"}, "`stauts`"),
        ("/_mock/oauth/accounts/acct-a/window", {"status": "rejcted"}, "'rejcted' is not one of"),
        ("/_mock/oauth/token-faults", {"status": [503]}, "`status` (did you mean `statuses`?)"),
        ("/_mock/oauth/token-faults", [503], "body must be a JSON object"),
        ("/_mock/oauth/token-faults", b"{not json", "body must be JSON"),
        # Values of the wrong kind were a 500 (`int("x")`), and a string of statuses its characters' faults.
        ("/_mock/oauth/token-faults", {"statuses": ["x"]}, "Expected `int`"),
        ("/_mock/oauth/token-faults", {"statuses": "503"}, "Expected `array`"),
        ("/_mock/oauth/token-faults", {"delay_ms": "abc"}, "Expected `float | null`"),
    ],
)
async def test_the_oauth_admin_refuses_fields_it_does_not_read(
    mock: MockServer, path: str, body: object, needle: str
) -> None:
    """In the API's error shape, as every error of the mock's (it was `{"error": "…"}`)."""
    mock.state.oauth.create_account("acct-a")
    status, error, _ = await post(mock.url + path, body, headers={"content-type": "application/json"})
    assert status == 400 and error["type"] == "error" and error["request_id"]
    assert error["error"]["type"] == "invalid_request_error" and needle in error["error"]["message"]
    assert "acct-t" not in mock.state.oauth.accounts and not mock.state.oauth.token_faults
    assert mock.state.oauth.accounts["acct-a"].windows["five_hour"].forced_status is None


async def test_the_oauth_admin_answers_an_unknown_account_404_in_the_apis_shape(mock: MockServer) -> None:
    """`{"error": "no such account"}` was no error a client of the API reads, and expiring one was `ok`."""
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("GET", "/_mock/oauth/accounts/nope"),
            ("POST", "/_mock/oauth/accounts/nope/expire"),
            ("POST", "/_mock/oauth/accounts/nope/revoke"),
        ):
            async with http.request(method, mock.url + path) as response:
                error = await response.json()
            assert response.status == 404 and error["type"] == "error", (path, error)
            assert error["error"] == {"type": "not_found_error", "message": "no such account"}, (path, error)


# ----- the config file -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("kees: {}\n", "unknown key `kees` (did you mean `keys`?)"),
        ("keys:\n  sk-x: {faul: {status: 529}}\n", "`keys.sk-x.faul` (did you mean `fault`?)"),
        ("keys:\n  sk-x: {fault: {stauts: 529}}\n", "`keys.sk-x.fault.stauts`"),
        ("oauth: {five_hour_budget: 10}\ndefault_key: {rpm: 5}\n", "unknown keys `oauth.five_hour_budget`"),
    ],
)
def test_a_config_file_key_nothing_reads_is_an_error_naming_it(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "mock.yaml"
    path.write_text(text)
    with pytest.raises(MockConfigError) as error:
        load_mock_config(path)
    assert str(error.value).startswith(f"{path}: ") and needle in str(error.value)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        # As the gateway's configuration says it: PyYAML's own message quoted the line, a caret and
        # `in "<unicode string>"`; a deep nesting was a RecursionError's traceback.
        (b"\xff\xfe", ": not UTF-8 text (byte 0 is 0xff)"),
        (b"keys: [\n", ":2: not valid YAML: expected the node content, but found '<stream end>'"),
        (b"[" * 2000, ": not valid YAML: nested too deeply"),
        (b"- a\n", "the top level must be a mapping"),
        (b"output_tokens: -5\n", "output_tokens"),
        (b"a: &a [*a]\n", "unknown key"),
        # Every request under it was a 500 and a traceback (no whole seconds of infinity for `retry-after`).
        (b"keys: {k: {fault: {status: 429, retry_after: .inf}}}\n", "fault.retry_after"),
    ],
)
def test_a_config_file_that_cannot_be_used_is_one_line_naming_it(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "mock.yaml"
    path.write_bytes(content)
    with pytest.raises(MockConfigError) as error:
        load_mock_config(path)
    assert str(error.value).startswith(str(path)) and needle in str(error.value) and "\n" not in str(error.value)
    assert "<unicode string>" not in str(error.value)


def test_a_config_file_without_keys_serves_the_demo_keys(tmp_path: Path) -> None:
    """It printed "keys: (any)" and then refused every key, the demo's too."""
    path = tmp_path / "mock.yaml"
    path.write_text("output_tokens: 5\n")
    assert set(load_mock_config(path).keys) == set(DEMO_KEYS)
    path.write_text("output_tokens: 5\naccept_any_key: true\n")
    assert load_mock_config(path).keys == {}


def test_a_complete_config_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "mock.yaml"
    path.write_text(
        "keys:\n  sk-a: {requests_per_minute: 5, fault: {status: 529, retry_after: 2, times: 1}}\n"
        "accept_any_key: true\noutput_tokens: 4\nmodels: [local-model]\nunlisted_models: []\ncompress: always\n"
        "default_key: {tokens_per_minute: 10}\noauth: {five_hour_budget_tokens: 10}\n"
    )
    config = load_mock_config(path)
    assert config.keys["sk-a"].fault is not None and config.keys["sk-a"].fault.retry_after == 2
    assert (config.models, config.unlisted_models, config.oauth.five_hour_budget_tokens) == (("local-model",), (), 10)


async def test_the_mock_upstream_command_refuses_a_typo_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "mock.yaml"
    config.write_text("kees:\n  sk-ant-api03-own-key: {}\n")
    process = await poolgate_cli("mock-upstream", "--port", "0", "--config", str(config), env={**os.environ})
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    text = output.decode().strip()
    assert process.returncode != 0, text
    assert "\n" not in text and "Traceback" not in text
    assert "mock.yaml" in text and "unknown key `kees`" in text


async def test_a_client_leaving_mid_stream_is_counted_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """wrk's connections closing at the end of a streaming cell left a traceback per stream in the mock's log
    ("Cannot write to closing transport"), where it would hide a real one."""
    server = await start_mock(MockConfig(keys={MOCK_KEYS[0]: MockKey()}), host="127.0.0.1", port=0)
    server.set_fault(MOCK_KEYS[0], Fault(tokens_per_second=200))  # still writing when the client leaves
    try:
        data = orjson.dumps(
            {"model": MODEL, "max_tokens": 400, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        )
        head = "".join(f"{name}: {value}\r\n" for name, value in HEADERS.items())
        request = f"POST /v1/messages HTTP/1.1\r\nhost: mock\r\n{head}content-length: {len(data)}\r\n\r\n"
        for read_first in (False, True) * 5:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request.encode() + data)
            if read_first:
                await reader.readuntil(b"event: message_start")
            writer.close()  # gone before the answer (or mid-stream), as wrk's connections at the end of a run
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
    finally:
        await server.stop()
    assert not [record for record in caplog.records if record.levelname == "ERROR"], caplog.text


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_a_connection_reset_by_a_fault_is_counted_as_such_not_as_a_client_that_left(
    mock: MockServer, path: str
) -> None:
    """`cancelled` is what tests and demos read to see the gateway cancel an upstream request when its client
    leaves; a reset the mock injected itself counted there too (for messages, not for count_tokens)."""
    mock.set_fault(MOCK_KEYS[0], Fault(reset_connection=True, times=1))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(mock.url + path, ask())
    assert (mock.stats.cancelled, mock.stats.resets) == (0, 1)


@pytest.mark.parametrize(
    ("model", "ran"), [("claude-opus-4-6", "fast"), ("claude-opus-4-8", "fast"), ("claude-sonnet-4-5", "standard")]
)
async def test_fast_mode_runs_only_on_the_models_that_have_it(mock: MockServer, model: str, ran: str) -> None:
    """A request asking `speed: "fast"` of a model without fast mode runs at standard speed, and its usage says
    so: the mock reported fast on every model, which the gateway then billed as a premium mode."""
    status, answer, _ = await post(mock.url + "/v1/messages", ask(model, speed="fast", inference_geo="us"))
    assert status == 200
    assert (answer["usage"]["speed"], answer["usage"]["inference_geo"]) == (ran, "us")

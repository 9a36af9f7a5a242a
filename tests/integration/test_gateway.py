"""The gateway through its real HTTP surface, driven by the anthropic SDK, in front of the mock upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from poolgate.api.admin import upstream_state
from poolgate.api.anthropic import LARGE_BODY, MAX_MODEL_ID
from poolgate.cli.main import app
from poolgate.config import AdminConfig, RoutingConfig, ServerConfig, UpstreamTimeouts
from poolgate.lifecycle import policy
from poolgate.mock import Fault, MockConfig, MockServer
from poolgate.store import repo
from poolgate.store.db import usage
from tests.conftest import (
    MOCK_KEYS,
    MODEL,
    RunningGateway,
    gateway_config,
    key_of,
    messages_request,
    start_gateway,
    usage_rows,
    user,
)
from tests.integration.test_relay_details import until_in_flight

# The gateway's own short wait when no account can serve (`routing.no_upstream_retry_after_seconds`).
NO_UPSTREAM_RETRY_AFTER = RoutingConfig().no_upstream_retry_after_seconds


async def stream_error(gw: RunningGateway) -> anthropic.APIStatusError:
    """The error a streamed answer ends with (the SDK raises an in-band `error` event)."""
    async with gw.client() as client:
        with pytest.raises(anthropic.APIStatusError) as failed:
            async with client.messages.stream(model=MODEL, max_tokens=64, messages=user()) as stream:
                async for _ in stream:
                    pass
    return failed.value


async def test_non_streaming_message_is_answered_and_accounted(gw: RunningGateway) -> None:
    async with gw.client() as client:
        raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=64, messages=user())
    message = await raw.parse()
    assert message.type == "message" and message.content[0].type == "text" and message.content[0].text
    assert raw.headers["request-id"].startswith("req_pg_")
    assert raw.headers["x-poolgate-upstream-request-id"]
    [row] = await usage_rows(gw)
    assert row["request_id"] == raw.headers["request-id"]
    assert row["status"] == 200 and row["outcome"] == "ok" and row["stream"] is False
    assert row["input_tokens"] == message.usage.input_tokens > 0
    assert row["output_tokens"] == message.usage.output_tokens > 0
    assert row["upstream_id"] in {"up-0", "up-1", "up-2"} and row["attempts"] == 1
    assert row["principal_name"] and row["model"] == MODEL


async def test_streaming_message_arrives_event_by_event_with_usage(gw: RunningGateway) -> None:
    async with gw.client() as client, client.messages.stream(model=MODEL, max_tokens=64, messages=user()) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds and "message_delta" in kinds
    [row] = await usage_rows(gw)
    assert row["stream"] is True and row["output_tokens"] == final.usage.output_tokens > 0
    assert row["input_tokens"] == final.usage.input_tokens and row["ttfb_ms"] is not None


async def test_beta_query_count_tokens_and_models(gw: RunningGateway, mock: MockServer) -> None:
    async with gw.client() as client:
        beta = await client.beta.messages.create(
            model=MODEL, max_tokens=16, messages=user(), betas=["interleaved-thinking-2025-05-14"]
        )
        counted = await client.messages.count_tokens(model=MODEL, messages=user("count these words please"))
        models = await client.models.list()
    assert beta.content and counted.input_tokens > 0
    ids = [model.id for model in models.data]
    assert MODEL in ids and len(ids) == len(set(ids))


async def test_a_model_the_listing_does_not_name_is_retrieved_from_an_account(
    gw: RunningGateway, mock: MockServer
) -> None:
    """`models.retrieve` takes an alias too (the API resolves `claude-sonnet-4-5` to its dated id): anything
    but an exact id of the listing was a 404, also Claude Code's default model when the listing lacked it."""
    unlisted = "claude-opus-4-8"  # served by the mock, not in its listing
    async with gw.client() as client:
        assert unlisted not in [model.id for model in (await client.models.list(limit=1000)).data]
        assert (await client.models.retrieve(unlisted)).id == unlisted
        with pytest.raises(anthropic.NotFoundError):
            await client.models.retrieve("gpt-4")  # no account serves it
    _, key = repo.create_key(gw.gateway.engine, "haiku-only", {"models": ["claude-haiku-*"]})
    gw.gateway.reload()
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
        with pytest.raises(anthropic.NotFoundError):
            await client.models.retrieve(unlisted)  # not the caller's to use


async def test_an_alias_a_caller_and_an_account_may_use_is_retrieved_as_the_model_it_stands_for(
    tmp_path: Path, mock: MockServer
) -> None:
    """The API answers an alias's lookup with the dated model it stands for (`claude-opus-4-1` is
    `claude-opus-4-1-20250805`). A caller allowed the alias by name, and an account whose globs name it, send
    and serve it, yet its lookup was a 404: the dated id, outside their globs, was checked instead of the one
    asked for."""
    alias, dated = "claude-opus-4-1", "claude-opus-4-1-20250805"
    config = gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1])
    config = config.model_copy(update={"upstreams": (config.upstreams[0].model_copy(update={"models": (alias,)}),)})
    gw = await start_gateway(config)
    try:
        _, key = repo.create_key(gw.gateway.engine, "opus-4-1", {"models": [alias]})
        gw.gateway.reload()
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
            assert (await client.messages.create(model=alias, max_tokens=16, messages=user())).content
            assert (await client.models.retrieve(alias)).id == dated
            with pytest.raises(anthropic.NotFoundError):
                await client.models.retrieve(dated)  # not the caller's to use, nor the account's to serve
    finally:
        await gw.stop()


async def test_model_ids_longer_than_a_request_may_name_are_not_looked_up_nor_remembered(gw: RunningGateway) -> None:
    """`GET /v1/models/{id}` with an id up to a head's 64 KB, made up per call, filled the allow-list memo
    (4,096 ids) and the lookups remembered (1,024): ~250 MB held from one caller with model globs."""
    _, key = repo.create_key(gw.gateway.engine, "globbed", {"models": ["claude-*"]})
    gw.gateway.reload()
    too_long = [f"claude-{index}-" + "x" * (MAX_MODEL_ID + 1000) for index in range(20)]
    policy._matched.clear()  # a full memo would not grow either
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
        with pytest.raises(anthropic.NotFoundError):
            await client.models.retrieve(too_long[0])
        memo_size = sum(map(len, policy._matched.values()))
        for model_id in too_long[1:]:
            with pytest.raises(anthropic.NotFoundError):
                await client.models.retrieve(model_id)
    assert sum(map(len, policy._matched.values())) == memo_size
    assert gw.gateway._models is not None
    assert all(len(model_id) <= MAX_MODEL_ID for model_id in gw.gateway._models._retrieved)


async def test_a_base_url_ending_in_v1_is_a_400_naming_the_variable_to_fix(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """`ANTHROPIC_BASE_URL=http://host:port/v1` sends `/v1/v1/messages`: its 404 Claude Code showed only as
    "There's an issue with the selected model"; a 400's message it prints. Other unknown paths stay 404s."""
    async with anthropic.AsyncAnthropic(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0) as client:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    assert refused.value.response.json()["error"]["type"] == "invalid_request_error"
    said = refused.value.message
    assert "the base URL must not end in /v1" in said and "ANTHROPIC_BASE_URL" in said and "http://host:port" in said
    assert any("base URL ends in /v1" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/v1/v1/models", headers={"x-api-key": gw.key}) as listed:
            assert listed.status == 400 and "must not end in /v1" in (await listed.json())["error"]["message"]
        async with http.get(f"{gw.url}/anthropic/v1/models", headers={"x-api-key": gw.key}) as prefixed:
            said = (await prefixed.json())["error"]["message"]
            assert prefixed.status == 400 and "poolgate serves its API at the root, not under /anthropic" in said
        # A base URL ending in / joined by hand: the message said "not under /".
        async with http.post(f"{gw.url}//v1/messages", headers={"x-api-key": gw.key}) as doubled:
            said = (await doubled.json())["error"]["message"]
            assert doubled.status == 400 and "the path begins with //, not /" in said and "trailing /" in said
        for unknown_path in ("/v2/whatever", "/anthropic/v1/whatever"):
            async with http.post(f"{gw.url}{unknown_path}", headers={"x-api-key": gw.key}) as unknown:
                assert unknown.status == 404 and (await unknown.json())["error"]["type"] == "not_found_error"


async def test_the_gateway_key_never_reaches_the_upstream(gw: RunningGateway, mock: MockServer) -> None:
    async with gw.client() as client:
        await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    headers = {name.lower(): value for name, value in mock.stats.last_request_headers.items()}
    assert headers["x-api-key"] in MOCK_KEYS
    assert gw.key not in str(mock.stats.last_request_headers)
    assert "authorization" not in headers


async def test_failover_moves_a_request_off_an_overloaded_account(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=529))
        mock.set_fault(MOCK_KEYS[1], Fault(reset_connection=True))
        async with running.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.headers["x-poolgate-upstream"] == "up-2"
        [row] = await usage_rows(running)
        assert row["attempts"] == 3 and row["upstream_id"] == "up-2" and row["status"] == 200
    finally:
        await running.stop()


async def test_a_429_with_retry_after_parks_that_account(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=429, retry_after=60, times=1))
        async with running.client() as client:
            for _ in range(3):
                raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
                assert raw.headers["x-poolgate-upstream"] == "up-1"
        # One 429 reached key a; while parked it got nothing more although it is first in line.
        assert mock.stats.requests_by_key[MOCK_KEYS[0]] == 1
    finally:
        await running.stop()


async def test_a_count_tokens_429_leaves_every_account_to_messages(gw: RunningGateway, mock: MockServer) -> None:
    """Counting tokens has rate limits of its own at the API, apart from Messages': a caller counting tokens
    faster than they allow (no quota limits it: counting is free) had each account it tried parked for the
    429's retry-after, and every caller's messages then got the pool's 529 for that long."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(status=429, retry_after=60, times=1))
    async with gw.client() as client:
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.count_tokens(model=MODEL, messages=user())
        assert all(mock.stats.requests_by_key[key] == 1 for key in MOCK_KEYS)
        answer = await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    assert answer.content


@pytest.mark.parametrize("parked_for", [30, 3600])
async def test_every_account_parked_answers_529_and_says_not_to_retry_only_a_long_wait(
    gw: RunningGateway, mock: MockServer, parked_for: int
) -> None:
    """Parked accounts (an upstream 429 with `retry-after`) leave a 529 whose `retry-after` is when the first
    is back. Over a minute, `x-should-retry: false` as well: SDKs that wait at most a minute would retry at
    once until their retries run out, others would sleep the whole hour; the message says why now. The
    upstream's own 429 that parked the last of them says the account's wait when it is short; an hour (the
    API says `x-should-retry: true` with it) is that account's, not the pool's: the gateway's short wait."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(status=429, retry_after=parked_for, times=1))
    async with gw.client() as client:
        with pytest.raises(anthropic.RateLimitError) as passed_through:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    advice = passed_through.value.response.headers
    assert (advice["retry-after"], advice.get("x-should-retry")) == (
        (str(parked_for), "true") if parked_for <= 60 else (str(NO_UPSTREAM_RETRY_AFTER), None)
    )
    # With the SDK's default retries when the wait is long: refused at once.
    retries = {"max_retries": 0} if parked_for <= 60 else {}
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, **retries) as client:
        with pytest.raises(anthropic.APIStatusError) as refused:
            await asyncio.wait_for(client.messages.create(model=MODEL, max_tokens=8, messages=user()), 20)
    response = refused.value.response
    assert refused.value.status_code == 529 and parked_for - 5 < int(response.headers["retry-after"]) <= parked_for
    assert response.headers.get("x-should-retry") == ("false" if parked_for > 60 else None)
    # Told not to retry, the caller is told when instead.
    says_when = "the first may be tried again in 1 h, at " in str(refused.value.message)
    assert says_when == (parked_for > 60), refused.value.message
    assert mock.stats.requests_total == 3, "nothing more was sent upstream"


async def test_an_account_that_rejected_its_key_once_and_then_rate_limits_counts_for_when_to_retry(
    gw: RunningGateway, mock: MockServer
) -> None:
    """A 429 is the API's answer to a credential it took: the account's earlier 401 is over. Left standing, it
    kept the account out of those a retry may go to, and the client was told to wait for the others' 40 s
    while it was back in 3."""
    mock.set_fault(MOCK_KEYS[0], Fault(status=401, times=1))
    async with gw.client() as client:
        await client.messages.create(model=MODEL, max_tokens=8, messages=user())  # failed over from its 401
        mock.set_fault(MOCK_KEYS[0], Fault(status=429, retry_after=3, times=1))
        for key in MOCK_KEYS[1:]:
            mock.set_fault(key, Fault(status=429, retry_after=40, times=1))
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    assert int(limited.value.response.headers["retry-after"]) <= 3


async def test_an_api_keys_403_holds_it_out_of_that_models_requests_only(tmp_path: Path, mock: MockServer) -> None:
    """An API key's 403 is a permission its organization lacks (a model, a feature), not a rejected key: counted
    as a credential failure, three of them took the account out for every model, and its other models' traffic
    went to the fallbacks (or nowhere)."""
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    other = "claude-haiku-4-5"
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=403, times=1))
        async with running.client() as client:
            for _ in range(4):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                await client.messages.create(model=other, max_tokens=8, messages=user())
        rows = await usage_rows(running)
        state = running.gateway.pool.get("up-0")
        assert state is not None
        shown = upstream_state(state, time.monotonic(), None)
    finally:
        await running.stop()
    # The first request failed over from the primary's 403; its model's later ones went to the fallback at once.
    assert [(row["upstream_id"], row["attempts"]) for row in rows if row["model"] == MODEL] == [
        ("up-1", 2),
        *[("up-1", 1)] * 3,
    ]
    # The primary serves its other models as before, and is healthy: a 403 is not a rejected credential.
    assert {row["upstream_id"] for row in rows if row["model"] == other} == {"up-0"}
    assert state.health.healthy and state.health.consecutive_failures == 0
    assert list(shown["denied_models"]) == [MODEL] and 0 < shown["denied_models"][MODEL] <= 600  # type: ignore[index]


async def test_a_403_for_an_alias_holds_its_dated_model_too(tmp_path: Path, mock: MockServer) -> None:
    """`claude-sonnet-4-5` and `claude-sonnet-4-5-20250929` are one model: a 403 for one held the account out of
    it alone, and the other cost a 403 of every account again."""
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=403, times=1))
        async with running.client() as client:
            await client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=user())
            await client.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=8, messages=user())
        rows = await usage_rows(running)
    finally:
        await running.stop()
    assert [(row["upstream_id"], row["attempts"]) for row in rows] == [("up-1", 2), ("up-1", 1)]


async def test_a_model_every_account_answers_403_for_is_a_403_not_a_500(gw: RunningGateway, mock: MockServer) -> None:
    """Every account refusing a model was answered as a rejected credential, a 500 the SDKs and Claude Code
    retry (ten times); the model is what no account may use: a 403 saying so, not to be retried."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(status=403))
    async with gw.client() as client:
        for _ in range(2):  # the second as the first: the accounts are held out of the model, and tried anyway
            with pytest.raises(anthropic.PermissionDeniedError) as denied:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert denied.value.response.headers["x-should-retry"] == "false"
            assert f"may not use model {MODEL!r}" in denied.value.message
    assert mock.stats.requests_total == 6


async def test_an_account_answering_403_to_everything_holds_out_a_bounded_number_of_made_up_models(
    tmp_path: Path, mock: MockServer
) -> None:
    """An account whose organization may use nothing answers every request 403, and the model held out is the
    one the caller named: a client making up a model id per request grew the account's holds (and the admin
    API's `denied_models`) by one a request, none ever let go."""
    from poolgate.upstreams.pool import MAX_DENIED_MODELS

    token = "admin-token-0123456789abcdef"
    running = await start_gateway(
        gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1], admin=AdminConfig(token=token))
    )
    mock.set_fault(MOCK_KEYS[0], Fault(status=403))
    made_up = [f"claude-made-up-{i}" for i in range(MAX_DENIED_MODELS + 20)]
    try:
        async with running.client() as client:
            for model in made_up:
                with pytest.raises(anthropic.PermissionDeniedError):
                    await client.messages.create(model=model, max_tokens=8, messages=user())
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{running.url}/admin/upstreams", headers={"x-admin-token": token}) as listed,
        ):
            (account,) = (await listed.json())["upstreams"]
    finally:
        await running.stop()
    assert len(account["denied_models"]) == MAX_DENIED_MODELS
    assert made_up[-1] in account["denied_models"] and made_up[0] not in account["denied_models"]


async def test_one_callers_403s_do_not_shut_a_model_off_for_the_others(gw: RunningGateway, mock: MockServer) -> None:
    """A 403 may be for a feature one request asked for (a beta its organization lacks), not for the model:
    one such request held every account out of the model, and every other caller's requests for it were
    refused for ten minutes without an account asked. Held accounts are tried when no other is left, and an
    answer for the model lifts its hold."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(status=403, times=1))
    async with gw.client() as client:
        with pytest.raises(anthropic.PermissionDeniedError):
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        answer = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
    assert (await answer.parse()).usage.output_tokens > 0
    served = gw.gateway.pool.get(answer.headers["x-poolgate-upstream"])
    assert served is not None and not served.holds_out(MODEL)
    rows = await usage_rows(gw)
    assert [(row["status"], row["attempts"]) for row in rows] == [(403, 3), (200, 1)]


async def test_a_403_from_the_last_account_tried_is_retried_while_others_may_serve(
    tmp_path: Path, mock: MockServer
) -> None:
    """The attempts stopped at `max_attempts` on two accounts that answered 403 for the model, a third left
    untried: the client got the 403, which no SDK retries unless told, though the retry would have gone to
    the third (the two are held out of the model)."""
    routing = RoutingConfig(strategy="first-pick", max_attempts=2)
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    for key in MOCK_KEYS[:2]:
        mock.set_fault(key, Fault(status=403))
    try:
        async with running.client() as client:
            retrying = client.with_options(max_retries=1)
            raw = await retrying.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await running.stop()
    assert raw.headers["x-poolgate-upstream"] == "up-2"


@pytest.mark.parametrize(
    ("fault", "stream"),
    [(Fault(status=529), False), (Fault(midstream_error_after=0), True)],  # a 529, or a 200 opening with one
)
async def test_when_every_account_fails_the_client_gets_an_overloaded_error(
    gw: RunningGateway, mock: MockServer, fault: Fault, stream: bool
) -> None:
    for key in MOCK_KEYS:
        mock.set_fault(key, fault)
    async with gw.client() as client:
        with pytest.raises(anthropic.APIStatusError) as failed:
            if stream:
                async with client.messages.stream(model=MODEL, max_tokens=64, messages=user()) as answer:
                    await answer.get_final_message()
            else:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    assert failed.value.status_code == 529 and failed.value.response.headers["retry-after"].isdigit()
    assert failed.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    [row] = await usage_rows(gw)
    assert row["status"] == 529 and row["attempts"] == 3


async def test_a_mid_stream_failure_becomes_an_error_event_and_the_stream_ends(
    gw: RunningGateway, mock: MockServer
) -> None:
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(midstream_error_after=3))
    assert "Overloaded" in str(await stream_error(gw))
    [row] = await usage_rows(gw)
    assert row["outcome"] == "stream_error" and row["error_type"] == "overloaded_error"
    assert row["attempts"] == 1, "no failover after the first byte"


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        (Fault(midstream_error_after=2), "an overloaded_error event mid-stream"),
        (Fault(tokens_per_second=1), "a stream that broke off mid-way"),  # a stall past idle_seconds
    ],
    ids=["error-event", "stall"],
)
async def test_an_account_that_breaks_every_stream_mid_way_is_taken_out_and_its_session_moves(
    tmp_path: Path, mock: MockServer, fault: Fault, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Claude Code streams every turn: an account whose streams all broke after their first event stayed
    healthy (each first event reset its streak of failures) and kept the session, every turn an error. The
    log says why it is out (a stall was "after connect", a connection problem to look for)."""
    caplog.set_level(logging.WARNING, logger="poolgate.relay")
    config = gateway_config(tmp_path, mock.url, timeouts=UpstreamTimeouts(idle_seconds=0.5))
    running = await start_gateway(config)
    body = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": user()}
    headers = {"x-api-key": running.key, "anthropic-version": "2023-06-01", "x-claude-code-session-id": "s"}

    async def turn(http: aiohttp.ClientSession) -> tuple[str, bool]:
        async with http.post(f"{running.url}/v1/messages", json=body, headers=headers) as response:
            answer = await response.read()
        return response.headers["x-poolgate-upstream"], b"event: error" in answer

    try:
        async with aiohttp.ClientSession() as http:
            home, broke = await turn(http)
            assert not broke
            mock.set_fault(key_of(home), fault)
            turns = [await turn(http) for _ in range(6)]
    finally:
        await running.stop()
    broken = [upstream for upstream, broke in turns if broke]
    # Three in a row (`health.failure_threshold`) take the account out; the session goes on elsewhere, whole.
    assert broken == [home] * 3, turns
    [(new_home, _)] = set(turns[3:])
    assert new_home != home, turns
    out = [r.getMessage() for r in caplog.records if r.name == "poolgate.relay" and "unhealthy" in r.getMessage()]
    assert out == [f"upstream {home} is unhealthy after {why} (3 in a row): no traffic for 30.0 s"], out


async def test_a_stream_that_opens_with_an_overloaded_error_fails_over(gw: RunningGateway, mock: MockServer) -> None:
    """The API reports overload on a stream as a 200 whose first event is `error`: nothing but headers had
    reached the client, yet it got that error while the other accounts were healthy."""
    mock.set_fault(MOCK_KEYS[0], Fault(midstream_error_after=0))
    async with gw.client() as client:
        for _ in range(len(MOCK_KEYS)):  # round-robin: one of them starts on the overloaded account
            async with client.messages.stream(model=MODEL, max_tokens=64, messages=user()) as stream:
                message = await stream.get_final_message()
            assert message.content[0].type == "text" and message.usage.output_tokens > 0
    rows = await usage_rows(gw)
    assert {row["outcome"] for row in rows} == {"ok"} and sorted(row["attempts"] for row in rows) == [1, 1, 2]


SLOW_TOKENS_PER_SECOND = 4


async def leave_slow_streams(gw: RunningGateway, mock: MockServer, delays: list[float]) -> list[dict[str, object]]:
    """Slow streams that their clients leave: the n-th starts 0.2 s after the one before it and is left
    `delays[n]` seconds after its first bytes. Waits until the mock has seen every upstream request
    cancelled and every usage record is written; returns the records."""
    for key in MOCK_KEYS:
        # The mock's 16-token answers at 4 tokens/s: 4 s, well past every client's leaving even on a busy
        # machine (at 20 tokens/s an answer ended as its client left, and was not cancelled).
        mock.set_fault(key, Fault(tokens_per_second=SLOW_TOKENS_PER_SECOND))
    body = {"model": MODEL, "max_tokens": 200, "stream": True, "messages": user()}
    headers = {"x-api-key": gw.key, "anthropic-version": "2023-06-01"}

    async def leave_after(delay: float, session: aiohttp.ClientSession) -> None:
        response = await session.post(f"{gw.url}/v1/messages", json=body, headers=headers)
        await response.content.readany()
        await asyncio.sleep(delay)
        response.close()

    async with aiohttp.ClientSession() as session:
        clients = []
        for index, delay in enumerate(delays):
            if index:
                await asyncio.sleep(0.2)
            clients.append(asyncio.create_task(leave_after(delay, session)))
        await asyncio.gather(*clients)
    for _ in range(500):
        if mock.stats.cancelled >= len(delays):
            break
        await asyncio.sleep(0.02)
    assert mock.stats.cancelled == len(delays)
    for _ in range(500):
        rows = await usage_rows(gw)
        if len(rows) == len(delays):
            break
        await asyncio.sleep(0.02)
    return rows


async def test_a_client_disconnect_cancels_the_upstream_request(gw: RunningGateway, mock: MockServer) -> None:
    [row] = await leave_slow_streams(gw, mock, [0.0])
    assert row["outcome"] == "client_disconnected"
    # What the stream had reported before the client left (message_start's prompt) is billed upstream: kept.
    assert row["input_tokens"] > 0 and row["cost_micro_usd"] > 0


async def test_a_stream_left_midway_is_billed_the_output_it_had_delivered(gw: RunningGateway, mock: MockServer) -> None:
    """Claude Code's Esc: the answer so far was generated (and is billed upstream), but its final usage
    never comes. The record estimates the output from what was passed on, not message_start's 1."""
    [row] = await leave_slow_streams(gw, mock, [1.5])  # ~6 of the answer's 16 tokens delivered by then
    assert row["outcome"] == "client_disconnected"
    assert 4 <= row["output_tokens"] < MockConfig().output_tokens, row["output_tokens"]


async def test_clients_that_leave_at_different_times_each_cancel_their_upstream_request(
    gw: RunningGateway, mock: MockServer
) -> None:
    """One timer starts the disconnect watch of all requests in flight: requests that arrive at different
    times, and leave while others are still watched (the second is due later and leaves first), are each
    cancelled."""
    rows = await leave_slow_streams(gw, mock, [0.6, 0.05])
    assert [row["outcome"] for row in rows] == ["client_disconnected"] * 2


@pytest.mark.parametrize("access_log", [True, False])
async def test_each_finished_request_is_logged_unless_the_access_log_is_off(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture, access_log: bool
) -> None:
    """`server.access_log: false` switched off only uvicorn's line: poolgate's own one per request stayed."""
    config = gateway_config(tmp_path, mock.url, server=ServerConfig(access_log=access_log))
    caplog.set_level(logging.INFO)
    running = await start_gateway(config)
    try:
        async with running.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        await running.gateway.flush_usage()
    finally:
        await running.stop()
    lines = [r.getMessage() for r in caplog.records if r.name in ("poolgate.access", "uvicorn.access")]
    if access_log:
        [line] = lines
        assert " messages key=test-0 upstream=up-0 model=" in line and "status=200 outcome=ok" in line
    else:
        assert lines == []


async def test_the_access_log_says_dash_for_what_a_request_never_had(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An unreadable request has no model and was never routed: its line read `upstream=None model=""`."""
    caplog.set_level(logging.INFO, logger="poolgate.access")
    running = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        async with aiohttp.ClientSession() as http:
            response = await http.post(f"{running.url}/v1/messages", data=b"{", headers={"x-api-key": running.key})
            assert response.status == 400
        await running.gateway.flush_usage()
    finally:
        await running.stop()
    [line] = [r.getMessage() for r in caplog.records if r.name == "poolgate.access"]
    assert " upstream=- model=- status=400 " in line


async def test_a_caller_chosen_model_cannot_plant_fields_in_the_access_log(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Control characters were escaped, but spaces and `=` went through: a model named like the line's own
    fields made one line say `upstream=up-1 status=200 outcome=ok` for a refused request."""
    caplog.set_level(logging.INFO, logger="poolgate.access")
    planted = 'claude-x upstream=up-9 status=200 outcome=ok "in=1'
    running = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        async with running.client() as client:
            with pytest.raises(anthropic.APIStatusError):
                await client.messages.create(model=planted, max_tokens=8, messages=user())
        await running.gateway.flush_usage()
    finally:
        await running.stop()
    [line] = [r.getMessage() for r in caplog.records if r.name == "poolgate.access"]
    pairs = [token.split("=", 1) for token in shlex.split(line) if "=" in token]
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), line
    fields = dict(pairs)
    assert fields["model"] == planted and fields["upstream"] == "up-0" and fields["status"] == "404"


async def test_a_5xx_takes_an_account_out_until_its_cooldown_ends(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    from poolgate.config import HealthConfig, ScoreWeights

    # Health alone: without the `errors` score term, which rightly keeps a just-failed account second
    # for a while after it is usable again.
    config = gateway_config(
        tmp_path,
        mock.url,
        routing=RoutingConfig(strategy="first-pick", score_weights=ScoreWeights(errors=0)),
        # Long enough for the three requests below to be sent within it on a busy machine.
        health=HealthConfig(cooldown_seconds=2.0),
    )
    caplog.set_level(logging.INFO, logger="poolgate.relay")
    running = await start_gateway(config)
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=500, times=1))
        async with running.client() as client:
            for _ in range(3):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert mock.stats.requests_by_key[MOCK_KEYS[0]] == 1
            await asyncio.sleep(2.1)
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.headers["x-poolgate-upstream"] == "up-0", "after the cooldown the recovered account is used again"
        logged = [r.getMessage() for r in caplog.records if r.name == "poolgate.relay"]
        assert logged == [
            "upstream up-0 is unhealthy after server_error (1 in a row): no traffic for 2.0 s",
            "upstream up-0 is healthy again",
        ]
    finally:
        await running.stop()


async def served_by(client: anthropic.AsyncAnthropic) -> str:
    """The account that answered a small request."""
    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
    return raw.headers["x-poolgate-upstream"]


async def test_a_probe_answered_429_does_not_keep_the_account_out_for_good(tmp_path: Path, mock: MockServer) -> None:
    """After its cooldown an account gets one probe; a probe that ends without a verdict (here a 429 that
    parks the account) frees the half-open slot, so the account is tried again once the 429's wait is over."""
    from poolgate.config import HealthConfig, ScoreWeights

    config = gateway_config(
        tmp_path,
        mock.url,
        routing=RoutingConfig(strategy="first-pick", score_weights=ScoreWeights(errors=0, latency=0)),
        health=HealthConfig(cooldown_seconds=0.3),
    )
    running = await start_gateway(config)
    try:
        async with running.client() as client:
            mock.set_fault(MOCK_KEYS[0], Fault(status=500, times=1))
            assert await served_by(client) == "up-1"  # up-0 failed over from, and cools down
            await asyncio.sleep(0.35)
            mock.set_fault(MOCK_KEYS[0], Fault(status=429, retry_after=0, times=1))
            assert await served_by(client) == "up-1"  # the probe of up-0 got the 429
            await asyncio.sleep(0.6)
            assert await served_by(client) == "up-0"
    finally:
        await running.stop()


@pytest.mark.parametrize("late_status", [500, 401])  # an error, or its credential rejected
async def test_a_request_from_before_the_account_failed_failing_late_leaves_its_probe_alone(
    tmp_path: Path, mock: MockServer, late_status: int
) -> None:
    """A request sent before an account went unhealthy that fails while the account's probe is in flight is not
    that probe's verdict: counted as it, it began a new episode and freed the half-open slot, and a second
    request went to the account beside its probe."""
    from poolgate.config import HealthConfig, ScoreWeights

    config = gateway_config(
        tmp_path,
        mock.url,
        keys=MOCK_KEYS[:2],
        routing=RoutingConfig(strategy="first-pick", score_weights=ScoreWeights(errors=0, latency=0)),
        health=HealthConfig(cooldown_seconds=0.3, cooldown_multipliers=(1.0,)),
    )
    running = await start_gateway(config)
    try:
        async with running.client() as client:
            mock.set_fault(MOCK_KEYS[0], Fault(status=late_status, ttfb_ms=1200, times=1))
            late = asyncio.create_task(served_by(client))  # sent while up-0 is healthy; its answer comes late
            # With up-0 before its fault is replaced (a set fault replaces the one before, unused or not).
            await until_in_flight(mock)
            mock.set_fault(MOCK_KEYS[0], Fault(status=500, times=1))
            assert await served_by(client) == "up-1"  # up-0 is unhealthy now, and cools down
            await asyncio.sleep(0.4)
            mock.set_fault(MOCK_KEYS[0], Fault(ttfb_ms=2500, times=1))
            probe = asyncio.create_task(served_by(client))  # up-0's probe, a slow success
            await until_in_flight(mock, 2)  # the probe is with up-0, beside the old request
            assert await late == "up-1"  # the old request's error, failed over, while the probe is in flight
            await asyncio.sleep(0.4)
            assert await served_by(client) == "up-1", "no second request beside the probe in flight"
            assert await probe == "up-0"
        assert running.gateway.pool.get("up-0").health.healthy  # type: ignore[union-attr]
    finally:
        await running.stop()


@pytest.mark.parametrize("probe_begins", ["before routing", "while the first attempt waits"])
async def test_a_failing_request_fails_over_to_a_recovered_account_whose_probe_is_in_flight(
    tmp_path: Path, mock: MockServer, probe_begins: str
) -> None:
    """An account past its cooldown takes one probe at a time. Its first request after a quiet spell is that
    probe, and it takes as long as any answer: meanwhile requests failing on another account passed it over
    (or were never routed to it) and got errors, though it had recovered long before."""
    from poolgate.config import ScoreWeights
    from poolgate.upstreams.health import doubt

    routing = RoutingConfig(strategy="first-pick", score_weights=ScoreWeights(errors=0, latency=0))
    running = await start_gateway(gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:2], routing=routing))
    try:
        recovered = running.gateway.pool.get("up-1")
        assert recovered is not None
        recovered.health.healthy, recovered.health.retry_at = False, 0.0  # unhealthy once, cooled down since
        recovered.health.probing = int(probe_begins == "before routing")  # another request's probe is in flight
        doubt()
        mock.set_fault(MOCK_KEYS[0], Fault(status=529, ttfb_ms=400, times=1))
        async with running.client() as client:
            request = asyncio.create_task(
                client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            )
            await asyncio.sleep(0.2)  # the request waits on up-0
            recovered.health.probing = 1
            raw = await request
        assert raw.status_code == 200 and raw.headers["x-poolgate-upstream"] == "up-1"
        assert recovered.health.healthy  # and its success says it has recovered
    finally:
        await running.stop()


@pytest.mark.parametrize("panic", [True, False])
async def test_when_every_account_is_cooling_down_one_is_tried_anyway(
    tmp_path: Path, mock: MockServer, panic: bool
) -> None:
    """A blip of 500s across the whole pool puts every account in a 30 s cooldown. Panic mode (the default)
    sends the next request to the account due soonest, which has recovered, so the gateway serves again at
    once; without it, the gateway answers 529 until a cooldown ends."""
    from poolgate.config import HealthConfig

    config = gateway_config(
        tmp_path,
        mock.url,
        keys=MOCK_KEYS[:2],
        routing=RoutingConfig(strategy="first-pick"),
        health=HealthConfig(cooldown_seconds=30, panic=panic),
    )
    running = await start_gateway(config)
    try:
        for key in MOCK_KEYS[:2]:
            mock.set_fault(key, Fault(status=500, times=1))
        async with running.client() as client:
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert mock.stats.requests_by_key[MOCK_KEYS[0]] == mock.stats.requests_by_key[MOCK_KEYS[1]] == 1
            # Readiness says what the next request meets: tried anyway (panic), or refused.
            async with aiohttp.ClientSession() as session, session.get(f"{running.url}/readyz") as r:
                assert (r.status, await r.json()) == (
                    200 if panic else 503,
                    {"ready": panic, "upstreams": 2, "usable": 0, "cooling_down": 2},
                )
            if not panic:
                with pytest.raises(anthropic.APIStatusError) as refused:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                assert refused.value.status_code == 529
                assert refused.value.response.headers["retry-after"]
                assert mock.stats.requests_by_key[MOCK_KEYS[0]] == 1, "nothing was sent upstream"
                return
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, messages=user(), extra_headers={"x-poolgate-trace": "1"}
            )
            assert raw.headers["x-poolgate-upstream"] == "up-0", "the account that failed first is due first"
            assert '"name":"panic"' in raw.headers["x-poolgate-route"]
            # Its success made it healthy: the next request is routed as usual, no panic.
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, messages=user(), extra_headers={"x-poolgate-trace": "1"}
            )
            assert raw.headers["x-poolgate-upstream"] == "up-0"
            assert '"name":"panic"' not in raw.headers["x-poolgate-route"]
    finally:
        await running.stop()


async def test_accounts_unhealthy_from_rejected_credentials_are_no_wait_when_nothing_is_tried(
    tmp_path: Path, mock: MockServer
) -> None:
    """Panic mode off: once three rejections each had made the accounts unhealthy, the router's own refusal
    counted them as cooling down, "back in 5 s" (retryable; before, a rate-limited account's 30 s), where the
    relay's answer for them had said no retry helps."""
    from poolgate.config import HealthConfig

    config = gateway_config(tmp_path, mock.url, health=HealthConfig(cooldown_seconds=5, panic=False))
    running = await start_gateway(config)
    statuses = []
    try:
        for key in MOCK_KEYS[:2]:
            mock.set_fault(key, Fault(status=401))
        mock.set_fault(MOCK_KEYS[2], Fault(status=429, retry_after=30))
        async with running.client() as client:
            for _ in range(5):  # three rejections each make up-0 and up-1 unhealthy
                with pytest.raises(anthropic.APIStatusError) as refused:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                statuses.append(refused.value.status_code)
            error = refused.value
            assert "up-0: credential rejected" in error.message and "up-2: rate_limited" in error.message
            assert 25 <= int(error.response.headers["retry-after"]) <= 30, statuses
    finally:
        await running.stop()
    # Every account's credential rejected: the operator's to fix, said so, not to be retried.
    mock.set_fault(MOCK_KEYS[2], Fault(status=401))
    running = await start_gateway(config)
    try:
        async with running.client() as client:
            for _ in range(4):  # three rejections each, then the router's refusal
                with pytest.raises(anthropic.APIStatusError) as refused:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        error = refused.value
        assert error.status_code == 503 and error.response.headers["x-should-retry"] == "false"
        assert "up-2: credential rejected" in error.message and "gives an account a valid key" in error.message
    finally:
        await running.stop()


async def test_panic_mode_tries_an_account_a_wait_may_cure_never_a_rejected_credential(
    tmp_path: Path, mock: MockServer
) -> None:
    """Panic mode (the default) sent the one attempt to the account due first, a revoked key among them: the
    client got its 500 "credential rejected" while an account out after a blip of 500s had recovered; with
    every key revoked, each request went upstream to be rejected again, and `/readyz` said ready."""
    from poolgate.config import HealthConfig

    config = gateway_config(
        tmp_path,
        mock.url,
        routing=RoutingConfig(strategy="first-pick"),
        health=HealthConfig(cooldown_seconds=30, failure_threshold=1),
    )
    running = await start_gateway(config)
    try:
        for key in MOCK_KEYS[:2]:
            mock.set_fault(key, Fault(status=401))
        async with running.client() as client:
            # Served by up-2 after up-0 and up-1 rejected their keys, which took them out (one failure is enough).
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
            assert raw.headers["x-poolgate-upstream"] == "up-2"
            # A blip on up-2: out last, so due last.
            mock.set_fault(MOCK_KEYS[2], Fault(status=500, times=1))
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, messages=user(), extra_headers={"x-poolgate-trace": "1"}
            )
            assert raw.headers["x-poolgate-upstream"] == "up-2", "up-0 was due first"
            assert '"name":"panic"' in raw.headers["x-poolgate-route"]
            # Every key revoked: the operator's 503 at once, nothing sent upstream, and not ready.
            mock.set_fault(MOCK_KEYS[2], Fault(status=401))
            with pytest.raises(anthropic.APIStatusError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            sent = dict(mock.stats.requests_by_key)
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            assert refused.value.status_code == 503 and refused.value.response.headers["x-should-retry"] == "false"
            assert "up-0: credential rejected" in refused.value.message
            assert mock.stats.requests_by_key == sent, "nothing was sent upstream"
            async with aiohttp.ClientSession() as session, session.get(f"{running.url}/readyz") as r:
                assert (r.status, await r.json()) == (
                    503,
                    {"ready": False, "upstreams": 3, "usable": 0, "cooling_down": 0},
                )
    finally:
        await running.stop()


async def test_a_wait_of_a_fraction_of_a_second_is_told_to_the_millisecond(tmp_path: Path, mock: MockServer) -> None:
    """The official SDKs read `retry-after-ms` before `retry-after`: an account out for a 2.5 s cooldown was
    told as `retry-after: 3` alone, and the SDK waited up to a second longer than it had to before its retry
    (a 0.2 s cooldown: five times as long)."""
    from poolgate.config import HealthConfig

    cooldown = 2.5
    config = gateway_config(
        tmp_path, mock.url, keys=MOCK_KEYS[:1], health=HealthConfig(cooldown_seconds=cooldown, panic=False)
    )
    running = await start_gateway(config)
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=500, times=1))
        async with running.client() as client:
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert refused.value.status_code == 529
        headers = refused.value.response.headers
        milliseconds = int(headers["retry-after-ms"])
        # What is left of the cooldown: no more than it, and never 0 (the SDKs take 0 for "no wait given").
        assert 1 <= milliseconds <= cooldown * 1000
        # For clients that read only `retry-after`: the same wait in whole seconds, rounded up.
        assert int(headers["retry-after"]) == -(-milliseconds // 1000)
    finally:
        await running.stop()


async def raw_post(gw: RunningGateway, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    sent = {"x-api-key": gw.key, "content-type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as session, session.post(f"{gw.url}/v1/messages", data=data, headers=sent) as r:
        assert r.headers["request-id"].startswith("req_pg_")
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "Expected `object`"),
        # Paths as the API writes them (messages[0] read otherwise than the upstream's own 400s).
        (b'{"model": "m", "max_tokens": 1, "messages": [3]}', "messages.0: Expected `object`, got `int`"),
        (b'{"model": "m", "max_tokens": 1, "messages": [{"role": 1, "content": ""}]}', "messages.0.role:"),
        (b'{"model": 5, "max_tokens": 10, "messages": []}', "model: Expected `str`, got `int`"),
        (b'{"model": null, "max_tokens": 10, "messages": []}', "model: Expected `str`, got `null`"),
        (b'{"model": "m", "max_tokens": 1.5, "messages": []}', "max_tokens: Expected `int`, got `float`"),
        (b'{"model": "m", "max_tokens": true, "messages": []}', "max_tokens: Expected `int`, got `bool`"),
        (b'{"model": "m", "max_tokens": 1, "stream": "yes", "messages": []}', "stream: Expected `bool`, got `str`"),
        (b'{"model": "m", "max_tokens": "ten", "messages": []}', "max_tokens"),
        (b'{"model": "m", "messages": []}', "max_tokens"),
        (b'{"model": "m", "max_tokens": -1, "messages": []}', "max_tokens: must not be negative"),
        (
            b'{"model": "m", "max_tokens": 1, "messages": [], "metadata": {"user_id": "{\\"session_id\\": \\"'
            + b"s" * 129
            + b'\\"}"}}',
            "session id: at most 128",
        ),
        (b'{"model": "' + b"m" * 129 + b'", "max_tokens": 1, "messages": []}', "model: at most 128"),
        # msgspec says "Input data was truncated" of a whole body with half a surrogate pair in it.
        (
            b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "JSON is malformed: \\ud800 is half of a UTF-16 surrogate pair, without its other half (byte 75)",
        ),
    ],
)
async def test_bad_requests_get_a_clear_400(gw: RunningGateway, body: bytes, needle: str) -> None:
    status, payload = await raw_post(gw, body)
    assert status == 400
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert needle in payload["error"]["message"]
    # A known caller's request that could not be read is a finished request too: it leaves its record.
    await gw.gateway.flush_usage()
    with gw.gateway.engine.connect() as conn:
        [row] = conn.execute(select(usage)).all()
    assert (row.status, row.outcome, row.error_type) == (400, "client_error", "invalid_request_error")
    assert row.principal_name is not None and row.upstream_id is None and row.cost_micro_usd == 0


@pytest.mark.parametrize(
    ("endpoint", "twice", "field"),
    [
        # The allow-list, the price and the route would be the last model's, an upstream reading the first
        # would serve the other.
        ("/v1/messages", {"model": [MODEL, "claude-opus-4-1"]}, "model"),
        # Relayed as a stream the upstream may not send (every account then blamed as misconfigured).
        ("/v1/messages", {"stream": [False, True]}, "stream"),
        # A budget's estimate on 8 output tokens for an answer of up to 100,000.
        ("/v1/messages", {"max_tokens": [100_000, 8]}, "max_tokens"),
        ("/v1/messages/count_tokens", {"model": [MODEL, MODEL]}, "model"),
    ],
)
async def test_a_body_naming_a_field_the_upstream_reads_twice_is_refused(
    gw: RunningGateway, endpoint: str, twice: dict[str, list[object]], field: str
) -> None:
    [(name, values)] = twice.items()
    fields = {"model": MODEL, "max_tokens": 8, "messages": user()}
    fields.pop(name, None)
    if endpoint.endswith("count_tokens"):
        fields.pop("max_tokens")
    # orjson writes each key once: the repeated one is spliced in by hand, first and last.
    body = (
        b'{"%s": %s, ' % (name.encode(), orjson.dumps(values[0]))
        + orjson.dumps(fields)[1:-1]
        + b', "%s": %s}' % (name.encode(), orjson.dumps(values[1]))
    )
    sent = {"x-api-key": gw.key, "content-type": "application/json"}
    async with aiohttp.ClientSession() as session, session.post(gw.url + endpoint, data=body, headers=sent) as r:
        status, payload = r.status, await r.json()
    assert status == 400 and payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["message"].startswith(f"Invalid request: {field}: the body names it more than once")
    await gw.gateway.flush_usage()
    with gw.gateway.engine.connect() as conn:
        [row] = conn.execute(select(usage)).all()
    assert (row.status, row.upstream_id, row.attempts) == (400, None, 0)  # never sent upstream


async def test_keys_named_like_the_checked_fields_elsewhere_in_the_body_pass(gw: RunningGateway) -> None:
    """Only the top level's model, stream and max_tokens are counted: a tool whose schema has a `model`
    property (Claude Code's Task tool), metadata or message text naming them is an ordinary request."""
    body = {
        "model": MODEL,
        "max_tokens": 8,
        "messages": user('{"model": "claude-opus-4-1", "stream": true, "max_tokens": 1}'),
        "tools": [
            {
                "name": "task",
                "description": "Run a sub-agent",
                "input_schema": {"type": "object", "properties": {"model": {"type": "string"}, "stream": {}}},
            }
        ],
        "metadata": {"user_id": "u"},
    }
    status, answer = await raw_post(gw, orjson.dumps(body))
    assert status == 200 and answer["type"] == "message", answer


async def test_a_refused_request_is_counted_under_the_model_its_body_names(gw: RunningGateway) -> None:
    """The gateway's own 400s were all under model "-" in `usage --by model`, whichever model was asked for."""
    refused = [
        b'{"model": "claude-typo-1", "messages": [{"role": "user", "content": "hi"}]}',  # max_tokens missing
        b'{"model": "claude-typo-1", "max_tokens": "ten", "messages": []}',
        b'{"model": "' + b"m" * 200 + b'", "max_tokens": 1, "messages": []}',  # bounded as it is stored
        b'{"model": 5, "max_tokens": 1, "messages": []}',  # no model named
        b'{"model": "", "max_tokens": 1, "messages": []}',
        b"{not json",
    ]
    for body in refused:
        assert (await raw_post(gw, body))[0] == 400
    await gw.gateway.flush_usage()
    result = CliRunner().invoke(
        app, ["usage", "--by", "model", "--format", "json", "--data-dir", str(gw.gateway.config.data_dir)]
    )
    assert result.exit_code == 0, result.output
    by_model = {group["group"]: group["requests"] for group in json.loads(result.output)["groups"]}
    assert by_model == {"claude-typo-1": 2, "m" * 128: 1, "": 3}, by_model  # none named: "-" in the table


async def test_bad_and_revoked_keys_get_401_not_worth_a_retry(gw: RunningGateway) -> None:
    """Claude Code retries a 401 for three minutes, silently, unless told `x-should-retry: false`: a wrong
    or revoked gateway key stalled it that long before it said so."""
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key="pg-wrong", max_retries=0) as client:
        with pytest.raises(anthropic.AuthenticationError) as wrong:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    assert wrong.value.response.headers["x-should-retry"] == "false"
    repo.revoke_key(gw.gateway.engine, repo.list_keys(gw.gateway.engine)[0].id)
    gw.gateway.reload()
    async with gw.client() as client:
        with pytest.raises(anthropic.AuthenticationError) as revoked:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    assert "revoked" in str(revoked.value) and revoked.value.response.headers["x-should-retry"] == "false"


async def test_a_mistyped_or_revoked_gateway_key_is_told_what_to_do_and_that_a_claude_login_is_not_it(
    gw: RunningGateway,
) -> None:
    """Interactive Claude Code shows a 401 as "Please run /login · API Error: 401 …": "Invalid gateway key
    (revoked)" alone sent the developer to log in to claude.ai, which no gateway takes, instead of to the operator
    for a new key (or, for a mistyped one, to the variable that holds it)."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    status, refused = await raw_post(gw, body, {"x-api-key": "pg-mistyped-0123456789"})
    assert (status, refused["error"]["message"]) == (
        401,
        "Invalid gateway key (unknown): set ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN to the gateway key you were "
        "given (a Claude /login is no gateway key)",
    )
    repo.revoke_key(gw.gateway.engine, repo.list_keys(gw.gateway.engine)[0].id)
    gw.gateway.reload()
    status, refused = await raw_post(gw, body, {"authorization": f"Bearer {gw.key}"})
    assert (status, refused["error"]["message"]) == (
        401,
        "Invalid gateway key (revoked): ask the gateway's operator for a new key and set ANTHROPIC_API_KEY or "
        "ANTHROPIC_AUTH_TOKEN to it (a Claude /login is no gateway key)",
    )


async def test_bearer_auth_works_like_x_api_key(gw: RunningGateway) -> None:
    async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=gw.key, max_retries=0) as client:
        message = await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    assert message.content


async def test_a_gateway_key_in_the_bearer_opens_the_gateway_whatever_x_api_key_holds(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Claude Code sends both headers when ANTHROPIC_API_KEY (often the user's own Anthropic key, left in their
    shell) and ANTHROPIC_AUTH_TOKEN (the gateway key) are both set: it was a 401 "unknown gateway key". (The
    Python SDK sends one of them.)"""
    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    own_key = {"x-api-key": "sk-ant-api03-the-users-own-key-0123456789"}
    for _ in range(2):  # the second one as the key is remembered
        status, _ = await raw_post(gw, body, {**own_key, "authorization": f"Bearer {gw.key}"})
        assert status == 200
    assert "rejected" not in caplog.text
    # Neither a gateway key: the refusal is the x-api-key's, as ever, and the log names both.
    status, refused = await raw_post(gw, body, {**own_key, "authorization": "Bearer pg-not-a-key-0123456789"})
    assert (status, refused["error"]["message"]) == (
        401,
        "Invalid gateway key (unknown): an Anthropic API key was sent, not a key of this gateway; set "
        "ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN to the gateway key you were given",
    )
    assert caplog.text.count("rejected unknown gateway key sk-ant-api") == 1
    assert caplog.text.count("rejected unknown gateway key pg-no…") == 1


async def test_a_session_id_and_a_key_outside_ascii_are_read_as_the_utf8_clients_send(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Read as latin-1, a UTF-8 session id was kept in the ledger as mojibake (`s1 Ã¼`), and a refused key
    outside ASCII logged as `Ã\x90Âº…`."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    status, _ = await raw_post(gw, body, {"x-claude-code-session-id": "сессия-ü"})
    assert status == 200
    [row] = await usage_rows(gw)
    assert row["session_id"] == "сессия-ü"
    status, _ = await raw_post(gw, body, {"x-api-key": "ключ-0123456789abcdef"})
    assert status == 401 and "rejected unknown gateway key ключ" in caplog.text


async def test_a_header_too_long_to_send_on_is_the_client_s_431_not_the_pool_s_failure(
    gw: RunningGateway, mock: MockServer
) -> None:
    """A 20 KB header (within the gateway's 64 KiB head) went to every account, whose server refused its line
    (aiohttp's, nginx's 8 KB): a 400 read as each account's fault ("is its base_url the API's?"), the request
    failed over through the whole pool and counted in each one's errors."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    status, refused = await raw_post(gw, body, {"x-big": "a" * 20_000})
    assert status == 431 and refused["error"]["type"] == "invalid_request_error"
    assert "'x-big' is 20,000 bytes long" in refused["error"]["message"]
    assert mock.stats.requests_total == 0
    [row] = await usage_rows(gw)
    assert (row["status"], row["outcome"], row["attempts"]) == (431, "client_error", 0)
    # Up to the bound, it goes on.
    status, _ = await raw_post(gw, body, {"x-big": "a" * 8000})
    assert status == 200


async def test_too_many_headers_to_send_on_are_the_client_s_431_not_the_pool_s_failure(
    gw: RunningGateway, mock: MockServer
) -> None:
    """130 tiny headers (a 1.7 KB head) went to every account, whose server refused to count so many (aiohttp's
    128, Envoy's 100): a bare 400 from each in turn, read as its base_url's fault, one request three upstream
    requests and every account's error rate up."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    status, refused = await raw_post(gw, body, {f"x-h{number}": "v" for number in range(130)})
    assert status == 431 and refused["error"]["type"] == "invalid_request_error"
    # With the client's own three: content-type, accept, user-agent.
    assert "carries 133 headers to send on to the upstream: at most 90" in refused["error"]["message"]
    assert mock.stats.requests_total == 0
    [row] = await usage_rows(gw)
    assert (row["status"], row["outcome"], row["attempts"]) == (431, "client_error", 0)
    # Up to the bound, they go on.
    status, _ = await raw_post(gw, body, {f"x-h{number}": "v" for number in range(87)})
    assert status == 200


async def test_the_gateway_s_own_secret_sent_as_a_gateway_key_is_refused_without_a_part_of_it_in_the_log(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused key's first characters are logged (to tell keys apart); for the admin token or an account's key
    (any shape: a proxy's) that was a part of the gateway's own secret in its log."""
    admin_token, account_key = "Jei_NXh_Xk8lnws1_sW4YNN9-QzUmrC5", "proxy-account-key-0042"
    config = gateway_config(tmp_path, mock.url, keys=(*MOCK_KEYS, account_key), admin=AdminConfig(token=admin_token))
    running = await start_gateway(config)
    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    try:
        for secret in (admin_token, account_key):
            status, refused = await raw_post(running, body, {"x-api-key": secret})
            assert status == 401 and refused["error"]["message"].startswith("Invalid gateway key (unknown)")
    finally:
        await running.stop()
    assert caplog.text.count("rejected unknown gateway key: one of the gateway's own secrets") == 2
    assert admin_token[:4] not in caplog.text and account_key[:6] not in caplog.text


async def test_a_gateway_key_with_a_bearer_prefix_in_x_api_key_is_refused_saying_so(gw: RunningGateway) -> None:
    """`x-api-key: Bearer pg-…` (the Authorization header's form in the other header; or `Bearer` twice) is
    refused, as the API refuses it, with what to drop: a plain "Invalid gateway key" read as a wrong key."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    sent_as = (
        {"x-api-key": f"Bearer {gw.key}"},
        {"x-api-key": f"bearer  {gw.key}"},
        {"x-api-key": "", "authorization": f"Bearer Bearer {gw.key}"},
    )
    for headers in sent_as:
        status, refused = await raw_post(gw, body, headers)
        assert status == 401
        assert refused["error"]["message"] == (
            "Invalid gateway key (unknown): the key came with 'Bearer ' before it: set ANTHROPIC_API_KEY or"
            " ANTHROPIC_AUTH_TOKEN to the key alone (the client adds 'Bearer ' where it belongs)"
        )
        assert gw.key not in refused["error"]["message"]


async def test_an_oversize_body_gets_413(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url, server=ServerConfig(max_body_bytes=10_000)))
    try:
        status, payload = await raw_post(
            running, b'{"model":"m","max_tokens":1,"messages":[],"x":"' + b"a" * 20_000 + b'"}'
        )
        assert status == 413 and payload["error"]["type"] == "request_too_large"
        await running.gateway.flush_usage()
        with running.gateway.engine.connect() as conn:
            [row] = conn.execute(select(usage.c.status, usage.c.outcome)).all()
        assert tuple(row) == (413, "client_error")
    finally:
        await running.stop()


async def test_a_body_of_megabytes_is_refused_as_the_same_small_body_is(gw: RunningGateway) -> None:
    """A body over 4 MiB (a screenshot or two) was decoded without its messages first, then its messages: of two
    mistakes, a small body's refusal named the first (its messages) and a large one's the other."""
    mistakes = b'{"model":"m","messages":[{"role":"user","content":"hi"},{"content":"x"}],%s"max_tokens":"many"}'
    small = await raw_post(gw, mistakes % b"")
    large = await raw_post(gw, mistakes % (b" " * LARGE_BODY))
    assert small[0] == 400 and "messages.1: Object missing required field `role`" in small[1]["error"]["message"]
    assert large[1]["error"]["message"] == small[1]["error"]["message"]


async def test_probe_health_ready_and_unknown_paths(gw: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.head(f"{gw.url}/") as r:
            assert r.status == 200 and await r.read() == b""
            head_length = r.headers["content-length"]
        async with session.get(f"{gw.url}/") as r:
            assert r.headers["content-length"] == head_length  # HEAD's headers are GET's (it said 0)
        async with session.get(f"{gw.url}/healthz") as r:
            assert r.status == 200
        async with session.get(f"{gw.url}/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        # Whatever answers GET answers HEAD, without the body (a monitor's HEAD /readyz was a 405).
        for path in ("/readyz", "/healthz", "/v1/models", "/v1/models/claude-sonnet-4-5"):
            async with session.head(f"{gw.url}{path}", headers={"x-api-key": gw.key}) as r:
                assert r.status == 200 and await r.read() == b"" and int(r.headers["content-length"]) > 0, path
        async with session.get(f"{gw.url}/v1/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
        async with session.get(f"{gw.url}/v1/messages") as r:
            assert r.status == 405 and r.headers["request-id"]


async def test_claude_codes_preconnect_to_api_hello_is_answered_as_the_api_answers_it(
    gw: RunningGateway, mock: MockServer
) -> None:
    """Claude Code (2.1.332) opens its connection with `HEAD {ANTHROPIC_BASE_URL}/api/hello`, without a key, on
    every start (unless non-essential traffic is off); the API answers 200, the gateway and its mock a 404."""
    async with aiohttp.ClientSession() as session:
        for url in (gw.url, mock.url):
            async with session.head(f"{url}/api/hello") as r:
                assert r.status == 200, url
            async with session.get(f"{url}/api/hello") as r:
                assert r.status == 200, url


async def test_readyz_is_503_when_no_upstream_is_usable(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url, keys=()))
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{running.url}/readyz") as r:
            assert r.status == 503
        async with running.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        # The pool's 529 with its retry-after, but not to be retried (Claude Code retried it and showed "The API is
        # at capacity", not the message): only the operator can add one.
        headers = refused.value.response.headers
        assert refused.value.status_code == 529 and refused.value.type == "overloaded_error"  # type: ignore[attr-defined]
        assert headers["x-should-retry"] == "false" and int(headers["retry-after"]) > 0
        assert "No upstream accounts are configured or enabled" in refused.value.message
    finally:
        await running.stop()


async def test_usage_records_survive_a_restart(tmp_path: Path, mock: MockServer) -> None:
    config = gateway_config(tmp_path, mock.url)
    first = await start_gateway(config)
    async with first.client() as client:
        await asyncio.gather(*(client.messages.create(model=MODEL, max_tokens=8, messages=user()) for _ in range(20)))
    await first.stop()  # graceful stop drains the writer, as SIGTERM does
    second = await start_gateway(config, key=first.key)
    try:
        async with second.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        rows = await usage_rows(second)
        assert len(rows) == 21 and all(row["status"] == 200 for row in rows)
    finally:
        await second.stop()


async def test_keys_and_upstreams_changed_by_the_cli_reach_a_running_gateway(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url, keys=()))
    try:
        from poolgate.lifecycle.context import Upstream

        repo.add_upstream(
            running.gateway.engine,
            running.gateway.box,
            Upstream(id="added", kind="anthropic_api_key", base_url=mock.url),
            MOCK_KEYS[2],
        )
        _, new_key = repo.create_key(running.gateway.engine, "late")
        for _ in range(100):
            if running.gateway.readiness()["ready"] and running.gateway.authn.key_count == 2:
                break
            await asyncio.sleep(0.05)
        async with anthropic.AsyncAnthropic(base_url=running.url, api_key=new_key, max_retries=0) as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.headers["x-poolgate-upstream"] == "added"
    finally:
        await running.stop()


async def test_upstreams_add_replace_changes_a_stored_account_in_one_step_on_a_running_gateway(
    tmp_path: Path, mock: MockServer
) -> None:
    """A stored upstream's weight or key changed only by `upstreams remove` then `add`: between the two (a key
    typed at its prompt takes seconds) a running gateway had no such account, and every session on it moved to
    another and wrote its prompt cache again there. `add --replace` changes it in one step: a new weight keeps
    the account and what the gateway learned of it, a new key serves from the next reload on, and what is not
    given stays as it was."""
    running = await start_gateway(gateway_config(tmp_path, mock.url, keys=()))

    def upstreams(*args: str) -> str:
        result = CliRunner().invoke(app, ["upstreams", *args, "--data-dir", str(running.gateway.config.data_dir)])
        assert result.exit_code == 0, result.output
        return result.output

    try:
        upstreams("add", "stored", "--api-key", MOCK_KEYS[1], "--base-url", mock.url, "--model", "claude-*")
        running.gateway.reload()
        account = running.gateway.pool.get("stored")
        upstreams("add", "stored", "--replace", "--weight", "5")
        running.gateway.reload()
        assert running.gateway.pool.get("stored") is account
        assert (account.upstream.weight, account.upstream.models) == (5, ("claude-*",))
        upstreams("add", "stored", "--replace", "--api-key", MOCK_KEYS[2])
        running.gateway.reload()
        async with running.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert raw.headers["x-poolgate-upstream"] == "stored"
        assert MOCK_KEYS[1] not in mock.stats.requests_by_key and mock.stats.requests_by_key[MOCK_KEYS[2]] == 1
        [row] = [line for line in upstreams("list").splitlines() if "stored" in line]
        assert mock.url in row and "claude-*" in row and "│ 5 " in row
    finally:
        await running.stop()


async def test_an_account_that_reports_no_requests_left_stops_getting_traffic_before_a_429(tmp_path: Path) -> None:
    from poolgate.mock import MockConfig, MockKey, start_mock

    limited, spare = MOCK_KEYS[0], MOCK_KEYS[1]
    mock = await start_mock(MockConfig(keys={limited: MockKey(requests_per_minute=2), spare: MockKey()}))
    running = await start_gateway(
        gateway_config(tmp_path, mock.url, keys=(limited, spare), routing=RoutingConfig(strategy="first-pick"))
    )
    try:
        async with running.client() as client:
            served = [
                (await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())).headers[
                    "x-poolgate-upstream"
                ]
                for _ in range(5)
            ]
        assert served == ["up-0", "up-0", "up-1", "up-1", "up-1"]
        assert mock.stats.requests_by_key[limited] == 2, "the exhausted account never saw a request it would refuse"
    finally:
        await running.stop()
        await mock.stop()


@pytest.mark.parametrize(("depth", "needle"), [(300, "content.0"), (5000, "nested too deeply")])
async def test_deeply_nested_content_is_a_client_error_not_a_crash(gw: RunningGateway, depth: int, needle: str) -> None:
    """Nesting is the client's mistake, never a bare 500: deeper than the gateway's JSON decoder follows, the
    gateway answers 400 itself; shallower, the upstream refuses it (content blocks are objects) and the
    gateway passes its 400 on."""
    content = b"[" * depth + b"]" * depth
    body = b'{"model":"%s","max_tokens":8,"messages":[{"role":"user","content":%s}]}' % (MODEL.encode(), content)
    status, payload = await raw_post(gw, body)
    assert status == 400, payload
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert needle in payload["error"]["message"]


async def test_an_upstream_error_says_which_account_answered_it(gw: RunningGateway, mock: MockServer) -> None:
    """A passed-through upstream error carries the account and the upstream's request id, as answers do: what
    Anthropic's support asks for."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(status=400, times=1))
    async with gw.client() as client:
        with pytest.raises(anthropic.BadRequestError) as error:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    headers = error.value.response.headers
    assert headers["x-poolgate-upstream"] in {"up-0", "up-1", "up-2"}
    assert headers["x-poolgate-upstream-request-id"].startswith("req_mock_")
    assert headers["request-id"].startswith("req_pg_")


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstreams_400_for_a_broken_tool_loop_reaches_the_client_word_for_word(
    gw: RunningGateway, mock: MockServer, stream: bool
) -> None:
    """A tool call sent back without its result is the client's error, which any account would refuse alike (Claude
    Code shows it as "API Error: 400 due to tool use concurrency issues."): it reaches the client as the account
    worded it, after one attempt, never failed over."""
    call = {"type": "tool_use", "id": "toolu_01Hq", "name": "Read", "input": {"file_path": "README.md"}}
    asked: Any = {
        "model": MODEL,
        "max_tokens": 8,
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
        "messages": [
            *user("use the Read tool on README.md"),
            {"role": "assistant", "content": [call]},
            *user("What does it say?"),
        ],
    }
    async with gw.client() as client:
        with pytest.raises(anthropic.BadRequestError) as error:
            if stream:
                async with client.messages.stream(**asked) as answer:
                    await answer.get_final_message()
            else:
                await client.messages.create(**asked)
    assert error.value.body["error"] == {
        "type": "invalid_request_error",
        "message": "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_01Hq. "
        "Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
    }
    [row] = await usage_rows(gw)
    assert (row["status"], row["attempts"], row["error_type"]) == (400, 1, "invalid_request_error")
    assert mock.stats.requests_total == 1


async def test_a_client_content_encoding_never_reaches_the_upstream(gw: RunningGateway, mock: MockServer) -> None:
    """The gateway parses the body as plain JSON: a compressed one is refused (415) rather than failed over
    as the pool's fault, and a plain one labelled compressed is sent on without the label (the upstream
    answered 500 to it, which took every account out of rotation for a client's mistake)."""
    import gzip

    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    status, payload = await raw_post(gw, gzip.compress(body), {"content-encoding": "gzip"})
    assert status == 415 and payload["error"]["type"] == "invalid_request_error"
    assert "content-encoding: gzip" in payload["error"]["message"]
    status, payload = await raw_post(gw, body, {"content-encoding": "gzip"})
    assert status == 200 and payload["type"] == "message"
    assert "content-encoding" not in {k.lower() for k in mock.stats.last_request_headers}
    assert all(state.health.consecutive_failures == 0 for state in gw.gateway.pool.states())
    # An empty label names no encoding: a body that is not JSON is the plain 400 (it was a 415 naming "").
    status, payload = await raw_post(gw, b"not json", {"content-encoding": ""})
    assert status == 400 and "not valid JSON" in payload["error"]["message"]


@pytest.mark.parametrize("name", ["content-type", "anthropic-version"])
async def test_a_single_valued_header_sent_twice_is_the_clients_400_not_the_pools_failure(
    gw: RunningGateway, mock: MockServer, name: str
) -> None:
    """Two Content-Types were forwarded as they came: a strict upstream refused them with a bare 400, which
    failed over across the pool as an answer not the API's, counted against every account."""
    from multidict import CIMultiDict

    headers = CIMultiDict([("x-api-key", gw.key), ("content-type", "application/json")])
    headers.add(name, "application/json" if name == "content-type" else "2023-06-01")
    if name != "content-type":
        headers.add(name, "2023-01-01")
    body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()})
    url = f"{gw.url}/v1/messages"
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        status, payload = response.status, await response.json()
    assert status == 400 and payload["error"]["type"] == "invalid_request_error"
    assert f"at most one {name} header; this one has 2" in payload["error"]["message"]
    assert mock.stats.requests_total == 0
    # Headers that may repeat still pass (a list-valued one, several betas).
    status, payload = await raw_post(gw, body, {"anthropic-beta": "a"})
    assert status == 200


async def test_an_account_rejecting_the_credential_backs_off_longer_after_each_probe(
    tmp_path: Path, mock: MockServer
) -> None:
    """A probe that fails starts the next, longer cooldown: the account with a dead key is tried now and
    then, not on every request (which spent the retry budget and ended in 500s with a healthy account)."""
    from poolgate.config import HealthConfig, ScoreWeights

    config = gateway_config(
        tmp_path,
        mock.url,
        keys=MOCK_KEYS[:2],
        routing=RoutingConfig(strategy="first-pick", score_weights=ScoreWeights(errors=0, latency=0, spread=0)),
        health=HealthConfig(cooldown_seconds=0.3, failure_threshold=1),
    )
    mock.set_fault(MOCK_KEYS[0], Fault(status=401))
    running = await start_gateway(config)
    try:
        async with running.client() as client:
            for _ in range(40):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
                await asyncio.sleep(0.01)
    finally:
        await running.stop()
    assert mock.stats.requests_by_key[MOCK_KEYS[0]] <= 4


async def test_an_upstream_added_while_a_reload_reads_the_store_is_taken_on_the_next_one(
    gw: RunningGateway, mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`poolgate upstreams add` may commit while a running gateway is reading the store for an earlier
    change: the gateway still takes it, within a reload interval or two, with no further change needed."""
    from poolgate.lifecycle.context import Upstream

    engine, box = gw.gateway.engine, gw.gateway.box
    read_upstreams = repo.list_upstreams
    raced: list[str] = []

    def racing(engine_: object) -> list[repo.StoredUpstream]:
        rows = read_upstreams(engine_)  # type: ignore[arg-type]
        if not raced:  # the CLI commits right after this read
            raced.append("late")
            repo.add_upstream(engine, box, Upstream("late", "anthropic_api_key", mock.url), MOCK_KEYS[0])
        return rows

    monkeypatch.setattr(repo, "list_upstreams", racing)
    repo.set_key_settings(engine, repo.list_keys(engine)[0].id, {})  # an earlier change, for a reload to read
    for _ in range(100):
        if gw.gateway.pool.get("late") is not None:
            break
        await asyncio.sleep(0.05)
    assert raced and gw.gateway.pool.get("late") is not None


async def test_a_request_a_server_cancels_without_saying_it_stops_is_recorded_interrupted(
    tmp_path: Path, mock: MockServer
) -> None:
    """Under another server (`uvicorn.run(gateway)`), whose shutdown cancels what still runs without telling
    the gateway it is stopping, the request was recorded `ok` with status 0."""
    running = await start_gateway(gateway_config(tmp_path, mock.url))
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(ttfb_ms=10_000))
    scope, receive = messages_request(running.key, orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": user()}))

    async def send(message: dict[str, object]) -> None:
        raise AssertionError(f"nothing is answered before the upstream: {message}")

    task = asyncio.create_task(running.gateway(scope, receive, send))
    try:
        for _ in range(200):
            if mock.stats.in_flight:
                break
            await asyncio.sleep(0.02)
        assert mock.stats.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [row] = await usage_rows(running)
    finally:
        await running.stop()
    assert (row["status"], row["outcome"]) == (503, "interrupted")

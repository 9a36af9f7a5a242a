"""Smart routing through the HTTP surface: prompt-cache affinity, the retry budget, the admin API."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from sqlalchemy import select

from poolgate.config import (
    AdminConfig,
    HealthConfig,
    KeepaliveConfig,
    PinConfig,
    RoutingConfig,
    ScoreWeights,
    UpstreamConfig,
)
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.relay import Relay
from poolgate.mock import Fault, MockConfig, MockKey, MockServer, start_mock
from poolgate.store import repo
from poolgate.store.db import usage
from tests.conftest import MOCK_KEYS, MODEL, gateway_config, key_of, start_gateway, usage_rows
from tests.integration.test_observers import Recorder

ADMIN_TOKEN = "admin-token-0123456789abcdef"
EPHEMERAL = {"type": "ephemeral"}
SYSTEM = [{"type": "text", "text": "You are a careful assistant. " * 80, "cache_control": EPHEMERAL}]


def conversation(name: str, turns: int) -> list[dict[str, Any]]:
    """Claude Code's shape: the newest user turn carries the only message marker."""
    messages: list[dict[str, Any]] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": [{"type": "text", "text": f"{name}: step {turn} " * 20}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": f"done {turn}"}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": "next", "cache_control": EPHEMERAL}]})
    return messages


async def session_turn(
    client: anthropic.AsyncAnthropic, messages: list[dict[str, Any]], session: str | None
) -> tuple[str, int]:
    """One turn of a session (with the shared system prompt): (upstream, cache-read tokens)."""
    headers = {"X-Claude-Code-Session-Id": session} if session else {}
    raw = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=8, system=SYSTEM, messages=messages, extra_headers=headers
    )
    return raw.headers["x-poolgate-upstream"], (await raw.parse()).usage.cache_read_input_tokens or 0


async def run_conversation(
    client: anthropic.AsyncAnthropic, name: str, turns: int, session: str | None = None
) -> list[tuple[str, int]]:
    """(upstream, cache-read tokens) of each turn."""
    return [await session_turn(client, conversation(name, turn), session) for turn in range(turns)]


@pytest.mark.parametrize("cache_aware", [True, False])
async def test_a_conversation_follows_its_warm_prompt_cache(
    tmp_path: Path, mock: MockServer, cache_aware: bool
) -> None:
    # No session id and no stickiness: only the prompt-cache model can keep the conversation together.
    routing = RoutingConfig(strategy="round-robin", session_stickiness=False, cache_aware=cache_aware)
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    try:
        async with running.client() as client:
            served = await run_conversation(client, "alpha", 6)
    finally:
        await running.stop()
    upstreams = [upstream for upstream, _ in served]
    if cache_aware:
        assert len(set(upstreams)) == 1, upstreams
        assert all(read > 0 for _, read in served[1:]), served
    else:
        assert len(set(upstreams)) == 3, upstreams  # round-robin scatters it and re-writes the cache


async def test_a_prompt_cached_under_an_alias_is_read_under_its_dated_model_on_the_same_account(
    tmp_path: Path, mock: MockServer
) -> None:
    """The API serves (and caches) an alias as its dated model: the cache model kept them apart, and sent the
    dated id's request to another account, which wrote the prompt again at 1.25× while the first held it."""
    routing = RoutingConfig(strategy="round-robin", session_stickiness=False)
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    messages = conversation("alias", 0)
    served = []
    try:
        async with running.client() as client:
            for model in ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"):
                raw = await client.messages.with_raw_response.create(
                    model=model, max_tokens=8, system=SYSTEM, messages=messages
                )
                served.append((raw.headers["x-poolgate-upstream"], (await raw.parse()).usage.cache_read_input_tokens))
    finally:
        await running.stop()
    assert len({upstream for upstream, _ in served}) == 1, served
    assert all(read for _, read in served[1:]), served


async def replaying_conversation(
    client: anthropic.AsyncAnthropic, turns: list[dict[str, Any]]
) -> list[tuple[Mapping[str, str], int, int]]:
    """A conversation as Claude Code sends it: the newest turn a marked text block, replayed as a plain string
    in the next request; `turns`, each turn's further request arguments. Each turn's response headers and
    the tokens it read from and wrote to the cache."""
    history: list[dict[str, Any]] = []
    answered = []
    for turn, arguments in enumerate(turns):
        newest = {"type": "text", "text": f"step {turn} " * 40, "cache_control": EPHEMERAL}
        raw = await client.messages.with_raw_response.create(
            model=MODEL,
            max_tokens=8,
            system=SYSTEM,
            messages=[*history, {"role": "user", "content": [newest]}],
            **arguments,
        )
        usage = (await raw.parse()).usage
        answered.append((raw.headers, usage.cache_read_input_tokens or 0, usage.cache_creation_input_tokens or 0))
        history += [
            {"role": "user", "content": newest["text"]},
            {"role": "assistant", "content": [{"type": "text", "text": f"done {turn}"}]},
        ]
    return answered


async def test_a_conversation_replaying_its_turns_as_strings_reads_what_each_turn_wrote(
    tmp_path: Path, mock: MockServer
) -> None:
    """Claude Code sends its newest turn as a marked text block and replays it as a plain string in the next
    request. The mock wrote the whole conversation again each turn (it hashed the two forms apart), and the
    gateway's cache model did not see the previous turn's entry."""
    routing = RoutingConfig(strategy="round-robin", session_stickiness=False)
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    try:
        async with running.client() as client:
            served = await replaying_conversation(client, [{}] * 5)
    finally:
        await running.stop()
    assert len({headers["x-poolgate-upstream"] for headers, _, _ in served}) == 1, served
    for (_, read, written), (_, next_read, _) in pairwise(served):
        assert next_read >= read + written, served  # what a turn wrote, the next one reads


def what_each_turn_reads(read: list[int], cached: list[int]) -> list[str]:
    """Per turn of a conversation, given the tokens each read from and had in the cache (read or written):
    the whole prompt an earlier turn cached (the latest such turn), a part of one, or nothing."""
    found = []
    for turn, tokens in enumerate(read):
        earlier = [index for index in range(turn) if cached[index] == tokens]
        found.append(f"turn {earlier[-1]}" if earlier else "a part" if tokens else "nothing")
    return found


@pytest.mark.parametrize(
    ("setting", "one", "other"),
    [
        ("thinking", {"type": "adaptive"}, {"type": "disabled"}),
        ("tool_choice", {"type": "auto"}, {"type": "none"}),
    ],
)
async def test_routing_predicts_the_cache_reads_of_a_conversation_that_changes_its_thinking_or_tool_choice(
    tmp_path: Path, mock: MockServer, setting: str, one: dict[str, str], other: dict[str, str]
) -> None:
    """The API keys the messages' cache entries on the thinking settings and `tool_choice`: a turn that
    changes them reads the tools and system prompt and writes the messages again, and one that changes them
    back reads what the last turn with the same settings wrote. Routing predicted a read of the whole previous
    turn where the account then wrote it anew."""
    routing = RoutingConfig(strategy="round-robin", session_stickiness=False)
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    tools = [{"name": "Read", "description": "Read a file", "input_schema": {"type": "object"}}]
    turns = [
        {"tools": tools, "extra_body": {setting: settings}, "extra_headers": {"x-poolgate-trace": "1"}}
        for settings in (one, one, other, other, one)
    ]
    try:
        async with running.client() as client:
            answered = await replaying_conversation(client, turns)
    finally:
        await running.stop()
    upstreams = {headers["x-poolgate-upstream"] for headers, _, _ in answered}
    assert len(upstreams) == 1, answered
    reads = what_each_turn_reads([read for _, read, _ in answered], [read + written for _, read, written in answered])
    assert reads == ["nothing", "turn 0", "a part", "turn 2", "turn 1"], answered
    # What routing predicted on the account, in the gateway's own token counts (~4 bytes each): the same turns.
    predicted = [
        score["cache_prediction"]
        for headers, _, _ in answered
        for score in orjson.loads(headers["x-poolgate-route"])["scores"]
        if score["upstream_id"] in upstreams
    ]
    prediction = [p["read"] for p in predicted], [p["read"] + p["write"] for p in predicted]
    assert what_each_turn_reads(*prediction) == reads, predicted


async def test_sessions_spread_over_the_pool_and_each_keeps_its_account(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="round-robin")))
    try:
        async with running.client() as client:
            served = [await run_conversation(client, name, 4, f"session-{name}") for name in "abcdef"]
    finally:
        await running.stop()
    for turns in served:
        assert len({upstream for upstream, _ in turns}) == 1, turns
        assert all(read > 0 for _, read in turns[1:]), turns
    # The system prompt they share is warm where the first session went, yet new sessions spread evenly
    # (the cache term alone would put them all on up-0).
    homes = [turns[0][0] for turns in served]
    assert sorted(homes) == ["up-0", "up-0", "up-1", "up-1", "up-2", "up-2"], homes


async def test_first_pick_keeps_new_sessions_on_the_primary(tmp_path: Path, mock: MockServer) -> None:
    """`first-pick` is a primary and its fallbacks: spread over them, two of every three new sessions (all of
    Claude Code's traffic) went to the fallbacks while the primary was fine."""
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    try:
        async with running.client() as client:
            homes = [(await session_turn(client, conversation(f"s{i}", 0), f"session-{i}"))[0] for i in range(6)]
    finally:
        await running.stop()
    assert homes == ["up-0"] * 6, homes


async def test_new_sessions_spread_by_the_accounts_weights(tmp_path: Path, mock: MockServer) -> None:
    """Every request of Claude Code carries a session, so where new sessions go is where its traffic goes:
    counted whole, sessions went evenly to accounts of weight 2, 1 and 1, and the weight meant nothing."""
    upstreams = tuple(
        UpstreamConfig(id=f"up-{i}", base_url=mock.url, api_key=key, weight=weight)
        for i, (key, weight) in enumerate(zip(MOCK_KEYS, (2, 1, 1), strict=True))
    )
    routing = RoutingConfig(strategy="round-robin")
    running = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams, routing=routing))
    try:
        async with running.client() as client:
            homes = [(await session_turn(client, conversation(f"s{i}", 0), f"session-{i}"))[0] for i in range(8)]
    finally:
        await running.stop()
    assert Counter(homes) == {"up-0": 4, "up-1": 2, "up-2": 2}, homes


async def test_a_side_request_on_another_model_does_not_take_the_session_from_its_account(
    tmp_path: Path, mock: MockServer
) -> None:
    """Accounts serving different models: the session's haiku call went to the haiku account, which became
    the session's home, and the conversation's next turn was routed anew, away from its account."""
    upstreams = tuple(
        UpstreamConfig(id=f"up-{i}", base_url=mock.url, api_key=key, models=(models,))
        for i, (key, models) in enumerate(
            zip(MOCK_KEYS, ("claude-sonnet-*", "claude-sonnet-*", "claude-haiku-*"), strict=True)
        )
    )
    routing = RoutingConfig(strategy="round-robin", cache_aware=False, score_weights=ScoreWeights(spread=0))
    running = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams, routing=routing))
    headers = {"X-Claude-Code-Session-Id": "session-1"}
    served = []
    try:
        async with running.client() as client:
            for model in (MODEL, "claude-haiku-4-5", MODEL, "claude-haiku-4-5", MODEL):
                raw = await client.messages.with_raw_response.create(
                    model=model, max_tokens=8, messages=conversation("s", 1), extra_headers=headers
                )
                served.append(raw.headers["x-poolgate-upstream"])
    finally:
        await running.stop()
    home = served[0]
    assert served == [home, "up-2", home, "up-2", home], served


async def test_sessions_that_open_with_a_haiku_call_keep_and_spread_their_conversations(
    tmp_path: Path, mock: MockServer
) -> None:
    """Claude Code's first call of a session is a small haiku one: the session stayed bound to the account
    serving haiku, its conversation's turns were side requests to it, never sticky nor spread (every
    conversation piled onto the account where the shared system prompt was warm)."""
    upstreams = tuple(
        UpstreamConfig(id=f"up-{i}", base_url=mock.url, api_key=key, models=(models,))
        for i, (key, models) in enumerate(
            zip(MOCK_KEYS, ("claude-haiku-*", "claude-sonnet-*", "claude-sonnet-*"), strict=True)
        )
    )
    running = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        async with running.client() as client:
            served = []
            for name in "abcdef":
                session = {"X-Claude-Code-Session-Id": f"session-{name}"}
                await client.messages.create(
                    model="claude-haiku-4-5", max_tokens=8, messages=conversation(name, 0), extra_headers=session
                )
                served.append(await run_conversation(client, name, 3, f"session-{name}"))
    finally:
        await running.stop()
    for turns in served:
        assert len({upstream for upstream, _ in turns}) == 1, turns  # each conversation stays on its account
    assert Counter(turns[0][0] for turns in served) == {"up-1": 3, "up-2": 3}, served


async def test_one_overloaded_answer_does_not_move_a_session_from_its_cache(tmp_path: Path, mock: MockServer) -> None:
    """The turn failed over, and the account that answered it became the session's home for good: its next
    turn re-wrote the whole prompt there, although its own account served again at once. Its keepalive
    keeps warm the cache the next turn reads."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    session = "session-1"
    served = []
    try:
        async with running.client() as client:
            for turn in range(4):
                if turn == 2:
                    home = served[0][0]
                    mock.set_fault(key_of(home), Fault(status=529, times=1))
                if turn == 3:
                    before = mock.stats.requests_by_key.get(key_of(home), 0)
                    assert await running.gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 1
                    assert mock.stats.requests_by_key[key_of(home)] == before + 1
                served.append(await session_turn(client, conversation("s", turn), session))
    finally:
        await running.stop()
    home = served[0][0]
    assert served[1][0] == home and served[2][0] != home  # the overloaded turn went elsewhere
    assert served[3][0] == home and served[3][1] > 0, served  # the next came back, and read its cache


async def test_a_sessions_burst_goes_elsewhere_once_its_account_has_no_requests_left(tmp_path: Path) -> None:
    """A session on an account allowing 4 requests a minute sent 20 turns at once: all went to its account,
    and the clients got 429s while the other accounts had room. Its account takes what its requests window
    holds (the requests in flight counted); the others serve the rest."""
    limited = MOCK_KEYS[0]
    keys = {limited: MockKey(requests_per_minute=4), MOCK_KEYS[1]: MockKey(), MOCK_KEYS[2]: MockKey()}
    server = await start_mock(MockConfig(keys=keys, min_cacheable_tokens=256))
    running = await start_gateway(gateway_config(tmp_path, server.url, routing=RoutingConfig(strategy="first-pick")))
    session = "session-burst"
    try:
        async with running.client() as client:
            first, _ = await session_turn(client, conversation("s", 0), session)
            # Its answers come after the whole burst is routed: what is in flight is all the gateway knows.
            server.set_fault(limited, Fault(ttfb_ms=500))
            burst = await asyncio.gather(*(session_turn(client, conversation("s", 1), session) for _ in range(20)))
    finally:
        await running.stop()
        await server.stop()
    assert first == "up-0"
    assert server.stats.requests_by_key[limited] == 4, "its account got no request it would refuse"
    assert Counter(upstream for upstream, _ in burst)["up-0"] == 3


async def test_a_session_stays_on_its_account_while_the_requests_it_reported_leave_room(tmp_path: Path) -> None:
    """Requests the account had counted when it reported what is left (they were in flight, streaming) were
    counted again: an account with 4 of its 10 requests left read as full, and the session's next turn left
    its warm cache for a cold account."""
    home_key = MOCK_KEYS[0]
    keys = {home_key: MockKey(requests_per_minute=10), MOCK_KEYS[1]: MockKey(), MOCK_KEYS[2]: MockKey()}
    server = await start_mock(MockConfig(keys=keys, min_cacheable_tokens=256, output_tokens=200))
    running = await start_gateway(gateway_config(tmp_path, server.url, routing=RoutingConfig(strategy="first-pick")))
    session = "session-streams"
    headers = {"X-Claude-Code-Session-Id": session}
    try:
        async with running.client() as client:
            first, _ = await session_turn(client, conversation("s", 0), session)
            server.set_fault(home_key, Fault(tokens_per_second=40))  # streams that last seconds
            streams = []
            for _ in range(5):  # each answered (its window's report taken in) before the next is sent
                stream = client.messages.stream(
                    model=MODEL, max_tokens=200, system=SYSTEM, messages=conversation("s", 1), extra_headers=headers
                )
                opened = await stream.__aenter__()
                await anext(aiter(opened))  # its first event: the account's report came with the head
                streams.append((stream, opened))
            server.clear_faults()
            upstream, read = await session_turn(client, conversation("s", 1), session)
            for stream, _ in streams:
                await stream.__aexit__(None, None, None)
    finally:
        await running.stop()
        await server.stop()
    assert first == "up-0"
    assert server.stats.requests_by_key[home_key] == 7
    assert (upstream, read > 0) == ("up-0", True), "its account had 4 requests left: the session stays"


async def test_a_warm_sessions_burst_stays_on_its_account_while_its_input_tokens_window_has_room_for_it(
    tmp_path: Path,
) -> None:
    """An account's input-tokens window counts no cache reads (as the API's): after a session wrote its ~5k-token
    prefix there, the window had ~3k left, its next turns cost ~50 each, yet the account was judged full (each
    turn counted whole, in flight and against what was left) and the session moved, re-writing its prefix."""
    limited = MOCK_KEYS[0]
    keys = {limited: MockKey(input_tokens_per_minute=8_000), MOCK_KEYS[1]: MockKey(), MOCK_KEYS[2]: MockKey()}
    server = await start_mock(MockConfig(keys=keys, min_cacheable_tokens=256))
    running = await start_gateway(gateway_config(tmp_path, server.url, routing=RoutingConfig(strategy="first-pick")))
    system = [{"type": "text", "text": "Repository context. " * 1000, "cache_control": EPHEMERAL}]
    headers = {"X-Claude-Code-Session-Id": "session-warm"}

    async def turn(client: anthropic.AsyncAnthropic, messages: list[dict[str, Any]]) -> tuple[str, int]:
        raw = await client.messages.with_raw_response.create(
            model=MODEL, max_tokens=8, system=system, messages=messages, extra_headers=headers
        )
        return raw.headers["x-poolgate-upstream"], (await raw.parse()).usage.cache_read_input_tokens or 0

    try:
        async with running.client() as client:
            first = await turn(client, conversation("s", 0))
            server.set_fault(limited, Fault(ttfb_ms=300))  # the burst is all in flight at once
            burst = await asyncio.gather(*(turn(client, conversation("s", 1)) for _ in range(4)))
    finally:
        await running.stop()
        await server.stop()
    assert first == ("up-0", 0)
    assert all(upstream == "up-0" and read > 0 for upstream, read in burst), burst


async def test_a_slow_answers_older_report_does_not_give_back_room_its_account_no_longer_has(tmp_path: Path) -> None:
    """Two requests in flight on an account allowing 2 a minute, the later-sent answered first (its report: none
    left). The earlier one's report came after it and said one was left: the account read as having room, and
    the next request went there and got its 429. It goes elsewhere at once."""
    limited = MOCK_KEYS[0]
    keys = {limited: MockKey(requests_per_minute=2), MOCK_KEYS[1]: MockKey()}
    server = await start_mock(MockConfig(keys=keys))
    config = gateway_config(
        tmp_path,
        server.url,
        MOCK_KEYS[:2],
        routing=RoutingConfig(strategy="first-pick"),
        admin=AdminConfig(token=ADMIN_TOKEN),
    )
    running = await start_gateway(config)

    async def answered_by(client: anthropic.AsyncAnthropic) -> str:
        raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=conversation("a", 0))
        return raw.headers["x-poolgate-upstream"]

    try:
        async with running.client() as client, aiohttp.ClientSession() as http:
            server.set_fault(limited, Fault(ttfb_ms=500, times=1))
            slow = asyncio.create_task(answered_by(client))
            for _ in range(500):  # until the account has counted it
                if server.stats.requests_by_key.get(limited):
                    break
                await asyncio.sleep(0.01)
            first_answered = await answered_by(client)
            assert (first_answered, await slow) == ("up-0", "up-0")
            auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
            async with http.get(f"{running.url}/admin/upstreams", headers=auth) as response:
                state = next(s for s in (await response.json())["upstreams"] if s["id"] == "up-0")
            next_answered = await answered_by(client)
    finally:
        await running.stop()
        await server.stop()
    assert state["ratelimits"]["requests"]["remaining"] == 0 and state["unusable_reason"] == "rate_limited", state
    assert next_answered == "up-1"
    assert server.stats.requests_by_key[limited] == 2, "the account got no request it would refuse"


async def test_turns_failed_over_from_a_session_that_stays_go_to_the_same_second_account(
    tmp_path: Path, mock: MockServer
) -> None:
    """Its account failed two turns in a row (a 529 each): each went to another cold account and wrote the
    whole prompt again, although the first of them held it from the turn before."""
    running = await start_gateway(gateway_config(tmp_path, mock.url))
    session = "session-scatter"
    served = []
    try:
        async with running.client() as client:
            for turn in range(4):
                if turn == 1:
                    home = served[0][0]
                    mock.set_fault(key_of(home), Fault(status=529, times=2))
                served.append(await session_turn(client, conversation("s", turn), session))
    finally:
        await running.stop()
    home, second = served[0][0], served[1][0]
    assert second != home and served[2][0] == second and served[2][1] > 0, served  # its cache, read again
    assert served[3][0] == home, served


def growing(name: str, turn: int) -> list[dict[str, Any]]:
    """Claude Code's conversation: each turn the last one's and a new step, the marker on the newest."""
    messages: list[dict[str, Any]] = []
    for step in range(turn + 1):
        if step:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": f"done {step}"}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": f"{name}: step {step} " * 40}]})
    messages[-1]["content"][0]["cache_control"] = EPHEMERAL
    return messages


@pytest.mark.parametrize(("accounts", "failing"), [(5, (1, 3)), (10, (1, 2, 3, 4, 5))])
async def test_a_sessions_failed_over_turns_keep_going_to_the_account_that_holds_them(
    tmp_path: Path, accounts: int, failing: tuple[int, ...]
) -> None:
    """The fallback was forgotten after one turn at home (the next failover went to a cold account), and in a
    large pool (sampled) it was left out of the failover tail: each failover re-wrote the conversation on
    another account."""
    keys = tuple(f"sk-ant-api03-pool-{i:02d}" for i in range(accounts))
    upstream = await start_mock(
        MockConfig(keys={key: MockKey() for key in keys}, min_cacheable_tokens=256), host="127.0.0.1", port=0
    )
    health = HealthConfig(cooldown_seconds=30, failure_threshold=100)  # one 529 after another: still usable
    routing = RoutingConfig(retry_budget_ratio=10, retry_budget_min_per_second=1000)
    running = await start_gateway(gateway_config(tmp_path, upstream.url, keys=keys, health=health, routing=routing))
    served = []
    try:
        async with running.client() as client:
            for turn in range(6):
                if turn in failing:
                    upstream.set_fault(key_of(served[0][0], keys), Fault(status=529, times=1))
                served.append(await session_turn(client, growing("s", turn), "session-pool"))
    finally:
        await running.stop()
        await upstream.stop()
    home = served[0][0]
    failed_over = {served[turn][0] for turn in failing}
    assert home not in failed_over and len(failed_over) == 1, served
    assert all(served[turn][0] == home for turn in range(6) if turn not in failing), served


async def test_a_session_whose_accounts_key_is_rejected_moves_at_once(tmp_path: Path, mock: MockServer) -> None:
    """A rejected credential (a revoked key) is no passing trouble: the session kept its account until that
    account had failed three times, each turn tried there first and then written elsewhere."""
    running = await start_gateway(gateway_config(tmp_path, mock.url))
    headers = {"X-Claude-Code-Session-Id": "session-revoked"}
    served = []
    try:
        async with running.client() as client:
            for turn in range(3):
                if turn == 1:
                    home_key = key_of(served[0])
                    mock.set_fault(home_key, Fault(status=401))
                    tried = mock.stats.requests_by_key.get(home_key, 0)
                raw = await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, system=SYSTEM, messages=conversation("s", turn), extra_headers=headers
                )
                served.append(raw.headers["x-poolgate-upstream"])
    finally:
        await running.stop()
    assert served[1] != served[0] and served[2] == served[1], served
    assert mock.stats.requests_by_key[home_key] == tried + 1  # tried once, then left


async def test_a_new_sessions_first_turn_failed_over_stays_where_it_was_answered(
    tmp_path: Path, mock: MockServer
) -> None:
    """A new session has no account of its own yet: its first turn, failed over, wrote its prompt where it
    was answered, and its next turn belongs there (it went back to the account that failed, and re-wrote)."""
    upstreams = tuple(UpstreamConfig(id=f"up-{i}", base_url=mock.url, api_key=key) for i, key in enumerate(MOCK_KEYS))
    running = await start_gateway(
        gateway_config(tmp_path, mock.url, upstreams=upstreams[:2], routing=RoutingConfig(strategy="first-pick"))
    )
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=529, times=1))
        async with running.client() as client:
            served = await run_conversation(client, "fresh", 2, "session-fresh")
    finally:
        await running.stop()
    assert served[0][0] == "up-1" and served[1][0] == "up-1" and served[1][1] > 0, served


@pytest.mark.one_window
async def test_a_session_keeps_one_conversation_warm_its_latest_whatever_the_model(
    tmp_path: Path, mock: MockServer
) -> None:
    """Sessions are per model for routing; a `/model` switch left the conversation behind kept warm too, and
    a 402 refusing a turn of another model no longer ended the session's keepalive."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    gateway = running.gateway
    headers = {"X-Claude-Code-Session-Id": "session-switch"}
    try:
        async with running.client() as client:
            for model, turn in (("claude-sonnet-4-5", 0), ("claude-sonnet-4-5", 1), ("claude-opus-5", 2)):
                await client.messages.create(
                    model=model, max_tokens=8, system=SYSTEM, messages=conversation("s", turn), extra_headers=headers
                )
        assert len(gateway.keepalive) == 1
        assert await gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 1
        assert orjson.loads(mock.stats.last_request_body)["model"] == "claude-opus-5"
        key = repo.list_keys(gateway.engine)[0].name
        repo.set_key_settings(gateway.engine, key, {"budget_micro_usd": 1, "budget_scope": "per_session"})
        gateway.reload()
        async with running.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(
                    model="claude-haiku-4-5", max_tokens=8, messages=conversation("t", 0), extra_headers=headers
                )
        assert refused.value.status_code == 402 and len(gateway.keepalive) == 0
    finally:
        await running.stop()


async def test_an_unhealthy_account_sends_its_sessions_elsewhere_once(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url, health=HealthConfig(cooldown_seconds=300)))
    try:
        async with running.client() as client:
            headers = {"X-Claude-Code-Session-Id": "session-1"}
            first = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, system=SYSTEM, messages=conversation("s", 0), extra_headers=headers
            )
            home = first.headers["x-poolgate-upstream"]
            mock.set_fault(key_of(home), Fault(status=500))
            served = []
            for turn in range(1, 5):
                raw = await client.messages.with_raw_response.create(
                    model=MODEL, max_tokens=8, system=SYSTEM, messages=conversation("s", turn), extra_headers=headers
                )
                served.append(
                    (raw.headers["x-poolgate-upstream"], (await raw.parse()).usage.cache_read_input_tokens or 0)
                )
    finally:
        await running.stop()
    new_home = served[0][0]
    assert new_home != home and all(upstream == new_home for upstream, _ in served), served
    # The move re-writes the conversation once; from then on it reads its cache on the new account.
    assert all(read > 0 for _, read in served[1:]), served


async def test_the_retry_budget_stops_an_outage_from_multiplying_upstream_load(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolgate.access")
    routing = RoutingConfig(strategy="first-pick", retry_budget_ratio=0.0, retry_budget_min_per_second=0.0)
    config = gateway_config(tmp_path, mock.url, routing=routing, health=HealthConfig(failure_threshold=100))
    running = await start_gateway(config)
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(status=529))
    try:
        async with running.client() as client:
            for _ in range(6):
                with pytest.raises(anthropic.APIStatusError) as failed:
                    await client.messages.create(model=MODEL, max_tokens=8, messages=conversation("x", 0))
                assert failed.value.status_code == 529
        async with aiohttp.ClientSession() as http, http.get(f"{running.url}/metrics") as response:
            metrics = await response.text()
    finally:
        await running.stop()
    # Six requests, one retry in the (minimal) budget: seven upstream attempts, not eighteen.
    assert mock.stats.requests_total == 7
    # Where the budget stopped a failover it says so: every request left an account untried.
    assert "poolgate_retry_budget_denied_total 6.0" in metrics
    logged = [r.getMessage() for r in caplog.records if r.name == "poolgate.access"]
    assert len(logged) == 6 and all(line.endswith(" retry_budget=denied") for line in logged), logged


async def test_one_accounts_failing_burst_fails_over_to_healthy_accounts_whatever_the_retry_budget(
    tmp_path: Path, mock: MockServer
) -> None:
    """A session's burst in flight on one account that then answered 529: the retry budget let a few fail over
    and sent the rest back as 529s while the other accounts sat idle. A first failover to an account that has
    not failed is no retry storm."""
    routing = RoutingConfig(strategy="first-pick", retry_budget_ratio=0.0, retry_budget_min_per_second=0.0)
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    mock.set_fault(MOCK_KEYS[0], Fault(status=529, ttfb_ms=200))  # the burst is all in flight when it fails
    try:
        async with running.client() as client:
            burst = await asyncio.gather(
                *(
                    client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=conversation("b", 0))
                    for _ in range(8)
                ),
                return_exceptions=True,
            )
    finally:
        await running.stop()
    assert [getattr(answer, "headers", {}).get("x-poolgate-upstream") for answer in burst] == ["up-1"] * 8, burst


async def test_the_admin_api_explains_live_routes_behind_its_own_token(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url, admin=AdminConfig(token=ADMIN_TOKEN)))
    try:
        async with running.client() as client:
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, system=SYSTEM, messages=conversation("a", 1)
            )
        request_id = raw.headers["request-id"]
        async with aiohttp.ClientSession() as http:
            with caplog.at_level(logging.WARNING, "poolgate.admin"):
                for headers in ({}, {"x-admin-token": "wrong-admin-token"}, {"x-api-key": running.key}):
                    async with http.get(f"{running.url}/admin/routes/{request_id}", headers=headers) as response:
                        assert response.status == 401
            # Refusals are logged (a scraper with a stale token, someone trying tokens left no trace), without
            # what was presented.
            refusals = [r.getMessage() for r in caplog.records if r.name == "poolgate.admin"]
            assert refusals == [
                f"/admin/routes/{request_id} refused: no admin token",
                f"/admin/routes/{request_id} refused: a wrong admin token",
                f"/admin/routes/{request_id} refused: no admin token",  # a gateway key is none
            ]
            assert "wrong-admin-token" not in caplog.text and running.key not in caplog.text
            auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
            async with http.get(f"{running.url}/admin/routes/{request_id}", headers=auth) as response:
                route = (await response.json())["route"]
            assert route["terminal"]["chosen"] == raw.headers["x-poolgate-upstream"]
            assert {score["upstream_id"] for score in route["scores"]} == {"up-0", "up-1", "up-2"}
            async with http.get(f"{running.url}/admin/routes?last=5", headers=auth) as response:
                assert [r["request_id"] for r in (await response.json())["routes"]] == [request_id]
            # int() read a full-width digit, `1_0`, a sign and spaces as numbers.
            for last in ("0", "-1", "1001", "many", "%EF%BC%91", "1_0", "%2B5", "%205%20"):
                async with http.get(f"{running.url}/admin/routes?last={last}", headers=auth) as response:
                    assert response.status == 400 and "last:" in (await response.json())["error"]["message"]
            async with http.get(f"{running.url}/admin/upstreams", headers=auth) as response:
                states = {s["id"]: s for s in (await response.json())["upstreams"]}
            assert states[raw.headers["x-poolgate-upstream"]]["warm_cache_entries"] >= 1
            assert all(s["usable"] for s in states.values())
            # A wrong method on an admin path says which one to use; an unknown path is not there at all (both
            # were a 405 without `allow`).
            async with http.post(f"{running.url}/admin/upstreams", headers=auth) as response:
                assert response.status == 405 and response.headers["allow"] == "GET"
                assert (await response.json())["error"]["type"] == "invalid_request_error"
            async with http.delete(f"{running.url}/admin/does-not-exist", headers=auth) as response:
                assert response.status == 404 and (await response.json())["error"]["type"] == "not_found_error"
    finally:
        await running.stop()


async def test_without_an_admin_token_there_is_no_admin_api(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{running.url}/admin/upstreams", headers={"x-api-key": running.key}) as response,
        ):
            assert response.status == 404
            assert (await response.json())["error"]["type"] == "not_found_error"
    finally:
        await running.stop()


async def test_a_paused_session_gets_a_keepalive_that_keeps_its_cache_warm(tmp_path: Path, mock: MockServer) -> None:
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30, max_per_session=2))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    gateway = running.gateway
    try:
        async with running.client() as client:
            served = await run_conversation(client, "paused", 2, "session-k")
        home = served[-1][0]
        now = time.monotonic()
        assert await gateway.keepalive_sender.send_keepalives(now) == 0  # not yet near expiry
        before = mock.stats.requests_total
        # Shortly before the 5-minute entry would expire: one keepalive, to the session's own account.
        assert await gateway.keepalive_sender.send_keepalives(now + 280) == 1
        assert mock.stats.requests_total == before + 1
        body = orjson.loads(mock.stats.last_request_body)
        assert body["max_tokens"] == 1 and body["stream"] is False
        assert body["messages"] == conversation("paused", 1)
        # The keepalive refreshed the TTL, so the next one is due a TTL later; after max_per_session, none.
        assert await gateway.keepalive_sender.send_keepalives(now + 300) == 0
        assert await gateway.keepalive_sender.send_keepalives(now + 560) == 1
        assert await gateway.keepalive_sender.send_keepalives(now + 840) == 0
        rows = await usage_rows(running)
    finally:
        await running.stop()
    keepalives = [row for row in rows if row["endpoint"] == "keepalive"]
    assert len(keepalives) == 2
    assert all(row["upstream_id"] == home and row["status"] == 200 for row in keepalives)
    assert all(row["cache_read_input_tokens"] > 0 and row["output_tokens"] == 1 for row in keepalives)
    assert all(row["session_id"] == "session-k" for row in keepalives)


async def test_the_keepalive_after_a_long_answer_comes_before_the_entry_expires(
    tmp_path: Path, mock: MockServer
) -> None:
    """The upstream reads and writes the prompt cache before it generates, so its entry expires a TTL after
    the request was sent. Timed from the end of a long streamed answer, the keepalive was due after the
    entry had expired (it wrote the whole prompt again instead of reading it), and routing held the account
    warm for that long too."""
    lead = 30
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=lead))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    gateway = running.gateway
    try:
        async with running.client() as client:
            home, _ = await session_turn(client, conversation("long", 0), "session-long")
            mock.set_fault(key_of(home), Fault(tokens_per_second=16))  # a streamed answer taking a second
            async with client.messages.stream(
                model=MODEL,
                max_tokens=16,
                system=SYSTEM,
                messages=conversation("long", 1),
                extra_headers={"X-Claude-Code-Session-Id": "session-long"},
            ) as stream:
                await stream.get_final_message()
        # When the upstream's entries (written or refreshed as the turn arrived) run out.
        expiry = max(expires for expires, _ in mock.state.cache(key_of(home), MODEL)._entries.values())
        assert all(entry.expires_at <= expiry for entry in gateway.pool.get(home).warm.entries())
        assert await gateway.keepalive_sender.send_keepalives(expiry - lead) == 1
    finally:
        await running.stop()


async def test_a_keepalive_in_flight_at_shutdown_is_recorded(tmp_path: Path, mock: MockServer) -> None:
    """The shutdown cancelled the keepalive task with its request out at the upstream, which may bill it: it
    left no usage record at all. It is recorded as `interrupted`, as a client's request the shutdown ends."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=299.5))  # due at once
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    async with running.client() as client:
        home, _ = await session_turn(client, conversation("stop", 0), "session-stop")
    mock.set_fault(key_of(home), Fault(ttfb_ms=5000))  # the keepalive waits for its answer
    for _ in range(100):
        if mock.stats.in_flight:
            break
        await asyncio.sleep(0.05)
    assert mock.stats.in_flight == 1
    await running.stop()
    with running.gateway.engine.connect() as conn:
        rows = [row for row in conn.execute(select(usage)) if row.endpoint == "keepalive"]
    assert [(row.upstream_id, row.outcome, row.session_id) for row in rows] == [(home, "interrupted", "session-stop")]


async def test_a_keepalive_a_fault_in_the_gateway_ends_is_recorded(
    tmp_path: Path, mock: MockServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in the gateway handling a keepalive's answer left no usage record (nor access log line, metric
    or observer event), though the upstream had answered and billed it: it is recorded as a client's request
    is, `gateway_error`, with what the answer used."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    try:
        async with running.client() as client:
            home, _ = await session_turn(client, conversation("fault", 0), "session-fault")

        def broken(*args: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(Relay, "_learn", staticmethod(broken))  # runs once the answer is read
        assert await running.gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 1
        rows = await usage_rows(running)
    finally:
        await running.stop()
    [keepalive] = [row for row in rows if row["endpoint"] == "keepalive"]
    assert (keepalive["upstream_id"], keepalive["status"], keepalive["outcome"]) == (home, 200, "gateway_error")
    assert keepalive["cache_read_input_tokens"] > 0 and keepalive["cost_micro_usd"] > 0
    assert any(record.exc_info and "failed in the gateway" in record.getMessage() for record in caplog.records)


async def test_a_turn_in_flight_that_reads_the_paused_prompt_puts_its_keepalive_off(
    tmp_path: Path, mock: MockServer
) -> None:
    """A session's next turn reads its cached prompt as it arrives, which refreshes the entry: the keepalive
    went on being timed from the turn before, and went out (paid for) while the next turn was still being
    answered. It is timed from the newest turn that read the prompt."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    gateway, lead = running.gateway, routing.keepalive.lead_seconds
    first = conversation("flight", 0)
    try:
        async with running.client() as client:
            home, _ = await session_turn(client, first, "session-flight")
            answered = time.monotonic()
            await asyncio.sleep(1.0)  # the next turn comes a second later, and takes its time
            mock.set_fault(key_of(home), Fault(tokens_per_second=2))
            following = [
                {"role": "user", "content": [{"type": "text", "text": "next"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "done"}]},
                {"role": "user", "content": [{"type": "text", "text": "and on", "cache_control": EPHEMERAL}]},
            ]
            async with client.messages.stream(
                model=MODEL,
                max_tokens=8,
                system=SYSTEM,
                messages=following,
                extra_headers={"X-Claude-Code-Session-Id": "session-flight"},
            ) as turn:
                async for event in turn:
                    if event.type == "message_start":  # the account took the turn on
                        break
                # When the keepalive would be due, timed from the first turn; not yet, timed from this one.
                assert await gateway.keepalive_sender.send_keepalives(answered + 300 - lead) == 0
                assert await gateway.keepalive_sender.send_keepalives(time.monotonic() + 300 - lead + 1) == 1
    finally:
        await running.stop()


async def test_no_keepalive_starts_once_the_gateway_is_stopping(tmp_path: Path, mock: MockServer) -> None:
    """The loop went on starting keepalives through the shutdown's grace, which the shutdown then cut short:
    requests the upstream may bill, recorded `interrupted`, for sessions no turn would follow on this process."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=299.5, max_per_session=10))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    try:
        async with running.client() as client:
            await session_turn(client, conversation("grace", 0), "session-grace")
        for _ in range(100):  # the loop sends the first keepalive (due at once) within a tick or two
            if mock.stats.requests_total > 1:
                break
            await asyncio.sleep(0.05)
        assert mock.stats.requests_total == 2
        running.gateway.begin_stop()  # what the server does at a SIGTERM, as its grace begins
        sent = mock.stats.requests_total
        await asyncio.sleep(2.5)  # two ticks of the loop, each of which found the session due again
        assert mock.stats.requests_total == sent
    finally:
        await running.stop()


async def test_an_account_slow_to_answer_a_keepalive_holds_back_no_other(tmp_path: Path, mock: MockServer) -> None:
    """The keepalives due together went out one after another: behind an account slow to answer (up to
    `timeouts.first_byte_seconds`), the others came after their entries had expired, and wrote the whole
    prompt again. They go out together."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    gateway = running.gateway
    try:
        async with running.client() as client:
            homes = {(await session_turn(client, conversation(name, 0), f"session-{name}"))[0] for name in "ab"}
        assert len(homes) == 2  # new sessions spread
        for home in homes:
            mock.set_fault(key_of(home), Fault(ttfb_ms=1000, times=1))
        sending = asyncio.create_task(gateway.keepalive_sender.send_keepalives(time.monotonic() + 280))
        most_in_flight = 0
        for _ in range(250):  # each keepalive is answered after a second
            most_in_flight = max(most_in_flight, mock.stats.in_flight)
            if sending.done():
                break
            await asyncio.sleep(0.02)
        assert await sending == 2
        assert most_in_flight == 2
    finally:
        await running.stop()


async def test_a_keepalive_its_account_does_not_answer_holds_back_none_coming_due_meanwhile(
    tmp_path: Path, mock: MockServer
) -> None:
    """The keepalive loop waited for each tick's keepalives: behind one an account did not answer (up to
    `timeouts.first_byte_seconds`), those of other sessions coming due meanwhile went out after their entries
    had expired. Each goes out on its own, and a session with one in flight gets no other meanwhile."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=299.5))  # due at once
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    try:
        async with running.client() as client:
            hung, _ = await session_turn(client, conversation("hung", 0), "session-hung")
            mock.set_fault(key_of(hung), Fault(ttfb_ms=60_000, times=1))  # its keepalive is not answered
            for _ in range(100):
                if mock.stats.in_flight:
                    break
                await asyncio.sleep(0.05)
            assert mock.stats.in_flight == 1
            home, _ = await session_turn(client, conversation("waiting", 0), "session-waiting")
        assert home != hung  # new sessions spread
        asked = mock.stats.requests_by_key[key_of(home)]
        for _ in range(200):  # the loop ticks each second
            if mock.stats.requests_by_key[key_of(home)] > asked:
                break
            await asyncio.sleep(0.05)
        assert mock.stats.requests_by_key[key_of(home)] > asked
        assert mock.stats.requests_by_key[key_of(hung)] == 2  # its turn and one keepalive
    finally:
        await running.stop()
    with running.gateway.engine.connect() as conn:
        rows = [row for row in conn.execute(select(usage)) if row.endpoint == "keepalive"]
    assert (hung, "interrupted", "session-hung") in [(row.upstream_id, row.outcome, row.session_id) for row in rows]
    assert {row.upstream_id for row in rows if row.status == 200} == {home}


@pytest.mark.parametrize("fault", [Fault(status=529), Fault(status=429, retry_after=5), Fault(reset_connection=True)])
async def test_a_failed_keepalive_is_not_retried(tmp_path: Path, mock: MockServer, fault: Fault) -> None:
    """A keepalive that fails is one request, counted in its account's health; the session gets no other
    until its next turn (no retry storm on an account in trouble)."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    gateway = running.gateway
    try:
        async with running.client() as client:
            home, _ = await session_turn(client, conversation("failing", 0), "session-failing")
        mock.set_fault(key_of(home), fault)
        before = mock.stats.requests_total
        now = time.monotonic()
        assert await gateway.keepalive_sender.send_keepalives(now + 280) == 1
        assert await gateway.keepalive_sender.send_keepalives(now + 281) == 0 and len(gateway.keepalive) == 0
        # A reset before any answer on the connection the turn left pooled is what an idle close crossing the
        # keepalive looks like: it goes once more on a new connection, which the account resets too.
        assert mock.stats.requests_total == before + (2 if fault.reset_connection else 1)
        health = gateway.pool.get(home).health
        assert health.consecutive_failures == 1 or health.parked_until > now
    finally:
        await running.stop()


async def test_no_keepalive_goes_to_an_account_held_out_of_the_sessions_model(tmp_path: Path, mock: MockServer) -> None:
    """An account that answered 403 for a model is out of that model's requests for 10 minutes: a paused
    session's keepalive went there all the same, to be refused (and to hold the account out 10 minutes more)."""
    routing = RoutingConfig(strategy="first-pick", keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    gateway = running.gateway
    try:
        async with running.client() as client:
            home, _ = await session_turn(client, conversation("paused", 0), "session-paused")
            mock.set_fault(key_of(home), Fault(status=403, times=1))
            other, _ = await session_turn(client, conversation("other", 0), "session-other")
        assert other != home
        before = mock.stats.requests_by_key.get(key_of(home), 0)
        now = time.monotonic()
        assert await gateway.keepalive_sender.send_keepalives(now + 280) == 1  # the other session's, to its own account
        assert mock.stats.requests_by_key.get(key_of(home), 0) == before
    finally:
        await running.stop()


async def test_a_failed_keepalive_is_recorded_as_a_callers_request_would_be(tmp_path: Path, mock: MockServer) -> None:
    """Every failed keepalive was `upstream_error`, and observers were not told the upstream's message: a 400
    the account answered is the request's own fault (`client_error`), as for a caller's."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    recorder = Recorder()
    running.gateway.observers.add(recorder)
    try:
        async with running.client() as client:
            home, _ = await session_turn(client, conversation("refused", 0), "session-refused")
        mock.set_fault(key_of(home), Fault(status=400))
        assert await running.gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 1
        running.gateway.account_now()
    finally:
        await running.stop()
    [row] = [row for row in await usage_rows(running) if row["endpoint"] == "keepalive"]
    assert (row["status"], row["outcome"], row["error_type"]) == (400, "client_error", "invalid_request_error")
    [event] = [event for event in recorder.events if event.record.endpoint == "keepalive"]
    assert event.error_message


async def test_a_keepalive_its_account_could_not_take_is_not_counted_as_sent(tmp_path: Path, mock: MockServer) -> None:
    """The keepalives counted as sent included those never sent because the router would not use their
    account then (out for a 429's `retry-after`)."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1], routing=routing))
    gateway = running.gateway
    try:
        async with running.client() as client:
            await session_turn(client, conversation("limited", 0), "session-limited")
            mock.set_fault(MOCK_KEYS[0], Fault(status=429, retry_after=600, times=1))
            with pytest.raises(anthropic.RateLimitError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=conversation("other", 0))
        before = mock.stats.requests_total
        assert await gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 0
        assert mock.stats.requests_total == before and len(gateway.keepalive) == 0
        rows = await usage_rows(running)
    finally:
        await running.stop()
    assert not [row for row in rows if row["endpoint"] == "keepalive"]


async def test_no_keepalive_goes_to_an_account_no_longer_serving_the_sessions_model(
    tmp_path: Path, mock: MockServer
) -> None:
    """The check whether the router would use the session's account left out its model globs: narrowed by
    a reload to other models, the account still got the session's keepalives."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, keys=(), routing=routing))
    gateway = running.gateway
    try:
        stored = Upstream("stored", "anthropic_api_key", mock.url, models=("claude-sonnet-*",))
        repo.add_upstream(gateway.engine, gateway.box, stored, MOCK_KEYS[0])
        gateway.reload()
        async with running.client() as client:
            await session_turn(client, conversation("narrowed", 0), "session-narrowed")
        repo.remove_upstream(gateway.engine, "stored")
        repo.add_upstream(gateway.engine, gateway.box, replace(stored, models=("claude-haiku-*",)), MOCK_KEYS[0])
        gateway.reload()
        before = mock.stats.requests_total
        assert await gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 0
        assert mock.stats.requests_total == before and len(gateway.keepalive) == 0
    finally:
        await running.stop()


async def test_a_small_side_request_of_the_session_leaves_its_conversations_keepalive(
    tmp_path: Path, mock: MockServer
) -> None:
    """Claude Code sends short requests of its own (a haiku call around a tool run) with the session's id:
    one, not worth keeping warm itself, cancelled the keepalive of the conversation paused on that tool run."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    gateway = running.gateway
    try:
        async with running.client() as client:
            await run_conversation(client, "paused", 2, "session-side")
            await client.messages.create(
                model=MODEL,
                max_tokens=8,
                messages=[{"role": "user", "content": "Extract the command prefix: ls -la"}],
                extra_headers={"X-Claude-Code-Session-Id": "session-side"},
            )
        assert await gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 1
        assert orjson.loads(mock.stats.last_request_body)["messages"] == conversation("paused", 1)
    finally:
        await running.stop()


async def test_a_parent_waiting_on_its_subagent_is_kept_warm_with_it(tmp_path: Path, mock: MockServer) -> None:
    """Claude Code's subagents send their parent's session id with a system prompt and task of their own: the
    subagent's turns replaced the parent's paused request, so a parent waiting on a long subagent run lost its
    cache and re-wrote its whole conversation on its next turn."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    gateway = running.gateway
    explorer = [{"type": "text", "text": "You explore code and report. " * 80, "cache_control": EPHEMERAL}]
    try:
        async with running.client() as client:
            await run_conversation(client, "parent", 2, "session-parent")
            for turn in range(2):
                await client.messages.create(
                    model=MODEL,
                    max_tokens=8,
                    system=explorer,
                    messages=conversation("subagent", turn + 1),
                    extra_headers={"X-Claude-Code-Session-Id": "session-parent"},
                )
        now = time.monotonic() + 280
        paused = sorted(
            orjson.loads(session.body)["messages"][0]["content"][0]["text"] for session in gateway.keepalive.due(now)
        )
        assert paused == ["parent: step 0 " * 20, "subagent: step 0 " * 20]
        assert await gateway.keepalive_sender.send_keepalives(now) == 2
    finally:
        await running.stop()


async def test_a_prompt_the_upstream_did_not_cache_is_not_kept_warm(tmp_path: Path, mock: MockServer) -> None:
    """A marked prompt under the model's caching minimum: the answer reported no cache tokens, and each
    keepalive paid the whole prompt again, for nothing to keep."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    try:
        async with running.client() as client:
            short = [{"type": "text", "text": "Be brief. " * 50, "cache_control": EPHEMERAL}]  # under the minimum
            answer = await client.messages.create(
                model=MODEL,
                max_tokens=8,
                system=short,
                messages=conversation("short", 0),
                extra_headers={"X-Claude-Code-Session-Id": "session-short"},
            )
        assert not answer.usage.cache_creation_input_tokens and not answer.usage.cache_read_input_tokens
        assert len(running.gateway.keepalive) == 0
        assert await running.gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 0
    finally:
        await running.stop()


async def test_a_pin_whose_upstream_is_disabled_is_warned_of_and_its_refusal_names_it(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The 529 (now a 503: only the operator brings it back) named every other account `not_pinned` and not the
    disabled one pinned, and nothing said so before a request came. A pin naming no upstream at all gets the
    same 503, as the README says (it said a 529)."""
    config = gateway_config(tmp_path, mock.url)
    upstreams = (*config.upstreams[:2], config.upstreams[2].model_copy(update={"enabled": False}))
    routing = RoutingConfig(
        pins=(
            PinConfig(model="claude-haiku-*", upstreams=("up-2",)),
            PinConfig(model="claude-opus-*", upstreams=("up-9",)),
        )
    )
    with caplog.at_level(logging.WARNING, logger="poolgate"):
        running = await start_gateway(config.model_copy(update={"upstreams": upstreams, "routing": routing}))
    try:
        assert "routing.pins[0] names up-2: disabled, and no upstream it names is enabled" in caplog.text
        async with running.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=conversation("p", 0))
            with pytest.raises(anthropic.APIStatusError) as unpinnable:
                await client.messages.create(model="claude-opus-5", max_tokens=8, messages=conversation("p", 0))
            assert (await client.messages.create(model=MODEL, max_tokens=8, messages=conversation("p", 0))).content
        assert refused.value.status_code == 503
        assert "(up-0: not_pinned, up-1: not_pinned, up-2: disabled)" in refused.value.message
        assert unpinnable.value.status_code == 503 and unpinnable.value.response.headers["x-should-retry"] == "false"
        assert "(up-0: not_pinned, up-1: not_pinned)" in unpinnable.value.message
    finally:
        await running.stop()


async def test_the_529_of_a_pinned_model_says_when_its_pinned_account_is_back(tmp_path: Path, mock: MockServer) -> None:
    """Its `retry-after` was the soonest of every account out for a while, one the pin never sends the request
    to among them: a pinned account out for an hour was "retry in 40 s", and clients retried for nothing."""
    config = gateway_config(tmp_path, mock.url)
    routing = RoutingConfig(pins=(PinConfig(model="claude-haiku-*", upstreams=("up-0",)),))
    upstreams = config.upstreams[:2]
    running = await start_gateway(config.model_copy(update={"upstreams": upstreams, "routing": routing}))
    try:
        async with running.client() as client:
            mock.set_fault(MOCK_KEYS[0], Fault(status=429, retry_after=3600, times=1))
            mock.set_fault(MOCK_KEYS[1], Fault(status=429, retry_after=40, times=1))
            for model in ("claude-haiku-4-5", MODEL):  # each account parked by its own 429
                with pytest.raises(anthropic.RateLimitError):
                    await client.messages.create(model=model, max_tokens=8, messages=conversation("p", 0))
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.with_raw_response.create(
                    model="claude-haiku-4-5", max_tokens=8, messages=conversation("p", 0)
                )
    finally:
        await running.stop()
    answer = refused.value.response
    assert answer.status_code == 529 and "up-1: not_pinned" in refused.value.message
    assert int(answer.headers["retry-after"]) > 3500 and answer.headers["x-should-retry"] == "false"


@pytest.mark.one_window
async def test_no_keepalive_outlives_the_callers_right_to_the_session(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A keepalive is in no budget: none for a session whose key was revoked, whose next turn its budget
    refused, or that came from a one-shot `claude -p` run."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    gateway = running.gateway
    engine = gateway.engine
    try:
        names = ("revoked", "budgeted", "narrowed", "one-shot", "kept")
        keys = {name: repo.create_key(engine, name)[1] for name in names}
        gateway.reload()
        for name, key in keys.items():
            agent = "claude-cli/2.1.197 (external, " + ("sdk-cli)" if name == "one-shot" else "cli)")
            async with anthropic.AsyncAnthropic(
                base_url=running.url, api_key=key, max_retries=0, default_headers={"user-agent": agent}
            ) as client:
                await run_conversation(client, name, 2, f"session-{name}")
        assert len(gateway.keepalive) == 4  # the one-shot run was never watched
        repo.revoke_key(engine, "revoked")
        repo.set_key_settings(engine, "budgeted", {"budget_micro_usd": 1, "budget_scope": "per_session"})
        repo.set_key_settings(engine, "narrowed", {"models": ["claude-haiku-*"]})  # the session's model is not
        gateway.reload()
        async with anthropic.AsyncAnthropic(base_url=running.url, api_key=keys["budgeted"], max_retries=0) as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await run_conversation(client, "budgeted", 3, "session-budgeted")
        assert refused.value.status_code == 402
        before = mock.stats.requests_total
        assert await gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 1
        assert mock.stats.requests_total == before + 1
        assert orjson.loads(mock.stats.last_request_body)["messages"] == conversation("kept", 1)
        # One one-shot session (of two turns): it was counted once per turn.
        assert gateway.keepalive.skipped == {"one_shot": 1, "budget": 1, "caller_refused": 2}
        # ... and an operator sees why (they were counted nowhere one could read).
        async with aiohttp.ClientSession() as http, http.get(f"{running.url}/metrics") as response:
            metrics = await response.text()
        for reason, count in (("one_shot", 1), ("budget", 1), ("caller_refused", 2)):
            assert f'poolgate_keepalive_skipped_total{{reason="{reason}"}} {count}.0' in metrics
        # The gateway's own check of the revoked key is no client's use of it: nothing logged as if it were.
        assert not [r for r in caplog.records if "rejected revoked gateway key" in r.getMessage()]
    finally:
        await running.stop()


async def test_only_keepalives_sent_count_against_an_accounts_allowance(tmp_path: Path, mock: MockServer) -> None:
    """`max_per_upstream_per_minute` was counted before the caller was checked: a session whose key was
    revoked, never sent a keepalive, used up the allowance of the one behind it."""
    keepalive = KeepaliveConfig(enabled=True, lead_seconds=30, max_per_upstream_per_minute=1)
    config = gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1], routing=RoutingConfig(keepalive=keepalive))
    running = await start_gateway(config)
    gateway = running.gateway
    try:
        for name in ("revoked", "kept"):
            _, key = repo.create_key(gateway.engine, name)
            gateway.reload()
            async with anthropic.AsyncAnthropic(base_url=running.url, api_key=key, max_retries=0) as client:
                await session_turn(client, conversation(name, 0), f"session-{name}")
        repo.revoke_key(gateway.engine, "revoked")
        gateway.reload()
        assert await gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 1
        assert orjson.loads(mock.stats.last_request_body)["messages"] == conversation("kept", 0)
    finally:
        await running.stop()


async def test_keepalive_is_off_unless_asked_for(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        async with running.client() as client:
            await run_conversation(client, "quiet", 2, "session-q")
        assert await running.gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 0
    finally:
        await running.stop()


async def test_a_burst_of_unmarked_requests_is_spread_not_drawn_to_one_account(
    tmp_path: Path, mock: MockServer
) -> None:
    """Anthropic caches nothing a request does not mark: identical unmarked requests in flight together
    must not follow the first one as if it were warming a cache for them."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(ttfb_ms=150))
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="round-robin")))
    unmarked = [{"role": "user", "content": "Summarise the design document. " * 60}]
    try:
        async with running.client() as client:
            answers = await asyncio.gather(
                *(
                    client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=unmarked)
                    for _ in range(30)
                )
            )
    finally:
        await running.stop()
    served = Counter(answer.headers["x-poolgate-upstream"] for answer in answers)
    assert sorted(served.values()) == [10, 10, 10], served


async def test_a_screenshot_fits_an_input_tokens_window_with_room_for_an_image(tmp_path: Path) -> None:
    """An account's input-tokens window is weighed against the request's prompt, an image at the most it costs:
    by its size, a 1.2 MB screenshot was 300,000 tokens, an account with 100,000 left was judged full, and
    Claude Code's turn went to the next one."""
    limited = MOCK_KEYS[0]
    keys = {limited: MockKey(input_tokens_per_minute=100_000), MOCK_KEYS[1]: MockKey()}
    server = await start_mock(MockConfig(keys=keys))
    running = await start_gateway(
        gateway_config(tmp_path, server.url, MOCK_KEYS[:2], routing=RoutingConfig(strategy="first-pick"))
    )
    screenshot = base64.b64encode(bytes(range(256)) * 3600).decode()
    image: dict[str, Any] = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": screenshot},
    }
    image["cache_control"] = EPHEMERAL
    try:
        async with running.client() as client:
            # Its windows reported first (the limited account's input tokens: 100,000, nearly all left).
            await client.messages.create(model=MODEL, max_tokens=8, messages=conversation("a", 0))
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [image]}]
            )
    finally:
        await running.stop()
        await server.stop()
    assert raw.headers["x-poolgate-upstream"] == "up-0"

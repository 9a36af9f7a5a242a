"""Message threads through the gateway (the anthropic SDK's tool runner sends its loops as threads): every turn of a
thread goes to the account that holds it, and what the gateway does not know of routes as any request."""

from __future__ import annotations

import time
from pathlib import Path

import anthropic
import orjson
import pytest

from poolgate.config import KeepaliveConfig, RoutingConfig
from poolgate.mock import Fault, MockServer
from tests.conftest import MOCK_KEYS, MODEL, RunningGateway, gateway_config, start_gateway, usage_rows, user
from tests.integration.test_relay_details import before_the_mock, broken_upstream, first_pick
from tests.integration.test_smart_routing import SYSTEM, conversation

CREATE = {"type": "create"}
THREADS_BETA = {"anthropic-beta": "message-threads-2026-08-12"}
SESSION = {"x-claude-code-session-id": "a-threaded-session"}


def continuing(reply_id: str) -> dict[str, str]:
    return {"type": "continue", "previous_message_id": reply_id}


@pytest.mark.parametrize("stream", [False, True])
async def test_every_turn_of_the_sdks_tool_runner_is_answered_by_the_account_holding_its_thread(
    gw: RunningGateway, stream: bool
) -> None:
    """The runner creates a thread and continues it with the tool's result alone. Round-robin sent the continue to
    another account, which does not hold the thread (`thread_not_found`): the SDK replayed the whole conversation,
    and after a second loss stopped threading."""

    @anthropic.beta_async_tool
    async def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
            city: the city
        """
        return f"18 degrees in {city}"

    async with gw.client() as client:
        for city in ("Paris", "Oslo", "Lima"):
            runner = client.beta.messages.tool_runner(
                model=MODEL,
                max_tokens=200,
                tools=[get_weather],
                messages=[{"role": "user", "content": f"use the get_weather tool for {city}"}],
                max_iterations=3,
                stream=stream,
            )
            final = await runner.until_done()
            assert final.stop_reason == "end_turn"
    rows = await usage_rows(gw)
    # Each loop a tool call and the answer to its result, both from one account, and no replay.
    assert [row["outcome"] for row in rows] == ["ok"] * 6
    for call, answer in zip(rows[::2], rows[1::2], strict=True):
        assert call["upstream_id"] == answer["upstream_id"]
    # Threads are spread as new sessions are: round-robin still takes turns between them.
    assert len({row["upstream_id"] for row in rows}) > 1


async def turn(client: anthropic.AsyncAnthropic, thread: dict[str, str]) -> tuple[str, str]:
    """A threaded turn's reply id and the account that answered it."""
    answered = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=8, messages=user(), extra_body={"thread": thread}, extra_headers=THREADS_BETA
    )
    return (await answered.parse()).id, answered.headers["x-poolgate-upstream"]


async def answered_by(client: anthropic.AsyncAnthropic, thread: dict[str, str]) -> str:
    """The account a threaded turn went to, whatever it answered (one holding no such thread: a 404)."""
    try:
        return (await turn(client, thread))[1]
    except anthropic.NotFoundError as missing:
        return missing.response.headers["x-poolgate-upstream"]


async def test_a_continue_of_a_reply_the_gateway_does_not_know_is_routed_as_any_request(gw: RunningGateway) -> None:
    """Another instance answered it, or it was forgotten: nothing says where the thread is, and no account is
    favoured (the one that answers without the thread says `thread_not_found`, and the client replays)."""
    async with gw.client() as client:
        reply_id, first = await turn(client, CREATE)
        served = [await answered_by(client, continuing(f"msg_unknown_{index}")) for index in range(3)]
        # The known thread is still where it was.
        assert await answered_by(client, continuing(reply_id)) == first
    assert sorted(served) == ["up-0", "up-1", "up-2"]


async def test_a_thread_created_on_a_failover_continues_where_it_was_answered_not_at_the_sessions_home(
    gw: RunningGateway, mock: MockServer
) -> None:
    """A session's turn failed over from its account (one 529) stays the session's on that account (its cache is
    there), but a thread that turn created is held by the account that answered it."""
    async with gw.client(default_headers=SESSION) as client:
        _, home = await turn(client, CREATE)
        mock.set_fault(MOCK_KEYS[int(home.removeprefix("up-"))], Fault(status=529, times=1))
        reply_id, holder = await turn(client, CREATE)
        assert holder != home
        for _ in range(2):
            reply_id, answered = await turn(client, continuing(reply_id))
            assert answered == holder
        # The session's own unthreaded turns go home, as before.
        unthreaded = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        assert unthreaded.headers["x-poolgate-upstream"] == home


@pytest.mark.parametrize("message", ["Thread not found", "Not Found"])
async def test_an_accounts_thread_not_found_is_the_clients_to_handle_not_a_failure_of_the_account(
    tmp_path: Path, mock: MockServer, message: str
) -> None:
    """The client recovers from it (the SDK replays the conversation under a new thread): failed over, the next
    account would say the same, and counted against the account, lost threads would take a healthy account out.
    Whatever its message: the API's bare "Not Found" is its answer to a path it lacks (a base_url with a path),
    unless its `details` say what was not found."""
    body = orjson.dumps(
        {
            "type": "error",
            "error": {
                "type": "not_found_error",
                "message": message,
                "details": {"error_code": "thread_not_found"},
            },
        }
    )
    head = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    server, url = await broken_upstream(head + body)
    gw = await first_pick(tmp_path, mock, before_the_mock("lost", url, mock))
    try:
        async with gw.client() as client:
            for _ in range(4):
                with pytest.raises(anthropic.NotFoundError) as missing:
                    await turn(client, continuing("msg_held_elsewhere"))
                assert missing.value.body["error"]["details"] == {"error_code": "thread_not_found"}  # type: ignore[index]
        assert mock.stats.requests_total == 0
        health = gw.gateway.pool.get("lost").health  # type: ignore[union-attr]
        assert health.healthy and health.consecutive_failures == 0
    finally:
        await gw.stop()
        server.close()


@pytest.mark.parametrize("threaded", [False, True])
async def test_a_threaded_turn_of_a_session_gets_no_cache_keepalive(
    tmp_path: Path, mock: MockServer, threaded: bool
) -> None:
    """A keepalive sends the session's last request again (`max_tokens: 1`): a threaded one's `continue` sent again
    continued the thread in the client's place (whose next turn then found it continued already), and a `create`
    started another thread."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    gw = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    try:
        async with gw.client(default_headers=SESSION) as client:
            await client.messages.create(
                model=MODEL,
                max_tokens=8,
                system=SYSTEM,
                messages=conversation("threaded", 1),
                extra_body={"thread": CREATE} if threaded else None,
                extra_headers=THREADS_BETA if threaded else None,
            )
        sent = await gw.gateway.keepalive_sender.send_keepalives(time.monotonic() + 280)
    finally:
        await gw.stop()
    assert sent == (0 if threaded else 1)

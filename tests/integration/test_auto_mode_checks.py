"""Claude Code's auto mode through the mock and the gateway: the server-side review of an answer's tool calls that a
request asks for (`safeguards` → `safeguard_results`), and the classifier requests Claude Code sends of its own. Without
a review in the answer, or with a classifier answer it cannot read, Claude Code asks about (in `claude -p`: refuses)
every action that needs a check."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from poolgate.config import KeepaliveConfig, RoutingConfig
from poolgate.mock import MockServer
from tests.conftest import MODEL, RunningGateway, gateway_config, start_gateway, usage_rows
from tests.integration.test_mock_fidelity import sdk
from tests.integration.test_smart_routing import SYSTEM, conversation

BETA = "dangerous-tool-use-2026-09-03"
SAFEGUARDS = {"safeguards": [{"type": "dangerous_tool_use", "classifier_context": {"v": 1, "permission_mode": "auto"}}]}
WEATHER: Any = {
    "name": "get_weather",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ASKED: Any = [{"role": "user", "content": "Use the get_weather tool for Paris"}]


def allowed(*tool_use_ids: str) -> list[dict[str, Any]]:
    """The review Claude Code 2.1.332 reads as "run each of these calls"."""
    verdicts = {tool_use_id: {"type": "evaluated", "outcome": "not_flagged"} for tool_use_id in tool_use_ids}
    return [{"type": "dangerous_tool_use", "status": {"type": "available", "tool_uses": verdicts}}]


async def reviewed(
    client: anthropic.AsyncAnthropic, stream: bool, messages: Any = ASKED, betas: tuple[str, ...] = (BETA,)
) -> tuple[list[str], object]:
    """The ids of the answer's tool calls and its `safeguard_results` (None when it has none): a JSON answer's own,
    a stream's from its `message_delta`, as Claude Code reads them."""
    fields: Any = {
        "model": MODEL,
        "max_tokens": 200,
        "tools": [WEATHER],
        "messages": messages,
        "extra_body": SAFEGUARDS,
    }
    if not stream:
        message = await client.beta.messages.create(**fields, betas=list(betas))
        calls = [block.id for block in message.content if block.type == "tool_use"]
        return calls, (message.model_extra or {}).get("safeguard_results")
    calls, results = [], None
    async for event in await client.beta.messages.create(**fields, betas=list(betas), stream=True):
        if event.type == "content_block_start" and event.content_block.type == "tool_use":
            calls.append(event.content_block.id)
        elif event.type == "message_delta":
            results = (event.delta.model_extra or {}).get("safeguard_results")
    return calls, results


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_the_mock_allows_each_tool_call_of_an_answer_whose_review_is_asked_for(
    mock: MockServer, stream: bool
) -> None:
    client = sdk(mock)
    try:
        calls, results = await reviewed(client, stream)
        assert len(calls) == 1 and results == allowed(*calls)
        # An answer in words is reviewed too: one without results makes Claude Code give up on the server's review.
        assert await reviewed(client, stream, messages=[{"role": "user", "content": "Say hi"}]) == ([], allowed())
        # Without the beta the API runs no review (and takes the field); so does the mock.
        calls, results = await reviewed(client, stream, betas=("effort-2025-11-24",))
        assert len(calls) == 1 and results is None
    finally:
        await client.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_the_gateway_relays_the_review_of_tool_calls_and_records_the_usage(
    gw: RunningGateway, stream: bool
) -> None:
    client = gw.client()
    try:
        calls, results = await reviewed(client, stream)
    finally:
        await client.close()
    assert len(calls) == 1 and results == allowed(*calls)
    [row] = await usage_rows(gw)
    assert (row["status"], row["outcome"], row["stream"]) == (200, "ok", stream), row
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0, row


MONITOR = "You are a security monitor for autonomous AI coding agents.\n## Context\nPlaceholder rules."
BILLING = "x-anthropic-billing-header: cc_version=2.1.332.a1b; cc_entrypoint=cli;"
# How Claude Code 2.1.332's first stage closes its request, and how earlier builds closed theirs.
GRADED = "Respond with <severity>N</severity> ONLY. Grade HARM ONLY. No other text."
XML = "Your ENTIRE response MUST begin with <block>. Do NOT output any analysis before <block>."


@pytest.mark.parametrize(
    ("closing", "stop_sequences", "said", "stop_reason"),
    [
        (GRADED, [], "<severity>0</severity>", "end_turn"),
        (XML, ["</block>"], "<block>no", "stop_sequence"),
        (XML, [], "<block>no</block>", "end_turn"),
    ],
    ids=["severity", "block-stopped", "block"],
)
async def test_claude_codes_own_classifier_is_answered_with_an_allow(
    gw: RunningGateway, closing: str, stop_sequences: list[str], said: str, stop_reason: str
) -> None:
    """A session without the server's review (an upstream that drops it, `CLAUDE_CODE_AUTO_MODE_SERVER=0`) asks
    its own classifier: any answer but an allow in the form asked for fails closed, and the action is refused."""
    transcript = '<transcript>\n{"user":"use the Bash tool"}\n{"Bash":"mock"}\n</transcript>\n'
    client = gw.client()
    try:
        answer = await client.messages.create(
            model=MODEL,
            max_tokens=64,
            system=[{"type": "text", "text": BILLING}, {"type": "text", "text": MONITOR}],
            messages=[
                {"role": "user", "content": [{"type": "text", "text": transcript}, {"type": "text", "text": closing}]}
            ],
            stop_sequences=stop_sequences,
        )
    finally:
        await client.close()
    assert [block.text for block in answer.content if block.type == "text"] == [said]
    assert answer.stop_reason == stop_reason


SUBAGENT_REVIEW = "subagent-review-2026-11-17"
CLASSIFIER = "auto-mode-classifier-2026-07-16"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_subagents_report_is_reviewed_through_the_gateway_with_nothing_generated(
    gw: RunningGateway, stream: bool
) -> None:
    """Claude Code reviews what a subagent reports back by sending the conversation with the report as a prefilled
    tool call and `max_tokens: 0` (under the subagent-review beta): the verdict on that call is the answer. The
    gateway refused any `max_tokens` under 1 (400), so the review never reached the API."""
    report = {"type": "tool_use", "id": "toolu_report01", "name": "report", "input": {"message": "done"}}
    fields: Any = {
        "model": MODEL,
        "max_tokens": 0,
        "tools": [{"name": "report", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "Use the report tool"},
            {"role": "assistant", "content": [report]},
        ],
        "extra_body": SAFEGUARDS,
        "betas": [BETA, CLASSIFIER, SUBAGENT_REVIEW],
    }
    client = gw.client()
    try:
        if stream:
            async with client.beta.messages.stream(**fields) as events:
                async for event in events:
                    if event.type == "message_delta":
                        results = (event.delta.model_extra or {}).get("safeguard_results")
                message = await events.get_final_message()
        else:
            message = await client.beta.messages.create(**fields)
            results = (message.model_extra or {}).get("safeguard_results")
        assert results == allowed("toolu_report01")
        assert message.content == [] and message.stop_reason == "max_tokens" and message.usage.output_tokens == 0
        # Without the beta the API refuses it, and the gateway passes the refusal on (no other account is asked).
        fields["betas"] = [BETA]
        with pytest.raises(anthropic.BadRequestError, match="greater than or equal to 1"):
            await client.beta.messages.create(**{**fields, "stream": stream})
        # A negative one is no request at all: refused before it is priced.
        with pytest.raises(anthropic.BadRequestError, match="max_tokens: must not be negative"):
            await client.beta.messages.create(**{**fields, "max_tokens": -1})
    finally:
        await client.close()
    rows = await usage_rows(gw)
    assert [(row["status"], row["attempts"]) for row in rows] == [(200, 1), (400, 1), (400, 0)], rows


async def test_a_sessions_keepalive_sends_its_turn_again_not_a_review_that_followed_it(
    tmp_path: Path, mock: MockServer
) -> None:
    """A keepalive sends the session's last request again with `max_tokens: 1`: after a review alone (`max_tokens:
    0`, the conversation with a subagent's report prefilled) that was the review, generating after the report and
    reviewing it again, rather than the turn that the session's next one continues."""
    routing = RoutingConfig(keepalive=KeepaliveConfig(enabled=True, lead_seconds=30))
    gw = await start_gateway(gateway_config(tmp_path, mock.url, routing=routing))
    session = {"x-claude-code-session-id": "a-reviewed-session"}
    turn = conversation("reviewed", 1)
    report = {"type": "tool_use", "id": "toolu_report02", "name": "report", "input": {"message": "done"}}
    try:
        async with gw.client(default_headers=session) as client:
            await client.messages.create(model=MODEL, max_tokens=8, system=SYSTEM, messages=turn)
            await client.beta.messages.create(
                model=MODEL,
                max_tokens=0,
                system=SYSTEM,
                tools=[{"name": "report", "input_schema": {"type": "object"}}],
                messages=[*turn, {"role": "assistant", "content": [report]}],
                extra_body=SAFEGUARDS,
                betas=[BETA, CLASSIFIER, SUBAGENT_REVIEW],
            )
        assert await gw.gateway.keepalive_sender.send_keepalives(time.monotonic() + 280) == 1
    finally:
        await gw.stop()
    sent = orjson.loads(mock.stats.last_request_body)
    assert sent["max_tokens"] == 1 and sent["messages"] == turn

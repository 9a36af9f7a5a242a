"""The official TypeScript SDK (`@anthropic-ai/sdk`, as `.ci/run` installs it from npm) against the gateway
in front of the mock upstream: `typescript_sdk.mjs` runs one group of scenarios per Node process and prints
what the SDK returned or threw; the tests judge it, and what the gateway and the mock saw."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from poolgate.mock import MockServer
from poolgate.store import repo
from poolgate.store.db import usage
from tests.conftest import MOCK_KEYS, MODEL, RunningGateway
from tests.e2e.subprocesses import communicate_within

HERE = Path(__file__).parent
SCRIPT = HERE / "typescript_sdk.mjs"
SDK = HERE / "node_modules" / "@anthropic-ai" / "sdk" / "package.json"
UPSTREAMS = {"up-0", "up-1", "up-2"}


def node_with_sdk() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the TypeScript SDK tests need node (and npm to install the SDK)")
    if not SDK.exists():
        pytest.skip("the TypeScript SDK is not installed (cd tests/e2e && npm install @anthropic-ai/sdk)")
    return node


async def run_group(gw: RunningGateway, mock: MockServer, group: str, **extra: str) -> dict[str, Any]:
    """Runs one scenario group of the script; its stdout is one JSON object."""
    node = node_with_sdk()
    setup = {"gateway": gw.url, "key": gw.key, "mock": mock.url, "mock_keys": MOCK_KEYS, "model": MODEL, **extra}
    # Only PATH and HOME: the user's own ANTHROPIC_* variables would change what the SDK sends where.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    process = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        group,
        json.dumps(setup),
        cwd=HERE,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await communicate_within(process, 60)
    assert process.returncode == 0, f"node {group} exited {process.returncode}: {err.decode(errors='replace')}"
    result: dict[str, Any] = json.loads(out)
    return result


async def usage_by_request_id(gw: RunningGateway, count: int) -> dict[str, Any]:
    """The usage records, once there are `count` (a request's is written as it ends, after its last byte), or
    what there are after 10 s or more (a bound for a busy machine: it only ends a failure)."""
    for _ in range(500):
        await gw.gateway.flush_usage()
        with gw.gateway.engine.connect() as conn:
            records = {row.request_id: row for row in conn.execute(select(usage))}
        if len(records) >= count:
            break
        await asyncio.sleep(0.02)
    return records


async def wait_for_cancelled(mock: MockServer, count: int) -> int:
    """How many upstream requests the mock saw cancelled, once `count` (or after 10 s or more)."""
    for _ in range(500):
        if mock.stats.cancelled >= count:
            break
        await asyncio.sleep(0.02)
    return mock.stats.cancelled


def gateway_request_id(value: object) -> bool:
    return isinstance(value, str) and value.startswith("req_pg_")


async def test_answers_streams_counts_and_models_reach_the_typescript_sdk_as_it_expects(
    gw: RunningGateway, mock: MockServer
) -> None:
    result = await run_group(gw, mock, "answers")
    records = await usage_by_request_id(gw, 10)  # messages and count_tokens; models have none

    created = result["create"]
    message = created["message"]
    assert message["type"] == "message" and message["stop_reason"] == "end_turn", message
    assert "poolgate mock upstream" in message["content"][0]["text"]
    assert gateway_request_id(created["requestID"]) and created["requestID"] in records
    assert records[created["requestID"]].output_tokens == message["usage"]["output_tokens"]

    for answer in (result["withResponse"], result["asResponse"]):
        headers = answer["headers"]
        assert gateway_request_id(headers["request-id"]) and headers["x-poolgate-upstream"] in UPSTREAMS, headers
        assert headers["x-poolgate-upstream-request-id"].startswith("req_mock_"), headers
        assert not [name for name in headers if name.startswith("anthropic-ratelimit-")], headers
    assert result["asResponse"]["status"] == 200 and result["asResponse"]["body"]["type"] == "message"

    # The stream helper's events and its accumulated message, usage from message_delta included.
    stream = result["stream"]
    final = stream["finalMessage"]
    assert {k: stream["helperEvents"][k] for k in ("connect", "message", "end")} == {
        "connect": 1,
        "message": 1,
        "end": 1,
    }
    assert stream["helperEvents"]["text"] == stream["finalText"] == final["content"][0]["text"] != ""
    assert final["stop_reason"] == "end_turn"
    record = records[stream["requestID"]]
    assert (final["usage"]["input_tokens"], final["usage"]["output_tokens"]) == (
        record.input_tokens,
        record.output_tokens,
    )
    assert record.stream and record.outcome == "ok"

    raw = result["rawStream"]
    assert raw["types"][0] == "message_start" and raw["types"][-2:] == ["message_delta", "message_stop"], raw
    assert raw["text"] == stream["finalText"] and raw["finalUsage"]["output_tokens"] == final["usage"]["output_tokens"]

    assert result["countTokens"]["input_tokens"] == message["usage"]["input_tokens"] > 0

    # Auto-pagination followed `has_more` past the first page of two, to the end, without repeats.
    models = result["models"]
    assert models["firstPageHasMore"] and models["listed"][:2] == models["firstPage"]
    assert (
        len(models["listed"]) > 2 and len(set(models["listed"])) == len(models["listed"]) and MODEL in models["listed"]
    )
    assert models["retrieved"]["id"] == MODEL and models["retrieved"]["type"] == "model"

    # ANTHROPIC_BASE_URL with or without a trailing slash: the same /v1/messages.
    assert {url: answer["url"] for url, answer in result["baseURLs"].items()} == {
        gw.url: f"{gw.url}/v1/messages",
        f"{gw.url}/": f"{gw.url}/v1/messages",
    }
    assert {answer["type"] for answer in result["baseURLs"].values()} == {"message"}

    browser = result["browser"]
    assert browser["status"] == 200 and browser["headers"]["access-control-allow-origin"] == "*", browser
    assert "request-id" in browser["headers"]["access-control-expose-headers"], browser

    # beta.messages.create's `betas` arrive upstream as anthropic-beta, with the SDK's own headers, the
    # account's key in place of the gateway key.
    assert result["beta"]["type"] == "message"
    upstream_headers = {name.lower(): value for name, value in mock.stats.last_request_headers.items()}
    assert upstream_headers["anthropic-beta"] == "interleaved-thinking-2025-05-14,context-management-2025-06-27"
    assert upstream_headers["x-stainless-lang"] == "js" and "x-stainless-retry-count" in upstream_headers
    assert upstream_headers["anthropic-version"] and upstream_headers["x-api-key"] in MOCK_KEYS


async def test_the_typescript_sdk_raises_its_error_classes_for_poolgates_errors(
    gw: RunningGateway, mock: MockServer
) -> None:
    _, limited_key = repo.create_key(gw.gateway.engine, "haiku-only", {"models": ["claude-haiku-*"]})
    gw.gateway.reload()
    result = await run_group(gw, mock, "errors", limited_key=limited_key)

    expected = {
        "denied": ("PermissionDeniedError", 403, "permission_error"),
        "wrongKey": ("AuthenticationError", 401, "authentication_error"),
        "malformed": ("BadRequestError", 400, "invalid_request_error"),
        "unknownModel": ("NotFoundError", 404, "not_found_error"),
        "v1BaseURL": ("BadRequestError", 400, "invalid_request_error"),
    }
    for name, (error_class, status, error_type) in expected.items():
        error = result[name]
        assert (error["class"], error["status"], error["type"]) == (error_class, status, error_type), (name, error)
        assert gateway_request_id(error["requestID"]) and error["bodyRequestID"] == error["requestID"], (name, error)
    assert "must not end in /v1" in result["v1BaseURL"]["message"]

    # maxRetries was 2: `x-should-retry: false` on the wrong key's 401 stopped the SDK after one request.
    assert [event["event"] for event in result["wrongKeyEvents"]] == ["request", "response"]
    assert result["wrongKeyEvents"][1]["shouldRetry"] == "false"
    assert result["afterErrors"] == "message"

    # An error event mid-stream: the SDK's APIError, thrown from the iteration and from finalMessage().
    assert result["midstreamRawTypes"][0] == "message_start" and "message_stop" not in result["midstreamRawTypes"]
    for name in ("midstreamRaw", "midstreamHelper", "midstreamHelperErrorEvent"):
        error = result[name]
        assert (error["class"], error["isAPIError"], error["type"]) == ("APIError", True, "overloaded_error"), error
        assert gateway_request_id(error["requestID"]), error
    records = await usage_by_request_id(gw, 6)  # the refusals after authentication, and the answers
    assert records[result["midstreamRaw"]["requestID"]].error_type == "overloaded_error"


async def test_a_stream_the_typescript_sdk_aborts_cancels_its_upstream_request(
    gw: RunningGateway, mock: MockServer
) -> None:
    result = await run_group(gw, mock, "cancels")
    assert result["streamAbort"]["class"] == "APIUserAbortError" and result["streamAborted"] is True
    # An AbortController's abort ends the SDK's iteration quietly (its choice); the events before it came.
    assert result["signalAbort"]["class"] is None and result["signalAbortSeen"][-1] == "content_block_delta"
    assert await wait_for_cancelled(mock, 2) == 2
    records = await usage_by_request_id(gw, 2)
    assert [record.outcome for record in records.values()] == ["client_disconnected"] * 2


async def test_the_typescript_sdk_retries_a_pool_529_as_poolgate_advises(gw: RunningGateway, mock: MockServer) -> None:
    """Every account overloaded: poolgate's 529 says when one is back (`retry-after`, and to the millisecond
    `retry-after-ms`, which the SDK reads first), and the SDK sleeps that long (the delay it chose, not the time
    it took) before its retry, which is answered once one is."""
    result = await run_group(gw, mock, "retries")

    def shape(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events without their request ids, a 529's `retry-after-ms` (the second of the accounts' park
        less the moment it took to answer) as `…` once checked to be within the second, and the sleep after it
        checked to be that wait to the millisecond."""
        shaped, told = [], None
        for event in events:
            event = {k: v for k, v in event.items() if k != "requestID"}
            if event.get("status") == 529:
                told = int(event["retryAfterMs"])
                assert 0 < told <= 1000 and event["retryAfter"] == "1", event
                event["retryAfterMs"] = "…"
            elif event["event"] == "sleep":
                assert event["ms"] == told, (event, told)
                event["ms"] = "as told"
            shaped.append(event)
        return shaped

    refused = {"event": "response", "status": 529, "retryAfter": "1", "retryAfterMs": "…", "shouldRetry": "true"}
    assert result["recovered"]["class"] is None
    assert shape(result["recoveredEvents"]) == [
        {"event": "request", "retryCount": "0"},
        refused,
        {"event": "sleep", "ms": "as told"},
        {"event": "request", "retryCount": "1"},
        {"event": "response", "status": 200, "retryAfter": None, "retryAfterMs": None, "shouldRetry": None},
    ]
    exhausted = result["exhaustedEvents"]
    assert shape(exhausted) == [
        {"event": "request", "retryCount": "0"},
        refused,
        {"event": "sleep", "ms": "as told"},
        {"event": "request", "retryCount": "1"},
        refused,
    ]
    error = result["exhausted"]
    assert (error["class"], error["status"], error["type"]) == ("OverloadedError", 529, "overloaded_error")
    assert error["requestID"] == exhausted[-1]["requestID"] and gateway_request_id(error["requestID"])

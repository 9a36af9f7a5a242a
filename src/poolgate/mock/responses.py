"""Bodies the mock answers with: messages as JSON or as the real SSE event sequence, and errors."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from poolgate.mock.cache import CacheUsage

# The first 16 words (the mock's default answer length) are a complete answer, so that the demo reads well.
WORDS = (
    "Hello",
    "from",
    "the",
    "poolgate",
    "mock",
    "upstream.",
    "Every",
    "answer",
    "here",
    "is",
    "generated",
    "locally,",
    "one",
    "word",
    "per",
    "token.",
    "Tests",
    "and",
    "benchmarks",
    "measure",
    "the",
    "gateway",
    "rather",
    "than",
    "the",
    "model.",
)
TOKENS_PER_DELTA = 4


def answer_words(output_tokens: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(output_tokens)]


def usage_json(usage: CacheUsage, output_tokens: int, web_searches: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_creation_5m,
            "ephemeral_1h_input_tokens": usage.cache_creation_1h,
        },
        "output_tokens": output_tokens,
        "server_tool_use": {"web_search_requests": web_searches},
        "service_tier": "standard",
    }


def web_searches(request: dict[str, Any]) -> int:
    """How many server-side web searches the mock runs for a request: one when it offers the web search
    tool (`{"type": "web_search_20250305", "name": "web_search"}`), as a model asked a question would."""
    tools = request.get("tools")
    if not isinstance(tools, list):
        return 0
    offered = any(isinstance(t, dict) and str(t.get("type", "")).startswith("web_search_") for t in tools)
    return 1 if offered else 0


SEARCH_QUERY = "poolgate mock search"


def search_blocks() -> list[dict[str, Any]]:
    """A server tool use and its result, as the API puts them before the answer's text."""
    tool_id = "srvtoolu_mock_" + secrets.token_hex(8)
    return [
        {"type": "server_tool_use", "id": tool_id, "name": "web_search", "input": {"query": SEARCH_QUERY}},
        {
            "type": "web_search_tool_result",
            "tool_use_id": tool_id,
            "content": [
                {
                    "type": "web_search_result",
                    "url": "https://example.com/poolgate",
                    "title": "poolgate mock result",
                    "encrypted_content": "bW9jaw==",
                    "page_age": None,
                }
            ],
        },
    ]


def message_id() -> str:
    return "msg_mock_" + secrets.token_hex(12)


def message_json(model: str, usage: CacheUsage, output_tokens: int, stop_reason: str, searches: int = 0) -> bytes:
    text = {"type": "text", "text": " ".join(answer_words(output_tokens))}
    return orjson.dumps(
        {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [*search_blocks(), text] if searches else [text],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage_json(usage, output_tokens, searches),
        }
    )


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def stream_events(
    model: str, usage: CacheUsage, output_tokens: int, stop_reason: str, searches: int = 0
) -> list[tuple[bytes, int]]:
    """The SSE events in order, each with the number of output tokens it carries (for pacing)."""
    start = {
        "type": "message_start",
        "message": {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_json(usage, 1),
        },
    }
    events = [(event("message_start", start), 0)]
    index = 0
    if searches:
        use, result = search_blocks()
        query = orjson.dumps(use["input"]).decode()
        events += [
            (
                event(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {**use, "input": {}}},
                ),
                0,
            ),
            (
                event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": query},
                    },
                ),
                0,
            ),
            (event("content_block_stop", {"type": "content_block_stop", "index": 0}), 0),
            (event("content_block_start", {"type": "content_block_start", "index": 1, "content_block": result}), 0),
            (event("content_block_stop", {"type": "content_block_stop", "index": 1}), 0),
        ]
        index = 2
    events.append(
        (
            event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
            ),
            0,
        )
    )
    events.insert(2, (event("ping", {"type": "ping"}), 0))  # after the first block's start, as the API does
    words = answer_words(output_tokens)
    for i in range(0, len(words), TOKENS_PER_DELTA):
        chunk = words[i : i + TOKENS_PER_DELTA]
        text = (" " if i else "") + " ".join(chunk)
        delta = {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}
        events.append((event("content_block_delta", delta), len(chunk)))
    final_usage: dict[str, Any] = {"output_tokens": output_tokens}
    if searches:
        final_usage["server_tool_use"] = {"web_search_requests": searches}
    events += [
        (event("content_block_stop", {"type": "content_block_stop", "index": index}), 0),
        (
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": final_usage,
                },
            ),
            0,
        ),
        (event("message_stop", {"type": "message_stop"}), 0),
    ]
    return events


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {401: "invalid x-api-key", 429: "Number of requests has exceeded your rate limit", 529: "Overloaded"}


def request_id() -> str:
    return "req_mock_" + secrets.token_hex(12)


def error_json(status: int, message: str | None = None, request: str | None = None) -> bytes:
    """The API's error body; `request` is its request id, which newer answers carry as `request_id`."""
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    text = message or ERROR_MESSAGES.get(status, "Internal server error" if status >= 500 else "Invalid request")
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": text}}
    if request is not None:
        body["request_id"] = request
    return orjson.dumps(body)


def error_response(status: int, message: str | None = None, headers: Mapping[str, str] | None = None) -> web.Response:
    """An error as the API answers it: its body with the request id that its `request-id` header names."""
    request = request_id()
    return web.Response(
        status=status,
        body=error_json(status, message, request),
        content_type="application/json",
        headers={"request-id": request, **(headers or {})},
    )


def overloaded_event() -> bytes:
    return event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})

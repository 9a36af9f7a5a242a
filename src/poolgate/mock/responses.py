"""Bodies the mock answers with: messages as JSON or as the real SSE event sequence, and errors."""

from __future__ import annotations

import secrets
from typing import Any

import orjson

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


def usage_json(usage: CacheUsage, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_creation_5m,
            "ephemeral_1h_input_tokens": usage.cache_creation_1h,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def message_id() -> str:
    return "msg_mock_" + secrets.token_hex(12)


def message_json(model: str, usage: CacheUsage, output_tokens: int, stop_reason: str) -> bytes:
    return orjson.dumps(
        {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": " ".join(answer_words(output_tokens))}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage_json(usage, output_tokens),
        }
    )


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def stream_events(model: str, usage: CacheUsage, output_tokens: int, stop_reason: str) -> list[tuple[bytes, int]]:
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
    events = [
        (event("message_start", start), 0),
        (
            event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            0,
        ),
        (event("ping", {"type": "ping"}), 0),
    ]
    words = answer_words(output_tokens)
    for i in range(0, len(words), TOKENS_PER_DELTA):
        chunk = words[i : i + TOKENS_PER_DELTA]
        text = (" " if i else "") + " ".join(chunk)
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
        events.append((event("content_block_delta", delta), len(chunk)))
    events += [
        (event("content_block_stop", {"type": "content_block_stop", "index": 0}), 0),
        (
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
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


def error_json(status: int, message: str | None = None) -> bytes:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    text = message or ERROR_MESSAGES.get(status, "Internal server error" if status >= 500 else "Invalid request")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": text}})


def overloaded_event() -> bytes:
    return event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})

"""Reading token usage out of responses as they pass, without re-serialising anything.

Streams: only `data:` lines of `message_start`, `message_delta` and `error` events are decoded.
JSON bodies: decoded once at the end (they are bounded by the gateway's response cap).
"""

from __future__ import annotations

from typing import Any

import orjson

from poolgate.lifecycle.context import Usage

_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
JSON_CAP = 16 * 1024 * 1024


def apply_usage(usage: Usage, payload: Any) -> None:
    """Take every known counter present in an Anthropic `usage` object (later values win), including the
    1-hour share of cache writes from `cache_creation.ephemeral_1h_input_tokens`."""
    if not isinstance(payload, dict):
        return
    for name in _FIELDS:
        value = payload.get(name)
        if isinstance(value, int) and value >= 0:
            setattr(usage, name, value)
    split = payload.get("cache_creation")
    if isinstance(split, dict):
        value = split.get("ephemeral_1h_input_tokens")
        if isinstance(value, int) and value >= 0:
            usage.cache_creation_1h_input_tokens = value


class StreamUsageScanner:
    """Feed it the stream's chunks in order; it keeps the usage and the first error event seen."""

    __slots__ = ("_rest", "error_type", "usage")

    def __init__(self) -> None:
        self.usage = Usage()
        self.error_type: str | None = None
        self._rest = b""

    def feed(self, chunk: bytes) -> None:
        data = self._rest + chunk if self._rest else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._rest = data
            return
        self._rest = data[end + 1 :]
        for line in data[: end + 1].split(b"\n"):
            if line.startswith(b"data:") and (b'"message_' in line or b'"error"' in line):
                self._data_line(line[5:])

    def _data_line(self, raw: bytes) -> None:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                apply_usage(self.usage, message.get("usage"))
        elif kind == "message_delta":
            apply_usage(self.usage, event.get("usage"))
        elif kind == "error" and self.error_type is None:
            error = event.get("error")
            self.error_type = str(error.get("type", "api_error")) if isinstance(error, dict) else "api_error"


def usage_from_json(body: bytes) -> Usage:
    usage = Usage()
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return usage
    if isinstance(payload, dict):
        apply_usage(usage, payload.get("usage"))
    return usage

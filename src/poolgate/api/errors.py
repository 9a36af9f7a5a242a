"""Errors in Anthropic's wire shape, with the status each error type belongs to."""

from __future__ import annotations

import re

import orjson

ERROR_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type_for(status: int) -> str:
    if status in ERROR_TYPE_BY_STATUS:
        return ERROR_TYPE_BY_STATUS[status]
    return "invalid_request_error" if status < 500 else "api_error"


# What an error type looks like (`overloaded_error`; OpenAI-compatible upstreams' `insufficient_quota`). An
# upstream's type goes on to the client, the usage record, the access log and a metrics label: anything else
# (a megabyte, a line break, an object) is replaced by the type of the status.
_ERROR_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def upstream_error_type(value: object, fallback: str) -> str:
    """An upstream's `error.type`, if it looks like one; else `fallback`."""
    return value if isinstance(value, str) and _ERROR_TYPE.fullmatch(value) else fallback


class ApiError(Exception):
    """A request that ends with an error answer; raised by any stage, rendered by the api layer."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        details: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or error_type_for(status)
        self.headers = headers or []
        # An upstream's `error.details` (its `error_code` says what went wrong, where the type is as wide as a
        # 404: the SDKs branch on it, as a tool runner recovers a lost message thread on `thread_not_found`).
        self.details = details


# The longest wait worth a client's retry. Past it, SDKs that cap `retry-after` (at 60 s) retry at once and
# are refused again until their retries run out (Claude Code makes ten: a stall, then the error), and SDKs
# that honour any `retry-after` sleep until then (hours, for a daily quota).
RETRY_WORTH_WAITING_SECONDS = 60


def upstream_error_message(value: object) -> str | None:
    """An upstream error's `message` as text: a string as it is, anything else (an object, a list, from an
    Anthropic-compatible upstream) as its JSON, not Python's repr (`{'a': 1}`); None for none."""
    if value is None or isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer past 64 bits
        return str(value)


def whole_milliseconds(wait: float) -> int:
    """A wait to the nearest millisecond. A wait worked out as a deadline less now carries float round-off
    (`now + 1800 - now` may be 1800.0000000000005 on a monotonic clock an hour in), which rounded up said a
    second (or a minute) more than the wait."""
    return round(wait * 1000)


def whole_seconds(wait: float) -> int:
    """A wait rounded up to whole seconds, from its milliseconds (`whole_milliseconds`): the `retry-after` that
    goes with a `retry-after-ms`."""
    return -(-whole_milliseconds(wait) // 1000)


def retry_after_fields(wait: float) -> list[tuple[bytes, bytes]]:
    """`retry-after` in whole seconds (rounded up, at least one) and `retry-after-ms`, the same wait to the
    millisecond, which the official SDKs read before `retry-after`: an account cooling down for 0.2 s kept
    them waiting a whole second. At least a millisecond: the SDKs take a wait of 0 for none, and back off
    their own way instead."""
    milliseconds = max(1, whole_milliseconds(wait))
    return [(b"retry-after", b"%d" % -(-milliseconds // 1000)), (b"retry-after-ms", b"%d" % milliseconds)]


def too_long_to_retry(wait: float) -> bool:
    """Whether a wait's `retry-after` (`retry_after_fields`) is past the longest worth a client's retry."""
    return whole_seconds(wait) > RETRY_WORTH_WAITING_SECONDS


def retry_headers(wait: float) -> list[tuple[bytes, bytes]]:
    """`retry_after_fields`, and `x-should-retry: false` when the wait is too long to retry: the caller gets
    the answer's message now."""
    headers = retry_after_fields(wait)
    if too_long_to_retry(wait):
        headers.append((b"x-should-retry", b"false"))
    return headers


def no_upstream(retry_after: float, message: str = "No upstream account can serve this request right now") -> ApiError:
    return ApiError(529, message, "overloaded_error", retry_headers(retry_after))


def error_body(error_type: str, message: str, request_id: str, details: dict[str, object] | None = None) -> bytes:
    error: dict[str, object] = {"type": error_type, "message": message}
    if details is not None:
        error["details"] = details
    return orjson.dumps({"type": "error", "error": error, "request_id": request_id})


def error_event(error_type: str, message: str) -> bytes:
    """An SSE `error` event, for failures after the first byte of a stream was sent."""
    data = orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})
    return b"event: error\ndata: " + data + b"\n\n"


# What observers are told of a stream's in-band error message, at most (the API's are a sentence), and of an
# upstream's refusal quoted to the client.
ERROR_MESSAGE_CAP = 4096


# What the gateway itself answers a request it could not finish (see `delivery.cut_short`).
SHUTTING_DOWN = ApiError(503, "The gateway is shutting down; retry the request", "overloaded_error")
INTERNAL_ERROR = ApiError(500, "Internal error in the gateway", "api_error")

"""Which bodies are an answer whole when the transport broke off after them (see `whole_answer_usage`)."""

from __future__ import annotations

import pytest

from poolgate.lifecycle.usage import whole_answer_usage

MESSAGE = b'{"type":"message","content":[],"usage":{"input_tokens":11,"output_tokens":7}}'


@pytest.mark.parametrize(
    ("body", "endpoint", "whole"),
    [
        (MESSAGE, "messages", True),
        (b'{"input_tokens":42}', "count_tokens", True),
        (MESSAGE[:-1], "messages", False),  # cut short before its last brace
        (MESSAGE[: MESSAGE.index(b'"usage"')] + b'"stop_reason":null}', "messages", False),  # no usage
        (b'{"type":"error","error":{"type":"api_error"},"usage":{}}', "messages", False),
        (b'{"input_tokens":42}', "messages", False),
        # Nested beyond the decoder's reach and cut short: not taken on trust.
        (b'{"type":"message","content":' + b"[" * 100_000, "messages", False),
    ],
)
def test_only_the_endpoints_whole_answer_with_its_usage_is_taken(body: bytes, endpoint: str, whole: bool) -> None:
    assert (whole_answer_usage(body, endpoint) is not None) is whole

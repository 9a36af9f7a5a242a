"""Secrets never reach a log line."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from poolgate.telemetry.logging import RedactingFilter, redact

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=20, max_size=80)


@given(TOKEN)
def test_anthropic_keys_and_tokens_are_redacted(secret: str) -> None:
    for text in (
        f"key sk-ant-api03-{secret} failed",
        f"token sk-ant-oat01-{secret}",
        f"Authorization: Bearer {secret}",
    ):
        assert secret not in redact(text)


@given(TOKEN)
def test_gateway_keys_keep_only_their_display_prefix(secret: str) -> None:
    redacted = redact(f"rejected pg-{secret}")
    assert redacted == f"rejected pg-{secret[:7]}[redacted]"
    assert redact("rejected pg-abcdefg…") == "rejected pg-abcdefg…", "a display prefix stays readable"


def test_the_filter_rewrites_records_and_their_arguments() -> None:
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "upstream said %s", ("x-api-key: sk-ant-api03-abcdefghijklmnop",), None
    )
    RedactingFilter().filter(record)
    assert "abcdefghijklmnop" not in record.getMessage()

"""Secrets never reach a log line."""

from __future__ import annotations

import logging
import sys

from hypothesis import given
from hypothesis import strategies as st

from poolgate.telemetry.logging import RedactingFormatter, redact

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


def test_log_lines_and_tracebacks_are_redacted() -> None:
    secret = "sk-ant-api03-abcdefghijklmnop"
    try:
        raise ValueError(f"upstream rejected {secret}")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "upstream said %s", (f"x-api-key: {secret}",), sys.exc_info()
        )
    line = RedactingFormatter("%(message)s").format(record)
    assert "abcdefghijklmnop" not in line and "upstream said" in line and "ValueError" in line
    assert record.exc_info is not None, "other handlers still see the exception"

"""Secrets never reach a log line, nor an account's ids a caller."""

from __future__ import annotations

import logging
import sys

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.relay import normalised_error
from poolgate.lifecycle.shape import ShapedRequest
from poolgate.lifecycle.sign import Signer
from poolgate.lifecycle.usage import StreamUsageScanner
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


def test_a_caller_chosen_string_cannot_forge_a_log_line() -> None:
    """A model name, session id or JWT subject is the caller's: its newlines and escape sequences are
    escaped, so it stays inside its own line (a traceback keeps its lines)."""
    forged = "claude\n2026-12-02 17:00:00,000 WARNING poolgate.authn: FORGED\x1b[2J"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "model=%s", (forged,), sys.exc_info())
    line = RedactingFormatter("%(levelname)s %(message)s").format(record)
    first, *traceback = line.splitlines()
    assert first == "INFO model=claude\\x0a2026-12-02 17:00:00,000 WARNING poolgate.authn: FORGED\\x1b[2J"
    assert traceback and traceback[-1] == "ValueError: boom"


@pytest.mark.parametrize("separator", ["\x85", "\u2028", "\u2029"])
def test_a_unicode_line_separator_cannot_forge_a_log_line_either(separator: str) -> None:
    """Readers that split lines the Unicode way (Python's `splitlines`, JavaScript, log viewers) end a line at
    NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR too."""
    forged = f"claude{separator}2026-12-02 17:00:00,000 INFO poolgate.access: req_pg_forged status=200"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "model=%s", (forged,), None)
    line = RedactingFormatter("%(levelname)s %(message)s").format(record)
    assert len(line.splitlines()) == 1 and "claude\\" in line


def test_short_secrets_show_at_most_a_quarter() -> None:
    from poolgate.store.repo import display_prefix

    assert display_prefix("pg-" + "a" * 43) == "pg-aaaaaaa"  # a generated key: its 10-character prefix
    assert display_prefix("admintoken-0123456789abcdef") == "admint"
    assert display_prefix("sixteen-chars-ok") == "sixt"


def test_an_upstream_error_reaches_the_caller_without_the_accounts_organization_id() -> None:
    """The API's rate-limit errors name the account's organization; the caller gets the rest of the text."""
    body = orjson.dumps(
        {
            "type": "error",
            "error": {
                "type": "rate_limit_error",
                "message": "This request would exceed the rate limit for your organization "
                "(6c2b5f3e-1a2b-4c3d-9e8f-0123456789ab) of 50,000 input tokens per minute.",
            },
        }
    )
    error = normalised_error(429, body, {"request-id": "req_upstream"}, "team-a")
    assert error.message == (
        "This request would exceed the rate limit for your organization (…) of 50,000 input tokens per minute."
    )
    assert error.error_type == "rate_limit_error" and (b"x-poolgate-upstream", b"team-a") in error.headers


def test_an_upstream_error_message_that_is_no_string_is_passed_on_as_its_json() -> None:
    """An Anthropic-compatible upstream's `message` as an object reached the client as Python's repr
    (`{'a': 1}`), in a JSON answer and in a stream's error event alike."""
    body = orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": {"a": [1, None]}}})
    assert normalised_error(400, body, {}, "team-a").message == '{"a":[1,null]}'
    scanner = StreamUsageScanner()
    scanner.feed(b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":["x",2]}}\n\n')
    assert scanner.error_message == '["x",2]'


def test_an_upstream_error_reaches_the_caller_without_the_credential_the_request_was_signed_with() -> None:
    """An Anthropic-compatible proxy as a base URL may quote what it was sent: an API key or a bearer token."""
    signer = Signer()
    signer.load({"key": "sk-ant-api03-account-key", "sub": "sk-ant-oat01-account-token"})
    for upstream in (Upstream("key", "anthropic_api_key", "http://u"), Upstream("sub", "anthropic_oauth", "http://u")):
        signed = signer.sign(ShapedRequest(upstream, "POST", "http://u/v1/messages", (), b"{}"))
        secret = signed.credential()
        assert signed.headers[-1] in (("x-api-key", secret), ("authorization", f"Bearer {secret}")) and len(secret) > 20
        body = orjson.dumps(
            {"type": "error", "error": {"type": "authentication_error", "message": f"bad key {secret}"}}
        )
        error = normalised_error(401, body, {}, upstream.id, secret)
        assert error.message == "bad key [redacted]"

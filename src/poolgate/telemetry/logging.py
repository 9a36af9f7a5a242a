"""Structured-enough logs that never carry a secret: credentials are redacted before formatting."""

from __future__ import annotations

import logging
import re

_SECRET = re.compile(
    r"(sk-ant-[A-Za-z0-9]+-)[A-Za-z0-9_\-]+"  # Anthropic API keys and OAuth tokens
    r"|(pg-[A-Za-z0-9_\-]{7})[A-Za-z0-9_\-]{8,}"  # gateway keys: keep the 10-character display prefix
    r"|((?:bearer|x-api-key[\"']?\s*[:=]\s*[\"']?)\s*)[A-Za-z0-9._~+/=\-]{8,}",
    re.IGNORECASE,
)


# What stands in for a credential in what another party said (the logs' mark for a secret).
CREDENTIAL_PLACEHOLDER = "[redacted]"
# Shorter than this, a credential is no secret worth hiding (test fixtures' `k`), and replacing it would
# garble the message.
HIDDEN_CREDENTIAL_MIN = 8


def without_credential(text: str, credential: str | None) -> str:
    """`text` with `credential` replaced: an Anthropic-compatible proxy used as a base URL may quote the key it
    was sent in its error messages, and a token endpoint the refresh token, which would hand it to the
    caller, or keep it in plain text in the store as an account's state."""
    if credential is None or len(credential) < HIDDEN_CREDENTIAL_MIN or credential not in text:
        return text
    return text.replace(credential, CREDENTIAL_PLACEHOLDER)


def redact(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        kept = next(group for group in match.groups() if group is not None)
        return f"{kept}{CREDENTIAL_PLACEHOLDER}"

    return _SECRET.sub(replace, text)


# Control characters in a message are escaped: a caller-chosen model name, session id or JWT subject with a
# newline would otherwise forge a log line (and an ANSI sequence would repaint the operator's terminal). C1
# controls too: some terminals take U+009B as the start of an escape sequence. And the Unicode line and
# paragraph separators, which end a line for readers that split lines the Unicode way (Python's
# `splitlines`, JavaScript, log viewers).
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if code != 0x09}
_CONTROL.update({code: f"\\u{code:04x}" for code in (0x2028, 0x2029)})


def visible(text: str) -> str:
    """`text` with its control characters (but tab) shown as `\\xNN`, and its Unicode line separators as
    `\\uNNNN`: what logs and the CLI print of what a caller chose."""
    return text.translate(_CONTROL)


# What makes a value of a `key=value` log line look like more than one: whitespace, `=`, quotes.
_UNPLAIN = re.compile(r'[\s="\\]')


def field(value: str | None) -> str:
    """A caller-chosen value for a `key=value` line, quoted (logfmt-style) when it would otherwise read as
    more fields than one: a model named `m upstream=up-1 status=200` must not plant fields in the line. None
    and the empty string (an unknown model, no upstream) are `-`, as in the usage tables."""
    if not value:
        return "-"
    if _UNPLAIN.search(value) is None:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedactingFormatter(logging.Formatter):
    """Redacts the finished line, tracebacks included. A formatter rather than a filter so that the
    record other handlers see (and its exc_info) is left as the caller made it."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = visible(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True

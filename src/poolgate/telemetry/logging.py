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


def redact(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        kept = next(group for group in match.groups() if group is not None)
        return f"{kept}[redacted]"

    return _SECRET.sub(replace, text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks go to the log only at debug level, and redacted like the rest.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True

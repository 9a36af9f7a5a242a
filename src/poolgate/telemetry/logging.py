"""Structured-enough logs that never carry a secret: credentials are redacted before formatting."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


# Lines of one kind (a format string) written per interval before the rest are counted instead: what a client
# spraying wrong keys, or an upstream failing every request, can make the log say.
LINES_PER_KIND = 10
LINE_BOUND_SECONDS = 60.0
# Kinds tracked at once: the formats are the code's, a few dozen (a message made before it is logged passes
# its figures as arguments, see `serve`'s `_warn`). Should one still make a kind per figure, past this many
# (in the last interval) a logger's lines of kinds not tracked are bounded as one kind, `UNTRACKED_KINDS`:
# neither memory nor the lines grow with the figures.
MAX_KINDS = 256
UNTRACKED_KINDS = "(a line of a kind past the most tracked at once)"
SUPPRESSED_SUMMARY = "… and %d more like %r suppressed in the last %.0f s"
# The same for a kind kept apart per subject (`BoundedLog`'s `per_subject`: an account's id).
SUPPRESSED_SUMMARY_FOR = "… and %d more like %r for %s suppressed in the last %.0f s"


@dataclass
class _Window:
    logger: logging.Logger
    level: int
    msg: str
    subject: str
    started: float
    written: int = 1
    suppressed: int = 0


class LineBound:
    """At most `lines` log lines of a kind (the logger and the format string, not its arguments; and a
    subject, when the caller keeps one apart: an account's id) every `interval` seconds; the lines past that
    are counted, and said in one summary line (`SUPPRESSED_SUMMARY`) when the interval has ended: by `flush`,
    or before the next line of the kind is written."""

    def __init__(
        self,
        lines: int = LINES_PER_KIND,
        interval: float = LINE_BOUND_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lines = lines
        self.interval = interval
        self.clock = clock
        self._windows: dict[tuple[str, str, str], _Window] = {}
        # Lines are logged from the event loop and from threads (the usage writer's, `to_thread`'s).
        self._lock = threading.Lock()

    def allows(self, logger: logging.Logger, level: int, msg: str, subject: str = "") -> bool:
        """Whether a line of `msg` (about `subject`) may be written now; counts it either way."""
        now = self.clock()
        kind = (logger.name, msg, subject)
        ended: list[_Window] = []
        with self._lock:
            if kind not in self._windows and len(self._windows) >= MAX_KINDS:
                ended = self._ended(now)
                if len(self._windows) >= MAX_KINDS:
                    kind = (logger.name, UNTRACKED_KINDS, "")
            allowed = self._count(kind, logger, level, now, ended)
        # Also when this line is suppressed: the windows taken out above are in no table any more.
        self._summarize(ended, now)
        return allowed

    def _count(
        self, kind: tuple[str, str, str], logger: logging.Logger, level: int, now: float, ended: list[_Window]
    ) -> bool:
        """Counts a line of `kind` in its window, a new one when its interval is over (the old one added to
        `ended`); whether it may be written. The lock is held."""
        window = self._windows.get(kind)
        if window is not None and now < window.started + self.interval:
            if window.written >= self.lines:
                window.suppressed += 1
                return False
            window.written += 1
            return True
        if window is not None:
            ended.append(window)
        self._windows[kind] = _Window(logger, level, kind[1], kind[2], now)
        return True

    def flush(self, everything: bool = False) -> None:
        """Say what the intervals that have ended (or, `everything`: all of them, at shutdown) suppressed."""
        now = self.clock()
        with self._lock:
            ended = self._ended(None if everything else now)
        self._summarize(ended, now)

    def _ended(self, now: float | None) -> list[_Window]:
        """Takes out the windows whose interval is over at `now` (None: all of them); the lock is held."""
        kinds = [kind for kind, window in self._windows.items() if now is None or now >= window.started + self.interval]
        return [self._windows.pop(kind) for kind in kinds]

    def reset(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Forget every kind, unsaid (a test's fresh start), and read time from `clock`."""
        with self._lock:
            self._windows.clear()
            self.clock = clock

    @staticmethod
    def _summarize(ended: list[_Window], now: float) -> None:
        # Called outside the lock: a handler may take its time (a full pipe), and other kinds must not wait.
        for window in ended:
            if not window.suppressed:
                continue
            took = now - window.started
            if window.subject:
                window.logger.log(
                    window.level, SUPPRESSED_SUMMARY_FOR, window.suppressed, window.msg, window.subject, took
                )
            else:
                window.logger.log(window.level, SUPPRESSED_SUMMARY, window.suppressed, window.msg, took)


# The process's bound: loggers are the process's too.
LINE_BOUND = LineBound()
# How often the lines suppressed by the log's bound (`LINE_BOUND`) are summed up once their interval is over.
SUPPRESSED_LINES_CHECK_SECONDS = 5.0


async def suppressed_lines_loop() -> None:
    """Tells what the log's bound suppressed soon after its interval ends, not only when a line of the
    kind comes again (perhaps never)."""
    while True:
        await asyncio.sleep(SUPPRESSED_LINES_CHECK_SECONDS)
        LINE_BOUND.flush()


class BoundedLog(logging.LoggerAdapter[logging.Logger]):
    """A logger whose lines are bounded by `LINE_BOUND`: for the lines a request can cause (a refused
    credential, an upstream's bad answer), which a client or an upstream could otherwise make thousands a
    second of. Costs nothing until a line is logged. `per_subject`: each line's first argument (an account's
    id, of which the configuration has a few) is part of its kind, so that one account failing every request
    does not hide what another's lines say; never a value a client chooses, whose every value would be a kind.
    """

    def __init__(self, logger: logging.Logger, bound: LineBound = LINE_BOUND, per_subject: bool = False) -> None:
        super().__init__(logger)
        self.bound = bound
        self.per_subject = per_subject

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        subject = str(args[0]) if self.per_subject and args else ""
        if self.logger.isEnabledFor(level) and self.bound.allows(self.logger, level, str(msg), subject):
            # The caller's line, not this method's, is the record's (`%(lineno)d`, `%(funcName)s`).
            kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
            self.logger.log(level, msg, *args, **kwargs)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True

"""Per-principal quotas: requests, input tokens and output tokens per minute, hour or day.

Windows are fixed and aligned to the UTC clock (a minute window runs from :00 to :59, a day window from
00:00 UTC), not sliding: a caller can burst up to twice a limit across a boundary, and in exchange every
counter is one integer and the reset time a client is told is exact. Requests are counted when admitted;
tokens are charged when the usage is known, so a window that is already over its token quota refuses new
requests until it resets (the request that crossed the line was allowed to finish).

Input tokens for quotas are `input_tokens + cache_creation_input_tokens`: cache reads do not count, as in
Anthropic's own input-tokens-per-minute limits.
"""

from __future__ import annotations

import time
from typing import Final

from poolgate.api.errors import ApiError, retry_headers, whole_seconds
from poolgate.api.http import header_pairs
from poolgate.lifecycle.claims import QuotaRule
from poolgate.lifecycle.context import Principal

Headers = list[tuple[bytes, bytes]]


def window_start(now: float, seconds: int) -> int:
    """The start of the fixed window holding `now` (epoch seconds, which are UTC-aligned)."""
    return int(now // seconds) * seconds


def rfc3339(epoch: float) -> str:
    # Not strftime: its %Y leaves years before 1000 unpadded (`1-01-01`) on glibc.
    moment = time.gmtime(epoch)
    return (
        f"{moment.tm_year:04d}-{moment.tm_mon:02d}-{moment.tm_mday:02d}"
        f"T{moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d}Z"
    )


def humanize(wait: float) -> str:
    seconds = max(0, whole_seconds(wait))
    if seconds < 60:
        return f"{seconds} s"
    minutes = -(-seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


class Window:
    """The running count of one rule's metric in its current window. The rule's parts are copied in, and its
    headers' names and values formatted, once: a window is read for every request of its principal."""

    __slots__ = (
        "end",
        "head",
        "limit",
        "metric",
        "remaining_name",
        "reset_line",
        "reset_name",
        "rule",
        "seconds",
        "start",
        "stepped_back_before",
        "used",
    )

    def __init__(self, rule: QuotaRule, start: int) -> None:
        self.metric = rule.metric
        self.seconds = rule.seconds
        self.used = 0
        # Head lines (`api.http.HEAD_LINES`), as text: `head` (the limit's line and the remaining count's name),
        # the count per request, then `reset_line`.
        self.remaining_name = f"x-poolgate-quota-remaining-{rule.name}: "
        self.reset_name = f"x-poolgate-quota-reset-{rule.name}"
        self.apply(rule)
        self._open(start)

    def apply(self, rule: QuotaRule) -> None:
        """Take `rule`'s limit (a rule of the same metric and window): the count goes on."""
        self.rule = rule
        self.limit = rule.limit
        self.head = f"x-poolgate-quota-limit-{rule.name}: {rule.limit}\r\n{self.remaining_name}"

    def _open(self, start: int) -> None:
        self.start = start
        self.end = start + self.seconds
        # A request's `now` is when it arrived, which may be before the start of a window another request has
        # rolled to (its body was still coming): that keeps counting here. One a whole window before the start
        # is the wall clock stepped back (an NTP correction), not a late request.
        self.stepped_back_before = start - self.seconds
        self.reset_line = f"{self.reset_name}: {rfc3339(self.end)}\r\n"

    def roll(self, now: float) -> None:
        """Move to the window holding `now`, once `now` is past this one's end or before
        `stepped_back_before` (callers test it). Forward, the count starts afresh. Back, the count goes along:
        what was used stays used, for one window at most. Kept here, a minute window used up just before the
        clock stepped back an hour refused its caller for that hour (`retry-after: 3625`)."""
        if now >= self.end:
            self.used = 0
        self._open(window_start(now, self.seconds))

    @property
    def reset(self) -> int:
        return self.end


class PrincipalQuotas:
    """One principal's windows, in the order of its rules."""

    __slots__ = ("has_tokens", "requests", "rules", "windows")

    def __init__(self, rules: tuple[QuotaRule, ...], windows: list[Window]) -> None:
        self.rules = rules
        self.windows = windows
        self.requests = [w for w in windows if w.metric == "requests"]
        self.has_tokens = len(self.requests) != len(windows)


# How often principals whose windows have all ended are forgotten, and how long after: a request admitted
# before a window ended charges its tokens when it finishes (to the window it then finds), and a long stream
# runs for minutes.
SWEEP_SECONDS: Final = 600.0
FORGET_AFTER_SECONDS: Final = 3600.0
# Principals a request looks at while a sweep runs: swept at once, 200,000 of them held the event loop ~230 ms.
SWEEP_CHUNK = 1000


class Quotas:
    """Quota windows of every principal seen, in memory (O(rules) per request). A principal idle for longer
    than its longest window is forgotten: its counts would start at zero anyway (JWT subjects are as many as
    the identity provider issues)."""

    def __init__(self) -> None:
        self._states: dict[str, PrincipalQuotas] = {}
        self._next_sweep = 0.0
        self._unswept: list[str] = []  # the principals the running sweep has still to look at

    def _state(self, principal: Principal, now: float) -> PrincipalQuotas:
        rules = principal.claims.quotas
        state = self._states.get(principal.id)
        if state is None or (state.rules is not rules and state.rules != rules):
            # Changed rules keep the windows of those that stayed (same metric and window), the same objects
            # with the new limit: requests admitted before the change charge their tokens to the windows they
            # hold, which must be the ones counted from now on.
            old = {(w.rule.metric, w.rule.window): w for w in state.windows} if state else {}
            windows = []
            for rule in rules:
                window = old.get((rule.metric, rule.window))
                if window is None:
                    window = Window(rule, window_start(now, rule.seconds))
                else:
                    window.apply(rule)
                windows.append(window)
            state = self._states[principal.id] = PrincipalQuotas(rules, windows)
        return state

    def check(self, principal: Principal, now: float, rules: tuple[QuotaRule, ...] | None = None) -> PrincipalQuotas:
        """The principal's windows, rolled to `now`; raises a 429 if any is used up. Counts nothing. `rules`: its
        claims' quotas, where the caller has read them already (another generic lookup here)."""
        if now >= self._next_sweep:
            self._sweep(now)
        state = self._states.get(principal.id)
        if state is None or state.rules is not (principal.claims.quotas if rules is None else rules):
            state = self._state(principal, now)
        exceeded = []
        for window in state.windows:
            if now >= window.end or now < window.stepped_back_before:
                window.roll(now)
            # No room for one more request (requests), or the tokens already used up (token metrics): for
            # integers `used + 1 > limit` and `used >= limit` are the same test.
            if window.used >= window.limit:
                exceeded.append(window)
        if exceeded:
            raise self._refusal(principal, state, exceeded, now)
        return state

    @classmethod
    def count(cls, state: PrincipalQuotas) -> bytes:
        """Count an admitted request in its request windows; the quota headers for its response, as head lines
        (see `lines`)."""
        for window in state.requests:
            window.used += 1
        return cls.lines(state)

    @staticmethod
    def charge_tokens(state: PrincipalQuotas, input_tokens: int, output_tokens: int, now: float) -> None:
        for window in state.windows:
            metric = window.metric
            if metric == "requests":
                continue
            if now >= window.end or now < window.stepped_back_before:
                window.roll(now)
            window.used += input_tokens if metric == "input_tokens" else output_tokens

    @staticmethod
    def lines(state: PrincipalQuotas) -> bytes:
        """`x-poolgate-quota-{limit,remaining,reset}-<rule>` for every rule, e.g. `…-requests-per-minute`, as head
        lines (`api.http.HEAD_LINES`), written into an answer's head as they are (as pairs, each went through the
        head writer's loop: ~1.6 µs for a caller's nine quota and budget headers, see `bench/answer_head.py`)."""
        lines: list[str] = []
        for window in state.windows:
            left = window.limit - window.used  # a comparison, not `max()`: see `accounting.billable`
            # Text, encoded once: compiled (mypyc), an f-string is C, where a bytes `%` was the interpreter's
            # generic formatting and each `+` of bytes an allocation (~2,000 instructions a request for two windows).
            lines.append(f"{window.head}{left if left > 0 else 0}\r\n{window.reset_line}")
        return "".join(lines).encode()

    @classmethod
    def headers(cls, state: PrincipalQuotas) -> Headers:
        """`lines` as header pairs."""
        return header_pairs(cls.lines(state))

    def _refusal(self, principal: Principal, state: PrincipalQuotas, exceeded: list[Window], now: float) -> ApiError:
        # Every exceeded window must reset before a retry can succeed: wait for the last of them.
        reset = max(window.reset for window in exceeded)
        used = "; ".join(f"{w.rule.name} limit {w.rule.limit} ({w.used} used)" for w in exceeded)
        message = (
            f"Quota exceeded for {principal.name!r}: {used}. Retry after {rfc3339(reset)} (in {humanize(reset - now)})."
        )
        return ApiError(429, message, "rate_limit_error", [*retry_headers(reset - now), *self.headers(state)])

    def _sweep(self, now: float) -> None:
        """Forget principals whose windows all ended long ago, `SWEEP_CHUNK` of them per request: the sweep
        goes on (`_next_sweep` stays due) until every principal seen when it began has been looked at."""
        if not self._unswept:
            self._unswept = list(self._states)
        ended = now - FORGET_AFTER_SECONDS
        states, unswept = self._states, self._unswept
        for principal_id in unswept[-SWEEP_CHUNK:]:
            state = states.get(principal_id)
            if state is not None and not any(window.end > ended for window in state.windows):
                del states[principal_id]
        del unswept[-SWEEP_CHUNK:]
        if not unswept:
            self._next_sweep = now + SWEEP_SECONDS

    def __len__(self) -> int:
        return len(self._states)

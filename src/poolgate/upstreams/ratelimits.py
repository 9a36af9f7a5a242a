"""Parsing `anthropic-ratelimit-*` response headers into what the router can act on.

Every kind (requests, tokens, input-tokens, output-tokens) carries `-limit`, `-remaining` and `-reset`
(RFC 3339). Malformed values are ignored, never raised: a header the gateway cannot read must not fail a
request that the upstream served.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import msgspec

from poolgate.upstreams.quota import iso_epoch

KINDS = ("requests", "tokens", "input-tokens", "output-tokens")
PREFIX = "anthropic-ratelimit-"
# Per kind: its -limit, -remaining and -reset header names (every response carries all twelve).
_HEADER_NAMES = tuple(
    (kind, f"{PREFIX}{kind}-limit", f"{PREFIX}{kind}-remaining", f"{PREFIX}{kind}-reset") for kind in KINDS
)


class RateLimitObservation(msgspec.Struct, frozen=True, gc=False):
    """One kind's window as an upstream last reported it; times are on the monotonic clock.

    A Struct rather than a dataclass: four are made for every response, and a frozen dataclass's
    constructor costs five times as much."""

    kind: str
    limit: int | None
    remaining: int | None
    reset_at: float | None
    observed_at: float

    def exhausted(self, now: float) -> bool:
        """Nothing left and the window has not reset yet."""
        return self.remaining == 0 and self.reset_at is not None and now < self.reset_at


def _non_negative_int(value: str | None) -> int | None:
    """A count as an answer sends it (ASCII digits; `parse_ratelimit_headers` reads those itself), else
    stripped of spaces; None for anything else."""
    if value is None:
        return None
    value = value.strip()
    # isdigit() also accepts superscripts and other scripts' digits, which int() refuses.
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value)


# A wait an upstream announces (a reset, a `retry-after`) further ahead than this is not believed: no rate-limit
# window runs that long, and one year 2099's `-reset` with nothing `-remaining` took its account out of routing
# until then (nothing asked it again to hear better), every client told `retry-after: 2274402699`.
LONGEST_WAIT_SECONDS = 7 * 86400.0


@lru_cache(maxsize=256)
def parse_reset(value: str | None) -> float | None:
    """RFC 3339 timestamp → epoch seconds; None for anything else. Cached: a window's reset time repeats
    in every response until it passes, and a response carries one per window kind."""
    return iso_epoch(value)


def parse_ratelimit_headers(headers: Mapping[str, str], now: float, wall_now: float) -> dict[str, RateLimitObservation]:
    """The observations present in a response's headers (names matched case-insensitively by the mapping).

    `now` is the monotonic clock and `wall_now` the epoch at the same instant: resets arrive as wall-clock
    timestamps and are kept on the monotonic clock, which the router and health checks use. A reset more than
    `LONGEST_WAIT_SECONDS` ahead is no reset known.
    """
    observations: dict[str, RateLimitObservation] = {}
    for kind, limit_name, remaining_name, reset_name in _HEADER_NAMES:
        # ASCII digits, what every answer sends, read here: `_non_negative_int` for the rest (two calls an answer's
        # window kind, four kinds an answer, spared).
        text = headers.get(limit_name)
        limit = int(text) if text is not None and text.isdigit() and text.isascii() else _non_negative_int(text)
        text = headers.get(remaining_name)
        remaining = int(text) if text is not None and text.isdigit() and text.isascii() else _non_negative_int(text)
        reset_epoch = parse_reset(headers.get(reset_name))
        reset_in = None if reset_epoch is None else reset_epoch - wall_now
        reset_at = None if reset_in is None or reset_in >= LONGEST_WAIT_SECONDS else now + reset_in
        if limit is None and remaining is None and reset_at is None:
            continue
        observations[kind] = RateLimitObservation(kind, limit, remaining, reset_at, now)
    return observations


def exhausted_until(observations: Mapping[str, RateLimitObservation], now: float) -> float | None:
    """When the latest observations say the upstream has nothing left: when it resets; else None."""
    resets = [obs.reset_at for obs in observations.values() if obs.exhausted(now) and obs.reset_at is not None]
    return max(resets) if resets else None


# Below this share of a window left, an upstream counts as running short and scores worse.
LOW_HEADROOM = 0.25


def refused_until(observations: Mapping[str, RateLimitObservation], now: float) -> float | None:
    """Until when a 429 that came without `retry-after` parks its account, from the resets its headers
    announce: a used-up window's; else, since a window short of this request's size refused it, the latest
    reset of the windows running short; else the soonest reset announced. None: no reset announced."""
    exhausted = exhausted_until(observations, now)
    if exhausted is not None:
        return exhausted
    short: list[float] = []
    ahead: list[float] = []
    for obs in observations.values():
        if obs.reset_at is None or obs.reset_at <= now:
            continue
        ahead.append(obs.reset_at)
        if obs.limit and obs.remaining is not None and obs.remaining < LOW_HEADROOM * obs.limit:
            short.append(obs.reset_at)
    if short:
        return max(short)
    return min(ahead, default=None)


# How a window counts requests in flight: one each (requests), their prompt tokens (tokens, input-tokens), or
# not at all (output-tokens: known only once answered).
_IN_FLIGHT_REQUESTS, _IN_FLIGHT_TOKENS, _IN_FLIGHT_NONE = 0, 1, 2
# A window's report laid out for `HeadroomFloor.headroom`: (how it counts requests in flight, remaining,
# limit (0: none reported), observed at, reset at (inf: it does not refill), limit − remaining,
# reset at − observed at).
_Window = tuple[int, float, float, float, float, float, float]


# By kind; any other counts tokens (a lookup, not a call: four times an answer).
_IN_FLIGHT_COUNTING = {"requests": _IN_FLIGHT_REQUESTS, "output-tokens": _IN_FLIGHT_NONE}


class HeadroomFloor(msgspec.Struct, gc=False):
    """What the latest observations guarantee until the next ones: a window only refills between reports,
    so what is left never drops below the reported `remaining` (capped at the limit), less what is in flight.
    Lets the router see, without `headroom`'s arithmetic, that an account is far from every limit.

    Made per answer from the account's observations, which stay as they are until the next answer makes
    the next floor: `headroom` lays their windows out once, on first need (an account far from its limits
    never needs them), for every request routed until then."""

    # Over request windows: the least of remaining − LOW_HEADROOM × limit (inf: none reported).
    requests_slack: float
    # The same over token windows that requests in flight count against (tokens, input-tokens).
    tokens_slack: float
    # The least `remaining` of those token windows (inf: none reported).
    tokens_left: float
    # Windows in-flight requests do not count against (output-tokens) are all above LOW_HEADROOM.
    others_clear: bool
    windows: tuple[_Window, ...] | None = None

    def clear(self, in_flight: int, tokens_per_request: float, prompt_tokens: int) -> bool:
        """True when `headroom` is sure to report at least LOW_HEADROOM left in every window and, in every
        token window, room for `prompt_tokens` more."""
        in_flight_tokens = in_flight * tokens_per_request
        return (
            self.others_clear
            and in_flight <= self.requests_slack
            and in_flight_tokens <= self.tokens_slack
            and self.tokens_left - in_flight_tokens >= prompt_tokens
        )

    def headroom(
        self,
        observations: Mapping[str, RateLimitObservation],
        now: float,
        in_flight: int,
        tokens_per_request: float,
    ) -> tuple[float, float | None]:
        """The tightest window's share left (1.0 when nothing was reported) and the tokens left in the
        tightest token window (None when no token window was reported). `observations` are the ones this
        floor was made from.

        Each window's report is refilled linearly towards its limit until the announced reset (the API
        refills its buckets continuously), less what is in flight since."""
        windows = self.windows
        if windows is None:
            windows = self.windows = _windows(observations)
        share = 1.0
        tokens_left: float | None = None
        in_flight_tokens = in_flight * tokens_per_request
        for counts, remaining, limit, observed_at, reset_at, gap, span in windows:
            if now >= reset_at:
                left = limit  # a window with a reset has a limit (reset_at is inf otherwise)
            elif span > 0.0 and now > observed_at:
                left = remaining + gap * (now - observed_at) / span
            else:
                left = remaining
            if counts == _IN_FLIGHT_REQUESTS:
                # Whole requests: a refill estimated at a fraction of one is none yet (it let one request
                # more go to an account whose window the requests in flight had used up).
                left = math.floor(left) - in_flight
            elif counts == _IN_FLIGHT_TOKENS:
                left -= in_flight_tokens
                if tokens_left is None or left < tokens_left:
                    tokens_left = left
            if limit:
                fraction = left / limit
                if fraction < share:
                    share = fraction if fraction > 0.0 else 0.0
        return share, tokens_left


def _windows(observations: Mapping[str, RateLimitObservation]) -> tuple[_Window, ...]:
    windows: list[_Window] = []
    for kind, obs in observations.items():
        remaining, limit, reset_at = obs.remaining, obs.limit, obs.reset_at
        if remaining is None:
            continue
        counts = _IN_FLIGHT_COUNTING.get(kind, _IN_FLIGHT_TOKENS)
        if limit is None or reset_at is None:
            # No limit to refill towards or no reset announced: `remaining` is all there is.
            windows.append((counts, float(remaining), float(limit or 0), 0.0, math.inf, 0.0, 0.0))
        else:
            observed_at = obs.observed_at
            gap, span = limit - float(remaining), reset_at - observed_at
            windows.append((counts, float(remaining), float(limit), observed_at, reset_at, gap, span))
    return tuple(windows)


def headroom_floor(observations: Mapping[str, RateLimitObservation]) -> HeadroomFloor:
    # Runs for every answer: the lesser of two by a comparison, not `min()`, whose call costs ~1,400 instructions
    # more (CPython 3.11), nine times an answer.
    requests_slack = tokens_slack = tokens_left = math.inf
    others_clear = True
    for kind, obs in observations.items():
        remaining, limit = obs.remaining, obs.limit
        if remaining is None:
            continue
        # Past the reset `headroom` counts the limit, and it refills towards the limit: a `remaining` above
        # the limit (never sent, but not ours to trust) is not a floor.
        least = limit if limit is not None and limit < remaining else remaining
        slack = least - LOW_HEADROOM * limit if limit else math.inf
        counts = _IN_FLIGHT_COUNTING.get(kind, _IN_FLIGHT_TOKENS)
        if counts == _IN_FLIGHT_REQUESTS:
            requests_slack = slack if slack < requests_slack else requests_slack
        elif counts == _IN_FLIGHT_NONE:
            others_clear = others_clear and slack >= 0
        else:
            tokens_slack = slack if slack < tokens_slack else tokens_slack
            tokens_left = least if least < tokens_left else tokens_left
    return HeadroomFloor(requests_slack, tokens_slack, tokens_left, others_clear)


def headroom(
    observations: Mapping[str, RateLimitObservation], now: float, in_flight: int, tokens_per_request: float
) -> tuple[float, float | None]:
    """`HeadroomFloor.headroom` of these observations (the router reads the floor kept per account)."""
    return headroom_floor(observations).headroom(observations, now, in_flight, tokens_per_request)

"""Rate-limit headers: every documented header is read, anything malformed is ignored safely."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from poolgate.upstreams.ratelimits import (
    KINDS,
    RateLimitObservation,
    exhausted_until,
    parse_ratelimit_headers,
    parse_reset,
    refused_until,
)

WALL = 1_800_000_000.0
MONO = 500.0


def headers_for(kind: str, limit: str, remaining: str, reset: str) -> CIMultiDict[str]:
    prefix = f"anthropic-ratelimit-{kind}-"
    return CIMultiDict({prefix + "limit": limit, prefix + "remaining": remaining, prefix + "reset": reset})


def test_every_documented_kind_is_parsed_and_resets_move_to_the_monotonic_clock() -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    for kind in KINDS:
        headers.extend(headers_for(kind, "1000", "0" if kind == "tokens" else "7", "2027-01-15T08:00:30Z"))
    observed = parse_ratelimit_headers(headers, MONO, WALL)
    assert set(observed) == set(KINDS)
    reset_epoch = parse_reset("2027-01-15T08:00:30Z")
    assert reset_epoch is not None
    assert observed["requests"].reset_at == MONO + reset_epoch - WALL
    assert observed["requests"].remaining == 7 and observed["requests"].limit == 1000
    assert exhausted_until(observed, MONO) == observed["tokens"].reset_at


def test_header_names_are_case_insensitive() -> None:
    headers = CIMultiDict(
        {
            "Anthropic-RateLimit-Requests-Remaining": "0",
            "ANTHROPIC-RATELIMIT-REQUESTS-RESET": "2030-01-01T00:00:00+00:00",
        }
    )
    observed = parse_ratelimit_headers(headers, MONO, WALL)
    assert observed["requests"].remaining == 0 and observed["requests"].exhausted(MONO)


def test_a_window_that_has_reset_is_no_longer_exhausted() -> None:
    observed = parse_ratelimit_headers(headers_for("requests", "5", "0", "2027-01-15T08:00:30Z"), MONO, WALL)
    reset = observed["requests"].reset_at
    assert reset is not None
    assert exhausted_until(observed, reset - 0.001) == reset
    assert exhausted_until(observed, reset) is None


@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=40))
def test_malformed_values_are_ignored_never_raised(limit: str, remaining: str, reset: str) -> None:
    observed = parse_ratelimit_headers(headers_for("tokens", limit, remaining, reset), MONO, WALL)
    for observation in observed.values():
        assert observation.limit is None or observation.limit >= 0
        assert observation.remaining is None or observation.remaining >= 0
    exhausted_until(observed, MONO)


def test_a_reset_without_timezone_or_in_another_format_is_ignored() -> None:
    assert parse_reset("2027-01-15T08:00:30") is None
    assert parse_reset("in 30 seconds") is None
    assert parse_reset("") is None


def test_a_429_without_retry_after_waits_for_the_window_that_refused_it() -> None:
    """A used-up window's reset; else the latest reset of the windows running short (one of them refused a
    request bigger than what it had left); else the soonest reset announced; None when none is."""
    now = 100.0

    def window(kind: str, remaining: int, reset_in: float | None, limit: int = 1000) -> RateLimitObservation:
        return RateLimitObservation(kind, limit, remaining, None if reset_in is None else now + reset_in, now)

    assert refused_until({"requests": window("requests", 0, 30), "tokens": window("tokens", 10, 50)}, now) == now + 30
    short = {
        "tokens": window("tokens", 100, 45),
        "input-tokens": window("input-tokens", 200, 20),
        "requests": window("requests", 900, 5),
    }
    assert refused_until(short, now) == now + 45
    assert refused_until({"requests": window("requests", 900, 5), "tokens": window("tokens", 800, 50)}, now) == now + 5
    assert refused_until({"requests": window("requests", 900, None)}, now) is None
    assert refused_until({}, now) is None

"""Rate-limit headers: every documented header is read, anything malformed is ignored safely."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.relay import retry_after_seconds
from poolgate.upstreams.pool import UpstreamState
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
            "ANTHROPIC-RATELIMIT-REQUESTS-RESET": "2027-01-15T09:00:30+01:00",
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


COUNTS = st.text(max_size=12) | st.from_regex(r"\A\s*[0-9]{1,12}\s*\Z") | st.sampled_from(["７", "5²", "¹", " 42 "])


@given(COUNTS, COUNTS)
def test_a_count_is_read_as_ascii_digits_spaces_around_them_allowed(limit: str, remaining: str) -> None:
    """What `int()` alone would take (other scripts' digits, signs, underscores) is no count."""

    def count(text: str) -> int | None:
        text = text.strip()
        return int(text) if text and all("0" <= c <= "9" for c in text) else None

    observed = parse_ratelimit_headers(headers_for("tokens", limit, remaining, ""), MONO, WALL).get("tokens")
    read = (observed.limit, observed.remaining) if observed is not None else (None, None)
    assert read == (count(limit), count(remaining))


def test_a_reset_with_a_lowercase_t_or_z_is_read_as_rfc_3339_allows() -> None:
    assert parse_reset("2027-01-15t08:00:30z") == parse_reset("2027-01-15T08:00:30Z") is not None


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


def requests_left(remaining: int, answered_at: float) -> dict[str, RateLimitObservation]:
    """An answer's report of a 10-request window."""
    return {"requests": RateLimitObservation("requests", 10, remaining, MONO + 60, answered_at)}


def test_a_report_from_a_request_sent_before_the_current_ones_is_older_whenever_its_answer_comes() -> None:
    """Three requests in flight on one account, answered out of order: the API counts a request as it arrives,
    so the report of an earlier-sent request counts fewer of them however late it comes. It put back room the
    account no longer had, and forgot the requests sent since; the next request went to a full account."""
    state = UpstreamState(Upstream(id="u", kind="anthropic_api_key", base_url="http://127.0.0.1:1"))
    first, second, third = MONO + 1, MONO + 2, MONO + 3
    for sent_at in (first, second, third):
        state.request_sent(sent_at, 0)
    state.observe(requests_left(5, MONO + 4), second)
    state.request_done(second, 0)
    assert state.ratelimits["requests"].remaining == 5 and state.unseen == 1, "the third is not in the report"
    state.observe(requests_left(6, MONO + 5), first)
    state.request_done(first, 0)
    assert state.ratelimits["requests"].remaining == 5 and state.unseen == 1, "the older report changed nothing"
    state.request_done(third, 0)  # failed: no report
    assert state.unseen == 0 and state.in_flight == 0
    state.request_sent(MONO + 7, 0)
    state.observe(requests_left(4, MONO + 8), MONO + 7)
    assert state.ratelimits["requests"].remaining == 4 and state.unseen == 0


def test_retry_after_is_read_in_seconds_or_as_an_http_date_in_any_of_its_forms() -> None:
    """RFC 9110 allows either; a date already past (the clocks differ) says retry now; unreadable, none."""
    now = 784_111_717.0  # Sun, 06 Nov 1994 08:48:37 GMT
    assert retry_after_seconds("30", now) == 30
    for dated in ("Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"):
        assert retry_after_seconds(dated, now) == 60
    assert retry_after_seconds("Sun, 06 Nov 1994 08:40:00 GMT", now) == 0
    for unreadable in ("soon", "Sun, 32 Nov 1994 08:49:37 GMT", "Mon, 01 Jan 99999999999 00:00:00 GMT"):
        assert retry_after_seconds(unreadable, now) is None


HTTP_DATES = st.from_regex(r"[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{1,12} \d\d:\d\d:\d\d GMT", fullmatch=True)


@given(st.text(max_size=60) | HTTP_DATES)
def test_any_retry_after_is_a_wait_of_under_a_week_or_none(value: str) -> None:
    """A year beyond what dates hold (`99999999999`) raised out of the relay: a 500 instead of a failover."""
    wait = retry_after_seconds(value, 784_111_717.0)
    assert wait is None or 0 <= wait < 86_400 * 7


def test_an_account_held_out_for_want_of_room_reports_none() -> None:
    """A subscription account out of its 5-hour window for hours showed all its room (its answers carry no
    rate-limit windows): the admin API and the headroom metric told of capacity no request could use."""
    state = UpstreamState(Upstream(id="u", kind="anthropic_oauth", base_url="http://127.0.0.1:1"))
    assert state.reported_headroom(MONO, None)[0] == 1.0
    for reason in ("rate_limited", "insufficient_quota"):
        assert state.reported_headroom(MONO, reason)[0] == 0.0
    assert state.reported_headroom(MONO, "unhealthy")[0] == 1.0  # room it has, once healthy again

"""policy as a pure stage: time is passed in, nothing sleeps. Model globs, quota windows, budgets."""

from __future__ import annotations

import asyncio
import calendar
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolgate.api.errors import ApiError
from poolgate.api.http import header_pairs
from poolgate.api.tools import NOTHING_OFFERED, Offered
from poolgate.billing import BillableUsage, Catalogue
from poolgate.lifecycle import budgets as budgets_module
from poolgate.lifecycle import quotas
from poolgate.lifecycle.budgets import SESSION_RETENTION_DAYS, SpendRow, range_bounds
from poolgate.lifecycle.claims import CallerClaims, QuotaRule, parse_claims
from poolgate.lifecycle.context import Endpoint, Principal, RequestContext, Usage
from poolgate.lifecycle.policy import ADMITTED, Admission, Policy, allowed_models, estimate_tokens, offered

# Monday 2025-03-10 12:00:00 UTC.
T0 = float(calendar.timegm((2025, 3, 10, 12, 0, 0)))
DAY = 86400
USD = 1_000_000


def who(claims: dict[str, Any] | CallerClaims | None = None, pid: str = "key_a", name: str = "alice") -> Principal:
    parsed = claims if isinstance(claims, CallerClaims) else parse_claims(claims or {})
    return Principal(pid, "api_key", name, parsed)


def request(model: str = "claude-sonnet-4-5", session: str | None = "sess-1", endpoint: Endpoint = "messages"):
    return RequestContext("req_1", endpoint, "/v1/messages", b"", [], b"{}", model, session_id=session)


def refusal(fn: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as error:
        fn(*args)
    return error.value


def headers_of(error: ApiError | Admission) -> dict[str, str]:
    pairs = header_pairs(error.head_lines) if isinstance(error, Admission) else error.headers
    return {k.decode(): v.decode() for k, v in pairs}


# ----- no claims -----------------------------------------------------------------------------------


def test_a_principal_without_claims_is_admitted_with_the_shared_no_op() -> None:
    policy = Policy()
    admission = policy.admit(who(), request(), 10 * USD, T0)
    assert admission is ADMITTED and admission.head_lines == b""
    policy.settle(admission, 5 * USD, Usage(10, 10), T0)
    assert not ADMITTED.settled  # the shared admission is never mutated


# ----- models --------------------------------------------------------------------------------------


def test_model_globs_refuse_other_models_with_403_naming_the_model() -> None:
    policy = Policy()
    alice = who({"models": ["claude-sonnet-*", "claude-haiku-4-5"]})
    assert policy.admit(alice, request("claude-sonnet-4-5"), None, T0) is ADMITTED
    assert policy.admit(alice, request("claude-haiku-4-5"), None, T0) is ADMITTED
    error = refusal(policy.admit, alice, request("claude-opus-4-1"), None, T0)
    assert (error.status, error.error_type) == (403, "permission_error")
    assert "'claude-opus-4-1'" in error.message and "claude-sonnet-*" in error.message
    # count_tokens is checked against the allow-list too.
    assert refusal(policy.admit, alice, request("claude-opus-4-1", endpoint="count_tokens"), None, T0).status == 403


def test_allowed_models_filters_a_model_list() -> None:
    models = [{"id": "claude-sonnet-4-5"}, {"id": "claude-opus-4-1"}, {"id": "claude-haiku-4-5"}]
    assert allowed_models(who({"models": ["*-sonnet-*", "claude-haiku-*"]}), models) == [models[0], models[2]]
    assert allowed_models(who(), models) == models
    assert allowed_models(who({"models": ["claude-opus-*"]}), ["claude-opus-4-1", "claude-sonnet-4-5"]) == [
        "claude-opus-4-1"
    ]


def test_token_estimate_bounds_the_output_by_max_tokens() -> None:
    ctx = request()
    ctx.body, ctx.max_tokens = b"x" * 3000, 32_000
    assert estimate_tokens(ctx) == (1001, 32_000)
    assert estimate_tokens(request(endpoint="count_tokens"))[1] == 0
    # billing.budget_output_tokens: at most that much output is reserved.
    assert estimate_tokens(ctx, 4_000) == (1001, 4_000)
    ctx.max_tokens = 1_000
    assert estimate_tokens(ctx, 4_000) == (1001, 1_000)


# ----- quotas --------------------------------------------------------------------------------------


def test_request_quota_refuses_with_429_retry_after_and_headers_then_rolls_over() -> None:
    policy = Policy()
    alice = who({"quotas": ["requests=3/min"]})
    start = T0 + 10  # 12:00:10
    for i in range(3):
        admission = policy.admit(alice, request(), None, start + i)
        assert headers_of(admission)["x-poolgate-quota-remaining-requests-per-minute"] == str(2 - i)
    error = refusal(policy.admit, alice, request(), None, start + 5)
    assert (error.status, error.error_type) == (429, "rate_limit_error")
    headers = headers_of(error)
    assert headers["retry-after"] == "45"  # the window ends at 12:01:00
    assert headers["x-poolgate-quota-limit-requests-per-minute"] == "3"
    assert headers["x-poolgate-quota-remaining-requests-per-minute"] == "0"
    assert headers["x-poolgate-quota-reset-requests-per-minute"] == "2025-03-10T12:01:00Z"
    assert "requests-per-minute limit 3" in error.message and "12:01:00Z" in error.message
    # A refused request is not counted: the next minute starts from zero.
    admission = policy.admit(alice, request(), None, T0 + 60)
    assert headers_of(admission)["x-poolgate-quota-remaining-requests-per-minute"] == "2"


def test_token_quotas_are_charged_at_settle_and_a_window_over_them_refuses() -> None:
    policy = Policy()
    alice = who({"quotas": ["output_tokens=100/hour", "input_tokens=1000/day"]})
    first = policy.admit(alice, request(), None, T0)
    second = policy.admit(alice, request(), None, T0 + 1)  # both in flight: tokens are unknown until settle
    policy.settle(first, None, Usage(input_tokens=10, output_tokens=60), T0 + 2)
    policy.settle(second, None, Usage(input_tokens=10, output_tokens=60), T0 + 3)
    error = refusal(policy.admit, alice, request(), None, T0 + 4)
    assert error.status == 429 and "output-tokens-per-hour limit 100 (120 used)" in error.message
    assert headers_of(error)["retry-after"] == str(3600 - 4)
    assert policy.admit(alice, request(), None, T0 + 3600).head_lines  # the next hour is open again


def test_input_token_quota_counts_cache_writes_but_not_cache_reads() -> None:
    policy = Policy()
    alice = who({"quotas": ["input_tokens=1000/min"]})
    admission = policy.admit(alice, request(), None, T0)
    usage = Usage(input_tokens=100, output_tokens=5, cache_creation_input_tokens=800, cache_read_input_tokens=50_000)
    policy.settle(admission, None, usage, T0)
    assert (
        headers_of(policy.admit(alice, request(), None, T0))["x-poolgate-quota-remaining-input-tokens-per-minute"]
        == "100"
    )


def test_settle_counts_once_and_count_tokens_is_not_counted() -> None:
    policy = Policy()
    alice = who({"quotas": ["output_tokens=100/min", "requests=2/min"]})
    assert policy.admit(alice, request(endpoint="count_tokens"), None, T0) is ADMITTED
    admission = policy.admit(alice, request(), None, T0)
    for _ in range(3):
        policy.settle(admission, None, Usage(output_tokens=40), T0)
    headers = headers_of(policy.admit(alice, request(), None, T0))
    assert headers["x-poolgate-quota-remaining-output-tokens-per-minute"] == "60"
    assert headers["x-poolgate-quota-remaining-requests-per-minute"] == "0"


def test_changed_limits_keep_the_counts_of_rules_that_stayed() -> None:
    policy = Policy()
    policy.admit(who({"quotas": ["requests=5/min"]}), request(), None, T0)
    policy.admit(who({"quotas": ["requests=5/min"]}), request(), None, T0)
    raised = who({"quotas": ["requests=10/min", "requests=100/day"]})
    headers = headers_of(policy.admit(raised, request(), None, T0))
    assert headers["x-poolgate-quota-remaining-requests-per-minute"] == "7"
    assert headers["x-poolgate-quota-remaining-requests-per-day"] == "99"


def test_a_request_that_arrived_before_the_window_rolled_counts_in_the_window_now_running() -> None:
    """A request's `now` is when it arrived: one whose body was still coming while another rolled the window
    counts in the newer window (and is refused by it), rather than taking the count back to its own minute
    (where the next request would find it started afresh). Only a clock stepped back a whole window moves it."""
    policy = Policy()
    alice = who({"quotas": ["requests=2/min"]})
    minute = T0 - T0 % 60 + 60
    policy.admit(alice, request(), None, minute + 1)
    policy.admit(alice, request(), None, minute - 2)  # arrived in the minute before
    assert "retry-after" in headers_of(refusal(policy.admit, alice, request(), None, minute + 2))
    refused = refusal(policy.admit, alice, request(), None, minute - 61)  # the clock stepped back
    assert headers_of(refused)["retry-after"] == "1"  # what was used stays used, to that window's end


@settings(max_examples=60, deadline=None)
@given(
    limit=st.integers(min_value=0, max_value=5),
    window=st.sampled_from(["minute", "hour"]),
    steps=st.lists(st.floats(min_value=0, max_value=90, allow_nan=False), min_size=1, max_size=60),
)
def test_request_windows_never_admit_more_than_the_limit_and_reset_at_the_boundary(
    limit: int, window: str, steps: list[float]
) -> None:
    policy = Policy()
    alice = who(CallerClaims(quotas=(QuotaRule("requests", limit, window),)))  # type: ignore[arg-type]
    seconds = 60 if window == "minute" else 3600
    now = T0
    admitted: dict[int, int] = {}
    for step in steps:
        now += step
        bucket = int(now // seconds)
        try:
            policy.admit(alice, request(), None, now)
        except ApiError as error:
            assert admitted.get(bucket, 0) == limit  # refused only when this window is full
            retry_after = int(headers_of(error)["retry-after"])
            assert int((now + retry_after) // seconds) == bucket + 1  # …and told to come back when it resets
        else:
            admitted[bucket] = admitted.get(bucket, 0) + 1
            assert admitted[bucket] <= limit


# ----- budgets -------------------------------------------------------------------------------------


def test_range_bounds_follow_the_utc_calendar() -> None:
    def utc(*parts: int) -> int:
        return calendar.timegm((*parts, 0, 0, 0)[:6])

    assert range_bounds("daily", T0) == (utc(2025, 3, 10), utc(2025, 3, 11))
    assert range_bounds("weekly", T0 + 6 * DAY) == (utc(2025, 3, 10), utc(2025, 3, 17))  # Sunday → that Monday
    assert range_bounds("weekly", T0 - DAY) == (utc(2025, 3, 3), utc(2025, 3, 10))
    assert range_bounds("monthly", T0) == (utc(2025, 3, 1), utc(2025, 4, 1))
    assert range_bounds("monthly", utc(2024, 12, 31) + 5) == (utc(2024, 12, 1), utc(2025, 1, 1))
    assert range_bounds("monthly", utc(2024, 2, 29)) == (utc(2024, 2, 1), utc(2024, 3, 1))
    assert range_bounds("total", T0)[0] == 0


def test_budget_reserves_the_estimate_and_settles_the_actual_cost() -> None:
    policy = Policy()
    alice = who({"budget_usd": 1, "budget_range": "daily"})
    a = policy.admit(alice, request(), 300_000, T0)
    b = policy.admit(alice, request(), 300_000, T0)
    status = policy.budget_status(alice, None, T0)
    assert status is not None and (status.spent_micro_usd, status.reserved_micro_usd, status.in_flight) == (
        0,
        600_000,
        2,
    )
    assert headers_of(a)["x-poolgate-budget-limit-usd"] == "1.00"
    policy.settle(a, 120_000, Usage(), T0)
    policy.settle(b, None, None, T0)  # failed upstream: nothing charged, reservation released
    status = policy.budget_status(alice, None, T0)
    assert status is not None and (status.spent_micro_usd, status.reserved_micro_usd, status.in_flight) == (
        120_000,
        0,
        0,
    )


def test_an_exhausted_budget_says_which_how_much_and_when_it_resets() -> None:
    policy = Policy()
    alice = who({"budget_usd": 1, "budget_range": "daily", "budget_scope": "per_session"})
    admission = policy.admit(alice, request(session="4f2a9c1e-aaaa-bbbb"), 400_000, T0)
    policy.settle(admission, 871_234, Usage(), T0)
    error = refusal(policy.admit, alice, request(session="4f2a9c1e-aaaa-bbbb"), 200_000, T0 + 10)
    assert (error.status, error.error_type) == (402, "billing_error")
    assert "daily per-session budget of $1.00 for 'alice' (session 4f2a9c1e…)" in error.message
    assert "$0.871234 spent" in error.message and "may cost up to $0.20" in error.message
    assert "resets at 2025-03-11T00:00:00Z (in 11 h 60 min)" not in error.message  # humanised sanely
    assert "resets at 2025-03-11T00:00:00Z (in 12 h)" in error.message
    headers = headers_of(error)
    assert headers["x-should-retry"] == "false" and headers["retry-after"] == str(12 * 3600 - 10)
    assert headers["x-poolgate-budget-spent-usd"] == "0.871234"
    # A cheaper request still fits; the next day starts afresh.
    policy.settle(policy.admit(alice, request(session="4f2a9c1e-aaaa-bbbb"), 100_000, T0 + 20), 128_766, Usage(), T0)
    error = refusal(policy.admit, alice, request(session="4f2a9c1e-aaaa-bbbb"), None, T0 + 30)
    assert "$1.00 spent" in error.message
    assert policy.admit(alice, request(session="4f2a9c1e-aaaa-bbbb"), 200_000, T0 + 12 * 3600).budget is not None


def test_a_budget_held_only_by_requests_in_flight_says_to_retry_shortly() -> None:
    """What requests in flight reserve is back when they end: a request that fits what is spent is told to
    retry in a few seconds (429), not to wait hours for the reset (402); one that does not fit what is spent
    still gets the 402."""
    policy = Policy()
    alice = who({"budget_usd": 1, "budget_range": "daily"})
    first = policy.admit(alice, request(), 400_000, T0)
    second = policy.admit(alice, request(), 400_000, T0)
    held = refusal(policy.admit, alice, request(), 300_000, T0)
    assert (held.status, held.error_type) == (429, "rate_limit_error")
    assert "held by 2 requests in flight ($0.80 reserved), with $0.00 spent" in held.message
    assert "may cost up to $0.30" in held.message and "Retry shortly" in held.message
    headers = headers_of(held)
    assert headers["retry-after"] == "5" and headers["x-should-retry"] == "true"
    assert headers["x-poolgate-budget-spent-usd"] == "0.00" and headers["x-poolgate-budget-limit-usd"] == "1.00"
    policy.settle(first, 600_000, Usage(), T0)
    still_held = refusal(policy.admit, alice, request(), 300_000, T0)
    assert still_held.status == 429 and "held by 1 request in flight ($0.40 reserved)" in still_held.message
    exhausted = refusal(policy.admit, alice, request(), 500_000, T0)  # more than the $0.40 left unspent
    assert exhausted.status == 402 and "Budget exhausted" in exhausted.message
    assert headers_of(exhausted)["x-should-retry"] == "false"
    policy.settle(second, 0, Usage(), T0)
    assert policy.admit(alice, request(), 300_000, T0).budget is not None


def test_a_request_estimated_above_the_whole_budget_is_told_to_be_smaller() -> None:
    """Neither waiting for the reset nor anything spent can help such a request: the refusal says what
    can, without a retry-after, and does not call the budget exhausted."""
    policy = Policy()
    alice = who({"budget_usd": "0.50", "budget_range": "daily"})
    error = refusal(policy.admit, alice, request(), 800_000, T0)
    assert error.status == 402 and "Budget exhausted" not in error.message
    assert (
        "may cost up to $0.80 (its prompt and max_tokens at its model's price on the accounts that may serve it),"
        " more than the whole budget" in error.message
    )
    assert "smaller prompt or max_tokens" in error.message
    assert "retry-after" not in headers_of(error) and headers_of(error)["x-should-retry"] == "false"
    # The budget's state, as on every answer (its reset was missing here).
    assert headers_of(error)["x-poolgate-budget-reset"].endswith("T00:00:00Z")
    assert policy.admit(alice, request(), 400_000, T0).budget is not None
    smaller = refusal(policy.admit, alice, request(), 200_000, T0)
    assert smaller.status == 429 and "smaller prompt" not in smaller.message  # only the request in flight is in its way


def test_a_total_budget_never_resets_and_says_so() -> None:
    policy = Policy()
    alice = who({"budget_usd": "0.5"})
    policy.settle(policy.admit(alice, request(), None, T0), 500_000, Usage(), T0)
    error = refusal(policy.admit, alice, request(), None, T0 + 400 * DAY)
    assert "total per-account budget of $0.50" in error.message and "does not reset" in error.message
    assert "retry-after" not in headers_of(error)


def test_per_session_budgets_are_separate_and_per_account_ones_are_shared() -> None:
    policy = Policy()
    per_session = who({"budget_usd": 1, "budget_scope": "per_session"}, pid="key_s")
    per_account = who({"budget_usd": 1, "budget_scope": "per_account"}, pid="key_a")
    for principal in (per_session, per_account):
        policy.settle(policy.admit(principal, request(session="one"), None, T0), USD, Usage(), T0)
    assert policy.admit(per_session, request(session="two"), 500_000, T0).budget is not None
    assert refusal(policy.admit, per_session, request(session="one"), None, T0).status == 402
    assert refusal(policy.admit, per_account, request(session="two"), None, T0).status == 402
    # Requests without a session id share one per-session budget.
    policy.settle(policy.admit(per_session, request(session=None), None, T0), USD, Usage(), T0)
    error = refusal(policy.admit, per_session, request(session=None), None, T0)
    assert "requests without a session id" in error.message


def test_budgets_apply_to_messages_not_to_count_tokens() -> None:
    policy = Policy()
    broke = who({"budget_usd": 0})
    assert policy.admit(broke, request(endpoint="count_tokens"), None, T0) is ADMITTED
    assert refusal(policy.admit, broke, request(), None, T0).status == 402


def test_a_budget_refusal_does_not_count_against_the_quota() -> None:
    policy = Policy()
    alice = who({"budget_usd": 0, "quotas": ["requests=1/min"]})
    for _ in range(3):
        assert refusal(policy.admit, alice, request(), None, T0).status == 402
    funded = who({"budget_usd": 1, "quotas": ["requests=1/min"]})
    assert policy.admit(funded, request(), None, T0).budget is not None


def test_spend_is_seeded_from_the_ledger_by_range_and_scope() -> None:
    policy = Policy()
    rows = [
        SpendRow("key_a", "s1", T0 - 100, 200_000),  # today
        SpendRow("key_a", "s1", T0 - 200, 100_000),  # today, same key: added up
        SpendRow("key_a", "s2", T0 - DAY, 300_000),  # yesterday (still this week and month)
        SpendRow("key_a", None, T0 - 20 * DAY, 400_000),  # last month
        SpendRow("key_a", "old", T0 - 100 * DAY, 1_000_000),  # long ago: only the total remembers it
        SpendRow("key_b", "s1", T0, 999),
    ]
    policy.load_spend(rows, now=T0)

    def spent(claims: dict[str, Any], session: str | None = None) -> int:
        status = policy.budget_status(who({"budget_usd": 100, **claims}), session, T0)
        assert status is not None
        return status.spent_micro_usd

    assert spent({"budget_range": "daily"}) == 300_000
    assert spent({"budget_range": "weekly"}) == 300_000  # T0 is a Monday: yesterday was last week
    assert spent({"budget_range": "monthly"}) == 600_000
    assert spent({"budget_range": "total"}) == 2_000_000
    assert spent({"budget_range": "total", "budget_scope": "per_session"}, "s1") == 300_000
    assert spent({"budget_range": "daily", "budget_scope": "per_session"}, "s2") == 0
    assert spent({"budget_range": "total", "budget_scope": "per_session"}, None) == 400_000
    assert spent({"budget_range": "total", "budget_scope": "per_session"}, "old") == 0  # past retention
    assert SESSION_RETENTION_DAYS < 100


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["key_a", "key_b"]),
            st.sampled_from(["s1", "s2", None]),
            st.integers(0, 2),
            st.integers(1, 10**6),
        ),
        max_size=30,
    )
)
def test_every_charge_counts_once_in_a_budget_built_after_it_whatever_the_order(
    charges: list[tuple[str, str | None, int, int]],
) -> None:
    """Charges to one caller, session and day in a row are summed before they reach the spend history: a
    budget built from the history afterwards (another range or scope, a restart's) counts each of them once."""
    policy = Policy()
    for pid, session, day, cost in charges:
        policy.budgets.spend(
            who({"budget_usd": 1000, "budget_scope": "per_session"}, pid=pid), session, T0 + day * DAY, cost
        )
    last = T0 + 2 * DAY
    for pid in ("key_a", "key_b"):
        total = policy.budget_status(who({"budget_usd": 1, "budget_range": "total"}, pid=pid), None, last)
        assert total is not None and total.spent_micro_usd == sum(c for p, _, _, c in charges if p == pid)
        daily = who({"budget_usd": 1, "budget_range": "daily", "budget_scope": "per_session"}, pid=pid)
        for session in ("s1", "s2", None):
            status = policy.budget_status(daily, session, last)
            expected = sum(c for p, s, d, c in charges if (p, s, d) == (pid, session, 2))
            assert status is not None and status.spent_micro_usd == expected


def test_the_sessions_whose_spend_is_kept_are_bounded_in_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller with a budget sending a new session id with every request grew the spend history by one a
    request for 40 days; past the bound, the sessions charged least recently go, their spend still counted in
    the account's."""
    monkeypatch.setattr(budgets_module, "MAX_SESSIONS_KEPT", 50)
    policy = Policy()
    per_session = who({"budget_usd": 1000, "budget_scope": "per_session"})
    for index in range(200):
        policy.budgets.spend(per_session, f"session-{index}", T0 + (index // 10) * DAY, 1_000)
    kept = policy.budgets.kept_sessions()
    assert 45 <= len(kept) <= 50
    assert ("key_a", "session-199") in kept and ("key_a", "session-0") not in kept
    last = T0 + 19 * DAY
    status = policy.budget_status(who({"budget_usd": 1, "budget_range": "total"}), None, last)
    assert status is not None and status.spent_micro_usd == 200_000
    session = policy.budget_status(per_session, "session-199", last)
    assert session is not None and session.spent_micro_usd == 1_000


def test_past_the_bound_on_sessions_one_charged_today_keeps_its_spend_over_older_ones_of_the_day(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spend is kept per day, so sessions charged the same day tie: the trim kept the first of them it met
    (the oldest) and dropped the newest, the session just charged among them, whose per-session budget then
    started afresh at its next request."""
    monkeypatch.setattr(budgets_module, "MAX_SESSIONS_KEPT", 50)
    policy = Policy()
    per_session = who({"budget_usd": 1000, "budget_scope": "per_session"})
    for index in range(51):
        policy.budgets.spend(per_session, f"session-{index}", T0, 1_000)
    kept = policy.budgets.kept_sessions()
    assert len(kept) == 45 and ("key_a", "session-50") in kept and ("key_a", "session-0") not in kept


def test_a_budget_bucket_with_a_request_in_flight_outlives_the_bound_on_buckets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Buckets past `MAX_BUCKETS_KEPT` go least recently used first, but never one holding a reservation:
    rebuilt from the spend history, it would have lost what its requests in flight reserve."""
    monkeypatch.setattr(budgets_module, "MAX_BUCKETS_KEPT", 10)
    budgets = Policy().budgets
    per_session = who({"budget_usd": 1, "budget_scope": "per_session"})
    held = budgets.reserve(per_session, "held", 1_000, T0)
    for index in range(50):
        budgets.settle(budgets.reserve(per_session, f"session-{index}", 1_000, T0 + index), 10)
    assert len(budgets._buckets) <= 10 and ("key_a", "held") in budgets._buckets
    status = budgets.status(per_session, "held", T0 + 60)
    assert status is not None and (status.reserved_micro_usd, status.in_flight) == (1_000, 1)
    budgets.settle(held, 500)
    status = budgets.status(per_session, "held", T0 + 60)
    assert status is not None and (status.spent_micro_usd, status.reserved_micro_usd) == (500, 0)
    dropped = budgets.status(per_session, "session-0", T0 + 60)  # rebuilt from the spend history
    assert dropped is not None and dropped.spent_micro_usd == 10


def test_spend_of_ended_sessions_is_dropped_after_its_retention_even_when_no_caller_has_a_budget() -> None:
    """Per-session spend was swept only while reserving for a budget: a gateway whose callers had none kept
    every session's spend forever (~0.5 KB each, a new session every Claude Code start)."""
    policy = Policy()
    per_session = who({"budget_usd": 1000, "budget_scope": "per_session"})
    for index in range(100):
        policy.budgets.spend(per_session, f"session-{index}", T0, 1_000)
    assert len(policy.budgets.kept_sessions()) == 100
    later = T0 + (SESSION_RETENTION_DAYS + 1) * DAY
    policy.budgets.spend(per_session, "today", later, 1_000)
    assert policy.budgets.kept_sessions() == [("key_a", "today")]
    # The account's total still counts what the sessions spent.
    status = policy.budget_status(who({"budget_usd": 1, "budget_range": "total"}), None, later)
    assert status is not None and status.spent_micro_usd == 101_000


def test_a_caller_without_a_budget_has_no_spend_kept_per_session() -> None:
    """Every session id any caller sent was kept for 40 days (~450 bytes each): a caller without a budget
    changing a header per request grew the gateway without bound."""
    policy = Policy()
    for index in range(100):
        policy.budgets.spend(who({}), f"session-{index}", T0, 1_000)
    assert not policy.budgets.kept_sessions()
    status = policy.budget_status(who({"budget_usd": 1, "budget_range": "total"}), None, T0)
    assert status is not None and status.spent_micro_usd == 100_000  # the account's spend is all there


def test_quota_windows_of_principals_long_idle_are_forgotten() -> None:
    """Every JWT subject seen kept its quota windows forever (~1.2 KB each); once they have all ended an hour
    ago they would count from zero anyway."""
    policy = Policy()
    limited = {"quotas": ["requests=5/min", "output_tokens=1000/hour"]}
    for index in range(50):
        policy.admit(who(limited, pid=f"jwt:{index}"), request(), None, T0)
    assert len(policy.quotas) == 50
    # An hour's grace after the last window ends: a request admitted in it still charges its tokens there.
    policy.admit(who(limited, pid="jwt:recent"), request(), None, T0 + 2.5 * 3600)  # its hour ends at T0 + 3 h
    assert len(policy.quotas) == 1
    stays = who(limited, pid="jwt:stays")
    policy.admit(stays, request(), None, T0 + 3.5 * 3600)
    assert len(policy.quotas) == 2
    for _ in range(4):
        policy.admit(stays, request(), None, T0 + 3.5 * 3600 + 1)
    assert refusal(policy.admit, stays, request(), None, T0 + 3.5 * 3600 + 2).status == 429  # still counted


def test_a_sweep_of_many_idle_principals_is_spread_over_the_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swept at once, 200,000 principals held the event loop ~230 ms, every request meanwhile waiting: each
    request now looks at `SWEEP_CHUNK` of them until all have been, then the next sweep is ten minutes away."""
    monkeypatch.setattr(quotas, "SWEEP_CHUNK", 20)
    policy = Policy()
    limited = {"quotas": ["requests=5/min"]}
    for index in range(50):
        policy.admit(who(limited, pid=f"jwt:{index}"), request(), None, T0)
    later = T0 + 2 * 3600  # every one of their windows ended over an hour ago
    sizes = []
    for step in range(4):
        policy.admit(who(limited, pid="jwt:busy"), request(), None, later + step)
        sizes.append(len(policy.quotas))
    assert sizes == [31, 11, 1, 1]  # 20 looked at per request (the busy one stays), then none
    policy.admit(who(limited, pid="jwt:0"), request(), None, later + 10)
    assert len(policy.quotas) == 2  # the sweep is over until its next turn


def test_changing_a_budget_scope_keeps_what_was_spent() -> None:
    policy = Policy()
    per_session = who({"budget_usd": 10, "budget_scope": "per_session", "budget_range": "daily"})
    for session in ("a", "b"):
        policy.settle(policy.admit(per_session, request(session=session), None, T0), 2 * USD, Usage(), T0)
    in_flight = policy.admit(per_session, request(session="a"), USD, T0)
    per_account = who({"budget_usd": 10, "budget_scope": "per_account", "budget_range": "daily"})
    status = policy.budget_status(per_account, None, T0)
    assert status is not None and status.spent_micro_usd == 4 * USD
    policy.settle(in_flight, USD, Usage(), T0)
    status = policy.budget_status(per_account, None, T0)
    assert status is not None and status.spent_micro_usd == 5 * USD


async def test_parallel_requests_overspend_at_most_what_was_in_flight() -> None:
    """Many concurrent requests against one budget: admission is atomic on the event loop, so the
    reservations never exceed the budget, and overspend is bounded by the estimates' error."""
    policy = Policy()
    alice = who({"budget_usd": 1})
    rng = random.Random(6)
    admitted: list[tuple[int, int]] = []
    refused = 0

    async def one(estimate: int, actual: int) -> None:
        nonlocal refused
        try:
            admission = policy.admit(alice, request(), estimate, T0)
        except ApiError:
            refused += 1
            return
        admitted.append((estimate, actual))
        await asyncio.sleep(0)  # every admit runs before any settle
        await asyncio.sleep(rng.random() / 1000)
        policy.settle(admission, actual, Usage(), T0)

    # Actual costs up to 1.5× the estimate: estimates are not always upper bounds.
    jobs = [(e := rng.randint(10_000, 60_000), rng.randint(0, e * 3 // 2)) for _ in range(200)]
    await asyncio.gather(*(one(estimate, actual) for estimate, actual in jobs))
    status = policy.budget_status(alice, None, T0)
    assert status is not None
    assert refused > 0 and status.reserved_micro_usd == 0 and status.in_flight == 0
    assert sum(estimate for estimate, _ in admitted) <= USD
    assert status.spent_micro_usd == sum(actual for _, actual in admitted)
    assert status.spent_micro_usd <= USD + sum(max(0, actual - estimate) for estimate, actual in admitted)


@settings(max_examples=80, deadline=None)
@given(
    budget=st.integers(min_value=0, max_value=2_000_000),
    ops=st.lists(
        st.tuples(
            st.booleans(),  # admit a new request, or settle an outstanding one
            st.integers(min_value=0, max_value=400_000) | st.none(),  # estimate
            st.floats(min_value=0, max_value=2),  # actual / estimate
            st.integers(min_value=0, max_value=100),  # which outstanding request to settle
        ),
        max_size=80,
    ),
)
def test_budget_invariants_hold_under_any_interleaving(budget: int, ops: list[Any]) -> None:
    policy = Policy()
    alice = who({"budget_micro_usd": budget})
    outstanding: list[tuple[Admission, int]] = []
    spent = 0
    overrun = 0
    for admit, estimate, ratio, pick in ops:
        if admit or not outstanding:
            before = policy.budget_status(alice, None, T0)
            assert before is not None
            try:
                admission = policy.admit(alice, request(), estimate, T0)
            except ApiError as error:
                assert before.spent_micro_usd + before.reserved_micro_usd + (estimate or 0) > budget or (
                    before.spent_micro_usd + before.reserved_micro_usd >= budget
                )
                # Retryable exactly when it would be admitted with nothing in flight.
                fits_spent = before.spent_micro_usd < budget and before.spent_micro_usd + (estimate or 0) <= budget
                assert error.status == (429 if before.reserved_micro_usd and fits_spent else 402)
                continue
            assert before.spent_micro_usd + before.reserved_micro_usd + (estimate or 0) <= budget
            outstanding.append((admission, estimate or 0))
        else:
            admission, reserved = outstanding.pop(pick % len(outstanding))
            actual = int(reserved * ratio) if reserved else int(ratio * 1000)
            policy.settle(admission, actual, Usage(), T0)
            spent += actual
            overrun += max(0, actual - reserved)
        status = policy.budget_status(alice, None, T0)
        assert status is not None
        assert status.reserved_micro_usd == sum(reserved for _, reserved in outstanding)
        assert status.spent_micro_usd == spent
        assert status.in_flight == len(outstanding)
        assert status.spent_micro_usd + status.reserved_micro_usd <= budget + overrun


BUDGET_CLAIMS = [
    {"budget_range": budget_range, "budget_scope": scope}
    for budget_range in ("daily", "monthly", "total")
    for scope in ("per_account", "per_session")
]


@settings(max_examples=80, deadline=None)
@given(
    budget=st.integers(min_value=0, max_value=2_000_000),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["admit", "settle", "change"]),
            st.integers(min_value=0, max_value=400_000),  # estimate
            st.integers(min_value=0, max_value=100),  # which request to settle, which claims to change to
        ),
        max_size=60,
    ),
)
def test_changing_a_budgets_range_or_scope_keeps_the_reservations_of_requests_in_flight(
    budget: int, ops: list[Any]
) -> None:
    """An operator changes a key's budget range or scope (`keys set`) while its requests run: requests
    admitted afterwards still see those reservations, so the budget holds as before (it was overspent by
    everything in flight when the new range started from no reservations)."""
    policy = Policy()
    claims = BUDGET_CLAIMS[0]
    outstanding: list[tuple[Admission, int]] = []
    spent = 0
    for op, estimate, pick in ops:
        alice = who({"budget_micro_usd": budget, **claims})
        if op == "change":
            claims = BUDGET_CLAIMS[pick % len(BUDGET_CLAIMS)]
        elif op == "settle" and outstanding:
            admission, reserved = outstanding.pop(pick % len(outstanding))
            policy.settle(admission, reserved, Usage(), T0)  # the estimate was exact
            spent += reserved
        else:
            try:
                outstanding.append((policy.admit(alice, request(), estimate, T0), estimate))
            except ApiError as error:
                assert error.status in (402, 429)
        status = policy.budget_status(who({"budget_micro_usd": budget, **claims}), "sess-1", T0)
        assert status is not None
        assert status.reserved_micro_usd == sum(reserved for _, reserved in outstanding)
        assert status.in_flight == len(outstanding)
        assert status.spent_micro_usd == spent
        assert status.spent_micro_usd + status.reserved_micro_usd <= budget


@given(st.integers(min_value=0, max_value=10**15))
def test_budget_headers_format_dollars_like_messages(micro: int) -> None:
    from poolgate.lifecycle.budgets import _usd
    from poolgate.lifecycle.claims import format_usd

    assert _usd(micro) == format_usd(micro)[1:]


@settings(max_examples=60, deadline=None)
@given(
    scope=st.sampled_from(["per_account", "per_session"]),
    budget_range=st.sampled_from(["daily", "weekly", "monthly", "total"]),
    requests=st.lists(
        st.tuples(
            # Seconds after the previous request: up to ~33 days in all, across days, weeks and a month's end
            # (per-session spend is kept for SESSION_RETENTION_DAYS, 40).
            st.integers(min_value=0, max_value=20 * 3600),
            st.sampled_from(["sess-1", "sess-2", None]),
            st.integers(min_value=0, max_value=200_000),  # input tokens
            st.integers(min_value=0, max_value=8_000),  # output tokens
            st.booleans(),  # whether the caller had a budget when it was sent
        ),
        max_size=40,
    ),
)
def test_the_budget_spent_is_the_sum_of_the_ledger_rows_in_its_range_also_after_a_restart(
    scope: str, budget_range: str, requests: list[tuple[int, str | None, int, int, bool]]
) -> None:
    """Whatever the days, months, sessions and whether a budget applied when each request ran: what the budget
    says is spent equals the sum of the ledger rows (each request's real list price) in its current range, live
    and in a gateway restarted from those rows."""
    catalogue = Catalogue.load_default()
    claims = {"budget_micro_usd": 10**15, "budget_range": budget_range, "budget_scope": scope}
    budgeted, unbudgeted = who(claims), who({})
    policy = Policy()
    ledger: list[SpendRow] = []
    now = T0
    for gap, session, tokens_in, tokens_out, with_budget in requests:
        now += gap
        cost = catalogue.cost("claude-sonnet-4-5", BillableUsage(input_tokens=tokens_in, output_tokens=tokens_out))
        assert cost.micro_usd is not None
        ctx = request(session=session)
        if with_budget:
            admission = policy.admit(budgeted, ctx, cost.micro_usd, now)
            policy.settle(admission, cost.micro_usd, Usage(tokens_in, tokens_out), now)
        else:
            assert policy.admit(unbudgeted, ctx, cost.micro_usd, now) is ADMITTED
            policy.budgets.spend(budgeted, session, now, cost.micro_usd)
        ledger.append(SpendRow(budgeted.id, session, now, cost.micro_usd))
    start, end = range_bounds(budget_range, now)  # type: ignore[arg-type]
    restarted = Policy()
    restarted.load_spend(ledger, now)
    for session in ("sess-1", "sess-2", None):
        in_range = [
            row.cost_micro_usd
            for row in ledger
            if start <= row.day < end and (scope == "per_account" or row.session_id == session)
        ]
        for gateway in (policy, restarted):
            status = gateway.budget_status(budgeted, session, now)
            assert status is not None and status.spent_micro_usd == sum(in_range)


def test_a_one_hour_marker_before_a_five_minute_one_is_estimated_at_the_one_hour_rate() -> None:
    """Anthropic allows `[{…ttl 1h}, {…5m}]` in one message; the budget estimate must price the 1-hour write
    (it priced the whole prompt at the 5-minute rate and concurrent requests overspent the budget)."""
    import orjson

    from poolgate.api.anthropic import decode_request
    from poolgate.cache.breakpoints import prompt_prefix
    from poolgate.lifecycle.policy import cache_write_ttl

    def ttl_of(*controls: dict[str, str]) -> str | None:
        content = [{"type": "text", "text": "x" * 4000, "cache_control": control} for control in controls]
        body = orjson.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": content}]})
        ctx = decode_request("messages", "r", "/v1/messages", b"", [], body)
        assert ctx.prompt is not None
        ctx.prefix = prompt_prefix(ctx.prompt, ctx.body)
        return cache_write_ttl(ctx)

    assert ttl_of({"type": "ephemeral", "ttl": "1h"}, {"type": "ephemeral"}) == "1h"
    assert ttl_of({"type": "ephemeral"}) == "5m"
    assert ttl_of() is None


def test_markers_in_a_prompt_too_large_to_analyse_still_count() -> None:
    """A prompt of more blocks than the analysis takes has no breakpoints: its 1-hour marker was estimated as
    no cache write at all."""
    import orjson

    from poolgate.api.anthropic import decode_request
    from poolgate.cache.breakpoints import MAX_UNITS, prompt_prefix
    from poolgate.lifecycle.policy import cache_write_ttl

    turns = [{"role": "user", "content": "hi"}] * (MAX_UNITS + 1)
    turns[-1] = {
        "role": "user",
        "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
    }
    body = orjson.dumps({"model": "m", "max_tokens": 8, "messages": turns})
    ctx = decode_request("messages", "r", "/v1/messages", b"", [], body)
    assert ctx.prompt is not None
    ctx.prefix = prompt_prefix(ctx.prompt, ctx.body)
    assert not ctx.prefix.breakpoints and cache_write_ttl(ctx) == "1h"


_TTL_CHOICES = st.sampled_from([None, "5m", "1h"])


@given(
    tools=st.lists(_TTL_CHOICES, max_size=3),
    system=st.lists(_TTL_CHOICES, max_size=3),
    turns=st.lists(st.lists(_TTL_CHOICES, min_size=1, max_size=3), min_size=1, max_size=4),
    request_level=_TTL_CHOICES,
)
def test_the_estimated_cache_write_is_one_hour_exactly_when_some_marker_asks_for_it(
    tools: list[str | None], system: list[str | None], turns: list[list[str | None]], request_level: str | None
) -> None:
    """Wherever a 1-hour marker sits (a tool, a system block, any block of any turn, the request itself),
    the estimate allows for a 1-hour write; markers of 5 minutes only, a 5-minute one; no marker, none. Text
    that merely says "1h" asks for nothing."""
    import orjson

    from poolgate.api.anthropic import decode_request
    from poolgate.cache.breakpoints import prompt_prefix
    from poolgate.lifecycle.policy import cache_write_ttl

    def control(ttl: str | None) -> dict[str, object]:
        if ttl is None:
            return {}
        return {"cache_control": {"type": "ephemeral"} | ({"ttl": "1h"} if ttl == "1h" else {})}

    request: dict[str, object] = {
        "model": "m",
        "max_tokens": 8,
        "tools": [{"name": f"t{i}", "input_schema": {}, **control(ttl)} for i, ttl in enumerate(tools)],
        # Text that is exactly `1h` (the body then holds `"1h"`, which a scan of it took for a marker).
        "system": [{"type": "text", "text": "1h", **control(ttl)} for ttl in system],
        "messages": [
            {
                "role": "user" if i % 2 == 0 else "assistant",
                "content": [
                    {"type": "text", "text": "1h"},
                    *({"type": "text", "text": f'turn {i}: "1h"', **control(ttl)} for ttl in blocks),
                ],
            }
            for i, blocks in enumerate(turns)
        ],
    }
    if request_level is not None:
        request.update(control(request_level))
    body = orjson.dumps(request)
    ctx = decode_request("messages", "r", "/v1/messages", b"", [], body)
    assert ctx.prompt is not None
    ctx.prefix = prompt_prefix(ctx.prompt, ctx.body)
    ttls = [*tools, *system, *(ttl for blocks in turns for ttl in blocks), request_level]
    expected = None if not any(ttls) else ("1h" if "1h" in ttls else "5m")
    assert cache_write_ttl(ctx) == expected


def offered_by(tools: object, model: str = "m", max_tokens: int = 8) -> tuple[Offered, RequestContext]:
    """What a request offering `tools` is found to offer, the same whether the prompt was analysed (a marked
    request: the memo is keyed by the analysis' digest of the tools) or not; and the analysed request."""
    import orjson

    from poolgate.api.anthropic import decode_request
    from poolgate.cache.breakpoints import prompt_prefix

    found = []
    for marker in ({}, {"cache_control": {"type": "ephemeral"}}):
        content = [{"type": "text", "text": "hi " * 300, **marker}]
        body = orjson.dumps(
            {
                "model": model,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": content}],
                "tools": tools,
            }
        )
        ctx = decode_request("messages", "r", "/v1/messages", b"", [], body)
        if marker and ctx.prompt is not None:
            ctx.prefix = prompt_prefix(ctx.prompt, ctx.body)
            assert ctx.prefix.tools_digest or not tools
        found.append(offered(ctx))
    assert found[0] == found[1]
    return found[0], ctx


def test_a_request_offering_web_search_reserves_its_searches() -> None:
    """Each server-side web search is billed ($10 per 1,000): the budget estimate reserves as many as the
    tool allows (`max_uses`), a fixed allowance when it sets none, so that a budget is not overspent by them."""
    from poolgate.api.tools import MAX_RESERVED_WEB_SEARCHES, UNBOUNDED_WEB_SEARCHES
    from poolgate.billing import Catalogue, estimate_max_cost

    def searches(tools: object) -> int:
        return offered_by(tools)[0].web_searches

    search = {"type": "web_search_20250305", "name": "web_search"}
    assert searches([search | {"max_uses": 3}]) == 3
    assert searches([search]) == UNBOUNDED_WEB_SEARCHES
    assert searches([search | {"max_uses": 2}, {"name": "Read", "input_schema": {}}, search | {"max_uses": 5}]) == 7
    assert searches([{"name": "web_search_helper", "input_schema": {}}]) == 0  # a client tool by that name
    assert searches([search | {"max_uses": True}]) == UNBOUNDED_WEB_SEARCHES
    # More than the default allowance reserves what it allows (it reserved 10), up to a thousand.
    assert searches([search | {"max_uses": 999}]) == 999
    assert searches([search | {"max_uses": 5000}]) == MAX_RESERVED_WEB_SEARCHES == 1000
    assert searches("web_search_") == 0 and searches([]) == 0
    price = Catalogue.load_default().price_for("claude-sonnet-4-5")
    assert price is not None
    assert estimate_max_cost(price, 1000, 100, web_searches=3) - estimate_max_cost(price, 1000, 100) == 30_000


def test_a_request_offering_an_advisor_reserves_its_consultations_at_the_advisors_price() -> None:
    """The advisor tool runs inferences on another model (Opus), each reading the whole conversation and
    writing up to the tool's `max_tokens`, billed at that model's rates (see `book.py`): a budget reserving
    only the executor's prompt and output was overspent by them. Each consultation is reserved as the
    conversation at its largest (prompt, the executor's output and all the advice) plus its output, at the
    advisor's price; `max_uses` and `max_tokens` allowances where the tool sets none."""
    from poolgate.api.tools import ADVISOR_OUTPUT_UNSET, UNBOUNDED_ADVISOR_USES, Advisor
    from poolgate.billing import Catalogue, estimate_max_cost
    from poolgate.billing.book import ChannelBook
    from poolgate.lifecycle.policy import budget_estimate, estimate_tokens

    executor, adviser = "claude-sonnet-4-5", "claude-opus-4-6"
    advisor = {"type": "advisor_20260301", "name": "advisor", "model": adviser}
    book = ChannelBook(Catalogue.load_default())
    sonnet, opus = book.catalogue.price_for(executor), book.catalogue.price_for(adviser)
    assert sonnet is not None and opus is not None

    tools, ctx = offered_by([advisor | {"max_uses": 2, "max_tokens": 1500}], executor, 400)
    assert tools.advisors == (Advisor(adviser, 2, 1500, None),)
    estimate, held = budget_estimate(book, ctx, None, ())
    assert held == tools
    prompt, output = estimate_tokens(ctx)
    own = estimate_max_cost(sonnet, prompt, output, cache_write_ttl="5m")  # the marked request's prompt
    each = estimate_max_cost(opus, prompt + output + 2 * 1500, 1500)
    assert estimate == own + 2 * each
    # Above what the executor alone would reserve by far: Opus reading the conversation twice.
    assert estimate is not None and estimate > 3 * own

    # Without max_uses or max_tokens: the allowances. Caching the advisor's transcript reserves its cache write.
    tools, _ = offered_by([advisor | {"caching": {"type": "ephemeral", "ttl": "1h"}}], executor)
    assert tools.advisors == (Advisor(adviser, UNBOUNDED_ADVISOR_USES, ADVISOR_OUTPUT_UNSET, "1h"),)
    # No model (the API refuses it), another tool of that name, a non-list: nothing.
    assert offered_by([{"type": "advisor_20260301", "name": "advisor"}])[0] == NOTHING_OFFERED
    assert offered_by([{"name": "advisor_helper", "input_schema": {}}])[0] == NOTHING_OFFERED
    # An advisor whose model has no price adds nothing (the request's cost will be unknown: charged its reservation).
    _, ctx = offered_by([advisor | {"model": "claude-unknown-9"}], executor)
    prompt, output = estimate_tokens(ctx)
    assert budget_estimate(book, ctx, None, ())[0] == estimate_max_cost(sonnet, prompt, output, cache_write_ttl="5m")


_COUNTS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.text(max_size=3), st.floats())
_TOOLS = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["web_search_20250305", "advisor_20260301", "bash_20250124", "custom", 7])},
        optional={
            "name": st.text(max_size=8),
            "max_uses": _COUNTS,
            "max_tokens": _COUNTS,
            "model": st.one_of(st.sampled_from(["claude-opus-4-6", "claude-unknown-9", ""]), st.integers()),
            "caching": st.one_of(
                st.none(), st.just({"type": "ephemeral"}), st.just({"type": "ephemeral", "ttl": "1h"})
            ),
        },
    ),
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(tools=_TOOLS)
def test_what_any_tools_offer_is_reserved_within_its_bounds(tools: list[dict[str, Any]]) -> None:
    """Whatever a request's tools say (counts that are not counts, models that are not names), reading them
    never fails; each web search tool and each advisor with a model counts once, a count it sets (a positive
    integer) where it sets one, capped, an allowance otherwise; and offering them never lowers the estimate."""
    import orjson

    from poolgate.api.tools import (
        ADVISOR_OUTPUT_UNSET,
        MAX_RESERVED_ADVISOR_USES,
        MAX_RESERVED_WEB_SEARCHES,
        UNBOUNDED_ADVISOR_USES,
        UNBOUNDED_WEB_SEARCHES,
        offered_tools,
    )
    from poolgate.billing.book import ChannelBook
    from poolgate.lifecycle.policy import budget_estimate

    def allowance(value: object, unset: int, most: int) -> int:
        return min(value, most) if type(value) is int and value > 0 else unset

    found = offered_tools(orjson.dumps(tools))
    searches = [t for t in tools if t["type"] == "web_search_20250305"]
    advisors = [t for t in tools if t["type"] == "advisor_20260301" and isinstance(t.get("model"), str) and t["model"]]
    assert found.web_searches == sum(
        allowance(t.get("max_uses"), UNBOUNDED_WEB_SEARCHES, MAX_RESERVED_WEB_SEARCHES) for t in searches
    )
    assert [(a.model, a.uses, a.max_tokens) for a in found.advisors] == [
        (
            t["model"],
            allowance(t.get("max_uses"), UNBOUNDED_ADVISOR_USES, MAX_RESERVED_ADVISOR_USES),
            allowance(t.get("max_tokens"), ADVISOR_OUTPUT_UNSET, 10**9),
        )
        for t in advisors
    ]
    book = ChannelBook(Catalogue.load_default())
    _, ctx = offered_by(tools, "claude-sonnet-4-5", 64)
    estimate, held = budget_estimate(book, ctx, None, ())
    assert held == found
    prompt, output = estimate_tokens(ctx)
    alone = book.estimate("claude-sonnet-4-5", prompt, output, "5m", ctx.started_at, found.web_searches)
    assert estimate is not None and alone is not None and estimate >= alone
    assert (estimate > alone) == any(a.model == "claude-opus-4-6" for a in found.advisors)


def test_claims_flipping_while_requests_run_do_not_pile_up_buckets() -> None:
    """Two JWTs of one subject with different budget ranges, alternating while requests are open: each
    open request is held by its own bucket and the live ones only, and all is released at the end."""
    policy = Policy()
    daily, weekly = (who({"budget_usd": 10, "budget_range": r}) for r in ("daily", "weekly"))
    open_ = [policy.admit(daily, request(), 1000, T0) for _ in range(5)]
    for i in range(200):
        policy.settle(policy.admit(weekly if i % 2 else daily, request(), 1000, T0), 1000, Usage(), T0)
    assert all(len(admission.budget.holders) <= 3 for admission in open_)  # type: ignore[union-attr]
    for admission in open_:
        policy.settle(admission, 500, Usage(), T0)
    status = policy.budget_status(daily, None, T0)
    assert status is not None and (status.reserved_micro_usd, status.in_flight) == (0, 0)
    assert status.spent_micro_usd == 200 * 1000 + 5 * 500


def test_a_zero_budget_says_it_is_used_up_not_that_the_request_is_too_large() -> None:
    policy = Policy()
    error = refusal(policy.admit, who({"budget_usd": 0}), request(), 1_000, T0)
    assert "Budget exhausted" in error.message and "ask for a larger budget" in error.message

"""Channel billing: monthly flat-fee counters (UTC months, restarts), billing preference, marginal cost."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from poolgate.billing.catalogue import Catalogue
from poolgate.billing.channel import (
    BillingCandidate,
    FlatFeeChannel,
    MeteredChannel,
    MonthlyCounter,
    channel_cost,
    channel_state,
    effective_cost_per_request,
    month_bounds,
    month_key,
    plan_billing,
    tokens_counted,
)
from poolgate.billing.config import ChannelConfig
from poolgate.billing.pricing import CreditsPrice, ImagePrice, TieredPrice
from poolgate.billing.values import BillableUsage, ImageCount

FAST = settings(max_examples=75, deadline=None)
NOW = datetime(2026, 11, 25, 9, 30, tzinfo=UTC).timestamp()
CAPPED = FlatFeeChannel(monthly_fee=200_000_000, max_requests_per_month=3, max_tokens_per_month=1_000)


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def first_of_next_month(year: int, month: int) -> float:
    return ts(year + 1, 1, 1) if month == 12 else ts(year, month + 1, 1)


# ------------------------------------------------------------------------------------------ months


def test_month_keys_and_bounds_in_utc() -> None:
    assert month_key(ts(2026, 12, 31, 23, 59, 59)) == "2026-12"
    assert month_key(ts(2027, 1, 1)) == "2027-01"
    assert month_bounds("2026-12") == (ts(2026, 12, 1), ts(2027, 1, 1))
    assert month_bounds("2028-02") == (ts(2028, 2, 1), ts(2028, 3, 1))


@FAST
@given(st.integers(1971, 2100), st.integers(1, 12), st.integers(0, 50), st.integers(0, 5_000))
def test_counters_roll_over_exactly_at_midnight_utc_on_the_first(year: int, month: int, before: int, tok: int) -> None:
    boundary = first_of_next_month(year, month)
    counter = MonthlyCounter.starting(CAPPED, ts(year, month, 1))
    for _ in range(before):
        assert counter.record(1, tok, ts(year, month, 1))
    # A microsecond before midnight still counts in the old month...
    counter.record(1, tok, boundary - 1e-6)
    assert counter.month == f"{year:04d}-{month:02d}"
    assert (counter.requests, counter.tokens) == (before + 1, (before + 1) * tok)
    # ...and the first record at 00:00:00 UTC on the 1st starts the new month from zero.
    assert counter.record(1, 7, boundary)
    assert (
        counter.month == month_key(boundary) == (f"{year + 1:04d}-01" if month == 12 else f"{year:04d}-{month + 1:02d}")
    )
    assert (counter.requests, counter.tokens) == (1, 7)


def test_december_rolls_over_into_january_of_the_next_year() -> None:
    counter = MonthlyCounter.starting(CAPPED, ts(2026, 12, 15))
    counter.record(3, 10, ts(2026, 12, 31, 23, 59, 59))
    assert counter.exhausted(ts(2026, 12, 31, 23, 59, 59))
    assert not counter.exhausted(ts(2027, 1, 1))  # read as a fresh month without being mutated
    assert counter.month == "2026-12"
    counter.record(1, 1, ts(2027, 1, 1))
    assert (counter.month, counter.requests, counter.tokens) == ("2027-01", 1, 1)


def test_a_late_record_from_an_earlier_month_does_not_eat_into_the_current_one() -> None:
    """A request that started in the month before (and finished in this one) counts in that month; one from
    before that is refused."""
    counter = MonthlyCounter.starting(CAPPED, ts(2026, 11, 1))
    assert counter.record(1, 100, ts(2026, 10, 31, 23, 59, 59))
    assert not counter.record(1, 100, ts(2026, 9, 30, 23, 59, 59))
    assert (counter.requests, counter.tokens) == (0, 0)
    assert counter.used(ts(2026, 10, 31)) == (1, 100)
    assert counter.used(ts(2026, 9, 30)) == (0, 0)


# ------------------------------------------------------------------------------------------ limits


def test_a_request_cap_is_exhausted_once_reached() -> None:
    counter = MonthlyCounter.starting(CAPPED, NOW)
    for _ in range(2):
        counter.record(1, 10, NOW)
    assert not counter.exhausted(NOW)
    assert counter.remaining(NOW) == (1, 980)
    counter.record(1, 10, NOW)
    assert counter.exhausted(NOW) and counter.remaining(NOW) == (0, 970)


def test_a_token_cap_is_exhausted_once_reached() -> None:
    counter = MonthlyCounter.starting(CAPPED, NOW)
    counter.record(1, 999, NOW)
    assert not counter.exhausted(NOW)
    counter.record(0, 1, NOW)
    assert counter.exhausted(NOW)


@FAST
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 10**9)), max_size=20))
def test_an_unlimited_channel_is_never_exhausted(records: list[tuple[int, int]]) -> None:
    counter = MonthlyCounter.starting(FlatFeeChannel(), NOW)
    for requests, tokens in records:
        counter.record(requests, tokens, NOW)
        assert not counter.exhausted(NOW)
    assert counter.remaining(NOW) == (None, None)


@FAST
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 400)), max_size=15))
def test_exhausted_means_a_limit_is_reached(records: list[tuple[int, int]]) -> None:
    counter = MonthlyCounter.starting(CAPPED, NOW)
    for requests, tokens in records:
        counter.record(requests, tokens, NOW)
    assert counter.exhausted(NOW) == (counter.requests >= 3 or counter.tokens >= 1_000)


def test_tokens_counted_include_cache_reads_and_writes() -> None:
    usage = BillableUsage(input_tokens=1, output_tokens=2, cache_creation_5m=3, cache_creation_1h=4, cache_read=5)
    assert tokens_counted(usage) == 15


# --------------------------------------------------------------------------------------- restarts


def test_snapshot_and_restore_survive_a_restart() -> None:
    counter = MonthlyCounter.starting(CAPPED, NOW)
    counter.record(2, 500, NOW)
    saved = counter.snapshot()
    assert saved == {"month": "2026-11", "requests": 2, "tokens": 500}
    restored = MonthlyCounter.restore(CAPPED, saved)
    assert restored.snapshot() == saved
    restored.record(1, 0, NOW)
    assert restored.exhausted(NOW)


def test_a_snapshot_from_an_earlier_month_rolls_over_on_restore() -> None:
    restored = MonthlyCounter.restore(CAPPED, {"month": "2026-10", "requests": 3, "tokens": 5_000})
    assert not restored.exhausted(NOW)
    restored.record(1, 1, NOW)
    assert restored.snapshot() == {"month": "2026-11", "requests": 1, "tokens": 1}


def test_restored_limits_come_from_the_current_config() -> None:
    saved = {"month": "2026-11", "requests": 3, "tokens": 0}
    assert MonthlyCounter.restore(CAPPED, saved).exhausted(NOW)
    assert not MonthlyCounter.restore(FlatFeeChannel(max_requests_per_month=10), saved).exhausted(NOW)


# ---------------------------------------------------------------------------------------- routing


def exhausted(channel: FlatFeeChannel) -> MonthlyCounter:
    return MonthlyCounter(channel, month_key(NOW), requests=10**6, tokens=10**9)


def test_prepaid_capacity_comes_before_metered_spend_then_cheapest_first() -> None:
    plan = plan_billing(
        [
            BillingCandidate("api-expensive", MeteredChannel(), estimated_cost=900),
            BillingCandidate("api-unknown", MeteredChannel(), estimated_cost=None),
            BillingCandidate("max-1", CAPPED, MonthlyCounter.starting(CAPPED, NOW)),
            BillingCandidate("api-cheap", MeteredChannel(), estimated_cost=100),
            BillingCandidate("max-2", FlatFeeChannel(), None),
            BillingCandidate("api-cheap-2", MeteredChannel(), estimated_cost=100),
        ],
        NOW,
    )
    assert plan.order == ("max-1", "max-2", "api-cheap", "api-cheap-2", "api-expensive", "api-unknown")
    assert plan.excluded == {} and plan.blocked is None


def test_an_exhausted_fallback_channel_sends_traffic_to_metered_upstreams() -> None:
    plan = plan_billing(
        [
            BillingCandidate("max", CAPPED, exhausted(CAPPED)),
            BillingCandidate("api", MeteredChannel(), estimated_cost=5),
        ],
        NOW,
    )
    assert plan.order == ("api",) and plan.excluded == {"max": "insufficient_quota"} and plan.blocked is None


def test_an_exhausted_fallback_channel_with_nothing_to_fall_back_to_refuses_until_the_month_ends() -> None:
    """No metered upstream serves the request: nothing will until the quota resets (the 529 said "in 5 s", and
    clients retried all month). One out only for now (parked, unhealthy) may serve sooner: no month-long
    refusal then."""
    plan = plan_billing([BillingCandidate("max", CAPPED, exhausted(CAPPED))], NOW)
    assert plan.order == () and plan.excluded == {"max": "insufficient_quota"}
    assert plan.blocked is not None and "max" in plan.blocked and "1st of the month" in plan.blocked
    for waiting in (
        BillingCandidate("api", MeteredChannel(), usable=False),
        BillingCandidate("max-b", CAPPED, usable=False),
    ):
        plan = plan_billing([BillingCandidate("max", CAPPED, exhausted(CAPPED)), waiting], NOW)
        assert plan.order == () and plan.blocked is None


def test_an_exhausted_block_channel_refuses_rather_than_spend() -> None:
    blocking = FlatFeeChannel(max_requests_per_month=1, on_exhausted="block")
    plan = plan_billing(
        [BillingCandidate("max", blocking, exhausted(blocking)), BillingCandidate("api", MeteredChannel())], NOW
    )
    assert plan.order == ()
    assert plan.excluded == {"max": "insufficient_quota", "api": "blocked_by_flat_fee_policy"}
    assert plan.blocked is not None and "max" in plan.blocked and "block" in plan.blocked


def test_block_still_allows_other_prepaid_capacity() -> None:
    blocking = FlatFeeChannel(max_requests_per_month=1, on_exhausted="block")
    plan = plan_billing(
        [
            BillingCandidate("max-a", blocking, exhausted(blocking)),
            BillingCandidate("api", MeteredChannel()),
            BillingCandidate("max-b", CAPPED, None),
        ],
        NOW,
    )
    assert plan.order == ("max-b", "api") and plan.blocked is None


def test_channel_state() -> None:
    assert channel_state(MeteredChannel(), None, NOW) == "metered"
    assert channel_state(CAPPED, None, NOW) == "prepaid"
    assert channel_state(CAPPED, exhausted(CAPPED), NOW) == "exhausted_fallback"
    assert channel_state(CAPPED, exhausted(CAPPED), ts(2026, 12, 1)) == "prepaid"  # new month


# --------------------------------------------------------------------------------------------- cost


def test_channel_cost_by_kind() -> None:
    catalogue = Catalogue.load_default()
    usage = BillableUsage(input_tokens=1_000_000, output_tokens=1_000)
    flat = channel_cost(CAPPED, catalogue, "claude-opus-4-5", usage)
    assert flat.micro_usd == 0 and flat.known  # already paid: free at the margin, not unknown
    listed = channel_cost(MeteredChannel(), catalogue, "claude-opus-4-5", usage)
    assert listed.micro_usd == 5_000_000 + 25_000 and listed.priced_as == "claude-opus-4-5"
    assert channel_cost(MeteredChannel(), catalogue, "mystery", usage).micro_usd is None
    credits = channel_cost(MeteredChannel(CreditsPrice(1_000_000, 0, 10)), catalogue, "mystery", usage)
    assert (credits.micro_usd, credits.currency) == (1_000_010, "credits")
    images = MeteredChannel(ImagePrice({("512x512", "low"): 5}))
    assert channel_cost(images, catalogue, "img", BillableUsage(images=(ImageCount("1x1", "low"),))).micro_usd is None


def test_effective_cost_per_request_spreads_the_fee() -> None:
    counter = MonthlyCounter.starting(CAPPED, NOW)
    assert effective_cost_per_request(CAPPED, counter, NOW) is None
    counter.record(3, 0, NOW)
    assert effective_cost_per_request(CAPPED, counter, NOW) == 66_666_667


# ------------------------------------------------------------------------------------------- config


def test_channel_config_builds_both_kinds() -> None:
    adapter = TypeAdapter(ChannelConfig)
    flat = adapter.validate_python(
        {"billing": "flat_fee", "monthly_fee": "200", "max_requests_per_month": 5000, "on_exhausted": "block"}
    ).build()
    assert flat == FlatFeeChannel(monthly_fee=200_000_000, max_requests_per_month=5000, on_exhausted="block")
    metered = adapter.validate_python({"billing": "metered"}).build()
    assert metered == MeteredChannel()
    tiered = adapter.validate_python(
        {"billing": "metered", "pricing": {"kind": "tiered", "tiers": [{"up_to": 10, "rate": 1}, {"rate": 0}]}}
    ).build()
    assert isinstance(tiered, MeteredChannel) and isinstance(tiered.pricing, TieredPrice)
    with pytest.raises(ValidationError):
        adapter.validate_python({"billing": "flat_fee", "on_exhausted": "shrug"})

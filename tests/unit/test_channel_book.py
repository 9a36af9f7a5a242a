"""The gateway's live billing state and what routing makes of it: flat-fee counters, the billing filter,
paid-for capacity and the cost term."""

from __future__ import annotations

from datetime import UTC, datetime

from poolgate.billing import BillableUsage, Catalogue, FlatFeeChannel, MeteredChannel, PerTokenPrice
from poolgate.billing.book import SUBSCRIPTION, ChannelBook, default_channel
from poolgate.config import ScoreWeights
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.routing.filters import billing_filter
from poolgate.lifecycle.routing.scoring import is_paid_for, score_candidates
from poolgate.upstreams.pool import UpstreamState

NOV = datetime(2026, 11, 15, tzinfo=UTC).timestamp()
DEC = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
MODEL = "claude-sonnet-5"
ONE = BillableUsage(input_tokens=100, output_tokens=20)


def state(upstream_id: str, kind: str = "anthropic_api_key") -> UpstreamState:
    return UpstreamState(Upstream(id=upstream_id, kind=kind, base_url="http://mock"))


def book(**channels: object) -> ChannelBook:
    result = ChannelBook(Catalogue.load_default())
    result.configure(channels)  # type: ignore[arg-type]
    return result


def test_a_flat_fee_counter_counts_requests_and_tokens_and_rolls_over_in_december() -> None:
    b = book(flat=FlatFeeChannel(max_requests_per_month=2), paid=MeteredChannel())
    b.record("flat", ONE, NOV)
    b.record("paid", ONE, NOV)  # metered: nothing to count
    assert b.prepaid("flat", NOV) and not b.prepaid("paid", NOV)
    b.record("flat", ONE, NOV + 1)
    counter = b.counter("flat")
    assert counter is not None and (counter.requests, counter.tokens) == (2, 240)
    assert not b.prepaid("flat", NOV + 2) and b.prepaid("flat", DEC)
    assert b.dirty() == {"flat": {"month": "2026-11", "requests": 2, "tokens": 240}} and b.dirty() == {}
    b.record("flat", ONE, DEC)
    assert b.dirty() == {"flat": {"month": "2026-12", "requests": 1, "tokens": 120}}


def test_counters_outlive_a_reload_and_take_new_limits() -> None:
    b = book(flat=FlatFeeChannel(max_requests_per_month=1))
    b.record("flat", ONE, NOV)
    assert not b.prepaid("flat", NOV)
    b.configure({"flat": FlatFeeChannel(max_requests_per_month=5)})
    assert b.prepaid("flat", NOV) and b.counter("flat").requests == 1  # type: ignore[union-attr]


def test_saved_counters_apply_to_channels_configured_before_or_after() -> None:
    b = book(early=FlatFeeChannel(max_requests_per_month=3))
    b.restore({"early": {"month": "2026-11", "requests": 3, "tokens": 0}, "late": {"month": "2026-11", "requests": 3}})
    assert not b.prepaid("early", NOV)
    b.configure({"early": FlatFeeChannel(max_requests_per_month=3), "late": FlatFeeChannel(max_requests_per_month=3)})
    assert not b.prepaid("late", NOV) and b.prepaid("late", DEC)


def test_what_a_request_costs_depends_on_its_channel() -> None:
    cheap = PerTokenPrice.of(1_000_000, 2_000_000, version="deal")
    b = book(flat=FlatFeeChannel(currency="EUR"), own=MeteredChannel(pricing=cheap), listed=MeteredChannel())
    assert (b.cost(MODEL, "flat", ONE, NOV).micro, b.cost(MODEL, "flat", ONE, NOV).version) == (0, "flat_fee")
    assert b.cost(MODEL, "own", ONE, NOV).micro == 140  # 100 × $1/M + 20 × $2/M = 140 µUSD
    listed = Catalogue.load_default().cost(MODEL, ONE)
    assert b.cost(MODEL, "listed", ONE, NOV).micro == listed.micro_usd
    assert b.cost(MODEL, None, ONE, NOV).micro == listed.micro_usd
    unknown = b.cost("no-such-model", "listed", ONE, NOV)
    assert unknown.micro is None and unknown.version == Catalogue.load_default().version


def test_subscriptions_are_flat_fee_and_api_keys_metered_by_default() -> None:
    assert default_channel("anthropic_oauth") is SUBSCRIPTION and SUBSCRIPTION.unlimited
    assert isinstance(default_channel("anthropic_api_key"), MeteredChannel)


def test_the_billing_filter_drops_exhausted_flat_fee_and_blocks_when_told() -> None:
    fallback = book(flat=FlatFeeChannel(max_requests_per_month=1), a=MeteredChannel())
    fallback.record("flat", ONE, NOV)
    kept, dropped, blocked = billing_filter([state("flat"), state("a")], fallback, NOV)
    assert [s.upstream.id for s in kept] == ["a"] and dropped == [("flat", "insufficient_quota")] and blocked is None

    block = book(flat=FlatFeeChannel(max_requests_per_month=1, on_exhausted="block"), a=MeteredChannel())
    kept, dropped, blocked = billing_filter([state("flat"), state("a")], block, NOV)
    assert len(kept) == 2 and not dropped and blocked is None  # quota left: nothing to drop
    block.record("flat", ONE, NOV)
    kept, dropped, blocked = billing_filter([state("flat"), state("a")], block, NOV)
    assert kept == [] and dict(dropped) == {"flat": "insufficient_quota", "a": "blocked_by_billing"}
    assert blocked is not None and "flat" in blocked
    kept, dropped, blocked = billing_filter([state("flat"), state("a")], block, DEC)
    assert len(kept) == 2 and blocked is None  # a new month


def test_a_blocking_channel_does_not_block_while_other_flat_fee_capacity_is_left() -> None:
    b = book(
        blocker=FlatFeeChannel(max_requests_per_month=1, on_exhausted="block"),
        spare=FlatFeeChannel(),
        a=MeteredChannel(),
    )
    b.record("blocker", ONE, NOV)
    kept, dropped, blocked = billing_filter([state("blocker"), state("spare"), state("a")], b, NOV)
    assert [s.upstream.id for s in kept] == ["spare", "a"] and blocked is None
    assert dropped == [("blocker", "insufficient_quota")]


def test_flat_fee_capacity_with_quota_left_is_paid_for_and_scores_before_metered() -> None:
    b = book(flat=FlatFeeChannel(max_requests_per_month=1), a=MeteredChannel())
    candidates = [state("a"), state("flat"), state("sub", kind="anthropic_oauth")]
    assert [is_paid_for(s, b, NOV) for s in candidates] == [False, True, True]
    scores = score_candidates(candidates, None, 0.0, ScoreWeights(), now_wall=NOV, billing=b, model=MODEL)
    assert scores[0].terms["metered"] > 0 and scores[1].terms["metered"] == 0 == scores[2].terms["metered"]
    b.record("flat", ONE, NOV)
    assert not is_paid_for(candidates[1], b, NOV)


def test_the_cost_term_prefers_the_cheaper_metered_upstream() -> None:
    catalogue = Catalogue.load_default().with_overrides(upstreams={"dear": {"*": {"input": "9", "output": "45"}}})
    b = ChannelBook(catalogue)
    b.configure({"cheap": MeteredChannel(), "dear": MeteredChannel(), "flat": FlatFeeChannel()}, ["dear"])
    assert b.priced_by_upstream
    scores = score_candidates(
        [state("cheap"), state("dear"), state("flat")], None, 0.0, ScoreWeights(), now_wall=NOV, billing=b, model=MODEL
    )
    assert (
        scores[0].terms["cost"] == 0 and scores[1].terms["cost"] == ScoreWeights().cost and scores[2].terms["cost"] == 0
    )
    same = book(a=MeteredChannel(), b=MeteredChannel())
    assert not same.priced_by_upstream  # nothing to compare: the term is not even computed

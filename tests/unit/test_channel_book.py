"""The gateway's live billing state and what routing makes of it: flat-fee counters, the billing filter,
paid-for capacity and the cost term."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolgate.billing import (
    BillableUsage,
    Catalogue,
    CreditsPrice,
    FlatFeeChannel,
    MeteredChannel,
    PerTokenPrice,
    Tier,
    TieredPrice,
)
from poolgate.billing.book import SUBSCRIPTION, ChannelBook, default_channel
from poolgate.billing.config import PriceOverrides
from poolgate.billing.values import ModelUsage
from poolgate.config import RoutingConfig, ScoreWeights
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.routing.filters import billing_filter
from poolgate.lifecycle.routing.router import Router, RouteRefused
from poolgate.lifecycle.routing.scoring import CandidateScore, Weights, cost_terms, is_paid_for, score_candidates
from poolgate.upstreams.health import park
from poolgate.upstreams.pool import Pool, UpstreamState

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
    unsaved = b.unsaved()
    assert unsaved == {"flat": {"month": "2026-11", "requests": 2, "tokens": 240}} and b.unsaved() == unsaved
    b.saved(unsaved)
    assert b.unsaved() == {}
    b.record("flat", ONE, DEC)
    assert b.unsaved() == {"flat": {"month": "2026-12", "requests": 1, "tokens": 120}}


def test_a_save_takes_in_what_other_processes_counted_and_never_counts_this_ones_twice() -> None:
    """Gateways sharing a store saw each other's counts only at their start: N instances gave a flat-fee quota
    up to N times over, and priced a tiered channel each by its own requests."""
    b = book(flat=FlatFeeChannel(max_requests_per_month=100))
    b.restore({"flat": {"month": "2026-11", "requests": 40, "tokens": 4000}})
    b.record("flat", ONE, NOV)
    increments = b.unsaved()
    # The store's row after this save: the others added 9 requests since this process started.
    b.saved(increments, {"flat": {"month": "2026-11", "requests": 50, "tokens": 5080}}, now=NOV)
    counter = b.counter("flat")
    assert counter is not None and (counter.requests, counter.tokens) == (50, 5080)
    assert b.unsaved() == {}
    b.record("flat", ONE, NOV + 1)
    assert b.unsaved() == {"flat": {"month": "2026-11", "requests": 1, "tokens": 120}}
    # A row of an earlier month (this process's counts of the new one on their way) changes nothing.
    b.saved({}, {"flat": {"month": "2026-10", "requests": 7, "tokens": 700}}, now=NOV)
    assert (counter.requests, b.unsaved()["flat"]["requests"]) == (51, 1)
    # Another process opened December: its count is where this one's goes on.
    b.saved({}, {"flat": {"month": "2026-12", "requests": 3, "tokens": 360}}, now=DEC)
    counter = b.counter("flat")
    assert counter is not None and (counter.month, counter.requests) == ("2026-12", 3) and b.unsaved() == {}
    b.record("flat", ONE, DEC + 1)
    assert b.unsaved() == {"flat": {"month": "2026-12", "requests": 1, "tokens": 120}}


def test_unsaved_counts_are_increments_over_what_the_store_had_and_survive_a_failed_save() -> None:
    """Each gateway sharing a store adds its own counts: it wrote its absolute count, so the last one to
    save overwrote the others', and after a restart the month's quota was granted again."""
    b = book(flat=FlatFeeChannel(max_requests_per_month=100))
    b.restore({"flat": {"month": "2026-11", "requests": 40, "tokens": 4000}})  # every instance's so far
    b.record("flat", ONE, NOV)
    first = b.unsaved()
    assert first == {"flat": {"month": "2026-11", "requests": 1, "tokens": 120}}
    b.record("flat", ONE, NOV + 1)  # counted while the first save was under way
    b.saved(first)
    assert b.unsaved() == {"flat": {"month": "2026-11", "requests": 1, "tokens": 120}}
    # A save that failed (nothing `saved`) is in the next increments.
    b.record("flat", ONE, NOV + 2)
    assert b.unsaved() == {"flat": {"month": "2026-11", "requests": 2, "tokens": 240}}


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


# $1 a request for the month's first two, $0.50 after.
PER_REQUEST = TieredPrice(
    tiers=(Tier(up_to=2, rate=1_000_000), Tier(up_to=None, rate=500_000)), meter="requests", per=1
)


def price_then_count(b: ChannelBook, upstream_id: str, usage: BillableUsage, at: float) -> int | None:
    """As the gateway does for a channel whose price depends on earlier requests: price, then count."""
    assert b.sequenced(upstream_id)
    micro = b.cost(MODEL, upstream_id, usage, at).micro
    b.record(upstream_id, usage, at)
    return micro


def test_a_tiered_channel_bills_by_cumulative_usage_in_the_month_and_across_a_restart() -> None:
    b = book(tiered=MeteredChannel(pricing=PER_REQUEST))
    assert [price_then_count(b, "tiered", ONE, NOV + i) for i in range(4)] == [1_000_000, 1_000_000, 500_000, 500_000]
    saved = b.unsaved()
    assert saved == {"tiered": {"month": "2026-11", "requests": 4, "tokens": 0}}
    restarted = book(tiered=MeteredChannel(pricing=PER_REQUEST))
    restarted.restore(saved)
    assert price_then_count(restarted, "tiered", ONE, NOV + 10) == 500_000
    assert price_then_count(restarted, "tiered", ONE, DEC) == 1_000_000  # a new month starts at the first tier

    by_tokens = TieredPrice(tiers=(Tier(up_to=150, rate=1_000_000), Tier(up_to=None, rate=0)), meter="total_tokens")
    b = book(tokens=MeteredChannel(pricing=by_tokens))
    # 120 tokens a request: the first all in tier 1, the second 30 in tier 1 and 90 free, then all free.
    assert [price_then_count(b, "tokens", ONE, NOV + i) for i in range(3)] == [120, 30, 0]
    assert not b.sequenced("nope")


@given(
    # Each request's start, in seconds from the month boundary (the last minute of November, the first of
    # December), and the order the requests finish in (a request finishes after it starts, in any order
    # with the others: a long November answer comes after December's first quick ones).
    st.lists(st.integers(-60, 59), min_size=1, max_size=8).flatmap(
        lambda starts: st.tuples(st.just(starts), st.permutations(range(len(starts))))
    ),
    st.integers(0, 3),
)
def test_a_request_across_the_month_boundary_is_priced_and_counted_in_the_month_it_started(
    requests: tuple[list[int], list[int]], counted_before: int
) -> None:
    """A tiered price's request that started in one month and finished in the next was priced on the old
    month's count but counted in the new one's: the new month's first requests were billed at the second tier.
    Each request is priced, and counted, in its start's month (its ledger row's and its budget's): its price
    is the tier after the requests of that month that finished before it."""
    starts, finishing_order = requests
    b = book(tiered=MeteredChannel(pricing=PER_REQUEST))
    for i in range(counted_before):  # November's requests before these
        price_then_count(b, "tiered", ONE, NOV + i)
    counted = {"2026-11": counted_before, "2026-12": 0}
    for request in finishing_order:
        at = DEC + starts[request]
        month = "2026-11" if at < DEC else "2026-12"
        expected = 1_000_000 if counted[month] < 2 else 500_000
        assert price_then_count(b, "tiered", ONE, at) == expected
        counted[month] += 1
    counter = b.counter("tiered")
    assert counter is not None
    assert counter.used(DEC) == (counted["2026-12"], 0)
    assert counter.used(DEC - 1) == (counted["2026-11"], 0)


def test_a_month_another_gateway_opened_leaves_this_ones_late_requests_in_the_month_before() -> None:
    """Another gateway sharing the store counted the new month's first request: this one's count moves on to it,
    and a request of its own that started before midnight is still priced after the old month's two."""
    b = book(tiered=MeteredChannel(pricing=PER_REQUEST))
    assert [price_then_count(b, "tiered", ONE, DEC - 60 + i) for i in range(2)] == [1_000_000] * 2
    b.saved(b.unsaved(), {"tiered": {"month": "2026-12", "requests": 1, "tokens": 0}}, now=DEC + 5)
    assert price_then_count(b, "tiered", ONE, DEC + 6) == 1_000_000  # December's second
    assert price_then_count(b, "tiered", ONE, DEC - 1) == 500_000  # November's third, answered in December
    counter = b.counter("tiered")
    assert counter is not None and (counter.month, counter.used(DEC), counter.used(DEC - 1)) == (
        "2026-12",
        (2, 0),
        (3, 0),
    )


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


def test_a_used_up_blocking_channel_blocks_even_while_it_could_not_serve_anyway() -> None:
    """A parked or unhealthy `block` channel whose quota is used up still keeps its traffic off metered
    upstreams: otherwise a 429 on it would quietly spill its traffic onto paid ones."""
    b = book(flat=FlatFeeChannel(max_requests_per_month=1, on_exhausted="block"), a=MeteredChannel())
    b.record("flat", ONE, NOV)
    kept, dropped, blocked = billing_filter([state("a")], b, NOV, unusable=[state("flat")])
    assert kept == [] and dropped == [("a", "blocked_by_billing")] and blocked is not None and "flat" in blocked

    pool = Pool()
    pool.replace([Upstream(id=name, kind="anthropic_api_key", base_url="http://mock") for name in ("flat", "a")])
    park(pool.get("flat").health, 100.0)  # type: ignore[union-attr]
    router = Router(pool, RoutingConfig(), billing=b, clock=lambda: NOV)
    with pytest.raises(RouteRefused) as refused:
        router.route(MODEL, 10.0)
    assert refused.value.status == 503
    # Quota left on the parked channel: nothing to block, the metered one serves.
    spare = book(flat=FlatFeeChannel(max_requests_per_month=1, on_exhausted="block"), a=MeteredChannel())
    decision = Router(pool, RoutingConfig(), billing=spare, clock=lambda: NOV).route(MODEL, 10.0)
    assert [state.upstream.id for state in decision.order] == ["a"]


def test_a_used_up_block_channel_makes_accounts_unusable_only_for_the_models_it_serves() -> None:
    """What the admin API, the metrics and /readyz report is what routing does per model: a metered key is
    blocked only when every model it serves is one the used-up `block` channel serves too (and no flat-fee
    capacity serving it is left: a spare one for Sonnet does not unblock Opus)."""
    b = book(
        flat=FlatFeeChannel(max_requests_per_month=1, on_exhausted="block"),
        spare=FlatFeeChannel(),
        opus=MeteredChannel(),
        anything=MeteredChannel(),
    )
    b.record("flat", ONE, NOV)
    models = {"flat": ("claude-opus-*",), "spare": ("claude-sonnet-*",), "opus": ("claude-opus-5",), "anything": ()}
    pool = Pool()
    pool.replace(
        [
            Upstream(id=name, kind="anthropic_api_key", base_url="http://mock", models=globs)
            for name, globs in models.items()
        ]
    )
    router = Router(pool, RoutingConfig(), billing=b, clock=lambda: NOV)
    assert router.unusable_accounts(10.0) == {
        "flat": "insufficient_quota",
        "spare": None,
        "opus": "blocked_by_billing",
        "anything": None,
    }
    # For one model (a keepalive's), as a request for it is routed.
    assert router.unusable_accounts(10.0, "claude-opus-5")["anything"] == "blocked_by_billing"
    assert router.unusable_accounts(10.0, MODEL)["anything"] is None


def test_an_account_whose_globs_name_no_model_as_written_is_blocked_with_the_rest() -> None:
    """`claude-[so]*` matches no model name written as a glob, itself included: such a metered key was
    reported usable (and /readyz ready) while a used-up `block` channel serving every model refused all its
    requests."""
    b = book(flat=FlatFeeChannel(max_requests_per_month=1, on_exhausted="block"), classy=MeteredChannel())
    b.record("flat", ONE, NOV)
    pool = Pool()
    pool.replace(
        [
            Upstream(id="flat", kind="anthropic_api_key", base_url="http://mock"),
            Upstream(id="classy", kind="anthropic_api_key", base_url="http://mock", models=("claude-[so]*",)),
        ]
    )
    router = Router(pool, RoutingConfig(), billing=b, clock=lambda: NOV)
    assert router.unusable_accounts(10.0) == {"flat": "insufficient_quota", "classy": "blocked_by_billing"}


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
    scores = score_candidates(candidates, None, 0.0, Weights.of(ScoreWeights()), now_wall=NOV, billing=b, model=MODEL)
    assert scores[0].terms["metered"] > 0 and scores[1].terms["metered"] == 0 == scores[2].terms["metered"]
    b.record("flat", ONE, NOV)
    assert not is_paid_for(candidates[1], b, NOV)


def scored(b: ChannelBook, *names: str) -> list[CandidateScore]:
    """The scores of the accounts `names`, in order, with the default weights, on `b`'s prices."""
    return score_candidates(
        [state(name) for name in names], None, 0.0, Weights.of(ScoreWeights()), now_wall=NOV, billing=b, model=MODEL
    )


def test_the_cost_term_prefers_the_cheaper_metered_upstream() -> None:
    catalogue = Catalogue.load_default().with_overrides(upstreams={"dear": {"*": {"input": "9", "output": "45"}}})
    b = ChannelBook(catalogue)
    b.configure({"cheap": MeteredChannel(), "dear": MeteredChannel(), "flat": FlatFeeChannel()}, ["dear"])
    assert b.priced_by_upstream
    scores = scored(b, "cheap", "dear", "flat")
    assert (
        scores[0].terms["cost"] == 0 and scores[1].terms["cost"] == ScoreWeights().cost and scores[2].terms["cost"] == 0
    )
    same = book(a=MeteredChannel(), b=MeteredChannel())
    assert not same.priced_by_upstream  # nothing to compare: the term is not even computed


def test_the_cost_term_compares_only_prices_in_usd() -> None:
    """0.3 credits per Mtok is no cheaper than $3 list price: the numbers are of different currencies. A
    price in another currency is unknown to routing, as to budgets."""
    credits = CreditsPrice(per_mtok_input=300_000, per_mtok_output=1_500_000)
    yen = PerTokenPrice.of(450_000_000, 2_250_000_000, currency="JPY")
    b = book(listed=MeteredChannel(), credits=MeteredChannel(pricing=credits), yen=MeteredChannel(pricing=yen))
    assert b.unit_cost(MODEL, "listed") is not None
    assert b.unit_cost(MODEL, "credits") is None and b.unit_cost(MODEL, "yen") is None
    scores = scored(b, "credits", "listed", "yen")
    assert [score.terms["cost"] for score in scores] == [ScoreWeights().cost, 0.0, ScoreWeights().cost]
    # Without a USD price to compare with, there is no cost term: the routing strategy decides.
    assert cost_terms([state("credits"), state("yen")], [False, False], b, MODEL) is None


def test_a_budget_estimate_bounds_the_cost_on_every_upstream_serving_the_model() -> None:
    """Budgets reserve an upper bound before routing. At list price only, a tiered channel at $1 a request
    took 30 requests on a $0.10 budget ($16.50); a model without a list price but with an upstream's price
    override was admitted without any reservation. Upstreams that do not serve the model do not count (one
    dear niche channel must not make every request of every model reserve its price)."""
    per_request = TieredPrice(tiers=(Tier(up_to=None, rate=1_000_000),), meter="requests", per=1)
    b = book(tiered=MeteredChannel(pricing=per_request), listed=MeteredChannel(), flat=FlatFeeChannel())
    listed = b.estimate(MODEL, 1_000, 100, None, NOV, serving=("listed", "flat"))
    assert listed is not None and listed < 1_000_000
    assert b.estimate(MODEL, 1_000, 100, None, NOV, serving=("listed", "tiered")) == 1_000_000
    credits = PerTokenPrice.of(10**9, 10**9, currency="credits", version="c")
    assert (
        book(credits=MeteredChannel(pricing=credits)).estimate(MODEL, 1_000, 100, None, NOV, serving=("credits",))
        == listed
    )
    overrides = PriceOverrides.model_validate({"upstreams": {"pricey": {"*": {"input": "30", "output": "150"}}}})
    overridden = ChannelBook(Catalogue.from_config(overrides))
    overridden.configure({"pricey": MeteredChannel(), "plain": MeteredChannel()}, priced_upstreams=["pricey"])
    unpriced = "claude-unpriced-9"
    assert overridden.estimate(unpriced, 1_000, 100, None, NOV, serving=("pricey", "plain")) == 1_000 * 30 + 100 * 150
    assert overridden.estimate(unpriced, 1_000, 100, None, NOV, serving=("plain",)) is None


def test_a_model_is_covered_only_by_a_price_for_it_wherever_it_is_served() -> None:
    """An upstream's price override for one model made every model it serves count as priced: a budgeted
    caller then ran an unlisted model for free on it. A flat fee covers whatever the upstream serves, but
    not what another upstream serving the model leaves unpriced: that one takes the request when the flat-fee
    account is out (its cost unknown, the budget was charged nothing)."""
    unlisted = "claude-unpriced-9"
    catalogue = Catalogue.load_default().with_overrides(
        upstreams={
            "one": {"claude-haiku-4-5": {"input": "1", "output": "5"}},
            "every": {"*": {"input": "9", "output": "45"}},
        }
    )
    b = ChannelBook(catalogue)
    b.configure({"one": MeteredChannel(), "every": MeteredChannel(), "flat": FlatFeeChannel()}, ["one", "every"])
    assert b.covers(MODEL, NOV, ())  # the catalogue's list price
    assert not b.covers(unlisted, NOV, ("one",))
    assert b.covers(unlisted, NOV, ("every",)) and b.covers(unlisted, NOV, ("flat",))
    assert b.covers(unlisted, NOV, ("flat", "every"))
    assert not b.covers(unlisted, NOV, ("one", "every")) and not b.covers(unlisted, NOV, ("flat", "one"))
    assert not b.covers(unlisted, NOV, ())  # nothing serves it


def test_a_flat_fee_covers_a_model_until_its_month_is_used_up_and_metered_upstreams_take_over() -> None:
    """Used up with `fallback_to_metered`, metered upstreams serve the model at an unknown cost: no cover.
    Used up with `block`, nothing metered serves it (a 503 until the month ends): still covered."""
    unlisted = "claude-unpriced-9"
    fallback = book(flat=FlatFeeChannel(max_requests_per_month=1), flat2=FlatFeeChannel())
    blocking = book(flat=FlatFeeChannel(max_requests_per_month=1, on_exhausted="block"))
    assert fallback.covers(unlisted, NOV, ("flat",)) and blocking.covers(unlisted, NOV, ("flat",))
    fallback.record("flat", ONE, NOV)
    blocking.record("flat", ONE, NOV)
    assert not fallback.covers(unlisted, NOV, ("flat",)) and fallback.covers(unlisted, DEC, ("flat",))
    assert fallback.covers(unlisted, NOV, ("flat", "flat2")), "the used-up one serves nothing; the other covers"
    assert blocking.covers(unlisted, NOV, ("flat",))


# An answer that consulted an advisor on Opus 4.6.
ADVISED = BillableUsage(
    input_tokens=100, output_tokens=20, advisors=(ModelUsage("claude-opus-4-6", BillableUsage(1000, 200, requests=0)),)
)


def test_an_advisor_is_priced_at_its_models_list_price_wherever_its_own_is_not_known() -> None:
    """At the catalogue: the request's tokens at its model's price, the advisor's at its model's. Paid by the
    month: nothing, as the rest. On a channel with a pricing model of its own (which prices its traffic, not
    another model's list price): unknown, never nothing."""
    listed = Catalogue.load_default()
    b = book(
        flat=FlatFeeChannel(),
        own=MeteredChannel(pricing=PerTokenPrice.of(1_000_000, 2_000_000)),
        listed=MeteredChannel(),
    )
    own, advisor = listed.cost(MODEL, ONE).micro_usd, listed.cost("claude-opus-4-6", BillableUsage(1000, 200)).micro_usd
    assert own is not None and advisor is not None
    assert b.cost(MODEL, "listed", ADVISED, NOV).micro == own + advisor
    assert b.cost(MODEL, "flat", ADVISED, NOV).micro == 0
    assert b.cost(MODEL, "own", ADVISED, NOV).micro is None
    assert b.cost(MODEL, "own", ONE, NOV).micro == 140


def test_a_flat_fee_token_quota_counts_an_advisors_tokens() -> None:
    b = book(flat=FlatFeeChannel(max_tokens_per_month=10_000))
    b.record("flat", ADVISED, NOV)
    counter = b.counter("flat")
    assert counter is not None and counter.tokens == 120 + 1200


def test_a_compaction_is_priced_at_the_rates_its_own_prompts_size_picks() -> None:
    """A long-context price re-prices a request whose prompt passes its threshold: a compaction and the request
    after it are two prompts (Haiku 5.5: above 100,000 tokens), not one of their sum."""
    listed = Catalogue.load_default()
    compaction = BillableUsage(90_000, 2_000, requests=0)
    request = BillableUsage(20_000, 500)
    together = BillableUsage(110_000, 2_500, compaction=compaction)
    apart = sum(listed.cost("claude-haiku-5-5", usage).micro_usd or 0 for usage in (compaction, request))
    assert book(listed=MeteredChannel()).cost("claude-haiku-5-5", "listed", together, NOV).micro == apart > 0
    one_prompt = listed.cost("claude-haiku-5-5", BillableUsage(110_000, 2_500)).micro_usd
    assert one_prompt is not None and one_prompt > apart

"""Pricing models: exact integer money, one rounding step, and the properties each model promises."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from poolgate.billing.catalogue import Catalogue
from poolgate.billing.config import PricingConfig, to_micro
from poolgate.billing.pricing import (
    CharPrice,
    CreditsPrice,
    DurationPrice,
    ImagePrice,
    LongContext,
    PerTokenPrice,
    PriceUnknown,
    Tier,
    TieredPrice,
    TokenRates,
    cost_of_usage,
    estimate_max_cost,
    pico_of_billable,
    pico_of_usage,
    round_half_up,
)
from poolgate.billing.values import BillableUsage, ImageCount

FAST = settings(max_examples=75, deadline=None)
TOKENS = st.integers(min_value=0, max_value=2_000_000)
RATE = st.integers(min_value=0, max_value=100_000_000)  # up to $100 per Mtok, in µ per Mtok
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_5m",
    "cache_creation_1h",
    "cache_read",
    "thinking_tokens",
)
SONNET_4_5 = PerTokenPrice.of(3_000_000, 15_000_000, 3_750_000, 6_000_000, 300_000)


@st.composite
def token_rates(draw: st.DrawFn, floor: TokenRates | None = None) -> TokenRates:
    names = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read", "thinking")
    low = {n: getattr(floor, n) if floor else 0 for n in names}
    return TokenRates(**{n: draw(st.integers(min_value=low[n], max_value=low[n] + 100_000_000)) for n in names})


@st.composite
def per_token_prices(draw: st.DrawFn, per_request: bool = True) -> PerTokenPrice:
    base = draw(token_rates())
    long_context = None
    if draw(st.booleans()):
        long_context = LongContext(draw(st.integers(0, 300_000)), draw(token_rates(floor=base)))
    fee = draw(st.integers(0, 50_000)) if per_request else 0
    search_fee = draw(st.integers(0, 50_000))
    return PerTokenPrice(rates=base, per_request=fee, per_web_search=search_fee, long_context=long_context)


usages = st.builds(
    BillableUsage,
    input_tokens=TOKENS,
    output_tokens=TOKENS,
    cache_creation_5m=TOKENS,
    cache_creation_1h=TOKENS,
    cache_read=TOKENS,
    thinking_tokens=TOKENS,
    requests=st.integers(0, 3),
    web_searches=st.integers(0, 20),
)


def exact(price: PerTokenPrice, u: BillableUsage) -> Fraction:
    return Fraction(
        pico_of_usage(
            price,
            u.input_tokens,
            u.output_tokens,
            u.cache_creation_5m,
            u.cache_creation_1h,
            u.cache_read,
            u.thinking_tokens,
            u.requests,
            u.web_searches,
        ),
        1_000_000,
    )


# ------------------------------------------------------------------------------------------- rounding


def test_each_web_search_costs_its_fee_on_top_of_the_tokens() -> None:
    """Anthropic's server-side web search: $10 per 1,000 searches, whatever the model."""
    tokens = BillableUsage(input_tokens=1_000, output_tokens=200)
    searched = BillableUsage(input_tokens=1_000, output_tokens=200, web_searches=3)
    price = Catalogue.load_default().price_for("claude-sonnet-4-5")
    assert price is not None and price.per_web_search == 10_000
    assert price.cost(searched) - price.cost(tokens) == 30_000
    assert price.breakdown(searched)["web_search"] == 30_000 * 1_000_000
    assert (
        BillableUsage.from_anthropic({"input_tokens": 5, "server_tool_use": {"web_search_requests": 2}}).web_searches
        == 2
    )


def test_round_half_up_rounds_halves_up_and_everything_else_to_nearest() -> None:
    assert [round_half_up(n, 10) for n in (0, 4, 5, 6, 14, 15, 25)] == [0, 0, 1, 1, 1, 2, 3]


@given(st.integers(min_value=0, max_value=10**30), st.integers(min_value=1, max_value=10**15))
def test_round_half_up_is_the_exact_quotient_rounded_halves_up(numerator: int, denominator: int) -> None:
    """Far past a machine word too: a cost in pico-units of a long month's traffic is no small integer."""
    exact = Fraction(numerator, denominator)
    rounded = round_half_up(numerator, denominator)
    assert rounded - Fraction(1, 2) <= exact < rounded + Fraction(1, 2)


def test_a_known_request_costs_the_hand_computed_amount() -> None:
    # 1k input × $3 + 500 output × $15 + 10k cache reads × $0.30 + 2k 5m writes × $3.75, per Mtok.
    micro = cost_of_usage(SONNET_4_5, 1000, 500, 2000, 0, 10_000)
    assert micro == 3000 + 7500 + 3000 + 7500
    assert isinstance(micro, int)


def test_half_a_micro_unit_rounds_up_just_below_rounds_down() -> None:
    assert cost_of_usage(PerTokenPrice.of(500_000, 0), 1, 0, 0, 0, 0) == 1
    assert cost_of_usage(PerTokenPrice.of(499_999, 0), 1, 0, 0, 0, 0) == 0


@FAST
@given(per_token_prices(), usages)
def test_one_request_is_within_half_a_micro_unit_of_the_exact_cost(price: PerTokenPrice, u: BillableUsage) -> None:
    micro = price.cost(u)
    assert isinstance(micro, int)
    assert abs(micro - exact(price, u)) <= Fraction(1, 2)


@FAST
@given(per_token_prices(), st.lists(usages, min_size=1, max_size=30))
def test_summed_request_costs_never_drift_more_than_one_micro_unit_per_request(
    price: PerTokenPrice, batch: list[BillableUsage]
) -> None:
    billed = sum(price.cost(u) for u in batch)
    truth = sum((exact(price, u) for u in batch), Fraction(0))
    assert abs(billed - truth) <= Fraction(len(batch), 2)


# ------------------------------------------------------------------------------------------ per token


@FAST
@given(per_token_prices(per_request=False))
def test_zero_usage_costs_zero(price: PerTokenPrice) -> None:
    assert cost_of_usage(price, 0, 0, 0, 0, 0) == 0
    assert price.cost(BillableUsage()) == 0


@FAST
@given(per_token_prices(), usages, st.sampled_from((*TOKEN_FIELDS, "web_searches")), st.integers(1, 500_000))
def test_cost_is_monotone_in_every_token_count(price: PerTokenPrice, u: BillableUsage, name: str, more: int) -> None:
    fields = (*TOKEN_FIELDS, "requests", "web_searches")
    bigger = BillableUsage(**{**{f: getattr(u, f) for f in fields}, name: getattr(u, name) + more})
    assert price.cost(bigger) >= price.cost(u)


@FAST
@given(per_token_prices(), usages)
def test_breakdown_adds_up_to_the_exact_total(price: PerTokenPrice, u: BillableUsage) -> None:
    assert sum(price.breakdown(u).values()) == exact(price, u) * 1_000_000


@FAST
@given(
    per_token_prices(),
    usages,
    st.booleans(),
    st.booleans(),
    st.integers(100, 10_000),
    st.integers(100, 10_000),
)
def test_a_premium_multiplies_the_token_rates_and_not_the_fees(
    price: PerTokenPrice, u: BillableUsage, fast: bool, us_only: bool, fast_percent: int, us_only_percent: int
) -> None:
    """Fast mode (6× on Opus 4.6) and US-only inference (1.1×) bill every token rate at the price's premium for
    them, a request's fee and a web search's as they are; the breakdown still adds up, to a pico-unit a token
    part."""
    price = replace(price, fast_percent=fast_percent, us_only_percent=us_only_percent)
    premium = msgspec.structs.replace(u, fast=fast, us_only=us_only)
    tokens = pico_of_billable(price, msgspec.structs.replace(u, requests=0, web_searches=0))
    fees = pico_of_billable(price, u) - tokens
    percents = (fast_percent if fast else 100) * (us_only_percent if us_only else 100)
    expected = tokens * percents // 10_000 + fees
    assert pico_of_billable(price, premium) == expected
    assert 0 <= expected - sum(price.breakdown(premium).values()) <= 6
    read = BillableUsage.from_anthropic(
        {"input_tokens": 1, "speed": "fast" if fast else "standard", "inference_geo": "us" if us_only else "global"}
    )
    assert (read.fast, read.us_only) == (fast, us_only)


@FAST
@given(per_token_prices(), usages, st.sampled_from([(True, False), (False, True), (True, True)]))
def test_a_mode_whose_premium_the_price_does_not_name_has_an_unknown_cost(
    price: PerTokenPrice, u: BillableUsage, modes: tuple[bool, bool]
) -> None:
    """Never the plain rates for a fast turn on a price that does not say what fast mode costs (Opus 4.8's is
    not 4.6's): unknown, as an unpriced model is."""
    fast, us_only = modes
    price = replace(price, fast_percent=None if fast else 600, us_only_percent=None if us_only else 110)
    with pytest.raises(PriceUnknown):
        pico_of_billable(price, msgspec.structs.replace(u, fast=fast, us_only=us_only))


def test_the_catalogue_says_the_premiums_it_knows() -> None:
    """Fast mode is 6× on Opus 4.6 and 4.7 and unknown elsewhere; US-only inference 1.1× from the 4.6 models on."""
    catalogue = Catalogue.load_default()
    premiums = {
        model: (price.fast_percent, price.us_only_percent)
        for model in ("claude-opus-4-6", "claude-opus-4-7", "claude-opus-4-8", "claude-sonnet-4-6", "claude-sonnet-4-5")
        if (price := catalogue.price_for(model)) is not None
    }
    assert premiums == {
        "claude-opus-4-6": (600, 110),
        "claude-opus-4-7": (600, 110),
        "claude-opus-4-8": (None, 110),
        "claude-sonnet-4-6": (None, 110),
        "claude-sonnet-4-5": (None, None),
    }


def test_thinking_defaults_to_the_output_rate_and_cache_rates_to_input() -> None:
    price = PerTokenPrice.of(1_000_000, 5_000_000)
    assert price.rates.thinking == 5_000_000
    assert price.rates.cache_read == price.rates.cache_write_1h == 1_000_000


def test_per_request_fee_is_charged_per_request() -> None:
    price = PerTokenPrice.of(0, 0, per_request=10_000)
    assert cost_of_usage(price, 0, 0, 0, 0, 0, requests=3) == 30_000


def test_long_context_reprices_the_whole_request_only_above_the_threshold() -> None:
    base = TokenRates(100_000, 500_000, 125_000, 200_000, 10_000, 500_000)
    long = TokenRates(500_000, 2_500_000, 625_000, 1_000_000, 50_000, 2_500_000)
    price = PerTokenPrice(rates=base, long_context=LongContext(100_000, long))
    at_threshold = BillableUsage(input_tokens=60_000, cache_read=40_000, output_tokens=1_000)
    above = BillableUsage(input_tokens=60_001, cache_read=40_000, output_tokens=1_000)
    assert price.cost(at_threshold) == round_half_up(60_000 * 100_000 + 40_000 * 10_000 + 1_000 * 500_000, 10**6)
    assert price.cost(above) == round_half_up(60_001 * 500_000 + 40_000 * 50_000 + 1_000 * 2_500_000, 10**6)


def test_long_context_rates_below_the_base_are_refused() -> None:
    base = TokenRates(2, 2, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="long-context"):
        PerTokenPrice(rates=base, long_context=LongContext(10, TokenRates(1, 2, 2, 2, 2, 2)))


def test_negative_or_non_integer_rates_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenRates(-1, 0, 0, 0, 0, 0)
    # (A TypeError where the class is compiled, see setup.py: mypyc checks an `int` field's type itself.)
    with pytest.raises((ValueError, TypeError)):
        TokenRates(1.5, 0, 0, 0, 0, 0)  # type: ignore[arg-type]


@FAST
@given(
    per_token_prices(),
    st.integers(0, 400_000),
    st.integers(0, 64_000),
    st.data(),
)
def test_estimate_with_1h_writes_bounds_any_split_of_the_prompt(
    price: PerTokenPrice, prompt: int, max_tokens: int, data: st.DataObject
) -> None:
    # Anthropic's rate order (1h write ≥ 5m write ≥ input ≥ read) makes the all-1h-writes prompt the worst case.
    r = price.rates
    ordered = TokenRates(r.input, r.output, r.input + 1, r.input + 2, r.input // 10, r.output)
    lc = price.long_context
    if lc is not None:
        lr = lc.rates
        lc = LongContext(
            lc.above_prompt_tokens,
            TokenRates(lr.input, lr.output, lr.input + 1, lr.input + 2, r.input // 10, lr.output),
        )
    price = PerTokenPrice(rates=ordered, per_request=price.per_request, long_context=lc)
    cuts = sorted(data.draw(st.lists(st.integers(0, prompt), min_size=3, max_size=3)))
    parts = [cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1], prompt - cuts[2]]
    output = data.draw(st.integers(0, max_tokens))
    actual = cost_of_usage(price, parts[0], output, parts[1], parts[2], parts[3])
    assert estimate_max_cost(price, prompt, max_tokens, cache_write_ttl="1h") >= actual
    assert estimate_max_cost(price, prompt, max_tokens) >= cost_of_usage(
        price, prompt - parts[3], output, 0, 0, parts[3]
    )


def test_estimate_is_prompt_as_input_plus_max_tokens_as_output() -> None:
    assert estimate_max_cost(SONNET_4_5, 10_000, 1_000) == 30_000 + 15_000
    assert estimate_max_cost(SONNET_4_5, 10_000, 1_000, cache_write_ttl="5m") == 37_500 + 15_000


def test_usage_from_anthropic_keeps_every_cache_write() -> None:
    split = {
        "input_tokens": 10,
        "output_tokens": 20,
        "cache_creation_input_tokens": 300,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "cache_read_input_tokens": 40,
    }
    u = BillableUsage.from_anthropic(split)
    assert (u.input_tokens, u.output_tokens, u.cache_creation_5m, u.cache_creation_1h, u.cache_read) == (
        10,
        20,
        100,
        200,
        40,
    )
    unsplit = BillableUsage.from_anthropic({"cache_creation_input_tokens": 300, "input_tokens": "x"})
    assert (unsplit.cache_creation_5m, unsplit.cache_creation_1h, unsplit.input_tokens) == (300, 0, 0)


# ---------------------------------------------------------------------------------------------- credits


@FAST
@given(RATE, RATE, st.integers(0, 10_000_000), st.integers(0, 50_000), usages)
def test_credits_charge_tokens_and_each_request(
    per_in: int, per_out: int, per_req: int, per_search: int, u: BillableUsage
) -> None:
    price = CreditsPrice(per_mtok_input=per_in, per_mtok_output=per_out, per_request=per_req, per_web_search=per_search)
    tokens_only = BillableUsage(**{f: getattr(u, f) for f in TOKEN_FIELDS}, requests=0)
    # Whole µ fees never round.
    assert price.cost(u) - price.cost(tokens_only) == u.requests * per_req + u.web_searches * per_search
    assert price.cost(BillableUsage(requests=0)) == 0
    more = msgspec.structs.replace(u, requests=u.requests + 1)
    assert price.cost(more) == price.cost(u) + per_req


def test_credits_known_value() -> None:
    price = CreditsPrice(per_mtok_input=2_000_000, per_mtok_output=8_000_000, per_request=1_000)
    assert price.cost(BillableUsage(input_tokens=1_000_000, output_tokens=500_000, requests=2)) == 6_002_000


# ------------------------------------------------------------------------------------------ characters


multipliers = st.decimals(min_value=0, max_value=20, places=3).map(lambda d: Fraction(d))


@FAST
@given(RATE, multipliers, st.integers(0, 5_000_000), st.integers(0, 5_000_000))
def test_char_output_costs_the_multiplier_times_input(rate: int, mult: Fraction, chars_in: int, chars_out: int) -> None:
    price = CharPrice(per_mchar=rate, output_multiplier=mult)
    micro = price.cost(BillableUsage(input_chars=chars_in, output_chars=chars_out))
    assert isinstance(micro, int)
    assert abs(micro - Fraction(chars_in * rate, 10**6) - Fraction(chars_out * rate, 10**6) * mult) <= Fraction(1, 2)
    if mult == 1:
        assert price.cost(BillableUsage(output_chars=chars_out)) == price.cost(BillableUsage(input_chars=chars_out))


def test_char_multiplier_from_config_stays_exact() -> None:
    price = TypeAdapter(PricingConfig).validate_python(
        {"kind": "char", "per_million_chars": "16", "output_multiplier": "1.5"}
    )
    built = price.build()
    assert isinstance(built, CharPrice)
    assert built.output_multiplier == Fraction(3, 2)
    assert built.cost(BillableUsage(output_chars=1_000_000)) == 24_000_000


# -------------------------------------------------------------------------------------------- per unit


RESOLUTIONS = ("1024x1024", "1024x1536", "1536x1024")
QUALITIES = ("low", "medium", "high")
image_table = st.fixed_dictionaries({(r, q): st.integers(0, 500_000) for r in RESOLUTIONS for q in QUALITIES})
image_lists = st.lists(
    st.builds(ImageCount, st.sampled_from(RESOLUTIONS), st.sampled_from(QUALITIES), st.integers(0, 10)), max_size=8
)


@FAST
@given(image_table, image_lists)
def test_images_cost_their_rate_by_resolution_and_quality(
    table: dict[tuple[str, str], int], images: list[ImageCount]
) -> None:
    price = ImagePrice(per_image=table)
    assert price.cost(BillableUsage(images=tuple(images))) == sum(
        i.count * table[i.resolution, i.quality] for i in images
    )


def test_an_unpriced_image_size_is_unknown_not_free() -> None:
    price = ImagePrice(per_image={("1024x1024", "standard"): 40_000})
    with pytest.raises(PriceUnknown):
        price.cost(BillableUsage(images=(ImageCount("1024x1024", "hd"),)))


@FAST
@given(st.integers(0, 10_000_000), st.sampled_from([1, 1000, 60_000]), st.integers(0, 7_200_000))
def test_duration_rounds_up_to_the_increment_then_prices_per_minute(per_minute: int, increment: int, ms: int) -> None:
    price = DurationPrice(per_minute=per_minute, increment_ms=increment)
    billed = price.billed_ms(ms)
    assert billed % increment == 0 and ms <= billed < ms + increment
    micro = price.cost(BillableUsage(duration_ms=ms))
    assert abs(micro - Fraction(billed * per_minute, 60_000)) <= Fraction(1, 2)
    assert price.cost(BillableUsage(duration_ms=ms + 1)) >= micro


def test_duration_known_values() -> None:
    per_second = DurationPrice(per_minute=6_000, increment_ms=1000)  # $0.006 per minute
    assert per_second.cost(BillableUsage(duration_ms=1)) == 100  # one started second
    assert per_second.cost(BillableUsage(duration_ms=60_000)) == 6_000


# ---------------------------------------------------------------------------------------------- tiered


@st.composite
def tiered_prices(draw: st.DrawFn) -> TieredPrice:
    bounds = sorted(draw(st.sets(st.integers(1, 5_000), min_size=0, max_size=4)))
    rates = draw(st.lists(RATE, min_size=len(bounds) + 1, max_size=len(bounds) + 1))
    tiers = tuple(Tier(up_to=b, rate=r) for b, r in zip([*bounds, None], rates, strict=True))
    return TieredPrice(tiers=tiers, per=draw(st.sampled_from([1, 1000, 1_000_000])))


@FAST
@given(tiered_prices())
def test_an_inclusive_upper_bound_uses_its_tier_and_one_above_uses_the_next(price: TieredPrice) -> None:
    for i, tier in enumerate(price.tiers[:-1]):
        assert tier.up_to is not None
        assert price.tier_index(tier.up_to) == i
        assert price.tier_index(tier.up_to + 1) == i + 1
        # The unit at the bound costs this tier's rate; the next unit the next tier's.
        assert price.cumulative_exact(tier.up_to) - price.cumulative_exact(tier.up_to - 1) == tier.rate
        assert price.cumulative_exact(tier.up_to + 1) - price.cumulative_exact(tier.up_to) == price.tiers[i + 1].rate


@FAST
@given(tiered_prices(), st.integers(0, 20_000))
def test_cumulative_cost_is_the_sum_of_per_tier_slices(price: TieredPrice, quantity: int) -> None:
    slices = price.slices(quantity)
    assert sum(slices) == quantity and all(s >= 0 for s in slices)
    by_unit = sum(price.tiers[price.tier_index(n)].rate for n in range(1, min(quantity, 300) + 1))
    assert price.cumulative_exact(min(quantity, 300)) == by_unit
    assert price.cumulative_exact(quantity) == sum(s * t.rate for s, t in zip(slices, price.tiers, strict=True))


@FAST
@given(tiered_prices(), st.lists(st.integers(0, 3_000), max_size=12))
def test_tiered_requests_over_a_period_add_up_exactly_to_the_cumulative_cost(
    price: TieredPrice, quantities: list[int]
) -> None:
    used = 0
    total = 0
    for q in quantities:
        micro = price.cost_of_quantity(q, already_used=used)
        assert isinstance(micro, int) and micro >= 0
        total += micro
        used += q
    assert total == price.cumulative_cost(used)  # no rounding drift at all


def test_tiered_meters_the_configured_quantity() -> None:
    price = TieredPrice(tiers=(Tier(2, 10), Tier(None, 1)), meter="requests", per=1)
    assert price.cost(BillableUsage(requests=3)) == 21
    assert price.cost(BillableUsage(requests=1), already_used=2) == 1


@pytest.mark.parametrize(
    "tiers",
    [
        (),
        (Tier(10, 1),),
        (Tier(None, 1), Tier(None, 1)),
        (Tier(10, 1), Tier(10, 1), Tier(None, 1)),
        (Tier(0, 1), Tier(None, 1)),
    ],
)
def test_malformed_tiers_are_refused(tiers: tuple[Tier, ...]) -> None:
    with pytest.raises(ValueError):
        TieredPrice(tiers=tiers)


# ------------------------------------------------------------------------------------------ web searches


MONEY = st.decimals(min_value=0, max_value=50, places=6)


@st.composite
def pricing_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A channel price of any model as configured, in USD or another currency, naming a `web_search` or not."""
    rate, other = draw(MONEY), draw(MONEY)
    raw = draw(
        st.sampled_from(
            [
                {"kind": "per_token", "input": rate, "output": rate},
                {"kind": "credits", "per_mtok_input": rate, "per_mtok_output": rate, "per_request": rate},
                {"kind": "char", "per_million_chars": rate},
                {"kind": "per_unit", "per_minute": rate},
                {"kind": "per_unit", "images": {"1024x1024": {"low": rate}}},
                {"kind": "tiered", "tiers": [{"up_to": 1000, "rate": rate}, {"rate": other}]},
            ]
        )
    )
    raw["currency"] = draw(st.sampled_from(["USD", "EUR", "credits"]))
    if draw(st.booleans()):
        raw["web_search"] = draw(MONEY)
    return raw


@FAST
@given(pricing_configs(), usages, st.integers(1, 20), st.integers(0, 5_000))
def test_every_pricing_model_bills_each_web_search_and_never_as_free(
    raw: dict[str, Any], u: BillableUsage, searches: int, used: int
) -> None:
    """Searches cost nothing on credits, tiered and per-unit channels. Each costs the price's `web_search`,
    $0.01 for a USD price that names none; a price in another currency that names none does not know what a
    search costs there (unknown, never 0, nor $0.01 taken for 0.01 of its currency)."""
    price = TypeAdapter(PricingConfig).validate_python(raw).build()
    plain, searched = msgspec.structs.replace(u, web_searches=0), msgspec.structs.replace(u, web_searches=searches)
    if "web_search" not in raw and raw["currency"] != "USD":
        with pytest.raises(PriceUnknown):
            price.cost(searched, already_used=used)
        assert price.cost(plain, already_used=used) >= 0
        return
    per_search = to_micro(raw["web_search"]) if "web_search" in raw else 10_000
    assert price.cost(searched, already_used=used) - price.cost(plain, already_used=used) == searches * per_search


# ---------------------------------------------------------------------------------------------- config


def test_money_finer_than_a_micro_unit_is_refused_not_rounded() -> None:
    assert to_micro(Decimal("0.275")) == 275_000
    with pytest.raises(ValueError, match="6 decimal places"):
        to_micro(Decimal("0.0000001"))


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ({"kind": "per_token", "input": 3, "output": "15"}, "per_token"),
        ({"kind": "credits", "per_mtok_input": 1, "per_mtok_output": 2, "per_request": "0.5"}, "credits"),
        ({"kind": "per_unit", "per_minute": "0.006", "increment_seconds": 1}, "per_unit"),
        ({"kind": "per_unit", "images": {"1024x1024": {"low": "0.011", "high": "0.167"}}}, "per_unit"),
        ({"kind": "tiered", "tiers": [{"up_to": 1000000, "rate": 3}, {"rate": 2}]}, "tiered"),
    ],
)
def test_every_pricing_model_builds_from_config(raw: dict[str, object], kind: str) -> None:
    assert TypeAdapter(PricingConfig).validate_python(raw).build().kind == kind


def test_per_unit_config_needs_exactly_one_unit() -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(PricingConfig).validate_python({"kind": "per_unit"})


def test_a_requests_duration_is_rounded_up_before_a_duration_price_is_applied() -> None:
    """A request that took 0.98 ms was billed 0 ms (truncated), free on a per-minute channel."""
    from types import SimpleNamespace

    from poolgate.lifecycle.accounting import elapsed_ms

    started = SimpleNamespace(started=100.0)
    assert elapsed_ms(started, 100.00098) == 1  # type: ignore[arg-type]
    assert elapsed_ms(started, 101.0004) == 1001  # type: ignore[arg-type]
    assert DurationPrice(per_minute=600_000, increment_ms=1000).billed_ms(elapsed_ms(started, 100.00098)) == 1000  # type: ignore[arg-type]

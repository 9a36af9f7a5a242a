"""The shipped price catalogue: every listed price, id resolution, dated rows, overrides, unknown models."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from poolgate.billing.catalogue import Catalogue, CatalogueError, newest_aliases
from poolgate.billing.config import PriceOverrides
from poolgate.billing.pricing import PerTokenPrice, TokenRates
from poolgate.billing.values import BillableUsage

FAST = settings(max_examples=60, deadline=None)
M = 1_000_000
AFTER = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
BEFORE = datetime(2026, 9, 1, tzinfo=UTC).timestamp()

# prices.md, transcribed by hand: (input, cache write 5m, cache write 1h, cache read, output) in USD/Mtok.
CLAUDE = {
    ("claude-fable-5-1", "claude-mythos-5-1"): ("10", "12.50", "20", "0.25", "50"),
    ("claude-fable-5", "claude-mythos-5"): ("10", "12.50", "20", "1.00", "50"),
    ("claude-opus-5-5",): ("4", "5", "8", "0.20", "20"),
    ("claude-opus-5", "claude-opus-4-8", "claude-opus-4-7", "claude-opus-4-6", "claude-opus-4-5"): (
        "5",
        "6.25",
        "10",
        "0.50",
        "25",
    ),
    ("claude-sonnet-5",): ("2", "2.50", "4", "0.20", "10"),
    ("claude-sonnet-4-6", "claude-sonnet-4-5"): ("3", "3.75", "6", "0.30", "15"),
    ("claude-haiku-5-5",): ("0.10", "0.125", "0.20", "0.01", "0.50"),
    ("claude-haiku-4-5",): ("1", "1.25", "2", "0.10", "5"),
    ("claude-opus-4-1", "claude-opus-4"): ("15", "18.75", "30", "1.50", "75"),
}
OPENAI = {  # input, cached input, output
    "gpt-4o": ("2.50", "1.25", "10"),
    "gpt-4o-mini": ("0.15", "0.075", "0.60"),
    "gpt-4.1": ("2", "0.50", "8"),
    "gpt-4.1-mini": ("0.40", "0.10", "1.60"),
    "o3": ("2", "0.50", "8"),
    "o4-mini": ("1.10", "0.275", "4.40"),
}


def micro(usd: str) -> int:
    whole, _, frac = usd.partition(".")
    return int(whole) * M + int((frac + "000000")[:6])


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return Catalogue.load_default()


def test_the_data_file_is_dated_versioned_and_shipped_as_package_data(catalogue: Catalogue) -> None:
    assert catalogue.version and catalogue.as_of.year >= 2026
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "billing/*.json" in pyproject["tool"]["setuptools"]["package-data"]["poolgate"]


@pytest.mark.parametrize(("ids", "row"), CLAUDE.items())
def test_every_claude_row_of_the_price_sheet_is_shipped(
    catalogue: Catalogue, ids: tuple[str, ...], row: tuple[str, ...]
) -> None:
    expected = TokenRates(
        input=micro(row[0]),
        output=micro(row[4]),
        cache_write_5m=micro(row[1]),
        cache_write_1h=micro(row[2]),
        cache_read=micro(row[3]),
        thinking=micro(row[4]),  # thinking bills as output
    )
    for model in ids:
        price = catalogue.price_for(model, at=AFTER)
        assert price is not None and price.rates == expected, model
        assert price.currency == "USD" and price.version == catalogue.version


@pytest.mark.parametrize(("model", "row"), OPENAI.items())
def test_openai_models_bill_cached_input_as_cache_reads(catalogue: Catalogue, model: str, row: tuple[str, ...]) -> None:
    price = catalogue.price_for(model)
    assert price is not None
    r = price.rates
    assert (r.input, r.cache_read, r.output) == tuple(micro(v) for v in row)
    assert r.cache_write_5m == r.cache_write_1h == r.input  # implicit caching: a write is plain input


def test_sonnet_5_5_cache_read_price_changes_on_its_effective_date(catalogue: Catalogue) -> None:
    before = catalogue.price_for("claude-sonnet-5-5", at=BEFORE)
    after = catalogue.price_for("claude-sonnet-5-5", at=AFTER)
    assert before is not None and after is not None
    assert (before.rates.cache_read, after.rates.cache_read) == (200_000, 100_000)
    boundary = datetime(2026, 10, 7, tzinfo=UTC).timestamp()
    assert catalogue.price_for("claude-sonnet-5-5", at=boundary) == after
    assert catalogue.price_for("claude-sonnet-5-5", at=boundary - 0.001) == before


DATED = Catalogue.from_data(
    {
        "version": "dated-1",
        "as_of": "2026-01-01",
        "prices": [
            {"ids": ["m"], "input": 1, "output": 1},
            {"ids": ["m"], "input": 2, "output": 2, "effective_from": "2026-03-01"},
            {"ids": ["m"], "input": 3, "output": 3, "effective_from": "2026-06-01"},
        ],
    }
)
MARCH = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
JUNE = datetime(2026, 6, 1, tzinfo=UTC).timestamp()


@FAST
@given(st.lists(st.sampled_from([MARCH - 1, MARCH - 0.001, MARCH, MARCH + 1, JUNE - 0.001, JUNE, JUNE + 9e9, -9e9])))
def test_the_price_in_force_follows_the_clock_both_ways(moments: list[float]) -> None:
    """The price found for one request is remembered for the span it is in force: a request of any other
    moment, earlier (a clock stepped back) or later (past a dated change), still gets the row in force then."""
    for at in moments:
        price = DATED.price_for("m", at=at)
        assert price is not None
        assert price.rates.input == (1 if at < MARCH else 2 if at < JUNE else 3) * M


def test_haiku_5_5_bills_a_long_prompt_at_the_long_context_rate(catalogue: Catalogue) -> None:
    short = catalogue.cost("claude-haiku-5-5", BillableUsage(input_tokens=100_000, output_tokens=10_000))
    long = catalogue.cost("claude-haiku-5-5", BillableUsage(input_tokens=100_001, output_tokens=10_000))
    assert short.micro_usd == 10_000 + 5_000
    assert long.micro_usd == 50_000 + 25_000 + 1  # 75,000.5 µ rounds half up


@pytest.mark.parametrize(
    ("sent", "priced_as"),
    [
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-1@20250805", "claude-opus-4-1"),  # Vertex
        ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),  # Bedrock
        ("anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5"),
        ("Claude-Opus-4-5", "claude-opus-4-5"),
        ("claude-opus-4", "claude-opus-4"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-opus-4-0", "claude-opus-4"),  # the API's alias of claude-opus-4-20250514 (its cost was unknown)
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai/gpt-4.1", "gpt-4.1"),
        ("o3-2025-04-16", "o3"),
        ("opus", "claude-opus-5-5"),
        ("sonnet", "claude-sonnet-5-5"),
        ("haiku", "claude-haiku-5-5"),
        ("sonnet[1m]", "claude-sonnet-5-5"),
    ],
)
def test_model_ids_resolve_to_their_family(catalogue: Catalogue, sent: str, priced_as: str) -> None:
    assert catalogue.resolve(sent) == priced_as
    assert catalogue.cost(sent, BillableUsage(input_tokens=1)).priced_as == priced_as


def test_aliases_follow_the_newest_generation() -> None:
    ids = ["claude-opus-4", "claude-opus-4-1", "claude-opus-4-10", "claude-sonnet-5", "claude-haiku-4-5", "gpt-4o"]
    assert newest_aliases(ids) == {"opus": "claude-opus-4-10", "sonnet": "claude-sonnet-5", "haiku": "claude-haiku-4-5"}


@pytest.mark.parametrize("model", ["claude-sonnet-9", "gpt-4o-mini-turbo", "", "claude-opus", "claude-opus-4-1-extra"])
def test_an_unknown_model_has_an_unknown_cost_never_zero(catalogue: Catalogue, model: str) -> None:
    assert catalogue.price_for(model) is None
    cost = catalogue.cost(model, BillableUsage(input_tokens=1000, output_tokens=1000))
    assert cost.micro_usd is None and not cost.known
    assert cost.pricing_version == catalogue.version


@FAST
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.@[]/", max_size=40))
def test_arbitrary_ids_are_either_priced_or_unknown(model: str) -> None:
    catalogue = Catalogue.load_default()
    cost = catalogue.cost(model, BillableUsage(input_tokens=10, output_tokens=10))
    if catalogue.resolve(model) is None:
        assert cost.micro_usd is None
    else:
        assert isinstance(cost.micro_usd, int) and cost.micro_usd >= 0


@FAST
@given(
    st.sampled_from(["claude-opus-4-5", "claude-sonnet-5-5", "claude-haiku-5-5", "gpt-4o"]),
    st.integers(0, 300_000),
    st.integers(0, 50_000),
    st.integers(0, 50_000),
    st.integers(0, 300_000),
    st.integers(0, 64_000),
)
def test_catalogue_cost_breakdown_adds_up_and_rounds_once(
    model: str, inp: int, w5: int, w1: int, read: int, out: int
) -> None:
    usage = BillableUsage(
        input_tokens=inp, cache_creation_5m=w5, cache_creation_1h=w1, cache_read=read, output_tokens=out
    )
    cost = Catalogue.load_default().cost(model, usage)
    assert cost.pico_exact is not None and cost.micro_usd is not None
    assert sum(cost.breakdown.values()) == cost.pico_exact
    assert cost.micro_usd == (2 * cost.pico_exact + M) // (2 * M)


# ------------------------------------------------------------------------------------------- overrides


def test_a_partial_model_override_changes_only_the_rates_it_names(catalogue: Catalogue) -> None:
    overridden = catalogue.with_overrides(models={"claude-sonnet-4-5": {"cache_read": "0.25"}})
    price = overridden.price_for("claude-sonnet-4-5-20250929")
    shipped = catalogue.price_for("claude-sonnet-4-5")
    assert price is not None and shipped is not None
    assert price.rates.cache_read == 250_000 and price.rates.input == shipped.rates.input
    assert price.version.startswith(catalogue.version + "+cfg.")
    assert catalogue.price_for("claude-sonnet-4-5") == shipped  # the original is untouched


def test_a_partial_override_applies_to_every_dated_row(catalogue: Catalogue) -> None:
    overridden = catalogue.with_overrides(models={"claude-sonnet-5-5": {"output": 12}})
    for at in (BEFORE, AFTER):
        price = overridden.price_for("claude-sonnet-5-5", at=at)
        assert price is not None and price.rates.output == 12 * M
    assert overridden.price_for("sonnet", at=AFTER) == overridden.price_for("claude-sonnet-5-5", at=AFTER)


def test_an_upstream_override_applies_only_on_that_upstream(catalogue: Catalogue) -> None:
    overridden = catalogue.with_overrides(
        models={"claude-opus-4-5": {"input": 4}},
        upstreams={"discounted": {"claude-opus-4-5": {"output": 20}}, "local": {"*": {"input": 0, "output": 0}}},
    )
    on_discounted = overridden.price_for("claude-opus-4-5-20251101", "discounted")
    elsewhere = overridden.price_for("claude-opus-4-5", "other")
    assert on_discounted is not None and elsewhere is not None
    assert (on_discounted.rates.input, on_discounted.rates.output) == (4 * M, 20 * M)  # model override underneath
    assert (elsewhere.rates.input, elsewhere.rates.output) == (4 * M, 25 * M)
    assert overridden.price_for("claude-haiku-4-5", "discounted") == catalogue.price_for("claude-haiku-4-5")
    local = overridden.cost("my-own-model", BillableUsage(input_tokens=5000, output_tokens=5000), upstream_id="local")
    assert local.micro_usd == 0 and local.known  # explicitly free, not unknown
    assert overridden.cost("my-own-model", BillableUsage(input_tokens=1)).micro_usd is None


def test_a_new_model_needs_input_and_output() -> None:
    catalogue = Catalogue.load_default()
    with pytest.raises(CatalogueError, match=r"prices\.models\.brand-new"):
        catalogue.with_overrides(models={"brand-new": {"input": 1}})
    added = catalogue.with_overrides(models={"brand-new": {"input": 1, "output": 2}})
    price = added.price_for("brand-new")
    assert price is not None and price.rates == TokenRates(M, 2 * M, M, M, M, 2 * M)


def test_a_claude_model_priced_by_its_input_and_output_bills_the_cache_at_anthropics_multiples() -> None:
    """A model newer than the catalogue (README: price `claude-fable-5-2` yourself) priced by its input and
    output alone read its cache at the input rate: a Claude Code turn, mostly cache reads, cost ~14 times its
    price. Its cache rates are Anthropic's multiples of its input, as every catalogue row's are; a model of
    another maker's keeps the input rate for them, and rates given are taken as given."""
    catalogue = Catalogue.load_default().with_overrides(
        models={
            "claude-fable-5-2": {"input": "10", "output": "50"},
            "claude-opus-6-20270101": {"input": "4", "output": "20", "cache_read": "0.2"},
            "brand-new": {"input": "1", "output": "2"},
        },
        upstreams={"partner": {"claude-sonnet-6": {"input": "2", "output": "10"}, "*": {"input": "1", "output": "2"}}},
    )

    def cache_rates(price: PerTokenPrice | None) -> tuple[float, float, float]:
        assert price is not None
        return price.rates.cache_write_5m / M, price.rates.cache_write_1h / M, price.rates.cache_read / M

    assert cache_rates(catalogue.price_for("claude-fable-5-2")) == (12.5, 20, 1)
    assert cache_rates(catalogue.price_for("claude-opus-6-20270101")) == (5, 8, 0.2)
    assert cache_rates(catalogue.price_for("claude-sonnet-6", "partner")) == (2.5, 4, 0.2)
    assert cache_rates(catalogue.price_for("brand-new")) == (1, 1, 1)
    assert cache_rates(catalogue.price_for("claude-anything", "partner")) == (1, 1, 1)
    turn = BillableUsage(input_tokens=10, cache_read=100_000, cache_creation_5m=2_000, output_tokens=500)
    assert catalogue.cost("claude-fable-5-2", turn).micro_usd == 100 + 100_000 + 25_000 + 25_000
    in_a_file = Catalogue.from_data(
        {"version": "mine", "as_of": "2027-01-01", "prices": [{"ids": ["claude-x-1"], "input": "3", "output": "15"}]}
    )
    assert cache_rates(in_a_file.price_for("claude-x-1")) == (3.75, 6, 0.3)


@pytest.mark.parametrize("bad", [{"input": "0.0000001"}, {"input": -1}, {"output": "lots"}, {"inputs": 1}])
def test_bad_overrides_name_the_entry(bad: dict[str, object]) -> None:
    with pytest.raises(CatalogueError, match=r"prices\.upstreams\.u1\.claude-opus-4-5"):
        Catalogue.load_default().with_overrides(upstreams={"u1": {"claude-opus-4-5": bad}})


def test_overrides_from_config_and_alias_overrides() -> None:
    cfg = PriceOverrides.model_validate(
        {
            "models": {"claude-haiku-4-5": {"output": "4"}},
            "aliases": {"haiku": "claude-haiku-4-5", "fast": "gpt-4o-mini"},
        }
    )
    catalogue = Catalogue.from_config(cfg)
    assert catalogue.resolve("haiku") == "claude-haiku-4-5"
    assert catalogue.resolve("fast") == "gpt-4o-mini"
    price = catalogue.price_for("haiku")
    assert price is not None and price.rates.output == 4 * M
    with pytest.raises(CatalogueError, match="alias"):
        Catalogue.load_default().with_overrides(aliases={"x": "no-such-model"})


def test_a_price_that_names_no_web_search_rate_does_not_make_searches_free() -> None:
    """A model priced in the configuration (not in the catalogue) billed its web searches at $0."""
    cfg = PriceOverrides.model_validate({"models": {"claude-opus-6": {"input": "5", "output": "25"}}})
    cost = Catalogue.from_config(cfg).cost(
        "claude-opus-6", BillableUsage(input_tokens=1000, output_tokens=100, web_searches=5)
    )
    assert cost.micro_usd == 5_000 + 2_500 + 5 * 10_000


def test_a_price_in_another_currency_does_not_take_the_usd_search_rate_for_its_own() -> None:
    """A price in EUR kept the list price's $0.01 a search as 0.01 EUR. Searches on a price in another
    currency cost its own `web_search`; without one, a request that ran searches has an unknown cost."""
    euro = {"input": "3", "output": "15", "currency": "EUR"}
    cfg = PriceOverrides.model_validate(
        {
            "models": {"claude-sonnet-4-5": {"currency": "EUR"}},
            "upstreams": {"eu": {"*": euro}, "eu-rated": {"*": {**euro, "web_search": "0.009"}}},
        }
    )
    catalogue = Catalogue.from_config(cfg)
    tokens = BillableUsage(input_tokens=1000, output_tokens=100)
    searched = BillableUsage(input_tokens=1000, output_tokens=100, web_searches=2)
    for model, upstream in (("claude-sonnet-4-5", None), ("claude-opus-6", "eu")):
        assert catalogue.cost(model, tokens, upstream).micro_usd == 3_000 + 1_500
        unknown = catalogue.cost(model, searched, upstream)
        assert (unknown.micro_usd, unknown.currency) == (None, "EUR")
    rated = catalogue.cost("claude-opus-6", searched, "eu-rated")
    assert (rated.micro_usd, rated.currency) == (3_000 + 1_500 + 2 * 9_000, "EUR")
    # A price file in EUR likewise: its rows name their search rate, or have none.
    in_euros = Catalogue.from_data(
        {"version": "eu-1", "as_of": "2026-01-01", "currency": "EUR", "prices": [{"ids": ["claude-x"], **euro}]}
    )
    assert in_euros.cost("claude-x", searched).micro_usd is None


def test_long_context_cache_rates_left_out_scale_with_input_as_the_base_prices_do() -> None:
    """Unset, they were the long-context input rate itself: a long-context cache read cost ten times its price."""
    cfg = PriceOverrides.model_validate(
        {
            "models": {
                "claude-sonnet-4-6": {"long_context": {"above_prompt_tokens": 200000, "input": "6", "output": "22.5"}}
            }
        }
    )
    price = Catalogue.from_config(cfg).price_for("claude-sonnet-4-6")
    assert price is not None and price.long_context is not None
    rates = price.long_context.rates  # the base price: input 3, write 3.75 / 6, read 0.30
    assert (rates.cache_write_5m, rates.cache_write_1h, rates.cache_read) == (7.5 * M, 12 * M, 0.6 * M)


def test_a_price_object_can_be_given_directly() -> None:
    price = PerTokenPrice.of(1, 2, version="mine")
    catalogue = Catalogue.load_default().with_overrides(models={"claude-opus-4-5": price})
    assert catalogue.price_for("claude-opus-4-5") is price


def test_a_price_file_with_duplicate_effective_dates_is_refused() -> None:
    row = {"ids": ["m"], "input": 1, "output": 1}
    with pytest.raises(CatalogueError, match="same effective_from"):
        Catalogue.from_data({"version": "x", "as_of": "2026-01-01", "prices": [row, row]})
    with pytest.raises(CatalogueError):
        Catalogue.from_data({"version": "x", "as_of": "2026-01-01", "prices": [{"ids": ["m"], "input": 1}]})


def test_an_operator_names_a_models_fast_mode_premium_and_keeps_its_rates() -> None:
    """A model whose fast-mode premium the catalogue does not know (its fast answers cost unknown) gets it from
    the config; a premium under 1× or finer than hundredths is refused."""
    cfg = PriceOverrides.model_validate({"models": {"claude-opus-4-8": {"fast": "2", "us_only": "1.15"}}})
    price = Catalogue.from_config(cfg).price_for("claude-opus-4-8")
    listed = Catalogue.load_default().price_for("claude-opus-4-8")
    assert price is not None and listed is not None
    assert (price.fast_percent, price.us_only_percent, price.rates) == (200, 115, listed.rates)
    for wrong in ("0.5", "1.125"):
        with pytest.raises(ValidationError):
            PriceOverrides.model_validate({"models": {"claude-opus-4-8": {"fast": wrong}}})

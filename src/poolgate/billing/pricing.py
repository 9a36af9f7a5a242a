"""The five pricing models, all in exact integer arithmetic.

Money is an integer number of *micro-units* of a currency (1 USD = 1_000_000 µUSD). Rates are integers
too, chosen so that one multiplication never loses anything: per-token rates are micro-units per
million tokens ($3/Mtok = 3_000_000), so `tokens × rate` is an exact count of *pico-units* (10⁻¹²).
Each model sums its exact numerator and rounds **once**, half up, to micro-units. One request's
rounded cost is therefore within ½ µ of the exact rational cost, and a ledger that adds up N requests
never drifts from the exact total by more than N/2 µ (it can add `Cost.pico_exact` for zero drift).

Why not floats: 0.1 + 0.2 ≠ 0.3, and a gateway adding millions of tiny costs must agree with the
invoice to the cent; why not Decimal everywhere: integer arithmetic is exact, faster, and needs no
context/precision settings on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from itertools import pairwise
from typing import Any, Final, Literal, Protocol

from poolgate.billing.values import BillableUsage

MICRO: Final = 1_000_000  # micro-units per unit of currency
PER_MILLION: Final = 1_000_000  # rates are quoted per million tokens / characters


class PriceUnknown(LookupError):
    """The usage asks for something this price does not cover (e.g. an image size with no rate).

    Raised instead of returning 0: an unpriced item must be recorded as unknown, never as free.
    """


def round_half_up(numerator: int, denominator: int) -> int:
    """`numerator / denominator` rounded to the nearest integer, halves up (both non-negative)."""
    # The remainder doubled, not the numerator: compiled (mypyc), a product of a factor above 2³⁰ is a Python
    # integer's multiplication (~700 instructions), and a request's cost in pico-units is billions.
    quotient = numerator // denominator
    return quotient + 1 if 2 * (numerator % denominator) >= denominator else quotient


def _check_non_negative(owner: object, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{type(owner).__name__}.{name} must be a non-negative integer, got {value!r}")


def web_searches_cost(per_web_search: int | None, searches: int) -> int:
    """µ for a request's server-side web searches, on top of what any pricing model meters. `per_web_search`
    None: the price names no rate for a search in its own currency (Anthropic's $0.01 is a USD default, no
    amount of credits or yen), so a request that ran searches has no known cost (`PriceUnknown`): never 0,
    nor $0.01 read as 0.01 of another currency."""
    if searches <= 0:
        return 0
    if per_web_search is None:
        raise PriceUnknown("the price names no rate for a web search in its currency")
    return searches * per_web_search


# A price's premium for the modes an answer ran in is in ten-thousandths of its token rates (`PerTokenPrice.premium`):
# a fast mode's percentage times a US-only inference's, exact for any two percentages.
NO_PREMIUM: Final = 10_000
# The most Anthropic charges for each mode, which a budget's estimate reserves on a price that does not say its
# own premium (an answer in such a mode then has an unknown cost): 6× for fast mode (Opus 4.6 and 4.7), 1.1× for
# US-only inference.
FAST_PERCENT_MAX: Final = 600
US_ONLY_PERCENT_MAX: Final = 110


def with_premium(pico: int, premium: int) -> int:
    return pico * premium // NO_PREMIUM


# The parts of a token price's cost its rates make, which a premium multiplies (`PerTokenPrice.breakdown`).
TOKEN_PARTS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read", "thinking")


class PricingModel(Protocol):
    """What a channel needs from any pricing model: its currency and an integer cost in micro-units.

    `already_used` is the quantity consumed earlier in the billing period; only tiered pricing reads it.
    Every model bills web searches on top of what it meters (`web_searches_cost`), and raises `PriceUnknown`
    for usage it has no price for.
    """

    @property
    def kind(self) -> str: ...

    @property
    def currency(self) -> str: ...

    def cost(self, usage: BillableUsage, *, already_used: int = 0) -> int: ...


# --------------------------------------------------------------------------------------------- per token


@dataclass(frozen=True, slots=True)
class TokenRates:
    """Micro-units per million tokens for each kind of token."""

    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int
    thinking: int

    def __post_init__(self) -> None:
        _check_non_negative(self, **{name: getattr(self, name) for name in _RATE_KINDS})

    def at_least(self, other: TokenRates) -> bool:
        return all(getattr(self, name) >= getattr(other, name) for name in _RATE_KINDS)


_RATE_KINDS = tuple(kind.name for kind in fields(TokenRates))


@dataclass(frozen=True, slots=True)
class LongContext:
    """Anthropic-style long-prompt pricing: a prompt of *more than* `above_prompt_tokens` (input + cache
    writes + cache reads) bills the **whole** request at `rates`.

    This is deliberately not `TieredPrice`: tiers split a cumulative quantity into slices billed at
    different rates, whereas a long prompt re-prices every token of the request. Rates must be ≥ the
    base rates so that cost stays monotone in every token count across the threshold.
    """

    above_prompt_tokens: int
    rates: TokenRates

    def __post_init__(self) -> None:
        _check_non_negative(self, above_prompt_tokens=self.above_prompt_tokens)


@dataclass(frozen=True, slots=True)
class PerTokenPrice:
    """Per-token list price of one model. `version` says where the price came from (catalogue version,
    or the catalogue version plus an override digest)."""

    rates: TokenRates
    per_request: int = 0  # micro-units per request; 0 for plain token pricing
    # Micro-units per server-side web search (`server_tool_use.web_search_requests`); None: unknown (see
    # `web_searches_cost`).
    per_web_search: int | None = None
    currency: str = "USD"
    long_context: LongContext | None = None
    version: str = ""
    kind: Literal["per_token"] = "per_token"
    # The percentage of its token rates (cache writes and reads included; a web search's fee is no token rate)
    # billed for an answer that ran in fast mode (`usage.speed: "fast"`) or inferred in the US only
    # (`usage.inference_geo: "us"`); None: unknown, and so is such an answer's cost (never the plain rates: a
    # fast Opus 4.6 turn costs six times as much).
    fast_percent: int | None = None
    us_only_percent: int | None = None

    def __post_init__(self) -> None:
        _check_non_negative(self, per_request=self.per_request, per_web_search=self.per_web_search)
        for percent in (self.fast_percent, self.us_only_percent):
            if percent is not None and percent < 100:
                raise ValueError("a premium multiplies the rates by at least 1")
        if self.long_context is not None and not self.long_context.rates.at_least(self.rates):
            raise ValueError("long-context rates must not be below the base rates (cost would drop as prompts grow)")

    @classmethod
    def of(
        cls,
        input: int,
        output: int,
        cache_write_5m: int | None = None,
        cache_write_1h: int | None = None,
        cache_read: int | None = None,
        thinking: int | None = None,
        **kwargs: Any,
    ) -> PerTokenPrice:
        """Shorthand for tests and code: missing cache rates cost the same as input, thinking as output."""
        rates = TokenRates(
            input=input,
            output=output,
            cache_write_5m=input if cache_write_5m is None else cache_write_5m,
            cache_write_1h=input if cache_write_1h is None else cache_write_1h,
            cache_read=input if cache_read is None else cache_read,
            thinking=output if thinking is None else thinking,
        )
        return cls(rates=rates, **kwargs)

    def premium(self, fast: bool, us_only: bool) -> int:
        """The ten-thousandths of its token rates billed in these modes (`NO_PREMIUM`: plain rates); raises
        PriceUnknown for a mode whose premium this price does not say."""
        fast_percent = self.fast_percent if fast else 100
        us_only_percent = self.us_only_percent if us_only else 100
        if fast_percent is None or us_only_percent is None:
            raise PriceUnknown("the price names no premium for the mode the answer ran in")
        return fast_percent * us_only_percent

    def premium_of(self, usage: BillableUsage) -> int:
        # Plain rates for nearly every answer: no call.
        return self.premium(usage.fast, usage.us_only) if usage.fast or usage.us_only else NO_PREMIUM

    def rates_for(self, prompt_tokens: int) -> TokenRates:
        lc = self.long_context
        return lc.rates if lc is not None and prompt_tokens > lc.above_prompt_tokens else self.rates

    def breakdown(self, usage: BillableUsage) -> dict[str, int]:
        """Exact pico-units per component; the values add up to `pico_of_usage(...)` (within a pico-unit a
        token component under a premium)."""
        r = self.rates_for(usage.prompt_tokens)
        parts = {
            "input": usage.input_tokens * r.input,
            "output": usage.output_tokens * r.output,
            "cache_write_5m": usage.cache_creation_5m * r.cache_write_5m,
            "cache_write_1h": usage.cache_creation_1h * r.cache_write_1h,
            "cache_read": usage.cache_read * r.cache_read,
            "thinking": usage.thinking_tokens * r.thinking,
            "requests": usage.requests * self.per_request * PER_MILLION,
            "web_search": web_searches_cost(self.per_web_search, usage.web_searches) * PER_MILLION,
        }
        premium = self.premium_of(usage)
        if premium != NO_PREMIUM:
            for name in TOKEN_PARTS:
                parts[name] = with_premium(parts[name], premium)
        return parts

    def cost(self, usage: BillableUsage, *, already_used: int = 0) -> int:
        return round_half_up(pico_of_billable(self, usage), PER_MILLION)


def pico_of_usage(
    price: PerTokenPrice,
    input_tokens: int,
    output_tokens: int,
    cache_creation_5m: int,
    cache_creation_1h: int,
    cache_read: int,
    thinking_tokens: int = 0,
    requests: int = 1,
    web_searches: int = 0,
    premium: int = NO_PREMIUM,
) -> int:
    """The exact cost in pico-units (10⁻⁶ µ), before the one rounding step; `premium` is the ten-thousandths of
    the token rates billed (`PerTokenPrice.premium`)."""
    r = price.rates_for(input_tokens + cache_creation_5m + cache_creation_1h + cache_read)
    tokens = (
        input_tokens * r.input
        + output_tokens * r.output
        + cache_creation_5m * r.cache_write_5m
        + cache_creation_1h * r.cache_write_1h
        + cache_read * r.cache_read
        + thinking_tokens * r.thinking
    )
    if premium != NO_PREMIUM:
        tokens = with_premium(tokens, premium)
    return (
        tokens
        + requests * price.per_request * PER_MILLION
        + web_searches_cost(price.per_web_search, web_searches) * PER_MILLION
    )


def pico_of_billable(price: PerTokenPrice, usage: BillableUsage) -> int:
    """`pico_of_usage` for a request's billable usage."""
    apart = usage.compaction
    if apart is not None and price.long_context is not None:
        return _pico_with_compaction(price, usage, apart)
    return pico_of_usage(
        price,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_creation_5m,
        usage.cache_creation_1h,
        usage.cache_read,
        usage.thinking_tokens,
        usage.requests,
        usage.web_searches,
        price.premium_of(usage),
    )


def _pico_with_compaction(price: PerTokenPrice, usage: BillableUsage, apart: BillableUsage) -> int:
    """A request's cost and its compaction's, each at the rates its own prompt's size picks (a 150,000-token
    compaction and a 60,000-token request are no 210,000-token prompt), in the modes the request ran in."""
    premium = price.premium_of(usage)
    compaction = pico_of_usage(
        price,
        apart.input_tokens,
        apart.output_tokens,
        apart.cache_creation_5m,
        apart.cache_creation_1h,
        apart.cache_read,
        requests=0,
        premium=premium,
    )
    return compaction + pico_of_usage(
        price,
        usage.input_tokens - apart.input_tokens,
        usage.output_tokens - apart.output_tokens,
        usage.cache_creation_5m - apart.cache_creation_5m,
        usage.cache_creation_1h - apart.cache_creation_1h,
        usage.cache_read - apart.cache_read,
        usage.thinking_tokens,
        usage.requests,
        usage.web_searches,
        premium,
    )


def cost_of_usage(
    price: PerTokenPrice,
    input_tokens: int,
    output_tokens: int,
    cache_creation_5m: int,
    cache_creation_1h: int,
    cache_read: int,
    thinking_tokens: int = 0,
    requests: int = 1,
    web_searches: int = 0,
) -> int:
    """Cost of one request in micro-units of `price.currency`, rounded half up once at the end."""
    exact = pico_of_usage(
        price,
        input_tokens,
        output_tokens,
        cache_creation_5m,
        cache_creation_1h,
        cache_read,
        thinking_tokens,
        requests,
        web_searches,
    )
    return round_half_up(exact, PER_MILLION)


def estimate_max_cost(
    price: PerTokenPrice,
    prompt_tokens_estimate: int,
    max_tokens: int,
    *,
    cache_write_ttl: Literal["5m", "1h"] | None = None,
    web_searches: int = 0,
    fast: bool = False,
    us_only: bool = False,
) -> int:
    """Worst-case cost to admit a request against a budget before it runs: the whole prompt as uncached
    input, `max_tokens` of output, one request, and the web searches it may run, the token rates at the
    premium of the modes it asks for (`fast`, `us_only`: the most Anthropic charges for one the price does not
    name a premium for).

    A prompt that carries `cache_control` may instead be *written* to the cache at 1.25× (5m) or 2× (1h) the
    input rate; callers that know this pass `cache_write_ttl` so the estimate stays an upper bound.
    """
    # Comparisons, not `max()`, a call of ~1,400 instructions (CPython 3.11): this runs for every request of a
    # caller with a budget.
    prompt = prompt_tokens_estimate if prompt_tokens_estimate > 0 else 0
    r = price.rates_for(prompt)
    prompt_rate = r.input
    written = r.cache_write_5m if cache_write_ttl == "5m" else r.cache_write_1h if cache_write_ttl == "1h" else 0
    if written > prompt_rate:
        prompt_rate = written
    tokens = prompt * prompt_rate + (max_tokens if max_tokens > 0 else 0) * r.output
    if fast or us_only:
        fast_percent = (price.fast_percent or FAST_PERCENT_MAX) if fast else 100
        us_only_percent = (price.us_only_percent or US_ONLY_PERCENT_MAX) if us_only else 100
        # Rounded up: a bound.
        tokens = -(-tokens * fast_percent * us_only_percent // NO_PREMIUM)
    exact = (
        tokens + price.per_request * PER_MILLION + web_searches_cost(price.per_web_search, web_searches) * PER_MILLION
    )
    return round_half_up(exact, PER_MILLION)


# ---------------------------------------------------------------------------------------------- credits


@dataclass(frozen=True, slots=True)
class CreditsPrice:
    """Providers that sell credits: micro-credits per million input / output tokens plus per request.

    `currency` is "credits" unless the provider's credit is worth exactly one unit of a real currency.
    """

    per_mtok_input: int
    per_mtok_output: int
    per_request: int = 0
    per_web_search: int | None = None  # micro-credits per web search; None: unknown (see `web_searches_cost`)
    currency: str = "credits"
    kind: Literal["credits"] = "credits"

    def __post_init__(self) -> None:
        _check_non_negative(
            self,
            per_mtok_input=self.per_mtok_input,
            per_mtok_output=self.per_mtok_output,
            per_request=self.per_request,
            per_web_search=self.per_web_search,
        )

    def cost(self, usage: BillableUsage, *, already_used: int = 0) -> int:
        # Credit sheets rarely discount caching: every prompt token counts as input.
        exact = (
            usage.prompt_tokens * self.per_mtok_input
            + (usage.output_tokens + usage.thinking_tokens) * self.per_mtok_output
            + usage.requests * self.per_request * PER_MILLION
        )
        return round_half_up(exact, PER_MILLION) + web_searches_cost(self.per_web_search, usage.web_searches)


# ------------------------------------------------------------------------------------------- characters


@dataclass(frozen=True, slots=True)
class CharPrice:
    """Micro-units per million characters of input; output characters cost `output_multiplier` times that.

    The multiplier is a `Fraction` so that 1.5 or 4/3 stay exact (config turns "1.5" into 3/2).
    """

    per_mchar: int
    output_multiplier: Fraction = Fraction(1)
    per_web_search: int | None = None  # see `web_searches_cost`
    currency: str = "USD"
    kind: Literal["char"] = "char"

    def __post_init__(self) -> None:
        _check_non_negative(self, per_mchar=self.per_mchar, per_web_search=self.per_web_search)
        if not isinstance(self.output_multiplier, Fraction) or self.output_multiplier < 0:
            raise ValueError("CharPrice.output_multiplier must be a non-negative Fraction")

    def cost(self, usage: BillableUsage, *, already_used: int = 0) -> int:
        m = self.output_multiplier
        exact = usage.input_chars * self.per_mchar * m.denominator + usage.output_chars * self.per_mchar * m.numerator
        searches = web_searches_cost(self.per_web_search, usage.web_searches)
        return round_half_up(exact, PER_MILLION * m.denominator) + searches


# --------------------------------------------------------------------------------------------- per unit


@dataclass(frozen=True, slots=True)
class DurationPrice:
    """Per-unit pricing by duration (audio, video): micro-units per minute of media.

    Providers bill in increments (per second, per started minute): the duration is rounded *up* to a
    multiple of `increment_ms` first, which is what the invoice does.
    """

    per_minute: int
    increment_ms: int = 1
    per_web_search: int | None = None  # see `web_searches_cost`
    currency: str = "USD"
    kind: Literal["per_unit"] = "per_unit"

    def __post_init__(self) -> None:
        _check_non_negative(
            self, per_minute=self.per_minute, increment_ms=self.increment_ms, per_web_search=self.per_web_search
        )
        if self.increment_ms < 1:
            raise ValueError("DurationPrice.increment_ms must be at least 1")

    def billed_ms(self, duration_ms: int) -> int:
        return -(-duration_ms // self.increment_ms) * self.increment_ms

    def cost(self, usage: BillableUsage, *, already_used: int = 0) -> int:
        searches = web_searches_cost(self.per_web_search, usage.web_searches)
        return round_half_up(self.billed_ms(usage.duration_ms) * self.per_minute, 60_000) + searches


@dataclass(frozen=True, slots=True)
class ImagePrice:
    """Per-unit pricing by image: micro-units per image for each (resolution, quality).

    An image size or quality with no rate raises `PriceUnknown`: it must be recorded as unknown, not free.
    """

    per_image: Mapping[tuple[str, str], int]
    per_web_search: int | None = None  # see `web_searches_cost`
    currency: str = "USD"
    kind: Literal["per_unit"] = "per_unit"

    def __post_init__(self) -> None:
        _check_non_negative(
            self, per_web_search=self.per_web_search, **{f"{r}/{q}": v for (r, q), v in self.per_image.items()}
        )

    def cost(self, usage: BillableUsage, *, already_used: int = 0) -> int:
        total = web_searches_cost(self.per_web_search, usage.web_searches)
        for image in usage.images:
            rate = self.per_image.get((image.resolution, image.quality))
            if rate is None:
                raise PriceUnknown(f"no price for {image.resolution} images at quality {image.quality!r}")
            total += image.count * rate
        return total


PerUnitPrice = DurationPrice | ImagePrice


# ----------------------------------------------------------------------------------------------- tiered


@dataclass(frozen=True, slots=True)
class Tier:
    """Units up to and including `up_to` (cumulative over the period) cost `rate` micro-units per
    `TieredPrice.per` units; `up_to=None` is the last, unbounded tier."""

    up_to: int | None
    rate: int


Meter = Literal["total_tokens", "input_tokens", "output_tokens", "requests"]


@dataclass(frozen=True, slots=True)
class TieredPrice:
    """Graduated pricing by cumulative usage in a billing period: unit number n (1-based) is billed at the
    rate of the first tier whose inclusive `up_to` is ≥ n.

    A request's cost is `round(C(used + q)) − round(C(used))`, where C is the exact cumulative cost: the
    per-request costs of a period then add up to exactly `round(C(total))`, with no drift at all.
    """

    tiers: tuple[Tier, ...]
    meter: Meter = "total_tokens"
    per: int = PER_MILLION
    # Per web search, on top of the tiers (searches are no units of the meter); see `web_searches_cost`.
    per_web_search: int | None = None
    currency: str = "USD"
    kind: Literal["tiered"] = "tiered"
    _bounds: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.tiers or self.tiers[-1].up_to is not None:
            raise ValueError("tiers: the last tier takes every unit past the others: it has no up_to")
        bounds = [t.up_to for t in self.tiers[:-1]]
        if any(b is None for b in bounds):
            raise ValueError("tiers: only the last tier has no up_to")
        ints = [b for b in bounds if b is not None]
        if any(b < 1 for b in ints) or any(a >= b for a, b in pairwise(ints)):
            raise ValueError("tiers: each up_to must be positive and over the one before it")
        _check_non_negative(
            self,
            per=self.per,
            per_web_search=self.per_web_search,
            **{f"tiers[{i}].rate": t.rate for i, t in enumerate(self.tiers)},
        )
        if self.per < 1:
            raise ValueError("TieredPrice.per must be at least 1")
        object.__setattr__(self, "_bounds", tuple(ints))

    def tier_index(self, unit: int) -> int:
        """Which tier bills the `unit`-th unit of the period (1-based)."""
        for i, bound in enumerate(self._bounds):
            if unit <= bound:
                return i
        return len(self._bounds)

    def slices(self, quantity: int) -> list[int]:
        """How many of the first `quantity` units of the period fall into each tier."""
        out: list[int] = []
        lower = 0
        for bound in (*self._bounds, None):
            upper = quantity if bound is None else min(quantity, bound)
            out.append(max(upper - lower, 0))
            if bound is not None:
                lower = bound
        return out

    def cumulative_exact(self, quantity: int) -> int:
        """C(quantity) × `per`: the exact cost of the first `quantity` units, in micro-units × `per`."""
        return sum(n * t.rate for n, t in zip(self.slices(quantity), self.tiers, strict=True))

    def cumulative_cost(self, quantity: int) -> int:
        return round_half_up(self.cumulative_exact(quantity), self.per)

    def quantity_of(self, usage: BillableUsage) -> int:
        if self.meter == "requests":
            return usage.requests
        if self.meter == "input_tokens":
            return usage.prompt_tokens
        if self.meter == "output_tokens":
            return usage.output_tokens + usage.thinking_tokens
        return usage.total_tokens

    def cost_of_quantity(self, quantity: int, already_used: int = 0) -> int:
        return self.cumulative_cost(already_used + quantity) - self.cumulative_cost(already_used)

    def cost(self, usage: BillableUsage, *, already_used: int = 0) -> int:
        searches = web_searches_cost(self.per_web_search, usage.web_searches)
        return self.cost_of_quantity(self.quantity_of(usage), already_used) + searches


AnyPrice = PerTokenPrice | CreditsPrice | CharPrice | DurationPrice | ImagePrice | TieredPrice


@dataclass(frozen=True, slots=True)
class Cost:
    """What one request cost. `micro_usd` is in micro-units of `currency` (the name is historical: it is
    USD for every shipped price); `None` means *unknown price* and is never replaced by 0.

    `pico_exact` is the unrounded cost in pico-units where the model has one (per-token), so a ledger can
    sum without any rounding drift; `breakdown` is per component in pico-units.
    """

    micro_usd: int | None
    currency: str = "USD"
    pricing_version: str = ""
    priced_as: str | None = None
    pico_exact: int | None = None
    breakdown: Mapping[str, int] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return self.micro_usd is not None

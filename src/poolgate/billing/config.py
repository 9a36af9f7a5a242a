"""The configuration form of prices, channel billing and the shipped price file (pydantic, at the config edge only).

People write money the way price sheets do: decimal currency units per million tokens ("3", "0.275").
Each value is converted once, exactly, to integer micro-units; a value finer than one micro-unit is
refused rather than rounded, so the configured price and the billed price are the same number.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from datetime import date
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from poolgate.billing.channel import FlatFeeChannel, MeteredChannel
from poolgate.billing.pricing import (
    MICRO,
    CharPrice,
    CreditsPrice,
    DurationPrice,
    ImagePrice,
    LongContext,
    Meter,
    PerTokenPrice,
    Tier,
    TieredPrice,
    TokenRates,
    round_half_up,
)

# Decimal, not float: "0.1" must mean exactly one tenth. Strings and ints are accepted as well.
Money = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]
# What a mode multiplies a price's token rates by: at least 1, in hundredths at the finest (`6`, `1.1`).
Premium = Annotated[Decimal, Field(ge=1, le=100, decimal_places=2, allow_inf_nan=False)]


def to_micro(value: Decimal, what: str = "price") -> int:
    """Exact conversion of a decimal amount to integer micro-units; finer than 1 µ is a config error."""
    scaled = value * MICRO
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{what} {value} has more than 6 decimal places (finer than one micro-unit)")
    return int(scaled)


# Anthropic's price per server-side web search ($10 per 1,000), for a price in USD that names none.
DEFAULT_WEB_SEARCH = Decimal("0.01")
# Anthropic's cache rates as multiples of a Claude model's input rate, for one priced in the configuration with
# its input and output only (a model newer than the catalogue): at the input rate, a Claude Code turn's cache
# reads, most of its prompt, cost 10-40 times their price. A read is 0.1× on most generations (0.05× on the 5.5
# one, 0.025× on Fable and Mythos 5.1): the most any charges, so a budget is never charged less than the read.
CLAUDE_CACHE_MULTIPLES = {
    "cache_write_5m": Fraction(5, 4),
    "cache_write_1h": Fraction(2),
    "cache_read": Fraction(1, 10),
}


def dotted(path: tuple[str | int, ...]) -> str:
    """A field's place as the configuration's errors name it: `upstreams.0.base_url`. A key holding
    whitespace is shown to its first word: a credential typed without its colon (`{api_key sk-ant-…}`) is a
    key, and the error naming it printed the secret."""
    return ".".join(_first_word(str(part)) for part in path) or "(top level)"


def _first_word(key: str) -> str:
    words = key.split(maxsplit=1)
    return f"{words[0]} …" if len(words) > 1 else key


def validation_problems(exc: ValidationError) -> str:
    """A validation error in one line, as the configuration's errors are written: `field.path: message`
    for each problem, without pydantic's dump of the input (a secret, or a whole file) and its links."""
    return "; ".join(f"{dotted(tuple(error['loc']))}: {problem_text(error)}" for error in exc.errors())


# What each pattern a configuration field must match asks, in words: pydantic's message names the regular
# expression (`String should match pattern '^[\\x21-\\x7e]+$'`).
PATTERN_WORDS = {
    r"^[A-Za-z0-9_.:-]+$": "may hold only letters, digits and _ . : -",
    r"^[A-Za-z0-9_.-]+$": "may hold only letters, digits and _ . -",
    r"^[\x21-\x7e]+$": "may hold only printable ASCII characters, without spaces",
    r"^[^\x00-\x1f\x7f-\x9f]+$": "must not hold control characters",
}


def problem_text(error: ErrorDetails, known: Collection[str] = ()) -> str:
    """pydantic's message in the words of the rest of poolgate's errors: what a check of ours raised
    without the `Value error, ` pydantic puts before it, and a field no model reads (a typo) called an
    unknown field, with the one of `known` (the fields where it was written) it most likely stands for,
    rather than "Extra inputs are not permitted", a pattern's demand in words, not as a regex, and a
    value where fields belong without the name of a class."""
    if error["type"] == "extra_forbidden":
        written = _first_word(str(error["loc"][-1])) if error["loc"] else ""
        # A field of a section written where the section belongs (`port:` not indented under `server:`) is
        # known by its own name one level down (`server.port`), which no likeness of spelling would find.
        likely = [name for name in sorted(known) if name.rpartition(".")[2] == written]
        likely = likely or difflib.get_close_matches(written, sorted(known), n=1)
        return f"unknown field (did you mean {likely[0]!r}?)" if likely else "unknown field"
    if error["type"] == "model_type":
        # pydantic named the model's class (`instance of ServerConfig`), which no file spells.
        return "fields are needed here (`name: value` lines indented under it, or `{name: value}`)"
    if error["type"] == "string_pattern_mismatch":
        words = PATTERN_WORDS.get(str(error.get("ctx", {}).get("pattern")))
        if words is not None:
            return words
    return error["msg"].removeprefix("Value error, ")


def per_web_search(web_search: Decimal | None, currency: str, what: str = "price") -> int | None:
    """µ per web search of a price in `currency`: its own `web_search`, or for a USD price that names none
    Anthropic's (`DEFAULT_WEB_SEARCH`: a missing rate is never billed as zero). A price in another currency
    that names none has no rate (None): $0.01 is no amount of credits or euros, so a request that runs
    searches there has an unknown cost."""
    if web_search is not None:
        return to_micro(web_search, f"{what}.web_search")
    return to_micro(DEFAULT_WEB_SEARCH) if currency == "USD" else None


class ConfigModel(BaseModel):
    """The base of every model of the configuration file (poolgate.config's too: it imports this module, not
    the other way round)."""

    # No infinity or NaN in any number: `timeouts.connect_seconds: .inf` passed `config check`, then every
    # request was a 500 (aiohttp cannot take an infinite timeout); a NaN passes every bound it is checked by.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_flag_for_a_number(cls, data: Any) -> Any:
        # YAML's true and false are 1 and 0 to pydantic's lax numbers (`port: true` listened on port 1). Not
        # strict numbers: `port: ${PORT}` is a string until pydantic reads it. (A field validator for every
        # field cannot be had: pydantic refuses one on a discriminator such as `billing` or `kind`.)
        flags = [
            InitErrorDetails(
                type=PydanticCustomError(
                    "number_type", "Input should be a number, not {flag}", {"flag": str(value).lower()}
                ),
                loc=(name,),
                input=value,
            )
            for name, value in (data.items() if isinstance(data, dict) else ())
            if isinstance(value, bool) and name in cls.model_fields and _a_number(cls.model_fields[name].annotation)
        ]
        if flags:
            raise ValidationError.from_exception_data(cls.__name__, flags)
        return data

    @model_validator(mode="before")
    @classmethod
    def _empty_section_is_its_default(cls, data: Any) -> Any:
        # `upstreams:` or `server:` with every entry commented out is null to YAML: it was refused as "Input
        # should be a valid tuple/dictionary". A section, or a list of them, left empty is one left out.
        if not isinstance(data, dict):
            return data
        return {
            name: value
            for name, value in data.items()
            if not (value is None and name in cls.model_fields and _a_section(cls.model_fields[name].annotation))
        }


def _a_section(annotation: object) -> bool:
    """Whether a field holds a section (a model, a mapping such as `prices.models`) or a list of sections
    (`upstreams`, `keys`, `pins`), and not None. Not a list of names: `models:` left empty must not mean
    "any model", as an absent one does."""
    if get_origin(annotation) is dict:
        return True
    if get_origin(annotation) is tuple:
        annotation = get_args(annotation)[0]
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _a_number(annotation: object) -> bool:
    """Whether a field holds a number (possibly None), not a flag."""
    kinds = get_args(annotation) or (annotation,)
    return bool not in kinds and any(kind in (int, float, Decimal) for kind in kinds)


class LongContextConfig(ConfigModel):
    """Whole-request rates once the prompt exceeds `above_prompt_tokens`; unset cache rates scale with input
    as the base price's do (a long-context read of a price that reads at 0.1× input is 0.1× the long-context
    input), thinking is the long-context output."""

    above_prompt_tokens: int = Field(ge=0)
    input: Money
    output: Money
    cache_write_5m: Money | None = None
    cache_write_1h: Money | None = None
    cache_read: Money | None = None
    thinking: Money | None = None


class PerTokenPriceConfig(ConfigModel):
    """A per-token price in currency units per million tokens. Every field is optional so that an
    override can change one rate of a shipped price; a model absent from the catalogue needs at least
    `input` and `output` (missing cache rates then cost the same as input, or for a Claude model
    `CLAUDE_CACHE_MULTIPLES` of it, thinking the same as output, and a web search what `per_web_search`
    says)."""

    input: Money | None = None
    output: Money | None = None
    cache_write_5m: Money | None = None
    cache_write_1h: Money | None = None
    cache_read: Money | None = None
    thinking: Money | None = None
    per_request: Money | None = None
    # Per server-side web search (currency units per search, not per million).
    web_search: Money | None = None
    currency: str | None = Field(None, min_length=1, max_length=16)
    long_context: LongContextConfig | None = None
    # What an answer's token rates are multiplied by when its usage says it ran in fast mode (`speed: "fast"`)
    # or inferred in the US only (`inference_geo: "us"`); unset on a price without one: such an answer's cost is
    # unknown.
    fast: Premium | None = None
    us_only: Premium | None = None

    def merge_onto(
        self,
        base: PerTokenPrice | None,
        version: str,
        what: str = "price",
        currency: str = "USD",
        claude: bool = False,
    ) -> PerTokenPrice:
        """This config's fields over `base` (or over nothing, for a model the catalogue lacks, priced in
        `currency` unless it names its own; for a `claude` model, the cache rates it leaves out are Anthropic's
        multiples of its input)."""
        if base is None:
            if self.input is None or self.output is None:
                raise ValueError(f"{what}: a model without a catalogue price needs at least `input` and `output`")
            input_rate = to_micro(self.input)
            implied = (
                {
                    name: round_half_up(input_rate * m.numerator, m.denominator)
                    for name, m in CLAUDE_CACHE_MULTIPLES.items()
                }
                if claude
                else {}
            )
            base = PerTokenPrice.of(input_rate, to_micro(self.output), currency=currency, **implied)
        old = base.rates
        rates = TokenRates(
            input=self._micro("input", old.input, what),
            output=self._micro("output", old.output, what),
            cache_write_5m=self._micro("cache_write_5m", old.cache_write_5m, what),
            cache_write_1h=self._micro("cache_write_1h", old.cache_write_1h, what),
            cache_read=self._micro("cache_read", old.cache_read, what),
            thinking=self._micro("thinking", old.thinking, what),
        )
        long_context = base.long_context
        if self.long_context is not None:
            long_context = _long_context(self.long_context, rates, what)
        per_request = base.per_request if self.per_request is None else to_micro(self.per_request, what)
        priced_in = self.currency or base.currency
        # A search rate of the base's is in the base's currency: kept only while the currency stays.
        search = (
            base.per_web_search
            if self.web_search is None and priced_in == base.currency and base.per_web_search is not None
            else per_web_search(self.web_search, priced_in, what)
        )
        return PerTokenPrice(
            rates=rates,
            per_request=per_request,
            per_web_search=search,
            currency=priced_in,
            long_context=long_context,
            version=version,
            fast_percent=base.fast_percent if self.fast is None else int(self.fast * 100),
            us_only_percent=base.us_only_percent if self.us_only is None else int(self.us_only * 100),
        )

    def _micro(self, name: str, default: int, what: str) -> int:
        value = getattr(self, name)
        return default if value is None else to_micro(value, f"{what}.{name}")


def _long_context(cfg: LongContextConfig, base: TokenRates, what: str) -> LongContext:
    input_ = to_micro(cfg.input, what)

    def rate(value: Decimal | None, default: int) -> int:
        return default if value is None else to_micro(value, what)

    def scaled(base_rate: int) -> int:
        """As `base_rate` is to the base input (a 5-minute write 1.25×, a read 0.1×), rounded half up: a long-
        context read at the full long-context input rate cost ten times what it should."""
        if not base.input:
            return input_
        return (2 * input_ * base_rate + base.input) // (2 * base.input)

    return LongContext(
        above_prompt_tokens=cfg.above_prompt_tokens,
        rates=TokenRates(
            input=input_,
            output=to_micro(cfg.output, what),
            cache_write_5m=rate(cfg.cache_write_5m, scaled(base.cache_write_5m)),
            cache_write_1h=rate(cfg.cache_write_1h, scaled(base.cache_write_1h)),
            cache_read=rate(cfg.cache_read, scaled(base.cache_read)),
            thinking=rate(cfg.thinking, to_micro(cfg.output, what)),
        ),
    )


# ----------------------------------------------------------------- pricing models for metered channels


class PerTokenPricing(PerTokenPriceConfig):
    kind: Literal["per_token"] = "per_token"

    def build(self) -> PerTokenPrice:
        return self.merge_onto(None, version="config")


class CreditsPricing(ConfigModel):
    kind: Literal["credits"]
    per_mtok_input: Money
    per_mtok_output: Money
    per_request: Money = Decimal(0)
    web_search: Money | None = None  # per search, in the price's currency (see `per_web_search`)
    currency: str = Field("credits", min_length=1, max_length=16)

    def build(self) -> CreditsPrice:
        return CreditsPrice(
            per_mtok_input=to_micro(self.per_mtok_input),
            per_mtok_output=to_micro(self.per_mtok_output),
            per_request=to_micro(self.per_request),
            per_web_search=per_web_search(self.web_search, self.currency),
            currency=self.currency,
        )


class CharPricing(ConfigModel):
    kind: Literal["char"]
    per_million_chars: Money
    output_multiplier: Money = Decimal(1)
    web_search: Money | None = None  # per search, in the price's currency (see `per_web_search`)
    currency: str = Field("USD", min_length=1, max_length=16)

    def build(self) -> CharPrice:
        return CharPrice(
            per_mchar=to_micro(self.per_million_chars),
            output_multiplier=Fraction(self.output_multiplier),
            per_web_search=per_web_search(self.web_search, self.currency),
            currency=self.currency,
        )


class PerUnitPricing(ConfigModel):
    """Exactly one of `per_minute` (duration, rounded up to `increment_seconds`) or `images`
    (resolution → quality → price per image)."""

    kind: Literal["per_unit"]
    per_minute: Money | None = None
    increment_seconds: Decimal = Field(Decimal("0.001"), gt=0)
    images: dict[str, dict[str, Money]] | None = None
    web_search: Money | None = None  # per search, in the price's currency (see `per_web_search`)
    currency: str = Field("USD", min_length=1, max_length=16)

    @model_validator(mode="after")
    def _one_unit(self) -> PerUnitPricing:
        if (self.per_minute is None) == (self.images is None):
            raise ValueError("per_unit pricing needs exactly one of `per_minute` or `images`")
        return self

    def build(self) -> DurationPrice | ImagePrice:
        search = per_web_search(self.web_search, self.currency)
        if self.per_minute is not None:
            increment = self.increment_seconds * 1000
            if increment != increment.to_integral_value():
                raise ValueError("increment_seconds must be a whole number of milliseconds")
            return DurationPrice(
                to_micro(self.per_minute), increment_ms=int(increment), per_web_search=search, currency=self.currency
            )
        table = {
            (res, quality): to_micro(price, f"images.{res}.{quality}")
            for res, qualities in (self.images or {}).items()
            for quality, price in qualities.items()
        }
        return ImagePrice(per_image=table, per_web_search=search, currency=self.currency)


class TierConfig(ConfigModel):
    up_to: int | None = Field(None, ge=1)
    rate: Money


class TieredPricing(ConfigModel):
    """`rate` is currency units per `per` units of the meter (per million tokens by default)."""

    kind: Literal["tiered"]
    meter: Meter = "total_tokens"
    per: int = Field(1_000_000, ge=1)
    tiers: list[TierConfig] = Field(min_length=1)
    web_search: Money | None = None  # per search, on top of the tiers, in the price's currency
    currency: str = Field("USD", min_length=1, max_length=16)

    def build(self) -> TieredPrice:
        tiers = tuple(Tier(up_to=t.up_to, rate=to_micro(t.rate, "tier rate")) for t in self.tiers)
        return TieredPrice(
            tiers=tiers,
            meter=self.meter,
            per=self.per,
            per_web_search=per_web_search(self.web_search, self.currency),
            currency=self.currency,
        )


def known_tag(field: str, members: tuple[type[BaseModel], ...]) -> BeforeValidator:
    """Refuses a tagged union's unknown tag naming the tags it knows: pydantic's own message quotes the tag
    written, which may be a secret pasted into the wrong place (`billing: sk-ant-…`)."""
    tags = [tag for member in members for tag in get_args(member.model_fields[field].annotation)]

    def known(value: object) -> object:
        if isinstance(value, dict) and value.get(field) not in tags:
            # pydantic's own words for a missing tag were "Unable to extract tag using discriminator 'kind'".
            said = "must be one of" if field in value else "is needed, one of"
            raise ValueError(f"{field} {said}: {', '.join(tags)}")
        return value

    return BeforeValidator(known)


PricingModel = PerTokenPricing | CreditsPricing | CharPricing | PerUnitPricing | TieredPricing
_PRICINGS: tuple[type[BaseModel], ...] = get_args(PricingModel)


def _builds(pricing: PricingModel) -> PricingModel:
    """Prices its pricing model refuses (a last tier with a bound, a rate finer than a micro-unit) are the
    file's error, named at the price's place by `config check`: the gateway builds the channel only as it
    starts, and `serve` died there with a traceback. Its ValueError is pydantic's to report."""
    pricing.build()
    return pricing


PricingConfig = Annotated[
    PricingModel,
    Field(discriminator="kind"),
    known_tag("kind", _PRICINGS),
    AfterValidator(_builds),
]


# ------------------------------------------------------------------------------------ channel billing


class MeteredChannelConfig(ConfigModel):
    """Pay per use. Without `pricing`, the price catalogue prices each model (the usual case)."""

    billing: Literal["metered"] = "metered"
    pricing: PricingConfig | None = None

    def build(self) -> MeteredChannel:
        return MeteredChannel(pricing=None if self.pricing is None else self.pricing.build())


class FlatFeeChannelConfig(ConfigModel):
    """Already paid for (a subscription, a committed plan). Both limits unset = unlimited."""

    billing: Literal["flat_fee"]
    monthly_fee: Money = Decimal(0)  # a hint for dashboards and the effective cost per request
    currency: str = Field("USD", min_length=1, max_length=16)
    max_requests_per_month: int | None = Field(None, ge=0)
    max_tokens_per_month: int | None = Field(None, ge=0)
    on_exhausted: Literal["fallback_to_metered", "block"] = "fallback_to_metered"

    @model_validator(mode="after")
    def _builds(self) -> FlatFeeChannelConfig:
        self.build()  # as a price's (see `_builds`): a monthly_fee finer than 1 µ
        return self

    def build(self) -> FlatFeeChannel:
        return FlatFeeChannel(
            monthly_fee=to_micro(self.monthly_fee, "monthly_fee"),
            currency=self.currency,
            max_requests_per_month=self.max_requests_per_month,
            max_tokens_per_month=self.max_tokens_per_month,
            on_exhausted=self.on_exhausted,
        )


ChannelConfig = Annotated[
    MeteredChannelConfig | FlatFeeChannelConfig,
    Field(discriminator="billing"),
    known_tag("billing", (MeteredChannelConfig, FlatFeeChannelConfig)),
]


class PriceOverrides(ConfigModel):
    """`prices:` in the config: per model, and per upstream (model id → price; "*" = any other model)."""

    models: dict[str, PerTokenPriceConfig] = {}
    upstreams: dict[str, dict[str, PerTokenPriceConfig]] = {}
    aliases: dict[str, str] = {}

    @model_validator(mode="after")
    def _ids_not_globs(self) -> PriceOverrides:
        # Prices match a model id as sent, then by family: `claude-custom-*` was taken, and matched nothing.
        named = [*self.models, *self.aliases, *(m for prices in self.upstreams.values() for m in prices if m != "*")]
        for model in named:
            if any(character in model for character in "*?["):
                raise ValueError(
                    f"{model!r} is a pattern, but prices name model ids (matched as sent, then by family: a dated"
                    " id prices as its family's); list each id (only an upstream's prices take \"*\", any other model)"
                )
        return self

    def unknown_upstreams(self, known: Collection[str]) -> list[str]:
        """What is wrong with prices for upstreams that do not exist, one line each: a typo in an id is
        never applied, and its upstream is priced at list price."""
        return [
            f"prices.upstreams names {upstream_id}: no such upstream is configured or stored, its prices apply to none"
            for upstream_id in self.upstreams
            if upstream_id not in known
        ]


def parse_price(value: Any) -> PerTokenPriceConfig:
    """Accept a plain mapping (from YAML or code) or an already validated config."""
    return value if isinstance(value, PerTokenPriceConfig) else PerTokenPriceConfig.model_validate(value)


# ------------------------------------------------------------------------------------ the price file


class PriceRow(PerTokenPriceConfig):
    ids: list[str] = Field(min_length=1)
    provider: str | None = None
    effective_from: date | None = None
    confidence: Literal["official", "third-party"] = "official"
    status: Literal["current", "retired"] = "current"
    note: str | None = None


class PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1)
    as_of: date
    currency: str = "USD"
    unit: str = ""
    notes: list[str] = []
    aliases: dict[str, str] = {}
    prices: list[PriceRow] = Field(min_length=1)

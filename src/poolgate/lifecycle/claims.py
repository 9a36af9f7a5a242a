"""Caller claims: what a principal may do (models, quotas, budget), parsed once when it is authenticated.

The same mapping shape comes from three places — a gateway key's stored settings, the config file (static
and internal keys, JWT issuer defaults) and a JWT's payload — so there is one parser for all of them. The
hot path only ever sees the frozen `CallerClaims` it produces, never the JSON.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Literal, get_args

QuotaMetric = Literal["requests", "input_tokens", "output_tokens"]
QuotaWindow = Literal["minute", "hour", "day"]
BudgetScope = Literal["per_session", "per_account"]
BudgetRange = Literal["daily", "weekly", "monthly", "total"]

WINDOW_SECONDS: dict[str, int] = {"minute": 60, "hour": 3600, "day": 86400}
_WINDOW_ALIASES = {
    "minute": "minute",
    "min": "minute",
    "hour": "hour",
    "hr": "hour",
    "h": "hour",
    "day": "day",
    "d": "day",
}
_QUOTA = re.compile(r"^\s*([a-z_]+)\s*=\s*([0-9][0-9_]*)\s*/\s*([a-z]+)\s*$")
MICRO = 1_000_000
# The largest quota limit: far beyond any real one, and it keeps a limit from costing anything to read (`int()`
# refuses strings of over 4,300 digits with a ValueError: a 500 for a signed token, a traceback in the CLI).
MAX_QUOTA_LIMIT = 10**18
CLAIM_FIELDS = ("models", "quotas", "budget_usd", "budget_micro_usd", "budget_scope", "budget_range", "chain")


class ClaimsError(ValueError):
    """Claims that cannot be used; the message names the claim."""


@dataclass(frozen=True, slots=True)
class QuotaRule:
    """At most `limit` of `metric` per fixed `window` aligned to the UTC clock."""

    metric: QuotaMetric
    limit: int
    window: QuotaWindow

    @property
    def name(self) -> str:
        """The rule's name in headers and messages, e.g. `requests-per-minute`."""
        return f"{self.metric.replace('_', '-')}-per-{self.window}"

    @property
    def seconds(self) -> int:
        return WINDOW_SECONDS[self.window]

    def spec(self) -> str:
        """The rule written the way `--quota` and the config file take it."""
        return f"{self.metric}={self.limit}/{self.window}"


@dataclass(frozen=True, slots=True)
class CallerClaims:
    """What a caller may do. Empty claims mean "no limits": policy then costs one attribute check."""

    models: tuple[str, ...] = ()
    quotas: tuple[QuotaRule, ...] = ()
    budget_micro_usd: int | None = None
    budget_scope: BudgetScope = "per_account"
    budget_range: BudgetRange = "total"
    chain: str | None = None
    # Derived once here so that the hot path asks one question: is there anything to enforce?
    enforced: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "enforced", bool(self.models or self.quotas or self.budget_micro_usd is not None))

    def as_settings(self) -> dict[str, object]:
        """The canonical JSON form (a gateway key's stored settings); `parse_claims` reads it back."""
        settings: dict[str, object] = {}
        if self.models:
            settings["models"] = list(self.models)
        if self.quotas:
            settings["quotas"] = [rule.spec() for rule in self.quotas]
        if self.budget_micro_usd is not None:
            settings["budget_micro_usd"] = self.budget_micro_usd
            settings["budget_scope"] = self.budget_scope
            settings["budget_range"] = self.budget_range
        if self.chain is not None:
            settings["chain"] = self.chain
        return settings


NO_CLAIMS = CallerClaims()


def _limit(digits: str) -> int:
    """A written limit (`100_000`) as a number; one of more digits than `MAX_QUOTA_LIMIT` as just past it,
    which `parse_quota` then refuses, without converting thousands of digits."""
    digits = digits.replace("_", "").lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(MAX_QUOTA_LIMIT)) else MAX_QUOTA_LIMIT + 1


def parse_quota(value: object) -> QuotaRule:
    """`requests=60/min`, `output_tokens=100_000/day`, or `{metric, limit, window}`."""
    if isinstance(value, Mapping):
        metric, limit, window = value.get("metric"), value.get("limit"), value.get("window")
    elif isinstance(value, str):
        match = _QUOTA.match(value.lower())
        if match is None:
            raise ClaimsError(f"quota {value!r}: expected METRIC=LIMIT/WINDOW, e.g. requests=60/min")
        metric, limit, window = match.group(1), _limit(match.group(2)), match.group(3)
    else:
        raise ClaimsError(f"quota {value!r}: expected a string like requests=60/min")
    if metric not in get_args(QuotaMetric):
        raise ClaimsError(f"quota metric {metric!r}: expected one of {', '.join(get_args(QuotaMetric))}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        # 0 would refuse every request with a retry-after that never helps: revoke the key instead.
        raise ClaimsError(f"quota {metric}: limit must be a whole number ≥ 1 (to stop a caller, revoke its key)")
    if limit > MAX_QUOTA_LIMIT:
        raise ClaimsError(f"quota {metric}: limit too large (at most {MAX_QUOTA_LIMIT:,})")
    canonical = _WINDOW_ALIASES.get(str(window).lower())
    if canonical is None:
        raise ClaimsError(f"quota {metric}: window {window!r} is not one of minute, hour, day")
    return QuotaRule(metric, limit, canonical)  # type: ignore[arg-type]


def _quotas(value: object) -> tuple[QuotaRule, ...]:
    if isinstance(value, str):
        items: Iterable[object] = [part for part in re.split(r"[,\s]+", value) if part]
    elif isinstance(value, Mapping):
        # {requests: "60/min"}: one window per metric, the short form.
        items = [f"{metric}={spec}" for metric, spec in value.items()]
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ClaimsError("quotas: expected a list like ['requests=60/min']")
    rules = tuple(parse_quota(item) for item in items)
    if len({(rule.metric, rule.window) for rule in rules}) != len(rules):
        raise ClaimsError("quotas: the same metric and window is given twice")
    return rules


def _models(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        globs = [part for part in re.split(r"[,\s]+", value) if part]
    elif isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        globs = [item.strip() for item in value if item.strip()]
    else:
        raise ClaimsError("models: expected a list of model globs like ['claude-sonnet-*']")
    if not globs:
        # Given but empty (`--models ''`, a token's `models: []`): no restriction at all is never what that meant.
        raise ClaimsError("models: no model glob given; leave it out to allow every model")
    return tuple(globs)


# The largest amount a budget can be: what fits 64 bits of µUSD, in whole dollars.
MAX_USD = (2**63 - 1) // 1_000_000


def usd_to_micro(value: object, what: str = "budget_usd") -> int:
    """Exact decimal dollars → integer µUSD (floats go through their shortest repr, so 0.1 is 100000)."""
    if isinstance(value, bool):
        raise ClaimsError(f"{what}: expected an amount in USD")
    try:
        amount = Decimal(str(value).strip().removeprefix("$"))
    except (InvalidOperation, ArithmeticError):
        raise ClaimsError(f"{what}: {value!r} is not an amount in USD") from None
    if not amount.is_finite() or amount < 0:
        raise ClaimsError(f"{what}: must be a finite amount ≥ 0")
    if amount > MAX_USD:
        # Stored and counted as 64-bit µUSD; `1e999999` overflowed the arithmetic (a 500 for every request).
        raise ClaimsError(f"{what}: {value!r} is too large (at most {MAX_USD:,} USD)")
    micro = amount * MICRO
    if micro != micro.to_integral_value():
        # Rounding would change the budget (0.0000004 would be a budget of nothing): say so instead.
        raise ClaimsError(f"{what}: {value!r} is finer than a micro-dollar (at most 6 decimals)")
    return int(micro)


def _choice(value: object, name: str, choices: tuple[str, ...], default: str) -> str:
    """One of `choices`, or `default` when absent (None). A given but empty value (`""`, `false`) is refused,
    not read as absent: it replaced an issuer's `daily` default with `total` unseen."""
    if value is None:
        return default
    if value not in choices:
        raise ClaimsError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


def parse_claims(data: Mapping[str, object]) -> CallerClaims:
    """Claims from a mapping; absent or null entries keep their defaults. Unknown entries are ignored,
    because JWTs carry many claims that are none of poolgate's business."""
    models: tuple[str, ...] = ()
    quotas: tuple[QuotaRule, ...] = ()
    budget: int | None = None
    if data.get("models") is not None:
        models = _models(data["models"])
    if data.get("quotas") is not None:
        quotas = _quotas(data["quotas"])
    if data.get("budget_micro_usd") is not None:
        raw = data["budget_micro_usd"]
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise ClaimsError("budget_micro_usd: expected a whole number of micro-dollars ≥ 0")
        if raw > MAX_USD * MICRO:
            raise ClaimsError(f"budget_micro_usd: too large (at most {MAX_USD * MICRO:,})")
        budget = raw
    elif data.get("budget_usd") is not None:
        budget = usd_to_micro(data["budget_usd"])
    scope = _choice(data.get("budget_scope"), "budget_scope", get_args(BudgetScope), "per_account")
    budget_range = _choice(data.get("budget_range"), "budget_range", get_args(BudgetRange), "total")
    chain = data.get("chain")
    if chain is not None and (isinstance(chain, bool) or not isinstance(chain, str | int)):
        # A number is an id too; `true` is not (it became the chain "True").
        raise ClaimsError("chain: expected a string or a number")
    return CallerClaims(
        models=models,
        quotas=quotas,
        budget_micro_usd=budget,
        budget_scope=scope,  # type: ignore[arg-type]
        budget_range=budget_range,  # type: ignore[arg-type]
        chain=None if chain is None else str(chain),
    )


def format_usd(micro: int) -> str:
    """µUSD as dollars with 2 to 6 decimals: $5.00, $0.0015, $4.871234."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    digits = f"{frac:06d}".rstrip("0")
    return f"{sign}${whole}.{digits.ljust(2, '0')}"

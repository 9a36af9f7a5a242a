"""Channel billing: how an upstream is paid for, and the monthly counters of its channel.

An upstream is either **metered** (each request costs money, priced by a pricing model or the
catalogue) or **flat-fee** (a monthly fee already paid, optionally capped in requests or tokens per
calendar month, UTC). Capacity that is already paid for is free at the margin, so routing uses it
before spending money on metered upstreams, and among metered ones prefers the cheapest.

Everything here is pure: time comes in as a Unix timestamp argument, and persistence is someone else's
job (`MonthlyCounter.snapshot()` / `restore()` exchange plain data).

A monthly counter is kept for a flat-fee channel (its quota) and for a metered channel priced by a tiered
price (its cumulative usage, which picks the tier: the billing period is the calendar month, UTC).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from poolgate.billing.pricing import AnyPrice, Cost, PerTokenPrice, PriceUnknown, round_half_up
from poolgate.billing.values import BillableUsage

if TYPE_CHECKING:
    from poolgate.billing.catalogue import Catalogue

OnExhausted = Literal["fallback_to_metered", "block"]


@dataclass(frozen=True, slots=True)
class MeteredChannel:
    """Pay per use. `pricing=None` means: price each model with the catalogue (per-token list prices)."""

    pricing: AnyPrice | None = None
    billing: Literal["metered"] = "metered"


@dataclass(frozen=True, slots=True)
class FlatFeeChannel:
    """Already paid for each month. A limit of `None` is unlimited; both `None` = unlimited channel.

    When a limit is reached, `on_exhausted` decides: `fallback_to_metered` sends the traffic to metered
    upstreams, `block` refuses it (503) rather than spend money the owner did not agree to spend.
    """

    monthly_fee: int = 0  # micro-units of `currency`; a hint, never billed per request
    currency: str = "USD"
    max_requests_per_month: int | None = None
    max_tokens_per_month: int | None = None
    on_exhausted: OnExhausted = "fallback_to_metered"
    billing: Literal["flat_fee"] = "flat_fee"

    @property
    def unlimited(self) -> bool:
        return self.max_requests_per_month is None and self.max_tokens_per_month is None


Channel = MeteredChannel | FlatFeeChannel


# --------------------------------------------------------------------------------------- months (UTC)


def month_key(ts: float) -> str:
    """ "YYYY-MM" of the calendar month (UTC) that contains the Unix timestamp `ts`."""
    moment = datetime.fromtimestamp(ts, UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


def month_bounds(key: str) -> tuple[float, float]:
    """[start, end) of a month as Unix timestamps: 00:00:00 UTC on the 1st, and on the next 1st."""
    year, month = (int(part) for part in key.split("-"))
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC) if month == 12 else datetime(year, month + 1, 1, tzinfo=UTC)
    return start.timestamp(), end.timestamp()


def previous_month(key: str) -> str:
    """ "YYYY-MM" of the month before the month `key`."""
    year, month = (int(part) for part in key.split("-"))
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


def tokens_counted(usage: BillableUsage) -> int:
    """What a flat-fee token quota counts: every token the upstream processed, cached or not, its advisors' too."""
    if usage.advisors:
        return usage.total_tokens + sum(advisor.usage.total_tokens for advisor in usage.advisors)
    return usage.total_tokens


class MonthlyCounter:
    """Requests and tokens used in one calendar month (UTC) on one channel: a flat-fee channel's quota
    (`tokens_counted`), or a tiered price's cumulative usage (`tokens` then counts the price's meter).

    A request belongs to the month it started in (its ledger row's, its budget's). The counter rolls over
    lazily: the first `record` in a later month starts from zero, and `exhausted`/`remaining` read a counter
    from an earlier month as zero without changing it. The month before the counter's stays open: a request
    that started in it and finished after the rollover is priced and counted there, not in the new month
    (the new month's first requests were priced at a later tier). The current month's bounds are cached so
    the routing check is two float comparisons.
    """

    __slots__ = ("_end", "_previous", "_start", "channel", "month", "requests", "tokens")

    def __init__(self, channel: Channel, month: str, requests: int = 0, tokens: int = 0) -> None:
        self.channel = channel
        self.month = month
        self.requests = requests
        self.tokens = tokens
        self._start, self._end = month_bounds(month)
        # (requests, tokens) of the month before, as far as this process counted it (see the class).
        self._previous = (0, 0)

    @classmethod
    def starting(cls, channel: Channel, now: float) -> MonthlyCounter:
        return cls(channel, month_key(now))

    def _current(self, now: float) -> bool:
        return self._start <= now < self._end

    def _in_previous(self, at: float) -> bool:
        return at < self._start and month_key(at) == previous_month(self.month)

    def record(self, requests: int, tokens: int, at: float) -> bool:
        """Count a finished request that started at `at`. Returns False (and counts nothing) for one that
        started before the month before the counter's: that month is closed, and its usage must not eat into
        the current one."""
        if not self._current(at):
            if at < self._start:
                if not self._in_previous(at):
                    return False
                # Only this process's count of it: the store's row has moved on to the new month.
                self._previous = (self._previous[0] + max(requests, 0), self._previous[1] + max(tokens, 0))
                return True
            self.move_on(month_key(at))
        self.requests += max(requests, 0)
        self.tokens += max(tokens, 0)
        return True

    def move_on(self, month: str, requests: int = 0, tokens: int = 0) -> None:
        """Start a later `month` from these counts; the month left stays open as the month before, if it is."""
        self._previous = (self.requests, self.tokens) if previous_month(month) == self.month else (0, 0)
        self.month = month
        self._start, self._end = month_bounds(month)
        self.requests = requests
        self.tokens = tokens

    def used(self, at: float) -> tuple[int, int]:
        """(requests, tokens) used in the month containing `at` (zero once that month is past ours, or
        before the month before it)."""
        if at >= self._end:
            return 0, 0
        if at >= self._start:
            return self.requests, self.tokens
        return self._previous if self._in_previous(at) else (0, 0)

    def remaining(self, now: float) -> tuple[int | None, int | None]:
        """(requests, tokens) left this month; `None` = unlimited (a metered channel has no quota)."""
        requests, tokens = self.used(now)
        ch = self.channel
        if not isinstance(ch, FlatFeeChannel):
            return None, None
        left_requests = None if ch.max_requests_per_month is None else max(ch.max_requests_per_month - requests, 0)
        left_tokens = None if ch.max_tokens_per_month is None else max(ch.max_tokens_per_month - tokens, 0)
        return left_requests, left_tokens

    def exhausted(self, now: float) -> bool:
        ch = self.channel
        if not isinstance(ch, FlatFeeChannel) or ch.unlimited or now >= self._end:
            return False
        return (ch.max_requests_per_month is not None and self.requests >= ch.max_requests_per_month) or (
            ch.max_tokens_per_month is not None and self.tokens >= ch.max_tokens_per_month
        )

    def snapshot(self) -> dict[str, Any]:
        """Plain data for the store; `restore` takes it back."""
        return {"month": self.month, "requests": self.requests, "tokens": self.tokens}

    @classmethod
    def restore(cls, channel: Channel, data: Mapping[str, Any]) -> MonthlyCounter:
        """From a snapshot (possibly of an earlier month: it rolls over on the next record). Limits come
        from the current `channel` config, not the snapshot, so a changed quota applies at once."""
        return cls(channel, str(data["month"]), int(data.get("requests", 0)), int(data.get("tokens", 0)))


# ------------------------------------------------------------------------------------------- routing


ChannelState = Literal["prepaid", "metered", "exhausted_fallback", "exhausted_block"]


def channel_state(channel: Channel, counter: MonthlyCounter | None, now: float) -> ChannelState:
    """Where an upstream stands for billing right now. A flat-fee channel with no counter yet has used
    nothing this month."""
    if isinstance(channel, MeteredChannel):
        return "metered"
    if counter is None or not counter.exhausted(now):
        return "prepaid"
    return "exhausted_block" if channel.on_exhausted == "block" else "exhausted_fallback"


@dataclass(frozen=True, slots=True)
class BillingCandidate:
    upstream_id: str
    channel: Channel
    counter: MonthlyCounter | None = None
    estimated_cost: int | None = None  # µ, e.g. from `estimate_max_cost`; None = unknown price
    # False for a candidate that cannot take this request anyway (unhealthy, parked, …): it can only make the
    # others block (its quota is used up and its policy is `block`), never serve.
    usable: bool = True


@dataclass(frozen=True, slots=True)
class BillingPlan:
    """Candidates in billing preference order, the ones left out and why, and — when nothing may serve
    the request — the message for the 503."""

    order: tuple[str, ...]
    excluded: dict[str, str]
    blocked: str | None = None


def plan_billing(candidates: Iterable[BillingCandidate], now: float) -> BillingPlan:
    """Order candidates: prepaid flat-fee capacity first (free at the margin), then metered by estimated
    cost (unknown cost last); ties keep the caller's order, so the routing strategy still decides among
    equals.

    Exhausted flat-fee channels are excluded. If one of them says `block` and no prepaid capacity is
    left, metered candidates are excluded as well: its owner chose a 503 over unplanned spend — also while
    that channel could not serve anyway (`usable=False`: parked, unhealthy), or its traffic would spill over.
    """
    prepaid: list[str] = []
    metered: list[tuple[int, int, str]] = []
    excluded: dict[str, str] = {}
    blocking: list[str] = []
    # Whether a candidate out for now (parked, unhealthy) may serve within the month: then a request nothing
    # serves this instant waits for it, not for the month's end.
    later = False
    for position, cand in enumerate(candidates):
        state = channel_state(cand.channel, cand.counter, now)
        if not cand.usable:
            if state == "exhausted_block":
                blocking.append(cand.upstream_id)
            later = later or state in ("prepaid", "metered")
            continue
        if state == "prepaid":
            prepaid.append(cand.upstream_id)
        elif state == "metered":
            cost = cand.estimated_cost
            # Unknown cost sorts after every known one but before nothing: it is still usable.
            metered.append((cost if cost is not None else 2**63, position, cand.upstream_id))
        else:
            excluded[cand.upstream_id] = "insufficient_quota"
            if state == "exhausted_block":
                blocking.append(cand.upstream_id)
    metered.sort()
    if blocking and not prepaid:
        for _, _, upstream_id in metered:
            excluded[upstream_id] = "blocked_by_flat_fee_policy"
        names = ", ".join(blocking)
        message = (
            f"The monthly quota of flat-fee upstream(s) {names} is used up and their billing policy is "
            "`block`: requests are refused until the quota resets on the 1st of the month (UTC) instead "
            "of falling back to paid, metered upstreams."
        )
        return BillingPlan(order=(), excluded=excluded, blocked=message)
    if excluded and not (prepaid or metered or later):
        # Used up, `fallback_to_metered`, and no metered upstream serves the request to fall back to: nothing
        # will until the month ends. A 529 saying "in 5 s" had clients retry all month.
        names = ", ".join(excluded)
        message = (
            f"The monthly quota of flat-fee upstream(s) {names} is used up, and no metered upstream serves this"
            " request to fall back to: requests are refused until the quota resets on the 1st of the month (UTC)."
        )
        return BillingPlan(order=(), excluded=excluded, blocked=message)
    return BillingPlan(order=(*prepaid, *(upstream_id for _, _, upstream_id in metered)), excluded=excluded)


# ------------------------------------------------------------------------------------------- costing


def channel_cost(
    channel: Channel,
    catalogue: Catalogue,
    model: str,
    usage: BillableUsage,
    upstream_id: str | None = None,
    *,
    already_used: int = 0,
) -> Cost:
    """The marginal cost of one request on this channel.

    Flat-fee: 0, known (the month is already paid; list-price equivalents come from `catalogue.cost`).
    Metered with an explicit pricing model: that model (`already_used` feeds tiered pricing).
    Metered without one: the catalogue price of the model, `micro_usd=None` if it has none.
    """
    if isinstance(channel, FlatFeeChannel):
        return Cost(micro_usd=0, currency=channel.currency, pricing_version="flat_fee", priced_as=model)
    pricing = channel.pricing
    if pricing is None:
        return catalogue.cost(model, usage, upstream_id)
    # A token price bills its premiums for the modes an answer ran in on its rates (`PerTokenPrice.premium`); the
    # others meter what they meter.
    version = f"channel:{pricing.kind}" + (usage.premium_label if isinstance(pricing, PerTokenPrice) else "")
    try:
        micro = pricing.cost(usage, already_used=already_used)
    except PriceUnknown:
        return Cost(micro_usd=None, currency=pricing.currency, pricing_version=version, priced_as=model)
    return Cost(micro_usd=micro, currency=pricing.currency, pricing_version=version, priced_as=model)


def effective_cost_per_request(channel: FlatFeeChannel, counter: MonthlyCounter, now: float) -> int | None:
    """The monthly fee spread over the requests served so far this month (a dashboard hint)."""
    requests, _ = counter.used(now)
    return round_half_up(channel.monthly_fee, requests) if requests else None

"""The gateway's live billing state: each upstream's channel, the monthly counters (a flat-fee channel's
quota, a tiered price's cumulative usage), and what a finished request cost.

Everything here runs on the hot path and in memory: a request's cost is priced when it ends, a flat-fee
counter is bumped in the same step, and the counters reach the store from a periodic task (the gateway's),
never from the request. `unsaved()` hands over what changed since the last save.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Final, Literal

import msgspec

from poolgate.billing.catalogue import Catalogue
from poolgate.billing.channel import (
    Channel,
    FlatFeeChannel,
    MeteredChannel,
    MonthlyCounter,
    channel_cost,
    channel_state,
    effective_cost_per_request,
    month_key,
    tokens_counted,
)
from poolgate.billing.pricing import (
    PER_MILLION,
    CharPrice,
    DurationPrice,
    ImagePrice,
    PerTokenPrice,
    PriceUnknown,
    TieredPrice,
    estimate_max_cost,
    pico_of_billable,
    round_half_up,
)
from poolgate.billing.values import BillableUsage, Priced

METERED: Final = MeteredChannel()
# Removed upstreams whose channels are remembered (see `ChannelBook._removed`), the oldest forgotten first.
MAX_REMOVED_CHANNELS: Final = 1024
# A subscription account is paid for by the month, and its limits are the subscription's own windows.
SUBSCRIPTION: Final = FlatFeeChannel()


FREE: Final = Priced(0, "USD", None)
# The cache write TTLs a cost estimate prices (any other: none).
_CACHE_WRITE_TTLS: dict[str | None, Literal["5m", "1h"]] = {"5m": "5m", "1h": "1h"}
# The pricing version of a request whose pricing raised (a fault, not a missing price): its cost is unknown.
PRICING_FAILED: Final = "pricing-failed"
# The pricing version of a request whose answer reported no usage, on a channel that meters it: its cost is unknown.
USAGE_UNREPORTED: Final = "usage-unreported"
USAGE_INCOMPLETE: Final = "usage-incomplete"
# (model, upstream) pairs whose typical cost is remembered (`unit_cost`): the model is the caller's to choose.
UNIT_COSTS_KEPT: Final = 4096


class ChannelBook:
    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self._channels: dict[str, Channel] = {}
        # The channels of upstreams a reload removed: requests routed to one before are priced on its channel
        # (a subscription's requests still in flight when `accounts remove` ran were priced as metered).
        self._removed: dict[str, Channel] = {}
        self._counters: dict[str, MonthlyCounter] = {}
        # Per counter, how far the store's row has its counts from this process (month, requests, tokens):
        # what it read at start plus what it has added since (see `unsaved`).
        self._written: dict[str, tuple[str, int, int]] = {}
        self._saved: dict[str, dict[str, Any]] = {}
        # Counters raised to the ledger at their start, to be written as a floor under the store's (see `_resume`).
        self._raised: dict[str, dict[str, Any]] = {}
        # What the ledger holds of this month per upstream, at start (see `_resume`).
        self._ledger: dict[str, BillableUsage] = {}
        self._ledger_month: str | None = None
        self._tiered: set[str] = set()
        # The upstreams whose channel has a monthly counter (see `counted`): `record` counts requests of these only.
        self._counted: frozenset[str] = frozenset()
        # Whether routing has anything to do: flat-fee limits to enforce, prices that differ by upstream.
        self.limited = False
        self.priced_by_upstream = False
        # The upstreams priced otherwise than at list price (their overrides, their channel's pricing).
        self._own_prices: tuple[str, ...] = ()
        # Whether any upstream is flat-fee (capacity that may be paid for already), and which.
        self.flat_fee = False
        self._monthly: frozenset[str] = frozenset()
        # The upstreams priced by duration (see `timed`).
        self._timed: tuple[str, ...] = ()
        self._unit_costs: dict[tuple[str, str], int | None] = {}

    # ----- configuration -----------------------------------------------------------------------------

    def configure(self, channels: Mapping[str, Channel], priced_upstreams: Iterable[str] = ()) -> None:
        """Take the channels of the current upstreams (on start and on every reload). Counters of upstreams
        that stay are kept, and take the new limits; `priced_upstreams` have their own price overrides."""
        for upstream_id, channel in self._channels.items():
            if upstream_id not in channels:
                self._removed[upstream_id] = channel
        for upstream_id in channels:
            self._removed.pop(upstream_id, None)
        while len(self._removed) > MAX_REMOVED_CHANNELS:
            del self._removed[next(iter(self._removed))]
        self._channels = dict(channels)
        counters: dict[str, MonthlyCounter] = {}
        for upstream_id, channel in self._channels.items():
            if not counted(channel):
                continue
            old = self._counters.get(upstream_id)
            if old is not None:  # the counts go on, under the channel's new limits
                counter: MonthlyCounter | None = MonthlyCounter.restore(channel, old.snapshot())
            else:
                counter = self._resume(upstream_id, channel)
            if counter is not None:
                counters[upstream_id] = counter
        self._counters = counters
        self._counted = frozenset(upstream_id for upstream_id, ch in self._channels.items() if counted(ch))
        # Upstreams whose next request's price depends on the ones before it (see `sequenced`).
        self._tiered = {upstream_id for upstream_id, ch in self._channels.items() if tiered_price(ch) is not None}
        self.limited = any(isinstance(ch, FlatFeeChannel) and not ch.unlimited for ch in self._channels.values())
        self._monthly = frozenset(
            upstream_id for upstream_id, ch in self._channels.items() if isinstance(ch, FlatFeeChannel)
        )
        self.flat_fee = bool(self._monthly)
        priced = set(priced_upstreams)
        self._own_prices = tuple(
            upstream_id
            for upstream_id, ch in self._channels.items()
            if upstream_id in priced or (isinstance(ch, MeteredChannel) and ch.pricing is not None)
        )
        self.priced_by_upstream = bool(self._own_prices)
        self._timed = tuple(upstream_id for upstream_id, ch in self._channels.items() if timed_price(ch) is not None)
        self._unit_costs = {}

    def restore(
        self,
        snapshots: Mapping[str, Mapping[str, Any]],
        ledger: Mapping[str, BillableUsage] | None = None,
        month: str | None = None,
    ) -> None:
        """Counters as the store holds them (every process's counts, see `unsaved`), each raised to what the
        `ledger` holds of `month` on its upstream (the billed requests' usage summed, `store.channels.
        month_usage`); applied to the counted channels configured now, and remembered for ones configured
        later."""
        self._saved = {upstream_id: dict(data) for upstream_id, data in snapshots.items()}
        self._ledger = dict(ledger or {})
        self._ledger_month = month
        for upstream_id, channel in self._channels.items():
            if counted(channel):
                counter = self._resume(upstream_id, channel)
                if counter is not None:
                    self._counters[upstream_id] = counter

    def _resume(self, upstream_id: str, channel: Channel) -> MonthlyCounter | None:
        """The counter of a channel this process has not counted for yet: the store's, raised to the ledger's
        count of the month. Counts are saved every few seconds and records every half second, so after a
        crash the ledger knows requests the counter lost (a used-up `block` quota served again). The counts
        this process starts from are what it holds written: only what it counts from now on is added to the
        store (the other processes sharing it add their own). A raise to the ledger is written at the next
        save as a floor under the stored count (`raised`): the other processes sharing the store take it in
        then, and several starting after one crash raise it once."""
        snapshot = self._saved.get(upstream_id)
        counter = MonthlyCounter.restore(channel, snapshot) if snapshot is not None else None
        stored = counter.snapshot() if counter is not None else None
        used, month = self._ledger.get(upstream_id), self._ledger_month
        if used is not None and month is not None:
            requests, tokens = used.requests, metered_tokens(channel, used)
            if counter is None or counter.month < month:
                counter = MonthlyCounter(channel, month, requests, tokens)
            elif counter.month == month:
                counter.requests, counter.tokens = max(counter.requests, requests), max(counter.tokens, tokens)
        if counter is not None:
            self._written[upstream_id] = (counter.month, counter.requests, counter.tokens)
            if counter.snapshot() != stored:
                self._raised[upstream_id] = counter.snapshot()
        return counter

    def raised(self) -> dict[str, dict[str, Any]]:
        """The counters raised above the store's to the ledger's count (see `_resume`), not written yet."""
        return dict(self._raised)

    def channel(self, upstream_id: str) -> Channel:
        """The upstream's channel, also once a reload has removed it (it may have requests in flight)."""
        channel = self._channels.get(upstream_id)
        return channel if channel is not None else self._removed.get(upstream_id, METERED)

    @property
    def counting(self) -> bool:
        """Whether any channel has a monthly counter (flat-fee quotas, tiered prices)."""
        return bool(self._counted)

    def counter(self, upstream_id: str) -> MonthlyCounter | None:
        return self._counters.get(upstream_id)

    def describe(self, upstream_id: str, now: float) -> dict[str, object]:
        """The upstream's channel and where its month stands, as plain data (the admin API shows it): a
        metered channel's pricing (its pricing model's kind, `catalogue` or `catalogue+overrides`); a flat-fee
        channel's fee, limits, use, what is left, its state and the fee per request so far; a tiered price's
        use this month."""
        channel = self._channels.get(upstream_id, METERED)
        counter = self._counters.get(upstream_id)
        requests, tokens = counter.used(now) if counter is not None else (0, 0)
        month = month_key(now)
        if isinstance(channel, MeteredChannel):
            pricing = channel.pricing.kind if channel.pricing is not None else self._catalogue_pricing(upstream_id)
            described: dict[str, object] = {"billing": "metered", "pricing": pricing}
            if tiered_price(channel) is not None:
                described["this_month"] = {"month": month, "requests": requests, "tokens": tokens}
            return described
        left_requests, left_tokens = (
            counter.remaining(now)
            if counter is not None
            else (
                channel.max_requests_per_month,
                channel.max_tokens_per_month,
            )
        )
        return {
            "billing": "flat_fee",
            "monthly_fee_micro": channel.monthly_fee,
            "currency": channel.currency,
            "max_requests_per_month": channel.max_requests_per_month,
            "max_tokens_per_month": channel.max_tokens_per_month,
            "on_exhausted": channel.on_exhausted,
            "state": channel_state(channel, counter, now),
            "this_month": {
                "month": month,
                "requests": requests,
                "tokens": tokens,
                "requests_left": left_requests,
                "tokens_left": left_tokens,
                "fee_per_request_micro": effective_cost_per_request(channel, counter, now) if counter else None,
            },
        }

    def _catalogue_pricing(self, upstream_id: str) -> str:
        """How the catalogue prices a metered upstream without a pricing model of its own: at list price, or
        with its own `prices.upstreams` entries over it (an upstream with a discount said `catalogue`)."""
        return "catalogue+overrides" if upstream_id in self._own_prices else "catalogue"

    def sequenced(self, upstream_id: str) -> bool:
        """Whether a request's price depends on the requests before it (a tiered price: cumulative usage
        this month picks the tier), so that it must be priced before the next one is counted."""
        return upstream_id in self._tiered

    # ----- routing -----------------------------------------------------------------------------------

    def prepaid(self, upstream_id: str, now: float) -> bool:
        """Flat-fee capacity with quota left this month: free at the margin."""
        channel = self._channels.get(upstream_id)
        if not isinstance(channel, FlatFeeChannel):
            return False
        return channel_state(channel, self._counters.get(upstream_id), now) == "prepaid"

    def unit_cost(self, model: str, upstream_id: str) -> int | None:
        """What a typical request (1,000 prompt tokens, 250 out) for `model` costs on this upstream's channel, in
        µUSD: how metered upstreams compare in price. A price in another currency is no number of dollars (0.3
        credits per Mtok beat $3 list price), so it is unknown here, as it is to budgets; so is a price by
        characters, duration or images (see `priced_by_tokens`). Cached per (model, upstream) until the next
        reload."""
        key = (model, upstream_id)
        if key in self._unit_costs:
            return self._unit_costs[key]
        channel = self.channel(upstream_id)
        cost: int | None = None
        if priced_by_tokens(channel):
            priced = channel_cost(
                channel, self.catalogue, model, BillableUsage(input_tokens=1000, output_tokens=250), upstream_id
            )
            cost = priced.micro_usd if priced.currency == "USD" else None
        if len(self._unit_costs) >= UNIT_COSTS_KEPT:
            self._unit_costs.clear()
        self._unit_costs[key] = cost
        return cost

    # ----- finished requests -------------------------------------------------------------------------

    def cost(self, model: str, upstream_id: str | None, usage: BillableUsage, at: float) -> Priced:
        """The request's cost on the channel it was served by (metered: the channel's pricing model or the
        catalogue with the upstream's overrides; flat-fee: 0, the month is paid)."""
        channel = self.channel(upstream_id) if upstream_id is not None else METERED
        if isinstance(channel, FlatFeeChannel):
            return Priced(0, channel.currency, "flat_fee")
        unknown = usage.unknown
        if unknown:
            # Priced at the zeros it was read as, an answer whose usage a proxy stripped was recorded free; priced at
            # what it was read as, a stream cut after an advisor's advice was billed the executor's turn alone.
            currency = self.catalogue.currency if channel.pricing is None else channel.pricing.currency
            return Priced(None, currency, unknown)
        if channel.pricing is None:
            price = self.catalogue.price_for(model, upstream_id, at)
            if price is None:
                return Priced(None, self.catalogue.currency, self.catalogue.version)
            # (`premium_label` only where there is one: a call, for every answer.)
            version = price.version if not (usage.fast or usage.us_only) else price.version + usage.premium_label
            try:
                micro = price.cost(usage) if not usage.advisors else self._with_advisors(price, usage, upstream_id, at)
            except PriceUnknown:  # web searches without a rate in the price's currency, a mode without its premium,
                # an advisor's model without a price
                return Priced(None, price.currency, version)
            return Priced(micro, price.currency, version)
        if usage.advisors:
            # A channel's own pricing model prices its traffic, not other models' list prices: what an advisor
            # on another model costs there is unknown, never nothing.
            return Priced(None, channel.pricing.currency, f"channel:{channel.pricing.kind}")
        if isinstance(channel.pricing, CharPrice | ImagePrice):
            # Characters and images are not measured on Messages traffic (tokens are): unknown, never 0.
            return Priced(None, channel.pricing.currency, f"channel:{channel.pricing.kind}")
        already_used = 0
        tiered = tiered_price(channel)
        if tiered is not None and upstream_id is not None:
            counter = self._counters.get(upstream_id)
            if counter is not None:
                requests, tokens = counter.used(at)
                already_used = requests if tiered.meter == "requests" else tokens
        cost = channel_cost(channel, self.catalogue, model, usage, upstream_id, already_used=already_used)
        return Priced(cost.micro_usd, cost.currency, cost.pricing_version)

    def _with_advisors(self, price: PerTokenPrice, usage: BillableUsage, upstream_id: str | None, at: float) -> int:
        """The cost of an answer that consulted advisors: its own at `price`, and each advisor's at its model's
        catalogue price on the upstream (its overrides apply), rounded once. Raises PriceUnknown for an advisor
        whose model has no price in the answer's currency."""
        pico = pico_of_billable(price, usage)
        for advisor in usage.advisors:
            advisor_price = self.catalogue.price_for(advisor.model, upstream_id, at)
            if advisor_price is None or advisor_price.currency != price.currency:
                raise PriceUnknown(f"no price for the advisor's model {advisor.model!r}")
            pico += pico_of_billable(advisor_price, advisor.usage)
        return round_half_up(pico, PER_MILLION)

    def estimate(
        self,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
        cache_write_ttl: str | None,
        at: float,
        web_searches: int = 0,
        serving: Collection[str] = (),
        fast: bool = False,
        us_only: bool = False,
    ) -> int | None:
        """An upper bound of a request's cost before it is routed (for budgets): the prompt as uncached input
        (or as a cache write where it asks for one), `max_tokens` of output, the web searches it may run, at the
        premium of the modes it asks for (`fast`, `us_only`; see `estimate_max_cost`), on the
        upstreams that serve the model (`serving`): at their own price in USD where they have one (their
        overrides, their channel's pricing: a budget of $0.10 admitted requests that cost $1 each on a tiered
        channel), nothing where they are paid by the month (flat fee, subscriptions), else at list price; at
        list price without `serving` (every upstream at list price). None: no price anywhere. A pool of
        subscriptions, or of accounts at a discount, reserved list price for requests that cost its budget
        nothing, or less: a $0.50 budget refused an Opus request as too large."""
        if serving and self._monthly.issuperset(serving):
            return 0
        ttl = _CACHE_WRITE_TTLS.get(cache_write_ttl)
        bounds = []
        own = [upstream_id for upstream_id in self._own_prices if upstream_id in serving] if serving else ()
        # List price bounds what the upstreams without a price of their own charge, and stands in where an own
        # price tells no cost in USD beforehand: by duration (nothing bounds it), by characters or images
        # (unknown, so charged what was reserved), in another currency.
        at_list = not serving or any(
            upstream_id not in self._monthly and (upstream_id not in own or upstream_id in self._timed)
            for upstream_id in serving
        )
        if own:
            uncached = BillableUsage(
                input_tokens=prompt_tokens,
                output_tokens=max_tokens,
                web_searches=web_searches,
                fast=fast,
                us_only=us_only,
            )
            worst = [uncached]
            if ttl == "5m":
                worst.append(msgspec.structs.replace(uncached, input_tokens=0, cache_creation_5m=prompt_tokens))
            elif ttl == "1h":
                worst.append(msgspec.structs.replace(uncached, input_tokens=0, cache_creation_1h=prompt_tokens))
            for upstream_id in own:
                for usage in worst:
                    priced = self.cost(model, upstream_id, usage, at)
                    if priced.micro is not None and priced.currency == "USD":
                        bounds.append(priced.micro)
                    else:
                        at_list = True
        if at_list:
            price = self.catalogue.price_for(model, None, at)
            if price is not None:
                # Not `contextlib.suppress`: a context manager's three calls, on every request of a caller with a
                # budget.
                try:  # noqa: SIM105
                    bounds.append(
                        estimate_max_cost(
                            price,
                            prompt_tokens,
                            max_tokens,
                            cache_write_ttl=ttl,
                            web_searches=web_searches,
                            fast=fast,
                            us_only=us_only,
                        )
                    )
                except PriceUnknown:  # searches it has no rate for: no bound from it
                    pass
        if not bounds:
            return None if at_list else 0
        return bounds[0] if len(bounds) == 1 else max(bounds)  # one, usually: no call of `max()` for it

    def covers(self, model: str, at: float, serving: Collection[str]) -> bool:
        """Whether the model has a price wherever a request for it may be served: the catalogue's, or that of
        every upstream serving it (its own price for this model, in any currency, or a flat fee: its
        requests cost nothing at the margin). One upstream that does not price it is enough to leave it
        uncovered: it takes the request when the others are out (a flat-fee account's failover went to a
        metered key at a cost unknown, so a budget was charged nothing). An upstream's price for other
        models, or one that never knows a cost (by characters or images), does not count; a flat fee whose
        month is used up with `fallback_to_metered` serves nothing (metered upstreams do then), one used up
        with `block` still covers (nothing metered serves)."""
        if self.catalogue.price_for(model, None, at) is not None:
            return True
        probe = BillableUsage(input_tokens=1, output_tokens=1)
        serving_now = [upstream_id for upstream_id in serving if not self._used_up_to_metered(upstream_id, at)]
        return bool(serving_now) and all(
            isinstance(self._channels.get(upstream_id), FlatFeeChannel)
            or (upstream_id in self._own_prices and self.cost(model, upstream_id, probe, at).micro is not None)
            for upstream_id in serving_now
        )

    def _used_up_to_metered(self, upstream_id: str, now: float) -> bool:
        channel = self._channels.get(upstream_id)
        return isinstance(channel, FlatFeeChannel) and (
            channel_state(channel, self._counters.get(upstream_id), now) == "exhausted_fallback"
        )

    def timed(self, serving: Collection[str]) -> list[str]:
        """The upstreams among `serving` priced by duration: no estimate bounds what a request costs there,
        since nothing bounds how long it runs (a stream goes on while its chunks keep coming, and the
        timeouts only bound the wait for the first and the silences between them)."""
        return [upstream_id for upstream_id in self._timed if upstream_id in serving]

    def record(self, upstream_id: str, usage: BillableUsage, at: float) -> None:
        """Count a request served by `upstream_id` that started at `at` in its channel's month, the one `cost`
        priced it in: against a flat-fee quota, or towards a tiered price's cumulative usage (price the request
        first: see `sequenced`). A no-op for other metered channels."""
        if upstream_id not in self._counted:
            return
        channel = self._channels[upstream_id]
        counter = self._counters.get(upstream_id)
        if counter is None:
            counter = self._counters[upstream_id] = MonthlyCounter.starting(channel, at)
        counter.record(1, metered_tokens(channel, usage), at)

    def unsaved(self) -> dict[str, dict[str, Any]]:
        """What this process counted since its counts last went to the store, by upstream: the increments
        of the counter's month (all of it, when the month is newer than the last written). Gateways that
        share a store each add their own increments (`store.channels.add_counts`), so its rows are the
        sum of all of them: absolute counts, the last writer's overwrote the others'. `saved` takes the
        increments once they are written; until then they are here again, grown, on the next call."""
        unsaved: dict[str, dict[str, Any]] = {}
        for upstream_id, counter in self._counters.items():
            written = self._written_in(upstream_id, counter.month)
            if written != (counter.requests, counter.tokens):
                requests, tokens = written or (0, 0)
                unsaved[upstream_id] = {
                    "month": counter.month,
                    "requests": counter.requests - requests,
                    "tokens": counter.tokens - tokens,
                }
        return unsaved

    def saved(
        self,
        increments: Mapping[str, Mapping[str, Any]],
        stored: Mapping[str, Mapping[str, Any]] | None = None,
        now: float | None = None,
        raised: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """The increments `unsaved` gave are in the store (more may have been counted meanwhile), and `stored`
        is what the store's rows then held (`store.channels.add_counts`): every process's counts, under the
        `raised` floors it wrote too. What the other processes sharing the store added since this one last
        looked is taken in: a tiered price's next request is priced after theirs too (with two instances each
        priced its own half of the month's requests, and the ledger said one tier too high), and a flat-fee
        quota counts their use within a save interval rather than from the next start."""
        for upstream_id, added in increments.items():
            requests, tokens = self._written_in(upstream_id, added["month"]) or (0, 0)
            self._written[upstream_id] = (added["month"], requests + added["requests"], tokens + added["tokens"])
        for upstream_id in raised or ():
            self._raised.pop(upstream_id, None)
        this_month = month_key(time.time() if now is None else now)
        for upstream_id, row in (stored or {}).items():
            self._take_in(upstream_id, row, this_month)
        for upstream_id in increments:
            counter = self._counters.get(upstream_id)
            if counter is not None:
                self._saved[upstream_id] = counter.snapshot()

    def _take_in(self, upstream_id: str, row: Mapping[str, Any], this_month: str) -> None:
        """The store's `row` of a counter into this process's: the others' part of it added to this one's count
        (its own part, `_written`, it has already)."""
        month, requests, tokens = str(row["month"]), int(row["requests"]), int(row["tokens"])
        channel = self._channels.get(upstream_id)
        if channel is None or upstream_id not in self._counted:
            self._saved[upstream_id] = {"month": month, "requests": requests, "tokens": tokens}  # see `_resume`
            return
        counter = self._counters.get(upstream_id)
        own_requests, own_tokens = self._written_in(upstream_id, month) or (0, 0)
        if counter is not None and month == counter.month:
            counter.requests += max(requests - own_requests, 0)
            counter.tokens += max(tokens - own_tokens, 0)
        elif (counter is None or counter.month < month) and month <= this_month:
            # Other processes' requests opened the month (or the counter): none counted here yet (this one's
            # still under way from the month before count there: `move_on` keeps it open).
            if counter is None:
                self._counters[upstream_id] = MonthlyCounter(channel, month, requests, tokens)
            else:
                counter.move_on(month, requests, tokens)
        else:  # an earlier month's row (what this process counts of the new one is on its way), or a clock ahead
            return
        # All of the row is in this process's count now: only what it counts from here on is to be added.
        self._written[upstream_id] = (month, max(requests, own_requests), max(tokens, own_tokens))

    def _written_in(self, upstream_id: str, month: str) -> tuple[int, int] | None:
        """The (requests, tokens) this process has in the store's count of `month` (nothing yet: zero);
        None when what it wrote last is of another month."""
        written_month, requests, tokens = self._written.get(upstream_id, (month, 0, 0))
        return (requests, tokens) if written_month == month else None


def tiered_price(channel: Channel) -> TieredPrice | None:
    """A metered channel's tiered price (its tiers count the month's cumulative usage), if it has one."""
    pricing = channel.pricing if isinstance(channel, MeteredChannel) else None
    return pricing if isinstance(pricing, TieredPrice) else None


def priced_by_tokens(channel: Channel) -> bool:
    """Whether a request's price on the channel follows from its tokens. A sample of tokens has no characters,
    no duration and no images: priced by those, it cost 0 and, as the cheapest, took every request (its real
    cost unknown, a budget was charged the whole reservation)."""
    pricing = channel.pricing if isinstance(channel, MeteredChannel) else None
    return not isinstance(pricing, CharPrice | DurationPrice | ImagePrice)


def timed_price(channel: Channel) -> DurationPrice | None:
    """A metered channel's price by duration (per minute), if it has one."""
    pricing = channel.pricing if isinstance(channel, MeteredChannel) else None
    return pricing if isinstance(pricing, DurationPrice) else None


def metered_tokens(channel: Channel, usage: BillableUsage) -> int:
    """What a counted channel's monthly counter counts as tokens of `usage` (the sum of requests' usage
    counts as theirs: every meter is a sum of fields)."""
    tiered = tiered_price(channel)
    if tiered is None:
        return tokens_counted(usage)
    # The counter's tokens are the price's meter (a requests meter reads the request count).
    return 0 if tiered.meter == "requests" else tiered.quantity_of(usage)


def counted(channel: Channel) -> bool:
    """Channels with a monthly counter: flat-fee (its quota) and tiered metered (its cumulative usage)."""
    return isinstance(channel, FlatFeeChannel) or tiered_price(channel) is not None


def default_channel(kind: str) -> Channel:
    """An upstream without a `billing` section: subscriptions are flat-fee, API keys metered."""
    return SUBSCRIPTION if kind == "anthropic_oauth" else METERED

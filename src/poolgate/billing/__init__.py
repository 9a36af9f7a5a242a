"""Billing: pricing models in exact integer micro-units, the price catalogue, and channel billing.

The public surface is re-exported here; the modules are `pricing` (the five models and `Cost`),
`catalogue` (the shipped, dated price file and its overrides), `channel` (metered vs flat-fee upstreams,
monthly counters, billing preference for routing), `book` (the gateway's live billing state: each
upstream's channel and counters, what a finished request cost), `values` (what pricing reads and returns:
`BillableUsage`, `Priced`) and `config` (their pydantic configuration form, and the price file's).
"""

from poolgate.billing.catalogue import Catalogue, CatalogueError, canonical_model_id
from poolgate.billing.channel import (
    BillingCandidate,
    BillingPlan,
    Channel,
    FlatFeeChannel,
    MeteredChannel,
    MonthlyCounter,
    channel_cost,
    channel_state,
    month_bounds,
    month_key,
    plan_billing,
    tokens_counted,
)
from poolgate.billing.pricing import (
    AnyPrice,
    CharPrice,
    Cost,
    CreditsPrice,
    DurationPrice,
    ImagePrice,
    LongContext,
    PerTokenPrice,
    PerUnitPrice,
    PriceUnknown,
    PricingModel,
    Tier,
    TieredPrice,
    TokenRates,
    cost_of_usage,
    estimate_max_cost,
    pico_of_usage,
    round_half_up,
)
from poolgate.billing.values import BillableUsage, ImageCount

__all__ = [
    "AnyPrice",
    "BillableUsage",
    "BillingCandidate",
    "BillingPlan",
    "Catalogue",
    "CatalogueError",
    "Channel",
    "CharPrice",
    "Cost",
    "CreditsPrice",
    "DurationPrice",
    "FlatFeeChannel",
    "ImageCount",
    "ImagePrice",
    "LongContext",
    "MeteredChannel",
    "MonthlyCounter",
    "PerTokenPrice",
    "PerUnitPrice",
    "PriceUnknown",
    "PricingModel",
    "Tier",
    "TieredPrice",
    "TokenRates",
    "canonical_model_id",
    "channel_cost",
    "channel_state",
    "cost_of_usage",
    "estimate_max_cost",
    "month_bounds",
    "month_key",
    "pico_of_usage",
    "plan_billing",
    "round_half_up",
    "tokens_counted",
]

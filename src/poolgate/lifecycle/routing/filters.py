"""Routing filters: each a pure function keeping some candidates and giving a reason for each dropped one.

The model stage is the pool's (`Pool.serving`: fixed between pool changes). The stages after it depend on
live state, but in a healthy pool they drop almost nobody: `suspects` finds, in one cheap pass, the few
candidates any of them could drop, and the router runs the filters on those alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase

from poolgate.billing.book import ChannelBook
from poolgate.billing.channel import BillingCandidate, plan_billing
from poolgate.config import PinConfig
from poolgate.lifecycle.routing.trace import PerCandidateReason
from poolgate.lifecycle.sign import OAUTH_KIND
from poolgate.upstreams.health import unusable_reason
from poolgate.upstreams.pool import UpstreamState
from poolgate.upstreams.quota import quota_blocked_until

Dropped = list[tuple[str, PerCandidateReason]]
FilterResult = tuple[list[UpstreamState], Dropped]
Filter = Callable[[Sequence[UpstreamState], str, float], FilterResult]


def health_filter(candidates: Sequence[UpstreamState], model: str, now: float) -> FilterResult:
    kept: list[UpstreamState] = []
    dropped: Dropped = []
    for state in candidates:
        health = state.health
        # The common case first, without a call.
        if (health.healthy and now >= health.parked_until) or (reason := unusable_reason(health, now)) is None:
            kept.append(state)
        else:
            dropped.append((state.upstream.id, reason))  # type: ignore[arg-type]
    return kept, dropped


def ratelimit_filter(candidates: Sequence[UpstreamState], model: str, now: float) -> FilterResult:
    """Stop sending to an account whose last response said a window is used up, before it answers 429."""
    kept: list[UpstreamState] = []
    dropped: Dropped = []
    for state in candidates:
        if state.ratelimited_until > now:
            dropped.append((state.upstream.id, "rate_limited"))
        else:
            kept.append(state)
    return kept, dropped


def quota_filter(candidates: Sequence[UpstreamState], model: str, now: float) -> FilterResult:
    """A subscription account whose 5-hour or 7-day window was rejected waits for that window's reset; one whose
    per-model weekly window was (Opus, say) waits for it with that model's requests only."""
    kept: list[UpstreamState] = []
    dropped: Dropped = []
    for state in candidates:
        if state.quota is not None and quota_blocked_until(state.quota, now, model=model) is not None:
            dropped.append((state.upstream.id, "insufficient_quota"))
        else:
            kept.append(state)
    return kept, dropped


def denied_filter(candidates: Sequence[UpstreamState], model: str, now: float) -> FilterResult:
    """An account that answered 403 for the model (no permission to use it) is left out of its requests for
    a while (`UpstreamState.deny`); its other models' go on."""
    kept: list[UpstreamState] = []
    dropped: Dropped = []
    for state in candidates:
        if state.denied and state.denied_until(model, now) is not None:
            dropped.append((state.upstream.id, "model_denied"))
        else:
            kept.append(state)
    return kept, dropped


def pin_for(pins: Sequence[PinConfig], model: str, caller: str | None) -> PinConfig | None:
    """The first configured pin this request matches, if any."""
    for pin in pins:
        if pin.model is not None and not fnmatchcase(model, pin.model):
            continue
        if pin.caller is not None and (caller is None or not fnmatchcase(caller, pin.caller)):
            continue
        return pin
    return None


def pin_problems(pins: Sequence[PinConfig], enabled: Mapping[str, bool]) -> list[str]:
    """What is wrong with pins, one line each, given whether each upstream (configured or stored) is enabled:
    the upstreams a pin names that do not exist, which the requests it matches cannot go to, and the disabled
    ones when it names no enabled upstream: the requests it matches get a 529 while that lasts."""
    problems = []
    for index, pin in enumerate(pins):
        unknown = [upstream_id for upstream_id in pin.upstreams if upstream_id not in enabled]
        disabled = [upstream_id for upstream_id in pin.upstreams if enabled.get(upstream_id) is False]
        served = len(unknown) + len(disabled) < len(pin.upstreams)
        outcome = "skipped" if served else "no request it matches can be served"
        if unknown:
            names = ", ".join(unknown)
            problems.append(f"routing.pins[{index}] names {names}: no such upstream is configured or stored, {outcome}")
        if disabled and not served:
            names = ", ".join(disabled)
            problems.append(
                f"routing.pins[{index}] names {names}: disabled, and no upstream it names is enabled: {outcome}"
            )
    return problems


def pin_filter(candidates: Sequence[UpstreamState], pin: PinConfig) -> FilterResult:
    kept: list[UpstreamState] = []
    dropped: Dropped = []
    for state in candidates:
        if state.upstream.id in pin.upstreams:
            kept.append(state)
        else:
            dropped.append((state.upstream.id, "not_pinned"))
    return kept, dropped


def credential_filter(candidates: Sequence[UpstreamState], problem: Callable[[str], str | None]) -> FilterResult:
    """Accounts whose credential is unusable (an OAuth account that needs a new login) are skipped."""
    kept: list[UpstreamState] = []
    dropped: Dropped = []
    for state in candidates:
        reason = problem(state.upstream.id)
        if reason is None:
            kept.append(state)
        else:
            dropped.append((state.upstream.id, reason))  # type: ignore[arg-type]
    return kept, dropped


def billing_filter(
    candidates: Sequence[UpstreamState],
    book: ChannelBook,
    now_wall: float,
    unusable: Sequence[UpstreamState] = (),
) -> tuple[list[UpstreamState], Dropped, str | None]:
    """Flat-fee channels whose monthly quota is used up are dropped (`insufficient_quota`); when one of them
    says `block` and no flat-fee capacity is left, the metered ones go too (`blocked_by_billing`), and the
    third value is the message for the 503. `unusable` are the request's other candidates, which earlier
    stages dropped: a used-up `block` channel among them blocks all the same. `now_wall` is epoch seconds
    (months are UTC calendar months)."""

    def candidate(state: UpstreamState, usable: bool) -> BillingCandidate:
        upstream_id = state.upstream.id
        return BillingCandidate(upstream_id, book.channel(upstream_id), book.counter(upstream_id), usable=usable)

    plan = plan_billing(
        [*(candidate(state, True) for state in candidates), *(candidate(state, False) for state in unusable)],
        now_wall,
    )
    if not plan.excluded:
        return list(candidates), [], None
    kept: list[UpstreamState] = []
    dropped: Dropped = []
    for state in candidates:
        reason = plan.excluded.get(state.upstream.id)
        if reason is None:
            kept.append(state)
        else:
            dropped.append(
                (state.upstream.id, "insufficient_quota" if reason == "insufficient_quota" else "blocked_by_billing")
            )
    return kept, dropped, plan.blocked


def suspects(candidates: Sequence[UpstreamState], model: str, now: float, credentials: bool) -> list[UpstreamState]:
    """The candidates for `model` one of the live-state filters (quota, health, rate limits, model denials,
    and with `credentials` the credential check) might drop: every one they would drop, and few others. A
    candidate not listed is kept by all of them, so they need not look at it."""
    return [
        state
        for state in candidates
        if state.ratelimited_until > now
        or state.quota is not None
        or not (health := state.health).healthy
        or health.parked_until > now
        or (state.denied and state.holds_out(model))
        or (credentials and state.upstream.kind == OAUTH_KIND)
    ]


# Quota before health: a subscription window's 429 also parks the account, and the reason worth reporting
# is the window (`insufficient_quota`, until its reset), not the park.
FILTERS: tuple[tuple[str, Filter], ...] = (
    ("quota", quota_filter),
    ("health", health_filter),
    ("ratelimit", ratelimit_filter),
    ("denied", denied_filter),
)

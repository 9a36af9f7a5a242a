"""Routing filters: each a pure function keeping some candidates and giving a reason for each dropped one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

from poolgate.lifecycle.routing.trace import PerCandidateReason
from poolgate.upstreams.health import unusable_reason
from poolgate.upstreams.pool import UpstreamState
from poolgate.upstreams.ratelimits import exhausted_until

Dropped = list[tuple[str, PerCandidateReason]]
FilterResult = tuple[list[UpstreamState], Dropped]
Filter = Callable[[Sequence[UpstreamState], str, float], FilterResult]


def serves_model(globs: tuple[str, ...], model: str) -> bool:
    return not globs or any(fnmatchcase(model, glob) for glob in globs)


def model_filter(candidates: Sequence[UpstreamState], model: str, now: float) -> FilterResult:
    kept: list[UpstreamState] = []
    dropped: Dropped = []
    for state in candidates:
        if serves_model(state.upstream.models, model):
            kept.append(state)
        else:
            dropped.append((state.upstream.id, "model_not_supported"))
    return kept, dropped


def health_filter(candidates: Sequence[UpstreamState], model: str, now: float) -> FilterResult:
    kept: list[UpstreamState] = []
    dropped: Dropped = []
    for state in candidates:
        reason = unusable_reason(state.health, now)
        if reason is None:
            kept.append(state)
        else:
            dropped.append((state.upstream.id, reason))  # type: ignore[arg-type]
    return kept, dropped


def ratelimit_filter(candidates: Sequence[UpstreamState], model: str, now: float) -> FilterResult:
    """Stop sending to an account whose last response said a window is used up, before it answers 429."""
    kept: list[UpstreamState] = []
    dropped: Dropped = []
    for state in candidates:
        if state.ratelimits and exhausted_until(state.ratelimits, now) is not None:
            dropped.append((state.upstream.id, "rate_limited"))
        else:
            kept.append(state)
    return kept, dropped


FILTERS: tuple[tuple[str, Filter], ...] = (
    ("model", model_filter),
    ("health", health_filter),
    ("ratelimit", ratelimit_filter),
)

"""Upstream health as a small state machine: pure transitions, the clock passed in.

- `failure_threshold` consecutive failures → unhealthy; a server error (any 5xx but 529) or a misconfigured
  base_url (a redirect, a proxy's 407, a 4xx or 200 that is not the API's answer) → unhealthy at once.
- An unhealthy upstream cools down for base × multiplier[episode] (1×, 5×, 15× by default), where the
  episode counts how often it went unhealthy without a success in between; after the cooldown a single
  probe request may try it (half-open).
- Any success → healthy, counters cleared. A stream's first event is half a success (`record_answer`): the
  account answers, so it is healthy again (a half-open probe passed), but the streak of failures goes on until
  the stream ends whole, so an account that breaks every stream after its first event is taken out like one
  that fails before it (reset at each first event, its streak never reached the threshold).
- A failure of a request sent while the upstream was already unhealthy and not its probe (it was in flight
  when the upstream failed, or the router's panic mode sent it) changes nothing: the episode is not
  escalated again, so a burst of concurrent failures is one episode, not three; nor does the first event of
  a stream sent before it went unhealthy.
- A 429 with `retry-after` parks the upstream until then, without calling it unhealthy (`rate_limited`, or
  `insufficient_quota` for a subscription's rejected window, a park lifted with the rejection); so does a 5xx
  or 529 that says when to come back (`parked`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from poolgate.config import HealthConfig


class Failure(enum.Enum):
    connect = "connect"  # connection refused/reset, timeout before the first byte
    server_error = "server_error"  # a 5xx but 529: something is broken on that side
    overloaded = "overloaded"  # 529: transient and often pool-wide, so only counted
    auth = "auth"  # 401/403: the account's credential was rejected
    # A redirect, a proxy's 407, or a 4xx or 200 that is not the API's answer: the account's base_url is not the API's.
    misconfigured = "misconfigured"


# What no wait cures: only the operator can (a retry does not help while every account is out for it).
OPERATORS_TO_FIX = frozenset({Failure.auth, Failure.misconfigured})


# Bumped whenever an account may have become one the router's live-state filters drop (unhealthy, parked,
# out of rate-limit headroom, a subscription quota to check): while it stays the same, the accounts found
# in doubt before are still all that can be (time passing only clears doubts). Every change of those
# fields goes through `doubt()`; see `Router._suspects`.
_doubts = 0


def doubts() -> int:
    return _doubts


def doubt() -> None:
    """Say that some account may now be in doubt (call after making it unhealthy, parked, rate-limited…)."""
    global _doubts
    _doubts += 1


@dataclass(slots=True)
class HealthState:
    consecutive_failures: int = 0
    healthy: bool = True
    episodes: int = 0
    retry_at: float = 0.0
    parked_until: float = 0.0
    # Why it is parked: a 429 (`rate_limited`), or a failing account that said when to come back (`parked`).
    parked_for: str = "rate_limited"
    # The probe in flight (see `begin_attempt`), 0 when none; `probes` numbers them: a request that began as
    # the probe of an earlier episode and ends after a newer probe began must not free the newer one's slot.
    probing: int = 0
    probes: int = 0
    # The kind of the last failure since the last success: an account unhealthy from credential rejections
    # is out until the operator acts, not for a while.
    last_failure: Failure | None = None
    # When it last went unhealthy (the monotonic clock of the requests' `sent_at`).
    marked_at: float = float("-inf")

    def awaits_operator(self) -> bool:
        """Its last failure since its last success was a rejected credential or a misconfigured base_url
        (`OPERATORS_TO_FIX`): no wait brings it back. Panic mode passes it over, readiness does not count it as
        cooling down, no retry waits for it, and a session does not stay on it."""
        return self.last_failure in OPERATORS_TO_FIX


def record_answer(state: HealthState, sent_at: float | None = None) -> bool:
    """A stream's first event: the account answers (healthy again, its probe passed), while its streak of
    failures and episodes stand until the stream ends whole (`record_success`): a break then continues them.
    The first event of a stream sent before the account went unhealthy is no probe and changes nothing: the
    streams of a burst that break one after the other each made it healthy again with their first events, and
    the next break a new episode (30 streams breaking on one account took it out for 75 s, not 5).
    True when this made an unhealthy upstream healthy again."""
    if not state.healthy and sent_at is not None and sent_at < state.marked_at:
        return False
    recovered = not state.healthy
    state.healthy = True
    state.retry_at = 0.0
    state.probing = 0
    state.last_failure = None
    return recovered


def record_success(state: HealthState) -> bool:
    """True when this success made an unhealthy upstream healthy again."""
    recovered = record_answer(state)
    state.consecutive_failures = 0
    state.episodes = 0
    return recovered


def record_failure(
    state: HealthState, failure: Failure, now: float, config: HealthConfig, sent_at: float | None = None
) -> bool:
    """True when this failure made the upstream unhealthy (or sent it back to cooldown after a probe). A
    failure of a request sent (at `sent_at`) before the account went unhealthy is no verdict of the probe in
    flight, as its first event is none (`record_answer`): taken for it, it began a new episode and freed the
    probe's half-open slot, and a second probe went out beside it."""
    state.consecutive_failures += 1
    state.last_failure = failure
    was_probe = bool(state.probing) and (sent_at is None or sent_at >= state.marked_at)
    if was_probe:
        state.probing = 0
    if not state.healthy and not was_probe:
        return False
    if (
        failure in (Failure.server_error, Failure.misconfigured)
        or was_probe
        or state.consecutive_failures >= config.failure_threshold
    ):
        _mark_unhealthy(state, now, config)
        return True
    return False


def _mark_unhealthy(state: HealthState, now: float, config: HealthConfig) -> None:
    multipliers = config.cooldown_multipliers
    factor = multipliers[min(state.episodes, len(multipliers) - 1)]
    state.healthy = False
    state.episodes += 1
    state.marked_at = now
    state.retry_at = now + config.cooldown_seconds * factor
    doubt()


def record_rate_limited(state: HealthState) -> None:
    """A 429: the API took the account's credential (it counts requests against the account), so a rejection
    before it is over (a key enabled again, a token renewed). Left standing until a success, it kept the account
    out of the accounts a retry may go to, and a client was told to wait for a slower account's reset instead."""
    if state.last_failure is Failure.auth:
        state.last_failure = None


def park(state: HealthState, until: float, reason: str = "rate_limited") -> None:
    if until > state.parked_until:
        state.parked_until = until
        state.parked_for = reason
        doubt()


def lift_park(state: HealthState, reason: str) -> None:
    """End a park taken for `reason` before its time: what caused it is over."""
    if state.parked_for == reason:
        state.parked_until = 0.0


def unusable_reason(state: HealthState, now: float) -> str | None:
    """None when the upstream may take a request now; else the routing reason it may not."""
    if now < state.parked_until:
        return state.parked_for
    if state.healthy:
        return None
    if now >= state.retry_at and not state.probing:
        return None
    return "unhealthy"


def refuses_failover(state: HealthState, now: float) -> str | None:
    """`unusable_reason` for a request failing over to the account: one past its cooldown takes it even while
    its probe is in flight. The single probe limits what is sent first to an account that may still be
    broken; it took as long as any answer, and meanwhile requests failing elsewhere passed over accounts
    that had recovered long before (their first request after a quiet spell is their probe) and got errors."""
    if now < state.parked_until:
        return state.parked_for
    if state.healthy or now >= state.retry_at:
        return None
    return "unhealthy"


def begin_attempt(state: HealthState, now: float) -> int:
    """An unhealthy upstream past its cooldown gets exactly one probe at a time: when this attempt is that
    probe, its number (hand it to `end_probe` when the attempt ends), else 0."""
    if not state.healthy and now >= state.retry_at and not state.probing:
        state.probes += 1
        state.probing = state.probes
        return state.probing
    return 0


def end_probe(state: HealthState, probe: int) -> None:
    """A probe that ended without a verdict (a 429, the client leaving, a credential that could not be
    refreshed) frees the half-open slot for the next one; a success or failure has already done so.
    Without this the upstream stayed "probing", and so out of rotation, until a restart. A probe whose
    verdict came long ago (a stream that made its account healthy with its first event and ran on while the
    account failed and cooled down again) leaves the slot of the probe now in flight alone: freed, a second
    probe went out beside it."""
    if state.probing == probe:
        state.probing = 0

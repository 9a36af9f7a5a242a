"""Subscription (Pro/Max) quota: the `anthropic-ratelimit-unified-*` headers and the usage endpoint, as
`SubscriptionQuotaSnapshot`s per window, plus the pure functions the router ranks accounts with.

A subscription account has a rolling 5-hour window, a 7-day window (sometimes per-model weekly windows)
and optionally paid overage. Every response says how far each window is used (a fraction, may exceed 1),
when it resets (epoch seconds) and whether it still admits requests (`allowed`, `allowed_warning`,
`rejected`). None of this is an official contract, so every value is parsed defensively: anything
malformed is dropped, never raised — a header the gateway cannot read must not fail a request the
upstream served.

Clocks: resets arrive as wall-clock epochs and stay that way in the snapshots; each snapshot also records
the monotonic and wall time it was observed, so that `quota_blocked_until` can answer on the monotonic
clock the router and the health state machine use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

QuotaStatus = Literal["allowed", "allowed_warning", "rejected"]
QuotaSource = Literal["headers", "usage_endpoint"]
DataState = Literal["fresh", "stale", "missing"]

PREFIX = "anthropic-ratelimit-unified-"
STATUSES: frozenset[str] = frozenset({"allowed", "allowed_warning", "rejected"})

FIVE_HOUR = "five_hour"
SEVEN_DAY = "seven_day"
OVERAGE = "overage"

# Header infix → window name (the names the usage endpoint and `representative-claim` use).
WINDOW_PREFIXES: dict[str, str] = {
    "5h": FIVE_HOUR,
    "7d": SEVEN_DAY,
    "7d_opus": "seven_day_opus",
    "7d-opus": "seven_day_opus",
    "7d_sonnet": "seven_day_sonnet",
    "7d-sonnet": "seven_day_sonnet",
    "overage": OVERAGE,
}
WINDOW_SECONDS: dict[str, float] = {
    FIVE_HOUR: 5 * 3600.0,
    SEVEN_DAY: 7 * 86400.0,
    "seven_day_opus": 7 * 86400.0,
    "seven_day_sonnet": 7 * 86400.0,
}
CLAIMS: frozenset[str] = frozenset({FIVE_HOUR, SEVEN_DAY, "seven_day_opus", "seven_day_sonnet", OVERAGE})
# A per-model weekly window binds only the requests for its model family: an account whose Opus week is used
# up still serves Sonnet and Haiku (their headers report it on every answer, and the aggregate status names it
# `rejected` when it is the binding claim). Every other window binds every request.
MODEL_WINDOWS: dict[str, str] = {"seven_day_opus": "opus", "seven_day_sonnet": "sonnet"}
# The model families an account's quota can treat apart (`model_family`); every other model is `OTHER_FAMILY`.
MODEL_FAMILIES: tuple[str, ...] = ("opus", "sonnet", "haiku")
OTHER_FAMILY = "other"

# A rejected window that names no reset: try the account again after this long (one request tells).
DEFAULT_REJECTED_PARK_SECONDS = 300.0
# `allowed_warning` means Anthropic itself thinks the account is getting close: at least this pressure.
# Kept below half: with the default weights (quota 4, metered 2) a warning alone ranks the account behind
# other subscription accounts but not behind a metered key (it tied with one at 0.5: paid-for capacity
# went unused and the metered key was billed).
WARNING_PRESSURE = 0.25
# The weekly pace gate tolerates running this far (in utilisation) ahead of the elapsed share of the week.
DEFAULT_PACE_SLACK = 0.05
# Epochs outside this range are garbage (or milliseconds), not a reset time.
_MIN_EPOCH, _MAX_EPOCH = 1_000_000_000.0, 10_000_000_000.0
_MAX_UTILISATION = 1000.0


@dataclass(frozen=True, slots=True)
class SubscriptionQuotaSnapshot:
    """One quota window of one account as last observed."""

    window: str  # five_hour | seven_day | seven_day_opus | seven_day_sonnet | overage
    status: QuotaStatus | None
    utilization: float | None  # fraction of the window used (0–1, may exceed 1)
    resets_at: float | None  # epoch seconds
    surpassed_threshold: float | None  # the warning threshold the window has passed, if any
    observed_at: float  # monotonic clock
    observed_at_wall: float  # epoch seconds at the same instant
    source: QuotaSource

    def data_state(self, now_mono: float, max_staleness: float) -> DataState:
        """`fresh` while observed within `max_staleness` seconds and its window has not reset since."""
        if now_mono - self.observed_at > max_staleness:
            return "stale"
        if self.resets_at is not None and self.observed_at_wall + (now_mono - self.observed_at) >= self.resets_at:
            return "stale"
        return "fresh"

    def resets_at_mono(self) -> float | None:
        if self.resets_at is None:
            return None
        return self.observed_at + (self.resets_at - self.observed_at_wall)


@dataclass(frozen=True, slots=True)
class FamilyRejection:
    """An aggregate `rejected` learnt from an answer to a request for one model family, which named no window
    that binds every model: it holds that family's requests out until its reset, whatever the answers for
    other families say after it (see `held_rejections`)."""

    reset_at: float | None  # epoch seconds; None: the answer named none
    observed_at: float  # monotonic
    observed_at_wall: float

    def until_wall(self) -> float:
        """When it ends (epoch seconds)."""
        if self.reset_at is None:
            return self.observed_at_wall + DEFAULT_REJECTED_PARK_SECONDS
        return self.reset_at

    def until(self) -> float:
        """When it ends, on the monotonic clock."""
        return self.observed_at + (self.until_wall() - self.observed_at_wall)


@dataclass(frozen=True, slots=True)
class QuotaPicture:
    """Everything one response (or one usage-endpoint answer) said about an account's subscription quota."""

    windows: Mapping[str, SubscriptionQuotaSnapshot]
    observed_at: float  # monotonic
    observed_at_wall: float
    source: QuotaSource
    status: QuotaStatus | None = None  # the aggregate status: does the account admit requests now?
    reset_at: float | None = None  # epoch of the binding window's reset
    representative_claim: str | None = None  # which window binds
    fallback: str | None = None
    fallback_percentage: float | None = None
    overage_in_use: bool | None = None
    overage_disabled_reason: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)  # unknown unified-* headers, kept for display
    # The model family of the request the (latest) answer was for; None when not known (a usage-endpoint answer).
    family: str | None = None
    # The aggregate rejections held per model family (at most one per family: `model_family`).
    rejected_families: Mapping[str, FamilyRejection] = field(default_factory=dict)

    def window(self, name: str) -> SubscriptionQuotaSnapshot | None:
        return self.windows.get(name)

    def data_state(self, now_mono: float, max_staleness: float) -> DataState:
        """The state of the account's quota data as a whole: fresh if its 5h or 7d window is fresh."""
        return quota_data_state(self, now_mono, max_staleness)


# ----- parsing -----------------------------------------------------------------------------------------


def _float(value: str | None, low: float = 0.0, high: float = _MAX_UTILISATION) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except (ValueError, AttributeError):
        return None
    if not math.isfinite(number) or number < low or number > high:
        return None
    return number


def _epoch(value: str | None) -> float | None:
    """Epoch seconds (what the unified headers carry), or an RFC 3339 / ISO 8601 timestamp."""
    if value is None:
        return None
    number = _float(value, _MIN_EPOCH, _MAX_EPOCH)
    if number is not None:
        return number
    return iso_epoch(value)


def iso_epoch(value: object) -> float | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        # RFC 3339 lets the `T` and `Z` be lowercase, which `fromisoformat` refuses.
        parsed = datetime.fromisoformat(value.strip().upper().replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    try:
        epoch = parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        return None
    return epoch if _MIN_EPOCH <= epoch <= _MAX_EPOCH else None


def _status(value: str | None) -> QuotaStatus | None:
    if value is None:
        return None
    status = value.strip().lower()
    return status if status in STATUSES else None  # type: ignore[return-value]


def _bool(value: str | None) -> bool | None:
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    return None


def _text(value: str | None, limit: int = 64) -> str | None:
    if value is None:
        return None
    text = value.strip()
    return text[:limit] if text and text.isprintable() else None


def _unified(headers: Mapping[str, str]) -> dict[str, str]:
    """The unified-* headers by lower-cased suffix; works for plain dicts and case-insensitive multidicts."""
    found: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            continue
        lowered = name.lower()
        if lowered.startswith(PREFIX):
            found.setdefault(lowered[len(PREFIX) :], value)
    return found


def parse_unified_headers(headers: Mapping[str, str], mono: float, wall: float, model: str = "") -> QuotaPicture | None:
    """The quota picture a response's headers describe, the answer to a request for `model` (`""`: not known);
    None when they carry nothing readable.

    Never raises, whatever the values: a malformed field is dropped and the rest is kept.
    """
    try:
        raw = _unified(headers)
    except Exception:  # an exotic mapping that cannot even be iterated: no picture, no failure
        return None
    if not raw:
        return None
    windows: dict[str, SubscriptionQuotaSnapshot] = {}
    used: set[str] = set()
    for infix, name in WINDOW_PREFIXES.items():
        status = _status(raw.get(f"{infix}-status"))
        utilization = _float(raw.get(f"{infix}-utilization"))
        resets_at = _epoch(raw.get(f"{infix}-reset"))
        threshold = _float(raw.get(f"{infix}-surpassed-threshold"))
        used.update(f"{infix}-{part}" for part in ("status", "utilization", "reset", "surpassed-threshold"))
        if status is None and utilization is None and resets_at is None and threshold is None:
            continue
        if name in windows:  # both spellings of a per-model window: the first one wins
            continue
        windows[name] = SubscriptionQuotaSnapshot(
            name, status, utilization, resets_at, threshold, mono, wall, "headers"
        )
    claim = _text(raw.get("representative-claim"))
    family = model_family(model) if model else None
    status = _status(raw.get("status"))
    picture = QuotaPicture(
        windows=windows,
        observed_at=mono,
        observed_at_wall=wall,
        source="headers",
        status=status,
        reset_at=_epoch(raw.get("reset")),
        representative_claim=binding_claim(
            status, claim.lower() if claim and claim.lower() in CLAIMS else None, windows
        ),
        fallback=_text(raw.get("fallback")),
        fallback_percentage=_float(raw.get("fallback-percentage")),
        overage_in_use=_bool(raw.get("overage-in-use")),
        overage_disabled_reason=_text(raw.get("overage-disabled-reason")),
        extra={
            key: text
            for key, value in raw.items()
            if key not in used
            and key not in _PICTURE_FIELDS
            and len(key) <= 64
            and (text := _text(value, 128)) is not None
        },
        family=family,
    )
    if not windows and picture.status is None and picture.reset_at is None and picture.representative_claim is None:
        return None
    if family is not None and holds_family_out(picture.status, picture.representative_claim, family):
        rejection = FamilyRejection(picture.reset_at, mono, wall)
        return replace(picture, rejected_families={family: rejection})
    return picture


_PICTURE_FIELDS = frozenset(
    {
        "status",
        "reset",
        "representative-claim",
        "fallback",
        "fallback-percentage",
        "overage-in-use",
        "overage-disabled-reason",
    }
)


def parse_usage_response(payload: object, mono: float, wall: float) -> QuotaPicture | None:
    """The subscription usage endpoint's answer: `{"five_hour": {"utilization": 12.0, "resets_at": ISO}, …}`.

    There utilisation is a percentage (0–100); it is stored as a fraction like the headers'.
    """
    if not isinstance(payload, dict):
        return None
    windows: dict[str, SubscriptionQuotaSnapshot] = {}
    for name in WINDOW_SECONDS:
        entry = payload.get(name)
        if not isinstance(entry, dict):
            continue
        percent = entry.get("utilization")
        utilization = None
        if isinstance(percent, int | float) and not isinstance(percent, bool):
            utilization = float(percent) / 100.0
            if not math.isfinite(utilization) or not 0.0 <= utilization <= _MAX_UTILISATION:
                utilization = None
        resets_at = iso_epoch(entry.get("resets_at"))
        if utilization is None and resets_at is None:
            continue
        windows[name] = SubscriptionQuotaSnapshot(
            name, None, utilization, resets_at, None, mono, wall, "usage_endpoint"
        )
    if not windows:
        return None
    return QuotaPicture(windows=windows, observed_at=mono, observed_at_wall=wall, source="usage_endpoint")


def binding_claim(
    status: QuotaStatus | None, claim: str | None, windows: Mapping[str, SubscriptionQuotaSnapshot]
) -> str | None:
    """The window an answer's aggregate status stands for: its representative claim, or, for a `rejected`
    that names none, the one window the answer's own headers say is used up, where they report the windows of
    every model (5-hour, 7-day) too. The API's answers say `rejected` while the Opus week is used up, a Sonnet
    request's too: without a claim, that held Sonnet out, and the whole account, till the Opus week's reset."""
    if (
        claim is not None
        or status != "rejected"
        or not all(name in windows and windows[name].status is not None for name in (FIVE_HOUR, SEVEN_DAY))
    ):
        return claim
    used_up = [name for name, snapshot in windows.items() if name != OVERAGE and snapshot.status == "rejected"]
    return used_up[0] if len(used_up) == 1 else None


def model_family(model: str) -> str:
    """`opus`, `sonnet` or `haiku` as the model id names one (as `binds` reads a per-model window's), else
    `other`: few, so what is kept per family stays small."""
    lowered = model.lower()
    for family in MODEL_FAMILIES:
        if family in lowered:
            return family
    return OTHER_FAMILY


def holds_family_out(status: QuotaStatus | None, claim: str | None, family: str) -> bool:
    """Whether an answer's aggregate status, for a request of `family`, rejects that family apart from the
    others: `rejected` with no representative claim (which window is used up is not said) or with the claim
    of that family's own weekly window. A claim of a window that binds every model (5-hour, 7-day, overage)
    is the whole account's, and an answer for any family that says `allowed` after it shows it over; one of
    another family's window (a used-up Opus week named on a Sonnet answer) does not reject this family."""
    return status == "rejected" and (claim is None or MODEL_WINDOWS.get(claim) == family)


def admits_family(status: QuotaStatus | None, claim: str | None, family: str) -> bool:
    """Whether an answer's aggregate status, for a request of `family`, admits that family: `allowed`, or a
    `rejected` that another family's weekly window claims (the API's answer to a Sonnet request while the Opus
    week is used up: it served the request; taken as no `allowed`, a Sonnet hold outlived every such answer)."""
    if status in ("allowed", "allowed_warning"):
        return True
    return status == "rejected" and MODEL_WINDOWS.get(claim or "") not in (None, family)


def held_rejections(held: Mapping[str, FamilyRejection], answer: QuotaPicture) -> Mapping[str, FamilyRejection]:
    """The family rejections (`holds_family_out`) still held once a header answer is taken in: the answer's
    own, and the earlier ones that have not reset unless the answer admits their family (`admits_family`, as its
    aggregate status for that family, or `allowed`, `allowed_warning` as that family's own weekly window). An
    answer's aggregate status for another family proves only that family served: taken as the whole account's,
    a Sonnet answer's `allowed` sent the next Opus request back to an account whose Opus week was used up, for
    another 429, after every Sonnet answer."""
    if not held:
        return answer.rejected_families
    now = answer.observed_at
    kept = {family: rejection for family, rejection in held.items() if rejection.until() > now}
    if answer.family is not None and admits_family(answer.status, answer.representative_claim, answer.family):
        kept.pop(answer.family, None)
    # An answer that carries a family's own weekly window says whether it is used up, whichever model it was for:
    # held against its `allowed` (the week lifted early), the family's requests stayed out till the old reset,
    # none reaching the account to learn otherwise.
    for window, family in MODEL_WINDOWS.items():
        snapshot = answer.windows.get(window)
        if snapshot is not None and snapshot.status in ("allowed", "allowed_warning"):
            kept.pop(family, None)
    kept.update(answer.rejected_families)
    return kept


def held_for(picture: QuotaPicture, model: str) -> FamilyRejection | None:
    """The rejection held for `model`'s family (`held_rejections`), if any (`""`: any model, none)."""
    return picture.rejected_families.get(model_family(model)) if model and picture.rejected_families else None


def merge_pictures(old: QuotaPicture | None, new: QuotaPicture | None) -> QuotaPicture | None:
    """The newest observation of each window; a window the new answer does not mention keeps its old one.

    The aggregate fields (status, reset, claim) describe the moment of one answer, so they come from the
    new picture when it is a header picture; a usage-endpoint answer has none and keeps the old ones. A
    rejection of one model family outlives answers for the others (`held_rejections`).
    """
    if new is None:
        return old
    if old is None:
        return new
    if new.source != "usage_endpoint":
        return replace(
            new,
            windows={**old.windows, **new.windows},
            rejected_families=held_rejections(old.rejected_families, new),
        )
    windows = dict(old.windows)
    for name, snapshot in new.windows.items():
        known = old.windows.get(name)
        if snapshot.resets_at is None and known is not None and _live(known, new.observed_at_wall):
            # The endpoint did not say when the window resets; the headers did, and it has not happened yet.
            snapshot = replace(snapshot, resets_at=known.resets_at)
        windows[name] = snapshot
    status, reset_at = old.status, old.reset_at
    newer = replace(old, windows=windows)
    # The windows the rejection stands for: a per-model claim's and those of every model, or those alone.
    scope = MODEL_WINDOWS.get(old.representative_claim or "", "")
    if status == "rejected" and not any(True for _ in _blocking_windows(newer, scope)):
        # Newer figures than the rejection say nothing it stands for is used up (a plan upgrade, extra usage
        # bought): the account admits requests again before the reset the rejection announced (an Opus week
        # still used up holds out only Opus requests, by its own window).
        status, reset_at = None, None
    # So do a family's rejections, by the windows that bind that family.
    rejected_families = {
        family: rejection
        for family, rejection in old.rejected_families.items()
        if any(True for _ in _blocking_windows(newer, family))
    }
    return replace(
        newer,
        status=status,
        reset_at=reset_at,
        observed_at=new.observed_at,
        observed_at_wall=new.observed_at_wall,
        source=new.source,
        rejected_families=rejected_families,
    )


# ----- state of the data -------------------------------------------------------------------------------


def quota_data_state(picture: QuotaPicture | None, now_mono: float, max_staleness: float) -> DataState:
    if picture is None:
        return "missing"
    main = [picture.windows[name] for name in (FIVE_HOUR, SEVEN_DAY) if name in picture.windows]
    if not main:
        return "missing"
    return "fresh" if any(s.data_state(now_mono, max_staleness) == "fresh" for s in main) else "stale"


def should_poll_usage(
    picture: QuotaPicture | None,
    now_mono: float,
    max_staleness: float,
    last_poll_mono: float | None,
    min_interval: float,
) -> bool:
    """Ask the usage endpoint only when the headers have gone stale (an idle account), and rarely."""
    if last_poll_mono is not None and now_mono - last_poll_mono < min_interval:
        return False
    return quota_data_state(picture, now_mono, max_staleness) != "fresh"


# ----- what the router asks ----------------------------------------------------------------------------


def binds(window: str | None, model: str) -> bool:
    """Whether a window (or the aggregate status's representative claim) limits a request for `model`; `""`
    stands for a request of any model, which only the windows that bind every model limit."""
    family = MODEL_WINDOWS.get(window or "")
    return family is None or family in model.lower()


def _blocking_windows(picture: QuotaPicture, model: str) -> Iterable[SubscriptionQuotaSnapshot]:
    """The used-up windows that limit a request for `model` (see `binds`)."""
    for name, snapshot in picture.windows.items():
        if name == OVERAGE or not binds(name, model):
            # Overage is extra paid usage: "rejected" there (e.g. disabled for the org) blocks nothing alone.
            continue
        if snapshot.status == "rejected":
            yield snapshot
        elif (
            snapshot.status is None
            and snapshot.source == "usage_endpoint"
            and snapshot.utilization is not None
            and snapshot.utilization >= 1.0
        ):
            # The usage endpoint has no status: a window used up is as good as rejected.
            yield snapshot


def quota_blocked_until(picture: QuotaPicture | None, now_mono: float, model: str = "") -> float | None:
    """When the account's subscription quota admits requests for `model` again (monotonic), or None if it does
    now; `""`: requests of any model (only a window that binds every model holds the whole account out).

    A rejected window parks the account until that window resets (routing reason `insufficient_quota`);
    retrying it earlier only earns 429s with `retry-after` hours away. Paid overage (an organization's extra
    usage) the window's answers may say is allowed is not drawn on: it is billed by the token, which a
    subscription's flat fee was chosen to avoid.
    """
    if picture is None:
        return None
    held = held_for(picture, model)
    # A hold whose reset has passed stays in the picture until the next answer: it holds nothing out.
    until: float | None = held.until() if held is not None and held.until() > now_mono else None
    for snapshot in _blocking_windows(picture, model):
        reset = snapshot.resets_at_mono()
        candidate = reset if reset is not None else snapshot.observed_at + DEFAULT_REJECTED_PARK_SECONDS
        if candidate > now_mono:
            until = candidate if until is None else max(until, candidate)
    if picture.status == "rejected" and binds(picture.representative_claim, model):
        if picture.reset_at is not None:
            candidate = picture.observed_at + (picture.reset_at - picture.observed_at_wall)
        elif until is not None:
            candidate = until
        else:
            candidate = picture.observed_at + DEFAULT_REJECTED_PARK_SECONDS
        if candidate > now_mono:
            until = candidate if until is None else max(until, candidate)
    return until


def quota_blocked_until_wall(picture: QuotaPicture | None, now_wall: float) -> float | None:
    """`quota_blocked_until` on the wall clock, for pictures read back from the store (the CLI)."""
    if picture is None:
        return None
    now_mono = picture.observed_at + (now_wall - picture.observed_at_wall)
    until = quota_blocked_until(picture, now_mono)
    return None if until is None else picture.observed_at_wall + (until - picture.observed_at)


def _live(snapshot: SubscriptionQuotaSnapshot, now_wall: float) -> bool:
    """False once the window has reset since it was observed: its utilisation then says nothing."""
    return snapshot.resets_at is None or snapshot.resets_at > now_wall


def quota_pressure(
    picture: QuotaPicture | None,
    now_wall: float,
    threshold: float,
    pace_slack: float = DEFAULT_PACE_SLACK,
    model: str = "",
) -> float:
    """How strongly to avoid this account for a request for `model`, in [0, 1]: 0 = plenty of quota, 1 = at
    (or past) the wall. Only the windows that bind the model count (see `binds`).

    - Past `threshold` utilisation, pressure rises linearly to 1 at full use, so the router moves traffic
      away before the account hits the wall.
    - Weekly pace gate: a 7-day window whose utilisation runs ahead of the elapsed share of its week (plus
      `pace_slack`) adds pressure in proportion to how far ahead it is, so a busy morning cannot burn a
      week's quota.
    - `allowed_warning` counts at least `WARNING_PRESSURE`; a rejected window counts 1.
    """
    if picture is None:
        return 0.0
    threshold = min(max(threshold, 0.0), 1.0) if math.isfinite(threshold) else 1.0
    slack = pace_slack if math.isfinite(pace_slack) and pace_slack >= 0 else DEFAULT_PACE_SLACK
    pressure = 0.0
    for name, snapshot in picture.windows.items():
        if name == OVERAGE or not _live(snapshot, now_wall) or not binds(name, model):
            continue
        if snapshot.status == "rejected":
            return 1.0
        if snapshot.status == "allowed_warning":
            pressure = max(pressure, WARNING_PRESSURE)
        used = snapshot.utilization
        if used is None:
            continue
        if used >= 1.0:
            return 1.0
        if used > threshold:
            pressure = max(pressure, (used - threshold) / (1.0 - threshold))
        length = WINDOW_SECONDS.get(name)
        if name != FIVE_HOUR and length is not None and snapshot.resets_at is not None:
            elapsed = min(max(1.0 - (snapshot.resets_at - now_wall) / length, 0.0), 1.0)
            ahead = used - elapsed - slack
            if ahead > 0:
                pressure = max(pressure, min(1.0, ahead / max(1.0 - elapsed, 1e-3)))
    if (
        picture.status == "rejected"
        and binds(picture.representative_claim, model)
        and picture.reset_at is not None
        and picture.reset_at > now_wall
    ):
        return 1.0
    held = held_for(picture, model)
    if held is not None and held.until_wall() > now_wall:
        return 1.0
    return min(max(pressure, 0.0), 1.0)


def _urgency(snapshot: SubscriptionQuotaSnapshot | None, now_wall: float) -> float:
    """Remaining capacity per remaining share of the window: what is lost at the reset if left unused.

    A window not started (or already reset) counts 1: full capacity over a full window.
    """
    if snapshot is None or snapshot.resets_at is None or snapshot.resets_at <= now_wall:
        return 1.0
    if snapshot.status == "rejected":
        return 0.0
    length = WINDOW_SECONDS.get(snapshot.window, WINDOW_SECONDS[FIVE_HOUR])
    remaining = max(0.0, 1.0 - (snapshot.utilization or 0.0))
    left = min(max((snapshot.resets_at - now_wall) / length, 1e-3), 1.0)
    return remaining / left


def drain_priority(picture: QuotaPicture | None, now_wall: float) -> float:
    """Which subscription account to drain first, in [0, 1): higher = use it sooner.

    Capacity left in a window is lost when it resets, so the account whose window resets soonest relative
    to its remaining capacity goes first and the pool drains evenly instead of idling one account while
    another hits its wall. The 5-hour and 7-day windows both bound what can be used before the reset, so
    the lower of their urgencies counts. An account with no picture (or fresh windows) scores 0.5.
    """
    if picture is None:
        return 0.5
    urgency = min(
        _urgency(picture.windows.get(FIVE_HOUR), now_wall), _urgency(picture.windows.get(SEVEN_DAY), now_wall)
    )
    return urgency / (1.0 + urgency)


# ----- persistence (the store keeps the last picture per account for `poolgate accounts list`) ---------


def picture_to_json(picture: QuotaPicture) -> dict[str, Any]:
    """Wall-clock fields only: monotonic times mean nothing in another process."""
    return {
        "observed_at": picture.observed_at_wall,
        "source": picture.source,
        "status": picture.status,
        "reset_at": picture.reset_at,
        "representative_claim": picture.representative_claim,
        "fallback": picture.fallback,
        "fallback_percentage": picture.fallback_percentage,
        "overage_in_use": picture.overage_in_use,
        "overage_disabled_reason": picture.overage_disabled_reason,
        "windows": {
            name: {
                "status": s.status,
                "utilization": s.utilization,
                "resets_at": s.resets_at,
                "surpassed_threshold": s.surpassed_threshold,
                "observed_at": s.observed_at_wall,
                "source": s.source,
            }
            for name, s in picture.windows.items()
        },
        "rejected_families": {
            family: {"reset_at": rejection.reset_at, "observed_at": rejection.observed_at_wall}
            for family, rejection in picture.rejected_families.items()
        },
    }


def _json_float(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def picture_from_json(data: object, now_mono: float, now_wall: float) -> QuotaPicture | None:
    """A stored picture back on this process's monotonic clock; None when it is not one."""
    if not isinstance(data, dict):
        return None
    observed_wall = _json_float(data.get("observed_at"))
    if observed_wall is None:
        return None

    def mono(wall: float) -> float:
        return now_mono - (now_wall - wall)

    windows: dict[str, SubscriptionQuotaSnapshot] = {}
    raw_windows = data.get("windows")
    for name, entry in raw_windows.items() if isinstance(raw_windows, dict) else ():
        if not isinstance(entry, dict) or not isinstance(name, str):
            continue
        seen_wall = _json_float(entry.get("observed_at")) or observed_wall
        status = entry.get("status")
        source = entry.get("source")
        windows[name] = SubscriptionQuotaSnapshot(
            name,
            status if status in STATUSES else None,
            _json_float(entry.get("utilization")),
            _json_float(entry.get("resets_at")),
            _json_float(entry.get("surpassed_threshold")),
            mono(seen_wall),
            seen_wall,
            source if source in ("headers", "usage_endpoint") else "headers",
        )
    rejected_families: dict[str, FamilyRejection] = {}
    raw_rejections = data.get("rejected_families")
    for family, entry in raw_rejections.items() if isinstance(raw_rejections, dict) else ():
        if family not in (*MODEL_FAMILIES, OTHER_FAMILY) or not isinstance(entry, dict):
            continue
        seen_wall = _json_float(entry.get("observed_at")) or observed_wall
        rejected_families[family] = FamilyRejection(_json_float(entry.get("reset_at")), mono(seen_wall), seen_wall)
    status = data.get("status")
    source = data.get("source")
    claim = data.get("representative_claim")
    overage_in_use = data.get("overage_in_use")
    return QuotaPicture(
        windows=windows,
        observed_at=mono(observed_wall),
        observed_at_wall=observed_wall,
        source=source if source in ("headers", "usage_endpoint") else "headers",
        status=status if status in STATUSES else None,
        reset_at=_json_float(data.get("reset_at")),
        representative_claim=claim if isinstance(claim, str) else None,
        fallback=data.get("fallback") if isinstance(data.get("fallback"), str) else None,
        fallback_percentage=_json_float(data.get("fallback_percentage")),
        overage_in_use=overage_in_use if isinstance(overage_in_use, bool) else None,
        overage_disabled_reason=(
            data["overage_disabled_reason"] if isinstance(data.get("overage_disabled_reason"), str) else None
        ),
        rejected_families=rejected_families,
    )

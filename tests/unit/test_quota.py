"""Subscription quota headers: every documented field is read, anything malformed is dropped, and the router's
functions (blocked-until, pressure with the weekly pace gate, drain priority) rank accounts sensibly."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from poolgate.upstreams.quota import (
    DEFAULT_REJECTED_PARK_SECONDS,
    FIVE_HOUR,
    MODEL_FAMILIES,
    OTHER_FAMILY,
    OVERAGE,
    PREFIX,
    SEVEN_DAY,
    WINDOW_SECONDS,
    QuotaPicture,
    SubscriptionQuotaSnapshot,
    drain_priority,
    merge_pictures,
    model_family,
    parse_unified_headers,
    parse_usage_response,
    picture_from_json,
    picture_to_json,
    quota_blocked_until,
    quota_blocked_until_wall,
    quota_data_state,
    quota_pressure,
    should_poll_usage,
)

WALL = 1_800_000_000.0
MONO = 5_000.0
WEEK = WINDOW_SECONDS[SEVEN_DAY]


def unified(**fields: str) -> CIMultiDict[str]:
    """`five_h_status="allowed"` → `anthropic-ratelimit-unified-5h-status: allowed`."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in fields.items():
        suffix = name.replace("five_h", "5h").replace("seven_d", "7d").replace("_", "-")
        headers[PREFIX + suffix] = value
    return headers


def test_every_documented_unified_header_is_parsed() -> None:
    headers = unified(
        status="allowed_warning",
        reset=str(int(WALL + 3600)),
        representative_claim="five_hour",
        five_h_status="allowed_warning",
        five_h_utilization="0.82",
        five_h_reset=str(int(WALL + 3600)),
        five_h_surpassed_threshold="0.75",
        seven_d_status="allowed",
        seven_d_utilization="0.31",
        seven_d_reset=str(int(WALL + 4 * 86400)),
        overage_status="rejected",
        overage_reset=str(int(WALL + 20 * 86400)),
        overage_in_use="false",
        overage_disabled_reason="org_level_disabled",
        fallback="available",
        fallback_percentage="0.5",
    )
    headers["anthropic-ratelimit-unified-7d_opus-utilization"] = "0.9"
    headers["anthropic-ratelimit-unified-some-new-thing"] = "x"
    picture = parse_unified_headers(headers, MONO, WALL)
    assert picture is not None and picture.source == "headers"
    assert picture.status == "allowed_warning" and picture.reset_at == WALL + 3600
    assert picture.representative_claim == FIVE_HOUR
    assert picture.fallback == "available" and picture.fallback_percentage == 0.5
    assert picture.overage_in_use is False and picture.overage_disabled_reason == "org_level_disabled"
    five = picture.windows[FIVE_HOUR]
    assert (five.status, five.utilization, five.resets_at, five.surpassed_threshold) == (
        "allowed_warning",
        0.82,
        WALL + 3600,
        0.75,
    )
    assert five.observed_at == MONO and five.observed_at_wall == WALL
    assert picture.windows[SEVEN_DAY].utilization == 0.31
    assert picture.windows["seven_day_opus"].utilization == 0.9
    assert picture.windows[OVERAGE].status == "rejected"
    assert picture.extra == {"some-new-thing": "x"}


def test_no_unified_headers_means_no_picture() -> None:
    assert parse_unified_headers({"content-type": "application/json"}, MONO, WALL) is None
    assert parse_unified_headers(unified(five_h_utilization="lots"), MONO, WALL) is None


def test_header_names_are_case_insensitive_in_plain_dicts_too() -> None:
    picture = parse_unified_headers({"Anthropic-Ratelimit-Unified-5H-Utilization": "0.5"}, MONO, WALL)
    assert picture is not None and picture.windows[FIVE_HOUR].utilization == 0.5


def test_malformed_values_are_dropped_and_the_rest_kept() -> None:
    picture = parse_unified_headers(
        unified(
            status="maybe",
            reset="soon",
            five_h_utilization="nan",
            five_h_reset="12",  # not an epoch
            five_h_status="rejected",
            seven_d_utilization="-0.5",
            seven_d_reset="2030-01-01T00:00:00Z",  # an ISO timestamp is accepted
            representative_claim="everything",
        ),
        MONO,
        WALL,
    )
    assert picture is not None
    assert picture.status is None and picture.reset_at is None and picture.representative_claim is None
    assert picture.windows[FIVE_HOUR].utilization is None and picture.windows[FIVE_HOUR].resets_at is None
    assert picture.windows[FIVE_HOUR].status == "rejected"
    assert picture.windows[SEVEN_DAY].utilization is None
    assert picture.windows[SEVEN_DAY].resets_at == 1_893_456_000.0


header_names = st.sampled_from(
    [
        "status",
        "reset",
        "representative-claim",
        "fallback",
        "fallback-percentage",
        "overage-status",
        "overage-reset",
        "overage-in-use",
        "overage-utilization",
        "overage-disabled-reason",
        *(f"{w}-{f}" for w in ("5h", "7d", "7d_opus", "7d_sonnet") for f in ("status", "utilization", "reset")),
        "5h-surpassed-threshold",
        "7d-surpassed-threshold",
    ]
)
values = st.one_of(
    st.text(max_size=40),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.sampled_from(["allowed", "allowed_warning", "rejected", "five_hour", "true", "", " 0.5 ", "1e308", "-0"]),
)


@given(st.dictionaries(header_names, values, max_size=20), st.floats(0, 1), st.floats(-1e6, 1e6))
def test_any_header_values_never_raise_and_give_sane_answers(
    fields: dict[str, str], threshold: float, offset: float
) -> None:
    headers = {PREFIX + name: value for name, value in fields.items()}
    picture = parse_unified_headers(headers, MONO, WALL)
    now_mono, now_wall = MONO + offset, WALL + offset
    pressure = quota_pressure(picture, now_wall, threshold)
    priority = drain_priority(picture, now_wall)
    blocked = quota_blocked_until(picture, now_mono)
    assert 0.0 <= pressure <= 1.0 and math.isfinite(pressure)
    assert 0.0 <= priority < 1.0 and math.isfinite(priority)
    assert blocked is None or (blocked > now_mono and math.isfinite(blocked))
    if picture is not None:
        for snapshot in picture.windows.values():
            assert snapshot.utilization is None or math.isfinite(snapshot.utilization)
            assert snapshot.resets_at is None or math.isfinite(snapshot.resets_at)
        restored = picture_from_json(picture_to_json(picture), MONO, WALL)
        assert restored is not None and restored.windows.keys() == picture.windows.keys()


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(max_size=10),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=12), c),
    )
)
def test_any_usage_payload_never_raises(payload: object) -> None:
    picture = parse_usage_response(payload, MONO, WALL)
    assert picture is None or picture.source == "usage_endpoint"
    picture_from_json(payload, MONO, WALL)


# ----- blocked until ---------------------------------------------------------------------------------


def test_a_rejected_window_parks_the_account_until_its_reset_on_the_monotonic_clock() -> None:
    picture = parse_unified_headers(
        unified(
            status="rejected", five_h_status="rejected", five_h_reset=str(int(WALL + 7200)), five_h_utilization="1.02"
        ),
        MONO,
        WALL,
    )
    assert quota_blocked_until(picture, MONO) == MONO + 7200
    assert quota_blocked_until(picture, MONO + 7200) is None  # the window has reset
    assert quota_blocked_until_wall(picture, WALL + 10) == WALL + 7200


def test_the_latest_of_several_rejected_windows_counts_and_overage_alone_blocks_nothing() -> None:
    picture = parse_unified_headers(
        unified(
            five_h_status="rejected",
            five_h_reset=str(int(WALL + 600)),
            seven_d_status="rejected",
            seven_d_reset=str(int(WALL + 86400)),
        ),
        MONO,
        WALL,
    )
    assert quota_blocked_until(picture, MONO) == MONO + 86400
    overage_only = parse_unified_headers(
        unified(status="allowed", overage_status="rejected", five_h_status="allowed"), MONO, WALL
    )
    assert quota_blocked_until(overage_only, MONO) is None


def test_a_used_up_window_holds_an_account_out_though_its_paid_overage_is_allowed() -> None:
    """Overage is billed by the token: an account is not used past its subscription's window on it."""
    picture = parse_unified_headers(
        unified(
            status="allowed",
            five_h_status="rejected",
            five_h_reset=str(int(WALL + 600)),
            overage_status="allowed",
        ),
        MONO,
        WALL,
    )
    assert quota_blocked_until(picture, MONO) == MONO + 600


def test_a_used_up_per_model_week_holds_out_that_models_requests_only() -> None:
    """As the API reports it on every answer, a Sonnet one it served included: the Opus week, binding."""
    reset = str(int(WALL + 3 * 86400))
    headers = unified(status="rejected", reset=reset, representative_claim="seven_day_opus", five_h_status="allowed")
    headers[PREFIX + "7d_opus-status"], headers[PREFIX + "7d_opus-reset"] = "rejected", reset
    picture = parse_unified_headers(headers, MONO, WALL)
    assert quota_blocked_until(picture, MONO, model="claude-opus-4-8") == MONO + 3 * 86400
    assert quota_blocked_until(picture, MONO, model="claude-sonnet-4-5") is None
    assert quota_blocked_until(picture, MONO) is None  # the account as a whole is not parked
    assert quota_pressure(picture, WALL, 0.8, model="claude-opus-4-8") == 1.0
    assert quota_pressure(picture, WALL, 0.8, model="claude-haiku-4-5") == 0.0
    # A window that binds every model still holds out every request.
    both = parse_unified_headers(unified(status="rejected", reset=reset, representative_claim="seven_day"), MONO, WALL)
    assert quota_blocked_until(both, MONO, model="claude-sonnet-4-5") == MONO + 3 * 86400


OPUS, SONNET, HAIKU = "claude-opus-4-8", "claude-sonnet-4-5", "claude-haiku-4-5"


def answer(model: str, seconds: float, status: str, claim: str | None = None, resets_in: float = 86400) -> QuotaPicture:
    """The aggregate headers alone of an answer to a request for `model`, `seconds` after MONO/WALL."""
    fields = {"status": status, "reset": str(int(WALL + resets_in))}
    if claim is not None:
        fields["representative_claim"] = claim
    picture = parse_unified_headers(unified(**fields), MONO + seconds, WALL + seconds, model)
    assert picture is not None
    return picture


def test_model_ids_fall_into_a_few_families() -> None:
    assert [model_family(m) for m in (OPUS, "Claude-Opus-4-6", SONNET, HAIKU, "claude-3-5-sonnet-latest")] == [
        "opus",
        "opus",
        "sonnet",
        "haiku",
        "sonnet",
    ]
    assert model_family("claude-unpriced-9") == model_family("") == OTHER_FAMILY


@pytest.mark.parametrize("claim", [None, "seven_day_opus"])
def test_an_opus_rejection_told_by_the_aggregate_alone_outlives_answers_for_other_models(claim: str | None) -> None:
    """An Opus 429 with the aggregate `rejected` alone (no claim, or the Opus week's without its own status):
    a Sonnet answer `allowed` after it proves only that Sonnet is served. Taken as the whole account's, it sent
    the next Opus request back to the account for another 429, after every Sonnet answer."""
    rejected = answer(OPUS, 0, "rejected", claim)
    picture = merge_pictures(merge_pictures(None, rejected), answer(SONNET, 10, "allowed", "five_hour"))
    picture = merge_pictures(picture, answer(HAIKU, 20, "allowed_warning"))
    assert picture is not None and picture.status == "allowed_warning"
    assert quota_blocked_until(picture, MONO + 20, model=OPUS) == MONO + 86400
    assert quota_blocked_until(picture, MONO + 20, model="claude-opus-4-6") == MONO + 86400
    assert quota_pressure(picture, WALL + 20, 0.8, model=OPUS) == 1.0
    assert quota_blocked_until(picture, MONO + 20, model=SONNET) is None
    assert quota_blocked_until(picture, MONO + 20) is None  # the account serves the others
    # An Opus answer that admits the request ends it (a plan upgrade, the week reset early).
    served = merge_pictures(picture, answer(OPUS, 30, "allowed"))
    assert served is not None and quota_blocked_until(served, MONO + 30, model=OPUS) is None
    # So does its reset, and the next answer forgets it.
    after = merge_pictures(picture, answer(SONNET, 86400, "allowed"))
    assert after is not None and quota_blocked_until(after, MONO + 86400, model=OPUS) is None
    assert dict(after.rejected_families) == {}


def test_a_rejection_naming_a_window_of_every_model_or_of_another_family_holds_no_family_apart() -> None:
    """A 5-hour claim is the whole account's: a later `allowed` for any model says it is over. An Opus week
    named on a Sonnet answer the API served (`rejected`, as it reports the binding window) is no Sonnet one."""
    five = merge_pictures(answer(OPUS, 0, "rejected", FIVE_HOUR), answer(SONNET, 10, "allowed"))
    assert five is not None and quota_blocked_until(five, MONO + 10, model=OPUS) is None
    sonnet = answer(SONNET, 0, "rejected", "seven_day_opus")
    assert dict(sonnet.rejected_families) == {}
    assert quota_blocked_until(sonnet, MONO, model=SONNET) is None
    assert quota_blocked_until(sonnet, MONO, model=OPUS) == MONO + 86400


def test_usage_figures_lift_a_family_rejection_unless_a_window_of_that_family_is_used_up() -> None:
    held = merge_pictures(answer(OPUS, 0, "rejected", "seven_day_opus"), answer(SONNET, 10, "allowed"))

    def figures(opus_used: float) -> QuotaPicture:
        windows = {
            FIVE_HOUR: replace(snapshot(FIVE_HOUR, 0.2, 3600, None), source="usage_endpoint"),
            "seven_day_opus": replace(snapshot("seven_day_opus", opus_used, 86400, None), source="usage_endpoint"),
        }
        return QuotaPicture(windows, MONO + 20, WALL + 20, "usage_endpoint")  # type: ignore[arg-type]

    kept = merge_pictures(held, figures(1.0))
    assert kept is not None and quota_blocked_until(kept, MONO + 20, model=OPUS) == MONO + 86400
    lifted = merge_pictures(held, figures(0.3))
    assert lifted is not None and quota_blocked_until(lifted, MONO + 20, model=OPUS) is None


def test_an_answer_whose_own_window_of_a_family_admits_it_lifts_that_familys_rejection() -> None:
    """Answers that carry every window (the API's usual ones): an Opus 429 names its used-up week and so
    holds Opus out; a Sonnet answer after the week was lifted early (a plan upgrade, extra usage bought) says
    `7d_opus` `allowed`. The hold stood till the old reset, days, while no Opus request could reach the
    account to be told otherwise; before the holds, the window's own status lifted it at once."""
    week_reset = str(int(WALL + 3 * 86400))
    opus_429 = unified(
        status="rejected", reset=week_reset, representative_claim="seven_day_opus", seven_d_opus_status="rejected"
    )
    rejected = parse_unified_headers(opus_429, MONO, WALL, OPUS)
    sonnet_ok = unified(status="allowed", representative_claim="five_hour", seven_d_opus_status="allowed")
    picture = merge_pictures(rejected, parse_unified_headers(sonnet_ok, MONO + 10, WALL + 10, SONNET))
    assert picture is not None and quota_blocked_until(picture, MONO + 10, model=OPUS) is None
    # A Sonnet answer whose Opus week is still used up keeps the hold.
    sonnet_still = unified(status="rejected", representative_claim="seven_day_opus", seven_d_opus_status="rejected")
    held = merge_pictures(rejected, parse_unified_headers(sonnet_still, MONO + 10, WALL + 10, SONNET))
    assert held is not None and quota_blocked_until(held, MONO + 10, model=OPUS) == MONO + 3 * 86400


def test_a_stored_family_rejection_comes_back_on_the_new_process_clock() -> None:
    picture = merge_pictures(answer(OPUS, 0, "rejected"), answer(SONNET, 10, "allowed"))
    assert picture is not None
    restored = picture_from_json(picture_to_json(picture), 10.0, WALL + 1800)
    assert restored is not None
    assert quota_blocked_until(restored, 10.0, model=OPUS) == 10.0 + 86400 - 1800
    assert quota_blocked_until(restored, 10.0, model=SONNET) is None
    broken = {**picture_to_json(picture), "rejected_families": {"gpt": {"reset_at": WALL}, "opus": "x"}}
    assert dict(picture_from_json(broken, 10.0, WALL).rejected_families) == {}  # type: ignore[union-attr]


families = st.sampled_from([*MODEL_FAMILIES, OTHER_FAMILY])
answers = st.tuples(
    families,
    st.sampled_from(["allowed", "allowed_warning", "rejected"]),
    st.sampled_from([None, FIVE_HOUR, SEVEN_DAY, OVERAGE, "seven_day_opus", "seven_day_sonnet"]),
)


@given(families, st.lists(answers, max_size=30))
def test_answers_for_other_families_never_lift_a_familys_rejection_and_what_is_held_stays_small(
    family: str, later: list[tuple[str, str, str | None]]
) -> None:
    """Whatever aggregate status answers for other models give (answers without per-model window headers;
    a family's own window saying `allowed` does lift its hold, see below), within its reset, an aggregate
    rejection learnt from a request of one family holds that family's requests out; at most one rejection is
    held per family."""
    picture = answer(f"claude-{family}-4", 0, "rejected")
    for n, (other, status, claim) in enumerate(later, 1):
        if other == family:
            continue
        picture = merge_pictures(picture, answer(f"claude-{other}-4", n, status, claim))  # type: ignore[assignment]
        assert picture is not None and set(picture.rejected_families) <= {*MODEL_FAMILIES, OTHER_FAMILY}
    assert quota_blocked_until(picture, MONO + len(later), model=f"claude-{family}-4") == MONO + 86400


OPUS_WEEK_RESETS_IN = 3 * 86400.0
FIVE_HOURS_RESET_IN = 3600.0
not_opus = st.sampled_from(["sonnet", "haiku", OTHER_FAMILY])


def every_window(family: str, seconds: float, claim: str | None) -> QuotaPicture:
    """An answer that carries every window, to a request of `family`, `seconds` after MONO/WALL: the 5-hour
    and 7-day windows admit requests, the Opus week is used up, and the aggregate says `rejected` (as the API's
    does whichever model the request was for), with the Opus week's claim or none."""
    fields = {
        "status": "rejected",
        "reset": str(int(WALL + OPUS_WEEK_RESETS_IN)),
        "five_h_status": "allowed",
        "five_h_reset": str(int(WALL + FIVE_HOURS_RESET_IN + seconds)),
        "seven_d_status": "allowed",
        "seven_d_reset": str(int(WALL + 5 * 86400)),
        "seven_d_opus_status": "rejected",
        "seven_d_opus_reset": str(int(WALL + OPUS_WEEK_RESETS_IN)),
    }
    if claim is not None:
        fields["representative_claim"] = claim
    picture = parse_unified_headers(unified(**fields), MONO + seconds, WALL + seconds, f"claude-{family}-4")
    assert picture is not None
    return picture


@given(
    not_opus,
    st.sampled_from([None, "seven_day_opus"]),
    st.lists(st.tuples(st.sampled_from([*MODEL_FAMILIES, OTHER_FAMILY]), st.sampled_from([None, "seven_day_opus"]))),
)
def test_a_family_hold_lifts_once_its_windows_admit_it_while_another_familys_week_is_used_up(
    held: str, first_claim: str | None, later: list[tuple[str, str | None]]
) -> None:
    """The Opus week is used up; a request of another family gets a 429 that says only the aggregate `rejected`
    (its 5-hour window, say, resetting within the hour): that family is held out. Answers that carry every
    window then say the 5-hour and 7-day windows admit requests, the aggregate `rejected` for the Opus week.
    One to a request of the held family showed it served, but did not lift the hold (its aggregate was no
    `allowed`); without a claim, each such answer held its family out till the Opus week's reset, days away,
    and the whole account with it. A family whose windows all admit it is held out by none of this; no hold
    outlives the reset of the window that caused it; Opus stays held out till its week resets."""
    picture = every_window("haiku", 0, first_claim)
    aggregate_only = answer(f"claude-{held}-4", 10, "rejected", resets_in=FIVE_HOURS_RESET_IN)
    picture = merge_pictures(picture, aggregate_only)  # type: ignore[assignment]
    hold_ends = MONO + FIVE_HOURS_RESET_IN
    assert quota_blocked_until(picture, MONO + 10, model=f"claude-{held}-4") == hold_ends
    for n, (family, claim) in enumerate(later, 20):
        picture = merge_pictures(picture, every_window(family, n, claim))  # type: ignore[assignment]
        assert picture is not None
        for other in (*MODEL_FAMILIES, OTHER_FAMILY):
            until = quota_blocked_until(picture, MONO + n, model=f"claude-{other}-4")
            if other == "opus":
                assert until == MONO + OPUS_WEEK_RESETS_IN
            elif other == family:  # served, and its windows admit it
                assert until is None
            else:
                assert until is None or until <= hold_ends
        assert quota_blocked_until(picture, MONO + n) is None  # the account serves the other families


def test_a_rejection_without_a_reset_parks_for_a_default_and_then_tries_again() -> None:
    picture = parse_unified_headers(unified(status="rejected"), MONO, WALL)
    assert quota_blocked_until(picture, MONO) == MONO + DEFAULT_REJECTED_PARK_SECONDS
    assert quota_blocked_until(picture, MONO + DEFAULT_REJECTED_PARK_SECONDS) is None
    assert quota_blocked_until(None, MONO) is None


def test_a_used_up_window_from_the_usage_endpoint_blocks_like_a_rejection() -> None:
    reset = "2027-01-15T10:00:00+00:00"
    picture = parse_usage_response({"five_hour": {"utilization": 100.0, "resets_at": reset}}, MONO, WALL)
    assert picture is not None
    until = quota_blocked_until(picture, MONO)
    assert until is not None and until > MONO


# ----- pressure and pace -----------------------------------------------------------------------------


def snapshot(
    window: str, used: float | None, resets_in: float | None, status: str | None = "allowed"
) -> SubscriptionQuotaSnapshot:
    return SubscriptionQuotaSnapshot(
        window,
        status,
        used,
        WALL + resets_in if resets_in is not None else None,
        None,
        MONO,
        WALL,
        "headers",  # type: ignore[arg-type]
    )


def picture_of(*snapshots: SubscriptionQuotaSnapshot, status: str | None = None) -> QuotaPicture:
    return QuotaPicture({s.window: s for s in snapshots}, MONO, WALL, "headers", status=status)  # type: ignore[arg-type]


def test_pressure_is_zero_below_the_threshold_and_rises_past_it() -> None:
    low = picture_of(snapshot(FIVE_HOUR, 0.5, 3600))
    past = picture_of(snapshot(FIVE_HOUR, 0.9, 3600))
    full = picture_of(snapshot(FIVE_HOUR, 1.0, 3600))
    assert quota_pressure(low, WALL, 0.8) == 0.0
    assert 0.45 < quota_pressure(past, WALL, 0.8) < 0.55
    assert quota_pressure(full, WALL, 0.8) == 1.0
    assert quota_pressure(None, WALL, 0.8) == 0.0


def test_a_window_that_has_reset_since_it_was_seen_adds_no_pressure() -> None:
    picture = picture_of(snapshot(FIVE_HOUR, 0.99, 60))
    assert quota_pressure(picture, WALL + 61, 0.8) == 0.0


def test_warning_and_rejected_statuses_count() -> None:
    assert quota_pressure(picture_of(snapshot(FIVE_HOUR, 0.1, 3600, "allowed_warning")), WALL, 0.8) == 0.25
    assert quota_pressure(picture_of(snapshot(FIVE_HOUR, 0.1, 3600, "rejected")), WALL, 0.8) == 1.0


def test_weekly_pace_gate_counts_running_ahead_of_the_week() -> None:
    # One day into the week (1/7 elapsed): 60% used is far ahead of pace, 10% is not.
    ahead = picture_of(snapshot(SEVEN_DAY, 0.6, WEEK * 6 / 7))
    on_pace = picture_of(snapshot(SEVEN_DAY, 0.1, WEEK * 6 / 7))
    # Six days in, 60% used is behind pace: no pressure below the threshold.
    late = picture_of(snapshot(SEVEN_DAY, 0.6, WEEK / 7))
    assert quota_pressure(ahead, WALL, 0.8) > 0.4
    assert quota_pressure(on_pace, WALL, 0.8) == 0.0
    assert quota_pressure(late, WALL, 0.8) == 0.0
    # The 5-hour window is meant to be used up: no pace gate there.
    assert quota_pressure(picture_of(snapshot(FIVE_HOUR, 0.6, 5 * 3600 - 60)), WALL, 0.8) == 0.0


# ----- drain priority --------------------------------------------------------------------------------


def test_drain_prefers_the_window_that_resets_soonest_relative_to_its_remaining_capacity() -> None:
    soon = picture_of(snapshot(FIVE_HOUR, 0.5, 1800))  # half left, 30 min to go: use it or lose it
    later = picture_of(snapshot(FIVE_HOUR, 0.5, 4 * 3600))
    fresh = picture_of()
    nearly_empty = picture_of(snapshot(FIVE_HOUR, 0.99, 4 * 3600))
    ranked = sorted(
        [("soon", soon), ("later", later), ("fresh", fresh), ("empty", nearly_empty)],
        key=lambda item: drain_priority(item[1], WALL),
        reverse=True,
    )
    # A fresh window holds more capacity per remaining time than a half-used one with 4 h to go: even drain.
    assert [name for name, _ in ranked] == ["soon", "fresh", "later", "empty"]
    assert drain_priority(None, WALL) == drain_priority(fresh, WALL) == 0.5


def test_a_nearly_used_up_week_holds_back_a_fresh_five_hour_window() -> None:
    starved = picture_of(snapshot(FIVE_HOUR, 0.0, 5 * 3600), snapshot(SEVEN_DAY, 0.97, WEEK / 2))
    healthy = picture_of(snapshot(FIVE_HOUR, 0.0, 5 * 3600), snapshot(SEVEN_DAY, 0.3, WEEK / 2))
    assert drain_priority(healthy, WALL) > drain_priority(starved, WALL)
    assert drain_priority(picture_of(snapshot(FIVE_HOUR, 0.2, 3600, "rejected")), WALL) == 0.0


# ----- state, merging, persistence ---------------------------------------------------------------------


def test_data_state_is_fresh_then_stale_and_missing_without_data() -> None:
    picture = picture_of(snapshot(FIVE_HOUR, 0.2, 3600))
    assert quota_data_state(picture, MONO + 10, 300) == "fresh"
    assert quota_data_state(picture, MONO + 301, 300) == "stale"
    assert quota_data_state(picture, MONO + 3600, 1e9) == "stale"  # its window reset since
    assert quota_data_state(None, MONO, 300) == "missing"
    assert quota_data_state(picture_of(), MONO, 300) == "missing"
    assert picture.windows[FIVE_HOUR].data_state(MONO, 300) == "fresh"


def test_the_usage_endpoint_is_polled_only_when_stale_and_not_too_often() -> None:
    picture = picture_of(snapshot(FIVE_HOUR, 0.2, 3600))
    assert not should_poll_usage(picture, MONO + 10, 300, None, 60)
    assert should_poll_usage(picture, MONO + 400, 300, None, 60)
    assert not should_poll_usage(picture, MONO + 400, 300, MONO + 390, 60)
    assert should_poll_usage(None, MONO, 300, None, 60)


def test_usage_endpoint_percentages_become_fractions_and_merge_into_header_pictures() -> None:
    usage = parse_usage_response(
        {
            "five_hour": {"utilization": 42.0, "resets_at": "2027-01-15T10:00:00Z"},
            "seven_day": {"utilization": 7, "resets_at": None},
            "seven_day_opus": None,
        },
        MONO + 100,
        WALL + 100,
    )
    assert usage is not None and usage.source == "usage_endpoint"
    assert usage.windows[FIVE_HOUR].utilization == 0.42 and usage.windows[SEVEN_DAY].resets_at is None
    headers = parse_unified_headers(
        unified(status="allowed", five_h_utilization="0.1", overage_status="rejected"), MONO, WALL
    )
    merged = merge_pictures(headers, usage)
    assert merged is not None
    assert merged.windows[FIVE_HOUR].utilization == 0.42 and merged.windows[FIVE_HOUR].source == "usage_endpoint"
    assert merged.windows[OVERAGE].status == "rejected" and merged.status == "allowed"
    # Seen last from the usage endpoint (`accounts list` said "0m ago (headers)" of an idle account).
    assert merged.observed_at == MONO + 100 and merged.source == "usage_endpoint"
    newer = parse_unified_headers(unified(five_h_utilization="0.5"), MONO + 200, WALL + 200)
    again = merge_pictures(merged, newer)
    assert again is not None and again.windows[FIVE_HOUR].utilization == 0.5 and SEVEN_DAY in again.windows
    assert again.source == "headers"
    assert merge_pictures(None, None) is None and merge_pictures(headers, None) is headers


def test_a_stored_picture_comes_back_on_the_new_process_clock() -> None:
    picture = parse_unified_headers(
        unified(status="rejected", five_h_status="rejected", five_h_reset=str(int(WALL + 3600))), MONO, WALL
    )
    assert picture is not None
    # Another process, whose monotonic clock reads 10.0 half an hour later.
    restored = picture_from_json(picture_to_json(picture), 10.0, WALL + 1800)
    assert restored is not None
    assert quota_blocked_until(restored, 10.0) == 10.0 + 1800
    assert restored.windows[FIVE_HOUR].observed_at_wall == WALL


def test_newer_usage_figures_lift_a_rejection_before_its_announced_reset() -> None:
    """A plan upgrade or extra usage: the headers said rejected until a reset hours away; the usage
    endpoint, asked later, says the window is far from used up. The account admits requests again, and the
    reset the headers announced (which the endpoint did not repeat) is kept."""
    rejected = picture_of(snapshot(SEVEN_DAY, 1.0, 7200, "rejected"), status="rejected")
    rejected = replace(rejected, reset_at=WALL + 7200)
    assert quota_blocked_until(rejected, MONO) is not None
    later = QuotaPicture(
        {SEVEN_DAY: replace(snapshot(SEVEN_DAY, 0.0, None, None), source="usage_endpoint")},
        MONO + 10,
        WALL + 10,
        "usage_endpoint",
    )
    merged = merge_pictures(rejected, later)
    assert merged is not None and quota_blocked_until(merged, MONO + 10) is None
    assert merged.windows[SEVEN_DAY].resets_at == WALL + 7200 and merged.status is None
    # Figures that still show the window used up keep the rejection.
    used_up = replace(later, windows={SEVEN_DAY: replace(later.windows[SEVEN_DAY], utilization=1.0)})
    still = merge_pictures(rejected, used_up)
    assert still is not None and quota_blocked_until(still, MONO + 10) is not None
    # A used-up Opus week does not keep a lifted 5-hour rejection: it holds out Opus requests only.
    five = replace(picture_of(snapshot(FIVE_HOUR, 1.0, 7200, "rejected"), status="rejected"), reset_at=WALL + 7200)
    five = replace(five, representative_claim=FIVE_HOUR)
    room = QuotaPicture(
        {
            FIVE_HOUR: replace(snapshot(FIVE_HOUR, 0.1, None, None), source="usage_endpoint"),
            "seven_day_opus": replace(snapshot("seven_day_opus", 1.0, 86400, None), source="usage_endpoint"),
        },
        MONO + 10,
        WALL + 10,
        "usage_endpoint",
    )
    lifted = merge_pictures(five, room)
    assert lifted is not None and quota_blocked_until(lifted, MONO + 10, model="claude-sonnet-4-5") is None
    assert quota_blocked_until(lifted, MONO + 10, model="claude-opus-4-8") == MONO + 86400

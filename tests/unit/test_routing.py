"""Routing decisions: filters never pick an unusable upstream, strategies respect weights."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolgate.api.errors import ApiError
from poolgate.config import HealthConfig, PinConfig, RoutingConfig
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.routing.router import Router
from poolgate.lifecycle.routing.strategy import (
    FirstPick,
    LeastConnections,
    WeightedRandom,
    WeightedRoundRobin,
)
from poolgate.upstreams.health import Failure, begin_attempt, park, record_failure
from poolgate.upstreams.pool import Pool

HEALTH = HealthConfig(failure_threshold=3, cooldown_seconds=10)


def make_pool(weights: list[int], models: tuple[str, ...] = ()) -> Pool:
    pool = Pool()
    pool.replace(
        Upstream(id=f"u{i}", kind="anthropic_api_key", base_url="http://x", weight=w, models=models)
        for i, w in enumerate(weights)
    )
    return pool


@given(st.lists(st.integers(1, 10), min_size=1, max_size=6))
def test_round_robin_serves_each_upstream_in_proportion_to_its_weight(weights: list[int]) -> None:
    pool = make_pool(weights)
    strategy = WeightedRoundRobin()
    total = sum(weights)
    picks = Counter(strategy.order(pool.states())[0].upstream.id for _ in range(total * 3))
    assert picks == {f"u{i}": w * 3 for i, w in enumerate(weights)}


def test_round_robin_lets_go_of_accounts_no_longer_in_the_pool() -> None:
    """A gateway whose accounts come and go (CLI changes, reloads) must not keep every id it ever saw."""
    from poolgate.lifecycle.routing.strategy import PRUNE_AT

    strategy = WeightedRoundRobin()
    for generation in range(PRUNE_AT // 2 + 10):
        pool = Pool()
        pool.replace(Upstream(id=f"g{generation}-{i}", kind="anthropic_api_key", base_url="http://x") for i in range(3))
        strategy.order(pool.states())
    assert len(strategy._current) <= PRUNE_AT + 4 * 3 + 3
    picks = Counter(strategy.order(pool.states())[0].upstream.id for _ in range(30))
    assert picks == {state.upstream.id: 10 for state in pool.states()}


def test_an_account_holds_a_bounded_number_of_models_out_the_ones_ending_soonest_go_first() -> None:
    """The model of a 403 is the caller's to choose: an account answering 403 to everything held one model a
    request (each until it was asked for again after its hold ended), as many as callers made up."""
    from poolgate.upstreams.pool import MAX_DENIED_MODELS, MODEL_DENIED_SECONDS

    state = make_pool([1]).states()[0]
    for i in range(MAX_DENIED_MODELS + 50):
        state.deny(f"claude-made-up-{i}", i + MODEL_DENIED_SECONDS)
    assert len(state.denied) == MAX_DENIED_MODELS
    assert state.denied_until("claude-made-up-49", 0.0) is None
    assert state.denied_until(f"claude-made-up-{MAX_DENIED_MODELS + 49}", 0.0) is not None
    # A model held again is held anew, not the next to go: its hold now ends last.
    state.deny("claude-made-up-50", MAX_DENIED_MODELS + 50 + MODEL_DENIED_SECONDS)
    state.deny("claude-one-more", MAX_DENIED_MODELS + 51 + MODEL_DENIED_SECONDS)
    assert state.denied_until("claude-made-up-50", 0.0) is not None
    assert state.denied_until("claude-made-up-51", 0.0) is None


def test_weighted_random_prefers_heavier_upstreams() -> None:
    pool = make_pool([1, 9])
    strategy = WeightedRandom(random.Random(7))
    picks = Counter(strategy.order(pool.states())[0].upstream.id for _ in range(2000))
    assert picks["u1"] > picks["u0"] * 5


def test_least_connections_picks_the_least_loaded_per_weight() -> None:
    pool = make_pool([1, 2, 1])
    u0, u1, u2 = pool.states()
    u0.in_flight, u1.in_flight, u2.in_flight = 3, 4, 1
    assert [s.upstream.id for s in LeastConnections().order(pool.states())] == ["u2", "u1", "u0"]


def test_first_pick_keeps_configuration_order_as_failover_order() -> None:
    pool = make_pool([1, 1, 1])
    assert [s.upstream.id for s in FirstPick().order(pool.states())] == ["u0", "u1", "u2"]


@given(
    st.lists(st.sampled_from(["ok", "parked", "unhealthy"]), min_size=1, max_size=8),
    st.sampled_from(["first-pick", "random", "round-robin", "least-connections"]),
    st.booleans(),
)
def test_an_unusable_upstream_is_never_chosen_while_a_usable_one_exists(
    states: list[str], strategy: str, panic: bool
) -> None:
    pool = make_pool([1] * len(states))
    now = 1000.0
    for state, health in zip(pool.states(), states, strict=True):
        if health == "parked":
            park(state.health, now + 30)
        elif health == "unhealthy":
            record_failure(state.health, Failure.server_error, now, HEALTH)
    router = Router(pool, RoutingConfig(strategy=strategy), panic=panic)  # type: ignore[arg-type]
    usable = {f"u{i}" for i, s in enumerate(states) if s == "ok"}
    if not usable:
        if panic and "unhealthy" in states:
            # Panic mode: one attempt at a cooling-down account (here all are due at once: the first), never
            # at a parked one.
            decision = router.route("claude-x", now)
            assert [s.upstream.id for s in decision.order] == [f"u{states.index('unhealthy')}"]
            assert [stage.name for stage in decision.trace.stages][-1] == "panic"
            return
        with pytest.raises(ApiError) as refused:
            router.route("claude-x", now)
        assert refused.value.status == 529
        assert refused.value.headers[0][0] == b"retry-after"
        return
    decision = router.route("claude-x", now)
    assert {s.upstream.id for s in decision.order} == usable
    assert decision.trace.terminal is not None and decision.trace.terminal.chosen in usable
    assert "panic" not in [stage.name for stage in decision.trace.stages]
    dropped = decision.trace.dropped()
    for i, health in enumerate(states):
        if health == "parked":
            assert dropped[f"u{i}"] == "rate_limited"
        elif health == "unhealthy":
            assert dropped[f"u{i}"] == "unhealthy"


def test_panic_mode_tries_the_account_due_soonest_once() -> None:
    """Every account is cooling down: the one whose cooldown ends first gets the request, alone (one
    attempt, no failover through the rest), and the trace says why."""
    pool = make_pool([1, 1, 1])
    u0, u1, u2 = pool.states()
    record_failure(u0.health, Failure.server_error, 103.0, HEALTH)
    record_failure(u1.health, Failure.server_error, 101.0, HEALTH)
    record_failure(u2.health, Failure.server_error, 102.0, HEALTH)
    decision = Router(pool, RoutingConfig(strategy="first-pick"), panic=True).route("m", 104.0)
    assert [state.upstream.id for state in decision.order] == ["u1"]
    panic = decision.trace.stages[-1]
    assert panic.name == "panic" and panic.kept == ("u1",)
    assert decision.trace.dropped() == {"u0": "unhealthy", "u1": "unhealthy", "u2": "unhealthy"}
    assert decision.trace.terminal is not None and decision.trace.terminal.chosen == "u1"


def test_panic_mode_passes_over_accounts_out_for_what_only_the_operator_fixes() -> None:
    """A revoked key (or a wrong base_url) due first took the panic attempt, a 500 "credential rejected" to
    the client, while an account out after a blip of 500s, which had recovered, waited its cooldown; and with
    only such accounts left, every request went to one to be rejected again, not the operator's 503."""
    pool = make_pool([1, 1, 1])
    revoked, wrong_url, blipped = pool.states()
    for _ in range(HEALTH.failure_threshold):
        record_failure(revoked.health, Failure.auth, 100.0, HEALTH)
    record_failure(wrong_url.health, Failure.misconfigured, 100.5, HEALTH)
    record_failure(blipped.health, Failure.server_error, 101.0, HEALTH)
    router = Router(pool, RoutingConfig(strategy="first-pick"), panic=True)
    decision = router.route("m", 102.0)
    assert [state.upstream.id for state in decision.order] == ["u2"]
    assert decision.trace.stages[-1].name == "panic"
    record_failure(blipped.health, Failure.auth, 102.0, HEALTH)  # its probe: a rejected credential now
    with pytest.raises(ApiError) as refused:
        router.route("m", 103.0)
    assert refused.value.status == 503
    assert "u0: credential rejected" in refused.value.message and "u1: misconfigured base_url" in refused.value.message


def test_an_account_whose_probe_is_in_flight_comes_last_for_failover_never_first() -> None:
    """Past its cooldown with its one probe in flight, an account takes no first attempt but may take a
    request failing over; one still cooling down, or out of rate-limit headroom, takes neither."""
    pool = make_pool([1, 1, 1, 1])
    healthy, probing, cooling, exhausted = pool.states()
    for state in (probing, cooling, exhausted):
        record_failure(state.health, Failure.server_error, 100.0, HEALTH)
    begin_attempt(probing.health, 111.0)
    begin_attempt(exhausted.health, 111.0)
    exhausted.ratelimited_until = 200.0
    cooling.health.retry_at = 150.0
    router = Router(pool, RoutingConfig(strategy="first-pick"))
    decision = router.route("m", 111.0)
    assert [state.upstream.id for state in decision.order] == ["u0", "u1"]
    assert decision.trace.dropped()["u1"] == "unhealthy"  # for a first attempt
    healthy.health.healthy, healthy.health.retry_at = False, 150.0
    with pytest.raises(ApiError):  # nothing for a first attempt: a reserve alone is no order
        Router(pool, RoutingConfig(strategy="first-pick"), panic=False).route("m", 111.0)
    # Panic mode's single attempt goes alone, with no reserves after it (it was the one probing, twice).
    panicked = Router(pool, RoutingConfig(strategy="first-pick"), panic=True).route("m", 111.0)
    assert len(panicked.order) == 1


def test_panic_mode_leaves_parked_and_exhausted_accounts_out() -> None:
    """A 429's retry-after and a used-up rate-limit window are the upstream's own word: no panic sends there."""
    pool = make_pool([1, 1])
    parked, exhausted = pool.states()
    park(parked.health, 100.0 + 30)
    record_failure(exhausted.health, Failure.server_error, 100.0, HEALTH)
    exhausted.ratelimited_until = 100.0 + 60
    with pytest.raises(ApiError) as refused:
        Router(pool, RoutingConfig(strategy="first-pick"), panic=True).route("m", 100.0)
    assert refused.value.status == 529


def test_a_model_no_upstream_serves_is_a_404_not_an_overload() -> None:
    pool = make_pool([1, 1], models=("claude-haiku-*",))
    router = Router(pool, RoutingConfig(strategy="first-pick"))
    assert router.route("claude-haiku-4-5", 0.0).order
    with pytest.raises(ApiError) as refused:
        router.route("claude-opus-4-5", 0.0)
    assert refused.value.status == 404 and refused.value.error_type == "not_found_error"


def test_a_model_whose_only_accounts_are_disabled_is_a_503_naming_them_not_a_404() -> None:
    """An operator disabling the one account that serves Sonnet made every Sonnet request a 404 "model not
    served"; then a 529 naming the disabled account, which Claude Code retried and showed as "The API is at
    capacity", never the message. It is a 503 not to be retried, saying what would serve the request."""
    pool = Pool()
    pool.replace(
        [
            Upstream(id="sonnet", kind="anthropic_api_key", base_url="http://x", enabled=False),
            Upstream(id="haiku", kind="anthropic_api_key", base_url="http://x", models=("claude-haiku-*",)),
        ]
    )
    router = Router(pool, RoutingConfig(strategy="first-pick"))
    with pytest.raises(ApiError) as refused:
        router.route("claude-sonnet-4-5", 0.0)
    assert refused.value.status == 503 and (b"x-should-retry", b"false") in refused.value.headers
    assert refused.value.message == (
        "No upstream account can serve this request (haiku: model_not_supported, sonnet: disabled); no retry helps "
        "until the gateway's operator enables an account, or use another model (in Claude Code: /model or --model)"
    )


def test_the_refusal_names_why_each_upstream_was_dropped_and_when_to_retry() -> None:
    pool = make_pool([1, 1])
    a, b = pool.states()
    park(a.health, 100.0 + 42)
    record_failure(b.health, Failure.server_error, 100.0, HEALTH)
    with pytest.raises(ApiError) as refused:
        Router(pool, RoutingConfig(strategy="first-pick")).route("m", 100.0)
    assert "u0: rate_limited" in refused.value.message and "u1: unhealthy" in refused.value.message
    assert refused.value.headers == [(b"retry-after", b"10"), (b"retry-after-ms", b"10000")]


def test_least_connections_takes_turns_by_weight_among_the_least_loaded() -> None:
    """Sequential requests find every account at 0 in flight: breaking that tie by configuration order sent
    them all to the first account."""
    pool = make_pool([1, 2, 1])
    router = Router(pool, RoutingConfig(strategy="least-connections"))
    picks = Counter(router.route("m", 0.0).order[0].upstream.id for _ in range(40))
    assert picks == {"u0": 10, "u1": 20, "u2": 10}
    u0, u1, u2 = pool.states()
    u0.in_flight, u1.in_flight, u2.in_flight = 1, 2, 0  # per unit of weight: 1, 1, 0
    assert all(router.route("m", 0.0).order[0] is u2 for _ in range(4))
    u2.in_flight = 1  # all at 1 per unit of weight: turns by weight again
    picks = Counter(router.route("m", 0.0).order[0].upstream.id for _ in range(40))
    assert picks == {"u0": 10, "u1": 20, "u2": 10}


@pytest.mark.parametrize("strategy", ["round-robin", "least-connections", "random"])
def test_a_large_pools_traffic_follows_the_weights_as_a_small_ones_does(strategy: str) -> None:
    """Past twice `score_sample` accounts only a sample is scored. It was drawn by weight and its ties were
    broken by weight again: four accounts of weight 1 and five of weight 3 gave the heavy ones 88 % of the
    requests, not 15/19 (79 %)."""
    weights = [1] * 4 + [3] * 5
    config = RoutingConfig(strategy=strategy, score_sample=4)  # type: ignore[arg-type]
    router = Router(make_pool(weights), config, WeightedRandom(random.Random(7)) if strategy == "random" else None)
    rounds = 100
    decisions = [router.route("m", 0.0) for _ in range(sum(weights) * rounds)]
    assert all(decision.trace.sampled for decision in decisions)
    picks = Counter(decision.order[0].upstream.id for decision in decisions)
    if strategy == "random":
        heavy = sum(count for upstream_id, count in picks.items() if int(upstream_id[1:]) >= 4)
        assert abs(heavy / len(decisions) - 15 / 19) < 0.03  # seeded; ±0.03 is over four standard deviations
    else:  # a round-robin gives each account exactly its weight's share
        assert picks == {f"u{i}": weight * rounds for i, weight in enumerate(weights)}


def test_first_pick_in_a_large_pool_keeps_configuration_order() -> None:
    """It scored a weighted random sample and took the first of that: any account, not the first."""
    router = Router(make_pool([1] * 4 + [3] * 5), RoutingConfig(strategy="first-pick", score_sample=4))
    decisions = [router.route("m", 0.0) for _ in range(50)]
    assert all(decision.trace.sampled and decision.order[0].upstream.id == "u0" for decision in decisions)


def test_a_refusal_names_the_disabled_upstreams_a_pin_or_the_model_left() -> None:
    """A pin whose one upstream was disabled answered "(u0: not_pinned, u1: not_pinned)", naming every
    account but the one pinned; with every account disabled, the refusal named none of them."""
    pool = Pool()
    pool.replace(
        [
            Upstream(id="u0", kind="anthropic_api_key", base_url="http://x"),
            Upstream(id="u1", kind="anthropic_api_key", base_url="http://x", enabled=False),
            Upstream(id="u2", kind="anthropic_api_key", base_url="http://x", enabled=False),
        ]
    )
    pins = (PinConfig(model="claude-haiku-*", upstreams=("u1",)),)
    router = Router(pool, RoutingConfig(strategy="first-pick", pins=pins))
    with pytest.raises(ApiError) as refused:
        router.route("claude-haiku-4-5", 0.0)
    assert refused.value.status == 503
    assert "(u0: not_pinned, u1: disabled)" in refused.value.message  # u2 is disabled, but not pinned
    assert router.route("claude-sonnet-4-5", 0.0).order[0].upstream.id == "u0"
    pool.replace([state.upstream for state in pool.states() if state.upstream.id != "u0"])
    with pytest.raises(ApiError) as refused:
        router.route("claude-sonnet-4-5", 0.0)
    assert refused.value.status == 503 and "(u1: disabled, u2: disabled)" in refused.value.message
    pool.replace([])
    with pytest.raises(ApiError) as refused:
        router.route("claude-sonnet-4-5", 0.0)
    assert (refused.value.status, refused.value.error_type, refused.value.message) == (
        529,
        "overloaded_error",
        "No upstream accounts are configured or enabled; no retry helps until the gateway's operator adds or enables "
        "an account",
    )


def test_one_slow_answer_puts_an_account_behind_the_others_for_a_while_not_for_good() -> None:
    """A JSON answer's first byte is its whole generation: one answer of 1.5 s among answers of a millisecond
    lost its account every tie, so it got nothing to measure again and was out of the round-robin for good."""
    pool = make_pool([1, 1, 1])
    router = Router(pool, RoutingConfig(strategy="round-robin"))
    slow, *fast = pool.states()
    for state in fast:
        state.stats.answered(0.5, 100.0)
    slow.stats.answered(1500.0, 100.0)
    first = Counter(router.route("m", 100.0).order[0].upstream.id for _ in range(30))
    assert first["u0"] == 0 and first["u1"] == first["u2"] == 15
    later = Counter(router.route("m", 200.0).order[0].upstream.id for _ in range(30))
    assert later == {"u0": 10, "u1": 10, "u2": 10}

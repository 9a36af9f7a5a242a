"""The router's shortcuts decide exactly what the plain computations would.

The live-state filters only look at `suspects`, what they keep is remembered per outcome, and headroom is
skipped when the last report guarantees plenty: each is checked here against the straightforward version,
including after the pool's state changes between two requests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolgate.config import RoutingConfig, ScoreWeights
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.routing.filters import FILTERS, credential_filter, suspects
from poolgate.lifecycle.routing.router import Router, RouteRefused
from poolgate.lifecycle.routing.scoring import TERMS, Weights, headroom_term, score_candidates
from poolgate.lifecycle.sign import OAUTH_KIND
from poolgate.upstreams.health import doubt, refuses_failover
from poolgate.upstreams.pool import Pool, UpstreamState
from poolgate.upstreams.quota import QuotaPicture, SubscriptionQuotaSnapshot
from poolgate.upstreams.ratelimits import KINDS, RateLimitObservation

NOW = 1_000.0

# One account's live state: healthy or not (and when it may be retried), parked, a window used up, a
# subscription quota rejected or allowed, whether it is a subscription account, its probe in flight, and a
# model it answered 403 for ("m" is the one routed), until when.
Described = tuple[bool, float, float, float, str | None, bool, bool, tuple[str, float] | None]
account_states = st.tuples(
    st.booleans(),
    st.floats(NOW - 50, NOW + 50),
    st.floats(0, NOW + 50),
    st.floats(0, NOW + 50),
    st.sampled_from([None, "allowed", "rejected"]),
    st.booleans(),
    st.booleans(),
    st.none() | st.tuples(st.sampled_from(["m", "other"]), st.floats(NOW - 50, NOW + 50)),
)


def pool_of(states: list[Described]) -> Pool:
    pool = Pool()
    pool.replace(
        Upstream(id=f"u{i}", kind=OAUTH_KIND if oauth else "anthropic_api_key", base_url="http://127.0.0.1:1")
        for i, (*_, oauth, _, _) in enumerate(states)
    )
    for state, described in zip(pool.states(), states, strict=True):
        apply(state, described)
    return pool


def apply(state: UpstreamState, described: Described) -> None:
    healthy, retry_at, parked_until, ratelimited_until, quota, _, probing, denied = described
    # Fields set directly, which the gateway never does: say so, as its own transitions do.
    doubt()
    state.health.healthy = healthy
    state.health.retry_at = retry_at
    state.health.probing = probing
    state.health.parked_until = parked_until
    state.ratelimited_until = ratelimited_until
    state.denied = dict([denied]) if denied is not None else {}
    state.quota = None
    if quota is not None:
        window = SubscriptionQuotaSnapshot(
            "five_hour",
            quota,
            0.5,
            1_800_000_100.0,
            None,
            NOW - 1,
            1_800_000_000.0,
            "headers",  # type: ignore[arg-type]
        )
        state.quota = QuotaPicture(
            {"five_hour": window},
            NOW - 1,
            1_800_000_000.0,
            "headers",
            quota,
            1_800_000_100.0,  # type: ignore[arg-type]
        )


def needs_reauth(pool: Pool, flagged: set[int]) -> Callable[[str], str | None]:
    """The signer's view: only subscription accounts have a credential that can need a new login."""

    def problem(upstream_id: str) -> str | None:
        state = pool.get(upstream_id)
        oauth = state is not None and state.upstream.kind == OAUTH_KIND
        return "needs_reauth" if oauth and int(upstream_id[1:]) in flagged else None

    return problem


def plain_stages(
    pool: Pool, now: float, problem: Callable[[str], str | None], model: str = "m"
) -> list[tuple[str, ...]]:
    """What each live-state stage keeps for `model`, every filter run over every candidate in turn."""
    candidates = pool.states()
    kept_ids = []
    stages = [*FILTERS, ("credentials", lambda c, m, n: credential_filter(c, problem))]
    for _, stage in stages:
        candidates, _ = stage(candidates, model, now)
        kept_ids.append(tuple(state.upstream.id for state in candidates))
    return kept_ids


@given(st.lists(account_states, min_size=1, max_size=12), st.sets(st.integers(0, 11)), st.booleans())
def test_a_candidate_that_is_not_a_suspect_is_kept_by_every_live_state_filter(
    states: list[Described], flagged: set[int], credentials: bool
) -> None:
    pool = pool_of(states)
    problem = needs_reauth(pool, flagged)
    doubtful = {id(state) for state in suspects(pool.states(), "m", NOW, credentials)}
    stages = [*FILTERS, ("credentials", lambda c, m, n: credential_filter(c, problem))] if credentials else FILTERS
    for state in pool.states():
        if id(state) not in doubtful:
            assert all(stage([state], "m", NOW)[0] == [state] for _, stage in stages)


@given(
    st.lists(account_states, min_size=2, max_size=12),
    st.lists(account_states, min_size=12, max_size=12),
    st.sets(st.integers(0, 11)),
    st.integers(0, 5),
)
def test_the_traces_stages_keep_what_the_plain_filters_keep_before_and_after_the_pool_changes(
    states: list[Described],
    changes: list[Described],
    flagged: set[int],
    sample: int,
) -> None:
    pool = pool_of(states)
    problem = needs_reauth(pool, flagged)
    router = Router(pool, RoutingConfig(score_sample=sample), credential_problem=problem)
    # Two models in turn: an account may be held out of one only (a 403 for it), and what the router
    # remembered for one must not stand for the other.
    for step, model in enumerate(["m", "other", "m", "other", "m"]):
        if step == 3:  # the same pool later, changed: nothing remembered may go stale
            for state, described in zip(pool.states(), changes, strict=False):
                apply(state, described)
        expected = plain_stages(pool, NOW, problem, model)
        try:
            trace = router.route(model, NOW).trace
        except RouteRefused as refused:  # a refusal carries its trace too
            trace = refused.trace
        live = [stage for stage in trace.stages if stage.name not in ("model", "billing", "denied_anyway")]
        assert [stage.kept for stage in live] == expected
        usable = set(expected[-1])
        anyway = [stage for stage in trace.stages if stage.name == "denied_anyway"]
        if anyway:
            # Nobody else left: the accounts held out of the model (and kept by every other stage) are tried.
            [stage] = anyway
            assert (
                not usable
                and stage.kept
                and set(stage.kept) <= {state.upstream.id for state in pool.states() if model in state.denied}
            )
            usable = set(stage.kept)
        if trace.terminal is not None and trace.terminal.order:
            order = trace.terminal.order
            # Last come the reserves for failover: accounts past their cooldown whose one probe is in flight.
            first = [upstream_id for upstream_id in order if upstream_id in usable]
            assert first and list(order[: len(first)]) == first
            for upstream_id in order[len(first) :]:
                reserve = pool.get(upstream_id)
                assert reserve is not None and reserve.health.probing
                assert refuses_failover(reserve.health, NOW) is None
            assert len(order) == len(set(order))


observations = st.builds(
    RateLimitObservation,
    kind=st.sampled_from(KINDS),
    # Small numbers, so that requests in flight and the prompt matter against them.
    limit=st.none() | st.integers(0, 100),
    remaining=st.none() | st.integers(0, 120),
    # Mostly windows that have not reset yet (after a reset `headroom` counts the full limit).
    reset_at=st.none() | st.floats(NOW - 100, NOW + 1000),
    observed_at=st.floats(NOW - 100, NOW),
)


@settings(max_examples=1000)
@given(
    st.lists(observations, max_size=4, unique_by=lambda obs: obs.kind),
    st.floats(NOW, NOW + 200),
    st.integers(0, 30),
    st.integers(0, 300),
    st.integers(0, 100),
)
def test_when_the_last_report_guarantees_plenty_the_headroom_term_is_zero(
    reported: list[RateLimitObservation], now: float, in_flight: int, tokens_in_flight: int, prompt_tokens: int
) -> None:
    state = UpstreamState(Upstream(id="u", kind="anthropic_api_key", base_url="http://127.0.0.1:1"))
    state.observe({obs.kind: obs for obs in reported}, NOW - 100)
    state.in_flight = state.unseen = in_flight  # sent since the report
    state.tokens_in_flight = tokens_in_flight if in_flight else 0
    floor = state.headroom_floor
    assert floor is not None
    if floor.clear(in_flight, state.tokens_per_request_in_flight(), prompt_tokens):
        state.headroom_floor = None  # the full computation
        assert headroom_term(state, now, prompt_tokens) == 0.0


def test_a_large_pool_scores_a_full_sample_even_when_the_accounts_always_scored_hold_most_weight() -> None:
    """Subscription accounts are always scored; the metered keys that fill the sample must still be
    drawn when the subscriptions carry nearly all of the pool's weight."""
    pool = Pool()
    pool.replace(
        [
            *(Upstream(id=f"max{i}", kind=OAUTH_KIND, base_url="http://127.0.0.1:1", weight=50) for i in range(20)),
            *(Upstream(id=f"key{i}", kind="anthropic_api_key", base_url="http://127.0.0.1:1") for i in range(80)),
        ]
    )
    router = Router(pool, RoutingConfig(score_sample=24))
    for _ in range(50):
        scores = router.route("m", NOW).trace.scores or ()
        assert len(scores) == 24
        assert sum(score.upstream_id.startswith("key") for score in scores) == 4


def test_accounts_removed_from_the_pool_are_never_routed_to_and_new_ones_are() -> None:
    pool = Pool()
    pool.replace(Upstream(id=f"u{i}", kind="anthropic_api_key", base_url="http://127.0.0.1:1") for i in range(12))
    router = Router(pool, RoutingConfig(score_sample=4))
    for state in pool.states()[:3]:
        state.health.healthy, state.health.retry_at = False, NOW + 60  # the same outcome as before, remembered
    doubt()
    assert not {"u0", "u1", "u2"} & set(router.route("m", NOW).trace.terminal.order)  # type: ignore[union-attr]
    pool.replace(Upstream(id=f"u{i}", kind="anthropic_api_key", base_url="http://127.0.0.1:1") for i in range(6, 18))
    for _ in range(20):
        decision = router.route("m", NOW)
        ids = {state.upstream.id for state in decision.order}
        assert ids <= {f"u{i}" for i in range(6, 18)}
        assert [stage.kept for stage in decision.trace.stages if stage.name == "health"] == [
            tuple(f"u{i}" for i in range(6, 18))
        ]


@given(
    st.lists(
        st.tuples(
            st.sampled_from([None, 500.0, 600.0, 700.0, 750.0, 800.0, 900.0]),
            st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.6, 0.7, 1.1, 1.2, 1.3, 1.6, 1.7, 2.2, 2.3]),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_a_total_is_exactly_the_sum_of_its_terms_in_order(candidates: list[tuple[float | None, float, bool]]) -> None:
    """Candidates whose terms are equal tie exactly (the strategy then breaks the tie), and the ranking is
    the one the trace's terms explain: no regrouping of the sum may move a total by its last bit."""
    states = []
    for index, (ttfb, _, subscription) in enumerate(candidates):
        kind = OAUTH_KIND if subscription else "anthropic_api_key"
        state = UpstreamState(Upstream(id=f"u{index}", kind=kind, base_url="http://127.0.0.1:1"))
        state.stats.ttfb_ms = ttfb
        states.append(state)
    sessions = {f"u{index}": round(value * 10) for index, (_, value, _) in enumerate(candidates)}
    scores = score_candidates(states, None, NOW, Weights.of(ScoreWeights(spread=1.0)), sessions)
    for score in scores:
        assert score.total == sum(score.terms[name] for name in TERMS)
    by_terms: dict[tuple[float, ...], set[float]] = {}
    for score in scores:
        by_terms.setdefault(tuple(score.terms.values()), set()).add(score.total)
    assert all(len(totals) == 1 for totals in by_terms.values())


def test_scoring_no_candidates_scores_nothing() -> None:
    for weights in (ScoreWeights(), ScoreWeights(load=1.0, weight=1.0)):
        assert score_candidates([], None, NOW, Weights.of(weights)) == []


def test_an_observer_cannot_change_what_later_traces_say_was_dropped() -> None:
    """Stage entries that dropped nothing share one empty mapping; editing it would rewrite every trace."""
    pool = Pool()
    pool.replace(Upstream(id=f"u{i}", kind="anthropic_api_key", base_url="http://127.0.0.1:1") for i in range(3))
    router = Router(pool, RoutingConfig())
    stage = router.route("m", NOW).trace.stages[-1]
    with pytest.raises(TypeError):
        stage.dropped["u0"] = "unhealthy"
    with pytest.raises(TypeError):
        stage.dropped.update(u0="unhealthy")
    assert all(not s.dropped for s in router.route("m", NOW).trace.stages)


def test_an_account_that_comes_into_doubt_between_requests_is_dropped_by_the_next() -> None:
    """The router remembers which accounts were in doubt until one may have come into doubt since: each
    way an account does (a failure, a 429's park, a used-up rate-limit window) is seen by the very next
    request, and once the doubts clear with time the accounts are routed to again."""
    from poolgate.config import HealthConfig
    from poolgate.upstreams.health import Failure, park, record_failure

    pool = Pool()
    pool.replace(Upstream(id=f"u{i}", kind="anthropic_api_key", base_url="http://127.0.0.1:1") for i in range(4))
    u0, u1, u2, _ = pool.states()
    router = Router(pool, RoutingConfig(strategy="first-pick"))

    def order(now: float = NOW) -> list[str]:
        return [state.upstream.id for state in router.route("m", now).order]

    assert order() == ["u0", "u1", "u2", "u3"]
    record_failure(u0.health, Failure.server_error, NOW, HealthConfig(cooldown_seconds=30))
    assert order() == ["u1", "u2", "u3"]
    park(u1.health, NOW + 30)
    assert order() == ["u2", "u3"]
    u2.observe({"requests": RateLimitObservation("requests", 50, 0, NOW + 30, NOW)}, NOW)
    assert order() == ["u3"]
    assert order(NOW + 31) == ["u0", "u1", "u2", "u3"]


def test_the_weights_scoring_reads_are_the_configured_ones() -> None:
    """Scoring reads `routing.score_weights` from a plain snapshot (`Weights`, a pydantic field costs ~430
    instructions a read): every configured weight is in it, with its value, and it holds nothing else."""
    configured = ScoreWeights(cache=1.5, cost=0.25, spread=0.0)
    weights = Weights.of(configured)
    assert set(ScoreWeights.model_fields) == set(TERMS) == {field.name for field in dataclasses.fields(Weights)}
    assert all(getattr(weights, term) == getattr(configured, term) for term in TERMS)

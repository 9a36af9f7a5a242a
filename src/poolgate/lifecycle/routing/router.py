"""route: request + live pool state → `RouteDecision` (ordered candidates) and its `RoutingTrace`."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from operator import itemgetter

import msgspec

from poolgate.api.errors import ApiError, no_upstream, retry_after_fields, retry_headers, too_long_to_retry
from poolgate.billing.book import ChannelBook
from poolgate.billing.channel import month_bounds, month_key
from poolgate.cache.breakpoints import PromptPrefix
from poolgate.cache.warmth import WarmLevel, hit
from poolgate.config import PinConfig, RoutingConfig
from poolgate.lifecycle.attempt_errors import CredentialRejected, Misconfigured
from poolgate.lifecycle.context import SessionKey
from poolgate.lifecycle.quotas import humanize, rfc3339
from poolgate.lifecycle.routing.affinity import SessionAffinity
from poolgate.lifecycle.routing.filters import (
    FILTERS,
    Dropped,
    Filter,
    FilterResult,
    billing_filter,
    credential_filter,
    pin_filter,
    pin_for,
    suspects,
)
from poolgate.lifecycle.routing.scoring import (
    NO_ROOM,
    Weights,
    is_paid_for,
    room_term,
    score_candidates,
)
from poolgate.lifecycle.routing.strategy import FirstPick, TerminalStrategy, make_strategy
from poolgate.lifecycle.routing.trace import (
    PerCandidateReason,
    RoutingTrace,
    StageDecision,
    TerminalDecision,
    listed,
)
from poolgate.lifecycle.sign import OAUTH_KIND
from poolgate.upstreams.health import Failure, doubts, refuses_failover
from poolgate.upstreams.pool import ModelCandidates, Pool, UpstreamState, serves_model


def month_end_headers(now_wall: float) -> list[tuple[bytes, bytes]]:
    """For a 503 that lasts until a flat-fee month ends: when it ends, and (but in its last minute) no
    retry: Claude Code and the SDKs retry 5xx several times, a minute of "hanging" for nothing."""
    _, end = month_bounds(month_key(now_wall))
    return retry_headers(end - now_wall)


# Why an account is left out for good, as far as one request goes.
NEVER_THIS_REQUEST = frozenset({"model_not_supported", "not_pinned"})


def next_usable_in(
    states: Iterable[UpstreamState], now: float, short_wait: float, refreshing: bool = False, model: str = ""
) -> float:
    """Seconds until the first of these accounts (ones that could serve a request for `model`, none usable now)
    that is parked, cooling down or out of rate-limit or quota headroom may be tried again; `short_wait` when
    none says when. `refreshing`: one of them is out while its token refresh is failing, which is `short_wait`
    away: its refresh retries in the background, seconds apart (the 529 sent clients away for the half hour
    another account was parked, the refresh back two seconds later). Not rounded: `retry-after-ms` tells it
    to the millisecond (an account cooling down for 0.2 s)."""
    waits = [state.usable_again_at(now, model) - now for state in states if state.upstream.enabled]
    positive = [wait for wait in waits if wait > 0]
    if refreshing:
        positive.append(short_wait)
    return min(positive) if positive else short_wait


def refusal_message(reasons: Mapping[str, str], wait: float) -> str:
    """What the gateway's 529 says: each account and why it cannot take the request, and, when the first is
    back in over a minute, when."""
    explained = ", ".join(f"{upstream}: {reason}" for upstream, reason in sorted(reasons.items()))
    message = f"No upstream account can serve this request ({explained})"
    if too_long_to_retry(wait):
        # Clients are told not to retry (see `retry_headers`): the message says when instead.
        message += f"; the first may be tried again in {humanize(wait)}, at {rfc3339(time.time() + wait)}"
    return message


def models_named(states: Iterable[UpstreamState]) -> set[str]:
    """Model names that stand for every model the accounts serve, to ask which a request for some model
    could go to: each account's globs, taken as a model name (`claude-opus-*` is within `claude-*`, not the
    other way round), and one that none names (for the accounts that serve any model)."""
    return {"", *(glob for state in states for glob in state.upstream.models)}


def _credentials(
    candidates: Sequence[UpstreamState], model: str, now: float, problem: Callable[[str], str | None]
) -> FilterResult:
    return credential_filter(candidates, problem)


# What the operator does to bring back an account out for each reason that only the operator's act ends.
OPERATORS_ACTS = {
    "disabled": "enables an account",
    "needs_reauth": "logs an account in again",
    CredentialRejected.named: "gives an account a valid key or token",
    Misconfigured.named: "fixes an account's base_url",
}
# An account out as unhealthy for a failure only the operator can fix, by what the refusal calls it: the relay's
# words for it (it counted as cooling down, "back" in 5 s, once three rejections had made it unhealthy).
_UNHEALTHY_FOR = {Failure.auth: CredentialRejected.named, Failure.misconfigured: Misconfigured.named}


def awaits_the_operator(reasons: Mapping[str, str]) -> str | None:
    """When every account the request may go to (`reasons`: each account routing left out and why) is out until
    the operator acts, what the client is told besides; else None. No retry helps: the pool's 529, with its
    short `retry-after`, Claude Code retried three times and then showed only "Repeated 529 Overloaded errors.
    The API is at capacity", never the message. No account at all is the operator's to add."""
    considered = {reason for reason in reasons.values() if reason not in NEVER_THIS_REQUEST}
    if not considered.issubset(OPERATORS_ACTS):
        return None
    acts = " or ".join(OPERATORS_ACTS[reason] for reason in sorted(considered)) or "adds or enables an account"
    advice = f"no retry helps until the gateway's operator {acts}"
    if "model_not_supported" in reasons.values():
        advice += ", or use another model (in Claude Code: /model or --model)"
    return advice


def _without(ids: tuple[str, ...], dropped: Dropped) -> tuple[str, ...]:
    """The ids a stage kept: the ones before it when it dropped none (most stages, most of the time)."""
    if not dropped:
        return ids
    gone = {upstream_id for upstream_id, _ in dropped}
    return tuple([upstream_id for upstream_id in ids if upstream_id not in gone])


class _ReadOnlyDict(dict[str, PerCandidateReason]):
    """An empty mapping shared by many traces, which observers receive: it refuses to change."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a shared, read-only mapping")

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]


# The `dropped` of every stage entry that dropped nothing (most of them).
NOTHING_DROPPED: dict[str, PerCandidateReason] = _ReadOnlyDict()


def _us(ns: int) -> float:
    """ns → µs to a tenth, how traces record time. Integer arithmetic: `round(float, 1)` cost more than some
    of the stages it timed."""
    return ns // 100 / 10


def _us_since(began: int) -> float:
    """µs since `began` (a `perf_counter_ns` reading), as `_us` (written out: three times a route)."""
    return (time.perf_counter_ns() - began) // 100 / 10


def _entry(name: str, ids: tuple[str, ...], dropped: Dropped, us: float, count: int | None = None) -> StageDecision:
    """A stage's entry in the trace: the ids it kept, why it dropped the others, its time in µs."""
    return StageDecision(name, ids, dict(dropped) if dropped else NOTHING_DROPPED, us, count)


def _decided(name: str, ids: tuple[str, ...], dropped: Dropped, began: int) -> StageDecision:
    """A stage's entry, timed since `began` (µs, to a tenth)."""
    return _entry(name, ids, dropped, _us_since(began))


@dataclass(frozen=True, slots=True)
class _Kept:
    """The candidates the filters kept for one outcome of theirs, with what sampling needs of them: worked
    out once per outcome (a model's candidates, and which of them each stage dropped), which changes only
    when an account becomes unusable or usable again."""

    # What each stage kept, in stage order.
    stage_ids: tuple[tuple[str, ...], ...]
    # The same as their trace entries list them: (ids, how many in all when only the first are listed).
    listed: tuple[tuple[tuple[str, ...], int | None], ...]
    states: tuple[UpstreamState, ...]
    positions: dict[str, int]
    # Running totals of their weights, for the terminal strategy's draw from all of them (`_sample`).
    cum_weights: list[int]
    # The trace entries of the live-state stages after the first when none of them ran (no candidate was in
    # doubt): the same in every such trace.
    unrun: tuple[StageDecision, ...]
    # Held so that the ids in the memo's key stay unique while the entry lives.
    basis: object

    @property
    def ids(self) -> tuple[str, ...]:
        return self.stage_ids[-1]

    @classmethod
    def of(
        cls,
        states: Sequence[UpstreamState],
        ids: tuple[str, ...],
        drops: Sequence[Dropped],
        basis: object,
        names: Sequence[str] = (),
    ) -> _Kept:
        stage_ids: list[tuple[str, ...]] = []
        gone: set[str] = set()
        for dropped in drops:
            ids = _without(ids, dropped)
            stage_ids.append(ids)
            gone.update(upstream_id for upstream_id, _ in dropped)
        kept = tuple(state for state in states if state.upstream.id not in gone) if gone else tuple(states)
        entries = tuple([listed(ids) for ids in stage_ids])
        return cls(
            tuple(stage_ids),
            entries,
            kept,
            {state.upstream.id: index for index, state in enumerate(kept)},
            list(accumulate([state.upstream.weight for state in kept])),
            tuple(
                [
                    _entry(name, stage_ids, [], 0.0, count)
                    for name, (stage_ids, count) in zip(names[1:], entries[1:], strict=False)
                ]
            ),
            basis,
        )


@dataclass(frozen=True, slots=True)
class _ModelStage:
    """The model stage's trace entry for one `Pool.serving` answer (which it holds, so that its id stays
    unique while the entry lives): the ids as a trace lists them, how many in all, the dropped."""

    serving: ModelCandidates
    ids: tuple[str, ...]
    count: int | None
    dropped: dict[str, PerCandidateReason]


_first = itemgetter(0)


def _due(state: UpstreamState) -> float:
    """When a cooling-down account may be tried again."""
    return state.health.retry_at


# Distinct filter outcomes remembered (each is one pool-sized tuple); a busy pool has a handful at a time.
KEPT_MEMO_SIZE = 64


class RouteRefused(ApiError):
    """No candidate is left: the answer for the client, plus the trace that explains it."""

    def __init__(self, error: ApiError, trace: RoutingTrace) -> None:
        super().__init__(error.status, error.message, error.error_type, error.headers)
        self.trace = trace


class RouteDecision(msgspec.Struct, frozen=True):
    order: tuple[UpstreamState, ...]
    trace: RoutingTrace


class Router:
    """Filters drop the candidates that cannot serve; scoring ranks the rest; the terminal strategy breaks
    ties; a session's own account goes first while it is usable and has headroom."""

    def __init__(
        self,
        pool: Pool,
        config: RoutingConfig,
        strategy: TerminalStrategy | None = None,
        credential_problem: Callable[[str], str | None] | None = None,
        quota_threshold: float = 0.8,
        billing: ChannelBook | None = None,
        clock: Callable[[], float] = time.time,
        panic: bool = False,
    ) -> None:
        self._pool = pool
        # When every candidate is out and some only for cooling down: try the one due soonest (`_panicked`).
        self._panic = panic
        # Channel billing: flat-fee quotas (a filter), paid-for capacity and prices (scoring).
        self._billing = billing
        # Wall-clock time (subscription windows, calendar months); injectable for tests.
        self._clock = clock
        self._config = config
        # What every request reads of the (frozen) configuration, read once: a pydantic model's field costs ~430
        # instructions a read (see `scoring.Weights`).
        self._pins = config.pins
        self._cache_aware = config.cache_aware
        self._score_sample = config.score_sample
        self._stickiness = config.session_stickiness
        self._weights = Weights.of(config.score_weights)
        self._tie_margin = config.tie_margin
        # The signer's view: an account whose credential cannot be used (OAuth `needs_reauth`).
        self._credential_problem = credential_problem
        self._quota_threshold = quota_threshold
        self._strategy = strategy or make_strategy(config.strategy)
        # New sessions spread over the pool (the `spread` term), but not over a primary's fallbacks: `first-pick`
        # is an order, and spread, two of every three Claude Code sessions (each request has one) went to them.
        self._spreads = self._strategy.name != FirstPick.name
        self._retry_after = config.no_upstream_retry_after_seconds
        self.affinity = SessionAffinity(idle_ttl=config.session_idle_seconds)
        self._rng = random.Random()
        # The live-state filter stages every request goes through, in order, after the model stage and a
        # matching pin.
        self._stages: tuple[tuple[str, Filter], ...] = FILTERS
        if credential_problem is not None:
            self._stages += (("credentials", partial(_credentials, problem=credential_problem)),)
        self._nothing_dropped: tuple[Dropped, ...] = tuple([] for _ in self._stages)
        self._stage_names = tuple([name for name, _ in self._stages])
        self._health_at = self._stage_names.index("health")
        self._denied_at = self._stage_names.index("denied")
        self._kept_memo: dict[tuple[object, ...], _Kept] = {}
        self._model_stages: dict[int, _ModelStage] = {}
        self._kept_version = pool.version
        # What `_suspects` found last, and for which (serving, pin, doubts()).
        self._doubtful: list[UpstreamState] = []
        self._doubtful_for: tuple[ModelCandidates, object, int] | None = None

    def answered(
        self, session_id: SessionKey | None, upstream_id: str, home: str | None, model: str, now: float
    ) -> str:
        """A session's request was answered by `upstream_id`: the session's home from now on (returned),
        unless it was failed over from `home`, the account the session had and the router put first, which
        can still serve (it answered one 529, say): the conversation's cache is there (one overloaded answer
        moved a session for good, and its next turn re-wrote its whole prompt elsewhere, at ten times the
        price of reading it). A session is its caller's conversation with one model (`SessionKey`): side
        requests with another model have homes of their own."""
        if home is not None and upstream_id != home:
            state = self._pool.get(home)
            # A rejected credential (a revoked key) or a wrong base_url is no passing trouble: the session
            # moves at once.
            if state is not None and not state.health.awaits_operator() and not self._unusable(state, model, now):
                self.affinity.bind(session_id, home, now, fallback=upstream_id)
                return home
        self.affinity.bind(session_id, upstream_id, now)
        return upstream_id

    def _unusable(self, state: UpstreamState, model: str, now: float) -> str | None:
        """Why the router's live-state stages would drop the account now (its being disabled first), or None."""
        if not state.upstream.enabled:
            return "disabled"
        for _, stage in self._stages:
            _, dropped = stage((state,), model, now)
            if dropped:
                return dropped[0][1]
        return None

    def unusable_accounts(self, now: float, model: str | None = None) -> dict[str, str | None]:
        """Why each account cannot take a request now, by the router's own stages (the live-state filters,
        the credential check, channel billing over the accounts they leave; pins and model globs aside), or
        None when it can take one: judged for `model` (a model's own quota window, a 403 for it), or without
        one for some model. What the admin API, the metrics and `/readyz` report, so that they never call
        "usable" an account the router would drop, nor unusable one it sends requests to (a caller that has a
        model checks the account's globs itself: the keepalive does, which went on to an account held out of
        its session's model)."""
        states = self._pool.states()
        reasons: dict[str, str | None] = {}
        for state in states:
            reasons[state.upstream.id] = self._unusable(state, model or "", now)
        if self._billing is not None and self._billing.limited:
            enabled = [state for state in states if reasons[state.upstream.id] != "disabled"]
            models = {model} if model is not None else models_named(enabled)
            reasons.update(self._billing_drops(self._billing, enabled, reasons, models))
        return reasons

    def _billing_drops(
        self,
        book: ChannelBook,
        enabled: Sequence[UpstreamState],
        reasons: dict[str, str | None],
        models: Iterable[str],
    ) -> dict[str, str]:
        """Why the billing stage drops the enabled accounts the other stages keep (`reasons` None) for every
        one of `models` each serves: as in `route`, a used-up `block` channel blocks only the requests for a
        model it serves itself (one that served only Opus made every metered key serving Sonnet
        `blocked_by_billing`, and `/readyz` 503, while they answered)."""
        now_wall = self._clock()
        dropped: dict[str, str] = {}
        kept: set[str] = set()
        for model in models:
            # An account serves its own globs, `claude-[so]*` too, which no glob matches as a name.
            serving = [
                state
                for state in enabled
                if model in state.upstream.models or serves_model(state.upstream.models, model)
            ]
            usable = [state for state in serving if reasons[state.upstream.id] is None]
            # As in `route`: the enabled accounts the stages dropped still count for a `block` channel.
            out = [state for state in serving if reasons[state.upstream.id] is not None]
            _, drops, _ = billing_filter(usable, book, now_wall, out)
            gone = dict(drops)
            dropped.update(gone)
            kept.update(state.upstream.id for state in usable if state.upstream.id not in gone)
        return {upstream_id: reason for upstream_id, reason in dropped.items() if upstream_id not in kept}

    def refusal_now(self, model: str, caller: str | None, billed: bool = True) -> RouteRefused | None:
        """The router's own answer to a request for `model` from `caller` now when no account can take it (the
        529 naming every account and when the first is back), or None when some account can."""
        try:
            self.route(model, caller=caller, billed=billed)
        except RouteRefused as refusal:
            return refusal
        return None

    def route(
        self,
        model: str,
        now: float | None = None,
        session_id: SessionKey | None = None,
        prefix: PromptPrefix | None = None,
        caller: str | None = None,
        billed: bool = True,
    ) -> RouteDecision:
        """The accounts to try for a request for `model`, best first. `billed`: whether the request costs
        anything (counting tokens does not): a free one is not held to the channels' monthly quotas, which
        it does not count against."""
        now = time.monotonic() if now is None else now
        if self._kept_version != self._pool.version:  # accounts came or went: let go of the old ones
            self._kept_memo.clear()
            self._model_stages.clear()
            self._kept_version = self._pool.version
        trace = RoutingTrace(stages=[])
        began = time.perf_counter_ns()
        serving = self._pool.serving(model)
        model_stage = self._model_stage(serving)
        # The first entry, its ids listed already: nothing for `RoutingTrace.add` to check.
        trace.stages.append(
            StageDecision("model", model_stage.ids, model_stage.dropped, _us_since(began), model_stage.count)
        )
        candidates: Sequence[UpstreamState] = serving.states
        ids = serving.ids
        pin = pin_for(self._pins, model, caller) if self._pins else None
        if pin is not None:
            began = time.perf_counter_ns()
            candidates, dropped = pin_filter(candidates, pin)
            ids = _without(ids, dropped)
            trace.add(_decided("pin", ids, dropped, began))
        # The live-state filters look only at the candidates they might drop (the first one's time includes
        # finding those); what they keep is worked out once per outcome.
        began = time.perf_counter_ns()
        doubtful = self._suspects(serving, pin, candidates, model, now)
        drops: Sequence[Dropped]
        if doubtful:
            drops = []
            timings: list[float] = []
            for _, stage in self._stages:
                dropped = []
                if doubtful:
                    doubtful, dropped = stage(doubtful, model, now)
                drops.append(dropped)
                ended = time.perf_counter_ns()
                timings.append(_us(ended - began))
                began = ended
            outcome = tuple([tuple([upstream_id for upstream_id, _ in d]) for d in drops])
            if not any(outcome):  # every account in doubt has recovered: find them afresh next time
                self._doubtful_for = None
        else:  # nobody to look at: no stage runs (the first one's time is the search)
            drops, outcome = self._nothing_dropped, ()
            timings = [_us_since(began)]
        key = (id(serving), id(pin), outcome)
        kept = self._kept_memo.get(key)
        if kept is None:
            if len(self._kept_memo) >= KEPT_MEMO_SIZE:
                self._kept_memo.clear()
            kept = self._kept_memo[key] = _Kept.of(candidates, ids, drops, (serving, pin), self._stage_names)
        # Entries with their ids listed already, after at most two others: nothing for `RoutingTrace.add` to check.
        if outcome:
            for name, (stage_ids, count), dropped, us in zip(
                self._stage_names, kept.listed, drops, timings, strict=True
            ):
                trace.stages.append(_entry(name, stage_ids, dropped, us, count))
        else:
            stage_ids, count = kept.listed[0]
            trace.stages.append(_entry(self._stage_names[0], stage_ids, [], timings[0], count))
            trace.stages += kept.unrun
        if not kept.states and outcome:
            kept = self._denied_anyway(candidates, drops[self._denied_at], model, now, trace) or kept
        # Panic mode's one attempt is all a request gets then: no failover reserves after it.
        reserves_wanted = bool(outcome)
        if not kept.states and self._panic and outcome:
            kept = self._panicked(candidates, drops, model, now, trace) or kept
            reserves_wanted = False
        considered, candidates = candidates, kept.states
        ids = kept.ids
        now_wall = self._clock()
        # The monthly quotas a billed request is held to (none, or none limited: the stage does not run).
        book = self._billing if billed and self._billing is not None and self._billing.limited else None
        if book is not None:
            began = time.perf_counter_ns()
            positions = kept.positions
            unusable = [state for state in considered if state.upstream.id not in positions]
            paying, dropped, blocked = billing_filter(candidates, book, now_wall, unusable)
            if dropped:
                kept = _Kept.of(paying, ids, [dropped], None)
            trace.add(_decided("billing", kept.ids, dropped, began))
            if blocked is not None:
                trace.terminal = TerminalDecision(strategy=self._strategy.name, chosen=None, order=())
                raise RouteRefused(ApiError(503, blocked, "api_error", month_end_headers(now_wall)), trace)
        order, sticky = self._order(
            kept, now, session_id, prefix if self._cache_aware else None, trace, model, now_wall
        )
        if order and reserves_wanted and book is None:
            order += self._reserves(drops, model, now)
        trace.terminal = TerminalDecision(
            strategy=self._strategy.name,
            chosen=order[0].upstream.id if order else None,
            order=tuple([state.upstream.id for state in order]),
            sticky=sticky,
        )
        if not order:
            raise RouteRefused(self._refusal(model, trace, now, pin), trace)
        return RouteDecision(tuple(order), trace)

    def _suspects(
        self, serving: ModelCandidates, pin: object, candidates: Sequence[UpstreamState], model: str, now: float
    ) -> list[UpstreamState]:
        """The candidates the live-state filters might drop (`suspects`), looked for again only once some
        account may have come into doubt since (`doubts()`): time passing only clears doubts, so the ones
        found before are still a superset. A pass over the whole pool on every request was a third of the
        time of routing among 100 accounts."""
        found_for = self._doubtful_for
        epoch = doubts()
        if found_for is not None and found_for[0] is serving and found_for[1] is pin and found_for[2] == epoch:
            return self._doubtful
        credentials = self._credential_problem is not None and OAUTH_KIND in self._pool.kinds
        # (`serving` is the model's own: the model is in the key.)
        self._doubtful = suspects(candidates, model, now, credentials)
        self._doubtful_for = (serving, pin, epoch)
        return self._doubtful

    def _reserves(self, drops: Sequence[Dropped], model: str, now: float) -> list[UpstreamState]:
        """The accounts the health stage dropped only because their one probe is in flight, past their
        cooldown: not for a first attempt, but last in the order, for a request failing over (see
        `refuses_failover`), as far as the stages after health take them. Accounts quiet since they recovered
        are all probing at once when traffic comes back, and a burst meeting a newly failing account had
        nowhere else to go."""
        probing: Sequence[UpstreamState] = [
            state
            for upstream_id, reason in drops[self._health_at]
            if reason == "unhealthy"
            and (state := self._pool.get(upstream_id)) is not None
            and state.health.probing
            and refuses_failover(state.health, now) is None
        ]
        return list(self._kept_after(self._health_at, probing, model, now))

    def _kept_after(self, at: int, states: Sequence[UpstreamState], model: str, now: float) -> Sequence[UpstreamState]:
        """`states` as the live-state stages after the one at index `at` keep them."""
        for _, stage in self._stages[at + 1 :]:
            if not states:
                break
            states, _ = stage(states, model, now)
        return states

    def _denied_anyway(
        self, candidates: Sequence[UpstreamState], denied: Dropped, model: str, now: float, trace: RoutingTrace
    ) -> _Kept | None:
        """The filters left nobody, and some accounts only because they answered 403 for the model lately: they
        are tried all the same (trace stage `denied_anyway`). A 403 may be for a feature one caller's request
        asked for, not for the model: refused outright, every caller's requests for the model were, for as
        long as the holds last, after one such request; tried, a real denial costs a quick 403 each, and the
        client gets it. The holds only steer requests to the accounts that serve the model while there are
        any."""
        if not denied:
            return None
        began = time.perf_counter_ns()
        held = {upstream_id for upstream_id, _ in denied}
        ready = self._kept_after(
            self._denied_at, [state for state in candidates if state.upstream.id in held], model, now
        )
        if not ready:
            return None
        ids = tuple([state.upstream.id for state in ready])
        trace.add(_decided("denied_anyway", ids, [], began))
        return _Kept.of(ready, ids, [[]], None)

    def _panicked(
        self,
        candidates: Sequence[UpstreamState],
        drops: Sequence[Dropped],
        model: str,
        now: float,
        trace: RoutingTrace,
    ) -> _Kept | None:
        """Panic mode: the filters left nobody, but some accounts were dropped only because they are cooling
        down after failures. The one due soonest gets the request (its trace stage `panic`), as one attempt:
        refusing every request until a cooldown ends would turn a blip across the whole pool into an outage
        of 5–75 s after the accounts have recovered, while a success makes the account healthy at once.
        The stages after health still apply to them: accounts out of rate-limit headroom or without a usable
        credential stay out (parked and quota-blocked ones never reach this: health and quota dropped them
        for that). So do accounts unhealthy from rejecting their credential or from a misconfigured base_url,
        which no wait cures: due first, a revoked key took every request (a 500 "credential rejected", or the
        refusal of it) while an account out after a blip of 500s, which had recovered, waited its cooldown."""
        began = time.perf_counter_ns()
        cooling = {upstream_id for upstream_id, reason in drops[self._health_at] if reason == "unhealthy"}
        waiting = [state for state in candidates if state.upstream.id in cooling and not state.health.awaits_operator()]
        ready = self._kept_after(self._health_at, waiting, model, now)
        if not ready:
            return None
        chosen = min(ready, key=_due)
        ids = (chosen.upstream.id,)
        trace.add(_decided("panic", ids, [], began))
        return _Kept.of((chosen,), ids, [[]], None)

    def _model_stage(self, serving: ModelCandidates) -> _ModelStage:
        """The model stage's trace entry, but for its time: fixed while the pool is (see `Pool.serving`)."""
        stage = self._model_stages.get(id(serving))
        if stage is None or stage.serving is not serving:
            if len(self._model_stages) >= KEPT_MEMO_SIZE:
                self._model_stages.clear()
            ids, count = listed(serving.ids)
            dropped = (
                _ReadOnlyDict({upstream_id: "model_not_supported" for upstream_id in serving.unserved})
                if serving.unserved
                else NOTHING_DROPPED
            )
            stage = self._model_stages[id(serving)] = _ModelStage(serving, ids, count, dropped)
        return stage

    def _order(
        self,
        index: _Kept,
        now: float,
        session_id: SessionKey | None,
        prefix: PromptPrefix | None,
        trace: RoutingTrace,
        model: str = "",
        now_wall: float | None = None,
    ) -> tuple[list[UpstreamState], bool]:
        kept = index.states
        if len(kept) <= 1:
            return list(kept), False
        began = time.perf_counter_ns()
        now_wall = self._clock() if now_wall is None else now_wall
        sample = self._score_sample
        # Sampling pays (a draw per candidate, a failover tail) only in a pool well beyond the sample size.
        sampling = 0 < 2 * sample < len(kept) and not (self._billing is not None and self._billing.priced_by_upstream)
        preferred = self.affinity.preferred(session_id, now) if self._stickiness else None
        home_at = index.positions.get(preferred) if preferred is not None else None
        if home_at is not None:
            # Most requests continue a session whose account is fine: no need to score the others.
            home = kept[home_at]
            if room_term(home, prefix, now) < NO_ROOM:
                rest = (
                    self._rotated(kept, {home_at})
                    if sampling
                    else self._strategy.order([state for state in kept if state is not home])
                )
                second = self.affinity.fallback(session_id)
                at = index.positions.get(second) if second is not None else None
                if at is not None and at != home_at:
                    # Where its last failover went, first again (it wrote the cache there); also when a large
                    # pool's sampled tail left it out.
                    fallback = kept[at]
                    rest = [fallback, *(state for state in rest if state is not fallback)]
                trace.scoring_us = _us_since(began)
                return [home, *self._paid_first(rest, now_wall)], True
        levels = (
            self._pool.warm_index.levels(prefix)
            if prefix is not None and prefix.breakpoints and self._weights.cache
            else []
        )
        unscored: list[UpstreamState] = []
        scored: Sequence[UpstreamState] = kept
        drawn: UpstreamState | None = None
        if sampling:
            scored, unscored, drawn = self._sample(kept, index, sample, levels, home_at, now_wall, now)
            trace.sampled = True
        hits = [hit(levels, state.upstream.id, now) for state in scored] if levels else [None] * len(scored)
        sessions = (
            self.affinity.live_sessions(now)
            if session_id is not None and preferred is None and self._stickiness
            else None
        )
        scores = score_candidates(
            scored,
            prefix,
            now,
            self._weights,
            sessions if self._spreads else None,
            now_wall,
            self._quota_threshold,
            billing=self._billing,
            model=model,
            hits=hits,
            paid_possible=self._paid_possible(),
        )
        best = scores[0].total
        for score in scores:  # not `min()`: see `scoring.score_candidates`
            best = score.total if score.total < best else best
        margin = best + self._tie_margin
        tied: list[UpstreamState] = []
        worse: list[tuple[float, UpstreamState]] = []
        for state, score in zip(scored, scores, strict=True):
            if score.total <= margin:
                tied.append(state)
            else:
                worse.append((score.total, state))
        worse.sort(key=_first)  # stable: equal totals keep their order
        order = self._strategy.order(tied, drawn)
        if worse:
            order += [state for _, state in worse]
        order += unscored
        sticky = False
        if home_at is not None:
            home = kept[home_at]
            for position, state in enumerate(order):
                if state is home:
                    if not next(score for score in scores if score.upstream_id == preferred).lacks_headroom:
                        order.insert(0, order.pop(position))
                        sticky = True
                    break
        if sessions is not None and order:
            # Count the new session where it goes now, not when it is answered: the first turns of many
            # sessions arrive together, and each must see the others to spread.
            self.affinity.bind(session_id, order[0].upstream.id, now)
        trace.scores = scores
        trace.scoring_us = _us_since(began)
        return order, sticky

    def _sample(
        self,
        kept: Sequence[UpstreamState],
        index: _Kept,
        size: int,
        levels: list[WarmLevel],
        home_at: int | None,
        now_wall: float,
        now: float,
    ) -> tuple[list[UpstreamState], list[UpstreamState], UpstreamState]:
        """The candidates worth scoring for this request — the accounts warmest for its prompt, the
        session's own, paid-for capacity, and the one the terminal strategy draws from the whole pool by
        weight — topped up to `size` with a uniform random sample of the rest; the others, in a random
        rotation, as the failover tail; and the drawn one.

        The drawn account goes first when it scores among the best, so with even scores the pool's traffic
        follows the weights exactly, whatever its size; the uniform others win only by scoring better ("power
        of k choices": each is compared against random others). Weights must be applied once: a sample drawn
        by weight whose ties were then broken by weight gave weight-1 accounts half their share, and either
        alone is not proportional (a uniform sample hides a heavy account in a pool of light ones; a
        weighted sample caps an account's share at 1/`size`)."""
        positions = index.positions
        chosen: set[int] = set() if home_at is None else {home_at}
        for level in levels:  # longest first
            if len(chosen) >= size:
                break
            # A prefix more accounts hold than we score (Claude Code's shared tools and system prompt) tells
            # nothing about where this request belongs; picking its first holders would herd traffic.
            if len(level.holders) <= size:
                for upstream_id, entry in level.holders.items():
                    if entry.expires_at > now and (at := positions.get(upstream_id)) is not None:
                        chosen.add(at)
        if self._paid_possible():
            chosen.update(at for at, state in enumerate(kept) if is_paid_for(state, self._billing, now_wall))
        drawn = self._strategy.draw(index.cum_weights)
        chosen.add(drawn)
        self._top_up(len(kept), chosen, size)
        return [kept[at] for at in sorted(chosen)], self._rotated(kept, chosen), kept[drawn]

    def _top_up(self, count: int, chosen: set[int], size: int) -> None:
        """Add positions below `count`, drawn uniformly, to `chosen` until it holds `size`."""
        draw, add = self._rng.random, chosen.add
        # Bounded: `chosen` may hold most of the pool already.
        for _ in range(4 * size):
            if len(chosen) >= size:
                return
            add(int(draw() * count))
        if len(chosen) < size:
            chosen.update(self._rng.sample([at for at in range(count) if at not in chosen], size - len(chosen)))

    def _paid_first(self, states: list[UpstreamState], now_wall: float) -> list[UpstreamState]:
        """`states` with paid-for capacity ahead of metered keys, each in its own order (the `metered` term's
        preference, for a continuing session's failover order, which is not scored: its subscription account's
        used-up window sent the turn to a metered key before a free subscription account, and the session
        stayed there, billed per token)."""
        if not self._weights.metered or not self._paid_possible():
            return states
        paid: list[UpstreamState] = []
        metered: list[UpstreamState] = []
        for state in states:
            (paid if is_paid_for(state, self._billing, now_wall) else metered).append(state)
        return paid + metered if paid and metered else states

    def _paid_possible(self) -> bool:
        """Paid-for capacity is subscriptions and flat-fee channels: without either, no account needs asking."""
        billing = self._billing
        return OAUTH_KIND in self._pool.kinds or (billing is not None and billing.flat_fee)

    def _rotated(self, kept: Sequence[UpstreamState], skip: set[int]) -> list[UpstreamState]:
        """A failover tail for large pools: up to `max_attempts` of the candidates not in `skip`, from a random
        starting point (cheap, and no account is everyone's second). A request makes at most `max_attempts`
        attempts, so that many cover even a request whose scored candidates all became unusable since."""
        count, size = len(kept), self._config.max_attempts
        tail: list[UpstreamState] = []
        at = int(self._rng.random() * count)
        for _ in range(count):
            if at not in skip:
                tail.append(kept[at])
                if len(tail) >= size:
                    break
            at = at + 1 if at + 1 < count else 0
        return tail

    def _operators_to_fix(self, reasons: Mapping[str, str]) -> dict[str, str]:
        """The accounts left out as unhealthy whose last failure was a rejected credential or a misconfigured
        base_url, by what the refusal calls them: no wait brings them back (and panic mode does not try them)."""
        named = {}
        for upstream_id, reason in reasons.items():
            if reason == "unhealthy" and (state := self._pool.get(upstream_id)) is not None:
                failure = state.health.last_failure
                if failure in _UNHEALTHY_FOR:
                    named[upstream_id] = _UNHEALTHY_FOR[failure]
        return named

    def _refusal(self, model: str, trace: RoutingTrace, now: float, pin: PinConfig | None) -> ApiError:
        reasons: Mapping[str, str] = trace.dropped()
        # Disabled accounts are in no trace: name those that would serve the request, i.e. its model and, when
        # a pin matched, named by the pin (a pin's disabled upstream went unmentioned, every other account
        # `not_pinned`). One that serves the model makes this a wait, not a "no such model" (a 404 that Claude
        # Code does not retry, while an operator has an account disabled).
        disabled = {
            state.upstream.id: "disabled"
            for state in self._pool.states()
            if not state.upstream.enabled
            and serves_model(state.upstream.models, model)
            and (pin is None or state.upstream.id in pin.upstreams)
        }
        if not disabled and reasons and all(reason == "model_not_supported" for reason in reasons.values()):
            return ApiError(404, f"model: {model} is not served by any upstream of this gateway")
        reasons = {**reasons, **disabled, **self._operators_to_fix(reasons)}
        if not reasons:
            # No account at all: the pool's 529, as for any request nothing can take now, but not to be retried
            # (Claude Code then shows the message at once, where it retried the 529 and said "The API is at
            # capacity"): only the operator can add one.
            message = f"No upstream accounts are configured or enabled; {awaits_the_operator(reasons)}"
            headers = [*retry_after_fields(self._retry_after), (b"x-should-retry", b"false")]
            return ApiError(529, message, "overloaded_error", headers)
        advice = awaits_the_operator(reasons)
        if advice is not None:
            # A 503 not to be retried, which Claude Code shows at once (it would retry a 500 for ten minutes).
            return ApiError(
                503, f"{refusal_message(reasons, 0)}; {advice}", "api_error", [(b"x-should-retry", b"false")]
            )
        # Accounts that never take this request (not its model's, not its pin's) are not when it may be retried.
        considered = {
            uid: reason
            for uid, reason in reasons.items()
            if reason not in NEVER_THIS_REQUEST and reason not in OPERATORS_ACTS
        }
        states = [state for state in map(self._pool.get, considered) if state is not None]
        wait = next_usable_in(states, now, self._retry_after, "refresh_failing" in considered.values(), model)
        return no_upstream(wait, refusal_message(reasons, wait))

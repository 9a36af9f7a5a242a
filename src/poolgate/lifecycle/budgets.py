"""Budgets in integer µUSD per principal, per account or per Claude Code session, over a UTC calendar range.

A request is admitted only if `spent + reserved + estimate ≤ budget`; its estimate is then reserved, and
settling replaces the reservation by the actual cost. A request refused only for what requests in flight
reserve (`spent + estimate` fits) is told to retry shortly (429); one the spend itself refuses, to wait for
the reset (402). Admission runs without awaiting anything, so on one event loop check-and-reserve is atomic:
concurrent requests each see the others' reservations. Hence:

    overspend ≤ Σ over requests in flight of max(0, actual − estimate)

— zero when estimates are upper bounds (max_tokens at the output price), and at most the cost of what
was in flight when the caller has no estimate (an unpriced model reserves nothing but is still refused
once the budget is used up). Each gateway process keeps its own reservations; several instances share
only what the store seeds at startup.

Spend is kept per (principal, session, UTC day) — the grain `load_spend` seeds from the ledger — and every
(principal, scope) has a bucket caching the sum over its current range, rebuilt from those days when the
range rolls over or the claims change. Ranges: daily (00:00 UTC), weekly (Monday 00:00 UTC), monthly
(the 1st, 00:00 UTC), total (never resets).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Final

from poolgate.api.errors import ApiError, retry_after_fields
from poolgate.api.tools import (
    ADVISOR_OUTPUT_UNSET,
    NOTHING_OFFERED,
    UNBOUNDED_ADVISOR_USES,
    UNBOUNDED_WEB_SEARCHES,
    Offered,
)
from poolgate.billing.book import PRICING_FAILED
from poolgate.billing.values import Priced
from poolgate.lifecycle.claims import BudgetRange, BudgetScope, CallerClaims, format_usd
from poolgate.lifecycle.context import Principal
from poolgate.lifecycle.quotas import Headers, humanize, rfc3339

DAY: Final = 86400
# Per-session spend older than this is dropped (a session idle this long starts afresh); per-principal spend
# is kept forever, days older than this folded into one entry at day 0 (only `total` ranges reach back there).
SESSION_RETENTION_DAYS: Final = 40
# Sessions whose spend is kept in memory at once (~450 bytes each): a client with a budget that sends a new
# session id with every request grew the history by one a request for 40 days (5 a second: ~7 GB). Past it,
# the tenth of them charged least recently go (a session id is the client's to choose: one starting afresh
# is no more than a new id would give); the ledger keeps them all.
MAX_SESSIONS_KEPT = 100_000
# Buckets (a budget's running sum for one principal, or one of its sessions) kept at once, ~0.5 KB each: a
# caller with a per-session budget sending a new session id with every request added one a request until
# the daily sweep (5 a second: ~200 MB by then; one a millisecond: ~40 GB). Past it, the tenth of the idle
# ones used least recently go; a bucket is a cache of the spend history, rebuilt from it when its session
# comes back, so dropping one forgets nothing the history holds. Those with requests in flight always stay.
MAX_BUCKETS_KEPT = MAX_SESSIONS_KEPT
NO_SESSION: Final = ""
# The wait a refusal for want of what requests in flight reserve asks for. When they end is unknown here
# (seconds for a short answer, minutes for a long stream), and a retry refused again costs nothing upstream:
# short enough to be admitted soon after they end, long enough that Claude Code's ten retries (each honouring
# `retry-after`) wait out a request of ~50 s rather than spending themselves within seconds.
HELD_RETRY_AFTER_SECONDS: Final = 5
# (principal id, session id) for per-session budgets, (principal id, None) for per-account ones.
BucketKey = tuple[str, str | None]


def day_of(epoch: float) -> int:
    return int(epoch // DAY) * DAY


def range_bounds(budget_range: BudgetRange, now: float) -> tuple[int, float]:
    """[start, end) of the UTC calendar range holding `now`; `total` ends never."""
    if budget_range == "daily":
        start = day_of(now)
        return start, start + DAY
    if budget_range == "weekly":
        days = int(now // DAY)
        # 1970-01-01 was a Thursday: (days + 3) % 7 is 0 on Mondays.
        start = (days - (days + 3) % 7) * DAY
        return start, start + 7 * DAY
    if budget_range == "monthly":
        moment = datetime.fromtimestamp(now, UTC)
        first = datetime(moment.year, moment.month, 1, tzinfo=UTC)
        following = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
        return int(first.timestamp()), int(following.timestamp())
    return 0, math.inf


def fits(limit: int, spent: int, reserved: int, amount: int) -> bool:
    """Whether a request reserving `amount` µUSD is admitted: some of the budget left, and enough of it (a
    request reserving nothing is admitted until the budget is used up)."""
    remaining = limit - spent - reserved
    return remaining > 0 and amount <= remaining


def _usd(micro: int) -> str:
    """µUSD as a header value in dollars, e.g. "4.871234" (no sign: amounts here are never negative)."""
    # `//`, `%`, an f-string and `str` methods: compiled (mypyc), each is C, where `divmod` and a bytes `%` are
    # the interpreter's generic calls (~3,400 instructions a request for the budget's two amounts).
    whole, frac = micro // 1_000_000, micro % 1_000_000
    if not frac:
        return f"{whole}.00"
    digits = str(1_000_000 + frac)[1:].rstrip("0")  # its six digits, trailing zeros dropped
    return f"{whole}.{digits}{'0' if len(digits) < 2 else ''}"


@dataclass(frozen=True, slots=True)
class SpendRow:
    """Spend from the ledger: one principal's cost in one session (None = none) on one UTC day.

    `day` may be any epoch second within the day; rows for the same key are added up."""

    principal_id: str
    session_id: str | None
    day: float
    cost_micro_usd: int


class _Bucket:
    """The running sum of one (principal, scope)'s spend in its current range."""

    __slots__ = (
        "claims",
        "end",
        "in_flight",
        "key",
        "last_used",
        "limit_for",
        "limit_line",
        "reserved",
        "reset_line",
        "spent",
        "start",
    )

    def __init__(self, claims: CallerClaims, key: BucketKey, start: int, end: float, spent: int, now: float) -> None:
        # The claims last found to have its range and scope: while its principal keeps them, they still do.
        self.claims = claims
        self.key = key
        self.start = start
        self.end = end
        self.spent = spent
        self.reserved = 0
        self.in_flight = 0
        self.last_used = now
        # Head lines (`api.http.HEAD_LINES`), as text, formatted once per bucket rather than per request.
        self.reset_line = f"x-poolgate-budget-reset: {rfc3339(end)}\r\n" if end != math.inf else ""
        self.limit_line = ""
        self.limit_for = -1


class BudgetTicket:
    """What one admitted request holds of a budget until it is settled. `holders`: the buckets counting its
    reservation, first the one it was admitted against (and is charged to); more when the principal's budget
    claims changed while it ran (see `Budgets._bucket`)."""

    __slots__ = ("day", "holders", "open", "principal_id", "reserved", "session")

    def __init__(self, bucket: _Bucket, day: int, session: str, reserved: int) -> None:
        self.holders = [bucket]
        self.principal_id = bucket.key[0]
        self.day = day
        self.session = session
        self.reserved = reserved
        self.open = True

    @property
    def bucket(self) -> _Bucket:
        return self.holders[0]


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    limit_micro_usd: int
    spent_micro_usd: int
    reserved_micro_usd: int
    in_flight: int
    resets_at: float  # math.inf for `total`


class Budgets:
    def __init__(self) -> None:
        self._buckets: dict[BucketKey, _Bucket] = {}
        self._by_principal: dict[str, dict[int, int]] = {}
        self._by_session: dict[tuple[str, str], dict[int, int]] = {}
        # Each principal's unsettled tickets: a bucket built while they run counts their reservations too.
        self._open: dict[str, set[BudgetTicket]] = {}
        # The budget range and scope each principal's buckets were built for.
        self._shapes: dict[str, tuple[BudgetRange, BudgetScope]] = {}
        self._next_sweep = 0
        # The latest run of charges to one (principal, session or None, day), whose sum is not in the history yet
        # (see `_fold_run`): a session's requests come one after another, and adding each charge to the history
        # took ~5,000 instructions of dict work a request (compiled), adding it to the run a few.
        self._run_principal = ""
        self._run_session: str | None = None
        self._run_day = 0
        self._run_cost = 0

    # ----- the request path --------------------------------------------------------------------------

    @staticmethod
    def _key(principal_id: str, claims: CallerClaims, session_id: str | None) -> BucketKey:
        return principal_id, None if claims.budget_scope == "per_account" else (session_id or NO_SESSION)

    def _bucket(self, principal: Principal, key: BucketKey, now: float) -> _Bucket:
        """The principal's bucket `key` for its claims at `now`: the one kept, else one made from its spend
        history (see `reserve` for the kept one's test, which it makes before calling this)."""
        claims = principal.claims
        scope = key[1]
        shape = self._shapes.get(principal.id)
        if shape is None or shape[0] != claims.budget_range or shape[1] != claims.budget_scope:
            self._reshape(principal.id, claims.budget_range, claims.budget_scope, forget=shape is not None)
        bucket = self._buckets.get(key)
        if bucket is None or not bucket.start <= now < bucket.end:
            start, end = range_bounds(claims.budget_range, now)
            self._fold_run()
            if scope is None:
                days = self._by_principal.get(principal.id)
            else:
                days = self._by_session.get((principal.id, scope))
            spent = sum(cost for day, cost in days.items() if start <= day < end) if days else 0
            if len(self._buckets) >= MAX_BUCKETS_KEPT:
                self._trim_buckets()
            bucket = self._buckets[key] = _Bucket(claims, key, start, end, spent, now)
            # Requests still running against the bucket this one replaces (the budget's range or scope was
            # changed meanwhile) will be charged here: hold their reservations too, or requests admitted now
            # would not see them and could overspend by everything in flight. (At a range's rollover the
            # running ones are charged to the range they started in, so they are not held.)
            for ticket in self._open.get(principal.id, ()):
                if start <= ticket.day < end and (scope is None or ticket.session == scope):
                    bucket.reserved += ticket.reserved
                    bucket.in_flight += 1
                    # Only the buckets still in use hold it besides its own (claims flipping back and forth
                    # while it runs would otherwise grow the list with each flip).
                    live = [held for held in ticket.holders[1:] if self._buckets.get(held.key) is held]
                    ticket.holders[1:] = [*live, bucket]
        bucket.claims = claims  # of the shape the principal's buckets have now (other claims may have built it)
        return bucket

    def _reshape(self, principal_id: str, budget_range: BudgetRange, scope: BudgetScope, forget: bool) -> None:
        """The principal's budget range or scope changed (`forget`) or is seen for the first time: its
        buckets are rebuilt on demand, from its spend history and its requests still running. (A bucket of
        the scope left behind would miss the reservations made meanwhile, were the scope switched back.)"""
        self._shapes[principal_id] = (budget_range, scope)
        if forget:
            for key in [key for key in self._buckets if key[0] == principal_id]:
                del self._buckets[key]

    def reserve(
        self,
        principal: Principal,
        session_id: str | None,
        estimate: int | None,
        now: float,
        tools: Offered = NOTHING_OFFERED,
    ) -> BudgetTicket:
        """Reserve `estimate` µUSD of the principal's budget, or raise the refusal saying why: a 402 when the
        budget is spent (or too small for the request), a 429 when only requests in flight hold it.
        `tools` (what the estimate holds for them) says what makes a request too large for the budget."""
        if now >= self._next_sweep:
            self._sweep(now)
        # Each attribute read once: of objects not compiled, a generic lookup (see `policy.Policy.admit`).
        claims, principal_id = principal.claims, principal.id
        limit = claims.budget_micro_usd
        assert limit is not None
        key = self._key(principal_id, claims, session_id)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.claims is not claims or not bucket.start <= now < bucket.end:
            # Not built for these very claims, or not kept since (the principal's budget changed shape: that drops
            # its buckets, see `_reshape`), or its range ended.
            bucket = self._bucket(principal, key, now)
        # Comparisons, not `max()` (see `accounting.billable`), here and in `settle`: once per request each.
        amount = estimate if estimate is not None and estimate > 0 else 0
        if not fits(limit, bucket.spent, bucket.reserved, amount):
            raise self._refusal(principal, session_id, bucket, limit, estimate, now, tools)
        bucket.reserved += amount
        bucket.in_flight += 1
        bucket.last_used = now
        ticket = BudgetTicket(bucket, day_of(now), session_id or NO_SESSION, amount)
        tickets = self._open.get(principal_id)
        if tickets is None:
            tickets = self._open[principal_id] = set()
        tickets.add(ticket)
        return ticket

    def settle(self, ticket: BudgetTicket, actual: int | None) -> None:
        """Replace the reservation by the actual cost (None: nothing, as for a failed request or a cost in
        another currency; an unknown cost is charged its reservation, see `budget_charge`). Once per
        ticket."""
        if not ticket.open:
            return
        ticket.open = False
        self._open[ticket.principal_id].discard(ticket)
        for holder in ticket.holders:
            holder.reserved -= ticket.reserved
            holder.in_flight -= 1
        bucket = ticket.holders[0]
        cost = actual if actual is not None and actual > 0 else 0
        if not cost:
            return
        bucket.spent += cost
        self._spent(ticket.principal_id, ticket.session, ticket.day, cost, bucket, True)

    def spend(self, principal: Principal, session_id: str | None, at: float, cost: int) -> None:
        """Spend of a request that held no budget ticket (its caller had no budget, or only other claims):
        kept all the same, so that a budget set later this range counts it, as after a restart; per session
        only for a caller with a budget (its scope may change to per session while it runs): every session id
        any caller sent was kept for 40 days (~450 bytes each, one a request for a client changing a header).
        A per-session budget given to a caller that had none counts its sessions' spend from then on, and all
        of it after a restart (from the ledger)."""
        if at >= self._next_sweep:  # a gateway whose callers have no budget reserves nothing, so sweeps here
            self._sweep(at)
        if cost > 0:
            budgeted = principal.claims.budget_micro_usd is not None
            self._spent(principal.id, session_id or NO_SESSION, day_of(at), cost, None, budgeted)

    def _spent(
        self, principal_id: str, session: str, day: int, cost: int, charged: _Bucket | None, per_session: bool
    ) -> None:
        # Buckets other than the one charged already (the other scope, one rebuilt for changed claims while
        # the request ran, one of a budget since removed) were summed from history without this cost: they
        # count it too. Buckets built later read it from history. (A principal without a shape has no buckets: a
        # caller without a budget, the most common, looks no further.)
        if principal_id in self._shapes:
            _count_in(self._buckets.get((principal_id, None)), charged, day, cost)
            _count_in(self._buckets.get((principal_id, session)), charged, day, cost)
        kept_as = session if per_session else None
        if principal_id == self._run_principal and kept_as == self._run_session and day == self._run_day:
            self._run_cost += cost
        else:
            self._fold_run()
            self._run_principal, self._run_session, self._run_day, self._run_cost = principal_id, kept_as, day, cost

    def _fold_run(self) -> None:
        """Add the run of charges to the history: before anything reads the history, and when another
        (principal, session, day) is charged."""
        if self._run_cost:
            cost, self._run_cost = self._run_cost, 0
            self._record(self._run_principal, self._run_session, self._run_day, cost)
            if len(self._by_session) > MAX_SESSIONS_KEPT:
                self._trim_sessions()

    def lines(self, limit: int, ticket: BudgetTicket) -> bytes:
        """`x-poolgate-budget-{limit-usd,spent-usd,reset}` (no reset for a `total` budget) as head lines, for a
        budget of `limit` µUSD."""
        bucket = ticket.bucket
        if bucket.limit_for != limit:
            bucket.limit_line, bucket.limit_for = f"x-poolgate-budget-limit-usd: {_usd(limit)}\r\n", limit
        return f"{bucket.limit_line}x-poolgate-budget-spent-usd: {_usd(bucket.spent)}\r\n{bucket.reset_line}".encode()

    def _refusal(
        self,
        principal: Principal,
        session_id: str | None,
        bucket: _Bucket,
        limit: int,
        estimate: int | None,
        now: float,
        tools: Offered,
    ) -> ApiError:
        claims = principal.claims
        scope = "per-account" if claims.budget_scope == "per_account" else "per-session"
        which = f"the {claims.budget_range} {scope} budget of {format_usd(limit)} for {principal.name!r}"
        if claims.budget_scope == "per_session":
            if session_id:  # a Claude Code session id, a UUID, shortened like a commit's
                which += f" (session {session_id if len(session_id) <= 12 else session_id[:8] + '…'})"
            else:
                which += " (requests without a session id)"
        state: Headers = [
            (b"x-poolgate-budget-limit-usd", _usd(limit).encode()),
            (b"x-poolgate-budget-spent-usd", _usd(bucket.spent).encode()),
        ]
        if bucket.end != math.inf:  # as on every admitted answer (a retry-after only where waiting helps)
            state.append((b"x-poolgate-budget-reset", rfc3339(bucket.end).encode()))
        if estimate is not None and 0 < limit < estimate:
            # Nothing spent or reset helps: only a smaller request, or a larger budget.
            message = (
                f"Request too large for {which}: it may cost up to {format_usd(estimate)} "
                f"({too_large_because(tools)}), more than the whole budget. Send a smaller "
                f"{smaller_what(tools)}, or ask for a larger budget."
            )
            return ApiError(402, message, "billing_error", [(b"x-should-retry", b"false"), *state])
        if bucket.reserved and fits(limit, bucket.spent, 0, max(0, estimate or 0)):
            # Only what requests in flight reserve is in the way, and they end soon: a rate limit, which
            # clients retry (a 402 ended a Claude Code turn with "resets in 10 h" though nothing was spent).
            requests = f"{bucket.in_flight} request{'s' if bucket.in_flight != 1 else ''}"
            message = (
                f"Budget held by requests in flight: {which} is held by {requests} in flight "
                f"({format_usd(bucket.reserved)} reserved), with {format_usd(bucket.spent)} spent"
            )
            if estimate:
                message += f"; this request may cost up to {format_usd(estimate)}"
            message += ". Retry shortly: it may fit once they end."
            retry = [*retry_after_fields(HELD_RETRY_AFTER_SECONDS), (b"x-should-retry", b"true")]
            return ApiError(429, message, "rate_limit_error", [*retry, *state])
        headers: Headers = [(b"x-should-retry", b"false"), *state]
        message = f"Budget exhausted: {which} has {format_usd(bucket.spent)} spent"
        if bucket.reserved:
            message += f" and {format_usd(bucket.reserved)} reserved by requests in flight"
        if estimate and bucket.spent + bucket.reserved < limit:
            message += f"; this request may cost up to {format_usd(estimate)}"
        if bucket.end == math.inf:
            message += ". It does not reset: ask for a larger budget."
        else:
            message += f". It resets at {rfc3339(bucket.end)} (in {humanize(bucket.end - now)})."
            headers += retry_after_fields(bucket.end - now)
        return ApiError(402, message, "billing_error", headers)

    # ----- spend history -----------------------------------------------------------------------------

    def _record(self, principal_id: str, session: str | None, day: int, cost: int) -> None:
        """Spend history: per principal, and per session unless `session` is None."""
        days = self._by_principal.get(principal_id)
        if days is None:
            days = self._by_principal[principal_id] = {}
        days[day] = days.get(day, 0) + cost
        if session is None:
            return
        # Taken out and put back: the sessions stay in the order they were last charged in, which orders those
        # of one day for `_trim_sessions`. (`get` and `del`, not `pop`: compiled, a method call is generic.)
        by_session, key = self._by_session, (principal_id, session)
        session_days = by_session.get(key)
        if session_days is None:
            session_days = {}
        else:
            del by_session[key]
        by_session[key] = session_days
        session_days[day] = session_days.get(day, 0) + cost

    def load_spend(self, rows: Iterable[SpendRow], now: float) -> None:
        """Seed spend from the ledger (at startup, before serving). Replaces what was known; rows before the
        retention window count only towards per-account totals."""
        self._buckets.clear()
        self._by_principal.clear()
        self._by_session.clear()
        self._run_cost = 0
        for row in rows:
            if row.cost_micro_usd:
                # A row of day 0 without a session is spend older than the sessions kept (see `spend_rows`).
                day = day_of(row.day)
                session = row.session_id if row.session_id is not None or not day else NO_SESSION
                self._record(row.principal_id, session, day, row.cost_micro_usd)
        self._sweep(now)

    def _trim_sessions(self) -> None:
        """Keep the sessions charged most recently, nine tenths of `MAX_SESSIONS_KEPT` (a trim per tenth of
        new sessions, not one per request). Spend is kept by day: of the sessions last charged the same day,
        those charged earlier go first (the dict's order, see `_record`; ordering the ones kept instead kept
        the earliest, and dropped the session just charged)."""
        by_session = self._by_session
        drop = len(by_session) - MAX_SESSIONS_KEPT * 9 // 10
        for key, _ in heapq.nsmallest(drop, by_session.items(), key=_last_day):
            del by_session[key]

    def _trim_buckets(self) -> None:
        """Keep nine tenths of `MAX_BUCKETS_KEPT`: those with requests in flight (their reservations live
        nowhere else), then the idle ones used most recently (a trim per tenth of new buckets, not one per
        request)."""
        buckets = self._buckets
        idle = ((key, bucket.last_used) for key, bucket in buckets.items() if not bucket.in_flight)
        # The ones to drop picked, not the ones to keep: nine times fewer to order (~25 ms, not ~300, at 100,000).
        for key, _ in heapq.nsmallest(len(buckets) - MAX_BUCKETS_KEPT * 9 // 10, idle, key=itemgetter(1)):
            del buckets[key]

    def _sweep(self, now: float) -> None:
        """Once a UTC day: fold old days, drop idle sessions and idle buckets (they rebuild from history)."""
        self._fold_run()
        today = day_of(now)
        self._next_sweep = today + DAY
        cutoff = today - SESSION_RETENTION_DAYS * DAY
        for days in self._by_principal.values():
            old = [day for day in days if 0 < day < cutoff]
            if old:
                days[0] = days.get(0, 0) + sum(days.pop(day) for day in old)
        self._by_session = {key: days for key, days in self._by_session.items() if max(days) >= cutoff}
        if len(self._by_session) > MAX_SESSIONS_KEPT:  # seeded from a ledger of more
            self._trim_sessions()
        self._buckets = {
            key: bucket for key, bucket in self._buckets.items() if bucket.in_flight or bucket.last_used >= now - DAY
        }
        self._open = {principal_id: tickets for principal_id, tickets in self._open.items() if tickets}
        live = {principal_id for principal_id, _ in self._buckets} | self._open.keys()
        self._shapes = {principal_id: shape for principal_id, shape in self._shapes.items() if principal_id in live}

    def kept_sessions(self) -> list[tuple[str, str]]:
        """The (principal id, session id) pairs whose spend is kept, least recently charged first (for reports
        and tests)."""
        self._fold_run()
        return list(self._by_session)

    def status(self, principal: Principal, session_id: str | None, now: float) -> BudgetStatus | None:
        """Where the principal's budget stands (for reports and tests); None when it has no budget."""
        limit = principal.claims.budget_micro_usd
        if limit is None:
            return None
        bucket = self._bucket(principal, self._key(principal.id, principal.claims, session_id), now)
        return BudgetStatus(limit, bucket.spent, bucket.reserved, bucket.in_flight, bucket.end)


def _count_in(bucket: _Bucket | None, charged: _Bucket | None, day: int, cost: int) -> None:
    """Count spent `cost` in `bucket` too, if it is not the one `charged` already and its range holds `day`."""
    if bucket is not None and bucket is not charged and bucket.start <= day < bucket.end:
        bucket.spent += cost


def too_large_because(tools: Offered) -> str:
    """What a request's estimate holds, for a refusal saying it exceeds the whole budget: the web searches it
    may run count too (Claude Code's WebSearch offers 8, $0.08: more than its prompt and max_tokens), and so do
    its advisors' consultations (each an Opus inference reading the whole conversation); a refusal naming only
    the prompt sent the caller to shrink what did not matter."""
    held = ["its prompt and max_tokens at its model's price on the accounts that may serve it"]
    searches = tools.web_searches
    if searches:
        held.append(
            f"up to {searches} web search{'es' if searches != 1 else ''} (its web search tools' max_uses,"
            f" {UNBOUNDED_WEB_SEARCHES} for one without)"
        )
    for advisor in tools.advisors:
        uses = advisor.uses
        held.append(
            f"up to {uses} consultation{'s' if uses != 1 else ''} of the advisor {advisor.model} of"
            f" {advisor.max_tokens} tokens each, each reading the whole conversation (the advisor tool's max_uses,"
            f" {UNBOUNDED_ADVISOR_USES} without, and its max_tokens, {ADVISOR_OUTPUT_UNSET} without)"
        )
    return ", and ".join(held) if len(held) < 3 else f"{', '.join(held[:-1])}, and {held[-1]}"


def smaller_what(tools: Offered) -> str:
    """What the caller may make smaller, for the refusal of a request too large for its budget."""
    parts = ["prompt", "max_tokens"]
    if tools.web_searches:
        parts.append("web search max_uses")
    if tools.advisors:
        parts += ["advisor max_uses", "advisor max_tokens"]
    return f"{', '.join(parts[:-1])} or {parts[-1]}"


def _last_day(session: tuple[tuple[str, str], dict[int, int]]) -> int:
    return max(session[1])


def budget_charge(priced: Priced, reserved: int | None) -> tuple[int | None, int | None]:
    """What a request priced `priced` that reserved `reserved` µUSD (None: it has no budget) costs its
    budget, and that charge again where it is not the cost (the ledger's `charged_micro_usd`). Budgets are
    in µUSD: a cost in another currency (a channel priced in credits) is not theirs. An unknown cost in USD
    (a channel priced by characters, an answer without usage) or a pricing fault costs the reservation (an
    upper bound): charged as 0, a caller with a budget used such a channel without limit."""
    if reserved is not None and priced.micro is None and (priced.currency == "USD" or priced.version == PRICING_FAILED):
        return reserved, reserved
    return (priced.micro if priced.currency == "USD" else None), None

"""What the router decided and why, stage by stage: the explanation behind every choice."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec
import orjson

PerCandidateReason = Literal[
    "unhealthy",
    "rate_limited",
    # A failing account (5xx, 529) that said when to come back (`retry-after`) is left alone until then.
    "parked",
    "insufficient_quota",
    "rejected_by_plugin",
    "model_not_supported",
    "needs_reauth",
    # A subscription account whose token has expired while the token endpoint keeps failing (retrying).
    "refresh_failing",
    "not_pinned",
    # A flat-fee upstream with `on_exhausted: block` is used up and no flat-fee capacity is left: metered
    # upstreams may not take its traffic (the request gets a 503).
    "blocked_by_billing",
    # It answered 403 for the request's model (no permission to use it): out of that model's requests a while.
    "model_denied",
]


class ScoredCandidate(Protocol):
    """A candidate's score (routing/scoring.py `CandidateScore`): written to JSON as it is."""

    @property
    def upstream_id(self) -> str: ...


MAX_STAGES = 100
MAX_NAME = 256
# A trace is stored with every request's usage record: with 1,000 accounts, listing every kept id at every
# stage made it ~46 KB. Dropped ids (with their reasons) are always listed in full.
MAX_KEPT_IDS = 64
_ENCODER = msgspec.json.Encoder()


def listed(ids: tuple[str, ...]) -> tuple[tuple[str, ...], int | None]:
    """The ids a stage entry lists for a stage that kept `ids`, and how many it kept when that is not all
    of them (see `StageDecision.kept_count`)."""
    return (ids[:MAX_KEPT_IDS], len(ids)) if len(ids) > MAX_KEPT_IDS else (ids, None)


# The trace's parts are Structs shaped like their JSON (field names included): msgspec writes them
# natively, and a trace is written for every request (its usage record).
class StageDecision(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """Frozen: an entry for a stage that did not run is the same in every trace, and traces share it."""

    name: str
    # The ids the stage kept; in a pool larger than MAX_KEPT_IDS only the first of them (see `kept_count`).
    kept: tuple[str, ...]
    # Upstream id → why the stage dropped it.
    dropped: dict[str, PerCandidateReason]
    # How long the stage took, in µs (to a tenth).
    us: float
    # How many the stage kept, when `kept` lists only the first MAX_KEPT_IDS (None: `kept` is all of them).
    kept_count: int | None = None


class TerminalDecision(msgspec.Struct, gc=False):
    strategy: str
    chosen: str | None
    order: tuple[str, ...]
    # The session's account was put first (it holds the conversation's prompt cache).
    sticky: bool = False


# The error type of a failed attempt that got no answer (not reached, or its connection broke before the
# answer; one out of time is Anthropic's `timeout_error`): the client is told the pool's 529 then, whose
# `overloaded_error` would pass for the account's own overload.
CONNECTION_ERROR = "connection_error"


class FailedAttempt(msgspec.Struct, frozen=True, gc=False):
    """An account the relay tried before the one that answered (or each one, when none did): the status
    the client would have been told had it been the last, and the account's error type (`CONNECTION_ERROR`
    or `timeout_error` when it gave no answer)."""

    upstream_id: str
    status: int
    error_type: str
    message: str


class RoutingTrace(msgspec.Struct):
    """A Struct written to JSON as it is (every request's usage record holds one)."""

    stages: list[StageDecision]
    terminal: TerminalDecision | None = None
    # Filled by the relay as it fails over, in the order it tried the accounts.
    failed: list[FailedAttempt] | None = None
    # The retry budget stopped the failover (see lifecycle/retry_budget.py): accounts were left untried.
    retry_budget_denied: bool = False
    # Per scored candidate, in the order they were scored: its score and terms (see routing/scoring.py),
    # when there was a choice to make.
    scores: Sequence[ScoredCandidate] | None = None
    # µs, to a tenth.
    scoring_us: float = 0.0
    # A large pool: only the accounts that mattered plus a random sample were scored (`score_sample`).
    sampled: bool = False

    def add(self, stage: StageDecision) -> None:
        if len(self.stages) < MAX_STAGES:
            if len(stage.name) > MAX_NAME or len(stage.kept) > MAX_KEPT_IDS:
                kept, count = listed(stage.kept) if len(stage.kept) > MAX_KEPT_IDS else (stage.kept, stage.kept_count)
                stage = msgspec.structs.replace(stage, name=stage.name[:MAX_NAME], kept=kept, kept_count=count)
            self.stages.append(stage)

    def dropped(self) -> dict[str, PerCandidateReason]:
        """The last reason each upstream was dropped for."""
        return {upstream: reason for stage in self.stages for upstream, reason in stage.dropped.items()}

    def to_json(self) -> bytes:
        """The trace as JSON, for the usage record, a response header and `poolgate route explain`."""
        return _ENCODER.encode(self)

    def as_dict(self) -> dict[str, object]:
        """The trace as plain data (what `to_json` writes)."""
        data: dict[str, object] = orjson.loads(self.to_json())
        return data


class TraceRing:
    """The latest routing traces by request id, bounded: the newest `size` requests are explainable from
    memory at once, before (and without) the usage store. Held as their JSON (written anyway for the usage
    record): one object per request rather than a trace's dozen or more, so a request's trace is freed when
    the request is, and its memory reused while still in the CPU's caches (under load, holding the last
    1,000 traces as objects cost ~6 % of a quick answer's CPU)."""

    def __init__(self, size: int) -> None:
        self._size = max(0, size)
        self._traces: dict[str, bytes] = {}
        # The request ids in the order they came, in a ring: the slot to fill next holds the oldest (evicting
        # it is two list and dict operations; `OrderedDict.popitem` cost several times as much per request).
        self._ids: list[str | None] = [None] * self._size
        self._next = 0

    def add(self, request_id: str, trace_json: bytes) -> None:
        if not self._size:
            return
        slot = self._next
        oldest = self._ids[slot]
        if oldest is not None:
            self._traces.pop(oldest, None)
        self._ids[slot] = request_id
        self._traces[request_id] = trace_json
        self._next = slot + 1 if slot + 1 < self._size else 0

    def get(self, request_id: str) -> dict[str, object] | None:
        """The trace as plain data (what `RoutingTrace.as_dict` gives), None once it left the ring."""
        trace_json = self._traces.get(request_id)
        return None if trace_json is None else orjson.loads(trace_json)

    def last(self, count: int) -> list[tuple[str, dict[str, object]]]:
        """The latest `count` requests' traces, the latest first by arrival (request ids are in the order requests
        came), as `poolgate route last` lists them from the store: the ring holds them in the order they finished,
        and a stream that came first and finished last was listed first here, last there."""
        if count <= 0:
            return []
        latest = heapq.nlargest(count, self._traces)
        return [(request_id, orjson.loads(self._traces[request_id])) for request_id in latest]

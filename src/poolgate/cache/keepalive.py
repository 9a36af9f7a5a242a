"""Cache keepalive: keep a paused session's prompt cache warm through a long pause (opt-in).

A Claude Code session that waits on a long tool run lets its 5-minute cache entry expire, and its next
turn re-writes the whole conversation at 1.25× the input price. Shortly before the entry expires, a
keepalive re-sends the session's last request with `max_tokens: 1`: the upstream reads the prefix (0.1×)
and refreshes its TTL. It is sent only when the re-write it avoids is worth more than the keepalive's own
cost, at most `max_per_session` times per pause and `max_per_upstream_per_minute` per account, and it
leaves a usage record with endpoint `keepalive`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import orjson

from poolgate.api.http import header
from poolgate.cache.breakpoints import PromptPrefix
from poolgate.cache.score import READ_MULTIPLIER, WRITE_MULTIPLIER
from poolgate.cache.warmth import TTL_SECONDS
from poolgate.config import KeepaliveConfig
from poolgate.lifecycle.context import RawHeaders
from poolgate.upstreams.dialects.anthropic_oauth import BILLING_PREFIX

log = logging.getLogger("poolgate.keepalive")

# A paused session by its caller (principal id) and its id. A session pauses one request per conversation:
# its main thread's, and a subagent's (which carries its parent's session id) while the parent waits on it.
PausedKey = tuple[str, str]
# The conversations of one session kept warm at once; beyond, the one with the least cached goes.
MAX_CONVERSATIONS = 4
# One output token costs about five input tokens on every current Claude model.
OUTPUT_INPUT_RATIO = 5.0


@dataclass(slots=True, eq=False)
class PausedSession:
    """What is needed to re-touch one conversation's cache: its last request, where it went, when it expires."""

    caller: str  # the principal's id (see `PausedKey`)
    session_id: str
    upstream_id: str
    model: str
    body: bytes  # the keepalive body (max_tokens 1, not streamed)
    headers: RawHeaders
    prefix: PromptPrefix
    sent_at: float  # monotonic: when the request was sent
    expires_at: float  # monotonic: when the last breakpoint's entry runs out
    marks: Conversation
    # The bytes it holds: its body and the request's headers (up to a head's 64 KB), which re-sign it.
    size: int
    sent: int = 0
    held: bool = False  # a keepalive of this pause was held back by its account's per-minute limit
    in_flight: bool = False  # its keepalive is out: no other before it is answered

    @property
    def key(self) -> PausedKey:
        return self.caller, self.session_id


def parsed(body: bytes) -> dict[str, Any] | None:
    """The request's JSON object (the gateway decoded it before: None only for what it never sends on)."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return request if isinstance(request, dict) else None


def keepalive_body(request: dict[str, Any]) -> bytes | None:
    """The request to re-send: the same prompt, one output token, no stream. None when that cannot be
    done without changing what is cached (extended thinking with a budget needs max_tokens above it, and
    dropping thinking would invalidate the cached messages)."""
    thinking = request.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        return None
    return orjson.dumps({**request, "max_tokens": 1, "stream": False})


# A conversation's marks: digests of its opening (system prompt and tools) and of its first message.
Conversation = tuple[bytes, bytes]


def _unmarked(blocks: object) -> object:
    """A system prompt, tools or a message's content without its blocks' cache markers, which move from turn
    to turn (Claude Code marks the newest user message)."""
    if not isinstance(blocks, list):
        return blocks
    return [
        {name: value for name, value in block.items() if name != "cache_control"} if isinstance(block, dict) else block
        for block in blocks
    ]


def _digest(value: object) -> bytes:
    return hashlib.blake2b(orjson.dumps(value), digest_size=16).digest()


def conversation_marks(request: dict[str, Any]) -> Conversation:
    """What tells a session's conversations apart (see `CacheKeepalive.served`): `/compact` keeps the opening,
    `/model` the first user message (Claude Code's system prompt names the model); a subagent has a system
    prompt, tools and first message of its own.
    The opening leaves out Claude Code's attribution block (`x-anthropic-billing-header: …`), which changes
    with the conversation's first message (after `/compact` too) and, in newer versions, with every request."""
    system = _unmarked(request.get("system"))
    if isinstance(system, list):
        system = [block for block in system if not _attribution(block)]
    messages = request.get("messages")
    first = next((message for message in messages if _from_user(message)), None) if isinstance(messages, list) else None
    if first is not None:
        first = {**first, "content": _unmarked(first.get("content"))}
    return _digest([system, _unmarked(request.get("tools"))]), _digest(first)


def _attribution(block: object) -> bool:
    return isinstance(block, dict) and isinstance(text := block.get("text"), str) and text.startswith(BILLING_PREFIX)


def _from_user(message: object) -> bool:
    """A user's message (not a `role: "system"` one, which newer betas put before the conversation)."""
    return isinstance(message, dict) and message.get("role") == "user"


def one_shot(headers: RawHeaders) -> bool:
    """A request from a Claude Code run that ends with its process (`claude -p`, the Agent SDKs): its
    user-agent names a non-interactive entrypoint, `claude-cli/2.1.197 (external, sdk-cli)`. Keeping such a
    session warm pays for turns that never come."""
    agent = header(headers, b"user-agent")
    return agent is not None and agent.startswith(b"claude-cli/") and b", sdk-" in agent


def worth_it(prefix: PromptPrefix) -> bool:
    """Does the re-write a keepalive avoids cost more than the keepalive itself (in input tokens)? What an
    hour's marker before the last caches outlives the last's five minutes: the next turn reads it either
    way, so only what follows it would be written again (a 12k-token system prompt marked 1h before a 5m
    conversation made every keepalive cost seven times what it saved)."""
    if not prefix.breakpoints or not prefix.breakpoints[-1].explicit:
        return False
    last = prefix.breakpoints[-1]
    cached = prefix.cacheable_tokens
    lasting = 0
    if last.ttl == "5m":
        lasting = max((point.prefix_token_count for point in prefix.breakpoints if point.ttl == "1h"), default=0)
    saving = (cached - lasting) * (WRITE_MULTIPLIER[last.ttl] - READ_MULTIPLIER)
    cost = cached * READ_MULTIPLIER + (prefix.prompt_tokens - cached) + OUTPUT_INPUT_RATIO
    return saving > cost


class CacheKeepalive:
    """The paused sessions and the decision which of them to re-touch now; the gateway sends them."""

    def __init__(self, config: KeepaliveConfig) -> None:
        self._config = config
        # Each session's paused conversations, the least recently served session first.
        self._sessions: OrderedDict[PausedKey, list[PausedSession]] = OrderedDict()
        self._bytes = 0  # of the sessions' bodies and headers (`PausedSession.size`)
        self._sent_per_upstream: dict[str, deque[float]] = {}
        # One-shot sessions already counted skipped, the least recently served first (as many as sessions kept).
        self._one_shots: OrderedDict[PausedKey, None] = OrderedDict()
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def served(
        self,
        caller: str,
        session_id: str,
        upstream_id: str,
        model: str,
        body: bytes,
        headers: RawHeaders,
        prefix: PromptPrefix,
        sent_at: float,
    ) -> None:
        """A session's real request, sent at `sent_at` (monotonic), was answered: (re)start watching its
        conversation's pause, when this request is worth keeping warm. Its entry expires a TTL after it was
        sent, however long the answer took."""
        key = caller, session_id
        if one_shot(headers):
            self._drop_one_shot(key)
            return
        if not worth_it(prefix):
            # A short request of the session (a subagent's first, small prompt) leaves the conversation's
            # cache as it was: the paused entry is still the one to keep warm.
            return
        request = parsed(body)
        marks = conversation_marks(request) if request is not None else None
        # This turn's prefix replaces its conversation's last one, or ends it when it cannot be kept warm. The
        # session's other conversations stay paused (a parent waiting on this subagent, its siblings running in
        # parallel), unless every one of them turned while this one waited: then this is the parent going on,
        # and they are the subagents it waited on, done.
        paused = self._sessions.get(key, [])
        # The same first user message: the same conversation (`/model` too). The same opening: the same
        # conversation only for the session's oldest, its main thread (`/compact`); subagents of one kind
        # share theirs, and run in parallel.
        main = min(paused, key=_sent_at, default=None)
        continued = [
            session
            for session in paused
            if marks is None or session.marks[1] == marks[1] or (session is main and session.marks[0] == marks[0])
        ]
        others = [session for session in paused if session not in continued]
        waited_since = min((session.sent_at for session in continued), default=math.inf)
        done = others if all(session.sent_at > waited_since for session in others) else []
        for session in continued + done:
            self._forget(session)
        if request is None or marks is None:
            self._skip("unreadable_body")
            return
        payload = keepalive_body(request)
        if payload is None:
            self._skip("thinking_budget")
            return
        size = len(payload) + sum(len(name) + len(value) for name, value in headers)
        if size > self._config.max_bytes:  # it would push out every other session, then itself
            self._skip("too_large")
            return
        expires_at = sent_at + TTL_SECONDS[prefix.breakpoints[-1].ttl]
        conversations = self._sessions.setdefault(key, [])
        self._sessions.move_to_end(key)
        conversations.append(
            PausedSession(
                caller, session_id, upstream_id, model, payload, headers, prefix, sent_at, expires_at, marks, size
            )
        )
        self._bytes += size
        if len(conversations) > MAX_CONVERSATIONS:
            self._forget(min(conversations, key=_cached_tokens))
        while len(self._sessions) > self._config.max_sessions or self._bytes > self._config.max_bytes:
            _, evicted = self._sessions.popitem(last=False)
            self._bytes -= sum(session.size for session in evicted)

    def read_by_turn(self, key: PausedKey, upstream_id: str, prefix: PromptPrefix, sent_at: float) -> None:
        """A turn of the session, sent at `sent_at`, was taken on by `upstream_id`: when that is where the
        session's paused prompt is cached and the turn's prompt starts with it, the upstream read the entry as
        the turn arrived, which refreshed its TTL (the turn is no pause: a keepalive meanwhile is paid for
        nothing). A side request (a subagent's, another model's) reads another prefix and changes nothing."""
        for session in self._sessions.get(key, ()):
            if session.upstream_id != upstream_id:
                continue
            last = session.prefix.breakpoints[-1]
            if any(prefix_hash == last.prefix_hash for prefix_hash, _ in prefix.lookups):
                session.expires_at = max(session.expires_at, sent_at + TTL_SECONDS[last.ttl])

    def current(self, session: PausedSession) -> bool:
        """Is this still its conversation's latest turn? (A newer one may have been served while keepalives
        were being sent: what is decided about the older one must not touch it.)"""
        return any(paused is session for paused in self._sessions.get(session.key, ()))

    def _forget(self, session: PausedSession) -> None:
        conversations = self._sessions.get(session.key, [])
        for at, paused in enumerate(conversations):
            if paused is session:
                del conversations[at]
                self._bytes -= session.size
                if not conversations:
                    del self._sessions[session.key]
                return

    def drop(self, key: PausedKey, reason: str) -> None:
        """Stop keeping a session warm: it cannot (or will not) send another turn."""
        self._release(key)
        self._skip(reason)

    def _release(self, key: PausedKey) -> None:
        """Forget a session's paused requests, and the bytes they held."""
        self._bytes -= sum(session.size for session in self._sessions.pop(key, ()))

    def _drop_one_shot(self, key: PausedKey) -> None:
        """`drop` for a one-shot session, counted once per session: a `claude -p` run sends a request per
        turn, and counting each said many sessions went without a keepalive where one did."""
        self._release(key)
        if key in self._one_shots:
            self._one_shots.move_to_end(key)
            return
        self._one_shots[key] = None
        if len(self._one_shots) > self._config.max_sessions:
            self._one_shots.popitem(last=False)
        self._skip("one_shot")

    def let_go(self, session: PausedSession, reason: str) -> None:
        """Stop keeping this conversation warm (its caller or account may no longer have it)."""
        self._forget(session)
        self._skip(reason)

    def due(self, now: float) -> list[PausedSession]:
        """Sessions whose cache expires within the lead time and have no keepalive in flight: each gets one
        now if its caller and account still may (the gateway's checks) and `sending` allows it."""
        lead = self._config.lead_seconds
        ready: list[PausedSession] = []
        for session in [session for conversations in self._sessions.values() for session in conversations]:
            if session.in_flight:  # what its answer says decides (`refreshed`)
                continue
            if now >= session.expires_at:
                self._forget(session)  # too late: the entry is gone
                continue
            if session.expires_at - now > lead:
                continue
            if session.sent >= self._config.max_per_session:
                self._forget(session)
                continue
            ready.append(session)
        return ready

    def sending(self, session: PausedSession, now: float) -> bool:
        """Its keepalive is about to go out: True, the session in flight until `refreshed`, and counted
        against its account's `max_per_upstream_per_minute`, unless that allowance is used up for now. Asked
        after the gateway's checks of caller and account: sessions they drop must not use up the allowance of
        those behind them. A session held back is counted skipped (`upstream_limit`) once per pause, not on
        every tick it waits."""
        if not self._upstream_allows(session.upstream_id, now):
            if not session.held:
                session.held = True
                self._skip("upstream_limit")
            return False
        session.in_flight = True
        return True

    def refreshed(self, session: PausedSession, ok: bool, now: float) -> None:
        """The keepalive sent at `now` was answered; on success the entry lives another TTL from then."""
        session.in_flight = False
        session.sent += 1
        if ok:
            session.expires_at = now + TTL_SECONDS[session.prefix.breakpoints[-1].ttl]
        elif self.current(session):
            self._forget(session)

    def _upstream_allows(self, upstream_id: str, now: float) -> bool:
        sent = self._sent_per_upstream.setdefault(upstream_id, deque())
        while sent and now - sent[0] >= 60.0:
            sent.popleft()
        if len(sent) >= self._config.max_per_upstream_per_minute:
            return False
        sent.append(now)
        return True

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _cached_tokens(session: PausedSession) -> int:
    return session.prefix.cacheable_tokens


def _sent_at(session: PausedSession) -> float:
    return session.sent_at

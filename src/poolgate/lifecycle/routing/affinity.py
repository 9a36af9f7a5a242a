"""Session stickiness: a conversation stays on the account that holds its prompt cache.

Keyed on `X-Claude-Code-Session-Id` (subagents send their parent's) or the session inside
`metadata.user_id`. Bounded (LRU) and forgotten after an idle TTL, so memory stays flat.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from poolgate.lifecycle.context import Principal, RequestContext, SessionKey


def affinity_key(principal: Principal, ctx: RequestContext) -> SessionKey | None:
    """The session as routing remembers it: its caller's, as session ids are the client's to choose (another
    caller sending one could otherwise move a session to another account, and its prompt cache with it),
    and its model's, as a prompt cache is (Claude Code's haiku calls beside a sonnet conversation: a session
    whose first call was one stayed bound to an account serving haiku only, its conversation never sticky)."""
    return None if ctx.session_id is None else (principal.id, ctx.session_id, ctx.model)


class SessionAffinity:
    def __init__(self, capacity: int = 100_000, idle_ttl: float = 3600.0) -> None:
        self._capacity = capacity
        self._idle_ttl = idle_ttl
        # Per session: its account, when it idles out, and the account that answered its last turn failed
        # over from it while it stayed the session's (that turn's prompt is written there too).
        self._bound: OrderedDict[SessionKey, tuple[str, float, str | None]] = OrderedDict()
        # Sessions bound to each upstream, kept in step with `_bound` (for spreading new sessions): read it
        # through `live_sessions`.
        self.sessions: Counter[str] = Counter()

    def preferred(self, session_id: SessionKey | None, now: float) -> str | None:
        if session_id is None:
            return None
        self._expire(now)
        entry = self._bound.get(session_id)
        return entry[0] if entry is not None else None

    def fallback(self, session_id: SessionKey | None) -> str | None:
        """Where the session's last failed-over turn was answered, if it stayed with its account (see
        `Router.answered`): the next failover goes there, to that turn's cache, not to yet another account."""
        entry = self._bound.get(session_id) if session_id is not None else None
        return entry[2] if entry is not None else None

    def bind(self, session_id: SessionKey | None, upstream_id: str, now: float, fallback: str | None = None) -> None:
        """Remember where the session was last served (called after a successful answer). A session served
        by its account again keeps its fallback: the turn failed over there wrote the prompt there."""
        if session_id is None:
            return
        previous = self._bound.get(session_id)
        if previous is None or previous[0] != upstream_id:
            if previous is not None:
                self.sessions[previous[0]] -= 1
            self.sessions[upstream_id] += 1
        elif fallback is None:
            fallback = previous[2]
        self._bound[session_id] = (upstream_id, now + self._idle_ttl, fallback)
        self._bound.move_to_end(session_id)
        while len(self._bound) > self._capacity:
            _, (evicted, _, _) = self._bound.popitem(last=False)
            self.sessions[evicted] -= 1
        self._expire(now)

    def live_sessions(self, now: float) -> Counter[str]:
        """The sessions bound to each upstream that have not idled out."""
        self._expire(now)
        return self.sessions

    def _expire(self, now: float) -> None:
        # Every bind moves its session to the end with the same TTL, so the oldest expiry is always first: an
        # idle session is dropped here rather than only when it comes back (it never may), and no longer
        # counts towards its account's share of sessions.
        bound = self._bound
        while bound:
            session_id = next(iter(bound))
            upstream_id, expires, _ = bound[session_id]
            if expires > now:
                return
            del bound[session_id]
            self.sessions[upstream_id] -= 1

    def __len__(self) -> int:
        return len(self._bound)

"""Message threads stay on the account that holds them.

A request with `thread: {"type": "create"}` asks the upstream to hold the conversation under the answer's `id`;
the next turn sends `thread: {"type": "continue", "previous_message_id": <that id>}` with only the new messages.
The thread lives on the account (API key, organisation) that answered: any other answers 404 `thread_not_found`,
and the client replays the whole conversation under a new thread. So each thread is a session for stickiness,
keyed by its first reply (its root), and the gateway remembers which thread each thread's latest reply is of.
"""

from __future__ import annotations

from collections import OrderedDict

from poolgate.lifecycle.context import SessionKey, Thread

# The API's message ids are ~30 characters; a longer `id` is not kept (it would grow the memo at the upstream's will).
MAX_REPLY_ID = 128


def thread_key(principal_id: str, root: str, model: str) -> SessionKey:
    """A thread as session stickiness keys it: its caller's (as a session id, a reply id is no secret), and its
    model's (see `affinity_key`)."""
    return (principal_id, "thread:" + root, model)


class ThreadRoots:
    """Each thread's latest reply → the thread's root, per caller. One entry a thread: a turn's answer replaces
    the reply it continued (the API lets a reply be continued once). Bounded (LRU) and forgotten after an idle TTL,
    as sessions are: after it the thread's session is forgotten anyway."""

    def __init__(self, capacity: int = 100_000, idle_ttl: float = 3600.0) -> None:
        self._capacity = capacity
        self._idle_ttl = idle_ttl
        self._roots: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def root(self, principal_id: str, thread: Thread, now: float) -> str | None:
        """The root of the thread a `continue` goes on, if this instance answered the reply it names and still
        remembers it; None for a `create`."""
        if thread.previous_message_id is None:
            return None
        self._expire(now)
        entry = self._roots.get((principal_id, thread.previous_message_id))
        return entry[0] if entry is not None else None

    def answered(self, principal_id: str, thread: Thread, reply_id: object, now: float) -> str | None:
        """Remember the answer `reply_id` of a threaded request; returns its thread's root (a `create`'s own reply,
        as a `continue`'s of a thread this instance did not know), or None for an id not kept."""
        previous = thread.previous_message_id
        entry = self._roots.pop((principal_id, previous), None) if previous is not None else None
        if not isinstance(reply_id, str) or not 0 < len(reply_id) <= MAX_REPLY_ID:
            return None
        root = reply_id if entry is None else entry[0]
        self._roots[(principal_id, reply_id)] = (root, now + self._idle_ttl)
        while len(self._roots) > self._capacity:
            self._roots.popitem(last=False)
        self._expire(now)
        return root

    def _expire(self, now: float) -> None:
        # Every entry is added last with the same TTL: the oldest expiry is always first.
        roots = self._roots
        while roots:
            _, expires = roots[next(iter(roots))]
            if expires > now:
                return
            roots.popitem(last=False)

    def __len__(self) -> int:
        return len(self._roots)

"""Which thread a reply is of: one entry a thread, bounded, forgotten when idle."""

from __future__ import annotations

from poolgate.lifecycle.context import Thread
from poolgate.lifecycle.routing.threads import MAX_REPLY_ID, ThreadRoots

CREATE = Thread()


def test_every_turn_of_a_thread_leads_back_to_its_first_reply_and_only_its_latest_reply_is_kept() -> None:
    roots = ThreadRoots()
    assert roots.answered("alice", CREATE, "msg_1", now=0) == "msg_1"
    assert roots.root("alice", Thread("msg_1"), now=1) == "msg_1"
    assert roots.answered("alice", Thread("msg_1"), "msg_2", now=1) == "msg_1"
    assert roots.answered("alice", Thread("msg_2"), "msg_3", now=2) == "msg_1"
    assert len(roots) == 1  # a reply is continued once: the ones before are of no more use
    assert roots.root("alice", Thread("msg_1"), now=3) is None
    assert roots.root("alice", Thread("msg_3"), now=3) == "msg_1"
    assert roots.root("alice", CREATE, now=3) is None


def test_a_reply_is_its_callers_and_a_thread_not_known_starts_anew() -> None:
    roots = ThreadRoots()
    roots.answered("alice", CREATE, "msg_1", now=0)
    assert roots.root("bob", Thread("msg_1"), now=0) is None
    # A `continue` of a thread another instance answered: remembered from its answer on.
    assert roots.answered("bob", Thread("msg_elsewhere"), "msg_2", now=0) == "msg_2"
    assert roots.root("bob", Thread("msg_2"), now=0) == "msg_2"


def test_ids_that_are_no_message_id_are_not_kept() -> None:
    roots = ThreadRoots()
    for reply_id in (None, 7, "", "m" * (MAX_REPLY_ID + 1)):
        assert roots.answered("alice", CREATE, reply_id, now=0) is None
    assert len(roots) == 0


def test_memory_is_bounded_and_idle_threads_are_forgotten_even_if_they_never_come_back() -> None:
    roots = ThreadRoots(capacity=2, idle_ttl=10)
    roots.answered("alice", CREATE, "msg_a", now=0)
    roots.answered("alice", CREATE, "msg_b", now=1)
    roots.answered("alice", CREATE, "msg_c", now=2)  # the least recently answered goes
    assert len(roots) == 2 and roots.root("alice", Thread("msg_a"), now=2) is None
    assert roots.root("alice", Thread("msg_b"), now=10.9) == "msg_b"
    assert roots.root("alice", Thread("msg_b"), now=11) is None
    assert len(roots) == 1
    roots.answered("alice", CREATE, "msg_d", now=30)
    assert len(roots) == 1

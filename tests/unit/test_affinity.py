"""Session affinity stays bounded and forgets idle sessions."""

from __future__ import annotations

from poolgate.lifecycle.routing.affinity import SessionAffinity


def test_a_bound_session_is_preferred_until_it_idles_out() -> None:
    affinity = SessionAffinity(idle_ttl=10)
    affinity.bind("s", "up-1", now=0)
    assert affinity.preferred("s", now=9.9) == "up-1"
    assert affinity.preferred("s", now=10) is None
    assert affinity.preferred(None, now=0) is None


def test_memory_is_bounded_by_evicting_the_least_recently_used_session() -> None:
    affinity = SessionAffinity(capacity=2)
    affinity.bind("a", "up-1", 0)
    affinity.bind("b", "up-2", 0)
    affinity.bind("a", "up-1", 1)  # a is used again: b is now the oldest
    affinity.bind("c", "up-3", 2)
    assert len(affinity) == 2
    assert affinity.preferred("b", 3) is None
    assert affinity.preferred("a", 3) == "up-1" and affinity.preferred("c", 3) == "up-3"


def test_idle_sessions_are_forgotten_and_uncounted_even_if_they_never_come_back() -> None:
    """An idle session was dropped only when it was looked up again: sessions that ended stayed in memory up
    to the cap and kept counting towards their account's share, skewing where new sessions were spread."""
    affinity = SessionAffinity(idle_ttl=10)
    for index in range(100):
        affinity.bind(f"gone-{index}", "up-1", now=index / 100)
    affinity.bind("kept", "up-2", now=5)
    assert affinity.live_sessions(now=9) == {"up-1": 100, "up-2": 1}
    affinity.bind("new", "up-2", now=12)
    assert len(affinity) == 2
    assert +affinity.live_sessions(now=12) == {"up-2": 2}
    assert +affinity.live_sessions(now=15) == {"up-2": 1}
    assert affinity.preferred("kept", now=15) is None and affinity.preferred("new", now=15) == "up-2"

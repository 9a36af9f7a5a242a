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

"""The mock's message threads are bounded per key: how many it holds, their bytes, and for how long."""

from __future__ import annotations

from typing import Any

from poolgate.mock.threads import Resolved, ThreadLimits, ThreadRefusal, ThreadStore

REPLY = {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}


def create(store: ThreadStore, reply_id: str, now: float = 0.0, text: str = "Hello") -> None:
    request: dict[str, Any] = {"messages": [{"role": "user", "content": text}], "system": "Be brief."}
    store.hold(Resolved(request, True), len(text) + 50, reply_id, REPLY, now)


def resolve(store: ThreadStore, reply_id: str, now: float = 0.0) -> Resolved | ThreadRefusal:
    """A continue of `reply_id` with one user message."""
    request = {"messages": [{"role": "user", "content": "More"}]}
    return store.resolve(request, {"type": "continue", "previous_message_id": reply_id}, now)


def found(store: ThreadStore, reply_id: str, now: float = 0.0) -> str | None:
    """The error code of a continue of `reply_id`, None when the store holds its thread."""
    resolved = resolve(store, reply_id, now)
    return resolved.error_code if isinstance(resolved, ThreadRefusal) else None


def test_a_continue_reads_the_held_conversation_and_its_create_only_fields() -> None:
    store = ThreadStore(ThreadLimits())
    create(store, "msg_1")
    resolved = resolve(store, "msg_1")
    assert isinstance(resolved, Resolved)
    assert resolved.request["system"] == "Be brief."
    assert [message["role"] for message in resolved.request["messages"]] == ["user", "assistant", "user"]


def test_the_oldest_threads_go_beyond_the_count() -> None:
    store = ThreadStore(ThreadLimits(threads=2))
    for reply_id in ("msg_1", "msg_2", "msg_3"):
        create(store, reply_id)
    assert (len(store), found(store, "msg_1"), found(store, "msg_3")) == (2, "thread_not_found", None)


def test_the_oldest_threads_go_beyond_the_bytes_and_one_too_large_is_not_held() -> None:
    store = ThreadStore(ThreadLimits(bytes=300))
    create(store, "msg_1")
    create(store, "msg_2")
    create(store, "msg_3", text="x" * 100)
    assert store.bytes <= 300 and found(store, "msg_1") == "thread_not_found" and found(store, "msg_3") is None
    create(store, "msg_big", text="x" * 400)
    assert found(store, "msg_big") == "thread_not_found" and found(store, "msg_3") is None


def test_a_thread_expires_after_its_ttl() -> None:
    store = ThreadStore(ThreadLimits(ttl_seconds=60))
    create(store, "msg_1", now=100.0)
    assert found(store, "msg_1", now=159.0) is None
    assert found(store, "msg_1", now=161.0) == "thread_not_found"
    assert (len(store), store.bytes) == (0, 0)


def test_a_continued_reply_is_refused_as_such_and_holds_no_conversation() -> None:
    store = ThreadStore(ThreadLimits())
    create(store, "msg_1")
    resolved = resolve(store, "msg_1")
    assert isinstance(resolved, Resolved)
    before = store.bytes
    store.hold(resolved, 60, "msg_2", REPLY, 0.0)
    assert found(store, "msg_1") == "thread_already_continued" and found(store, "msg_2") is None
    assert store.bytes > before  # the whole conversation under msg_2, none of it under msg_1 any more

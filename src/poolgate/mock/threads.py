"""Message threads (the `message-threads-2026-08-12` beta) as the API holds them, per key.

`thread: {"type": "create"}` asks the API to hold the conversation under the reply's `id`; `{"type": "continue",
"previous_message_id": id}` sends only the turns after that reply, and the API reads them after the conversation
it holds, with the thread's create-only fields (`system`, `tools`: the anthropic SDK leaves them out of a
continue). Each reply can be continued once. The API's rules as the anthropic SDK 2.17 states them (its error
types' docstrings and the exception each `error_code` raises): no usable thread for the id is 404
`not_found_error` `thread_not_found`, a reply continued already 400 `thread_already_continued`; the SDK's tool
runner sends the whole conversation again under a new thread on either. A thread is held by the key (the
account) that made it: another key does not find it.

What the API keeps, and for how long, is not documented: the mock bounds it (`ThreadLimits`), and a thread it let
go of is one the API no longer holds, which its clients recover from.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import orjson

# The fields a thread keeps from its `create` (the anthropic SDK's `CREATE_ONLY_FIELDS`).
CREATE_ONLY_FIELDS = ("system", "tools")

# The API's words for these errors are not known (no client or issue quotes one): these say what the SDK's
# error types say.
NOT_FOUND_MESSAGE = (
    "previous_message_id: no thread was found for {id}. Replay the full conversation with "
    '`thread: {{"type": "create"}}` to start a new thread.'
)
ALREADY_CONTINUED_MESSAGE = (
    "previous_message_id: {id} has already been continued, and each response can be continued only once. Continue "
    "from the thread's most recent response id."
)


@dataclass(frozen=True)
class ThreadLimits:
    """How much of the threads a key made the mock holds: the newest `threads` replies, `bytes` of conversation in
    all (a conversation larger than that is not held), each for `ttl_seconds` after its reply."""

    threads: Annotated[int, msgspec.Meta(ge=1)] = 1_000
    bytes: Annotated[int, msgspec.Meta(ge=1)] = 256 * 1024 * 1024
    ttl_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3_600.0


@dataclass(frozen=True, slots=True)
class Held:
    """A conversation the API holds under a reply's id: its messages (the reply last) and create-only fields."""

    messages: list[Any]
    fields: dict[str, Any]
    size: int  # its messages' and fields' bytes, as JSON
    until: float  # when it expires
    continued: bool = False  # a reply continued already keeps its id, and none of its conversation


@dataclass(frozen=True, slots=True)
class ThreadRefusal:
    status: int
    message: str
    error_code: str | None  # the `error.details.error_code` the SDK acts on


@dataclass(frozen=True, slots=True)
class Resolved:
    """A request read with the conversation it continues: what the mock answers, and the thread to hold after."""

    request: dict[str, Any]
    thread: bool  # whether its reply is held (a create or a continue)
    previous: str | None = None  # the reply it continues
    size: int = 0  # the held conversation's bytes, before the request's
    held: int = 0  # how many of its messages are the held conversation's


def thread_of(request: dict[str, Any]) -> dict[str, Any] | None:
    """The request's `thread`, when it asks for one (`create` or `continue`)."""
    thread = request.get("thread")
    return thread if isinstance(thread, dict) and thread.get("type") in ("create", "continue") else None


class ThreadStore:
    """One key's threads, oldest first."""

    def __init__(self, limits: ThreadLimits) -> None:
        self.limits = limits
        self._held: OrderedDict[str, Held] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    @property
    def bytes(self) -> int:
        return self._bytes

    def resolve(self, request: dict[str, Any], thread: dict[str, Any], now: float) -> Resolved | ThreadRefusal:
        """The request (its `messages` a list) as the API reads it: a continue's messages after the held
        conversation, with the held create-only fields. Nothing changes until `hold`."""
        if thread["type"] == "create":
            return Resolved(request, True)
        previous = thread.get("previous_message_id")
        if not isinstance(previous, str):
            return ThreadRefusal(400, "thread.continue.previous_message_id: Field required", None)
        self._expire(now)
        held = self._held.get(previous)
        if held is None:
            return ThreadRefusal(404, NOT_FOUND_MESSAGE.format(id=previous), "thread_not_found")
        if held.continued:
            return ThreadRefusal(400, ALREADY_CONTINUED_MESSAGE.format(id=previous), "thread_already_continued")
        # The held create-only fields stand, as the API keeps them (the SDK refuses to send others on a continue).
        merged = {**request, **held.fields, "messages": [*held.messages, *request["messages"]]}
        return Resolved(merged, True, previous, held.size, len(held.messages))

    def hold(self, resolved: Resolved, body_size: int, reply_id: str, reply: dict[str, Any], now: float) -> None:
        """Hold the conversation `resolved` (its request `body_size` bytes) and its reply under the reply's id;
        the reply it continued is continued now. The held messages keep no `cache_control`: each was set for the
        turn that sent it, and a request takes four at most (the anthropic SDK takes them out of a conversation it
        sends again)."""
        if resolved.previous is not None:
            self._replace(resolved.previous, Held([], {}, 0, now + self.limits.ttl_seconds, continued=True))
        request = resolved.request
        fields = {name: request[name] for name in CREATE_ONLY_FIELDS if name in request}
        added = request["messages"][resolved.held :]
        messages = [*request["messages"][: resolved.held], *map(_without_cache_control, added), reply]
        # The body bounds what the request added (its messages, and a create's fields): the size is counted
        # without writing the conversation again.
        size = resolved.size + body_size + len(orjson.dumps(reply))
        if size <= self.limits.bytes:
            self._replace(reply_id, Held(messages, fields, size, now + self.limits.ttl_seconds))
        self._expire(now)

    def _replace(self, reply_id: str, held: Held) -> None:
        old = self._held.pop(reply_id, None)
        self._bytes += held.size - (old.size if old is not None else 0)
        self._held[reply_id] = held

    def _expire(self, now: float) -> None:
        """Let go of the oldest threads while there are too many, too large, or expired."""
        limits = self.limits
        while self._held:
            oldest_id, oldest = next(iter(self._held.items()))
            if len(self._held) <= limits.threads and self._bytes <= limits.bytes and oldest.until > now:
                return
            del self._held[oldest_id]
            self._bytes -= oldest.size


def _marked(block: Any) -> bool:
    return isinstance(block, dict) and "cache_control" in block


def _without_cache_control(message: Any) -> Any:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list) or not any(_marked(block) for block in content):
        return message
    blocks = [
        {name: value for name, value in block.items() if name != "cache_control"} if _marked(block) else block
        for block in content
    ]
    return {**message, "content": blocks}

"""Reading a Messages request: the fields the gateway decides on, read as the upstream will read them."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from poolgate.api.anthropic import decode_request
from poolgate.api.errors import ApiError

CHECKED = ("model", "stream", "max_tokens")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from([*CHECKED, "x"]), children),
    max_leaves=8,
)
# Keys beside the checked ones, whatever they hold (the gateway keeps them undecoded or skips them): the API's
# others, and names no parser would confuse with the checked ones.
other_keys = st.sampled_from(["system", "tools", "thinking", "temperature", "Model", "model ", "max_tokens_x"])
checked_values = {
    "model": st.text(min_size=1, max_size=20),
    "stream": st.booleans(),
    "max_tokens": st.integers(1, 1_000_000),
}


def body_of(pairs: list[tuple[str, Any]]) -> bytes:
    """A JSON object with these members in this order, a key repeated as often as it appears (orjson, like
    every encoder of a dict, writes each key once)."""
    return b"{" + b",".join(orjson.dumps(key) + b":" + orjson.dumps(value) for key, value in pairs) + b"}"


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[tuple[str, Any]], dict[str, int]]:
    times = {
        "model": draw(st.integers(1, 3)),
        "stream": draw(st.integers(0, 3)),
        "max_tokens": draw(st.integers(1, 3)),
    }
    pairs = [(name, draw(checked_values[name])) for name, n in times.items() for _ in range(n)]
    pairs.append(("messages", [{"role": "user", "content": draw(json_values)}]))
    # Others, some holding the checked names deeper down (a tool's schema, metadata): never counted.
    pairs += [(key, draw(json_values)) for key in draw(st.lists(other_keys, max_size=3, unique=True))]
    if draw(st.booleans()):
        pairs.append(
            (
                "metadata",
                {
                    "user_id": draw(st.none() | st.text(max_size=8)),
                    **draw(st.dictionaries(st.sampled_from(CHECKED), json_values)),
                },
            )
        )
    return draw(st.permutations(pairs)), times


@given(requests())
def test_a_field_the_upstream_reads_too_is_refused_when_named_twice_and_read_when_named_once(
    request: tuple[list[tuple[str, Any]], dict[str, int]],
) -> None:
    pairs, times = request
    named_twice = [name for name in CHECKED if times[name] > 1]
    try:
        ctx = decode_request("messages", "req", "/v1/messages", b"", [], body_of(pairs))
    except ApiError as refused:
        assert refused.status == 400 and named_twice, (refused.message, pairs)
        assert any(refused.message.startswith(f"Invalid request: {name}: the body names it") for name in named_twice)
        return
    assert not named_twice, pairs
    given_once = dict(pairs)
    assert (ctx.model, ctx.max_tokens) == (given_once["model"], given_once["max_tokens"])
    assert ctx.stream is given_once.get("stream", False)


@given(st.binary(max_size=200) | json_values.map(orjson.dumps))
def test_any_body_is_read_or_refused_with_a_clear_400(body: bytes) -> None:
    """Never another exception (a 500): whatever a client sends is a request or the client's mistake."""
    try:
        decode_request("messages", "req", "/v1/messages", b"", [], body)
    except ApiError as refused:
        assert refused.status == 400 and refused.error_type == "invalid_request_error"


@given(
    json_values
    | st.fixed_dictionaries(
        {"type": st.sampled_from(["create", "continue"])}, optional={"previous_message_id": json_values}
    )
)
def test_a_thread_is_read_as_routing_needs_it_and_any_other_value_is_left_to_the_upstream(thread: Any) -> None:
    """A `create`, or a `continue` naming the reply it goes on from; anything else is sent on as it came (the
    upstream refuses it, or knows a newer kind), never refused by the gateway."""
    body = orjson.dumps({"model": "claude-x", "max_tokens": 8, "messages": [], "thread": thread})
    read = decode_request("messages", "req", "/v1/messages", b"", [], body).thread
    kind = thread.get("type") if isinstance(thread, dict) else None
    previous = thread.get("previous_message_id") if isinstance(thread, dict) else None
    if kind == "create":
        assert read is not None and read.previous_message_id is None
    elif kind == "continue" and isinstance(previous, str) and previous:
        assert read is not None and read.previous_message_id == previous
    else:
        assert read is None
    assert (
        decode_request("messages", "req", "/v1/messages", b"", [], body.replace(b'"thread"', b'"other"')).thread is None
    )

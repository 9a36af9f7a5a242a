"""Cache breakpoints and prefix hashes: a conversation must recognise its own prefix on the next turn."""

from __future__ import annotations

import json
import sys
import tracemalloc
from types import FrameType
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolgate.api.anthropic import LARGE_BODY, decode_request
from poolgate.api.errors import ApiError
from poolgate.api.escapes import hides_words
from poolgate.cache import breakpoints
from poolgate.cache.breakpoints import (
    LOOKBACK_BLOCKS,
    PromptPrefix,
    analyse,
    marker_ttl,
    prompt_prefix,
    unmarked,
)
from poolgate.lifecycle.context import Endpoint

EPHEMERAL = {"type": "ephemeral"}


def prefix_of(body: dict[str, Any]) -> PromptPrefix:
    ctx = decode_request(
        "messages", "req", "/v1/messages", b"", [], orjson.dumps({"model": "m", "max_tokens": 1, **body})
    )
    assert ctx.prompt is not None
    return analyse(ctx.prompt)


def claude_code_turn(turns: list[str], system: str = "You are Claude Code.") -> dict[str, Any]:
    """As Claude Code sends it: markers on the system prompt and on the newest turn only."""
    messages: list[dict[str, Any]] = []
    for index, text in enumerate(turns):
        role = "user" if index % 2 == 0 else "assistant"
        messages.append({"role": role, "content": [{"type": "text", "text": text}]})
    messages[-1]["content"][-1]["cache_control"] = EPHEMERAL
    return {
        "tools": [{"name": "Read", "description": "read a file", "input_schema": {"type": "object"}}],
        "system": [{"type": "text", "text": system, "cache_control": EPHEMERAL}],
        "messages": messages,
    }


texts = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=9)


@given(texts)
def test_the_same_request_always_hashes_the_same(turns: list[str]) -> None:
    assert prefix_of(claude_code_turn(turns)) == prefix_of(claude_code_turn(turns))


@given(texts, st.booleans())
def test_a_prefix_is_warm_for_its_own_model_only(turns: list[str], without_tools: bool) -> None:
    """Each model has its own prompt cache: after Claude Code's `/model`, the same conversation's prefix was
    taken for warm where the other model wrote it (routing kept it there for a read that never came)."""
    body = claude_code_turn(turns)
    if without_tools:  # a conversation's own first boundary is the model's too
        del body["tools"], body["system"]
    ctx = decode_request(
        "messages", "req", "/v1/messages", b"", [], orjson.dumps({"model": "m", "max_tokens": 1, **body})
    )
    assert ctx.prompt is not None
    sonnet, opus = analyse(ctx.prompt, "claude-sonnet-4-5"), analyse(ctx.prompt, "claude-opus-4-1")
    assert sonnet == analyse(ctx.prompt, "claude-sonnet-4-5")
    assert not {h for h, _ in sonnet.lookups} & {h for h, _ in opus.lookups}
    assert [b.prefix_token_count for b in sonnet.breakpoints] == [b.prefix_token_count for b in opus.breakpoints]


@given(texts, st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_the_next_turn_finds_the_previous_turns_breakpoint_in_its_lookback(turns: list[str], a: str, b: str) -> None:
    before = prefix_of(claude_code_turn(turns))
    after = prefix_of(claude_code_turn([*turns, a, b]))
    assert after.breakpoints[0].prefix_hash == before.breakpoints[0].prefix_hash  # the system prompt
    previous = before.breakpoints[-1]
    assert (previous.prefix_hash, previous.prefix_token_count) in after.breakpoints[-1].lookback


@given(texts, st.integers(min_value=0), st.text(min_size=1, max_size=10))
def test_any_change_before_a_breakpoint_changes_its_hash(turns: list[str], position: int, extra: str) -> None:
    original = claude_code_turn(turns)
    changed = claude_code_turn(turns)
    message = changed["messages"][position % len(turns)]
    message["content"][0]["text"] += extra
    assert prefix_of(original).breakpoints[-1].prefix_hash != prefix_of(changed).breakpoints[-1].prefix_hash
    # ... and leaves the system prompt's breakpoint alone.
    assert prefix_of(original).breakpoints[0].prefix_hash == prefix_of(changed).breakpoints[0].prefix_hash


@given(texts)
def test_a_changed_system_prompt_changes_every_later_hash(turns: list[str]) -> None:
    one = prefix_of(claude_code_turn(turns, "system A"))
    two = prefix_of(claude_code_turn(turns, "system B"))
    assert all(a.prefix_hash != b.prefix_hash for a, b in zip(one.breakpoints, two.breakpoints, strict=True))


# What the API keys the messages' cache entries on besides their blocks, as clients send it (None: absent).
message_settings = st.fixed_dictionaries(
    {
        "thinking": st.sampled_from(
            [
                None,
                {"type": "adaptive"},
                {"type": "disabled"},
                {"type": "enabled", "budget_tokens": 1024},
                {"type": "enabled", "budget_tokens": 4096},
            ]
        ),
        "tool_choice": st.sampled_from([None, {"type": "auto"}, {"type": "none"}, {"type": "tool", "name": "Read"}]),
    }
)


@given(texts, message_settings, message_settings)
def test_thinking_and_tool_choice_key_the_messages_prefixes_and_not_the_tools_or_system(
    turns: list[str], one: dict[str, Any], two: dict[str, Any]
) -> None:
    """The API keys its messages' entries on the thinking settings and `tool_choice`: a change of either
    leaves the tools and system prompt cached and writes the messages again. A session that turned thinking
    off was predicted to read its whole conversation on the account that then wrote it anew."""

    def prefix_with(settings: dict[str, Any]) -> PromptPrefix:
        body = claude_code_turn(turns)
        body["tools"][-1]["cache_control"] = EPHEMERAL
        return prefix_of({**body, **{name: value for name, value in settings.items() if value is not None}})

    breakpoints._HEADS.clear()
    a, b = prefix_with(one), prefix_with(two)
    tools, system, messages = a.breakpoints
    assert (tools.source, system.source, messages.source) == ("tools", "system", "messages")
    assert b.breakpoints[:2] == (tools, system)
    if one == two:
        assert a == b
    else:
        # Every message boundary moves; a lookup from the newest turn still finds the tools' and system's.
        head = set(messages.lookback[len(turns) :])
        assert set(messages.lookback) & set(b.breakpoints[2].lookback) == head
        assert {(tools.prefix_hash, tools.prefix_token_count), (system.prefix_hash, system.prefix_token_count)} == head
    # ... and their tools and system prompt are worked out once (Claude Code sends its thinking every turn).
    assert len(breakpoints._HEADS) == 1


@given(texts, st.text(max_size=60), st.text(max_size=60))
def test_claude_codes_attribution_block_is_no_part_of_the_prefix(turns: list[str], one: str, two: str) -> None:
    """Its text changes between sessions (older Claude Code: between requests) and the API does not cache
    it: requests that differ in it alone, or lack it, hash alike, so another session's warm cache counts."""

    def attributed(suffix: str | None) -> PromptPrefix:
        body = claude_code_turn(turns)
        if suffix is not None:
            block = {
                "type": "text",
                "text": f"x-anthropic-billing-header: cc_version=2.1.0.{suffix}; cc_entrypoint=cli;",
            }
            body["system"].insert(0, block)
        return prefix_of(body)

    assert attributed(one) == attributed(two) == attributed(None)
    # ... and they share one analysis of their tools and system prompt: with a block that changes on every
    # request (older Claude Code), a remembered head that never matched would be worked out afresh each time.
    breakpoints._HEADS.clear()
    attributed(one), attributed(two)
    assert len(breakpoints._HEADS) == 1
    # A system block that only mentions it is part of the prompt.
    mentioned = claude_code_turn(turns, system="see x-anthropic-billing-header: cc_version=2.1.0;")
    assert prefix_of(mentioned).breakpoints[0].prefix_hash != attributed(None).breakpoints[0].prefix_hash


@given(texts, st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_a_turn_replayed_as_a_string_is_the_text_block_it_was_sent_as(turns: list[str], a: str, b: str) -> None:
    """Claude Code sends its newest turn as a marked text block and replays it as a plain string next time:
    the API reads that turn's cache entry, so the next turn must find the previous one's breakpoint."""
    before = claude_code_turn(turns)
    after = claude_code_turn([*turns, a, b])
    for message in after["messages"][: len(turns)]:
        if message["role"] == "user":
            message["content"] = message["content"][0]["text"]
    previous = prefix_of(before).breakpoints[-1]
    assert (previous.prefix_hash, previous.prefix_token_count) in prefix_of(after).breakpoints[-1].lookback


def test_breakpoints_carry_source_index_ttl_and_a_growing_token_count() -> None:
    body = claude_code_turn(["hello", "hi", "more"])
    body["messages"][-1]["content"][-1]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    system, last = prefix_of(body).breakpoints
    assert (system.source, system.block_index, system.ttl, system.explicit) == ("system", 1, "5m", True)
    assert (last.source, last.block_index, last.ttl, last.explicit) == ("messages", 4, "1h", True)
    assert 0 < system.prefix_token_count < last.prefix_token_count
    assert len(last.lookback) == 5 and last.lookback[0] == (last.prefix_hash, last.prefix_token_count)


def test_the_lookback_reaches_twenty_blocks_back_and_no_further() -> None:
    body = claude_code_turn([f"turn {i}" for i in range(40)])
    last = prefix_of(body).breakpoints[-1]
    assert len(last.lookback) == LOOKBACK_BLOCKS + 1


def test_a_request_without_markers_gets_inferred_breakpoints_at_system_end_and_last_user_turn() -> None:
    prefix = prefix_of({"system": "Be brief.", "messages": [{"role": "user", "content": "hi"}]})
    assert [(b.source, b.explicit) for b in prefix.breakpoints] == [("system", False), ("messages", False)]


def test_request_level_cache_control_marks_the_last_block() -> None:
    prefix = prefix_of(
        {"cache_control": {"type": "ephemeral", "ttl": "1h"}, "messages": [{"role": "user", "content": "x"}]}
    )
    [only] = prefix.breakpoints
    assert only.explicit and only.ttl == "1h" and only.block_index == 0


def test_at_most_four_breakpoints_count_the_last_four() -> None:
    system = [{"type": "text", "text": f"part {i}", "cache_control": EPHEMERAL} for i in range(6)]
    prefix = prefix_of({"system": system, "messages": [{"role": "user", "content": "x"}]})
    assert [b.block_index for b in prefix.breakpoints] == [2, 3, 4, 5]


@given(st.dictionaries(st.sampled_from(["type", "text", "id", "name"]), st.text(max_size=20), min_size=1))
def test_a_marker_is_removed_wherever_it_stands_in_the_block(block: dict[str, str]) -> None:
    plain = orjson.dumps(block)
    for position in range(len(block) + 1):
        items = list(block.items())
        items.insert(position, ("cache_control", EPHEMERAL))  # type: ignore[arg-type]
        data, ttl = unmarked(orjson.dumps(dict(items)))
        assert data == plain and ttl == "5m"


@given(
    st.lists(
        st.tuples(st.dictionaries(st.sampled_from(["type", "text", "id"]), st.text(max_size=9)), st.integers(0, 3)),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([EPHEMERAL, {"type": "ephemeral", "ttl": "1h"}]),
)
def test_every_marker_of_a_value_is_cut_out_and_nothing_else(
    blocks: list[tuple[dict[str, str], int]], marker: dict[str, str]
) -> None:
    """Markers first, last or between the fields of their blocks, in one value: what is left is the value as if
    written without them, byte for byte (its hash must not change as its markers move on)."""
    marked = []
    for block, position in blocks:
        items: list[tuple[str, object]] = list(block.items())
        items.insert(min(position, len(items)), ("cache_control", marker))
        marked.append(dict(items))
    data, ttl = unmarked(orjson.dumps(marked))
    assert data == orjson.dumps([block for block, _ in blocks])
    assert ttl == marker_ttl(orjson.dumps(marker))


def test_marker_text_inside_a_string_is_not_a_marker() -> None:
    block = orjson.dumps({"type": "text", "text": '"cache_control": {"type": "ephemeral"}'})
    assert unmarked(block) == (block, None)


@given(texts)
def test_only_a_prompt_that_asks_for_caching_is_analysed(turns: list[str]) -> None:
    """Anthropic caches nothing unmarked: such a prompt only tells routing its size, even when its text
    talks about cache_control; a marked one gets its full analysis."""
    marked = claude_code_turn(turns)
    body = orjson.dumps({"model": "m", "max_tokens": 1, **marked})
    ctx = decode_request("messages", "req", "/v1/messages", b"", [], body)
    assert ctx.prompt is not None
    assert prompt_prefix(ctx.prompt, ctx.body) == analyse(ctx.prompt)

    plain = {"messages": [{"role": "user", "content": f'{" ".join(turns)} "cache_control": {{"type": "ephemeral"}}'}]}
    body = orjson.dumps({"model": "m", "max_tokens": 1, **plain})
    ctx = decode_request("messages", "req", "/v1/messages", b"", [], body)
    assert ctx.prompt is not None
    found = prompt_prefix(ctx.prompt, ctx.body)
    assert found.breakpoints == () and found.prompt_tokens == len(body) // 4


@given(
    st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=6),
    st.lists(st.text(min_size=1, max_size=20), max_size=4),
    texts,
    st.integers(min_value=0),
)
def test_a_marker_in_the_tools_or_system_hashes_as_the_same_boundary_of_a_later_breakpoint(
    tool_names: list[str], system: list[str], turns: list[str], position: int
) -> None:
    """Tools and system are chained once per distinct pair and remembered: a breakpoint among them must
    hash as that boundary does in a request marked further on, memo or not."""
    head: list[dict[str, Any]] = [
        *({"name": name, "input_schema": {"type": "object"}} for name in tool_names),
        *({"type": "text", "text": text} for text in system),
    ]
    marked_at = position % len(head)
    head[marked_at] = {**head[marked_at], "cache_control": EPHEMERAL}
    tools, system_blocks = head[: len(tool_names)], head[len(tool_names) :]
    body = {"tools": tools, "system": system_blocks, "messages": claude_code_turn(turns)["messages"]}
    later = prefix_of(body).breakpoints[-1]
    marked = prefix_of({**body, "messages": [{"role": "user", "content": "hi"}]}).breakpoints[-1]
    assert marked.block_index == marked_at
    if later.block_index - marked_at <= LOOKBACK_BLOCKS:
        assert (marked.prefix_hash, marked.prefix_token_count) in later.lookback
    remembered = prefix_of(body)
    breakpoints._HEADS.clear()
    breakpoints._MEMO._units.clear()
    assert prefix_of(body) == remembered


@given(st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=60), st.sets(st.integers(0, 59), max_size=4))
def test_every_looked_back_boundary_is_visited_once_longest_first(turns: list[str], marked: set[int]) -> None:
    body = claude_code_turn(turns)
    for index in marked:  # more breakpoints, anywhere in the conversation (windows overlap or not)
        if index < len(turns):
            body["messages"][index]["content"][-1]["cache_control"] = EPHEMERAL
    prefix = prefix_of(body)
    expected: list[tuple[bytes, int]] = []
    for breakpoint in reversed(prefix.breakpoints):  # the plain way: every window, a set of what was seen
        expected += [entry for entry in breakpoint.lookback if entry not in expected]
    assert list(prefix.lookups) == expected


def test_a_prompt_of_absurdly_many_blocks_is_routed_by_its_size_and_remembered_nowhere() -> None:
    """Millions of one-byte tools, or more blocks than any real prompt has, must not be analysed: every
    caller's requests waited seconds on the event loop for one such body, and its blocks stayed in the
    memos (a gigabyte a request). Such a prompt is routed by its size, like an unmarked one."""
    turn = claude_code_turn(["hi"])
    tiny = [0] * 600_000  # 1.2 MB of commas: not even decoded
    many = [{"name": f"t{index}", "input_schema": {"type": "object"}} for index in range(breakpoints.MAX_UNITS + 1)]
    chatty = [{"role": "user", "content": "hi"}] * breakpoints.MAX_UNITS + turn["messages"]
    breakpoints._HEADS.clear()
    breakpoints._MEMO._units.clear()
    for body in (
        {**turn, "tools": tiny},
        {**turn, "tools": many},
        {**turn, "system": many},
        {**turn, "messages": chatty},
    ):
        raw = orjson.dumps({"model": "m", "max_tokens": 1, **body})
        ctx = decode_request("messages", "req", "/v1/messages", b"", [], raw)
        assert ctx.prompt is not None
        assert prompt_prefix(ctx.prompt, ctx.body) == PromptPrefix((), len(raw) // 4)
    assert not breakpoints._HEADS
    # Only the turn's one tool, analysed before its system blocks were refused, is remembered.
    assert [len(units) for units in breakpoints._MEMO._units.values()] == [1]
    # As many blocks as a prompt may have are analysed.
    most = {**turn, "tools": many[: breakpoints.MAX_UNITS]}
    assert prefix_of(most).breakpoints[-1].block_index == breakpoints.MAX_UNITS + 1


@pytest.mark.parametrize("role", [b'"role"', b'"r\\u006fle"'])
def test_a_large_body_of_a_million_tiny_messages_is_not_decoded_into_a_million_objects(role: bytes) -> None:
    """Each message decoded is an object: 1.4 million of them in a 32 MiB body took ~200 MB and ~0.4 s of the
    event loop per request (16 such requests held 2.8 GB). A large body's messages are counted first (by
    their `"role"`, which a body that spells it with an escape hid from the count)."""
    tiny = b"{" + role + b':"user","content":0}'
    body = b'{"model":"m","max_tokens":1,"messages":[' + b",".join([tiny] * (2**25 // len(tiny))) + b"]}"
    assert len(body) > LARGE_BODY
    tracemalloc.start()
    try:
        ctx = decode_request("messages", "req", "/v1/messages", b"", [], body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(body)  # the messages' bytes copied once to count them, not an object per message
    assert ctx.prompt is not None and ctx.prompt.messages is None
    assert prompt_prefix(ctx.prompt, ctx.body) == PromptPrefix((), len(body) // 4, unmarked=True)


def test_a_large_body_of_a_few_messages_is_checked_and_analysed_as_a_small_one() -> None:
    """Screenshots make bodies of megabytes: their prompt is still analysed, their messages still checked, and
    a refusal says what a small body's says (count_tokens, which never decodes its messages, too)."""
    picture = "A" * LARGE_BODY
    turn = claude_code_turn(["look", "seen", "again"])
    turn["messages"][0]["content"].append({"type": "image", "source": {"type": "base64", "data": picture}})
    large = orjson.dumps({"model": "m", "max_tokens": 1, **turn})
    assert len(large) > LARGE_BODY
    ctx = decode_request("messages", "req", "/v1/messages", b"", [], large)
    assert ctx.prompt is not None and ctx.prompt.messages is not None
    assert prompt_prefix(ctx.prompt, ctx.body) == prefix_of(turn)

    def refusal(endpoint: Endpoint, messages: Any, padding: bytes = b"") -> str:
        body = orjson.dumps({"model": "m", "max_tokens": 1, "messages": messages})
        with pytest.raises(ApiError) as refused:
            decode_request(endpoint, "req", "/v1/messages", b"", [], body[:-1] + padding + b"}")
        assert refused.value.status == 400
        return refused.value.message

    for messages in ([{"content": "hi"}], [{"role": 1, "content": "hi"}], "x", None, {}, 3):
        small = refusal("messages", messages)
        assert small.startswith("Invalid request: messages")
        assert refusal("messages", messages, b" " * LARGE_BODY) == small
        if not isinstance(messages, list):
            assert refusal("count_tokens", messages) == small


def test_a_large_body_decodes_no_more_messages_than_the_prompt_analysis_takes() -> None:
    """Up to 250,000 messages (half a million commas) were decoded in a large body, ~70 ms and ~46 MB, then
    not analysed (more than MAX_UNITS)."""
    tiny = b'{"role":"user","content":0}'
    for count, decoded in ((breakpoints.MAX_UNITS, True), (breakpoints.MAX_UNITS + 1, False)):
        messages = b",".join([tiny] * count)
        padding = b" " * (LARGE_BODY - len(messages))
        body = b'{"model":"m","max_tokens":1,"messages":[' + messages + b"]," + padding + b'"stream":false}'
        ctx = decode_request("messages", "req", "/v1/messages", b"", [], body)
        assert ctx.prompt is not None and (ctx.prompt.messages is not None) is decoded


def test_the_unit_memo_stays_bounded_by_values_without_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty tools array has no units; spelt with ever other whitespace, each was a new memo entry that
    counted for nothing towards its bound."""
    monkeypatch.setattr(breakpoints, "_MEMO", breakpoints._UnitMemo(cap=20))
    turn = orjson.dumps({name: value for name, value in claude_code_turn(["hi"]).items() if name != "tools"})
    for spaces in range(100):
        raw = b'{"model":"m","max_tokens":1,"tools":[' + b" " * spaces + b"]," + turn[1:]
        ctx = decode_request("messages", "req", "/v1/messages", b"", [], raw)
        assert ctx.prompt is not None
        prompt_prefix(ctx.prompt, ctx.body)
    assert len(breakpoints._MEMO._units) <= 20


WORD_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"


@given(st.text(), st.sampled_from(WORD_CHARS), st.booleans(), st.booleans())
def test_only_a_word_character_spelled_as_an_escape_hides_words(
    text: str, char: str, upper: bool, literal_backslash: bool
) -> None:
    """What JSON encoders write of any text (quotes, backslashes and control characters escaped, non-ASCII
    ones escaped or not) never counts, also text that reads like an escape (`\\u0041`, encoded `\\\\u0041`);
    a letter, digit or underscore as `\\u00XX`, in either case of hex digit, always does, also after an
    escaped backslash."""
    escape = (f"\\u{ord(char):04X}" if upper else f"\\u{ord(char):04x}").encode()
    if literal_backslash:
        text += escape.decode()  # the text itself holds a backslash and `u00XX`
    assert not hides_words(orjson.dumps(text))
    assert not hides_words(json.dumps(text).encode())  # ensure_ascii: every non-ASCII character escaped
    assert orjson.loads(b'"' + escape + b'"') == char
    assert hides_words(orjson.dumps(text).replace(b'"', b'"' + escape, 1))
    assert hides_words(orjson.dumps(text).replace(b'"', b'"\\\\' + escape, 1))  # `\\` then the escape


def test_text_that_reads_like_escapes_is_told_from_escapes_without_a_step_each() -> None:
    """`hides_words` runs on every request's units, and over a whole body of megabytes: text reading like
    escapes (`\\u0041`, its backslash escaped) was checked one occurrence at a time in Python, which held the
    event loop for a second on a 30 MB body of it, and again for its message. Counted in lines of Python
    run, not in time: a handful, however many such texts the data holds."""
    lookalikes = b'"' + b"\\\\u0041 " * 10_000 + b'"'
    escape = lookalikes[:-1] + b'\\u0041"'
    # An escaped backslash never makes an escape of what surrounds it either (`\\u00` then `\\\\` then `41`).
    joined = lookalikes[:-1] + b'\\u00\\\\41"'
    # Nor does a run of them before an escape take a step per backslash.
    after_a_run = b'"' + b"\\\\" * 100_000 + b'\\u0041"'
    for data, hidden in ((lookalikes, False), (escape, True), (joined, False), (after_a_run, True)):
        lines = 0

        def trace(frame: FrameType, event: str, arg: object) -> Any:
            nonlocal lines
            lines += event == "line"
            return trace

        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            assert hides_words(data) is hidden
        finally:
            sys.settrace(previous)
        assert lines < 20

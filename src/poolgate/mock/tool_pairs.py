"""How the API pairs a conversation's tool calls with their results, and its 400s, word for word, for one that
breaks the pairing: every `tool_use` of an assistant turn answered by the `tool_result` blocks that open the next
user turn, and every `tool_result` answering a `tool_use` of the turn before it.

The wording and the rules are the API's answers as clients met them (Claude Code 2.1 matches these three messages
to tell its users what went wrong): a call without its result ("messages.22: `tool_use` ids were found without
`tool_result` blocks immediately after: toolu_01Hq…, toolu_01SJ…. Each `tool_use` block …", anthropics/claude-code
#5989), a result opening a conversation or answering no call of the turn before ("messages.0.content.0: unexpected
`tool_use_id` …", claude-code #14643, #13460), a text block before the results, which then do not come
"immediately after" (QwenLM/qwen-code #8165, checked against the API), one after the calls in the assistant's
own turn (a 400 recorded in anomalyco/opencode's packages/llm/test/fixtures, and luthien-proxy's regression test
of its #708), and a call id given twice ("messages.1.content.1: `tool_use` ids must be unique", Claude Code 2.1.19's
bug, claude-code #20901, #21317)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import takewhile
from typing import Any


@dataclass(slots=True)
class Turn:
    """Consecutive messages of one role as the one turn the API reads them as."""

    role: str
    at: int  # its index in the API's errors
    blocks: list[dict[str, Any]]  # its messages' content blocks, in order


def _turns(messages: Sequence[dict[str, Any]]) -> list[Turn]:
    """The conversation's turns: "Consecutive `user` or `assistant` turns in your request will be combined into a
    single turn" (the Messages API reference), so results split over two user messages answer one assistant turn;
    Claude Code's `system` messages passed over, which come between the turns of its own tool loops (its
    environment after the user's turn, a per-turn control before one); a string content the one text block it
    stands for. `messages` has passed `server._messages_refusal`."""
    found: list[Turn] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            continue
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if found and found[-1].role == role:
            found[-1].blocks.extend(blocks)
        else:
            found.append(Turn(role, len(found), list(blocks)))
    if found and found[0].role == "assistant":
        # The API counts a user turn before a conversation that opens with the assistant's: it answered one of
        # [assistant, user, user] with "messages.1: `tool_use` ids were found without …" (the opencode recording).
        for turn in found:
            turn.at += 1
    return found


def tool_pairing_refusal(messages: Sequence[dict[str, Any]]) -> str | None:
    """The API's 400 message for the first turn, in order, whose tool calls or results do not pair up; None when
    every one does. A final assistant turn's calls (a prefill) are left alone: what the API says of them is not
    known. A message thread's continue is checked with the conversation it continues before it."""
    conversation = _turns(messages)
    calls: list[tuple[int, str]] = []  # the turn before's, by their blocks' indices
    for index, turn in enumerate(conversation):
        if turn.role == "user":
            refusal = _unexpected_result(turn, {call for _, call in calls})
        else:
            calls = _calls(turn)
            after = conversation[index + 1] if index + 1 < len(conversation) else None
            refusal = _repeated_call(turn, calls) or (None if after is None else _unanswered_calls(turn, calls, after))
        if refusal is not None:
            return refusal
    return None


def _calls(turn: Turn) -> list[tuple[int, str]]:
    """The ids of a turn's `tool_use` blocks, each with its block's index (an id that is not a string, which the
    API's schema refuses before it pairs anything, left out: the mock checks no more of it)."""
    return [
        (index, call)
        for index, block in enumerate(turn.blocks)
        if block.get("type") == "tool_use" and isinstance(call := block.get("id"), str)
    ]


def _repeated_call(turn: Turn, calls: list[tuple[int, str]]) -> str | None:
    seen: set[str] = set()
    for index, call in calls:
        if call in seen:
            return f"messages.{turn.at}.content.{index}: `tool_use` ids must be unique"
        seen.add(call)
    return None


def _unanswered_calls(turn: Turn, calls: list[tuple[int, str]], after: Turn) -> str | None:
    """Only the calls that end the assistant's turn can be answered (a text after them, or a server tool's result,
    leaves them unanswered), and only by the results that open the user's turn."""
    answered = {
        answers for block in takewhile(_is_result, after.blocks) if isinstance(answers := block.get("tool_use_id"), str)
    }
    last = len(turn.blocks)
    while last and turn.blocks[last - 1].get("type") == "tool_use":
        last -= 1
    unanswered = [call for index, call in calls if index < last or call not in answered]
    if not unanswered:
        return None
    return (
        f"messages.{turn.at}: `tool_use` ids were found without `tool_result` blocks immediately after: "
        f"{', '.join(unanswered)}. Each `tool_use` block must have a corresponding `tool_result` block in the next "
        "message."
    )


def _unexpected_result(turn: Turn, calls: set[str]) -> str | None:
    for index, block in enumerate(turn.blocks):
        answers = block.get("tool_use_id")
        if isinstance(answers, str) and answers not in calls and _is_result(block):
            return (
                f"messages.{turn.at}.content.{index}: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{answers}. Each `tool_result` block must have a corresponding `tool_use` block in the previous "
                "message."
            )
    return None


def _is_result(block: dict[str, Any]) -> bool:
    return block.get("type") == "tool_result"

"""Claude Code auto mode's safety checks, as the API answers them for the mock: the server-side review of an answer's
tool calls that a request asks for (`safeguards` in, `safeguard_results` out), and the classifier requests Claude Code
sends itself when a session has no server-side review.

Claude Code 2.1.278 and later send, in auto mode, `safeguards: [{"type": "dangerous_tool_use", "classifier_context":
…}]` on every main-loop request under the beta `dangerous-tool-use-2026-09-03`, and read the verdicts back from
`safeguard_results` (a JSON answer's, or the stream's `message_delta.delta`'s). An answer without them makes it
classify locally for the rest of the session ("a completed response carried no classification result"), and in
`claude -p` refuse every action that needs a check. Without the beta the API runs no review (gateways that dropped
the beta but passed the field on saw sessions fall back: diegosouzapw/OmniRoute#14312), so the mock runs none either.

The verdicts' shape is the one Claude Code 2.1.332 validates: one result of type `dangerous_tool_use` whose status
is `available` with a verdict per `tool_use` id (`unsupported`: the API does not review this session, and Claude
Code classifies locally for the rest of it); a verdict `{"type": "evaluated", "outcome": "not_flagged"}` lets the
call run. The mock's tool calls are placeholders (`responses.tool_input`), so each one is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DANGEROUS_TOOL_USE = "dangerous_tool_use"
BETA = "dangerous-tool-use-2026-09-03"
ALLOWED: dict[str, Any] = {"type": "evaluated", "outcome": "not_flagged"}


def reviews_tool_calls(request: dict[str, Any], betas: str) -> bool:
    """Whether a request asks for its answer's tool calls to be reviewed: a `dangerous_tool_use` entry in its
    `safeguards`, under the beta (`betas` is its `anthropic-beta` header)."""
    safeguards = request.get("safeguards")
    if not isinstance(safeguards, list):  # every request but auto mode's: one lookup
        return False
    asked = any(isinstance(safeguard, dict) and safeguard.get("type") == DANGEROUS_TOOL_USE for safeguard in safeguards)
    return asked and BETA in (beta.strip() for beta in betas.split(","))


def safeguard_results(tool_uses: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The review of an answer whose tool calls are `tool_uses` (its `tool_use` blocks): each one allowed. An answer
    without any is reviewed too, with no verdicts: a completed answer without results is what makes Claude Code
    give up on the server's review."""
    verdicts = {tool_use["id"]: ALLOWED for tool_use in tool_uses}
    return [{"type": DANGEROUS_TOOL_USE, "status": {"type": "available", "tool_uses": verdicts}}]


# Claude Code's own classifier requests: their system prompt (after the attribution block) opens with this, and
# their last text says how to answer. 2.1.332 asks for a grade, `<severity>N</severity>` alone (0 to 100, 50 the
# boundary); earlier builds, and its `</block>`-stopped stage, for `<block>no</block>` or `<block>yes</block>…`.
# Any other answer fails closed: the action is blocked, or the user asked.
MONITOR = "You are a security monitor for autonomous AI coding agents."
GRADED = "<severity>N</severity>"
ALLOW_GRADE = "<severity>0</severity>"
ALLOW_BLOCK = "<block>no</block>"


def classifier_verdict(request: dict[str, Any]) -> str | None:
    """The answer that allows the action a classifier request asks about, in the form it asks for; None for any
    other request. `request` has passed `server._parse` (its system blocks and message contents are well-formed)."""
    system = request.get("system")
    if not isinstance(system, list) or not any(block["text"].startswith(MONITOR) for block in system):
        return None  # a string system prompt is never Claude Code's: it sends blocks
    return ALLOW_GRADE if GRADED in _closing_text(request["messages"]) else ALLOW_BLOCK


def _closing_text(messages: list[dict[str, Any]]) -> str:
    """The text that closes the conversation: where a classifier request says how to answer."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return next((block["text"] for block in reversed(content) if block.get("type") == "text"), "")

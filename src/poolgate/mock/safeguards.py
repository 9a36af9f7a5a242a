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
# Claude Code's review of what a subagent reports back: the conversation with the report as a prefilled tool call
# (`messages` ending in an assistant `tool_use`), `max_tokens: 0` (nothing is generated: the verdict on the
# prefilled call is the answer), under this beta besides BETA. Without it the API refuses a `max_tokens` of 0.
SUBAGENT_REVIEW_BETA = "subagent-review-2026-11-17"
ALLOWED: dict[str, Any] = {"type": "evaluated", "outcome": "not_flagged"}


def _has_beta(betas: str, name: str) -> bool:
    return name in (beta.strip() for beta in betas.split(","))


def reviews_only(betas: str) -> bool:
    """Whether a request may ask for a review alone (`max_tokens: 0`): under SUBAGENT_REVIEW_BETA."""
    return _has_beta(betas, SUBAGENT_REVIEW_BETA)


def reviews_tool_calls(request: dict[str, Any], betas: str) -> bool:
    """Whether a request asks for its answer's tool calls to be reviewed: a `dangerous_tool_use` entry in its
    `safeguards`, under the beta (`betas` is its `anthropic-beta` header)."""
    safeguards = request.get("safeguards")
    if not isinstance(safeguards, list):  # every request but auto mode's: one lookup
        return False
    asked = any(isinstance(safeguard, dict) and safeguard.get("type") == DANGEROUS_TOOL_USE for safeguard in safeguards)
    return asked and _has_beta(betas, BETA)


def reviewed_calls(request: dict[str, Any], tool_use: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The tool calls a review judges: those of a prefilled assistant turn the answer continues (a subagent's
    report, see SUBAGENT_REVIEW_BETA), then the answer's own (`tool_use`). `request` has passed `server._parse`."""
    last = request["messages"][-1]
    content = last["content"] if last["role"] == "assistant" else ()
    prefilled = [block for block in content if isinstance(block, dict) and block.get("type") == "tool_use"]
    return prefilled if tool_use is None else [*prefilled, tool_use]


def safeguard_results(tool_uses: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The review of the tool calls `tool_uses` (`reviewed_calls`): each one allowed. An answer without any is
    reviewed too, with no verdicts: a completed answer without results is what makes Claude Code give up on the
    server's review."""
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

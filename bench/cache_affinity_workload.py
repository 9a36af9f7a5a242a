"""The cache-affinity workload: Claude Code-like sessions, as bytes on the wire, from one seed.

Every session sends, in prefix order: ~15 tools with large `input_schema`s (identical in every session),
a system prompt of three text blocks (the short identity line and the shared instructions, identical in
every session, then a per-session environment + CLAUDE.md block), and a conversation that grows by one
assistant message (text + tool_use) and one user message (tool_result, sometimes a follow-up) per turn.
`cache_control` sits where Claude Code puts it: on the identity line, on the last system block, and on
the last block of the newest user message only (older turns lose theirs). The conversation is synthetic,
not the mock's answers, so every request is a strict extension of the previous one and each arm sends
exactly the same bytes.
"""

from __future__ import annotations

import copy
import random
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

MODEL = "claude-sonnet-4-6"  # priced in prices.md and served by the mock (DEFAULT_MODELS)
MAX_TOKENS = 64
EPHEMERAL = {"type": "ephemeral"}
BETAS = (
    "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14,"
    "context-management-2025-06-27,context-1m-2025-08-07,effort-2025-11-24,structured-outputs-2025-11-13"
)
TOOL_NAMES = (
    "Task",
    "Bash",
    "Glob",
    "Grep",
    "ExitPlanMode",
    "Read",
    "Edit",
    "Write",
    "NotebookEdit",
    "WebFetch",
    "TodoWrite",
    "WebSearch",
    "BashOutput",
    "KillShell",
    "SlashCommand",
)
_VOCABULARY = (
    "file path pattern search result command output directory repository branch commit test module "
    "function class variable parameter value option default string number boolean array object error "
    "warning message line column offset limit timeout background shell process session context prompt "
    "agent task todo status pending completed edit replace insert delete notebook cell markdown glob grep "
    "regex match case sensitive multiline include exclude type language python typescript rust config"
)
WORDS = tuple(_VOCABULARY.split())


def _prose(rng: random.Random, size: int) -> str:
    """Deterministic filler text of about `size` bytes."""
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def _tool(rng: random.Random, name: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for index in range(rng.randint(4, 7)):
        field = f"{rng.choice(WORDS)}_{index}"
        kind = rng.choice(("string", "number", "boolean", "array"))
        prop: dict[str, Any] = {"type": kind, "description": _prose(rng, rng.randint(80, 220))}
        if kind == "array":
            prop["items"] = {"type": "string"}
        properties[field] = prop
    return {
        "name": name,
        "description": _prose(rng, rng.randint(300, 500)),
        "input_schema": {
            "type": "object",
            "properties": properties,
            "required": sorted(properties)[:2],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    }


@dataclass(frozen=True)
class Request:
    """One turn of one session: the body as sent, and the headers that identify the session."""

    session: int
    turn: int
    body: bytes
    session_id: str


@dataclass(frozen=True)
class Workload:
    sessions: int
    turns: int
    requests: tuple[tuple[Request, ...], ...]  # [session][turn]

    def body_bytes(self) -> tuple[int, int]:
        """Smallest and largest request body."""
        sizes = [len(request.body) for turns in self.requests for request in turns]
        return min(sizes), max(sizes)


def _user_id(rng: random.Random, session_id: str | None) -> str:
    data: dict[str, str] = {
        "device_id": rng.randbytes(32).hex(),
        "account_uuid": str(uuid.UUID(int=rng.getrandbits(128))),
    }
    if session_id is not None:
        data["session_id"] = session_id
    return orjson.dumps(data).decode()


def _without_cache_control(message: dict[str, Any]) -> dict[str, Any]:
    content = [{key: value for key, value in block.items() if key != "cache_control"} for block in message["content"]]
    return {"role": message["role"], "content": content}


def _marked(message: dict[str, Any]) -> dict[str, Any]:
    """The newest user message, with `cache_control` on its last block (as Claude Code sends it)."""
    marked = copy.deepcopy(message)
    marked["content"][-1]["cache_control"] = EPHEMERAL
    return marked


def _turn_messages(rng: random.Random, turn: int) -> list[dict[str, Any]]:
    """The assistant message that answered the previous turn and the user message that follows it."""
    tool_id = f"toolu_{rng.randbytes(12).hex()}"
    tool = rng.choice(("Read", "Grep", "Bash", "Glob", "Edit"))
    assistant = {
        "role": "assistant",
        "content": [
            {"type": "text", "text": _prose(rng, rng.randint(150, 500))},
            {"type": "tool_use", "id": tool_id, "name": tool, "input": {"file_path": f"/repo/src/m{turn}.py"}},
        ],
    }
    content: list[dict[str, Any]] = [
        {"type": "tool_result", "tool_use_id": tool_id, "content": _prose(rng, rng.randint(1500, 5000))}
    ]
    if rng.random() < 0.25:
        content.append({"type": "text", "text": _prose(rng, rng.randint(60, 300))})
    return [assistant, {"role": "user", "content": content}]


def build(sessions: int, turns: int, seed: int, anonymous: bool = False) -> Workload:
    """`anonymous`: leave the session out of `metadata.user_id` (for a router that cannot turn stickiness off;
    the caller then also leaves out the session header)."""
    shared = random.Random(seed)
    tools = [_tool(shared, name) for name in TOOL_NAMES]
    identity = {
        "type": "text",
        "text": "You are Claude Code, Anthropic's official CLI for Claude.",
        "cache_control": EPHEMERAL,
    }
    instructions = {"type": "text", "text": _prose(shared, 9000)}
    requests: list[tuple[Request, ...]] = []
    for index in range(sessions):
        rng = random.Random(f"{seed}/{index}")
        session_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        environment = f"<env>Working directory: /home/dev/project-{index}</env>\n# CLAUDE.md\n{_prose(rng, 3000)}"
        system = [identity, instructions, {"type": "text", "text": environment, "cache_control": EPHEMERAL}]
        first_user = {
            "role": "user",
            "content": [
                {"type": "text", "text": f"<system-reminder>{_prose(rng, 600)}</system-reminder>"},
                {"type": "text", "text": _prose(rng, rng.randint(100, 400))},
            ],
        }
        user_id = _user_id(rng, None if anonymous else session_id)
        history: list[dict[str, Any]] = []
        newest = first_user
        session_requests: list[Request] = []
        for turn in range(turns):
            if turn:
                history.append(_without_cache_control(newest))
                assistant, newest = _turn_messages(rng, turn)
                history.append(assistant)
            body: dict[str, Any] = {
                "model": MODEL,
                "max_tokens": MAX_TOKENS,
                "stream": True,
                "metadata": {"user_id": user_id},
                "system": system,
                "tools": tools,
                "messages": [*history, _marked(newest)],
            }
            session_requests.append(Request(index, turn, orjson.dumps(body), session_id))
        requests.append(tuple(session_requests))
    return Workload(sessions, turns, tuple(requests))


def headers(api_key: str, session_id: str | None) -> dict[str, str]:
    """What Claude Code 2.1 sends besides the body (no session header when session_id is None)."""
    sent = {
        "x-api-key": api_key,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": BETAS,
        "content-type": "application/json",
        "x-app": "cli",
        "user-agent": "claude-cli/2.1.0 (external, cli)",
        "accept": "application/json",
    }
    if session_id is not None:
        sent["x-claude-code-session-id"] = session_id
    return sent

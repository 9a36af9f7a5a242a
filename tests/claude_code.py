"""A realistic Claude Code request, built from the public API reference with placeholder text.

Shape as Claude Code 2.x sends it: `?beta=true`, a system array whose blocks carry `cache_control`, a dozen
tools with sizeable input schemas, `metadata.user_id` as a JSON string holding the session id,
`thinking`, fields the gateway does not know (`context_management`, `output_config`), a `role: "system"`
message, and the CLI's headers.
"""

from __future__ import annotations

import json

SESSION_ID = "5f0c3f6e-2a8b-4c1d-9e7f-0123456789ab"
TOOL_NAMES = (
    "Bash",
    "Glob",
    "Grep",
    "Read",
    "Edit",
    "Write",
    "NotebookEdit",
    "WebFetch",
    "WebSearch",
    "TodoWrite",
    "Task",
    "ExitPlanMode",
)


def tool(name: str) -> dict[str, object]:
    return {
        "name": name,
        "description": f"Placeholder description of the {name} tool. " * 30,
        "input_schema": {
            "type": "object",
            "$schema": "http://json-schema.org/draft-07/schema#",
            "additionalProperties": False,
            "properties": {
                f"param_{i}": {"type": "string", "description": f"Placeholder parameter {i} of {name}. " * 4}
                for i in range(6)
            },
            "required": ["param_0"],
        },
    }


# Claude Code's attribution block: its suffix is derived from the conversation, so it differs between sessions.
BILLING = "x-anthropic-billing-header: cc_version=2.1.0.a1b; cc_entrypoint=cli;"


def body(
    stream: bool = True, billing: str = BILLING, session_id: str = SESSION_ID, prompt: str = "Please say hi."
) -> bytes:
    payload = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 32000,
        "stream": stream,
        "system": [
            {"type": "text", "text": billing},
            {
                "type": "text",
                "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"},
            },
            {
                "type": "text",
                "text": "Placeholder instructions about tone, tools and safety. " * 400,
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "tools": [tool(name) for name in TOOL_NAMES],
        "messages": [
            {"role": "system", "content": "Placeholder system reminder from a newer beta."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>Placeholder context.</system-reminder>"},
                    {"type": "text", "text": prompt, "cache_control": {"type": "ephemeral"}},
                ],
            },
        ],
        "metadata": {
            "user_id": json.dumps(
                {"device_id": "0" * 64, "account_uuid": "", "session_id": session_id}, separators=(",", ":")
            )
        },
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "temperature": 1,
    }
    # Claude Code's JSON has its own key order and spacing; the gateway must not normalise it.
    return json.dumps(payload, indent=None, separators=(", ", ": ")).encode()


def headers(key: str, session_id: str = SESSION_ID) -> dict[str, str]:
    return {
        "x-api-key": key,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14,"
        "context-management-2025-06-27,effort-2025-11-24",
        "anthropic-dangerous-direct-browser-access": "true",
        "X-Claude-Code-Session-Id": session_id,
        "x-app": "cli",
        "User-Agent": "claude-cli/2.1.0 (external, cli)",
        "X-Stainless-Lang": "js",
        "X-Stainless-Package-Version": "0.70.0",
        "X-Stainless-Retry-Count": "0",
        "X-Stainless-Timeout": "600",
        "Accept": "application/json",
        "Accept-Encoding": "gzip, deflate, br, zstd",
        "Connection": "keep-alive",
        "content-type": "application/json",
    }

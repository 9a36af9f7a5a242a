"""The dialect of Claude subscription (OAuth) accounts.

Two things differ from API-key traffic:
- the OAuth beta flag must be in `anthropic-beta` (merged with the client's flags, none dropped);
- subscription tokens are only accepted for Claude Code-shaped requests, whose system prompt starts with
  Claude Code's identity block (after an optional `x-anthropic-billing-header` block). A client that is not
  Claude Code gets that block prepended; a request that already has it is forwarded byte for byte, since
  its billing block may carry a hash over the body.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

OAUTH_BETA = "oauth-2025-04-20"
CLAUDE_CODE_IDENTITY = "You are Claude Code, Anthropic's official CLI for Claude."
AGENT_SDK_IDENTITY = "You are a Claude agent, built on Anthropic's Claude Agent SDK."
# Prefixes, without the final period: variants such as "…CLI for Claude, running within the Claude Agent
# SDK." are Claude Code too.
IDENTITY_PREFIXES = (CLAUDE_CODE_IDENTITY[:-1], AGENT_SDK_IDENTITY[:-1])
BILLING_PREFIX = "x-anthropic-billing-header:"


def merge_beta(headers: Iterable[tuple[str, str]], flag: str = OAUTH_BETA) -> list[tuple[str, str]]:
    """One `anthropic-beta` header: the client's flags in their order, without duplicates, plus `flag`."""
    flags: list[str] = []
    others: list[tuple[str, str]] = []
    for name, value in headers:
        if name.lower() == "anthropic-beta":
            for part in value.split(","):
                part = part.strip()
                if part and part not in flags:
                    flags.append(part)
        else:
            others.append((name, value))
    if flag not in flags:
        flags.append(flag)
    others.append(("anthropic-beta", ",".join(flags)))
    return others


class _SystemOnly(msgspec.Struct):
    # Only `system` is decoded; msgspec skips every other field (messages, tools) without building objects.
    system: Any = None


_decoder = msgspec.json.Decoder(_SystemOnly)
_any = msgspec.json.Decoder()
_members = msgspec.json.Decoder(dict[str, msgspec.Raw])


def _text_of(block: object) -> str | None:
    if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
        return block["text"]
    return None


def is_claude_code_system(system: object) -> bool:
    """Whether a request's `system` starts the way Claude Code's does."""
    if isinstance(system, str):
        return system.startswith(IDENTITY_PREFIXES)
    if not isinstance(system, list) or not system:
        return False
    first = _text_of(system[0])
    if first is not None and first.startswith(BILLING_PREFIX) and len(system) > 1:
        first = _text_of(system[1])
    return first is not None and first.startswith(IDENTITY_PREFIXES)


def _well_formed_system(system: object) -> bool:
    """Whether the API would take `system` as it is: none, a string or a list of text blocks."""
    if system is None or isinstance(system, str):
        return True
    return isinstance(system, list) and all(_text_of(block) is not None for block in system)


def with_identity(system: str | list[Any] | None) -> list[Any]:
    identity = {"type": "text", "text": CLAUDE_CODE_IDENTITY}
    if isinstance(system, str):
        return [identity, {"type": "text", "text": system}] if system else [identity]
    if system is None:
        return [identity]
    first = _text_of(system[0]) if system else None
    if first is not None and first.startswith(BILLING_PREFIX):
        return [system[0], identity, *system[1:]]
    return [identity, *system]


def apply_identity(body: bytes, raw_system: msgspec.Raw | None = None) -> bytes:
    """The body with Claude Code's identity block first in `system`; the same object when it has it.

    A body that is not a JSON object, or whose `system` the API would refuse, is left alone: the upstream
    will say what is wrong with it, as it would to an API key (an object `system` was replaced by the block,
    the client's prompt silently gone, and a bad entry's index in the 400 was one past the client's).
    `raw_system`: the body's `system` where the request's decoding found it already (an empty Raw: none), so
    that only it is decoded here, not the whole body again.
    """
    if not body:
        return body
    try:
        system = _system_of(body, raw_system)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return body
    if is_claude_code_system(system) or not _well_formed_system(system):
        return body
    try:
        # The other members stay the bytes the client sent: decoded and written again, an integer past 64 bits
        # in a tool's schema came out a float (`1e+20`), and every number, escape and space as orjson writes it.
        members = _members.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return body
    members["system"] = msgspec.Raw(msgspec.json.encode(with_identity(system)))
    return msgspec.json.encode(members)


def _system_of(body: bytes, raw_system: msgspec.Raw | None) -> Any:
    if raw_system is None:
        return _decoder.decode(body).system
    return _any.decode(raw_system) if raw_system else None


def oauth_headers(headers: Iterable[tuple[str, str]], access_token: str) -> tuple[tuple[str, str], ...]:
    """The shaped headers signed for a subscription account: Bearer token, no API key, the OAuth beta."""
    kept = [(name, value) for name, value in headers if name.lower() not in ("authorization", "x-api-key")]
    merged = merge_beta(kept)
    if not any(name.lower() == "anthropic-version" for name, _ in merged):
        merged.append(("anthropic-version", "2023-06-01"))
    merged.append(("authorization", f"Bearer {access_token}"))
    return tuple(merged)

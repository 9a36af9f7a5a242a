"""Prompt-cache simulation for one API key, with the real API's rules.

Blocks in prefix order: tools → system (less Claude Code's attribution block) → each message's content
blocks. A block with `cache_control` is a breakpoint, and so is the last block when the request itself has
one (automatic caching); the entry written there covers every block up to it.
A lookup at a breakpoint also finds an entry written at an earlier block boundary, up to 20 blocks back, so
a growing conversation keeps hitting what its previous turn wrote. Prefixes under the minimum size are not
cached at all. Hits refresh the TTL. The messages' entries are also keyed on the request's thinking settings
and `tool_choice`, which the API's "what invalidates the cache" table lists for the messages (not the tools or
system prompt).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import orjson

from poolgate.mock.tokens import block_estimate, estimate

LOOKBACK_BLOCKS = 20
MAX_BREAKPOINTS = 4  # the API refuses a request with more
# Claude Code's attribution block opens its system prompt with this.
BILLING_PREFIX = "x-anthropic-billing-header:"
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
INVALID_TTL = "invalid"  # a `ttl` the API refuses (see `server._cache_control_refusal`): never cached


@dataclass(frozen=True, slots=True)
class Block:
    prefix_hash: bytes
    prefix_tokens: int
    ttl: str | None  # set on breakpoints


@dataclass(slots=True)
class CacheUsage:
    input_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_5m: int = 0
    cache_creation_1h: int = 0

    @property
    def cache_creation_input_tokens(self) -> int:
        return self.cache_creation_5m + self.cache_creation_1h


def _canonical(block: Any) -> bytes:
    if isinstance(block, dict) and "cache_control" in block:
        block = {key: value for key, value in block.items() if key != "cache_control"}
    try:
        return orjson.dumps(block, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # nested deeper than orjson writes (254 levels), which the API takes: a 500 took the pool down
        try:
            return json.dumps(block, sort_keys=True).encode()
        except RecursionError:  # deeper still: a block that is never a cache hit, rather than a 500
            return b"\x00unserialisable:%d" % id(block)


def _ttl(block: Any) -> str | None:
    if not isinstance(block, dict):
        return None
    control = block.get("cache_control")
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        return None
    ttl = control.get("ttl", "5m")
    return ttl if isinstance(ttl, str) and ttl in TTL_SECONDS else INVALID_TTL


def _attribution(block: Any) -> bool:
    return isinstance(block, dict) and isinstance(text := block.get("text"), str) and text.startswith(BILLING_PREFIX)


def _prefix_blocks(request: dict[str, Any]) -> list[Any]:
    """The tools' and system prompt's blocks, which the messages' follow in the prefix."""
    blocks: list[Any] = []
    tools = request.get("tools")
    if isinstance(tools, list):
        blocks.extend(tools)
    system = request.get("system")
    if isinstance(system, str):
        blocks.append({"type": "text", "text": system})
    elif isinstance(system, list):
        # Claude Code's attribution block changes between sessions (older versions: between requests); the
        # API leaves it out of the cached prefix, and counts it as input (`attribution_tokens`).
        blocks.extend(block for block in system if not _attribution(block))
    return blocks


def _message_blocks(request: dict[str, Any]) -> list[Any]:
    """Each message's content blocks, in order."""
    blocks: list[Any] = []
    for message in request.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            blocks.extend(content)
        elif isinstance(content, str):
            # A string is one text block to the API: Claude Code sends its newest turn as a marked block and
            # replays it as a string in the next request, which reads what the first wrote.
            blocks.append({"type": "text", "text": content})
        else:
            blocks.append({"role": message.get("role"), "content": content})
    return blocks


def _message_settings(request: dict[str, Any]) -> bytes:
    """What the messages' entries are keyed on besides their blocks: a change of the thinking settings (on or
    off, adaptive, a budget) or of `tool_choice` leaves the tools and system prompt cached and the messages not."""
    return _canonical([request.get("thinking"), request.get("tool_choice")])


def attribution_tokens(request: dict[str, Any]) -> int:
    """The tokens of Claude Code's attribution block: left out of the cached prefix, billed as input."""
    system = request.get("system")
    if not isinstance(system, list):
        return 0
    return sum(estimate(_canonical(block)) for block in system if _attribution(block))


def blocks_of(request: dict[str, Any]) -> list[Block]:
    """Running prefix hashes and token counts at every block boundary, the breakpoints marked."""
    running = hashlib.blake2b(digest_size=16)
    tokens = 0
    blocks = []
    prefix = _prefix_blocks(request)
    for at, raw in enumerate(prefix + _message_blocks(request)):
        if at == len(prefix):
            running.update(_message_settings(request))
        canonical = _canonical(raw)
        running.update(canonical)
        tokens += block_estimate(canonical)
        blocks.append(Block(running.copy().digest(), tokens, _ttl(raw)))
    # Automatic caching: a request-level `cache_control` is a breakpoint at the last block, which moves on
    # with the conversation (a block's own marker there takes its place).
    automatic = _ttl(request)
    if automatic is not None and blocks and blocks[-1].ttl is None:
        blocks[-1] = replace(blocks[-1], ttl=automatic)
    return blocks


def _breakpoints(blocks: list[Block]) -> list[int]:
    return [i for i, block in enumerate(blocks) if block.ttl is not None]


class PromptCache:
    """One key's cache: prefix hash → (expiry, ttl), least recently used evicted past the cap."""

    def __init__(self, min_tokens: int, cap: int) -> None:
        self._min_tokens = min_tokens
        self._cap = cap
        self._entries: OrderedDict[bytes, tuple[float, str]] = OrderedDict()

    def _alive(self, prefix_hash: bytes, now: float) -> bool:
        entry = self._entries.get(prefix_hash)
        if entry is None:
            return False
        if entry[0] <= now:
            del self._entries[prefix_hash]
            return False
        return True

    def _write(self, prefix_hash: bytes, ttl: str, now: float) -> None:
        self._entries[prefix_hash] = (now + TTL_SECONDS[ttl], ttl)
        self._entries.move_to_end(prefix_hash)
        while len(self._entries) > self._cap:
            self._entries.popitem(last=False)

    def use(self, blocks: list[Block], total_tokens: int, now: float | None = None) -> CacheUsage:
        """The usage of a prompt of `blocks` (see `blocks_of`), the cache updated for it."""
        now = time.monotonic() if now is None else now
        breakpoints = _breakpoints(blocks)
        if not breakpoints or blocks[breakpoints[-1]].prefix_tokens < self._min_tokens:
            return CacheUsage(input_tokens=total_tokens)
        last = breakpoints[-1]
        hit = self._lookup(blocks, breakpoints, now)
        read = blocks[hit].prefix_tokens if hit is not None else 0
        if hit is not None:
            self._write(blocks[hit].prefix_hash, self._entries[blocks[hit].prefix_hash][1], now)
        usage = CacheUsage(input_tokens=max(0, total_tokens - blocks[last].prefix_tokens), cache_read_input_tokens=read)
        covered = read
        for index in breakpoints:
            block = blocks[index]
            if hit is not None and index <= hit:
                continue
            if block.prefix_tokens >= self._min_tokens:
                self._write(block.prefix_hash, block.ttl or "5m", now)
            written = max(0, block.prefix_tokens - covered)
            covered = max(covered, block.prefix_tokens)
            if block.ttl == "1h":
                usage.cache_creation_1h += written
            else:
                usage.cache_creation_5m += written
        return usage

    def readable(self, blocks: list[Block], now: float) -> int:
        """The prompt tokens a request of `blocks` would read from the cache now (none is written)."""
        hit = self._lookup(blocks, _breakpoints(blocks), now)
        return blocks[hit].prefix_tokens if hit is not None else 0

    def _lookup(self, blocks: list[Block], breakpoints: list[int], now: float) -> int | None:
        """The longest cached prefix reachable from any breakpoint (each looks back 20 blocks)."""
        for index in reversed(breakpoints):
            for candidate in range(index, max(-1, index - LOOKBACK_BLOCKS - 1), -1):
                if self._alive(blocks[candidate].prefix_hash, now):
                    return candidate
        return None

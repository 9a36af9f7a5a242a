"""A request's cache breakpoints: where the upstream may cache its prompt, and a hash of each prefix.

The cacheable prefix runs tools → system → messages, block by block. Every `cache_control` marker is a
breakpoint; a request without markers gets inferred ones (the end of the system prompt, the last user
turn) that matter for providers that cache prefixes by themselves. Each breakpoint carries the hashes of
the block boundaries up to 20 blocks before it, because a lookup at a breakpoint also finds an entry
written at such an earlier boundary: that is how a growing conversation keeps hitting the cache its
previous turn wrote.

Hashes run over the bytes as the client sent them, minus the `cache_control` markers (a marker moves to
the newest turn on every request; the prefix before it is unchanged). One client serialises the same
block to the same bytes, which is all that is needed to recognise its own prefix on the next turn, but for
one thing: a message of one text block hashes as that text given as a string (Claude Code replays its
newest turn, sent as a marked block, as a string). Claude Code's attribution block
(`x-anthropic-billing-header: …`) is left out, as the API leaves it out.

Tools and system blocks are hashed block by block; a message is hashed as one unit (a client marks the
last block of a turn, and the turn must hash the same once its marker has moved on), which also keeps
long conversations cheap. "Block index" and the 20-block look-back count these units.

The API keys the messages' entries on the request's thinking settings and `tool_choice` too (its table of
what invalidates the cache: a change of either leaves the tools and system prompt cached, not the
messages), so the hashes of message boundaries are keyed on them as well (`_messages_chain`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, TypeVar

import msgspec
from xxhash import xxh3_128_digest

from poolgate.api.escapes import hides_words
from poolgate.api.images import NO_IMAGES, ImageLoad, images_in_content
from poolgate.api.model_ids import snapshot
from poolgate.upstreams.dialects.anthropic_oauth import BILLING_PREFIX

TtlClass = Literal["5m", "1h"]
Source = Literal["tools", "system", "messages"]

LOOKBACK_BLOCKS = 20
MAX_BREAKPOINTS = 4
BYTES_PER_TOKEN = 4
# Units one part of a request (its tools, system blocks, messages) may have: far more than any real prompt has
# (Claude Code: tens of tools, a few system blocks, hundreds of turns), few enough that analysing one is
# quick. A request with more is routed by its size alone: a body of millions of one-byte blocks took seconds
# of the event loop, every caller's, and its units stayed in the memos (gigabytes).
MAX_UNITS = 10_000
# Commas in a tools or system array beyond which it is taken to have too many blocks without decoding it
# (decoding millions of one-byte blocks takes a second and a gigabyte; half a million, ~30 ms and ~35 MB): a
# real one has tens of commas a block (Claude Code's tools: ~40); a system prompt of several MB of CSV would.
MAX_COMMAS = 50 * MAX_UNITS

_MARKER = b'"cache_control"'
# `"cache_control": {...}` with the comma that joins it to its neighbour; the object is flat.
_AFTER_COMMA = re.compile(rb',\s*"cache_control"\s*:\s*(\{[^{}]*\}|null)')
_BEFORE_COMMA = re.compile(rb'"cache_control"\s*:\s*(\{[^{}]*\}|null)\s*,?')
_ONE_HOUR = re.compile(rb'"ttl"\s*:\s*"1h"')
_EPHEMERAL = re.compile(rb'"type"\s*:\s*"ephemeral"')
# Claude Code's attribution block, first in its system prompt: its text changes from session to session
# (older versions: from request to request), and the API takes it out before caching (else no Claude Code
# turn would ever hit), so it is no part of the cacheable prefix here either. Forwarded untouched.
_BILLING_TEXT = rb'"text"\s*:\s*"' + re.escape(BILLING_PREFIX.encode())
_BILLING = re.compile(_BILLING_TEXT)
# The block as Claude Code sends it, opening the system array: what the memo of heads leaves out of its key,
# so that sessions (or, with older versions, requests) that differ in it alone share their head.
_OPENING_BILLING = re.compile(rb'\[\s*\{\s*"type"\s*:\s*"text"\s*,\s*' + _BILLING_TEXT + rb'(?:[^"\\]|\\.)*"\s*\}\s*,?')


class PromptMessage(msgspec.Struct):
    role: str
    content: msgspec.Raw


class PromptFields(msgspec.Struct):
    """The parts of a Messages request that make up its cacheable prefix, undecoded."""

    tools: msgspec.Raw = msgspec.Raw()
    # An empty Raw stands for "absent" (msgspec cannot decode `Raw | None`).
    system: msgspec.Raw = msgspec.Raw()
    # None: too many to decode (see `api.anthropic.LARGE_BODY`), not analysed.
    messages: list[PromptMessage] | None = []
    cache_control: msgspec.Raw = msgspec.Raw()  # request-level (automatic) caching
    # What the messages' cache entries are keyed on besides their blocks (see `_messages_chain`).
    thinking: msgspec.Raw = msgspec.Raw()
    tool_choice: msgspec.Raw = msgspec.Raw()


_BLOCKS = msgspec.json.Decoder(list[msgspec.Raw])


@dataclass(frozen=True, slots=True)
class CacheBreakpoint:
    block_index: int
    source: Source
    prefix_hash: bytes
    prefix_token_count: int
    ttl: TtlClass
    explicit: bool
    # (prefix hash, prefix tokens) at this block and at up to 20 boundaries before it, newest first.
    lookback: tuple[tuple[bytes, int], ...]


class PromptPrefix(msgspec.Struct, frozen=True, gc=False):
    """What the cache model needs from one request. (A Struct: one per request, made in C.)"""

    breakpoints: tuple[CacheBreakpoint, ...]
    prompt_tokens: int
    # Every boundary a lookup at some breakpoint visits (see `looked_back`): walked by routing and again
    # when the answer is seen, so laid out once.
    lookups: tuple[tuple[bytes, int], ...] = ()
    # Some marker asks for the 1-hour TTL, also one that a later marker of the same message overrides as
    # that message's breakpoint, or may (a unit that `hides_words`): a cost estimate must allow for a 1-hour
    # write (see `cache_write_ttl`).
    one_hour: bool = False
    # The tools' digest, where the analysis took one (marked requests): what the budget estimate's memo of
    # web searches is keyed by (see `estimate_web_searches`), a Claude Code request's tools hashed once.
    tools_digest: bytes = b""
    # The body has no `"cache_control"` at all (as written: see `hides_words`), so it was not analysed.
    unmarked: bool = False
    # The images of its messages, counted in `prompt_tokens` at the most each costs (see `api.images`); None:
    # not looked for (a prompt not analysed, whose tokens are its size: looking for them in an unmarked body was
    # another scan of all of it, ~100 µs for 200 KB, on every request without cache markers).
    images: ImageLoad | None = None

    @property
    def cacheable_tokens(self) -> int:
        return self.breakpoints[-1].prefix_token_count if self.breakpoints else 0

    @property
    def marked(self) -> bool:
        """The client asked for caching (`cache_control` markers, or the request-level one)."""
        return bool(self.breakpoints) and self.breakpoints[-1].explicit


EMPTY_PREFIX = PromptPrefix((), 0, images=NO_IMAGES)


# A hashed unit of the prefix (a tools or system block, or a whole message): the digest of its bytes
# without markers, its size in tokens, the TTL its (last) marker asks for (None: no marker), whether any
# of its markers asks for 1 hour, and its images (a message's).
_Unit = tuple[bytes, int, "TtlClass | None", bool, ImageLoad]
# A block that is not part of the prefix (`_BILLING`).
_OUTSIDE: _Unit = (b"", 0, None, False, NO_IMAGES)


def marker_ttl(control: bytes) -> TtlClass | None:
    """The TTL class a `cache_control` value asks for; None when it is not an ephemeral marker."""
    if not _EPHEMERAL.search(control):
        return None
    return "1h" if _ONE_HOUR.search(control) else "5m"


def unmarked(raw: bytes) -> tuple[bytes, TtlClass | None]:
    """The bytes without any `cache_control`, and the TTL the last marker asked for (None: no marker)."""
    if raw.find(_MARKER) < 0:  # `find`: see `lifecycle.usage` (bytes' `in` costs an exception raised and cleared)
        return raw, None
    ttl: TtlClass | None = None
    for pattern in (_AFTER_COMMA, _BEFORE_COMMA):
        # The matches cut out in the one pass that reads their TTLs: `pattern.sub` searched the value again, and
        # slowly (~5 ms for a turn holding a 4 MB screenshot, where the search takes ~1 ms).
        kept, at, whole = [], 0, memoryview(raw)
        for match in pattern.finditer(raw):
            ttl = marker_ttl(match.group(1)) or ttl
            kept.append(whole[at : match.start()])
            at = match.end()
        if kept:
            kept.append(whole[at:])
            raw = b"".join(kept)
    return raw, ttl


class _TextBlock(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    text: msgspec.Raw


_TEXT_BLOCKS = msgspec.json.Decoder(list[_TextBlock])


def as_text(content: bytes) -> bytes:
    """A message's content (markers removed) as the API caches it: one text block is that text given as a
    string. Claude Code sends its newest turn as a marked text block and replays it as a plain string in the
    next request, which reads the cache the first wrote; hashed as sent, the two never matched."""
    if content[:1] != b"[":
        return content
    try:
        blocks = _TEXT_BLOCKS.decode(content)
    except (msgspec.DecodeError, RecursionError):  # not one plain text block (a ValidationError is a DecodeError)
        return content
    return bytes(blocks[0].text) if len(blocks) == 1 and blocks[0].type == "text" else content


class TooManyUnits(Exception):
    """More than MAX_UNITS units in one request: not analysed."""


_V = TypeVar("_V")


class _SizedMemo(dict[bytes, _V]):
    """A memo cleared when full: at most `entries` values (values that hold nothing, `[ ]` in ever other
    whitespace, count too), and `size` in all, a value's size being what it holds. A miss only costs the
    work again. Read it as the dict it is; `put` adds."""

    def __init__(self, entries: int, size: int) -> None:
        super().__init__()
        self.entries, self.size, self.held = entries, size, 0

    def put(self, key: bytes, value: _V, size: int) -> None:
        if len(self) >= self.entries or self.held + size > self.size:
            self.clear()
        self[key] = value
        self.held += size

    def clear(self) -> None:
        super().clear()
        self.held = 0


class _UnitMemo:
    """Raw value digest → its units. Every turn of a conversation resends all earlier turns, tools and
    system byte for byte; hashing a value is ten times cheaper than scanning it for markers, so each value
    is scanned once. Bounded by the units it holds (a value may be thousands): cleared when full (a miss only
    costs one scan)."""

    def __init__(self, cap: int = 200_000) -> None:
        self._units: _SizedMemo[tuple[_Unit, ...]] = _SizedMemo(cap, cap)

    def units(self, value: bytes | msgspec.Raw, split: bool) -> tuple[_Unit, ...]:
        # A Raw value hashes without a copy: only a miss needs its bytes. The same bytes split into blocks
        # (tools, system) and whole (a message's content) are different units.
        key = xxh3_128_digest(value) + (b"s" if split else b"w")
        found = self._units.get(key)
        if found is None:
            raw = bytes(value)
            stripped = raw.lstrip()
            parts: list[msgspec.Raw] | list[bytes]
            if split and stripped[:1] == b"[":
                if stripped.count(b",") > MAX_COMMAS:
                    raise TooManyUnits
                parts = _BLOCKS.decode(stripped)
                if len(parts) > MAX_UNITS:
                    raise TooManyUnits
            else:
                parts = [raw]
            found = tuple(
                _OUTSIDE if split and _BILLING.search(part) else self._unit(part, message=not split)
                for part in map(bytes, parts)
            )
            self._units.put(key, found, len(found))
        return found

    @staticmethod
    def _unit(raw: bytes, message: bool = False) -> _Unit:
        data, ttl = unmarked(raw)
        images = NO_IMAGES
        if message:
            data = as_text(data)
            images = images_in_content(raw)
        # A marker may be hidden behind escapes: its TTL unreadable, or the marker itself unseen.
        one_hour = ttl == "1h" or (ttl is not None and _ONE_HOUR.search(raw) is not None) or hides_words(raw)
        return xxh3_128_digest(data), images.tokens(len(data), BYTES_PER_TOKEN), ttl, one_hour, images


_MEMO = _UnitMemo()


class _Head:
    """A request's tools and system blocks as units, with the chained hash and running token count at each
    of their boundaries. Every request of a client sends the same ones (every Claude Code session the same
    tools and system prompt), so they are worked out once; only the messages are new per request."""

    __slots__ = ("boundaries", "digests", "one_hour", "sources", "tokens", "tools_digest", "ttls")

    def __init__(self, fields: PromptFields, tools_digest: bytes, seed: bytes) -> None:
        self.tools_digest = tools_digest
        self.digests: list[bytes] = []
        self.tokens: list[int] = []
        self.ttls: list[TtlClass | None] = []
        self.sources: list[Source] = []
        self.one_hour = False
        for raw, source in ((fields.tools, "tools"), (fields.system, "system")):
            if raw:
                for digest, size, ttl, one_hour, _ in _MEMO.units(raw, split=True):
                    if not digest:
                        continue
                    self.digests.append(digest)
                    self.tokens.append(size)
                    self.ttls.append(ttl)
                    self.sources.append(source)  # type: ignore[arg-type]
                    self.one_hour |= one_hour
        self.boundaries: list[tuple[bytes, int]] = []
        chain, total = seed, 0
        for digest, size in zip(self.digests, self.tokens, strict=True):
            chain = _chained(chain, b"", digest)
            total += size
            self.boundaries.append((chain, total))


def _chained(chain: bytes, role: bytes, digest: bytes) -> bytes:
    """The hash of a prefix one unit longer (a message's role is part of it)."""
    return xxh3_128_digest(chain + role + digest)


def _messages_chain(chain: bytes, fields: PromptFields) -> bytes:
    """The chain the messages continue from, given the tools' and system blocks' (`chain`): keyed on the
    request's thinking settings and `tool_choice`, as the API keys the messages' entries (a session that turns
    thinking off, or changes its budget, reads its tools and system prompt and writes its messages again).
    Their bytes as sent (one client sends the same settings alike on every turn), set apart by a NUL, which no
    JSON value holds unescaped. A request with neither (absent is empty; a value never is) keeps its chain."""
    thinking, tool_choice = fields.thinking, fields.tool_choice
    if not thinking and not tool_choice:
        return chain
    return xxh3_128_digest(b"".join((chain, thinking, b"\0", tool_choice)))


# Distinct (tools, system) pairs remembered: one per client version and project, in practice; and the units
# they may hold together (one may have up to MAX_UNITS).
_HEADS: _SizedMemo[_Head] = _SizedMemo(256, 100_000)


def _head(fields: PromptFields, seed: bytes) -> _Head:
    # Raw values hash without a copy (they expose their bytes).
    tools_digest = xxh3_128_digest(fields.tools)
    system = fields.system
    attribution = _OPENING_BILLING.match(system)
    key = seed + tools_digest + xxh3_128_digest(memoryview(system)[attribution.end() :] if attribution else system)
    head = _HEADS.get(key)
    if head is None:
        head = _Head(fields, tools_digest, seed)
        _HEADS.put(key, head, len(head.digests))
    return head


class _Units:
    """The request's units in prefix order, as parallel lists (cheaper than an object per unit); the
    boundaries of its tools and system blocks come chained already (`_Head`)."""

    __slots__ = (
        "digests",
        "head_boundaries",
        "images",
        "one_hour",
        "roles",
        "seed",
        "sources",
        "tokens",
        "tools_digest",
        "ttls",
    )

    def __init__(self, fields: PromptFields, seed: bytes) -> None:
        # Tools and system go block by block (their markers stay put from turn to turn). A message is one
        # unit: its marker moves on to the newest turn, and the turn it leaves must hash the same without it.
        self.seed = seed
        head = _head(fields, seed)
        self.tools_digest = head.tools_digest
        self.head_boundaries = head.boundaries
        self.digests = list(head.digests)
        self.tokens = list(head.tokens)
        self.ttls = list(head.ttls)
        self.sources = list(head.sources)
        self.roles = [b""] * len(head.digests)
        one_hour = head.one_hour
        images = NO_IMAGES
        memo = _MEMO.units
        digests, tokens, ttls, roles = self.digests, self.tokens, self.ttls, self.roles
        messages = fields.messages or ()
        for message in messages:
            digest, size, ttl, marked_one_hour, found = memo(message.content, split=False)[0]
            if found is not NO_IMAGES:
                images += found
            digests.append(digest)
            tokens.append(size)
            ttls.append(ttl)
            roles.append(message.role.encode())
            one_hour |= marked_one_hour
        self.one_hour = one_hour
        self.images = images
        self.sources.extend(["messages"] * len(messages))


def _breakpoint_positions(units: _Units, fields: PromptFields) -> list[tuple[int, TtlClass, bool]]:
    count = len(units.digests)
    explicit = [(index, ttl, True) for index, ttl in enumerate(units.ttls) if ttl is not None]
    if fields.cache_control and count:
        request_ttl = marker_ttl(bytes(fields.cache_control))
        if request_ttl is not None and (not explicit or explicit[-1][0] != count - 1):
            explicit.append((count - 1, request_ttl, True))
    if explicit:
        return explicit[-MAX_BREAKPOINTS:]  # type: ignore[return-value]
    inferred: list[tuple[int, TtlClass, bool]] = []
    last_system = max((i for i, source in enumerate(units.sources) if source == "system"), default=None)
    if last_system is not None:
        inferred.append((last_system, "5m", False))
    last_user = max((i for i, role in enumerate(units.roles) if role == b"user"), default=None)
    if last_user is not None:
        inferred.append((last_user, "5m", False))
    return inferred


def analyse(fields: PromptFields, model: str = "") -> PromptPrefix:
    """The breakpoints of one request. A prefix hash chains the unit digests (and message roles) in order,
    the messages' after the request's thinking settings and `tool_choice` (`_messages_chain`), from the
    model's name: each model has a cache of its own (a prefix written by one is not read by another,
    as after Claude Code's `/model`), an alias its dated model's (`claude-sonnet-4-5` reads what
    `claude-sonnet-4-5-20250929` wrote)."""
    units = _Units(fields, snapshot(model).encode())
    if not units.digests:
        return EMPTY_PREFIX
    positions = _breakpoint_positions(units, fields)
    last = positions[-1][0] if positions else -1
    boundaries = units.head_boundaries[: last + 1]
    chain, total = boundaries[-1] if boundaries else (units.seed, 0)
    done = len(boundaries)
    if done <= last:  # the head's boundaries are all taken: messages follow
        chain = _messages_chain(chain, fields)
    for digest, size, role in zip(
        units.digests[done : last + 1], units.tokens[done:], units.roles[done:], strict=False
    ):
        chain = _chained(chain, role, digest)
        total += size
        boundaries.append((chain, total))
    prompt_tokens = total + sum(units.tokens[last + 1 :])
    breakpoints = tuple(
        CacheBreakpoint(
            block_index=index,
            source=units.sources[index],
            prefix_hash=boundaries[index][0],
            prefix_token_count=boundaries[index][1],
            ttl=ttl,
            explicit=explicit,
            lookback=tuple(boundaries[max(0, index - LOOKBACK_BLOCKS) : index + 1][::-1]),
        )
        for index, ttl, explicit in positions
    )
    # The request-level marker too, even where a block's own marker takes its place as the last breakpoint.
    control = bytes(fields.cache_control)
    one_hour = units.one_hour or (bool(control) and (marker_ttl(control) == "1h" or hides_words(control)))
    return PromptPrefix(
        breakpoints, prompt_tokens, looked_back(breakpoints), one_hour, units.tools_digest, images=units.images
    )


def looked_back(breakpoints: tuple[CacheBreakpoint, ...]) -> tuple[tuple[bytes, int], ...]:
    """(prefix hash, tokens) of every boundary some breakpoint looks back to, longest first, each once. A
    breakpoint's look-back runs from its own block down; the next breakpoint's window only adds blocks below
    those seen (its top is lower), so skipping by block index replaces a set of hashes."""
    found: list[tuple[bytes, int]] = []
    lowest: int | None = None  # the lowest block index taken so far
    for breakpoint in reversed(breakpoints):
        index, lookback = breakpoint.block_index, breakpoint.lookback
        skip = 0 if lowest is None else max(0, index - lowest + 1)
        if skip < len(lookback):
            found += lookback[skip:] if skip else lookback
            lowest = index - len(lookback) + 1
    return tuple(found)


def prompt_prefix(fields: PromptFields, body: bytes, model: str = "") -> PromptPrefix:
    """What routing needs from a request: its breakpoints when it asks for caching, else only its size.

    Anthropic caches nothing a request does not mark, so an unmarked prompt's inferred breakpoints (which
    stand for providers that cache by themselves; the pool has none of those yet) would be computed for
    nothing. A marker inside message text is escaped (`\\"cache_control\\"`) and does not match; a false
    match only costs the full analysis. A request of more than MAX_UNITS units is not analysed either."""
    if body.find(_MARKER) < 0:  # `find`: see `unmarked`
        return PromptPrefix((), len(body) // BYTES_PER_TOKEN, unmarked=True)
    if fields.messages is not None and len(fields.messages) <= MAX_UNITS:
        try:
            return analyse(fields, model)
        except TooManyUnits:
            pass
    return PromptPrefix((), len(body) // BYTES_PER_TOKEN)

"""Reading token usage out of responses as they pass, without re-serialising anything.

Streams: only `data:` lines of `message_start`, `message_delta` and `error` events are decoded.
JSON bodies: decoded once at the end (they are bounded by the gateway's response cap).

msgspec decodes them, as it does the requests: only the fields named below become Python objects (the
answer's content is skipped over), and one JSON library per request keeps the hot path's code small.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import msgspec

from poolgate.api.errors import upstream_error_message, upstream_error_type
from poolgate.lifecycle.context import Iteration, Usage


class _Answer(msgspec.Struct):
    """The parts of a JSON answer its kind and usage live in."""

    type: Any = None
    usage: Any = None
    input_tokens: Any = None  # a token count's answer


_NO_BLOCK = msgspec.Raw(b"null")


class _Event(msgspec.Struct):
    """The parts of a stream event usage and errors live in, and a block's start (see `_block_started`)."""

    type: Any = None
    message: Any = None
    usage: Any = None
    error: Any = None
    content_block: msgspec.Raw = _NO_BLOCK


class _Block(msgspec.Struct):
    type: Any = None
    content: msgspec.Raw = _NO_BLOCK


class _Identified(msgspec.Struct):
    id: Any = None


_ANSWER = msgspec.json.Decoder(_Answer)
_IDENTIFIED = msgspec.json.Decoder(_Identified)
_EVENT = msgspec.json.Decoder(_Event)
_BLOCK = msgspec.json.Decoder(_Block)
_ANY = msgspec.json.Decoder()
# A decoder gives up on JSON nested deeper than the interpreter's recursion limit (a model's tool input can
# be); an answer's own `usage` object nests objects two deep at most (`iterations[].cache_creation`), and
# comes last: found by this.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\})')

# A data line of a stream whose lines end with \n alone (the API's), found without splitting the others off.
_DATA_LINE = re.compile(rb"^data:[^\n]*", re.MULTILINE)
_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
JSON_CAP = 16 * 1024 * 1024
# A count beyond this (a trillion tokens, or web searches, in one answer) is no count: priced, 2**53 web searches
# cost more µUSD than the store's 64-bit integers hold, and the usage writer could not store the batch of records
# that held it. Far below that, a request's cost and a caller's day of them still fit.
MAX_COUNT = 2**40


def _count(value: Any) -> int | None:
    """A token count: a JSON integer (not a boolean) from 0 to MAX_COUNT; None for anything else."""
    return value if type(value) is int and 0 <= value <= MAX_COUNT else None


def apply_usage(usage: Usage, payload: Any, whole: bool = False) -> bool:
    """Take every known counter present in an Anthropic `usage` object (later values win), including the
    1-hour share of cache writes from `cache_creation.ephemeral_1h_input_tokens`, the web searches the
    upstream ran (`server_tool_use.web_search_requests`) and the premium modes it ran in (`speed`,
    `inference_geo`). False when `payload` is no usage object, or one without a token count that reads as
    one: counts a proxy wrote as strings or fractions are unknown, not zero (taken for a report, they recorded
    the answer free). With `whole` (a JSON answer's usage, the only report there is), False too when any count
    it reports (not null: the API's cache counts may be) is no count: with its `output_tokens` as `"50"` an
    answer was billed its input alone."""
    if not isinstance(payload, dict):
        return False
    counted = misread = False
    for name in _FIELDS:
        value = payload.get(name)
        if type(value) is int and 0 <= value <= MAX_COUNT:  # `_count`, written out: four calls an answer
            setattr(usage, name, value)
            counted = True
        elif value is not None:
            misread = True
    split = payload.get("cache_creation")
    if isinstance(split, dict):
        value = split.get("ephemeral_1h_input_tokens")
        if (count := _count(value)) is not None:
            usage.cache_creation_1h_input_tokens = count
        elif value is not None:
            misread = True
    server = payload.get("server_tool_use")
    if isinstance(server, dict):
        value = server.get("web_search_requests")
        if (count := _count(value)) is not None:
            usage.web_search_requests = count
        elif value is not None:
            misread = True
    # The modes billed at a premium, as the API reports what ran (in message_start: a delta leaves them out).
    speed, geo = payload.get("speed"), payload.get("inference_geo")
    if speed is not None:
        usage.fast = speed == "fast"
    if geo is not None:
        usage.us_only = geo == "us"
    # Rare (server-side compaction, the advisor tool): two lookups when absent.
    entries = payload.get("iterations")
    if entries is not None or usage.compaction is not None:
        _apply_iterations(usage, payload, entries)
    return counted and not (whole and misread)


# The counts a compaction adds to the request's.
_ITERATION_FIELDS = (*_FIELDS, "cache_creation_1h_input_tokens")


def read_iterations(entries: Any) -> tuple[Iteration | None, tuple[Iteration, ...]]:
    """What a `usage.iterations` list adds to the top-level usage: its `compaction` entries summed (None if it
    has none), and its `advisor_message` entries. `message` entries are the request's own, counted in the top
    level already; a `fallback_message` entry is the model that served it, counted likewise as far as the API
    says. Malformed entries (no object, no count, an advisor without its model) are passed over."""
    if not isinstance(entries, list):
        return None, ()
    compaction: Iteration | None = None
    advisors: list[Iteration] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kind = entry.get("type")
        if kind == "compaction":
            tokens = _iteration(entry, None)
            if tokens is not None:
                compaction = tokens if compaction is None else _added(compaction, tokens)
        elif kind == "advisor_message":
            model = entry.get("model")
            tokens = _iteration(entry, model) if type(model) is str and model else None
            if tokens is not None:
                advisors.append(tokens)
    return compaction, tuple(advisors)


def _iteration(entry: dict[str, Any], model: str | None) -> Iteration | None:
    """One iteration's counts (one that does not read as a count: 0); None when none does."""
    counts = [_count(entry.get(name)) for name in _FIELDS]
    split = entry.get("cache_creation")
    one_hour = _count(split.get("ephemeral_1h_input_tokens")) if isinstance(split, dict) else None
    if one_hour is None and all(count is None for count in counts):
        return None
    input_tokens, output_tokens, written, read = (count or 0 for count in counts)
    return Iteration(model, input_tokens, output_tokens, written, read, min(one_hour or 0, written))


def _added(one: Iteration, other: Iteration) -> Iteration:
    counts = (min(getattr(one, name) + getattr(other, name), MAX_COUNT) for name in _ITERATION_FIELDS)
    return Iteration(one.model, *counts)


def _reported(payload: dict[str, Any], name: str) -> bool:
    """Whether a usage object reports this count (else the count taken before stands)."""
    if name == "cache_creation_1h_input_tokens":
        split = payload.get("cache_creation")
        return isinstance(split, dict) and _count(split.get("ephemeral_1h_input_tokens")) is not None
    return _count(payload.get(name)) is not None


def _apply_iterations(usage: Usage, payload: dict[str, Any], entries: Any) -> None:
    """Counts a compaction's tokens in the request's (the top level leaves them out, yet they are billed on the
    request's model and count against its rate limits), and keeps its advisor iterations for pricing. A
    stream reports its usage more than once (message_start, message_delta): a count the payload reports
    afresh gets the compaction added, one it leaves as it was has the compaction counted before replaced,
    so that it is counted once, whichever events carry `iterations`."""
    before = usage.compaction
    if entries is None:  # counted before: counted again in the counts this payload reports afresh
        compaction = before
    else:
        compaction, usage.advisors = read_iterations(entries)
    for name in _ITERATION_FIELDS:
        count = getattr(usage, name)
        if before is not None and not _reported(payload, name):
            count -= getattr(before, name)
        if compaction is not None:
            count += getattr(compaction, name)
        setattr(usage, name, min(max(count, 0), MAX_COUNT))
    usage.compaction = compaction


# A delta's `data:` line less its content (`data: {"type":"content_block_delta",…"text":""}}`), by the kind
# of content, and output bytes per token (English prose ~4, code ~3.5; JSON escaping adds some): for
# estimating the output of a stream cut short (see `StreamUsageScanner.close`). A tool call's input counted
# with a text delta's framing came out ~2.5× its tokens.
DELTA_FRAMING_BYTES = 86
JSON_DELTA_FRAMING_BYTES = 100
THINKING_DELTA_FRAMING_BYTES = 94
BYTES_PER_OUTPUT_TOKEN = 4
# The most data lines of one event read as one (a pretty-printed JSON object has a line per field).
MAX_SPLIT_LINES = 256


# The stream's bytes are searched with `find`, not `in`: on bytes, `in` first tries its operand as an integer and
# raises and clears a TypeError before it searches (CPython 3.11), ~1,000 instructions more per search, and a
# stream searches each of its events several times.


def _content_bytes(line: bytes) -> int:
    """A content delta's generated content, in bytes: its line less its framing (a text delta's, unless it is
    another kind). A thinking block's signature is not output: none."""
    if line.find(b'"signature_delta"') >= 0:
        return 0
    if line.find(b'"input_json_delta"') >= 0:
        framing = JSON_DELTA_FRAMING_BYTES
    elif line.find(b'"thinking_delta"') >= 0:
        framing = THINKING_DELTA_FRAMING_BYTES
    else:
        framing = DELTA_FRAMING_BYTES
    content = len(line) - framing
    return content if content > 0 else 0  # not `max()`, a call of ~1,400 instructions: once per delta


class StreamUsageScanner:
    """Feed it the stream's chunks in order; it keeps the usage and the first error event seen (its type and
    message). `close()` when the stream ends, however it ends."""

    __slots__ = (
        "_compacted",
        "_consulted",
        "_delta_bytes",
        "_deltas",
        "_final",
        "_max_tokens",
        "_reported",
        "_rest",
        "_searches",
        "_split",
        "_stopped",
        "error_message",
        "error_type",
        "message_id",
        "usage",
    )

    def __init__(self, max_tokens: int | None = None) -> None:
        self.usage = Usage()
        # The request's bound on its output (thinking included): no estimate goes above it.
        self._max_tokens = max_tokens
        self.error_type: str | None = None
        self.error_message: str | None = None
        # `message_start`'s `message.id` (decoded with its usage: kept, it costs a lookup), for message threads.
        self.message_id: Any = None
        self._rest = b""
        # The data lines so far of an event split over several (see `_scan`).
        self._split: list[bytes] | None = None
        self._final = False
        self._reported = False  # a usage object seen, in message_start or message_delta
        self._stopped = False  # message_stop seen
        # Content delta events seen, and the bytes of the content they carried (see `_content_bytes`).
        self._deltas = 0
        self._delta_bytes = 0
        # Web searches whose results were passed on, advisors whose advice was, a compaction's block (see `close`).
        self._searches = 0
        self._consulted = 0
        self._compacted = False

    def close(self) -> None:
        """A stream cut short (the client left, the upstream broke off, shutdown) never sends its final
        usage, yet the tokens generated until then are billed: its output is estimated from the content
        deltas passed on (their text, at `BYTES_PER_OUTPUT_TOKEN`; at least one token each; at most the
        request's `max_tokens`), rather than left at message_start's count (1); so are the web searches whose
        results it passed on (their count, too, comes only at the end: the searches the upstream ran and billed
        cost nothing). An `error` event's last line without its line end is read too: it ended the stream (see
        `finished`), yet was recorded as no error."""
        if self._rest.endswith(b"\r"):  # a line its \r ended, its \n never came
            self.feed(b"\n")
        if self._split is not None:
            self._split_event([self._rest, b""])
        elif self._rest.startswith(b"data:") and b'"error"' in self._rest:
            self._data_line(self._rest[5:])
        # A stream whose events carried no usage object: its prompt was not 0 tokens, and what its deltas
        # suggest of its output is no count to price.
        self.usage.unreported = not self._reported
        if self._final:
            return
        if self._searches > self.usage.web_search_requests:
            self.usage.web_search_requests = self._searches
        if self._consulted > len(self.usage.advisors) or (self._compacted and self.usage.compaction is None):
            # An advisor's sub-inference or a compaction ran, on a model and prompt of its own: its tokens come
            # only in the final usage, and no estimate from what was passed on stands for them (an Opus
            # consultation cost more than the Sonnet turn that asked for it, and was billed nothing).
            self.usage.incomplete = True
        if not self._deltas:
            return
        estimate = max(self._deltas, -(-self._delta_bytes // BYTES_PER_OUTPUT_TOKEN))
        if self._max_tokens is not None:
            estimate = min(estimate, self._max_tokens)
        if estimate > self.usage.output_tokens:
            self.usage.output_tokens = estimate

    @property
    def finished(self) -> bool:
        """The stream said it is over: `message_stop`, or an `error` event (a last line without its newline
        counts too). A stream that ends without either was cut short, however cleanly it was closed."""
        return (
            self._stopped
            or self.error_type is not None
            or self._rest.find(b'"message_stop"') >= 0
            or self._rest.replace(b" ", b"").find(b'"type":"error"') >= 0
        )

    def feed(self, chunk: bytes) -> None:
        data = self._rest + chunk if self._rest else chunk
        # SSE lines end with \n, \r\n or a bare \r (a stream of bare CRs was recorded as free). A \r that ends
        # the data may be the first half of a \r\n whose \n comes with the next chunk: its line waits for that
        # (taken as ended by the \r, the \n opened an empty line, which ends an event split over several lines
        # halfway, and its content was miscounted).
        end, bare_cr = data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)
        if bare_cr > end:  # not `max()`, a call of ~1,400 instructions: once per chunk
            end = bare_cr
        if end < 0:
            self._rest = data
            return
        self._rest = data[end + 1 :]
        # Complete lines only, each once however the stream is cut into chunks. A line that is not a JSON object
        # on its own is the first of an event's several data lines (SSE joins them; the API sends one, a proxy
        # may not): it is read with the lines after it, up to the event's end (`_split_event`).
        block = data[: end + 1]
        if self._split is None and block.find(b"\r") < 0:
            # The API's streams: only their data lines are looked at (two lines in three are not).
            for match in _DATA_LINE.finditer(block):
                if not self._read(match[0]):
                    self._split = []
                    lines = self._split_event(block[match.start() :].splitlines())
                    break
            else:
                return
        else:
            lines = block.splitlines()
            if self._split is not None:
                lines = self._split_event(lines)
        while lines:
            rest: list[bytes] = []
            for at, line in enumerate(lines):
                if line.startswith(b"data:") and not self._read(line):
                    self._split = []
                    rest = self._split_event(lines[at:])
                    break
            lines = rest

    def _read(self, line: bytes) -> bool:
        """One `data:` line read on its own; False when it is the first of an event's several data lines."""
        if line.find(b'content_block_delta"') >= 0:  # most lines: first
            self._deltas += 1
            self._delta_bytes += _content_bytes(line)
            return True
        if (
            line.find(b'"message_') >= 0
            or line.find(b'"error"') >= 0
            # The starts of blocks billed apart (see `_block_started`): not worth a decode, the other blocks'.
            or line.find(b'_tool_result"') >= 0
            or line.find(b'"compaction"') >= 0
        ):
            return self._data_line(line[5:])
        return line.endswith(b"}")  # a ping, a block's start or stop: a few a stream

    def _split_event(self, lines: list[bytes]) -> list[bytes]:
        """Gathers the data lines of an event split over several into `_split`, and reads the event at its
        blank line; the lines after that are returned."""
        assert self._split is not None
        for at, line in enumerate(lines):
            if not line:
                raw, self._split = b"\n".join(self._split), None
                if raw.find(b'content_block_delta"') >= 0:
                    self._deltas += 1
                    self._delta_bytes += _content_bytes(raw)
                else:
                    self._data_line(raw)
                return lines[at + 1 :]
            if line.startswith(b"data:"):
                if len(self._split) >= MAX_SPLIT_LINES:  # not an event worth reading: the rest is passed over
                    self._split = None
                    return lines[at + 1 :]
                self._split.append(line[5:])
        return []

    def _data_line(self, raw: bytes) -> bool:
        """Reads one event's data; False when it is not a JSON object."""
        try:
            event = _EVENT.decode(raw)
        except (msgspec.DecodeError, RecursionError):  # not JSON, not an object, or nested beyond reason
            return False
        kind = event.type
        if kind == "message_start":
            if isinstance(event.message, dict):
                self.message_id = event.message.get("id")
                if apply_usage(self.usage, event.message.get("usage")):
                    self._reported = True
        elif kind == "message_delta" and apply_usage(self.usage, event.usage):
            self._reported = True
            # The final output count, if it reads as one (else the output is estimated, as when left out).
            if _count(event.usage.get("output_tokens")) is not None:
                self._final = True
        elif kind == "message_stop":
            self._stopped = True
        elif kind == "content_block_start":
            self._block_started(event.content_block)
        elif kind == "error" and self.error_type is None:
            error = event.error if isinstance(event.error, dict) else {}
            self.error_type = upstream_error_type(error.get("type"), "api_error")
            self.error_message = upstream_error_message(error.get("message"))
        return True

    def _block_started(self, block: msgspec.Raw) -> None:
        """Counts a block that starts if it is billed apart, its count or tokens reported only in the final usage:
        a web search's results (a list of them; a search that failed, which the API does not bill, has an error
        object instead), an advisor's advice (its error, `advisor_tool_result_error`, is none), a compaction.
        Results and advice are not decoded, only their type."""
        try:
            started = _BLOCK.decode(block)
            kind = started.type
            if kind == "web_search_tool_result" and bytes(started.content).startswith(b"["):
                self._searches += 1
            elif kind == "advisor_tool_result" and _BLOCK.decode(started.content).type != "advisor_tool_result_error":
                self._consulted += 1
            elif kind == "compaction":
                self._compacted = True
        except (msgspec.DecodeError, RecursionError):
            return


def usage_from_json(body: bytes, endpoint: str | None = None) -> Usage | None:
    """What a JSON answer says it used (zeros for what it does not say); None when the body is not a JSON
    object at all, or (given the `endpoint` it answers) not that endpoint's answer: a message, a token count
    (`{"ok": true}` from a web server at a wrong base URL, or a 200 that carries an error)."""
    try:
        answer = _ANSWER.decode(body)
    except msgspec.DecodeError:  # not JSON, or not an object
        return None
    except RecursionError:
        # Nested beyond the decoder's reach (a model's tool input can be): the API's own answer, read by hand.
        return _deep_usage(body)
    return _usage_of(answer, endpoint)


def answer_id(body: bytes) -> Any:
    """A JSON answer's `id` (any JSON: see `ThreadRoots`), read again for the requests that need it (message
    threads) rather than decoded with every answer's usage."""
    try:
        return _IDENTIFIED.decode(body).id
    except (msgspec.DecodeError, RecursionError):
        return None


def whole_answer_usage(body: bytes, endpoint: str) -> Usage | None:
    """What an answer whose transport broke off after `body` used, if `body` is that answer whole: a JSON
    document that is the endpoint's answer with its usage, or a token count (a body cut short is no JSON
    document; one nested beyond the decoder's reach is not taken on trust). None otherwise."""
    try:
        answer = _ANSWER.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if endpoint != "count_tokens" and not isinstance(answer.usage, dict):
        return None
    return _usage_of(answer, endpoint)


def _usage_of(answer: _Answer, endpoint: str | None) -> Usage | None:
    """`usage_from_json` of a decoded answer."""
    if endpoint == "count_tokens":
        if type(answer.input_tokens) is not int:
            return None
    elif endpoint is not None and answer.type != "message":  # a Messages request (the gateway's own too)
        return None
    usage = Usage()
    # A token count has no usage object of its own, and costs nothing.
    usage.unreported = not apply_usage(usage, answer.usage, whole=True) and endpoint != "count_tokens"
    return usage


def _deep_usage(body: bytes) -> Usage:
    usage = Usage(unreported=True)
    at = body.rfind(b'"usage"')
    found = _USAGE_OBJECT.match(body, at) if at >= 0 else None
    if found is not None:
        with contextlib.suppress(msgspec.DecodeError):
            usage.unreported = not apply_usage(usage, _ANY.decode(found.group(1)), whole=True)
    return usage

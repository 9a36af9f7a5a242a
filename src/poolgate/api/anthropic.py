"""The Anthropic-compatible surface: decode only what routing and accounting need, forward the rest.

Fields and roles the gateway does not know pass through untouched (newer betas add them all the time);
only `model`, `messages`, `max_tokens`, `stream` and `metadata.user_id` are checked.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import islice
from typing import Any, TypeVar

import msgspec
import orjson

from poolgate.api.errors import ApiError
from poolgate.api.http import header
from poolgate.cache.breakpoints import MAX_UNITS, PromptFields, PromptMessage, hides_words
from poolgate.lifecycle.context import Endpoint, RawHeaders, RequestContext

SESSION_HEADER = b"x-claude-code-session-id"
# The usage table's session column holds 128 characters.
MAX_SESSION_ID = 128
# So does its model column; model ids are short (`claude-sonnet-4-5-20250929`; a Bedrock inference profile
# ARN ~100).
MAX_MODEL_ID = 128
# No model answers more than 128,000 output tokens today, and the API refuses more than a model's own limit.
# A bound far above them leaves room for new models' limits, while a number no model could answer (10**30)
# is the client's mistake for every caller: a 400 here, not a budget's 402 saying it may cost $10**25.
MAX_OUTPUT_TOKENS = 1_000_000
T = TypeVar("T")
_LEGACY_SESSION = re.compile(r"_session_([0-9A-Za-z-]{8,})$")
# Bodies up to this size decode their messages along with the rest, in one pass (a Claude Code request is tens
# to hundreds of KB). A larger one leaves its messages undecoded: a 32 MiB body of a million tiny messages took
# ~0.4 s of the event loop and ~200 MB (which the allocator then kept) to decode into one object each. Unless
# the body's `"role"` keys (every message has one, text cannot hold one unescaped) say there are at most as
# many as the prompt analysis takes (`MAX_UNITS`): counted before the body is decoded, so that it is decoded
# once, as a small one is (a screenshot's base64 was read three times, and searched twice more to count keys).
# More messages are not analysed for the prompt cache, and left for the upstream to validate.
LARGE_BODY = 4 * 2**20
_ROLE = re.compile(rb'"role"')
# A body's top level, its values undecoded: one pass of msgspec over the bytes, building nothing below it.
_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_KEY = msgspec.json.Decoder(str)
_SPACE = rb"[ \t\r\n]*"  # JSON's whitespace
_OPENING = re.compile(_SPACE + rb"\{")
_TOP_KEY = re.compile(_SPACE + rb'("[^"\\]*(?:\\.[^"\\]*)*")' + _SPACE + rb":" + _SPACE, re.DOTALL)
_AFTER_VALUE = re.compile(_SPACE + rb"([,}])")
# How much of a repeated key a refusal quotes.
_SHOWN_KEY = 64
# The walk for repeated keys costs a few µs a top-level key (a dict entry, regex matches): a body with more bytes
# than this outside the values the decode read (a Messages body has a dozen short keys and a few short values
# besides) may hold thousands of keys, tens of thousands in a large body (two million made a walk of 16 s); it is
# looked at for the keys the gateway reads only (`_READ_KEY`), by C searches.
WALKED_BYTES = 16 * 1024
# The least a message takes besides its content: `{"role":"","content":}` and a comma.
_MESSAGE_FRAME = 23
_READ_KEY = re.compile(rb'"(model|messages|max_tokens|stream|metadata|system|tools|cache_control)"' + _SPACE + rb":")


class _Metadata(msgspec.Struct):
    user_id: str | None = None


class _MessagesFields(PromptFields, kw_only=True):
    model: str
    messages: list[PromptMessage]  # required here, unlike in the prompt model
    max_tokens: int
    stream: bool = False
    metadata: _Metadata | None = None


class _LargeMessagesFields(_MessagesFields, kw_only=True):
    messages: msgspec.Raw  # type: ignore[assignment]  # see LARGE_BODY


class _CountTokensFields(msgspec.Struct):
    model: str
    messages: msgspec.Raw  # free upstream and never analysed: only its being an array is checked here
    metadata: _Metadata | None = None
    # Not read, but their sizes bound the check for repeated keys (`_refuse_repeated_keys`).
    tools: msgspec.Raw = msgspec.Raw()
    system: msgspec.Raw = msgspec.Raw()


class _NamedModel(msgspec.Struct):
    model: Any = None


_DECODERS: dict[Endpoint, msgspec.json.Decoder[_MessagesFields] | msgspec.json.Decoder[_CountTokensFields]] = {
    "messages": msgspec.json.Decoder(_MessagesFields),
    "count_tokens": msgspec.json.Decoder(_CountTokensFields),
}
_LARGE_DECODER = msgspec.json.Decoder(_LargeMessagesFields)
_ARRAY = msgspec.json.Decoder(list[msgspec.Raw])
_NAMED_MODEL = msgspec.json.Decoder(_NamedModel)


def session_from_user_id(user_id: str | None) -> str | None:
    """Claude Code puts its session in `metadata.user_id`: a JSON string with `session_id` (2.x), or a
    `user_…_account_…_session_<uuid>` string (1.x)."""
    if not user_id:
        return None
    if user_id.startswith("{"):
        try:
            parsed = orjson.loads(user_id)
        except orjson.JSONDecodeError:
            return None
        session = parsed.get("session_id") if isinstance(parsed, dict) else None
        return session if isinstance(session, str) and session else None
    match = _LEGACY_SESSION.search(user_id)
    return match.group(1) if match else None


def decode_request(
    endpoint: Endpoint, request_id: str, path: str, query: bytes, headers: RawHeaders, body: bytes
) -> RequestContext:
    if len({name for name, _ in headers}) != len(headers):  # some header repeats: one set, no lookups per name
        _one_of_each(headers)
    if not body:
        raise ApiError(400, "Request body is empty; expected a JSON object")
    try:
        large = len(body) > LARGE_BODY and endpoint == "messages" and not _few_messages(body)
        fields = (_LARGE_DECODER if large else _DECODERS[endpoint]).decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"Invalid request: {_readable(str(exc))}") from None
    except msgspec.DecodeError as exc:
        encoding = header(headers, b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            raise ApiError(
                415, f"Request bodies must be uncompressed JSON (content-encoding: {encoding.decode('latin-1')})"
            ) from None
        coding = header(headers, b"transfer-encoding")
        if coding is not None and any(c.strip() not in (b"chunked", b"") for c in coding.lower().split(b",")):
            # The server undoes `chunked` only: a gzip transfer coding reached here as compressed bytes.
            raise ApiError(
                415, f"Transfer codings other than chunked are not supported ({coding.decode('latin-1')})"
            ) from None
        raise ApiError(400, f"Request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "Request body is nested too deeply to be a Messages request") from None
    _refuse_repeated_keys(body, fields)
    if not fields.model:
        raise ApiError(400, "model: must not be empty")
    if len(fields.model) > MAX_MODEL_ID:
        # It is logged, stored with the usage record and echoed in errors: a caller must not grow them at will.
        raise ApiError(400, f"model: at most {MAX_MODEL_ID} characters")
    if isinstance(fields, _MessagesFields):
        if fields.max_tokens < 1:
            raise ApiError(400, "max_tokens: must be at least 1")
        if fields.max_tokens > MAX_OUTPUT_TOKENS:
            raise ApiError(400, f"max_tokens: at most {MAX_OUTPUT_TOKENS:,}, more than any model answers")
        stream = fields.stream
        prompt: PromptFields | None = _unanalysed(fields) if isinstance(fields, _LargeMessagesFields) else fields
        max_tokens: int | None = fields.max_tokens
    else:
        _array(fields.messages)
        stream, prompt, max_tokens = False, None, None
    session = header(headers, SESSION_HEADER)
    session_id = (
        session.decode("latin-1")
        if session
        else session_from_user_id(fields.metadata.user_id if fields.metadata else None)
    )
    if session_id is not None and len(session_id) > MAX_SESSION_ID:
        # Every usage record, budget and affinity entry keys on it: a caller must not grow them at will.
        raise ApiError(400, f"session id: at most {MAX_SESSION_ID} characters (Claude Code's are 36)")
    return RequestContext(
        request_id=request_id,
        endpoint=endpoint,
        path=path,
        query=query,
        headers=headers,
        body=body,
        model=fields.model,
        stream=stream,
        session_id=session_id,
        prompt=prompt,
        max_tokens=max_tokens,
    )


# Headers the request is forwarded with that take one value: two are the client's mistake, which the upstream
# would read as it pleases (a strict server refuses them with a bare 400, which failed over across the pool as
# an answer that is not the API's, blaming every account).
SINGLE_VALUED = (b"content-type", b"anthropic-version")


def _one_of_each(headers: RawHeaders) -> None:
    names = [name for name, _ in headers]
    for name in SINGLE_VALUED:
        count = names.count(name)
        if count > 1:
            raise ApiError(400, f"A request must carry at most one {name.decode()} header; this one has {count}")


def _read_values(fields: _MessagesFields | _CountTokensFields) -> list[msgspec.Raw]:
    """The large values the decode read, undecoded: tools, system, and the messages (each one's content)."""
    values = [fields.tools, fields.system]
    if isinstance(fields.messages, msgspec.Raw):
        values.append(fields.messages)
    else:
        values += [message.content for message in fields.messages]
    return values


def _refuse_repeated_keys(body: bytes, fields: _MessagesFields | _CountTokensFields) -> None:
    """A 400 for a body whose top level names a key twice (see `repeated_key`). A body with more than
    `WALKED_BYTES` outside the values the decode read (`_read_values`, and each message's frame) is not walked:
    it may hold thousands of top-level keys, and the walk costs microseconds a key (two million took 16 s). Its
    keys the gateway reads are counted instead, in C, less the ones within the values read (a Task tool call's
    `model`): more than one left is refused, as is a body that may spell a key with escapes (`hides_words`).
    Such a body holds over 16 KiB of values of keys the gateway does not read, which clients hardly send."""
    values = _read_values(fields)
    frames = 0 if isinstance(fields.messages, msgspec.Raw) else _MESSAGE_FRAME * len(fields.messages)
    if len(body) - sum([len(value) for value in values]) - frames <= WALKED_BYTES:
        repeated = repeated_key(body)
        if repeated is not None:
            shown = repeated if len(repeated) <= _SHOWN_KEY else repeated[:_SHOWN_KEY] + "…"
            raise ApiError(400, f"Invalid request: {shown}: named more than once at the top level of the body")
        return
    named = Counter([found.group(1) for found in _READ_KEY.finditer(body)])
    for value in values:
        named.subtract([found.group(1) for found in _READ_KEY.finditer(value)])
    repeated_read = next((name.decode() for name, count in named.items() if count > 1), None)
    if repeated_read is None and hides_words(body):
        repeated_read = "a key"
    if repeated_read is not None:
        raise ApiError(
            400,
            f"Invalid request: {repeated_read}: may be named more than once at the top level of the body, which "
            f"holds over {WALKED_BYTES // 1024} KiB of values the gateway does not read",
        )


def repeated_key(body: bytes) -> str | None:
    """The first key the top level of `body` (a JSON object, valid: decoded already) names more than once;
    None when it names each once. The gateway reads the last of a repeated key (msgspec does, as orjson and
    most parsers do), but forwards the bytes, and an upstream that reads the first would serve a `model` the
    caller's allow-list refused, or a `max_tokens` or `messages` its budget never priced. Any key, not only
    the ones read today: the check costs the same, and a key read tomorrow needs no list kept up to date.

    A walk of the top level, each value skipped by the length of the one the decode kept for its key: that is
    the value at hand unless the key comes again later, and then the bytes differ (or, alike, the key is met
    again). Counting raw `"model"`s first (to walk only bodies that have two) cost more than the walk: the
    bytes search ran at a third of msgspec's speed, and Claude Code's bodies hold a `"model"` in every Task
    tool call and a `"system"` in their role-system messages; nor does a count see `"mod\\u0065l"`."""
    values = _TOP_LEVEL.decode(body)
    view = memoryview(body)
    seen: set[str] = set()
    opening = _OPENING.match(body)
    at = opening.end() if opening is not None else len(body)
    while (key := _TOP_KEY.match(body, at)) is not None:
        name = _KEY.decode(key.group(1))
        if name in seen:
            return name
        seen.add(name)
        value = values[name]
        end = key.end() + len(value)
        after = _AFTER_VALUE.match(body, end)
        if after is None or msgspec.Raw(view[key.end() : end]) != value:
            return name  # this value is not the one kept: a later one is
        if after.group(1) == b"}":
            return None
        at = after.end()
    return None


def named_model(body: bytes) -> str:
    """The model a refused request's body names, for its usage record (`usage --by model` put every refusal
    under "-"): "" unless the body is a JSON object whose `model` is a string, at most `MAX_MODEL_ID`
    characters of it (it is stored and logged). Shown, as every model, with its control characters escaped."""
    try:
        model = _NAMED_MODEL.decode(body).model
    except (msgspec.DecodeError, RecursionError):
        return ""
    return model[:MAX_MODEL_ID] if isinstance(model, str) else ""


def _array(messages: msgspec.Raw) -> None:
    """Undecoded messages are refused unless they are a JSON array; the rest is the upstream's to check."""
    if memoryview(messages)[:1] != b"[":
        _decoded_messages(_ARRAY, messages)  # raises, in the words of a whole body's refusal


def _decoded_messages(decoder: msgspec.json.Decoder[T], messages: msgspec.Raw) -> T:
    """`messages` decoded, or the 400 saying what is wrong where, as the decode of a whole body says it."""
    try:
        return decoder.decode(messages)
    except msgspec.ValidationError as exc:
        detail, _, where = str(exc).partition(" - at `$")
        raise ApiError(400, f"Invalid request: messages{_dotted(where.rstrip('`'))}: {detail}") from None


def _few_messages(body: bytes) -> bool:
    """Whether a body's messages are at most `MAX_UNITS`, as its `"role"` keys tell unless it spells them with
    escapes. The keys are counted up to one past the bound (a regex search finds them twice as fast as
    `bytes.count` does)."""
    keys = sum(1 for _ in islice(_ROLE.finditer(body), MAX_UNITS + 1))
    return keys <= MAX_UNITS and not hides_words(body)


def _unanalysed(fields: _LargeMessagesFields) -> PromptFields:
    """The prompt of a body of too many messages to decode: its messages left out of the analysis."""
    _array(fields.messages)
    return PromptFields(tools=fields.tools, system=fields.system, messages=None, cache_control=fields.cache_control)


def _readable(message: str) -> str:
    """msgspec says "Expected `int`, got `str` - at `$.max_tokens`"; name the field first, API-style."""
    if " - at `$." in message:
        detail, _, where = message.partition(" - at `$.")
        return f"{_dotted(where.rstrip('`'))}: {detail}"
    return message


_INDEX = re.compile(r"\[(\d+)\]")


def _dotted(where: str) -> str:
    """A path as the API writes it, `messages.0.content` (msgspec writes `messages[0].content`)."""
    return _INDEX.sub(r".\1", where)

"""The Anthropic-compatible surface: decode only what routing and accounting need, forward the rest.

Fields and roles the gateway does not know pass through untouched (newer betas add them all the time);
only `model`, `messages`, `max_tokens`, `stream` and `metadata.user_id` are checked.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from itertools import islice
from typing import Any, ClassVar, TypeVar, cast

import msgspec
import orjson

from poolgate.api.errors import ApiError
from poolgate.api.escapes import hides_words
from poolgate.api.http import Fields, fields_of, header_text
from poolgate.cache.breakpoints import MAX_UNITS, PromptFields, PromptMessage
from poolgate.lifecycle.context import Endpoint, RawHeaders, RequestContext, Thread
from poolgate.telemetry.logging import CREDENTIAL_PLACEHOLDER, redact

SESSION_HEADER = b"x-claude-code-session-id"
# The usage table's session column holds 128 characters.
MAX_SESSION_ID = 128
# So does its model column; model ids are short (`claude-sonnet-4-5-20250929`; a Bedrock inference profile
# ARN ~100).
MAX_MODEL_ID = 128
# The API's model ids are under 40 characters; credentials are longer (a gateway key 46, an Anthropic key 108).
LONGEST_MODEL_ID = 40
CREDENTIAL_AS_MODEL = (
    "model: that is a credential (an API key), not a model id: set the model's name (in Claude Code:"
    " ANTHROPIC_MODEL, or --model), and keep the key where keys go"
)


def is_credential(model: str) -> bool:
    """Whether a model id is a key pasted where the model goes (ANTHROPIC_MODEL set to it), as the log's redaction
    knows keys: sent on, a gateway key reached the upstream, which never gets one otherwise, and came back in its
    404. Claude's own ids (`claude-…`) are looked at only when too long to be the API's (the regex costs ~1 µs,
    the test ~0.04); any other id is: a short key of a key's shape (`sk-ant-api03-mock-key-1`, the demo's and a
    test double's upstream keys) went upstream, came back in another account's 404 and stayed in the ledger."""
    return (len(model) >= LONGEST_MODEL_ID or not model.startswith("claude-")) and redact(model) != model


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


class _Metadata(msgspec.Struct):
    user_id: str | None = None


class _Once:
    """A top-level field that both the gateway and the upstream read, which a body may name once: the model
    (the allow-list, the price and the route are the gateway's reading of it), `stream` (how the answer is
    relayed and its usage read) and `max_tokens` (a budget's estimate). msgspec, like most parsers, keeps the
    last of two keys without a word; an upstream that kept the first would serve a model the allow-list
    refused, or an answer longer than the budget admitted. Such fields decode through `_once`, which msgspec
    calls for each key, so that it sees a second one (no cheaper pass over the body can tell). The decoded
    struct holds the subclass's one instance, `THE`; the values are in `_READ`."""

    __slots__ = ()
    THE: ClassVar[_Once]
    expected: ClassVar[type]


class _Model(_Once):
    expected = str


class _Stream(_Once):
    expected = bool


class _MaxTokens(_Once):
    expected = int


for _kind in (_Model, _Stream, _MaxTokens):
    _kind.THE = _kind()


class _Read(threading.local):
    """The `_Once` fields' values in the body being decoded on this thread."""

    values: dict[type[_Once], Any]


_READ = _Read()
# msgspec's names of JSON's types, for a refusal in its words.
_JSON_TYPES = {str: "str", int: "int", float: "float", bool: "bool", type(None): "null", list: "array", dict: "object"}


def _once(kind: type[_Once], value: Any) -> _Once:
    """msgspec's hook for the `_Once` fields (the only custom types its request decoders know). Its errors are
    msgspec's: the field's path is added."""
    if type(value) is not kind.expected:
        raise TypeError(f"Expected `{_JSON_TYPES[kind.expected]}`, got `{_JSON_TYPES[type(value)]}`")
    values = _READ.values
    if kind in values:
        raise ValueError(
            "the body names it more than once (the upstream could read another one than the gateway checked)"
        )
    values[kind] = value
    return kind.THE


class _MessagesFields(PromptFields, kw_only=True):
    model: _Model
    messages: list[PromptMessage]  # required here, unlike in the prompt model
    max_tokens: _MaxTokens
    stream: _Stream = cast("_Stream", _Stream.THE)  # absent: False
    metadata: _Metadata | None = None
    # Modes billed at a premium on every token rate (a budget's estimate bounds them): fast output, US-only
    # inference. Any JSON: the upstream validates them.
    speed: Any = None
    inference_geo: Any = None
    # Undecoded unless present (see `_thread`): most requests have none.
    thread: msgspec.Raw = msgspec.Raw()


class _ThreadField(msgspec.Struct):
    """The parts of a `thread` routing reads; any JSON, as the upstream validates it."""

    type: Any = None
    previous_message_id: Any = None


class _LargeMessagesFields(_MessagesFields, kw_only=True):
    messages: msgspec.Raw  # type: ignore[assignment]  # see LARGE_BODY


class _CountTokensFields(msgspec.Struct):
    model: _Model
    messages: msgspec.Raw  # free upstream and never analysed: only its being an array is checked here
    metadata: _Metadata | None = None


class _NamedModel(msgspec.Struct):
    # Undecoded: a body refused for a model that is an array of millions of items was decoded into them.
    model: msgspec.Raw = msgspec.Raw()


_DECODERS: dict[Endpoint, msgspec.json.Decoder[_MessagesFields] | msgspec.json.Decoder[_CountTokensFields]] = {
    "messages": msgspec.json.Decoder(_MessagesFields, dec_hook=_once),
    "count_tokens": msgspec.json.Decoder(_CountTokensFields, dec_hook=_once),
}
_LARGE_DECODER = msgspec.json.Decoder(_LargeMessagesFields, dec_hook=_once)
_ARRAY = msgspec.json.Decoder(list[msgspec.Raw])
_NAMED_MODEL = msgspec.json.Decoder(_NamedModel)
_THREAD = msgspec.json.Decoder(_ThreadField)
_STRING = msgspec.json.Decoder(str)


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
    endpoint: Endpoint,
    request_id: str,
    path: str,
    query: bytes,
    headers: RawHeaders,
    body: bytes,
    header_fields: Fields | None = None,
) -> RequestContext:
    """The request's context from its body and headers (`header_fields`: the headers by name,
    `fields_of(headers)` unless given)."""
    if header_fields is None:
        header_fields = fields_of(headers)
    if len(header_fields) != len(headers):  # some header repeats
        _one_of_each(headers)
    if not body:
        raise ApiError(400, "Request body is empty; expected a JSON object")
    values = _READ.values = {}
    try:
        large = len(body) > LARGE_BODY and endpoint == "messages" and not _few_messages(body)
        fields = (_LARGE_DECODER if large else _DECODERS[endpoint]).decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"Invalid request: {_readable(str(exc))}") from None
    except msgspec.DecodeError as exc:
        encoding = header_fields.get(b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            raise ApiError(
                415, f"Request bodies must be uncompressed JSON (content-encoding: {encoding.decode('latin-1')})"
            ) from None
        coding = header_fields.get(b"transfer-encoding")
        if coding is not None and any(c.strip() not in (b"chunked", b"") for c in coding.lower().split(b",")):
            # The server undoes `chunked` only: a gzip transfer coding reached here as compressed bytes.
            raise ApiError(
                415, f"Transfer codings other than chunked are not supported ({coding.decode('latin-1')})"
            ) from None
        raise ApiError(400, f"Request body is not valid JSON: {_decode_problem(exc, body)}") from None
    except RecursionError:
        raise ApiError(400, "Request body is nested too deeply to be a Messages request") from None
    model: str = values[_Model]
    if not model:
        raise ApiError(400, "model: must not be empty")
    if len(model) > MAX_MODEL_ID:
        # It is logged, stored with the usage record and echoed in errors: a caller must not grow them at will.
        raise ApiError(400, f"model: at most {MAX_MODEL_ID} characters")
    if is_credential(model):
        raise ApiError(400, CREDENTIAL_AS_MODEL)
    if isinstance(fields, _MessagesFields):
        limit: int = values[_MaxTokens]
        # 0 is the upstream's to judge: the API takes it under a beta (Claude Code's review of a subagent's
        # report asks for verdicts on a prefilled tool call, nothing generated); the gateway refused it.
        if limit < 0:
            raise ApiError(400, "max_tokens: must not be negative")
        if limit > MAX_OUTPUT_TOKENS:
            raise ApiError(400, f"max_tokens: at most {MAX_OUTPUT_TOKENS:,}, more than any model answers")
        stream: bool = values.get(_Stream, False)
        prompt: PromptFields | None = _unanalysed(fields) if isinstance(fields, _LargeMessagesFields) else fields
        max_tokens: int | None = limit
        fast, us_only = fields.speed == "fast", fields.inference_geo == "us"
        thread = _thread(fields.thread) if fields.thread else None
    else:
        _array(fields.messages)
        stream, prompt, max_tokens = False, None, None
        fast = us_only = False
        thread = None
    session = header_fields.get(SESSION_HEADER)
    session_id = (
        header_text(session) if session else session_from_user_id(fields.metadata.user_id if fields.metadata else None)
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
        model=model,
        stream=stream,
        session_id=session_id,
        prompt=prompt,
        max_tokens=max_tokens,
        fast=fast,
        us_only=us_only,
        thread=thread,
    )


def _thread(raw: msgspec.Raw) -> Thread | None:
    """A `thread` field as routing reads it: a `create`, or a `continue` naming the reply it goes on from. None for
    anything else, which is sent on as it came, for the upstream to refuse or to take as it knows (a newer kind)."""
    try:
        field = _THREAD.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # not an object
        return None
    if field.type == "create":
        return Thread()
    previous = field.previous_message_id
    if field.type == "continue" and isinstance(previous, str) and previous:
        return Thread(previous)
    return None


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


def named_model(body: bytes, is_secret: Callable[[str], bool]) -> str:
    """The model a refused request's body names, for its usage record (`usage --by model` put every refusal
    under "-"): "" unless the body is a JSON object whose `model` is a string, at most `MAX_MODEL_ID`
    characters of it (it is stored and logged), `[redacted]` for one `is_secret` knows as a credential (asked
    of the whole: the first 128 characters of a token or a long key were kept). Shown, as every model, with its
    control characters escaped."""
    try:
        model = _NAMED_MODEL.decode(body).model
        if memoryview(model)[:1] != b'"':
            return ""
        named = _STRING.decode(model)
    except (msgspec.DecodeError, RecursionError):
        return ""
    return CREDENTIAL_PLACEHOLDER if is_secret(named) else named[:MAX_MODEL_ID]


def _array(messages: msgspec.Raw) -> None:
    """Undecoded messages are refused unless they are a JSON array; the rest is the upstream's to check."""
    if memoryview(messages)[:1] != b"[":
        _decoded_messages(_ARRAY, messages)  # raises, in the words of a whole body's refusal


# A `\uD800`–`\uDBFF` escape (the first half of a UTF-16 surrogate pair) not followed by the second half, and
# not itself escaped (`\\uD800` is text): msgspec says "Input data was truncated" of a whole body holding one.
_UNPAIRED_SURROGATE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def _decode_problem(exc: msgspec.DecodeError, body: bytes) -> str:
    """What is wrong with a body that is not JSON, as msgspec says it, but where what it says is not so."""
    if str(exc) == "Input data was truncated" and (found := _UNPAIRED_SURROGATE.search(body)) is not None:
        escape, at = found.group()[-6:].decode(), found.end() - 6
        return f"JSON is malformed: {escape} is half of a UTF-16 surrogate pair, without its other half (byte {at})"
    return str(exc)


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

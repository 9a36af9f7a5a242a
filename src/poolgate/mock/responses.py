"""Bodies the mock answers with: messages as JSON or as the real SSE event sequence, and errors."""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from poolgate.mock.cache import CacheUsage
from poolgate.mock.models import has_fast_mode
from poolgate.mock.safeguards import classifier_verdict
from poolgate.mock.tokens import estimate

# The first 16 words (the mock's default answer length) are a complete answer, so that the demo reads well.
WORDS = (
    "Hello",
    "from",
    "the",
    "poolgate",
    "mock",
    "upstream.",
    "Every",
    "answer",
    "here",
    "is",
    "generated",
    "locally,",
    "one",
    "word",
    "per",
    "token.",
    "Tests",
    "and",
    "benchmarks",
    "measure",
    "the",
    "gateway",
    "rather",
    "than",
    "the",
    "model.",
)
TOKENS_PER_DELTA = 4


def answer_words(output_tokens: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(output_tokens)]


def usage_json(
    usage: CacheUsage,
    output_tokens: int,
    web_searches: int = 0,
    modes: tuple[tuple[str, str], ...] = (),
    advisor: str | None = None,
) -> dict[str, Any]:
    """An answer's `usage`; with the `iterations` of an answer that consulted `advisor` (see `iterations`)."""
    counts = {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_creation_5m,
            "ephemeral_1h_input_tokens": usage.cache_creation_1h,
        },
        "output_tokens": output_tokens,
    }
    return {
        **counts,
        "server_tool_use": server_tool_use(web_searches),
        "service_tier": "standard",
        **dict(modes),
        **({} if advisor is None else {"iterations": iterations(counts, usage, advisor)}),
    }


def iterations(counts: dict[str, Any], usage: CacheUsage, advisor: str) -> list[dict[str, Any]]:
    """The inferences an answer that consulted the advisor ran, as its usage lists them: the executor's turn (the
    top-level counts, `message`) and the advisor's sub-inference on its own model (`advisor_message`), which read
    the whole conversation uncached and wrote the advice. Its tokens are not in the top-level counts."""
    prompt = usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
    consulted = {
        "type": "advisor_message",
        "model": advisor,
        "input_tokens": prompt,
        "output_tokens": len(ADVICE),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": None,
    }
    return [{"type": "message", **counts}, consulted]


def server_tool_use(web_searches: int) -> dict[str, int]:
    """A usage's count of server tool calls: the API counts web fetches beside web searches in every one (the
    mock runs none), and the SDK's ServerToolUsage requires both."""
    return {"web_search_requests": web_searches, "web_fetch_requests": 0}


def premium_modes(request: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The modes billed at a premium a request asks for, as its answer's usage reports what ran: fast output
    (`speed`; standard on a model without fast mode) and US-only inference (`inference_geo`)."""
    modes: list[tuple[str, str]] = []
    if request.get("speed") == "fast":
        modes.append(("speed", "fast" if has_fast_mode(str(request.get("model", ""))) else "standard"))
    if request.get("inference_geo") == "us":
        modes.append(("inference_geo", "us"))
    return tuple(modes)


def web_searches(request: dict[str, Any]) -> int:
    """How many server-side web searches the mock runs for a request: one when it offers the web search
    tool (`{"type": "web_search_20250305", "name": "web_search"}`), as a model asked a question would."""
    tools = request.get("tools")
    if not isinstance(tools, list):
        return 0
    return 1 if any(isinstance(tool, dict) and is_web_search(tool) for tool in tools) else 0


def is_web_search(tool: dict[str, Any]) -> bool:
    """Whether a tool is the server-side web search, which the API runs itself (never a `tool_use`)."""
    return str(tool.get("type", "")).startswith("web_search_")


def advisor_model(request: dict[str, Any]) -> str | None:
    """The model of the advisor tool a request offers (`{"type": "advisor_20260301", "name": "advisor", "model":
    "claude-opus-4-6"}`), which the mock consults once before its answer's text, as an executor meeting a
    question would; None when it offers none."""
    tools = request.get("tools")
    if not isinstance(tools, list):
        return None
    for tool in tools:
        if isinstance(tool, dict) and str(tool.get("type", "")).startswith("advisor_"):
            model = tool.get("model")
            return model if isinstance(model, str) and model else None
    return None


# The advice the mock's advisor gives: one token a word.
ADVICE = ("Check", "the", "failing", "case", "first,", "then", "change", "the", "code.")


def advisor_blocks() -> list[dict[str, Any]]:
    """A consultation of the advisor and its advice, as the API puts them before the answer's text: the executor's
    `server_tool_use` of the advisor (its input always empty) and the `advisor_tool_result`."""
    tool_id = "srvtoolu_mock_" + secrets.token_hex(8)
    advice = {"type": "advisor_result", "text": " ".join(ADVICE), "stop_reason": "end_turn"}
    return [
        {"type": "server_tool_use", "id": tool_id, "name": "advisor", "input": {}},
        {"type": "advisor_tool_result", "tool_use_id": tool_id, "content": advice},
    ]


SEARCH_QUERY = "poolgate mock search"


def search_blocks() -> list[dict[str, Any]]:
    """A server tool use and its result, as the API puts them before the answer's text."""
    tool_id = "srvtoolu_mock_" + secrets.token_hex(8)
    return [
        {"type": "server_tool_use", "id": tool_id, "name": "web_search", "input": {"query": SEARCH_QUERY}},
        {
            "type": "web_search_tool_result",
            "tool_use_id": tool_id,
            "content": [
                {
                    "type": "web_search_result",
                    "url": "https://example.com/poolgate",
                    "title": "poolgate mock result",
                    "encrypted_content": "bW9jaw==",
                    "page_age": None,
                }
            ],
        },
    ]


# What the mock "thinks" before it answers, when a request enables extended thinking: one token a word.
THINKING = ("The", "mock", "answers", "every", "question", "with", "the", "same", "words.")
# The value a forced tool call gives a required parameter, by its JSON schema type.
PLACEHOLDERS: dict[str, Any] = {
    "string": "mock",
    "integer": 1,
    "number": 1,
    "boolean": True,
    "array": [],
    "object": {},
    "null": None,
}
JSON_TYPES = frozenset(PLACEHOLDERS)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the mock generates for one request: its content, in order, and how it stopped."""

    words: list[str]  # the text block's; none: no text block (a tool call, a stop sequence first)
    output_tokens: int
    stop_reason: str
    stop_sequence: str | None = None
    thinking: bool = False  # a thinking block (THINKING) first
    tool_use: dict[str, Any] | None = None  # a tool call (forced, or asked for: `asked_tool`), last
    searches: int = 0  # server-side web searches, before the text
    modes: tuple[tuple[str, str], ...] = ()  # the premium modes it ran in (`premium_modes`)
    safeguard_results: list[dict[str, Any]] | None = None  # the review of its tool calls, when asked for
    advisor: str | None = None  # the model of the advisor it consulted (`advisor_model`), after the searches


def answer(request: dict[str, Any], answer_tokens: int) -> Answer:
    """The answer to a request the mock has checked (see `server._parse`) when it generates `answer_tokens`
    tokens of text at most."""
    if request["max_tokens"] == 0:  # a review alone (`safeguards.SUBAGENT_REVIEW_BETA`): nothing generated
        return Answer([], 0, "max_tokens", modes=premium_modes(request))
    thinking = thinking_enabled(request)
    thought = len(THINKING) if thinking else 0  # thinking tokens count against max_tokens
    room = request["max_tokens"] - thought
    tool = forced_tool(request) or asked_tool(request)
    if tool is not None and not is_web_search(tool):  # a forced search is run (`web_searches`), then answered
        call = tool_input(tool)
        needed = estimate(orjson.dumps(call))
        cut_off = needed > room
        if cut_off:  # max_tokens came before its input was complete: what was sent of it does not parse
            call = {}
        tool_use = {
            "type": "tool_use",
            "id": "toolu_mock_" + secrets.token_hex(12),
            "name": tool.get("name"),
            "input": call,
        }
        stop_reason = "max_tokens" if cut_off else "tool_use"
        return Answer(
            [],
            thought + min(needed, room),
            stop_reason,
            thinking=thinking,
            tool_use=tool_use,
            modes=premium_modes(request),
        )
    verdict = classifier_verdict(request)  # one word, a token as the mock counts them
    wanted = answer_tokens if verdict is None else 1
    output_tokens = max(1, min(room, wanted))
    stop_reason = "max_tokens" if room < wanted else "end_turn"
    words = answer_words(output_tokens) if verdict is None else [verdict]
    stopped = _first_stop(words, request.get("stop_sequences"))
    stop_sequence = None
    if stopped is not None:
        text, stop_sequence = stopped
        # The tokens up to the stop sequence's end were generated; the text ends before it.
        output_tokens = max(1, len((text + stop_sequence).split()))
        # Nothing before it: no text block at all (an empty one is what the API refuses in a request).
        words, stop_reason = text.split(" ") if text else [], "stop_sequence"
    return Answer(
        words,
        thought + output_tokens,
        stop_reason,
        stop_sequence,
        thinking,
        None,
        web_searches(request),
        premium_modes(request),
        advisor=advisor_model(request),
    )


def thinking_enabled(request: dict[str, Any]) -> bool:
    thinking = request.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") == "enabled"


def forced_tool(request: dict[str, Any]) -> dict[str, Any] | None:
    """The tool a request's `tool_choice` makes the model call: the named one (`{"type": "tool"}`), or for
    `{"type": "any"}` one of its own tools (the mock takes the first); None when the model may answer. The
    server has refused a choice of a tool the request does not offer (`server._tool_choice_refusal`)."""
    choice, tools = request.get("tool_choice"), request.get("tools")
    if not isinstance(choice, dict) or not isinstance(tools, list):
        return None
    if choice.get("type") == "tool":
        return next((tool for tool in tools if tool.get("name") == choice.get("name")), None)
    if choice.get("type") == "any":  # a client tool: server tools (web search) have a type of their own
        return next((tool for tool in tools if tool.get("type", "custom") == "custom"), None)
    return None


# A user turn whose text begins "use the Read tool" (any case) has the mock call the tool of that name, when the
# request offers it and `tool_choice` leaves the model the choice: a tool loop (the client runs the tool and
# sends its result, which the mock answers in words) for a demo and the tests, from Claude Code too. Only at a
# text block's start: Claude Code's reminders in the same turn mention tools ("consider using the TodoWrite
# tool") in blocks of their own.
ASKED_TOOL = re.compile(r"\s*use the ([\w-]{1,128}) tool\b", re.IGNORECASE)


def asked_tool(request: dict[str, Any]) -> dict[str, Any] | None:
    """The tool the last user turn asks for by name (see `ASKED_TOOL`), if the request offers it; None once the
    turn carries a tool's result, when `tool_choice` is `none`, and for a server tool (web search has its own
    answer)."""
    tools, messages, choice = request.get("tools"), request.get("messages"), request.get("tool_choice")
    if not isinstance(tools, list) or not messages or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    # The last turn, a `system` message after it passed over (Claude Code sends its environment so).
    last: dict[str, Any] = next((message for message in reversed(messages) if message.get("role") != "system"), {})
    content = last.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if last.get("role") != "user" or not isinstance(blocks, list):
        return None
    asked = None
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "tool_result":
            return None
        text = block.get("text")
        if asked is None and block.get("type") == "text" and isinstance(text, str):
            asked = ASKED_TOOL.match(text)
    if asked is None:
        return None
    name = asked.group(1).lower()
    return next(
        (
            tool
            for tool in tools
            if isinstance(tool, dict)
            and str(tool.get("name", "")).lower() == name
            and tool.get("type", "custom") == "custom"
        ),
        None,
    )


def tool_input(tool: dict[str, Any]) -> dict[str, Any]:
    """An input for a tool that its schema takes: each required parameter with a placeholder of its type (of
    a type list, the first: `["string", "null"]` is a string). Any schema: `schema_readable` sorts out the
    ones the API refuses, and a server tool (forced by name) has none."""
    schema = tool.get("input_schema")
    schema = schema if isinstance(schema, dict) else {}
    properties, required = schema.get("properties"), schema.get("required")
    properties = properties if isinstance(properties, dict) else {}
    found = {}
    for name in required if isinstance(required, list) else ():
        spec = properties.get(name) if isinstance(name, str) else None
        spec = spec if isinstance(spec, dict) else {}
        enum, kind = spec.get("enum"), spec.get("type")
        kind = next((each for each in kind if isinstance(each, str)), None) if isinstance(kind, list) else kind
        placeholder = PLACEHOLDERS.get(kind, "mock") if isinstance(kind, str) else "mock"
        found[str(name)] = enum[0] if isinstance(enum, list) and enum else placeholder
    return found


def schema_readable(schema: object) -> bool:
    """Whether a client tool's `input_schema` is valid JSON Schema in the parts the mock reads to call it:
    `required` a list of names, `properties` an object of schemas, and their `type` a JSON type or a list of
    them. A cheap check of what `tool_input` reads; the API validates the whole schema."""
    if schema is None:  # a server tool, or a client tool the API refuses for other reasons
        return True
    if not isinstance(schema, dict):
        return False
    required, properties = schema.get("required", []), schema.get("properties", {})
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        return False
    if not isinstance(properties, dict):
        return False
    return all(isinstance(spec, bool) or (isinstance(spec, dict) and _type_valid(spec)) for spec in properties.values())


def _type_valid(spec: dict[str, Any]) -> bool:
    kind = spec.get("type", "object")
    if isinstance(kind, list):
        return bool(kind) and all(isinstance(each, str) and each in JSON_TYPES for each in kind)
    return isinstance(kind, str) and kind in JSON_TYPES


def _first_stop(words: list[str], sequences: object) -> tuple[str, str] | None:
    """The text of `words` before the first stop sequence in it, and that sequence; None when none occurs."""
    if not isinstance(sequences, list) or not sequences:
        return None
    text = " ".join(words)
    found = [(at, len(seq), seq) for seq in sequences if isinstance(seq, str) and seq and (at := text.find(seq)) >= 0]
    if not found:
        return None
    at, _, seq = min(found)
    return text[:at], seq


def signature() -> str:
    return base64.b64encode(secrets.token_bytes(48)).decode()


def message_id() -> str:
    return "msg_mock_" + secrets.token_hex(12)


def content_json(answer: Answer) -> list[dict[str, Any]]:
    """The answer's blocks in the API's order: thinking, the searches it decided on, then the answer."""
    content = []
    if answer.thinking:
        content.append({"type": "thinking", "thinking": " ".join(THINKING), "signature": signature()})
    if answer.searches:
        content += search_blocks()
    if answer.advisor is not None:
        content += advisor_blocks()
    if answer.tool_use is not None:
        content.append(answer.tool_use)
    elif answer.words:
        content.append({"type": "text", "text": " ".join(answer.words)})
    return content


def message_json(model: str, usage: CacheUsage, answer: Answer, reply_id: str) -> bytes:
    return orjson.dumps(
        {
            "id": reply_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content_json(answer),
            "stop_reason": answer.stop_reason,
            "stop_sequence": answer.stop_sequence,
            **_reviewed(answer),
            "usage": usage_json(usage, answer.output_tokens, answer.searches, answer.modes, answer.advisor),
        }
    )


def _reviewed(answer: Answer) -> dict[str, Any]:
    """An answer's `safeguard_results` field (the review of its tool calls, `mock.safeguards`), when it has one."""
    return {} if answer.safeguard_results is None else {"safeguard_results": answer.safeguard_results}


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _block_events(
    index: int, block: dict[str, Any], deltas: list[tuple[dict[str, Any], int]]
) -> list[tuple[bytes, int]]:
    """One content block's events: its start, its deltas (each with the output tokens it carries), its stop."""
    events = [
        (event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}), 0)
    ]
    for delta, tokens in deltas:
        events.append(
            (event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}), tokens)
        )
    events.append((event("content_block_stop", {"type": "content_block_stop", "index": index}), 0))
    return events


def _chunked(words: Sequence[str]) -> list[tuple[str, int]]:
    """Words as the deltas stream them, TOKENS_PER_DELTA a delta, with the tokens of each."""
    return [
        ((" " if i else "") + " ".join(words[i : i + TOKENS_PER_DELTA]), len(words[i : i + TOKENS_PER_DELTA]))
        for i in range(0, len(words), TOKENS_PER_DELTA)
    ]


def _streamed_blocks(answer: Answer) -> list[tuple[dict[str, Any], list[tuple[dict[str, Any], int]]]]:
    """Each content block as it starts and the deltas that fill it, in order."""
    blocks: list[tuple[dict[str, Any], list[tuple[dict[str, Any], int]]]] = []
    if answer.thinking:
        thoughts = [({"type": "thinking_delta", "thinking": text}, tokens) for text, tokens in _chunked(THINKING)]
        blocks.append(
            (
                {"type": "thinking", "thinking": "", "signature": ""},
                [*thoughts, ({"type": "signature_delta", "signature": signature()}, 0)],
            )
        )
    if answer.searches:
        use, result = search_blocks()
        query = {"type": "input_json_delta", "partial_json": orjson.dumps(use["input"]).decode()}
        blocks += [({**use, "input": {}}, [(query, 0)]), (result, [])]
    if answer.advisor is not None:
        use, result = advisor_blocks()
        blocks += [(use, []), (result, [])]
    if answer.tool_use is not None:
        arguments = orjson.dumps(answer.tool_use["input"]).decode()
        half = len(arguments) // 2  # in pieces, as the API streams a tool's input: only the whole parses
        deltas = [
            ({"type": "input_json_delta", "partial_json": arguments[:half]}, 0),
            ({"type": "input_json_delta", "partial_json": arguments[half:]}, estimate(arguments)),
        ]
        blocks.append(({**answer.tool_use, "input": {}}, deltas))
    elif answer.words:
        texts = [({"type": "text_delta", "text": text}, tokens) for text, tokens in _chunked(answer.words)]
        blocks.append(({"type": "text", "text": ""}, texts))
    return blocks


def stream_events(model: str, usage: CacheUsage, answer: Answer, reply_id: str) -> list[tuple[bytes, int]]:
    """The SSE events in order, each with the number of output tokens it carries (for pacing)."""
    start = {
        "type": "message_start",
        "message": {
            "id": reply_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_json(usage, 1, modes=answer.modes),
        },
    }
    events = [(event("message_start", start), 0)]
    for index, (block, deltas) in enumerate(_streamed_blocks(answer)):
        events += _block_events(index, block, deltas)
    events.insert(2, (event("ping", {"type": "ping"}), 0))  # after the first block's start, as the API does
    # The API repeats the prompt's counts in message_delta: its usage there is cumulative, not an increment
    # (the SDKs overwrite message_start's counts with it; a reader adding the two would bill the prompt twice).
    final_usage: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "output_tokens": answer.output_tokens,
    }
    if answer.searches:
        final_usage["server_tool_use"] = server_tool_use(answer.searches)
    if answer.advisor is not None:  # known once the advisor has run: in the final usage only
        final_usage["iterations"] = iterations(final_usage.copy(), usage, answer.advisor)
    delta = {"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence, **_reviewed(answer)}
    events += [
        (event("message_delta", {"type": "message_delta", "delta": delta, "usage": final_usage}), 0),
        (event("message_stop", {"type": "message_stop"}), 0),
    ]
    return events


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {401: "invalid x-api-key", 429: "Number of requests has exceeded your rate limit", 529: "Overloaded"}


def request_id() -> str:
    return "req_mock_" + secrets.token_hex(12)


def error_json(
    status: int, message: str | None = None, request: str | None = None, details: dict[str, Any] | None = None
) -> bytes:
    """The API's error body; `request` is its request id, which newer answers carry as `request_id`, and `details`
    its `error.details` (an `error_code` clients act on, e.g. `thread_not_found`)."""
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    text = message or ERROR_MESSAGES.get(status, "Internal server error" if status >= 500 else "Invalid request")
    error: dict[str, Any] = {"type": kind, "message": text}
    if details is not None:
        error["details"] = details
    body: dict[str, Any] = {"type": "error", "error": error}
    if request is not None:
        body["request_id"] = request
    return orjson.dumps(body)


def error_response(
    status: int,
    message: str | None = None,
    headers: Mapping[str, str] | None = None,
    details: dict[str, Any] | None = None,
) -> web.Response:
    """An error as the API answers it: its body with the request id that its `request-id` header names."""
    request = request_id()
    return web.Response(
        status=status,
        body=error_json(status, message, request, details),
        content_type="application/json",
        headers={"request-id": request, **(headers or {})},
    )


def overloaded_event() -> bytes:
    return event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})

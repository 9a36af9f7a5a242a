"""The mock Anthropic upstream as an aiohttp application, its admin API, and start/stop helpers."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from poolgate.api.model_ids import snapshot
from poolgate.api.model_pages import page_window
from poolgate.mock.cache import INVALID_TTL, MAX_BREAKPOINTS, Block, PromptCache, attribution_tokens, blocks_of
from poolgate.mock.config import Fault, MockConfig, MockKey
from poolgate.mock.models import max_output_tokens, min_cacheable_tokens, model_line, thinking_refused
from poolgate.mock.oauth import EXPIRED_MESSAGE, INVALID_MESSAGE, MockOAuth, add_oauth_routes, bearer
from poolgate.mock.ratelimit import Window
from poolgate.mock.responses import (
    answer,
    content_json,
    error_response,
    forced_tool,
    message_id,
    message_json,
    overloaded_event,
    request_id,
    schema_readable,
    stream_events,
    thinking_enabled,
)
from poolgate.mock.safeguards import reviewed_calls, reviews_only, reviews_tool_calls, safeguard_results
from poolgate.mock.strict import is_claude_model, unknown_fields, unknown_message
from poolgate.mock.threads import Resolved, ThreadRefusal, ThreadStore, thread_of
from poolgate.mock.tokens import estimate
from poolgate.mock.tool_pairs import tool_pairing_refusal

JSON = "application/json"
log = logging.getLogger(__name__)
MIN_THINKING_BUDGET = 1024
INVALID_SCHEMA_MESSAGE = (
    "JSON schema is invalid. It must match JSON Schema draft 2020-12 (https://json-schema.org/draft/2020-12). "
    "Learn more about tool use at https://docs.anthropic.com/en/docs/tool-use."
)


@dataclass
class MockStats:
    requests_total: int = 0
    requests_by_key: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0  # requests whose client left before its answer was written whole
    resets: int = 0  # connections reset by an injected fault (`Fault.reset_connection`)
    in_flight: int = 0
    last_request_headers: dict[str, str] = field(default_factory=dict)
    last_request_body: bytes = b""
    oauth_token_calls: int = 0  # every call to the OAuth token endpoint, whatever the grant or answer
    oauth_token_calls_by_grant: dict[str, int] = field(default_factory=dict)
    oauth_usage_calls: int = 0  # every call to the subscription usage endpoint, whatever the answer

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["last_request_body"]
        return data


class MockState:
    """Everything the mock remembers: per-key limits, windows, caches and faults, plus counters."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.stats = MockStats()
        self.windows: dict[str, Window] = {}
        # One prompt cache per key and model, as the API's: a prefix one model wrote is cold for another, and
        # warm for an alias of it (keyed by its dated snapshot).
        self.caches: dict[tuple[str, str], PromptCache] = {}
        self.faults: dict[str, Fault] = {}
        self.threads: dict[str, ThreadStore] = {}  # each key's message threads, as the API holds an account's
        # Each key accept_any_key admits gets its own copy (its own `times`), until faults are cleared.
        self.default_fault = config.default_key.fault
        self.oauth = MockOAuth(config.oauth)
        for key, settings in config.keys.items():
            if settings.fault is not None:
                self.faults[key] = settings.fault

    def reset(self) -> None:
        self.stats = MockStats()
        self.windows.clear()
        self.caches.clear()
        self.threads.clear()

    def limits(self, key: str) -> MockKey | None:
        found = self.config.keys.get(key)
        if found is None and self.config.accept_any_key:
            found = self.config.keys[key] = replace(self.config.default_key)
            if self.default_fault is not None and key not in self.faults:  # one set for it already stands
                self.faults[key] = replace(self.default_fault)
        return found

    def clear_faults(self) -> None:
        self.faults.clear()
        self.default_fault = None

    def take_fault(self, key: str, streamed: bool) -> Fault | None:
        """The key's fault if it applies to a request (one that changes streams only: to a stream), counted as
        used once more."""
        fault = self.faults.get(key)
        if fault is None or (fault.stream_only and not streamed):
            return None
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[key]
        return fault

    def serves(self, model: str) -> bool:
        """Whether the model exists here: any real Claude id, and the config's own (listed or not)."""
        config = self.config
        return is_claude_model(model) or model in config.models or model in config.unlisted_models

    def cache(self, key: str, model: str) -> PromptCache:
        model = snapshot(model)
        cache = self.caches.get((key, model))
        if cache is None:
            minimum = self.config.min_cacheable_tokens
            cache = PromptCache(
                min_cacheable_tokens(model) if minimum is None else minimum, self.config.cache_entries_per_key
            )
            self.caches[key, model] = cache
        return cache

    def thread_store(self, key: str) -> ThreadStore:
        store = self.threads.get(key)
        if store is None:
            store = self.threads[key] = ThreadStore(self.config.threads)
        return store

    def window(self, key: str, now: float) -> Window:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = Window()
        window.roll(now)
        return window


def _key(request: web.Request) -> str:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth[:7].lower() == "bearer " else ""


# What the API says to a request without a credential (a wrong one is `invalid x-api-key`).
MISSING_KEY_MESSAGE = "x-api-key header is required"


def _unauthenticated(key: str) -> web.Response:
    return error_response(401, None if key else MISSING_KEY_MESSAGE)


# The API's versions (https://docs.anthropic.com/en/api/versioning); every request names one.
API_VERSIONS = frozenset(("2023-01-01", "2023-06-01", "2026-10-21"))
NEWEST_VERSION = max(API_VERSIONS)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def version_known(version: str) -> bool:
    """Whether the API takes an `anthropic-version`: one of its versions, or a date after the newest the mock
    knows (a newer SDK's, which the demo must keep serving); an invented older date is refused."""
    return version in API_VERSIONS or (_DATE.fullmatch(version) is not None and version > NEWEST_VERSION)


def _version_refusal(request: web.Request) -> web.Response | None:
    headers = request.headers.getall("anthropic-version", [])
    if not headers:
        return error_response(400, "anthropic-version: header is required")
    version = ", ".join(headers)  # two (a proxy adding its own) reach the API joined: no version either
    if not version_known(version):
        return error_response(400, f"anthropic-version: {orjson.dumps(version).decode()} is not a valid version")
    return None


def _model_not_found(model: str) -> web.Response:
    return error_response(404, f"model: {model}")  # the API's answer, word for word, for a model it does not have


def _parse(body: bytes, required: tuple[str, ...], threads: ThreadStore, betas: str = "") -> Resolved | web.Response:
    """The request body, checked as the API checks it, with the conversation it continues (`threads`, the key's);
    `betas` is its `anthropic-beta` header."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return error_response(400, "Request body is not valid JSON")
    if not isinstance(request, dict):
        return error_response(400, "Request body must be a JSON object")
    for name in required:
        if name not in request:
            return error_response(400, f"{name}: Field required")
    resolved = _resolve(request, threads)
    if not isinstance(resolved, Resolved):
        return resolved
    request = resolved.request
    refusal = (
        _model_refusal(request["model"])
        or _messages_refusal(request["messages"])
        or tool_pairing_refusal(request["messages"])
        or _system_refusal(request.get("system"))
        or _tools_refusal(request.get("tools"))
        or _tool_choice_refusal(request.get("tool_choice"), request.get("tools"))
        or _cache_control_type_refusal(request, "")
    )
    if refusal is None and "max_tokens" in required:  # count_tokens takes no max_tokens
        refusal = (
            _max_tokens_refusal(
                request["max_tokens"], max_output_tokens(request["model"], betas), request["model"], betas
            )
            or _stream_refusal(request.get("stream"))
            or _thinking_refusal(request)
        )
    return resolved if refusal is None else error_response(400, refusal)


def _resolve(request: dict[str, Any], threads: ThreadStore) -> Resolved | web.Response:
    """The request with the conversation it continues, or the API's refusal when it holds none to continue."""
    thread = thread_of(request)
    if thread is None or not isinstance(request["messages"], list):  # the latter refused as it is
        return Resolved(request, False)
    resolved = threads.resolve(request, thread, time.monotonic())
    if isinstance(resolved, ThreadRefusal):
        details = None if resolved.error_code is None else {"error_code": resolved.error_code}
        return error_response(resolved.status, resolved.message, details=details)
    return resolved


# Each `_…_refusal` is the API's 400 message for a field it would not take, or None. As the API does,
# content blocks, system blocks and tools must be objects (which also keeps arbitrarily nested arrays out of
# the prompt-cache simulation).


def _model_refusal(model: object) -> str | None:
    return None if isinstance(model, str) else "model: Input should be a valid string"


# Claude Code 2.1 sends `system` messages too, which the API takes (empty ones too: see `_messages_refusal`).
ROLES = ("user", "assistant", "system")


def _messages_refusal(messages: object) -> str | None:
    if not isinstance(messages, list):
        return "messages: Input should be a valid list"
    if not messages:
        return "messages: at least one message is required"
    last = len(messages) - 1
    for at, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(content, str | list):
            return f"messages.{at}: Input should be an object with a string or list content"
        role = message.get("role")
        if role is None:
            return f"messages.{at}.role: Field required"
        if role not in ROLES:
            return f"messages.{at}.role: Input should be 'user' or 'assistant'"
        # A prefill may be empty, and so may a `system` message: Claude Code's per-turn controls
        # (`per-turn-control-2026-07-01`) are system messages with `content: []` and an `output_config`.
        if not content and role != "system" and not (at == last and role == "assistant"):
            return (
                f"messages.{at}: all messages must have non-empty content except for the optional final assistant "
                "message"
            )
        if isinstance(content, str) and content.isspace():  # a string is one text block to the API
            return WHITESPACE_ONLY
        if isinstance(content, list) and (refusal := _content_refusal(content, at)) is not None:
            return refusal
    return _prefill_refusal(messages[last])


# Two of the API's most met 400s: a text block of whitespace alone (a tool or hook that returned a blank line),
# and a prefill (a final assistant message) that ends in whitespace.
WHITESPACE_ONLY = "messages: text content blocks must contain non-whitespace text"
TRAILING_WHITESPACE = "messages: final assistant content cannot end with trailing whitespace"


def _prefill_refusal(message: dict[str, Any]) -> str | None:
    content = message["content"]
    if isinstance(content, list):
        block = content[-1] if content else None
        content = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
    ends_in_whitespace = isinstance(content, str) and content[-1:].isspace()
    return TRAILING_WHITESPACE if message.get("role") == "assistant" and ends_in_whitespace else None


def _content_refusal(content: list[Any], at: int) -> str | None:
    for index, block in enumerate(content):
        if not isinstance(block, dict):
            return f"messages.{at}.content.{index}: Input should be a valid dictionary or object"
        kind = block.get("type")
        if kind is None:
            return f"messages.{at}.content.{index}.type: Field required"
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                return f"messages.{at}.content.{index}.text: Input should be a valid string"
            if not text:
                return "messages: text content blocks must be non-empty"
            if text.isspace():
                return WHITESPACE_ONLY
        if (refusal := _cache_control_type_refusal(block, f"messages.{at}.content.{index}.{kind}")) is not None:
            return refusal
    return None


def _system_refusal(system: object) -> str | None:
    if system is None or isinstance(system, str):
        return None
    if not isinstance(system, list):
        return "system: Input should be a valid string or a list of text blocks"
    for at, block in enumerate(system):
        if not isinstance(block, dict):
            return f"system.{at}: Input should be a valid dictionary or object"
        if block.get("type") != "text":
            return f"system.{at}.type: Input should be 'text'"
        text = block.get("text")
        if not isinstance(text, str):
            return f"system.{at}.text: Input should be a valid string"
        if not text:
            return "system: text content blocks must be non-empty"
        if (refusal := _cache_control_type_refusal(block, f"system.{at}")) is not None:
            return refusal
    return None


def _tools_refusal(tools: object) -> str | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        return "tools: Input should be a valid list"
    bad = _first_non_object(tools)
    if bad is not None:
        return f"tools.{bad}: Input should be a valid dictionary or object"
    bad = next((at for at, tool in enumerate(tools) if not schema_readable(tool.get("input_schema"))), None)
    if bad is not None:
        return f"tools.{bad}.custom.input_schema: {INVALID_SCHEMA_MESSAGE}"
    for at, tool in enumerate(tools):
        if (refusal := _cache_control_type_refusal(tool, f"tools.{at}.{tool.get('type', 'custom')}")) is not None:
            return refusal
    return None


def _tool_choice_refusal(choice: object, tools: list[dict[str, Any]] | None) -> str | None:
    """The API's 400 for a `tool_choice` that forces a tool (`any`, or `tool` by name) the request does not
    offer; `tools` has passed `_tools_refusal`."""
    if not isinstance(choice, dict) or choice.get("type") not in ("any", "tool"):
        return None
    if not tools:
        return "tool_choice may only be specified while providing tools."
    if choice["type"] == "any":
        return None
    name = choice.get("name")
    if name is None:
        return "tool_choice.tool.name: Field required"
    if not any(tool.get("name") == name for tool in tools):
        return f"tool_choice.tool.name: {orjson.dumps(name).decode()} is not the name of a tool in tools"
    return None


def _cache_control_type_refusal(block: dict[str, Any], at: str) -> str | None:
    """The API's 400 for a block's `cache_control` (the request's when `at` is empty) that is not an ephemeral
    one, the only type there is: the prompt-cache simulation would take it for no breakpoint at all."""
    control = block.get("cache_control")
    if control is None:
        return None
    field = f"{at}.cache_control" if at else "cache_control"
    if not isinstance(control, dict):
        return f"{field}: Input should be a valid dictionary or object"
    kind = control.get("type")
    if kind is None:
        return f"{field}: Unable to extract tag using discriminator 'type'"
    if kind != "ephemeral":
        return f"{field}: Input tag '{kind}' found using 'type' does not match any of the expected tags: 'ephemeral'"
    return None


def _max_tokens_refusal(max_tokens: object, limit: int, model: str, betas: str) -> str | None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        return "max_tokens: Input should be a valid integer"
    if max_tokens < 1:  # the beta read only then: every request passes here
        least = 0 if reviews_only(betas) else 1
        if max_tokens < least:
            return f"max_tokens: Input should be greater than or equal to {least}"
    if max_tokens > limit:
        return f"max_tokens: {max_tokens} > {limit}, which is the maximum allowed number of output tokens for {model}"
    return None


def _stream_refusal(stream: object) -> str | None:
    # "yes" or 1 would read as true here; the API takes a boolean only.
    return None if stream is None or isinstance(stream, bool) else "stream: Input should be a valid boolean"


# How the API tells a model's thinking mode apart from the one refused (`thinking_refused`).
USE_ADAPTIVE = 'Use "thinking.type.adaptive" and "output_config.effort" to control thinking behavior.'


def _thinking_mode_refusal(request: dict[str, Any]) -> str | None:
    thinking, config = request.get("thinking"), request.get("output_config")
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    effort = config.get("effort") if isinstance(config, dict) else None
    if not thinking_refused(request["model"], kind, effort):
        return None
    if kind == "adaptive":
        return "adaptive thinking is not supported on this model"
    return f'"thinking.type.{kind}" is not supported for this model. {USE_ADAPTIVE}'


def _thinking_refusal(request: dict[str, Any]) -> str | None:
    if (refusal := _thinking_mode_refusal(request)) is not None or not thinking_enabled(request):
        return refusal
    budget = request["thinking"].get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool):
        return "thinking.enabled.budget_tokens: Input should be a valid integer"
    if budget < MIN_THINKING_BUDGET:
        return f"thinking.enabled.budget_tokens: Input should be greater than or equal to {MIN_THINKING_BUDGET}"
    if request["max_tokens"] <= budget:
        return "`max_tokens` must be greater than `thinking.budget_tokens`"
    if forced_tool(request) is not None:
        return "Thinking may not be enabled when tool_choice forces tool use."
    return None


def _cache_control_refusal(blocks: list[Block]) -> str | None:
    ttls = [block.ttl for block in blocks if block.ttl is not None]
    if len(ttls) > MAX_BREAKPOINTS:
        return f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(ttls)}."
    if INVALID_TTL in ttls:
        return "cache_control.ephemeral.ttl: Input should be '5m' or '1h'"
    if "5m" in ttls and "1h" in ttls[ttls.index("5m") :]:
        return (
            "cache_control.ttl: a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. "
            "Note that blocks are processed in the following order: `tools`, `system`, `messages`."
        )
    return None


def _first_non_object(items: list[Any]) -> int | None:
    return next((at for at, item in enumerate(items) if not isinstance(item, dict)), None)


def _prompt_tokens(request: dict[str, Any], blocks: list[Block], body: bytes) -> int:
    """The whole prompt's tokens: its cacheable blocks and Claude Code's attribution block, which the API
    keeps out of the cache but counts (and bills) as input."""
    tokens = (blocks[-1].prefix_tokens if blocks else 0) + attribution_tokens(request)
    return tokens or estimate(body)


async def _first_byte_delay(fault: Fault | None) -> None:
    if fault is not None and fault.ttfb_ms:
        await asyncio.sleep(fault.ttfb_ms / 1000)


class _ResetByFault(asyncio.CancelledError):
    """The handler of a request whose connection a fault reset: it ends without an answer, as one whose client
    left does, but the mock did it (not counted as `cancelled`)."""


class MockApp:
    def __init__(self, state: MockState) -> None:
        self.state = state

    async def _admit(self, request: web.Request) -> tuple[str, MockKey, Fault | None] | web.StreamResponse:
        """Authenticate, then apply an injected fault or the rate limit; a response means "stop here"."""
        key = _key(request)
        token = bearer(request) if "x-api-key" not in request.headers else ""
        limits: MockKey | None
        if token and self.state.oauth.is_oauth_token(token):
            # A subscription bearer token: its account stands in for the key ("oauth:<account>").
            account = self.state.oauth.authenticate(token, time.time())
            if isinstance(account, str):
                return error_response(401, EXPIRED_MESSAGE if account == "expired" else INVALID_MESSAGE)
            key, limits = "oauth:" + account.id, self.state.config.default_key
        else:
            limits = self.state.limits(key)
        if limits is None:
            return _unauthenticated(key)
        refusal = _version_refusal(request)
        if refusal is not None:
            return refusal
        stats = self.state.stats
        stats.requests_by_key[key] = stats.requests_by_key.get(key, 0) + 1
        # Whether the request is a stream is not known yet: a fault for streams only is taken when one starts.
        fault = self.state.take_fault(key, streamed=False)
        if fault is not None and (fault.reset_connection or fault.status is not None):
            await _first_byte_delay(fault)
            if fault.reset_connection:
                if request.transport is not None:
                    request.transport.abort()
                self.state.stats.resets += 1
                raise _ResetByFault
            if fault.status is not None:
                headers = {"x-should-retry": "true"} if fault.status in (429, 529) else {}
                if fault.status == 429:  # the API's 429s carry the key's rate-limit windows too
                    headers.update(self.state.window(key, time.monotonic()).headers(limits))
                if fault.retry_after is not None:
                    # Whole seconds, as the API sends; rounded up, so that a client waits at least as long.
                    headers["retry-after"] = str(math.ceil(fault.retry_after))
                return error_response(fault.status, headers=headers)
        return key, limits, fault

    async def messages(self, request: web.Request) -> web.StreamResponse:
        stats = self.state.stats
        stats.requests_total += 1
        stats.in_flight += 1
        try:
            return await self._messages(request)
        except _ResetByFault:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            stats.cancelled += 1
            raise
        finally:
            stats.in_flight -= 1

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.state.stats.last_request_headers = dict(request.headers)
        self.state.stats.last_request_body = body
        admitted = await self._admit(request)
        if isinstance(admitted, web.StreamResponse):
            return admitted
        key, limits, fault = admitted

        async def refused(response: web.Response) -> web.Response:
            # A slow account is slow to refuse too: a TTFB fault taken for this request (its `times` counted
            # it) delays its refusal as it would its answer.
            await _first_byte_delay(fault)
            return response

        threads = self.state.thread_store(key)
        resolved = _parse(body, ("model", "messages", "max_tokens"), threads, request.headers.get("anthropic-beta", ""))
        if isinstance(resolved, web.Response):
            return await refused(resolved)
        parsed = resolved.request
        if not self.state.serves(parsed["model"]):
            return await refused(_model_not_found(parsed["model"]))
        blocks = blocks_of(parsed)
        refusal = _cache_control_refusal(blocks)
        if refusal is not None:
            return await refused(error_response(400, refusal))
        account = self.state.oauth.accounts.get(key[6:]) if key.startswith("oauth:") else None
        if account is not None:
            account.requests_by_model[parsed["model"]] = account.requests_by_model.get(parsed["model"], 0) + 1
            refusal_of_account = self.state.oauth.refusal(request.headers, parsed, account, time.time())
            if refusal_of_account is not None:
                return await refused(refusal_of_account)
        now = time.monotonic()
        window = self.state.window(key, now)
        prompt, cache = _prompt_tokens(parsed, blocks, body), self.state.cache(key, parsed["model"])
        # A prompt that fits whatever the cache holds is not looked up twice (the hot path's case).
        too_long = window.too_long(limits, prompt) and window.too_long(limits, prompt - cache.readable(blocks, now))
        if window.exhausted(limits) or too_long:
            retry = max(1, int(window.retry_after(now) + 0.999))
            # As the API's (and the mock's injected) 429s: the SDKs retry on `x-should-retry` and `retry-after`.
            headers = {"retry-after": str(retry), "x-should-retry": "true", **window.headers(limits)}
            return await refused(error_response(429, too_long or None, headers=headers))
        generated = answer(parsed, self.state.config.output_tokens)
        if reviews_tool_calls(parsed, request.headers.get("anthropic-beta", "")):
            review = safeguard_results(reviewed_calls(parsed, generated.tool_use))
            generated = replace(generated, safeguard_results=review)
        reply_id = message_id()
        if resolved.thread:
            reply = {"role": "assistant", "content": content_json(generated)}
            threads.hold(resolved, len(body), reply_id, reply, now)
        output_tokens = generated.output_tokens
        usage = cache.use(blocks, prompt, now)
        window.requests += 1
        window.input_tokens += usage.input_tokens + usage.cache_creation_input_tokens
        window.output_tokens += output_tokens
        if account is not None:
            # Subscription quota counts what the request cost; cache reads are cheap, as on the real service.
            spent = usage.input_tokens + usage.cache_creation_input_tokens + output_tokens
            self.state.oauth.charge(account, spent + usage.cache_read_input_tokens / 10, time.time(), parsed["model"])
            headers = {"request-id": request_id(), **self.state.oauth.headers(account, time.time(), parsed["model"])}
        else:
            headers = {"request-id": request_id(), **window.headers(limits)}
        # After the windows counted the request: the API counts it as it arrives, then takes its time, so a slow
        # answer reports the windows as they were then (a quicker answer to a request sent after it reports less).
        await _first_byte_delay(fault)
        model = parsed["model"]
        if not parsed.get("stream"):
            response = web.Response(
                body=message_json(model, usage, generated, reply_id),
                content_type=JSON,
                headers=headers,
            )
            compress = self.state.config.compress
            if compress == "always":  # an upstream (or a proxy before it) that ignores `accept-encoding`
                response.enable_compression(force=web.ContentCoding.gzip)
            elif compress:
                response.enable_compression()
            return response
        events = stream_events(model, usage, generated, reply_id)
        return await self._stream(request, headers, events, fault or self.state.take_fault(key, streamed=True))

    async def _stream(
        self, request: web.Request, headers: dict[str, str], events: list[tuple[bytes, int]], fault: Fault | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={**headers, "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        )
        pace = fault.tokens_per_second if fault is not None else None
        fail_after = fault.midstream_error_after if fault is not None else None
        try:
            await response.prepare(request)
            for sent, (data, tokens) in enumerate(events):
                if fail_after is not None and sent >= fail_after:
                    await response.write(overloaded_event())
                    break
                if pace and tokens:
                    await asyncio.sleep(tokens / pace)
                await response.write(data)
            await response.write_eof()
        except ConnectionResetError:
            # The client left mid-stream (as a load generator's connections do when it stops): counted, not a
            # traceback in the log for every one.
            self.state.stats.cancelled += 1
        return response

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        admitted = await self._admit(request)
        if isinstance(admitted, web.StreamResponse):
            return admitted
        await _first_byte_delay(admitted[2])
        resolved = _parse(body, ("model", "messages"), self.state.thread_store(admitted[0]))
        if isinstance(resolved, web.Response):
            return resolved
        parsed = resolved.request
        if not self.state.serves(parsed["model"]):
            return _model_not_found(parsed["model"])
        blocks = blocks_of(parsed)
        refusal = _cache_control_refusal(blocks)
        if refusal is not None:
            return error_response(400, refusal)
        return web.json_response(
            {"input_tokens": _prompt_tokens(parsed, blocks, body)}, headers={"request-id": request_id()}
        )

    def _models_refusal(self, request: web.Request) -> web.Response | None:
        token = bearer(request)
        if token and self.state.oauth.is_oauth_token(token):
            if isinstance(self.state.oauth.authenticate(token, time.time()), str):
                return error_response(401)
        elif self.state.limits(key := _key(request)) is None:
            return _unauthenticated(key)
        return _version_refusal(request)

    async def models(self, request: web.Request) -> web.StreamResponse:
        refusal = self._models_refusal(request)
        if refusal is not None:
            return refusal
        page = model_page(self.state.config.models, request.query)
        if isinstance(page, str):
            return error_response(400, page)
        return web.json_response(page, headers={"request-id": request_id()})

    async def model(self, request: web.Request) -> web.StreamResponse:
        refusal = self._models_refusal(request)
        if refusal is not None:
            return refusal
        model = request.match_info["model"]
        if not self.state.serves(model):
            return _model_not_found(model)
        listed = self.state.config.models
        if model in listed:
            return web.json_response(model_json(model, listed.index(model)), headers={"request-id": request_id()})
        # An unlisted one: older than any listed, and an alias named as the dated model it stands for, as the API
        # resolves it (`claude-opus-4-1` is `claude-opus-4-1-20250805`).
        return web.json_response(model_json(snapshot(model), len(listed)), headers={"request-id": request_id()})

    async def probe(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    # ----- admin (tests and demos inject faults here) -----

    async def set_fault(self, request: web.Request) -> web.StreamResponse:
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return error_response(400, str(exc))
        # msgspec would skip an unknown field: `{"stauts": 500}` would install a fault that does nothing.
        unknown = unknown_fields(data, Fault)
        if unknown:
            return error_response(400, unknown_message(unknown))
        try:
            fault = msgspec.convert(data, Fault)
        except msgspec.ValidationError as exc:
            return error_response(400, str(exc))
        key = request.match_info["key"]
        # Its keys, and its subscription accounts as `oauth:<account id>`: a misspelt one would install a fault
        # no request ever meets.
        known = [*self.state.config.keys, *(f"oauth:{account}" for account in self.state.oauth.accounts)]
        if key not in known and not self.state.config.accept_any_key:
            return error_response(400, f"{key!r} is not a key this mock serves (its keys: {', '.join(sorted(known))})")
        self.state.faults[key] = fault
        return web.json_response({"ok": True})

    async def clear_faults(self, request: web.Request) -> web.StreamResponse:
        self.state.clear_faults()
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.state.stats.as_json())

    async def reset(self, request: web.Request) -> web.StreamResponse:
        self.state.reset()
        return web.json_response({"ok": True})


# aiohttp's reasons ("Not Found", "Method Not Allowed") are the API's messages too; this one is not.
TOO_LARGE_MESSAGE = "Request exceeds the maximum allowed number of bytes."


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error in the API's shape, request id included: aiohttp answers an unknown path, a wrong method,
    an oversize body or a handler's crash in plain text, which no client of the API expects."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == JSON:  # a redirect, or the admin API's own JSON refusal
            raise
        message = TOO_LARGE_MESSAGE if exc.status == 413 else exc.reason
        allow = {"allow": exc.headers["allow"]} if "allow" in exc.headers else {}
        return error_response(exc.status, message, allow)
    except Exception:
        log.exception("mock upstream: %s %s failed", request.method, request.path)
        return error_response(500)


def create_mock_app(config: MockConfig, state: MockState | None = None) -> web.Application:
    handlers = MockApp(state or MockState(config))
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[api_errors])
    app.router.add_post("/v1/messages", handlers.messages)
    app.router.add_post("/v1/messages/count_tokens", handlers.count_tokens)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/v1/models/{model}", handlers.model)
    app.router.add_get("/", handlers.probe)  # also answers HEAD, which Claude Code probes with
    app.router.add_get("/api/hello", handlers.probe)  # where Claude Code opens its connection (HEAD), as the API
    app.router.add_post("/_mock/faults/{key}", handlers.set_fault)
    app.router.add_delete("/_mock/faults", handlers.clear_faults)
    app.router.add_get("/_mock/stats", handlers.stats)
    app.router.add_post("/_mock/reset", handlers.reset)
    add_oauth_routes(app, handlers.state)
    return app


# The newest listed model's release date; each one after it in the config's list is a day older, so that the
# list is newest first (as the API's is) and every model has its own `created_at`.
NEWEST_MODEL_CREATED = datetime(2026, 1, 15, tzinfo=UTC)


def model_json(model: str, age: int) -> dict[str, Any]:
    """The Models API's object for a model, `age` days older than the newest: every model the mock serves is
    `active` (a `lifecycle` the SDK's ModelInfo requires), with its line and the largest `max_tokens` it takes."""
    created = (NEWEST_MODEL_CREATED - timedelta(days=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "type": "model",
        "id": model,
        "display_name": display_name(model),
        "created_at": created,
        "lifecycle": "active",
        "line": model_line(model),
        "max_tokens": max_output_tokens(model, ""),
    }


def model_page(models: Sequence[str], query: Mapping[str, str]) -> dict[str, Any] | str:
    """One page of the model list as the API pages it (`limit`, `after_id`, `before_id`: `page_window`); a
    string is the 400's message."""
    window = page_window(models, query.get("limit"), query.get("after_id"), query.get("before_id"))
    if isinstance(window, str):
        return window
    data = [model_json(model, age) for age, model in enumerate(models[window.start : window.end], window.start)]
    return {
        "data": data,
        "has_more": window.has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


_MODEL_ID = re.compile(r"claude-(?:(\d+)-(?:(\d)-)?([a-z]+)|([a-z]+)-(\d+)(?:-(\d))?)(?:-\d{8})?")


def display_name(model: str) -> str:
    """The name the Models API shows for an id: "Claude Sonnet 4.5" for `claude-sonnet-4-5-20250929`, and
    for the older `claude-3-5-haiku-20241022` "Claude Haiku 3.5"; other ids title-cased."""
    match = _MODEL_ID.fullmatch(model)
    if match is None:
        return model.replace("-", " ").title()
    old_major, old_minor, old_family, family, major, minor = match.groups()
    family, major, minor = (old_family, old_major, old_minor) if family is None else (family, major, minor)
    return f"Claude {family.title()} {major}" + (f".{minor}" if minor else "")


class MockServer:
    def __init__(self, runner: web.AppRunner, state: MockState, host: str, port: int) -> None:
        self._runner = runner
        self.state = state
        self.port = port
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def stats(self) -> MockStats:
        return self.state.stats

    def set_fault(self, key: str, fault: Fault) -> None:
        self.state.faults[key] = fault

    def clear_faults(self) -> None:
        self.state.clear_faults()

    async def stop(self) -> None:
        await self._runner.cleanup()


async def start_mock(
    config: MockConfig, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None
) -> MockServer:
    """The mock, serving on `host`:`port` (0: any free port), or on `sock` when given (bound already)."""
    state = MockState(config)
    # handler_cancellation: a client that goes away cancels its handler, which is how the mock sees it.
    runner = web.AppRunner(create_mock_app(config, state), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    bound = runner.addresses[0]
    return MockServer(runner, state, host if sock is None else bound[0], bound[1])


def run_mock(config: MockConfig, sock: socket.socket, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve on `sock` (see `poolgate.serve.bind`: a port taken is an error before anything runs) until
    Ctrl-C or SIGTERM; `on_ready` gets the URL once it listens."""

    async def main() -> None:
        server = await start_mock(config, sock=sock)
        if on_ready is not None:
            on_ready(server.url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    from poolgate.serve import run

    run(main)

"""Usage is read from streams however the bytes are split, and from JSON bodies."""

from __future__ import annotations

import json

import msgspec
import orjson
from hypothesis import given
from hypothesis import strategies as st

from poolgate.lifecycle.accounting import billable, usage_record
from poolgate.lifecycle.context import RequestContext
from poolgate.lifecycle.relay import RelayResult
from poolgate.lifecycle.usage import MAX_COUNT, StreamUsageScanner, read_iterations, usage_from_json


def sse(event: str, data: dict[str, object]) -> bytes:
    return f"event: {event}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


STREAM = b"".join(
    [
        sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "usage": {
                        "input_tokens": 12,
                        "cache_creation_input_tokens": 3000,
                        "cache_read_input_tokens": 40000,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        sse("ping", {"type": "ping"}),
        sse("content_block_delta", {"type": "content_block_delta", "delta": {"text": 'say "message_delta"'}}),
        sse(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 77}},
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]
)


def scanned(stream: bytes, cuts: list[int]) -> StreamUsageScanner:
    """The scanner after the stream, fed in the pieces `cuts` makes of it, and its end."""
    scanner = StreamUsageScanner()
    start = 0
    for point in [*sorted(set(cuts)), len(stream)]:
        scanner.feed(stream[start:point])
        start = max(start, point)
    scanner.close()
    return scanner


@given(st.lists(st.integers(1, len(STREAM)), max_size=30))
def test_usage_is_the_same_however_the_stream_is_chunked(cuts: list[int]) -> None:
    scanner = scanned(STREAM, cuts)
    usage = scanner.usage
    assert (usage.input_tokens, usage.output_tokens) == (12, 77), "a complete stream's own count stands"
    assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (3000, 40000)
    assert scanner.error_type is None


def text_stream(texts: list[str]) -> bytes:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 50, "output_tokens": 1}}}
    return sse("message_start", start) + b"".join(
        sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
        )
        for t in texts
    )


@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=50), st.data())
def test_a_stream_cut_short_is_billed_an_estimate_of_the_output_it_delivered(
    texts: list[str], data: st.DataObject
) -> None:
    """The client left (Claude Code's Esc) or the upstream broke off before the final usage: the tokens
    generated so far are billed upstream, so the record estimates them from the deltas passed on (~4
    bytes a token, at least one a delta) rather than keep message_start's 1."""
    stream = text_stream(texts)
    cut = data.draw(st.integers(0, len(stream)))
    scanner = StreamUsageScanner()
    scanner.feed(stream[:cut])
    scanner.close()
    usage = scanner.usage
    # What was passed on: the text of the deltas whose line was complete.
    passed = stream[:cut]
    complete = passed[: passed.rfind(b"\n") + 1].count(b'"type":"content_block_delta"')  # lines ended
    text_bytes = sum(len(orjson.dumps(t)) - 2 for t in texts[: max(0, complete)])
    if complete > 0:
        assert usage.output_tokens == max(complete, -(-text_bytes // 4))
        assert usage.input_tokens == 50
    else:  # message_start's own count, if its line was complete
        assert usage.output_tokens in (0, 1)


@given(st.lists(st.integers(1, 2000), max_size=40))
def test_a_cut_streams_estimate_is_the_same_however_it_was_chunked(cuts: list[int]) -> None:
    """Pings, a thinking block's signature and the chunking of the stream change nothing."""
    signature = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "signature_delta", "signature": "s" * 800},
    }
    stream = (
        text_stream([f"word{i} " * 3 for i in range(20)])
        + sse("ping", {"type": "ping"})
        + sse("content_block_delta", signature)
    )
    whole = StreamUsageScanner()
    whole.feed(stream)
    whole.close()
    chunked = scanned(stream, cuts)
    text_bytes = sum(len(f"word{i} " * 3) for i in range(20))
    assert chunked.usage.output_tokens == whole.usage.output_tokens == max(21, -(-text_bytes // 4))


def searched_stream(results: list[bool]) -> bytes:
    """A stream whose model ran a web search per entry of `results` (True: its results came; False: the search
    failed, which the API does not bill), each a `server_tool_use` block and its `web_search_tool_result`."""
    events = [sse("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 9}}})]
    for index, found in enumerate(results):
        tool_id = f"srvtoolu_{index}"
        use = {"type": "server_tool_use", "id": tool_id, "name": "web_search", "input": {}}
        content: object = (
            [{"type": "web_search_result", "url": "https://example.com", "title": "web_search_tool_result_error"}]
            if found
            else {"type": "web_search_tool_result_error", "error_code": "unavailable"}
        )
        result = {"type": "web_search_tool_result", "tool_use_id": tool_id, "content": content}
        for block in (use, result):
            events.append(
                sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
            )
            events.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    return b"".join(events)


@given(st.lists(st.booleans(), max_size=4), st.lists(st.integers(1, 4000), max_size=20))
def test_a_cut_stream_is_billed_the_web_searches_whose_results_it_passed_on(
    results: list[bool], cuts: list[int]
) -> None:
    """A stream's search count comes only in its final message_delta: a client that left after the results of a
    search (or an upstream breaking off) left it at 0, and the searches the upstream ran and billed cost nothing
    (twenty cut streams ran 4 times a $0.05 budget in searches, none refused). A search that failed is no charge,
    as the API bills none; a stream that reports its count is billed that count."""
    stream = searched_stream(results)
    scanner = scanned(stream, cuts)
    assert scanner.usage.web_search_requests == sum(results)
    reported = {"type": "message_delta", "usage": {"output_tokens": 5, "server_tool_use": {"web_search_requests": 1}}}
    whole = scanned(stream + sse("message_delta", reported), cuts)
    assert whole.usage.web_search_requests == 1


def advised_stream(advice: list[bool], compacted: bool = False) -> bytes:
    """A stream whose model consulted the advisor once per entry of `advice` (True: its advice came; False: the
    consultation failed, an `advisor_tool_result_error`, which the API does not bill), after a compaction's block
    when `compacted`."""
    events = [sse("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 9}}})]
    blocks: list[dict[str, object]] = [{"type": "compaction", "content": "Summary.", "encrypted_content": None}]
    for index, advised in enumerate(advice):
        tool_id = f"srvtoolu_{index}"
        content = (
            {"type": "advisor_result", "text": 'reads "advisor_tool_result_error"', "stop_reason": "end_turn"}
            if advised
            else {"type": "advisor_tool_result_error", "error_code": "overloaded"}
        )
        blocks += [
            {"type": "server_tool_use", "id": tool_id, "name": "advisor", "input": {}},
            {"type": "advisor_tool_result", "tool_use_id": tool_id, "content": content},
        ]
    for index, block in enumerate(blocks if compacted else blocks[1:]):
        start = {"type": "content_block_start", "index": index, "content_block": block}
        events.append(sse("content_block_start", start))
        events.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    return b"".join(events)


ADVISOR_ITERATION = {"type": "advisor_message", "model": "claude-opus-4-6", "input_tokens": 90, "output_tokens": 40}


@given(st.lists(st.booleans(), max_size=3), st.booleans(), st.lists(st.integers(1, 4000), max_size=20))
def test_a_cut_stream_after_an_advisors_advice_or_a_compaction_has_an_unknown_cost(
    advice: list[bool], compacted: bool, cuts: list[int]
) -> None:
    """An advisor's sub-inference (on its own model, Opus, reading the whole conversation) and a compaction are
    reported only in the final usage's `iterations`: a stream cut after the advice or the compaction's block was
    passed on (Claude Code's Esc) was priced as the executor's turn alone, the consultation free. Its cost is
    unknown now (a budget is charged the request's reservation, which holds the consultations). A consultation
    that failed is no charge; a stream that reports its iterations is priced by them."""
    stream = advised_stream(advice, compacted)
    cut = scanned(stream, cuts)
    assert cut.usage.incomplete == (any(advice) or compacted)
    unknown = "usage-incomplete" if cut.usage.incomplete else ""
    assert (billable(cut.usage).unknown, cut.usage.unreported) == (unknown, False)
    iterations = [ADVISOR_ITERATION] * sum(advice) + ([COMPACTION] if compacted else [])
    reported = {"type": "message_delta", "usage": {"output_tokens": 5, "iterations": iterations}}
    whole = scanned(stream + sse("message_delta", reported), cuts)
    assert not whole.usage.incomplete
    assert len(whole.usage.advisors) == sum(advice)


def test_a_cut_streams_estimate_never_exceeds_max_tokens() -> None:
    scanner = StreamUsageScanner(max_tokens=50)
    scanner.feed(text_stream(["long words here " * 10] * 10))
    scanner.close()
    assert scanner.usage.output_tokens == 50


def test_a_cut_stream_of_english_text_is_estimated_near_its_token_count() -> None:
    words = ("The quick brown fox jumps over the lazy dog while the gateway counts. " * 40).split(" ")
    scanner = StreamUsageScanner()
    scanner.feed(text_stream([" ".join(words[i : i + 3]) + " " for i in range(0, len(words), 3)]))
    scanner.close()
    # ~14 words a sentence, ~1.3 tokens a word: ~700 tokens. The estimate is in the right range.
    assert 500 <= scanner.usage.output_tokens <= 900


def test_crlf_streams_and_error_events_are_understood() -> None:
    scanner = StreamUsageScanner()
    scanner.feed(STREAM.replace(b"\n", b"\r\n"))
    scanner.feed(sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    assert scanner.usage.output_tokens == 77
    assert (scanner.error_type, scanner.error_message) == ("overloaded_error", "Overloaded")


def test_an_error_event_ending_the_stream_without_its_line_end_is_read_at_its_close() -> None:
    scanner = StreamUsageScanner()
    scanner.feed(STREAM[: STREAM.index(b"event: message_delta")])
    scanner.feed(b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"Internal"}}')
    assert scanner.finished
    scanner.close()
    assert (scanner.error_type, scanner.error_message) == ("api_error", "Internal")


@given(st.binary(max_size=300))
def test_garbage_never_crashes_the_scanner(garbage: bytes) -> None:
    scanner = StreamUsageScanner()
    scanner.feed(garbage)
    scanner.feed(b'\ndata: {"type":"message_delta","usage":{"output_tokens":"many"}}\n')
    assert scanner.usage.output_tokens == 0


def test_usage_from_a_json_body() -> None:
    body = orjson.dumps({"type": "message", "usage": {"input_tokens": 5, "output_tokens": 9}})
    usage = usage_from_json(body)
    assert (usage.input_tokens, usage.output_tokens) == (5, 9)
    assert usage_from_json(b"not json") is None and usage_from_json(b"[1]") is None  # no answer of the API's


def test_the_one_hour_share_of_cache_writes_is_read_from_streams_and_bodies() -> None:
    usage = {
        "input_tokens": 3,
        "cache_creation_input_tokens": 900,
        "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 700},
        "output_tokens": 1,
    }
    scanner = StreamUsageScanner()
    scanner.feed(sse("message_start", {"type": "message_start", "message": {"usage": usage}}))
    assert (scanner.usage.cache_creation_input_tokens, scanner.usage.cache_creation_1h_input_tokens) == (900, 700)
    body = usage_from_json(orjson.dumps({"usage": usage}))
    assert body.cache_creation_1h_input_tokens == 700
    odd = usage_from_json(orjson.dumps({"usage": {**usage, "cache_creation": {"ephemeral_1h_input_tokens": -4}}}))
    assert odd.cache_creation_1h_input_tokens == 0 and odd.cache_creation_input_tokens == 900


def test_the_usage_record_keeps_the_one_hour_share_as_billed() -> None:
    """An upstream reporting more 1-hour writes than writes was billed at most the writes (see `billable`), yet
    its record kept them as written: a ledger with more 1-hour cache writes than cache writes."""
    usage = usage_from_json(
        orjson.dumps(
            {"usage": {"cache_creation_input_tokens": 100, "cache_creation": {"ephemeral_1h_input_tokens": 600}}}
        )
    )
    assert usage is not None
    ctx = RequestContext("req_1", "messages", "/v1/messages", b"", [], b"{}", "m")
    ctx.timed_from(0.0, 0.0)
    record = usage_record(ctx, RelayResult(status=200, usage=usage), None, ended=0.0)
    assert (record.cache_creation_input_tokens, record.cache_creation_1h_input_tokens) == (100, 100)
    assert billable(usage).cache_creation_1h == 100


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@given(st.dictionaries(st.sampled_from(["input_tokens", "output_tokens", "cache_read_input_tokens"]), JSON_VALUES))
def test_only_plausible_integer_counts_are_taken_from_usage(fields: dict[str, object]) -> None:
    """Booleans, floats, negatives and numbers past MAX_COUNT (a trillion) are not token counts: the answer is
    still served and its record still written, with those counts at 0 — and a JSON answer's cost unknown, not
    its other counts' alone (with `output_tokens` as `"50"`, its input alone was billed)."""

    def plausible(sent: object) -> bool:
        return type(sent) is int and 0 <= sent <= MAX_COUNT

    # The standard library writes integers of any size, as an upstream might.
    body = usage_from_json(json.dumps({"usage": fields}).encode())
    scanner = StreamUsageScanner()
    scanner.feed(b"data: " + json.dumps({"type": "message_delta", "usage": fields}).encode() + b"\n")
    for usage in (body, scanner.usage):
        for name in ("input_tokens", "output_tokens", "cache_read_input_tokens"):
            value, sent = getattr(usage, name), fields.get(name)
            assert type(value) is int and 0 <= value <= MAX_COUNT
            assert value == (sent if plausible(sent) else 0)
    assert body is not None
    misreported = any(sent is not None and not plausible(sent) for sent in fields.values())
    assert body.unreported == (misreported or not any(plausible(sent) for sent in fields.values()))


def test_a_count_too_large_for_the_store_is_ignored_and_leaves_the_cost_unknown() -> None:
    """Priced, a count of 10**15 web searches cost more µUSD than the store's integers hold: the usage writer
    could not store the batch that held its record, other callers' records with it."""
    usage = usage_from_json(b'{"usage":{"input_tokens":123456789012345678901234567890,"output_tokens":5}}')
    assert (usage.input_tokens, usage.output_tokens, usage.unreported) == (0, 5, True)
    assert usage_from_json(b'{"usage":{"cache_read_input_tokens":true}}').cache_read_input_tokens == 0
    searched = b'{"usage":{"input_tokens":9,"output_tokens":5,"server_tool_use":{"web_search_requests":%d}}}'
    assert usage_from_json(searched % 10**15).unreported and usage_from_json(searched % 10**15).web_search_requests == 0
    assert not usage_from_json(searched % 3).unreported
    # The API's cache counts may be null: not reported, and the rest stands.
    assert not usage_from_json(
        b'{"usage":{"input_tokens":9,"output_tokens":5,"cache_read_input_tokens":null}}'
    ).unreported


def test_usage_survives_an_answer_nested_deeper_than_a_decoder_goes() -> None:
    """A model's tool input can nest arbitrarily deep; the answer is still billed."""
    deep = b"[" * 5000 + b"]" * 5000
    body = (
        b'{"content":[{"type":"tool_use","input":{"x":' + deep + b'}}],"usage":{"input_tokens":5,'
        b'"cache_creation":{"ephemeral_1h_input_tokens":2},"cache_creation_input_tokens":3,"output_tokens":7}}'
    )
    usage = usage_from_json(body)
    assert (usage.input_tokens, usage.output_tokens) == (5, 7)
    assert (usage.cache_creation_input_tokens, usage.cache_creation_1h_input_tokens) == (3, 2)
    scanner = StreamUsageScanner()
    scanner.feed(b'data: {"type":"content_block_delta","x":' + deep + b"}\n")
    scanner.feed(STREAM)
    assert scanner.usage.output_tokens == 77


def test_an_event_with_an_unexpected_message_field_still_counts() -> None:
    scanner = StreamUsageScanner()
    scanner.feed(b'data: {"type":"message_delta","message":"odd","usage":{"output_tokens":9}}\n')
    scanner.feed(b'data: {"type":"error","message":"odd","error":{"type":"overloaded_error"}}\n')
    assert scanner.usage.output_tokens == 9 and scanner.error_type == "overloaded_error"


def test_a_cut_tool_call_is_estimated_by_its_input_not_its_framing() -> None:
    """A tool call's input deltas were counted with a text delta's (shorter) framing: a cut tool-use stream
    was billed ~2.5 times the output it delivered."""
    parts = ['{"command": "ls', ' -la", "descri', 'ption": "list"}']
    stream = b"".join(
        sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": part}},
        )
        for part in parts
    )
    scanner = StreamUsageScanner()
    scanner.feed(stream)
    scanner.close()
    # 45 bytes of JSON input (escaped: ~55) at ~4 bytes a token: about a dozen tokens, not 3 deltas' framing.
    assert 3 <= scanner.usage.output_tokens <= 16


def split_sse(event: str, data: dict[str, object]) -> bytes:
    """The event with its data over several `data:` lines (JSON pretty-printed, a line each): valid SSE."""
    lines = json.dumps(data, indent=1).splitlines()
    return f"event: {event}\n".encode() + b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"


SPLIT_ERROR = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


@given(st.lists(st.integers(1, 2000), max_size=30), st.booleans())
def test_events_whose_data_spans_several_lines_are_read_however_the_stream_is_chunked(
    cuts: list[int], ends_with_error: bool
) -> None:
    """SSE joins an event's data lines; the API sends one, a proxy before it may pretty-print: such a stream's
    usage was lost, and its error event was not seen (recorded as a break, with the gateway's error after)."""
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 12, "cache_read_input_tokens": 40}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 77}}
    stream = split_sse("message_start", start) + sse("ping", {"type": "ping"})
    stream += split_sse("error", SPLIT_ERROR) if ends_with_error else split_sse("message_delta", delta)
    scanner = scanned(stream, cuts)
    assert (scanner.usage.input_tokens, scanner.usage.cache_read_input_tokens) == (12, 40)
    if ends_with_error:
        assert (scanner.error_type, scanner.error_message, scanner.finished) == ("overloaded_error", "Overloaded", True)
    else:
        assert (scanner.usage.output_tokens, scanner.error_type) == (77, None)


def test_a_split_events_last_line_read_at_the_streams_end() -> None:
    """An error event split over lines whose last line has no line end (the upstream closed right after it)."""
    scanner = StreamUsageScanner()
    scanner.feed(split_sse("error", SPLIT_ERROR).rstrip(b"\n"))
    scanner.close()
    assert scanner.error_type == "overloaded_error"


def test_data_lines_without_an_end_are_not_gathered_without_bound() -> None:
    scanner = StreamUsageScanner()
    scanner.feed(b'data: {"type": "error",\n' + b'data: "x": 1,\n' * 10_000)
    assert scanner._split is None or len(scanner._split) <= 256


def test_many_events_that_are_not_json_in_one_read_are_passed_over() -> None:
    scanner = StreamUsageScanner()
    scanner.feed(
        b"data: [DONE]\n\n" * 5000 + sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 9}})
    )
    assert scanner.usage.output_tokens == 9


def test_a_cut_streams_estimate_counts_deltas_whose_data_spans_several_lines() -> None:
    """Pretty-printed deltas were passed over: a stream cut short was billed 1 output token however much text
    it had delivered."""
    deltas = [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "word " * 8}}] * 5
    plain = text_stream(["word " * 8] * 5)
    pretty = plain.split(b"event: content_block_delta")[0] + b"".join(
        split_sse("content_block_delta", d) for d in deltas
    )
    assert scanned(pretty, []).usage.output_tokens >= 5
    assert scanned(pretty, []).usage.output_tokens >= scanned(plain, []).usage.output_tokens


EVENTS = [
    ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
    ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 77, "cache_read_input_tokens": 5}}),
    ("error", SPLIT_ERROR),
]


@given(
    st.lists(st.tuples(st.sampled_from(EVENTS), st.booleans()), max_size=12),
    st.sampled_from([b"\r\n", b"\r"]),
    st.lists(st.integers(1, 3000), max_size=20),
    st.booleans(),
)
def test_a_stream_reads_the_same_whatever_its_line_ends_and_chunks(
    events: list[tuple[tuple[str, dict[str, object]], bool]], line_end: bytes, cuts: list[int], other_ends: bool
) -> None:
    """Events on one data line or several, lines ended by \\n, \\r\\n or \\r, the stream in any pieces: the usage,
    the error and the estimate of a stream cut short are what the same stream fed whole with \\n says."""
    stream = b"".join((split_sse if split else sse)(name, data) for (name, data), split in events)
    reference = scanned(stream, [])
    other = stream.replace(b"\n", line_end) if other_ends else stream
    for scanner in (scanned(other, cuts), scanned(stream, cuts)):
        assert scanner.usage == reference.usage
        assert (scanner.error_type, scanner.error_message) == (reference.error_type, reference.error_message)


def test_a_crlf_cut_between_its_cr_and_lf_ends_one_line_not_two() -> None:
    """Read as a line ended by the \\r and an empty one, a \\r\\n cut in two ended an event split over several
    data lines halfway: its content was miscounted (7 output tokens for 12)."""
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
    stream = (split_sse("content_block_delta", delta) * 2).replace(b"\n", b"\r\n")
    whole = scanned(stream, [])
    for at in range(1, len(stream)):
        if stream[at - 1 : at + 1] == b"\r\n":
            assert scanned(stream, [at]).usage == whole.usage


COMPACTION = {"type": "compaction", "input_tokens": 1800, "output_tokens": 30, "cache_read_input_tokens": 5}
ITERATION_FIELDS = st.sampled_from(
    ["type", "model", "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"]
)
ITERATION = st.dictionaries(ITERATION_FIELDS, JSON_VALUES | st.sampled_from(["compaction", "advisor_message", "x"]))


@given(JSON_VALUES | st.lists(ITERATION | JSON_VALUES, max_size=6))
def test_iterations_of_any_shape_are_read_without_fault(iterations: object) -> None:
    """An upstream's `iterations` that are not what the API sends are passed over entry by entry: the answer is
    still billed its top level, and whatever entries read as iterations."""
    compaction, advisors = read_iterations(iterations)
    counted = [compaction] if compaction is not None else []
    for iteration in [*counted, *advisors]:
        assert all(0 <= count <= MAX_COUNT for count in msgspec.structs.astuple(iteration)[1:])
    assert all(type(advisor.model) is str and advisor.model for advisor in advisors)
    body = usage_from_json(json.dumps({"usage": {"input_tokens": 5, "iterations": iterations}}).encode())
    assert body is not None and body.input_tokens == 5 + (compaction.input_tokens if compaction else 0)


@given(st.booleans(), st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=3))
def test_a_streams_compaction_is_counted_once_whichever_of_its_events_report_it(
    at_start: bool, deltas: list[tuple[bool, bool]]
) -> None:
    """`message_start` and each `message_delta` may carry the iterations, and a delta may or may not repeat the
    input count: the compaction's tokens are in the counts once."""
    opening: dict[str, object] = {"input_tokens": 100, "output_tokens": 1}
    events = [
        {
            "type": "message_start",
            "message": {"usage": {**opening, "iterations": [COMPACTION]} if at_start else opening},
        }
    ]
    for iterations, with_input in deltas:
        usage: dict[str, object] = {"output_tokens": 40, **({"input_tokens": 100} if with_input else {})}
        events.append(
            {"type": "message_delta", "usage": {**usage, "iterations": [COMPACTION]} if iterations else usage}
        )
    scanner = StreamUsageScanner()
    scanner.feed(b"".join(sse(str(event["type"]), event) for event in events))
    scanner.close()
    counted = at_start or any(iterations for iterations, _ in deltas)
    assert (scanner.usage.input_tokens, scanner.usage.output_tokens, scanner.usage.cache_read_input_tokens) == (
        (1900, 70, 5) if counted else (100, 40, 0)
    )


def test_a_compaction_is_counted_in_an_answer_nested_deeper_than_a_decoder_goes() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    usage = {"input_tokens": 5, "output_tokens": 7, "iterations": [{**COMPACTION, "cache_creation": {"x": 1}}]}
    body = b'{"content":[{"type":"tool_use","input":{"x":' + deep + b'}}],"usage":' + orjson.dumps(usage) + b"}"
    counted = usage_from_json(body)
    assert counted is not None and not counted.unreported
    assert (counted.input_tokens, counted.output_tokens) == (1805, 37)

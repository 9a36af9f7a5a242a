"""Counting a request's images: a prompt's tokens are estimated from its bytes, and an image is far from its
bytes both ways (a screenshot's base64 is hundreds of thousands of "tokens", an image by URL a few dozen)."""

from __future__ import annotations

import base64
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolgate.api.anthropic import decode_request
from poolgate.api.images import (
    IMAGE_TOKENS_MAX,
    NO_IMAGES,
    ImageLoad,
    images_in_content,
)
from poolgate.cache.breakpoints import PromptPrefix, prompt_prefix
from poolgate.lifecycle.policy import BYTES_PER_TOKEN, estimate_tokens
from poolgate.mock.tokens import IMAGE_TOKENS, block_estimate, estimate

EPHEMERAL = {"type": "ephemeral"}


def base64_image(data: str) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}


URL_IMAGE = {"type": "image", "source": {"type": "url", "url": "https://example.test/a.png"}}
FILE_IMAGE = {"type": "image", "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}}

# Blocks that are not images, some naming "image" as a value or holding text that reads like one.
plain_blocks = st.sampled_from(
    [
        {"type": "text", "text": "an image"},
        {"type": "text", "text": '{"type": "image", "source": {"data": "AAAA"}}'},
        {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"type": "image", "data": "QUJD"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "image"}},
        # Its `source` is a URL, a string.
        {"type": "search_result", "source": "https://example.test", "title": "image", "content": []},
    ]
)
images = st.one_of(
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", max_size=300).map(base64_image),
    st.just(URL_IMAGE),
    st.just(FILE_IMAGE),
)


def prefix_of(request: dict[str, Any]) -> PromptPrefix:
    """The cache analysis of `request` as the gateway makes it of the body it receives."""
    body = orjson.dumps(request)
    ctx = decode_request("messages", "req", "/v1/messages", b"", [], body)
    assert ctx.prompt is not None
    return prompt_prefix(ctx.prompt, body, request["model"])


def _wrapped(blocks: list[dict[str, Any]], how: int) -> list[dict[str, Any]]:
    """The blocks as a message holds them, or inside a tool result, or a document of its own content."""
    if how == 1:
        return [{"type": "tool_result", "tool_use_id": "toolu_1", "content": blocks}]
    if how == 2:
        return [{"type": "document", "source": {"type": "content", "content": blocks}}]
    return blocks


@st.composite
def messages(draw: st.DrawFn) -> tuple[list[dict[str, Any]], int, int]:
    """Messages with images among other blocks, at any depth; with the count and base64 bytes they hold."""
    count = data_bytes = 0
    result = []
    for _ in range(draw(st.integers(1, 4))):
        blocks = []
        for block in draw(st.lists(st.one_of(plain_blocks, images), max_size=5)):
            if block["type"] == "image":
                count += 1
                data = block["source"].get("data")
                data_bytes += len(orjson.dumps(data)) if data is not None else 0
            blocks.append(block)
        content: Any = _wrapped(blocks, draw(st.integers(0, 2))) if blocks else draw(st.sampled_from(["image", ""]))
        result.append({"role": draw(st.sampled_from(["user", "assistant"])), "content": content})
    return result, count, data_bytes


@given(messages())
def test_every_image_block_is_counted_at_any_depth_and_nothing_else(found: tuple[list[Any], int, int]) -> None:
    conversation, count, data_bytes = found
    body = orjson.dumps({"model": "claude-sonnet-5", "max_tokens": 5, "messages": conversation})
    # Message by message, as the cache analysis counts them.
    total = NO_IMAGES
    for message in conversation:
        total += images_in_content(orjson.dumps(message["content"]))
    assert total == ImageLoad(count, data_bytes)
    # And from the messages as the gateway decodes a request on its way in, for a budget's estimate.
    ctx = decode_request("messages", "req", "/v1/messages", b"", [], body)
    assert ctx.prompt is not None and ctx.prompt.messages is not None and ctx.prefix is None
    expected = ImageLoad(count, data_bytes).tokens(len(body), BYTES_PER_TOKEN) + 1
    assert estimate_tokens(ctx)[0] == expected


def test_an_image_type_spelled_with_escapes_is_an_image() -> None:
    """The upstream reads `"\\u0069mage"` as "image": unseen, a hundred images by URL cost a budget almost
    nothing."""
    content = orjson.dumps([URL_IMAGE] * 3)
    assert images_in_content(content.replace(b'"image"', b'"\\u0069mage"')) == ImageLoad(3, 0)


def test_json_of_a_shape_not_foreseen_counts_every_image_it_names() -> None:
    """The upstream may read a block this module does not (a search result's string `source` was one): taken
    for no images, its images by URL were estimated at their few bytes. Each `"image"` is one then."""
    unforeseen = orjson.dumps([{"type": "future_block", "source": ["a"]}, URL_IMAGE, URL_IMAGE])
    assert images_in_content(unforeseen) == ImageLoad(2, 0)
    assert images_in_content(unforeseen.replace(b'"image"', b'"\\u0069mage"')) == ImageLoad(2, 0)
    assert images_in_content(b'[{"type": 7}, "imagery"]') is NO_IMAGES


def test_a_screenshot_counts_as_the_most_an_image_costs_not_as_its_base64() -> None:
    screenshot = base64.b64encode(bytes(range(256)) * 3600).decode()  # ~1.2 MB of base64
    content = orjson.dumps([{"type": "tool_result", "tool_use_id": "t", "content": [base64_image(screenshot)]}])
    found = images_in_content(content)
    assert found.count == 1 and found.data_bytes == len(screenshot) + 2
    tokens = found.tokens(len(content), 4)
    assert IMAGE_TOKENS_MAX <= tokens < IMAGE_TOKENS_MAX + 100


def test_the_cache_analysis_counts_a_messages_images_in_its_prompt_tokens() -> None:
    """Routing weighs an account's token windows by the prompt's tokens: a screenshot turn was 300,000."""
    screenshot = base64.b64encode(bytes(1_200_000)).decode()
    request = {
        "model": "claude-sonnet-5",
        "max_tokens": 5,
        "system": [{"type": "text", "text": "x" * 4000, "cache_control": EPHEMERAL}],
        "messages": [{"role": "user", "content": [base64_image(screenshot), {"type": "text", "text": "what?"}]}],
    }
    prefix = prefix_of(request)
    assert prefix.images == ImageLoad(1, len(screenshot) + 2)
    assert IMAGE_TOKENS_MAX < prefix.prompt_tokens < IMAGE_TOKENS_MAX + 1_200
    # A request that asks for no caching is not analysed: its images are not looked for there (the budget
    # estimate looks for them itself).
    del request["system"][0]["cache_control"]
    assert prefix_of(request).images is None


def test_the_mock_bills_an_image_at_a_screenshots_tokens_whatever_its_base64() -> None:
    """What the demo's usage shows of an image: about a screenshot's tokens, as the API bills one, not 250,000."""
    for block in (base64_image("QUJD"), base64_image("A" * 1_000_000), URL_IMAGE, FILE_IMAGE):
        # The block's own JSON (its type, media type, URL) is a few dozen bytes.
        assert IMAGE_TOKENS <= block_estimate(orjson.dumps(block)) <= IMAGE_TOKENS + 30
    text = orjson.dumps({"type": "text", "text": "A" * 1_000_000})
    assert block_estimate(text) == estimate(text)


@pytest.mark.parametrize("image", [b'"image"', b'"\\u0069mage"'])
def test_a_budget_estimate_of_a_million_tiny_messages_does_not_decode_them(image: bytes) -> None:
    """Messages too many to decode on the way in (one object each: ~200 MB and ~0.4 s of the event loop for a
    32 MiB body) were decoded for the budget estimate once the body named an image, 2 s of the event loop for
    every such request of a budgeted caller. Each image named in it counts, escaped or not."""
    tiny = b'{"role":"user","content":[{"type":"text","text":"x"}]},'
    last = b'{"role":"user","content":[{"type":' + image + b',"source":{"type":"url","url":"u"}}]}'
    body = b'{"model":"m","max_tokens":1,"messages":[' + tiny * ((2**25 - 200) // len(tiny)) + last + b"]}"
    ctx = decode_request("messages", "req", "/v1/messages", b"", [], body)
    assert ctx.prompt is not None and ctx.prompt.messages is None
    tracemalloc.start()
    try:
        prompt, _ = estimate_tokens(ctx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(body)  # copies of the body (its escapes counted), not an object per message
    assert prompt >= len(body) // BYTES_PER_TOKEN + IMAGE_TOKENS_MAX

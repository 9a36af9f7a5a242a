"""The images of a Messages request: how many, and how many bytes of the body their base64 takes.

A prompt's size in tokens is estimated from its bytes (budgets reserve by it, routing weighs an account's
token windows by it), and for an image that is far off both ways. Its base64 is priced by size at hundreds of
thousands of tokens for a screenshot (a 1.2 MB one reserved ~$2 of a budget under Opus), while the API reads
an image in 28×28-pixel patches, one token each, after resizing one larger than the model's native
resolution: at most 4,784 tokens for the models that read up to 2,576 px on the long edge, about 1,600 for
those before (Anthropic's vision guide). And an image given by URL or file id is a few dozen bytes that may
cost as much: by size, a hundred of them slipped a budget's estimate at almost nothing. So an image counts as
`IMAGE_TOKENS_MAX` and its base64 as nothing.
"""

from __future__ import annotations

import msgspec

from poolgate.api.escapes import hides_words, words_hidden

__all__ = [
    "IMAGE_TOKENS_MAX",
    "NO_IMAGES",
    "ImageLoad",
    "images_in_content",
    "images_named_in",
]

# The most prompt tokens one image costs (4,784 patches, and the few tokens of its block), on every model.
IMAGE_TOKENS_MAX = 5_000
_IMAGE = b'"image"'


class ImageLoad(msgspec.Struct, frozen=True, gc=False):
    """Images found (`count`) and the bytes their base64 data takes in the body (`data_bytes`)."""

    count: int = 0
    data_bytes: int = 0

    def __add__(self, other: ImageLoad) -> ImageLoad:
        return ImageLoad(self.count + other.count, self.data_bytes + other.data_bytes)

    def tokens(self, size: int, bytes_per_token: int) -> int:
        """A prompt of `size` bytes holding these images, in tokens: its other bytes by size, each image at
        the most it costs."""
        return (size - self.data_bytes) // bytes_per_token + self.count * IMAGE_TOKENS_MAX


NO_IMAGES = ImageLoad()


class _Source(msgspec.Struct):
    data: msgspec.Raw = msgspec.Raw()
    content: _Content = None  # a document's own blocks (`"type": "content"`)


class _Block(msgspec.Struct):
    type: str = ""
    # A search result's is its URL: one read as an object failed its whole message, and hid its images.
    source: _Source | str | None = None
    # A tool result's blocks, a search result's; an object in a server tool's result (web fetch).
    content: _Content = None


_Content = str | list[_Block] | _Block | None


_CONTENT = msgspec.json.Decoder(_Content)


def images_in_content(content: bytes) -> ImageLoad:
    """The images of one message's `content` (its JSON)."""
    if not _may_hold_images(content):
        return NO_IMAGES
    try:
        return _load(_CONTENT.decode(content))
    except (msgspec.DecodeError, RecursionError):  # a ValidationError is a DecodeError
        return images_named_in(content)


def images_named_in(data: bytes) -> ImageLoad:
    """The images of JSON not read as blocks: a body of messages too many to decode (an object each took ~2 s
    of the event loop for 32 MiB of them), or content of a shape not foreseen here, which the upstream may
    read all the same (a search result's string `source` was one: taken for none, its images by URL were
    estimated at their few bytes). Each `"image"` in it is one, and so may be each letter behind an escape
    (`"\\u0069mage"`); their base64, if any, is counted by size."""
    return ImageLoad(data.count(_IMAGE) + words_hidden(data))


def _may_hold_images(data: bytes) -> bool:
    """Whether `data` names an image, as written or behind escapes (`"\\u0069mage"`, which the upstream reads
    as plain: unseen, an image by URL was estimated at the size of its URL)."""
    return _IMAGE in data or hides_words(data)


def _load(content: _Content) -> ImageLoad:
    if content is None or isinstance(content, str):
        return NO_IMAGES
    count = data_bytes = 0
    pending: list[_Block] = [content] if isinstance(content, _Block) else list(content)
    while pending:
        block = pending.pop()
        source = block.source if isinstance(block.source, _Source) else None
        if block.type == "image":
            count += 1
            if source is not None:
                data_bytes += len(source.data)
        for inner in (block.content, source.content if source is not None else None):
            if isinstance(inner, _Block):
                pending.append(inner)
            elif isinstance(inner, list):
                pending.extend(inner)
    return ImageLoad(count, data_bytes)

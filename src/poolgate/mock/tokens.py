"""A cheap, deterministic token estimate: about four UTF-8 bytes per token, an image at a fixed cost."""

from __future__ import annotations

from poolgate.api.images import images_in_content

# What the mock bills an image: a screenshot as the models before Opus 4.7 read it, resized to ~1.15
# megapixels (about 1,600 tokens, Anthropic's vision guide), whatever the size of its base64.
IMAGE_TOKENS = 1_600


def estimate(data: bytes | str) -> int:
    size = len(data.encode()) if isinstance(data, str) else len(data)
    return (size + 3) // 4


def block_estimate(block: bytes) -> int:
    """A content block's (or a message's) tokens, its images at `IMAGE_TOKENS` each."""
    images = images_in_content(block)
    return estimate(block) + images.count * IMAGE_TOKENS - images.data_bytes // 4

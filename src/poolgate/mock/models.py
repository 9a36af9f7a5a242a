"""What the mock knows of a model from its id: its smallest cacheable prompt prefix, as the API's
documentation gives it per family and version."""

from __future__ import annotations

import re
from functools import lru_cache

MIN_CACHEABLE_TOKENS = 1024

# claude-3-5-haiku-20241022 (version first) or claude-opus-4-1-20250805 (family first); a minor version is one
# or two digits, never the start of a date.
_MODEL = re.compile(r"claude-(?:(\d+)(?:-(\d)(?!\d))?-([a-z]+)|([a-z]+)-(\d+)(?:-(\d{1,2})(?!\d))?)")

Version = tuple[str, int, int]  # family, major, minor


@lru_cache(maxsize=1024)  # the hot path sees a handful of ids; bounded, as clients choose the strings
def model_version(model: str) -> Version | None:
    """`("haiku", 3, 5)` for claude-3-5-haiku-20241022, `("opus", 4, 1)` for claude-opus-4-1; None for an id
    in neither naming."""
    match = _MODEL.match(model)
    if match is None:
        return None
    old_major, old_minor, old_family, family, major, minor = match.groups()
    if family is None:
        family, major, minor = old_family, old_major, old_minor
    return family, int(major), int(minor or 0)


def min_cacheable_tokens(model: str) -> int:
    """The smallest prefix the API caches for a model: 4,096 tokens from Opus and Haiku 4.5 on, 2,048 for
    Haiku 3 and 3.5, 1,024 for the others."""
    version = model_version(model)
    if version is None:
        return MIN_CACHEABLE_TOKENS
    family, major, minor = version
    if family in ("opus", "haiku") and (major, minor) >= (4, 5):
        return 4096
    return 2048 if family == "haiku" else MIN_CACHEABLE_TOKENS

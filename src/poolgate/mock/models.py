"""What the mock knows of a model from its id: the most output tokens it may be asked for, its smallest
cacheable prompt prefix and the thinking modes it refuses, as the API's documentation gives them."""

from __future__ import annotations

import re
from functools import lru_cache

MAX_OUTPUT_TOKENS = 128_000  # the API refuses a larger max_tokens for every model
# Claude 3.7 Sonnet writes up to 128k tokens with this beta, 64k without.
OUTPUT_128K_BETA = "output-128k-2025-02-19"
MIN_CACHEABLE_TOKENS = 1024

# claude-3-5-haiku-20241022 (version first) or claude-opus-4-1-20250805 (family first); a minor version is one
# or two digits, never the start of a date.
_MODEL = re.compile(r"claude-(?:(\d+)(?:-(\d)(?!\d))?-([a-z]+)|([a-z]+)-(\d+)(?:-(\d{1,2})(?!\d))?)")

Version = tuple[str, int, int]  # family, major, minor

# The output limits the documentation gives. Any other version (a newer one) may ask for MAX_OUTPUT_TOKENS:
# the mock never refuses what the API may give.
_MAX_OUTPUT: dict[Version, int] = {
    ("opus", 3, 0): 4096,
    ("sonnet", 3, 0): 4096,
    ("haiku", 3, 0): 4096,
    ("sonnet", 3, 5): 8192,
    ("haiku", 3, 5): 8192,
    ("sonnet", 3, 7): 64_000,
    ("sonnet", 4, 0): 64_000,
    ("sonnet", 4, 5): 64_000,
    ("opus", 4, 0): 32_000,
    ("opus", 4, 1): 32_000,
    ("opus", 4, 5): 64_000,
    ("haiku", 4, 5): 64_000,
}


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


# The model lines the Models API names (`line`); a model of none (an id the mock cannot place) has null.
MODEL_LINES = frozenset(("haiku", "sonnet", "opus", "fable", "mythos"))


def model_line(model: str) -> str | None:
    """The line the Models API puts a model in: `opus` for claude-opus-4-1 and claude-3-opus-20240229 alike."""
    version = model_version(model)
    return version[0] if version is not None and version[0] in MODEL_LINES else None


def max_output_tokens(model: str, betas: str) -> int:
    """The largest `max_tokens` the API takes for a model, given the request's `anthropic-beta` header."""
    version = model_version(model)
    if version is None or (version == ("sonnet", 3, 7) and OUTPUT_128K_BETA in betas):
        return MAX_OUTPUT_TOKENS
    return _MAX_OUTPUT.get(version, MAX_OUTPUT_TOKENS)


def min_cacheable_tokens(model: str) -> int:
    """The smallest prefix the API caches for a model: 512 tokens for Opus, Fable and Mythos from 5 on, 4,096
    for Opus 4.5 and 4.6 and Haiku 4.5, 2,048 for Opus 4.7 and Haiku 3 and 3.5, 1,024 for the others (Opus
    4.8, the Sonnets, Opus 4.1 and before)."""
    version = model_version(model)
    if version is None:
        return MIN_CACHEABLE_TOKENS
    family, major, _ = version
    if family in ("opus", "fable", "mythos") and major >= 5:
        return 512
    if version in (("opus", 4, 5), ("opus", 4, 6), ("haiku", 4, 5)):
        return 4096
    if version == ("opus", 4, 7) or (family == "haiku" and major == 3):
        return 2048
    return MIN_CACHEABLE_TOKENS


# The models fast mode runs on (`speed: "fast"`); on any other a request asking for it runs at standard speed,
# and its usage says `speed: "standard"`.
FAST_MODE_MODELS: frozenset[Version] = frozenset({("opus", 4, 6), ("opus", 4, 7), ("opus", 4, 8)})


def has_fast_mode(model: str) -> bool:
    return model_version(model) in FAST_MODE_MODELS


# The families whose models always think, and the efforts at which Claude Opus 5 thinks whatever the request
# says (`output_config.effort`).
ALWAYS_THINKING = ("fable", "mythos")
ALWAYS_THINKING_EFFORTS = ("xhigh", "max")


def thinking_refused(model: str, kind: object, effort: object) -> bool:
    """Whether the API refuses a `thinking.type` for a model (the documentation's "Troubleshooting thinking"
    table): extended thinking (`enabled`, with a budget) from Claude 4.7 on, adaptive thinking before 4.6, and
    `disabled` on the models that always think (Fable and Mythos, the 5.5 Opus and Sonnet; Opus 5 at its two
    highest efforts). An id the mock cannot place (`claude-mythos-preview`, a config's model) refuses none."""
    version = model_version(model)
    if version is None:
        return False
    family, major, minor = version
    if kind == "enabled":
        first_adaptive_only = (4, 7) if family == "opus" else (5, 0)
        return family in ALWAYS_THINKING or (major, minor) >= first_adaptive_only
    if kind == "adaptive":
        return family in ("opus", "sonnet", "haiku") and (major, minor) <= (4, 5)
    if kind == "disabled":
        if version == ("opus", 5, 0):
            return effort in ALWAYS_THINKING_EFFORTS
        return family in ALWAYS_THINKING or version in (("opus", 5, 5), ("sonnet", 5, 5))
    return False

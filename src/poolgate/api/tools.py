"""The tools a request offers, as far as its cost goes: the server-side web searches it may run, and the
advisors it may consult (the advisor tool: an inference on another model, billed at that model's rates)."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from poolgate.api.escapes import hides_words

__all__ = [
    "ADVISOR_OUTPUT_UNSET",
    "MAX_RESERVED_ADVISOR_USES",
    "MAX_RESERVED_WEB_SEARCHES",
    "UNBOUNDED_ADVISOR_USES",
    "UNBOUNDED_WEB_SEARCHES",
    "Advisor",
    "Offered",
    "offered_tools",
]

# What a web search tool without `max_uses` reserves: the API lets the model search until it is done (Claude
# Code's WebSearch sets `max_uses: 8`). A larger `max_uses` reserves itself, up to MAX_RESERVED_WEB_SEARCHES
# (~$10 at $10 per 1,000: no request runs more).
UNBOUNDED_WEB_SEARCHES = 10
MAX_RESERVED_WEB_SEARCHES = 1000
# The advisor tool (`advisor_20260301`): each consultation reads the whole conversation and writes up to the
# tool's `max_tokens` (thinking and text; the API's minimum is 1,024), on the advisor's model. Without
# `max_uses` the executor may consult it as often as it likes: 3 are reserved (advisors are meant to be
# consulted about once a task); without `max_tokens`, 2,048 a consultation (the API's suggested starting value;
# a consultation typically writes 1,400–1,800 tokens): allowances, not bounds. A larger `max_uses` reserves
# itself, up to MAX_RESERVED_ADVISOR_USES.
UNBOUNDED_ADVISOR_USES: Final = 3
ADVISOR_OUTPUT_UNSET: Final = 2048
MAX_RESERVED_ADVISOR_USES: Final = 100


class Advisor(msgspec.Struct, frozen=True):
    """An advisor a request may consult: its model, the consultations reserved, the output of each, and the
    cache write its transcript may make ("5m", "1h" or None: the tool's `caching`)."""

    model: str
    uses: int
    max_tokens: int
    cache_write_ttl: str | None = None


class Offered(msgspec.Struct, frozen=True):
    """What a request's tools may cost beyond its own tokens: web searches, and advisors."""

    web_searches: int = 0
    advisors: tuple[Advisor, ...] = ()


NOTHING_OFFERED: Final = Offered()


# (Not in a module setup.py compiles: msgspec decodes by a Struct's annotations, which mypyc does not keep.)
class _Tool(msgspec.Struct):
    type: Any = None
    max_uses: Any = None
    model: Any = None
    max_tokens: Any = None
    caching: Any = None


_TOOLS = msgspec.json.Decoder(list[_Tool])


def _allowance(value: Any, unset: int, most: int | None = None) -> int:
    """A tool's count as reserved: the count it sets (a positive integer), at most `most`; else `unset`."""
    if type(value) is not int or value <= 0:
        return unset
    return value if most is None or value <= most else most


def _cache_write_ttl(caching: Any) -> str | None:
    if not isinstance(caching, dict):
        return None
    return "1h" if caching.get("ttl") == "1h" else "5m"


def offered_tools(tools: bytes) -> Offered:
    """What a request's `tools` (its JSON array) may cost beyond its tokens: each web search tool's `max_uses`,
    and each advisor tool (one without a model is refused by the API, and reserves nothing)."""
    if b"web_search_" not in tools and b"advisor_" not in tools and not hides_words(tools):
        return NOTHING_OFFERED
    try:
        offered = _TOOLS.decode(tools)
    except (msgspec.DecodeError, RecursionError):  # not a list of objects: the upstream refuses it anyway
        return NOTHING_OFFERED
    searches = 0
    advisors = []
    for tool in offered:
        kind = tool.type
        if not isinstance(kind, str):
            continue
        if kind.startswith("web_search_"):
            searches += _allowance(tool.max_uses, UNBOUNDED_WEB_SEARCHES, MAX_RESERVED_WEB_SEARCHES)
        elif kind.startswith("advisor_") and isinstance(tool.model, str) and tool.model:
            advisors.append(
                Advisor(
                    tool.model,
                    _allowance(tool.max_uses, UNBOUNDED_ADVISOR_USES, MAX_RESERVED_ADVISOR_USES),
                    _allowance(tool.max_tokens, ADVISOR_OUTPUT_UNSET),
                    _cache_write_ttl(tool.caching),
                )
            )
    if not searches and not advisors:
        return NOTHING_OFFERED
    return Offered(searches, tuple(advisors))

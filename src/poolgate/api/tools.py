"""The tools a request offers, as far as its cost goes: the server-side web searches it may run."""

from __future__ import annotations

from typing import Any

import msgspec

from poolgate.api.escapes import hides_words

__all__ = ["MAX_RESERVED_WEB_SEARCHES", "UNBOUNDED_WEB_SEARCHES", "offered_searches"]

# What a web search tool without `max_uses` reserves: the API lets the model search until it is done (Claude
# Code's WebSearch sets `max_uses: 8`). A larger `max_uses` reserves itself, up to MAX_RESERVED_WEB_SEARCHES
# (~$10 at $10 per 1,000: no request runs more).
UNBOUNDED_WEB_SEARCHES = 10
MAX_RESERVED_WEB_SEARCHES = 1000


# (Not in a module setup.py compiles: msgspec decodes by a Struct's annotations, which mypyc does not keep.)
class _Tool(msgspec.Struct):
    type: Any = None
    max_uses: Any = None


_TOOLS = msgspec.json.Decoder(list[_Tool])


def offered_searches(tools: bytes) -> int:
    """The web searches a request's `tools` (its JSON array) may run: each web search tool's `max_uses`."""
    if b"web_search_" not in tools and not hides_words(tools):
        return 0
    try:
        offered = _TOOLS.decode(tools)
    except (msgspec.DecodeError, RecursionError):  # not a list of objects: the upstream refuses it anyway
        return 0
    searches = 0
    for tool in offered:
        if isinstance(tool.type, str) and tool.type.startswith("web_search_"):
            uses = tool.max_uses
            searches += (
                min(uses, MAX_RESERVED_WEB_SEARCHES) if type(uses) is int and uses > 0 else UNBOUNDED_WEB_SEARCHES
            )
    return searches

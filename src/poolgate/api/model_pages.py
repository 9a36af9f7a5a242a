"""The Models API's paging, shared by the gateway (which answers `GET /v1/models` from its own list: `model_page`)
and the mock upstream, so that the two cannot page differently: `limit` (1–1000, default 20), then `after_id` or
`before_id` to go forwards or backwards from a model of the list."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from poolgate.api.errors import ApiError

MODELS_PAGE_DEFAULT, MODELS_PAGE_MAX = 20, 1000

# What the API trims around a query integer: pydantic-core trims with Rust's `str::trim`, Unicode's White_Space
# (Python's `str.strip()` would also take U+001C–U+001F, which pydantic refuses).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(
    map(chr, range(0x2000, 0x200B))  # U+2000–U+200A, the typographic spaces
)
# ASCII digits only: `\d` and `int()` also take other scripts' digits ("１"), and `int()` underscores ("1_0").
# (pydantic's lax int parsing takes "1_0", and "5.0" too; this refuses both.)
_INTEGER = re.compile(r"([+-]?)0*([0-9]+)")


def query_int(text: str) -> int | None:
    """The integer a query parameter spells as the API reads one: optional sign and ASCII digits, with
    surrounding whitespace; None for anything else. Leading zeros are dropped before `int()`, whose
    4300-digit guard would otherwise refuse a long run of them that the API reads."""
    match = _INTEGER.fullmatch(text.strip(_WHITESPACE))
    if match is None:
        return None
    sign, digits = match.groups()
    try:
        return int(sign + digits)
    except ValueError:  # more digits than `int()` converts: no page size anyway
        return None


@dataclass(frozen=True, slots=True)
class PageWindow:
    """The slice of the list a page shows, and whether there is more in the direction it went."""

    start: int
    end: int
    has_more: bool


def page_window(
    ids: Sequence[str], limit_text: str | None, after_id: str | None, before_id: str | None
) -> PageWindow | str:
    """The page of `ids` that `limit` (its query text; None: the default) and a cursor select; a string is
    the 400's message, in the API's words (a limit that is no integer or out of range, a cursor that is not
    in the list). Going backwards, `has_more` tells whether there are models before the page."""
    limit = MODELS_PAGE_DEFAULT if limit_text is None else query_int(limit_text)
    if limit is None:
        return "limit: Input should be a valid integer"
    if not 1 <= limit <= MODELS_PAGE_MAX:
        return f"limit: Input should be between 1 and {MODELS_PAGE_MAX}"
    for name, cursor in (("after_id", after_id), ("before_id", before_id)):
        if cursor is not None and cursor not in ids:
            return f"{name}: no model {cursor!r} in the list"
    if before_id is not None:
        end = ids.index(before_id)
        start = max(0, end - limit)
        return PageWindow(start, end, start > 0)
    start = ids.index(after_id) + 1 if after_id is not None else 0
    end = min(len(ids), start + limit)
    return PageWindow(start, end, end < len(ids))


def model_page(models: list[dict[str, Any]], query: bytes) -> dict[str, object]:
    """One page of a model list in Anthropic's shape (`limit`, `after_id`, `before_id`: `page_window`), as
    the API (and the SDKs' auto-pagination) use them."""
    # Blank values kept: `?limit=` is no integer to the API (nor to the mock), not the default page.
    params = parse_qs(query.decode("latin-1"), keep_blank_values=True)
    limit, after, before = (params.get(name, [None])[0] for name in ("limit", "after_id", "before_id"))
    window = page_window([model["id"] for model in models], limit, after, before)
    if isinstance(window, str):
        raise ApiError(400, window)
    page = models[window.start : window.end]
    return {
        "data": page,
        "has_more": window.has_more,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }
